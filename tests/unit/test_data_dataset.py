"""build_datasets end to end: rows, packing, labels, over-length counts, fingerprints, cache, order."""

import copy
import json
from pathlib import Path

import pytest
import torch

from nemo_adapt.config.schema import DataConfig
from nemo_adapt.data import (
    DataError,
    attention_mask_from_segments,
    build_datasets,
    format_stats,
    tokenize_chat,
)


@pytest.fixture(scope="module")
def tok():
    from nemo_adapt.models.embedded import embedded_gguf_path
    from nemo_adapt.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf_path())


def chat(i: int, turns: int = 1) -> dict:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"})
        msgs.append({"role": "assistant", "content": f"It is {i + t}." + " Indeed." * (i % 3)})
    return {"messages": msgs}


def write(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    train = write(tmp_path / "train.jsonl", [chat(i, turns=1 + i % 3) for i in range(12)])
    val = write(tmp_path / "val.jsonl", [chat(100 + i) for i in range(3)])
    return train, val


def cfg(tmp_path, train, **kw) -> DataConfig:
    kw.setdefault("seq_length", 256)
    return DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **kw)


def answers_of(records: list) -> list[str]:
    return [m["content"] + "<|im_end|>" for r in records for m in r["messages"] if m["role"] == "assistant"]


def trained_text(tok, row) -> list[str]:
    """Decoded runs of labels where the loss mask is on."""
    runs, cur = [], []
    for lab, m in zip(row["labels"].tolist(), row["loss_mask"].tolist()):
        if m:
            cur.append(lab)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_unpacked_rows_train_on_exactly_the_answers(tmp_path, files, tok):
    train, val = files
    ds = build_datasets(cfg(tmp_path, train, validation=val, packing=False), tok, seed=1)
    records = [json.loads(line) for line in Path(train).read_text().splitlines()]
    assert len(ds.train) == 12 and len(ds.validation) == 3
    for i in range(len(ds.train)):
        row = ds.train[i]
        assert set(row) == {"tokens", "labels", "loss_mask", "position_ids", "segment_ids"}
        assert all(v.shape == (256,) for v in row.values())
        # rows are in file order without packing; every assistant turn is trained, nothing else
        assert trained_text(tok, row) == answers_of([records[i]])
        n = int((row["segment_ids"] == 1).sum())
        assert row["tokens"][:n].tolist() == tokenize_chat(tok, records[i]["messages"]).input_ids
        assert (row["tokens"][n:] == 2).all() and (row["loss_mask"][n:] == 0).all()
        assert row["labels"][: n - 1].tolist() == row["tokens"][1:n].tolist()  # next-token labels
    s = ds.stats["train"]
    assert s["examples"] == s["kept"] == s["rows"] == 12
    assert s["tokens"] == sum(int((ds.train[i]["segment_ids"] > 0).sum()) for i in range(12))
    assert s["answer_tokens"] == sum(int(ds.train[i]["loss_mask"].sum()) for i in range(12))
    assert s["packing_efficiency"] == pytest.approx(s["tokens"] / (12 * 256), abs=1e-6)
    assert "12 examples -> 12 kept" in format_stats("train", s)


def test_packing_keeps_examples_intact_and_restarts_positions(tmp_path, files, tok):
    train, _ = files
    plain = build_datasets(cfg(tmp_path, train), tok, seed=1).train
    ds = build_datasets(cfg(tmp_path, train, packing=True), tok, seed=1)
    packed = ds.train
    assert len(packed) < len(plain)
    assert ds.stats["train"]["packing_efficiency"] > plain.stats["packing_efficiency"]
    seen = []
    for i in range(len(packed)):
        row = packed[i]
        seg = row["segment_ids"]
        for k, j in enumerate(packed.row_examples(i), start=1):
            where = (seg == k).nonzero().flatten()
            a, b = int(where[0]), int(where[-1]) + 1
            assert b - a == len(where)  # contiguous
            ids, _ = plain.example(j)
            assert row["tokens"][a:b].tolist() == ids.tolist()  # intact, same tokens as unpacked
            assert row["position_ids"][a:b].tolist() == list(range(b - a))  # restart at 0
            assert row["labels"][b - 1] == 2 and row["loss_mask"][b - 1] == 0  # no cross-example label
            # the same answers are trained as in the unpacked row
            sub = {key: v[a:b] for key, v in row.items()}
            assert trained_text(tok, sub) == trained_text(tok, plain[j])
            seen.append(j)
        # the mask from this row's segments never lets one example see another
        mask = attention_mask_from_segments(seg[None])[0, 0]
        cross = seg[:, None] != seg[None, :]
        assert mask[cross].all()
    assert sorted(seen) == list(range(12))
    assert sum(int(packed[i]["loss_mask"].sum()) for i in range(len(packed))) == ds.stats["train"]["answer_tokens"]


