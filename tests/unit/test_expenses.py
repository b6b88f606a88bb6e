"""The expenses domain dataset: reproducible, held out, learnable-looking labels, short examples."""

import json
from pathlib import Path

import pytest

from nemo_adapt.data import load_records
from nemo_adapt.data.domains import expenses

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "datasets" / "expenses"
SPLITS = ("train", "validation", "test")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def amounts_in(text: str) -> list[int]:
    """Whole dollars of every `$...` amount in a line ("$1,234.56," -> 1234)."""
    return [int(tok.strip("$.,").split(".")[0].replace(",", ""))
            for tok in text.replace("$", " $").split() if tok.startswith("$")]


def test_regeneration_is_byte_identical(tmp_path):
    expenses.main(["--out", str(tmp_path)])
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (COMMITTED / f"{split}.jsonl").read_bytes(), split


def test_sizes_and_held_out_lines():
    data = {s: read(COMMITTED / f"{s}.jsonl") for s in SPLITS}
    assert {s: len(v) for s, v in data.items()} == expenses.SPLIT_SIZES
    lines = {s: [r["messages"][1]["content"] for r in v] for s, v in data.items()}
    train = set(lines["train"])
    assert len(train) == len(lines["train"])
    for split in ("validation", "test"):
        assert len(set(lines[split])) == len(lines[split]), split
        assert not train & set(lines[split]), split
        # no train line's description occurs in an eval line: the combinations are held out
        for account, (frames, values) in expenses.ITEMS.items():
            for f, frame in enumerate(frames):
                for v, value in enumerate(values):
                    if not expenses.is_heldout_item(f, v):
                        item = frame.format(x=value)
                        item = item[0].upper() + item[1:]
                        assert not any(t.startswith(item + ",") for t in lines[split]), (account, item)
    assert not set(lines["validation"]) & set(lines["test"])


def test_every_frame_and_value_is_seen_in_training():
    for frames, values in expenses.ITEMS.values():
        for f in range(len(frames)):
            assert any(not expenses.is_heldout_item(f, v) for v in range(len(values)))
        for v in range(len(values)):
            assert any(not expenses.is_heldout_item(f, v) for f in range(len(frames)))


def test_held_out_cue_phrasings_only_in_eval():
    data = {s: [r["messages"][1]["content"] for r in read(COMMITTED / f"{s}.jsonl")] for s in SPLITS}
    for pool in (expenses.COMPLIANCE_CUES, expenses.POLICY_FLAGS):
        for p in pool[1]:
            assert not any(p in t for t in data["train"]), p
        assert any(p in t for p in pool[1] for s in ("validation", "test") for t in data[s]), pool[1]


def test_label_distribution_is_mixed():
    for split in SPLITS:
        d = expenses.distribution(read(COMMITTED / f"{split}.jsonl"))
        assert set(d["category"]) == set(expenses.ACCOUNTS) and set(d["approval"]) == set(expenses.APPROVALS)
        assert max(d["pair"].values()) < 0.35, split
        assert max(d["category"].values()) < 0.3 and max(d["approval"].values()) < 0.4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_follow_the_house_rules(seed):
    """Re-derive each label from the cue phrases the docstring names."""
    compliance = [p for pool in expenses.COMPLIANCE_CUES for p in pool]
    flags = [p for pool in expenses.POLICY_FLAGS for p in pool]
    assert all("out of policy" in p or "no receipt" in p for p in flags)
    for split, records in expenses.generate(seed, {"train": 300, "validation": 100, "test": 100}).items():
        for r in records:
            text = r["messages"][1]["content"]
            account, approval = expenses.label_of(r)
            frames, values = expenses.ITEMS[account]
            assert any(text.lower().startswith(fr.format(x=v).lower() + ",") for fr in frames for v in values), (
                split, text)
            amounts = amounts_in(text)
            assert len(amounts) == 1, (split, text)
            # far from both thresholds: small $5-$150, medium $400-$1,500, large $4,000-$40,000
            assert all(5 <= a <= 150 or 400 <= a <= 1_500 or 4_000 <= a <= 40_000 for a in amounts), (split, text)
            cfo = any(p in text for p in compliance)
            director = any(a >= expenses.DIRECTOR_THRESHOLD for a in amounts)
            manager = (any(expenses.MANAGER_THRESHOLD <= a < expenses.DIRECTOR_THRESHOLD for a in amounts)
                       or "out of policy" in text or "no receipt" in text)
            want = "CFO" if cfo else "Director" if director else "Manager" if manager else "Auto"
            assert approval == want, (split, text, approval)
            # One rule's cues per line: the precedence between rules is never what decides a label.
            assert sum([cfo, director, manager]) <= 1, (split, text)


def test_examples_are_short_and_answers_exact():
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    for split in SPLITS:
        recs = load_records(COMMITTED / f"{split}.jsonl", fmt="chat")
        for r in recs[:: 5 if split == "train" else 1]:
            n = len(tok.apply_chat_template(list(r.messages), tokenize=True)["input_ids"])
            assert n < 200, (split, r.line, n)
            assert r.messages[0]["content"] == expenses.SYSTEM_PROMPT
            # 12-14 tokens (the account code is one token per digit): with <|im_end|> within max_new_tokens 16
            assert len(tok(r.answer, add_special_tokens=False)["input_ids"]) <= 14
            account, approval = expenses.label_of({"messages": list(r.messages)})
            assert r.answer == expenses.answer_text(account, approval)


def test_builds_as_packed_training_data(tmp_path):
    from nemo_adapt.config.schema import DataConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    # as recipes/smollm2_135m_lora_expenses.yaml trains: 512-token rows, the one-line system prompt
    cfg = DataConfig(train=str(COMMITTED / "validation.jsonl"), seq_length=512, packing=True,
                     system_prompt="Code this Northwind Bank expense.", replace_system_prompt=True,
                     cache_dir=str(tmp_path))
    s = build_datasets(cfg, tok, seed=0).stats["train"]
    assert s["kept"] == 200 and s["truncated"] == s["skipped_total"] == 0
    assert s["packing_efficiency"] > 0.9
    # loss falls on each answer and its <|im_end|>, nothing else
    answers = [r.answer for r in load_records(COMMITTED / "validation.jsonl")]
    assert s["answer_tokens"] == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
