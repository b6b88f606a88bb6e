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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from nemo_adapt.data.formats import DataError, Record


@dataclass
class TokenizedExample:
    """One chat as tokens.

    Attributes:
        input_ids: the token ids of the whole rendered chat.
        answer_mask: 1 for tokens of an assistant answer (content and its end-of-turn token), else 0.
    """

    input_ids: list[int]
    answer_mask: list[int]


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


def end_of_turn_text(tokenizer) -> str | None:
    """The text of the token that closes an assistant turn (the eos token, `<|im_end|>` for SmolLM2).

    Args:
        tokenizer: a `transformers` tokenizer.

    Returns:
        The token's text, or None when the tokenizer has no eos token.
    """
    return tokenizer.eos_token or None


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # add_special_tokens=False: the template already wrote every special token it wants (this is
    # what apply_chat_template(tokenize=True) does too, so the ids match).
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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


def _answer_spans(tokenizer, messages: Sequence[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character span of each assistant answer in it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat training data needs one")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eot = end_of_turn_text(tokenizer)
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
        # not something the model should be trained to emit (generation stops at eos anyway).
        if eot:
            cut = full.rfind(eot, start, end)
            if cut >= 0:
                end = cut + len(eot)
        spans.append((start, end))
    return full, spans


def _texts(full: str, spans: list[tuple[int, int]]) -> list[str]:
    """What to tokenize for one chat: the whole text, then the text up to each span boundary."""
    return [full] + [full[:c] for span in spans for c in span]


def _mask(encoded: list[list[int]], n_spans: int) -> TokenizedExample:
    full_ids = encoded[0]
    mask = [0] * len(full_ids)
    for j in range(n_spans):
        s = _boundary(encoded[1 + 2 * j], full_ids, inclusive_end=False)
        e = _boundary(encoded[2 + 2 * j], full_ids, inclusive_end=True)
        mask[s:e] = [1] * (e - s)
    return TokenizedExample(input_ids=full_ids, answer_mask=mask)


def tokenize_chat(tokenizer, messages: Sequence[dict[str, str]], where: str = "a chat") -> TokenizedExample:
    """Tokenize one chat with the chat template and mark its answer tokens.

    Args:
        tokenizer: a `transformers` tokenizer with a chat template.
        messages: the chat (`role`/`content` dicts), ending with an assistant turn.
        where: the record's location (`file:line`) for error messages.

    Returns:
        The token ids (the same as `apply_chat_template(messages, tokenize=True)`) and the answer
        mask (every assistant turn, each with its end-of-turn token).

    Raises:
        DataError: the tokenizer has no chat template, or the template does not render a chat's
            prefix as a prefix of the chat (answer spans cannot be located).
    """
    full, spans = _answer_spans(tokenizer, messages, where)
    return _mask(_encode(tokenizer, _texts(full, spans)), len(spans))


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
    out: list[TokenizedExample] = []
    for lo in range(0, len(records), chunk):
        plans = []
        for r in records[lo:lo + chunk]:
            rec = r.with_system_prompt(system_prompt, replace_system_prompt)
            plans.append(_answer_spans(tokenizer, rec.messages, where=f"{r.path}:{r.line}"))
        texts = [t for full, spans in plans for t in _texts(full, spans)]
        encoded = _encode(tokenizer, texts)
        at = 0
        for _, spans in plans:
            n = 1 + 2 * len(spans)
            out.append(_mask(encoded[at:at + n], len(spans)))
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