def packed_batch(tmp_path, train, tok) -> dict:
    ds = build_datasets(cfg(tmp_path, train, packing=True, seq_length=128), tok, seed=1).train
    return ds.collate([ds[0], ds[1]])


def test_collate(tmp_path, files, tok):
    batch = packed_batch(tmp_path, files[0], tok)
    assert batch["tokens"].shape == (2, 128) and batch["loss_mask"].dtype == torch.float32
    assert attention_mask_from_segments(batch["segment_ids"]).shape == (2, 1, 128, 128)


@pytest.mark.megatron
def test_packed_seq_params(tmp_path, files, tok):
    pytest.importorskip("megatron.core")  # importing it takes ~15 s on a small CPU
    from nemo_adapt.data import packed_seq_params

    p = packed_seq_params(packed_batch(tmp_path, files[0], tok)["segment_ids"])
    assert p.qkv_format == "thd" and int(p.cu_seqlens_q[-1]) == 256 and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv <= 128


def long_chat(n_words: int, answer: str = "Short answer.") -> dict:
    return {"messages": [{"role": "user", "content": "word " * n_words}, {"role": "assistant", "content": answer}]}


def test_over_length_truncate_and_drop_are_counted(tmp_path, tok):
    recs = [chat(1), long_chat(20, "answer " * 200), long_chat(300), chat(2)]
    train = write(tmp_path / "long.jsonl", recs)
    ds = build_datasets(cfg(tmp_path, train, seq_length=96, over_length="truncate"), tok, seed=0)
    s = ds.stats["train"]
    # #1: long answer, truncated but keeps answer tokens; #2: prompt alone fills the row -> no answer left
    assert (s["kept"], s["truncated"], s["dropped_no_answer"], s["dropped_over_length"]) == (3, 1, 1, 0)
    truncated_row = ds.train[1]
    assert (truncated_row["segment_ids"] == 1).all() and truncated_row["loss_mask"].sum() > 0
    ds = build_datasets(cfg(tmp_path, train, seq_length=96, over_length="drop"), tok, seed=0)
    s = ds.stats["train"]
    assert (s["kept"], s["truncated"], s["dropped_no_answer"], s["dropped_over_length"]) == (2, 0, 0, 2)
    assert s["example_tokens_max"] > 96
    only_long = write(tmp_path / "only_long.jsonl", [long_chat(300)])
    with pytest.raises(DataError, match="no examples of .* fit in data.seq_length=96"):
        build_datasets(cfg(tmp_path, only_long, seq_length=96, over_length="drop"), tok, seed=0)


