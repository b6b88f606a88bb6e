"""The triage domain dataset: reproducible, held out, learnable-looking labels, short examples."""

import json
from pathlib import Path

import pytest

from nemo_adapt.data import load_records
from nemo_adapt.data.domains import triage

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "datasets" / "triage"
SPLITS = ("train", "validation", "test")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_regeneration_is_byte_identical(tmp_path):
    triage.main(["--out", str(tmp_path)])
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (COMMITTED / f"{split}.jsonl").read_bytes(), split


def test_sizes_and_held_out_tickets():
    data = {s: read(COMMITTED / f"{s}.jsonl") for s in SPLITS}
    assert {s: len(v) for s, v in data.items()} == triage.SPLIT_SIZES
    tickets = {s: [r["messages"][1]["content"] for r in v] for s, v in data.items()}
    train = set(tickets["train"])
    assert len(train) == len(tickets["train"])
    for split in ("validation", "test"):
        assert not train & set(tickets[split]), split
        # no train ticket's issue sentence occurs in an eval ticket: the combinations are held out
        for team, (frames, values) in triage.ISSUES.items():
            for f, frame in enumerate(frames):
                for v, value in enumerate(values):
                    if not triage.is_heldout_issue(f, v):
                        issue = frame.format(x=value)
                        assert not any(issue in t for t in tickets[split]), (team, issue)


def test_every_frame_and_value_is_seen_in_training():
    for frames, values in triage.ISSUES.values():
        for f in range(len(frames)):
            assert any(not triage.is_heldout_issue(f, v) for v in range(len(values)))
        for v in range(len(values)):
            assert any(not triage.is_heldout_issue(f, v) for f in range(len(frames)))


def test_label_distribution_is_mixed():
    for split in SPLITS:
        d = triage.distribution(read(COMMITTED / f"{split}.jsonl"))
        assert set(d["team"]) == set(triage.TEAMS) and set(d["priority"]) == set(triage.PRIORITIES)
        assert max(d["pair"].values()) < 0.35, split
        assert max(d["team"].values()) < 0.3 and max(d["priority"].values()) < 0.4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_follow_the_house_rules(seed):
    """Re-derive each label from the cue phrases the docstring names."""
    risk = [p for pool in triage.RISK_CUES for p in pool]
    wide = [p for pool in triage.WIDESPREAD_CUES for p in pool]
    for split, records in triage.generate(seed, {"train": 300, "validation": 100, "test": 100}).items():
        for r in records:
            text = r["messages"][1]["content"]
            team, priority = triage.label_of(r)
            frames, values = triage.ISSUES[team]
            assert any(fr.format(x=v) in text for fr in frames for v in values), (split, text)
            amounts = [int(tok.strip("$.,").split(".")[0].replace(",", ""))
                       for tok in text.replace("$", " $").split() if tok.startswith("$")]
            if any(p in text for p in risk):
                want = "P1"
            elif any(p in text for p in wide):
                want = "P2"
            elif any(p in text for p in triage.ENTERPRISE_TIER) or any(a >= triage.AMOUNT_THRESHOLD for a in amounts):
                want = "P3"
            else:
                want = "P4"
            assert priority == want, (split, text, priority)
            # One rule's cues per ticket: the precedence between rules is never what decides a label.
            fired = [any(p in text for p in risk), any(p in text for p in wide),
                     any(p in text for p in triage.ENTERPRISE_TIER) or any(a >= triage.AMOUNT_THRESHOLD for a in amounts)]
            assert sum(fired) <= 1, (split, text)


def test_examples_are_short_and_answers_exact():
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    for split in SPLITS:
        recs = load_records(COMMITTED / f"{split}.jsonl", fmt="chat")
        for r in recs[:: 5 if split == "train" else 1]:
            n = len(tok.apply_chat_template(list(r.messages), tokenize=True)["input_ids"])
            assert n < 200, (split, r.line, n)
            assert r.messages[0]["content"] == triage.SYSTEM_PROMPT
            assert len(tok(r.answer, add_special_tokens=False)["input_ids"]) <= 12
            team, priority = triage.label_of({"messages": list(r.messages)})
            assert r.answer == triage.answer_text(team, priority)


def test_builds_as_packed_training_data(tmp_path):
    from nemo_adapt.config.schema import DataConfig
    from nemo_adapt.data import build_datasets
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    cfg = DataConfig(train=str(COMMITTED / "validation.jsonl"), seq_length=1024, packing=True,
                     cache_dir=str(tmp_path))
    s = build_datasets(cfg, tok, seed=0).stats["train"]
    assert s["kept"] == 200 and s["truncated"] == s["skipped_total"] == 0
    assert s["packing_efficiency"] > 0.9
    # loss falls on each answer and its <|im_end|>, nothing else
    answers = [r.answer for r in load_records(COMMITTED / "validation.jsonl")]
    assert s["answer_tokens"] == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
