"""Chats -> token ids and an answer-token mask, through the tokenizer's own chat template.

The loss must fall on exactly the tokens the model is asked to produce: the content of each
assistant turn and the end-of-turn token that closes it (so the fine-tuned model learns to stop),
but not the role header (`<|im_start|>assistant\\n`) the serving stack writes, nor the template's
decoration after the end-of-turn token. Few templates mark assistant spans for
`return_assistant_tokens_mask` (SmolLM2's has no `{% generation %}` tags), so the spans are found
by rendering the chat prefix by prefix:

    render(messages[:i], add_generation_prompt=True)  -> where assistant turn i starts
    render(messages[:i + 1])                          -> where it ends (cut after the end-of-turn token)

and each character boundary is mapped to a token index by tokenizing the text up to it and
comparing with the full tokenization. Working on the rendered strings keeps this correct for any
template that renders a prefix of a chat as a prefix of the whole chat; one that does not (e.g. a
template that drops earlier turns' reasoning) is reported instead of silently mis-masked.

Text in data is text. A message whose content contains the text of a special token (`<|im_end|>`
written in an answer) must not become that control token: the chat template writes the real
control tokens, the data only characters. Such chats are encoded piece by piece — the template's
special tokens as ids, everything between them with `split_special_tokens=True` — which for every
other chat gives exactly the ids of the plain tokenization (the tokenizer splits at special tokens
first anyway), and the examples are counted (`special_token_text`) in the split's stats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nemo_adapt.data.formats import DataError, Record


@dataclass
class TokenizedExample:
    """One chat as tokens.

    Attributes:
        input_ids: the token ids of the whole rendered chat.
        answer_mask: 1 for tokens of an assistant answer (content and its end-of-turn token), else 0.
        special_token_text: the chat's messages contain special-token text, encoded as plain text.
    """

    input_ids: list[int]
    answer_mask: list[int]
    special_token_text: bool = False


def pad_token_id(tokenizer) -> int:
    """The id used to pad rows: the tokenizer's pad token, else its eos token.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The pad id.

    Raises:
        DataError: the tokenizer has neither a pad nor an eos token.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("the tokenizer has no pad or eos token to pad rows with")