def test_bad_records_skipped_and_reported(tmp_path, tok):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps(chat(1)) + "\n{oops\n" + json.dumps({"input": "a", "output": "b"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: invalid JSON"):
        build_datasets(cfg(tmp_path, str(train)), tok, seed=0)
    ds = build_datasets(cfg(tmp_path, str(train), on_bad_record="skip"), tok, seed=0)
    assert ds.stats["train"]["skipped"] == {"malformed_json": 1, "wrong_format": 1}
    assert ds.stats["train"]["skipped_total"] == 2 and ds.stats["train"]["kept"] == 1


def test_fingerprint_and_cache_reuse(tmp_path, files, tok):
    train, val = files
    cache = tmp_path / "cache"
    first = build_datasets(cfg(tmp_path, train, validation=val), tok, seed=1)
    assert not first.train.cache_hit and first.train.cache_path.parent == cache
    assert set(first.fingerprint) == {"train", "validation", "combined"}
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 2 and not list(cache.glob("*.tmp"))  # no temp files left behind

    again = build_datasets(cfg(tmp_path, train, validation=val, shuffle=False), tok, seed=7)
    assert again.train.cache_hit and again.validation.cache_hit
    assert again.fingerprint == first.fingerprint  # order settings and seed do not change the data
    assert [again.train[i]["tokens"].tolist() for i in range(3)] == [first.train[i]["tokens"].tolist()
                                                                    for i in range(3)]
    assert again.stats["train"] == first.stats["train"]

    changes = {
        "seq_length": cfg(tmp_path, train, seq_length=300),
        "system_prompt": cfg(tmp_path, train, system_prompt="You are terse."),
        "packing": cfg(tmp_path, train, packing=True),
        "replace_system_prompt": cfg(tmp_path, train, system_prompt="You are terse.", replace_system_prompt=True),
    }
    prints = {first.fingerprint["train"]}
    for what, c in changes.items():
        ds = build_datasets(c, tok, seed=1)
        assert not ds.train.cache_hit, what
        prints.add(ds.fingerprint["train"])
    assert len(prints) == 5
    sys_ds = build_datasets(changes["system_prompt"], tok, seed=1)
    assert sys_ds.train.cache_hit and "You are terse." in tok.decode(sys_ds.train[0]["tokens"])

    # same bytes under another name: same fingerprint, cache reused; changed bytes: a new entry
    same_bytes = tmp_path / "copy.jsonl"
    same_bytes.write_bytes(Path(train).read_bytes())
    assert build_datasets(cfg(tmp_path, str(same_bytes)), tok, seed=1).train.cache_hit
    with open(train, "a") as f:
        f.write(json.dumps(chat(99)) + "\n")
    changed = build_datasets(cfg(tmp_path, train), tok, seed=1)
    assert not changed.train.cache_hit and changed.fingerprint["train"] not in prints
    assert len(list(cache.glob("*.safetensors"))) == 7  # 1 train + 1 validation + 4 settings + 1 changed file

    # another chat template (or vocabulary) is another tokenizer: a new entry
    other_tok = copy.copy(tok)
    other_tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert not build_datasets(cfg(tmp_path, train), other_tok, seed=1).train.cache_hit
    assert tok.chat_template != other_tok.chat_template

    # a corrupt entry is rebuilt, not trusted
    changed.train.cache_path.write_bytes(b"garbage")
    rebuilt = build_datasets(cfg(tmp_path, train), tok, seed=1)
    assert not rebuilt.train.cache_hit and len(rebuilt.train) == 13


def test_cache_is_safetensors_not_pickle(tmp_path, files, tok):
    from safetensors import safe_open

    train, _ = files
    ds = build_datasets(cfg(tmp_path, train), tok, seed=1)
    with safe_open(str(ds.train.cache_path), framework="numpy") as f:
        meta = json.loads(f.metadata()["meta"])
        assert meta["fingerprint"] == ds.fingerprint["train"]
        assert set(f.keys()) == {"tokens", "answer_mask", "example_offsets", "row_offsets", "row_examples"}
    json.dumps(ds.record())  # what the trainer saves with a run is plain JSON


def test_epoch_order_is_deterministic(tmp_path, files, tok):
    train, val = files
    a = build_datasets(cfg(tmp_path, train, validation=val), tok, seed=3)
    b = build_datasets(cfg(tmp_path, train, validation=val), tok, seed=3)
    o0 = a.train.epoch_order(0)
    assert sorted(o0) == list(range(len(a.train)))
    assert o0 == b.train.epoch_order(0) == a.train.epoch_order(0, seed=3)
    assert o0 != a.train.epoch_order(1) and o0 != a.train.epoch_order(0, seed=4)
    assert o0 != list(range(len(a.train)))
    # pinned: the order must not change between Python/numpy/torch versions or runs
    assert a.train.epoch_order(0, seed=1234) == [5, 10, 2, 3, 9, 8, 4, 0, 1, 6, 7, 11]
    assert a.validation.epoch_order(5) == [0, 1, 2]  # validation is never shuffled
    c = build_datasets(cfg(tmp_path, train, shuffle=False), tok, seed=3)
    assert c.train.epoch_order(2) == list(range(len(c.train)))


def test_missing_and_unset_files(tmp_path, tok):
    with pytest.raises(DataError, match="data.train is not set"):
        build_datasets(DataConfig(cache_dir=str(tmp_path)), tok, seed=0)
    with pytest.raises(DataError, match=r"data.validation='.*nope.jsonl' does not exist"):
        build_datasets(cfg(tmp_path, write(tmp_path / "t.jsonl", [chat(1)]), validation=str(tmp_path / "nope.jsonl")),
                       tok, seed=0)


def test_skips_reach_the_console_and_the_run_summary(tmp_path, tok, capsys):
    from nemo_adapt.data.dataset import data_summary, print_data_report

    train = tmp_path / "t.jsonl"
    lines = [json.dumps(chat(1)), "{oops", json.dumps(chat(2)), "[1]", "{again", json.dumps(chat(3))]
    train.write_text("\n".join(lines) + "\n")
    ds = build_datasets(cfg(tmp_path, str(train), validation=write(tmp_path / "v.jsonl", [chat(9)]),
                           on_bad_record="skip"), tok, seed=0)
    s = ds.stats["train"]
    assert s["skipped"] == {"malformed_json": 2, "not_an_object": 1} and s["skipped_total"] == 3
    assert s["skipped_lines"] == {"malformed_json": [2, 5], "not_an_object": [4]}
    assert s["kept"] == 3 and s["bom"] is False
    print_data_report(ds)
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("train: 3 examples -> 3 kept (0 truncated, 0 dropped, 3 skipped: "
                                          "malformed_json 2, not_an_object 1) in 3 rows")
    assert out.splitlines()[1].startswith("validation: 1 examples -> 1 kept")
    assert err == (f"warning: data.train={str(train)!r}: skipped 3 records (data.on_bad_record=skip): "
                   "malformed_json 2 (lines 2, 5), not_an_object 1 (line 4)\n")
    assert data_summary(ds) == {"data/train/skipped": 3, "data/train/skipped/malformed_json": 2,
                                "data/train/skipped/not_an_object": 1, "data/validation/skipped": 0}
    # A cache hit reports the same (the stats travel with the cache entry).
    again = build_datasets(cfg(tmp_path, str(train), on_bad_record="skip"), tok, seed=0)
    assert again.train.cache_hit and again.stats["train"]["skipped_lines"] == s["skipped_lines"]


def test_a_bom_is_accepted_recorded_and_said(tmp_path, tok):
    train = tmp_path / "bom.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(chat(i)) + "\r\n" for i in range(3)).encode())
    ds = build_datasets(cfg(tmp_path, str(train)), tok, seed=0)
    assert ds.stats["train"]["bom"] is True and ds.stats["train"]["kept"] == 3
    assert format_stats("train", ds.stats["train"]).endswith("; UTF-8 byte-order mark at the start ignored")
    plain = build_datasets(cfg(tmp_path, write(tmp_path / "plain.jsonl", [chat(i) for i in range(3)])), tok, seed=0)
    # the same records with and without BOM / CRLF become the same rows
    assert [plain.train[i]["tokens"].tolist() for i in range(3)] == [ds.train[i]["tokens"].tolist() for i in range(3)]
    assert "byte-order mark" not in format_stats("train", plain.stats["train"])


def test_a_directory_as_a_split_is_called_a_directory(tmp_path, tok):
    train = write(tmp_path / "t.jsonl", [chat(1)])
    folder = tmp_path / "data_dir"
    folder.mkdir()
    for key in ("train", "validation", "test"):
        kw = {"train": train, key: str(folder)}
        with pytest.raises(DataError) as info:
            build_datasets(cfg(tmp_path, **kw), tok, seed=0)
        assert str(info.value) == f"data.{key}={str(folder)!r} is a directory; expected a JSONL file"


def test_too_large_records_and_the_limit_in_the_fingerprint(tmp_path, tok):
    big = chat(5)
    big["messages"][0]["content"] = "word " * 2000  # a ~10 KB line
    train = write(tmp_path / "t.jsonl", [chat(1), big, chat(2)])
    size = len(json.dumps(big).encode())
    with pytest.raises(DataError) as info:
        build_datasets(cfg(tmp_path, train, max_record_bytes=4096), tok, seed=0)
    assert str(info.value).startswith(f"{train}:2: the record is {size:,} bytes ({size / 1024:.1f} KiB), over the "
                                      "limit data.max_record_bytes=4096 (4.0 KiB); it was not read. Raise the limit "
                                      "(e.g. data.max_record_bytes=1048576)")
    skipped = build_datasets(cfg(tmp_path, train, max_record_bytes=4096, on_bad_record="skip"), tok, seed=0)
    assert skipped.stats["train"]["skipped"] == {"too_large": 1}
    assert skipped.stats["train"]["skipped_lines"] == {"too_large": [2]} and skipped.stats["train"]["kept"] == 2
    # the default (1 MiB) reads it; the limit decides what is kept, so it is part of the fingerprint
    whole = build_datasets(cfg(tmp_path, train, on_bad_record="skip"), tok, seed=0)
    assert whole.stats["train"]["examples"] == 3 and not whole.train.cache_hit
    assert whole.fingerprint["train"] != skipped.fingerprint["train"]
    assert whole.settings["max_record_bytes"] == 1 << 20
