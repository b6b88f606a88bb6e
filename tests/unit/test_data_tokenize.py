"""Chat-template tokenization: the loss mask covers exactly each assistant answer and its <|im_end|>."""

import pytest

from nemo_adapt.data import DataError, tokenize_chat
from nemo_adapt.data.formats import Record
from nemo_adapt.data.tokenize import pad_token_id, tokenize_records


@pytest.fixture(scope="module")
def tok():
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf_path())


def answer_runs(tok, ex) -> list[str]:
    """Decoded contiguous runs of answer-masked tokens."""
    runs, cur = [], []
    for t, m in zip(ex.input_ids, ex.answer_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?\n\nOne word."},
    {"role": "assistant", "content": "Rome,\n  of course "},  # trailing whitespace is part of the answer
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome! 😀"},
]


def test_mask_is_exactly_every_assistant_answer_and_its_end_token(tok):
    ex = tokenize_chat(tok, MULTI_TURN)
    assert answer_runs(tok, ex) == [m["content"] + "<|im_end|>" for m in MULTI_TURN if m["role"] == "assistant"]
    # same ids as the tokenizer's own chat template tokenization
    assert ex.input_ids == list(tok.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"])
    assert len(ex.answer_mask) == len(ex.input_ids)


def test_answer_with_leading_whitespace_keeps_the_merged_token(tok):
    # Byte-level BPE merges the header's "\n" with the answer's leading spaces into one token; that
    # token carries answer characters, so it is trained on rather than losing the spaces.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  indented"}]
    ex = tokenize_chat(tok, chat)
    assert answer_runs(tok, ex) == ["\n  indented<|im_end|>"]
    assert ex.input_ids == list(tok.apply_chat_template(chat, tokenize=True)["input_ids"])


def test_default_system_prompt_of_the_template_is_not_trained(tok):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ex = tokenize_chat(tok, chat)
    assert "SmolLM" in tok.decode(ex.input_ids)  # the template added its default system prompt
    assert answer_runs(tok, ex) == ["Hello!<|im_end|>"]


def test_system_prompt_setting_applies_only_to_records_without_one(tok):
    pc = Record(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}),
                path="x.jsonl", line=1)
    own = Record(messages=({"role": "system", "content": "OWN"}, *pc.messages), path="x.jsonl", line=2)
    ex_pc, ex_own = tokenize_records(tok, [pc, own], system_prompt="CUSTOM")
    assert "CUSTOM" in tok.decode(ex_pc.input_ids) and "SmolLM" not in tok.decode(ex_pc.input_ids)
    assert "OWN" in tok.decode(ex_own.input_ids) and "CUSTOM" not in tok.decode(ex_own.input_ids)
    assert answer_runs(tok, ex_pc) == answer_runs(tok, ex_own) == ["a<|im_end|>"]


def test_answer_containing_end_token_text_is_masked_to_the_real_end(tok):
    chat = [{"role": "user", "content": "Say the token"}, {"role": "assistant", "content": "it is <|im_end|> ok"}]
    ex = tokenize_chat(tok, chat)
    assert answer_runs(tok, ex) == ["it is <|im_end|> ok<|im_end|>"]


def test_template_that_does_not_render_prefixes_is_reported(tok):
    class Reordering:
        """A tokenizer whose template renders the last turn differently (as some reasoning templates do)."""

        chat_template = "x"
        eos_token = "<|im_end|>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(("LAST:" if i == len(messages) - 1 else "") + m["content"] for i, m in enumerate(messages))

    with pytest.raises(DataError, match=r"^f.jsonl:7: the chat template does not render"):
        tokenize_chat(Reordering(), MULTI_TURN[1:3], where="f.jsonl:7")


def test_pad_id_is_eos_for_smollm2(tok):
    assert pad_token_id(tok) == 2 == tok.convert_tokens_to_ids("<|im_end|>")
