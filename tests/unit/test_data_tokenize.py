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


# --- special-token text in data is text; the template's end-of-turn token ends the answer ---


def char_tok(eos: str = "<|im_end|>"):
    from nemo_adapt.models.random_init import char_tokenizer

    tok = char_tokenizer()
    tok.eos_token = eos
    return tok


def _ids_of(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


@pytest.mark.parametrize("which", ["smollm2", "char"])
def test_special_token_text_inside_an_answer_is_encoded_as_text(tok, which):
    t = tok if which == "smollm2" else char_tok()
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "AB<|im_end|>CD"}]
    ex = tokenize_chat(t, chat)
    eot = _ids_of(t, "<|im_end|>")
    answer_ids = [i for i, m in zip(ex.input_ids, ex.answer_mask) if m]
    # One control token in the answer, the real end of turn; the data's text is plain characters.
    assert answer_ids.count(eot) == 1 and answer_ids[-1] == eot
    as_text = t("AB<|im_end|>CD", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert answer_ids[:-1] == as_text
    assert ex.special_token_text
    # every other control token is the template's: one <|im_end|> per rendered message
    n_messages = t.apply_chat_template(chat, tokenize=False).count("<|im_start|>")
    assert ex.input_ids.count(eot) == n_messages


def test_plain_chats_are_not_flagged_and_keep_the_templates_ids(tok):
    ex = tokenize_chat(tok, MULTI_TURN)
    assert not ex.special_token_text
    assert ex.input_ids == list(tok.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"])


def test_records_with_special_text_are_tokenized_like_single_chats(tok):
    recs = [Record(messages=({"role": "user", "content": u}, {"role": "assistant", "content": a}), path="d.jsonl",
                   line=i + 1)
            for i, (u, a) in enumerate([("a", "b"), ("<|im_start|>x", "y<|endoftext|>"), ("c", "d")])]
    batch = tokenize_records(tok, recs, system_prompt="S")
    single = [tokenize_chat(tok, r.with_system_prompt("S").messages) for r in recs]
    assert [(e.input_ids, e.answer_mask, e.special_token_text) for e in batch] == \
        [(e.input_ids, e.answer_mask, e.special_token_text) for e in single]
    assert [e.special_token_text for e in batch] == [False, True, False]


def test_answer_mask_ends_at_the_templates_end_of_turn_not_the_eos_token():
    # Qwen2.5 base: eos is <|endoftext|> while ChatML turns end with <|im_end|>. Training up to eos
    # would train the "\n" after <|im_end|> and never teach the model where its turn ends.
    from nemo_adapt.data.tokenize import end_of_turn_text

    t = char_tok(eos="<|endoftext|>")
    assert end_of_turn_text(t) == "<|im_end|>"
    ex = tokenize_chat(t, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ABCD"}])
    assert answer_runs(t, ex) == ["ABCD<|im_end|>"]


def test_end_of_turn_falls_back_to_eos_without_a_template():
    from nemo_adapt.data.tokenize import end_of_turn_text

    t = char_tok(eos="<|endoftext|>")
    t.chat_template = None
    assert end_of_turn_text(t) == "<|endoftext|>"


def test_prompts_for_generation_keep_special_text_as_text(tok):
    from nemo_adapt.data.tokenize import encode_prompt

    plain = [{"role": "user", "content": "Hi there"}]
    assert encode_prompt(tok, plain) == list(tok.apply_chat_template(plain, add_generation_prompt=True,
                                                                     tokenize=True)["input_ids"])
    tricky = [{"role": "user", "content": "end it with <|im_end|> please"}]
    ids = encode_prompt(tok, tricky)
    # only the template's ends of turn (default system message and the user's), none from the text
    text = tok.apply_chat_template(tricky, add_generation_prompt=True, tokenize=False)
    assert ids.count(_ids_of(tok, "<|im_end|>")) == text.count("<|im_start|>") - 1 == 2
    assert tok.decode(ids) == text


def test_trimming_template_keeps_special_text_and_rewriting_template_is_refused():
    t = char_tok()
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = tokenize_chat(t, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " A<|im_end|>B "}])
    assert answer_runs(t, ex) == ["A<|im_end|>B<|im_end|>"]
    assert ex.special_token_text
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                       "{% endfor %}")
    with pytest.raises(DataError, match=r"^d.jsonl:4: messages\[1\] contains the special-token text '<\|im_end\|>'"):
        tokenize_chat(t, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a<|im_end|>b"}],
                      where="d.jsonl:4")


def test_split_stats_count_examples_with_special_token_text(tmp_path):
    import json

    from nemo_adapt.config.schema import DataConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.data.dataset import format_stats

    train = tmp_path / "train.jsonl"
    chats = [("q1", "a1"), ("say <|im_end|>", "AB<|im_end|>CD"), ("q3", "a3")]
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for u, a in chats))
    ds = build_datasets(DataConfig(train=str(train), seq_length=64, cache_dir=str(tmp_path / "c")), char_tok(), seed=0)
    assert ds.stats["train"]["special_token_text"] == 1
    assert "1 example(s) contain special-token text, encoded as plain text" in format_stats("train", ds.stats["train"])
    ids, mask = ds.train.example(1)
    eot = _ids_of(char_tok(), "<|im_end|>")
    assert [int(t) for t, m in zip(ids, mask) if m].count(eot) == 1


def test_examples_truncated_or_dropped_for_length_are_named_by_line(tmp_path, capsys):
    import json

    from nemo_adapt.config.schema import DataConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.data.dataset import print_data_report

    train = tmp_path / "train.jsonl"
    chats = [("q", "a"), ("x" * 80, "long"), ("q", "b"), ("y" * 90, "long")]
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for u, a in chats))
    ds = build_datasets(DataConfig(train=str(train), seq_length=64, cache_dir=str(tmp_path / "c")), char_tok(), seed=0)
    stats = ds.stats["train"]
    # truncation keeps the start: the long user turns leave no answer tokens, so both are dropped
    assert stats["dropped"] == 2 and stats["dropped_lines"] == [2, 4]
    print_data_report(ds)
    assert f"note: train examples longer than data.seq_length=64 (data.over_length): dropped 2 ({train}:2, {train}:4)" \
        in capsys.readouterr().out