# Stands in for an answer when rendering a probe chat: letters and digits only, so templates that
# trim or otherwise touch the content leave it as it is.
_PROBE = "NemoAdaptProbeAnswer7Q"


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (those the tokenizer splits text at), longest first.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The special tokens' strings; longest first, so a regex alternation prefers the longest match.
    """
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", ()) or ()}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    return tuple(sorted((t for t in texts if t), key=lambda t: (-len(t), t)))


def end_of_turn_text(tokenizer) -> str | None:
    """The text of the token that closes an assistant turn in the chat template.

    This is the first special token the template writes after an answer (`<|im_end|>` for ChatML
    templates such as SmolLM2's and Qwen2.5's, `<|eot_id|>` for Llama-3's), found by rendering a
    one-turn probe chat. It is often not the tokenizer's eos token: Qwen2.5 base models declare
    `<|endoftext|>` as eos while their turns end with `<|im_end|>`, and training up to the eos
    token would teach the model to run past the end of its turn. Without a chat template, or when
    the template writes no special token after an answer, the eos token is the end of a turn.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The token's text, or None when there is neither an end-of-turn token nor an eos token.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = _render(tokenizer, [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": _PROBE}], add_generation_prompt=False)
        except Exception:  # a template that refuses the probe: fall back to eos
            text = ""
        at = text.rfind(_PROBE)
        specials = special_token_texts(tokenizer)
        if at >= 0 and specials:
            found = _special_pattern(specials).search(text, at + len(_PROBE))
            if found:
                return found.group(0)
    return tokenizer.eos_token or None


def _special_pattern(specials: Sequence[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in specials))


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # add_special_tokens=False: the template already wrote every special token it wants (this is
    # what apply_chat_template(tokenize=True) does too, so the ids match).
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class _Encoder:
    """One tokenizer's facts needed to encode chats, computed once per batch of records."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = special_token_texts(tokenizer)
        self.pattern = _special_pattern(self.specials) if self.specials else None
        self._eot: list[str | None] = []

    @property
    def eot(self) -> str | None:
        if not self._eot:
            self._eot.append(end_of_turn_text(self.tokenizer))
        return self._eot[0]

    def pieces(self, text: str, protected: Sequence[tuple[int, int]]) -> list[int]:
        """Ids of `text` where special-token text inside `protected` character ranges stays text.

        The template's special tokens (every match outside the ranges) become their ids; the text
        between them is encoded with `split_special_tokens=True`.
        """
        tok, ids, pos = self.tokenizer, [], 0

        def plain(piece: str) -> None:
            if piece:
                ids.extend(tok(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])

        for m in self.pattern.finditer(text):
            if any(a <= m.start() < b for a, b in protected):
                continue  # data, not a control token
            plain(text[pos:m.start()])
            ids.append(tok.convert_tokens_to_ids(m.group(0)))
            pos = m.end()
        plain(text[pos:])
        return ids

    def locate_text(self, messages: Sequence[dict[str, str]], full: str, add_generation_prompt: bool,
                    where: str) -> list[tuple[int, int]]:
        """Character ranges in `full` of the messages whose content holds special-token text.

        The chat is rendered again with each such content replaced by a placeholder; putting the
        contents back must give `full` exactly (or with the contents stripped, for templates that
        trim), which proves where the data's text is.

        Raises:
            DataError: the template changes such a message's text, or the tokenizer cannot encode
                the chat piece by piece as it encodes it whole, so the text cannot be kept as text.
        """
        if self.pattern is None:
            return []
        flagged = [i for i, m in enumerate(messages) if self.pattern.search(m["content"])]
        if not flagged:
            return []
        tags = {i: f"NemoAdaptText{i}Q" for i in flagged}
        probe = [dict(m, content=tags[i]) if i in tags else dict(m) for i, m in enumerate(messages)]
        rendered = _render(self.tokenizer, probe, add_generation_prompt)
        first = self.pattern.search(messages[flagged[0]]["content"]).group(0)
        for strip in (False, True):
            parts: list[str] = []
            ranges: list[tuple[int, int]] = []
            pos, length = 0, 0
            for i in flagged:
                at = rendered.find(tags[i], pos)
                if at < 0 or rendered.count(tags[i]) != 1:
                    break
                content = messages[i]["content"].strip() if strip else messages[i]["content"]
                parts += [rendered[pos:at], content]
                length += at - pos
                ranges.append((length, length + len(content)))
                length += len(content)
                pos = at + len(tags[i])
            else:
                if "".join(parts) + rendered[pos:] == full:
                    break
        else:
            raise DataError(f"{where}: messages[{flagged[0]}] contains the special-token text {first!r}, and the "
                            f"chat template changes message text, so it cannot be kept as plain text; "
                            f"remove or rewrite it in the data")
        if self.pieces(full, []) != _encode(self.tokenizer, [full])[0]:
            raise DataError(f"{where}: messages[{flagged[0]}] contains the special-token text {first!r}, and this "
                            f"tokenizer does not encode a chat piece by piece as it encodes it whole, so it "
                            f"cannot be kept as plain text; remove or rewrite it in the data")
        return ranges

    def encode(self, texts: list[str], protected: Sequence[tuple[int, int]]) -> list[list[int]]:
        """Ids of each text (prefixes of one rendered chat), keeping `protected` ranges as text."""
        if not protected:
            return _encode(self.tokenizer, texts)
        return [self.pieces(t, [(a, min(b, len(t))) for a, b in protected if a < len(t)]) for t in texts]


@dataclass
class _Plan:
    """One rendered chat: its text, the answer spans and the ranges of special-token text in it."""

    full: str
    spans: list[tuple[int, int]]
    protected: list[tuple[int, int]]

    def texts(self) -> list[str]:
        """What to tokenize: the whole text, then the text up to each span boundary."""
        return [self.full] + [self.full[:c] for span in self.spans for c in span]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _boundary(prefix_ids: list[int], full_ids: list[int], inclusive_end: bool) -> int:
    """Token index for a character boundary, given the tokens of the text before it.

    When no token straddles the boundary the prefix's tokens are a prefix of the full tokens and
    the index is their count. When BPE merged characters across the boundary, the straddling token
    holds answer characters, so it counts as answer: it starts the span (start boundary) or ends it
    (`inclusive_end`).
    """
    k = _common_prefix(prefix_ids, full_ids)
    if k == len(prefix_ids):
        return k
    return min(k + 1, len(full_ids)) if inclusive_end else k


def _plan(enc: _Encoder, messages: Sequence[dict[str, str]], where: str) -> _Plan:
    """Render a chat and find the character span of each assistant answer in it."""
    tokenizer = enc.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat training data needs one")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eot = enc.eot
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(f"{where}: the chat template does not render the chat up to message {i} as a "
                            f"prefix of the whole chat, so the answer tokens cannot be located")
        start, end = len(before), len(through)
        # Stop right after the end-of-turn token: the newline a template writes after it is layout,
        # not something the model should be trained to emit (generation stops there anyway).
        if eot:
            cut = full.rfind(eot, start, end)
            if cut >= 0:
                end = cut + len(eot)
        spans.append((start, end))
    return _Plan(full, spans, enc.locate_text(messages, full, False, where))


def _mask(encoded: list[list[int]], plan: _Plan) -> TokenizedExample:
    full_ids = encoded[0]
    mask = [0] * len(full_ids)
    for j in range(len(plan.spans)):
        s = _boundary(encoded[1 + 2 * j], full_ids, inclusive_end=False)
        e = _boundary(encoded[2 + 2 * j], full_ids, inclusive_end=True)
        mask[s:e] = [1] * (e - s)
    return TokenizedExample(input_ids=full_ids, answer_mask=mask, special_token_text=bool(plan.protected))


def tokenize_chat(tokenizer, messages: Sequence[dict[str, str]], where: str = "a chat") -> TokenizedExample:
    """Tokenize one chat with the chat template and mark its answer tokens.

    Args:
        tokenizer: a `transformers` tokenizer with a chat template.
        messages: the chat (`role`/`content` dicts), ending with an assistant turn.
        where: the record's location (`file:line`) for error messages.

    Returns:
        The token ids (the same as `apply_chat_template(messages, tokenize=True)` unless a message
        holds special-token text, which is encoded as text) and the answer mask (every assistant
        turn, each with the template's end-of-turn token).

    Raises:
        DataError: the tokenizer has no chat template, the template does not render a chat's
            prefix as a prefix of the chat (answer spans cannot be located), or special-token text
            in a message cannot be kept as text.
    """
    enc = _Encoder(tokenizer)
    plan = _plan(enc, messages, where)
    return _mask(enc.encode(plan.texts(), plan.protected), plan)


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]], where: str = "a prompt") -> list[int]:
    """Token ids of a chat prompt with the generation prompt added, as evaluation and generation use it.

    Special-token text inside a message is encoded as text, as in training (see the module doc).

    Args:
        tokenizer: a `transformers` tokenizer with a chat template.
        messages: the chat so far (`role`/`content` dicts).
        where: the prompt's location for error messages.

    Returns:
        The ids of `apply_chat_template(messages, add_generation_prompt=True)`.

    Raises:
        DataError: special-token text in a message cannot be kept as text (see `tokenize_chat`).
    """
    enc = _Encoder(tokenizer)
    full = _render(tokenizer, list(messages), add_generation_prompt=True)
    return enc.encode([full], enc.locate_text(list(messages), full, True, where))[0]


def tokenize_records(tokenizer, records: Sequence[Record], system_prompt: str | None,
                     chunk: int = 256, replace_system_prompt: bool = False) -> list[TokenizedExample]:
    """Tokenize records in order, adding `system_prompt` to those without a system message.

    Args:
        tokenizer: a `transformers` tokenizer with a chat template.
        records: validated records (see `formats.read_records`).
        system_prompt: default system message (None: the template's own default, if any).
        chunk: records whose texts go to the tokenizer in one batch call (amortises per-call cost).
        replace_system_prompt: use `system_prompt` in place of the records' own system messages too.

    Returns:
        One tokenized example per record.

    Raises:
        DataError: as `tokenize_chat`.
    """
    enc = _Encoder(tokenizer)
    out: list[TokenizedExample] = []
    for lo in range(0, len(records), chunk):
        plans = []
        for r in records[lo:lo + chunk]:
            rec = r.with_system_prompt(system_prompt, replace_system_prompt)
            plans.append(_plan(enc, rec.messages, where=f"{r.path}:{r.line}"))
        # One batch call for the plain chats; chats holding special-token text go piece by piece.
        plain = _encode(tokenizer, [t for p in plans if not p.protected for t in p.texts()])
        at = 0
        for plan in plans:
            if plan.protected:
                out.append(_mask(enc.encode(plan.texts(), plan.protected), plan))
                continue
            n = 1 + 2 * len(plan.spans)
            out.append(_mask(plain[at:at + n], plan))
            at += n
    return out


def tokenizer_identity(tokenizer) -> str:
    """Everything about a tokenizer that changes how text becomes ids, as one string to hash.

    The vocabulary, merges, normalizer and pre-tokenizer (the fast tokenizer's JSON), the chat
    template and the special tokens the pipeline uses.

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        A canonical string.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary is the best stable description there is
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token,
        "pad_id": tokenizer.pad_token_id,
        "eos_id": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token,
    }
    return vocab + "\n" + json.dumps(extra, sort_keys=True, ensure_ascii=False)
