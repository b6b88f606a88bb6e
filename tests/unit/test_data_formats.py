"""Reading JSONL data: both forms, `auto`, and bad records named by file and line or skipped and counted."""

import json
import re
from pathlib import Path

import pytest

from nemo_adapt.data import DataError, load_records, read_records
from nemo_adapt.errors import NemoAdaptError

GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
GOOD_PC = {"input": "2+2?", "output": "4"}


def write_lines(path: Path, lines: list) -> Path:
    """Write records (dicts are JSON-encoded, strings written as they are) one per line."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


BAD_CASES = [
    # (bad line, reason counter, words the message must contain)
    ('{"messages": [', "malformed_json", ["invalid JSON", "one JSON object per line"]),
    ("[1, 2]", "not_an_object", ["expected a JSON object"]),
    ({"text": "hello"}, "missing_field", ['"messages"', '"input"']),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
     "wrong_role", ["'bot'", "'assistant'"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "empty_answer", ["empty assistant answer"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
     "missing_field", ['no "content"']),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "missing_field", ["ends with a 'user'"]),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Hi"}]},
     "wrong_role", ["'user' was expected"]),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]},
     "wrong_role", ["'assistant' was expected"]),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "wrong_type", ["expected a string"]),
]


@pytest.mark.parametrize("bad,reason,words", BAD_CASES, ids=[c[1] + str(i) for i, c in enumerate(BAD_CASES)])
def test_bad_chat_record_names_file_and_line(tmp_path, bad, reason, words):
    path = write_lines(tmp_path / "train.jsonl", [GOOD_CHAT, "", bad, GOOD_CHAT])
    with pytest.raises(DataError) as info:
        read_records(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg  # the blank line 2 still counts as a line
    for w in words:
        assert w in msg, msg
    assert isinstance(info.value, NemoAdaptError)

    # skip: the same record is skipped and counted under its reason, the good ones are kept
    rf = read_records(path, on_bad_record="skip")
    assert [r.line for r in rf.records] == [1, 4]
    assert rf.skipped == {reason: 1}


@pytest.mark.parametrize("bad,words", [
    ({"input": "q"}, ['missing field "output"']),
    ({"input": "q", "output": ""}, ['"output" is empty']),
    ({"input": 5, "output": "a"}, ['"input" is int']),
])
def test_bad_prompt_completion_record_names_file_and_line(tmp_path, bad, words):
    path = write_lines(tmp_path / "pc.jsonl", [GOOD_PC, bad])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: ") as info:
        read_records(path, fmt="prompt_completion")
    for w in words:
        assert w in str(info.value)


def test_auto_format_is_decided_by_first_valid_record(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", ["not json", GOOD_PC, GOOD_CHAT, GOOD_PC])
    rf = read_records(path, on_bad_record="skip")
    assert rf.format == "prompt_completion"
    assert rf.skipped == {"malformed_json": 1, "wrong_format": 1}
    assert [r.line for r in rf.records] == [2, 4]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: invalid JSON"):
        read_records(path)
    other = write_lines(tmp_path / "m2.jsonl", [GOOD_PC, GOOD_PC, GOOD_CHAT])
    with pytest.raises(DataError, match=rf"^{re.escape(str(other))}:3: a chat record in a prompt_completion file"):
        read_records(other)


def test_explicit_format_rejects_the_other_form(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD_PC])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: a prompt_completion record in a chat file"):
        read_records(path, fmt="chat")


def test_empty_and_all_bad_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        read_records(empty)
    bad = write_lines(tmp_path / "bad.jsonl", ["{", {"x": 1}])
    with pytest.raises(DataError, match=r"has no valid records \(skipped malformed_json: 1, missing_field: 1\)"):
        read_records(bad, on_bad_record="skip")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n" + b'{"input": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        read_records(path)


def test_load_records_prompt_answer_and_system_prompt(tmp_path):
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                         {"role": "assistant", "content": "d"}]}
    path = write_lines(tmp_path / "t.jsonl", [chat, GOOD_PC])
    recs = load_records(path, on_bad_record="skip", system_prompt="DEFAULT")
    assert recs[0].answer == "d"
    assert [m["content"] for m in recs[0].prompt] == ["S", "a", "b", "c"]  # own system prompt kept
    pc = load_records(write_lines(tmp_path / "pc.jsonl", [GOOD_PC]), system_prompt="DEFAULT")[0]
    assert pc.prompt == [{"role": "system", "content": "DEFAULT"}, {"role": "user", "content": "2+2?"}]
    assert pc.answer == "4"
    # replace_system_prompt: the short prompt stands in for the record's own instructions.
    replaced = load_records(path, on_bad_record="skip", system_prompt="SHORT", replace_system_prompt=True)
    assert [m["content"] for m in replaced[0].prompt] == ["SHORT", "a", "b", "c"] and replaced[0].answer == "d"


# ------------------------------------------------------------------ line ends, BOM, skip reporting

def chat_with(text: str, answer: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}


def test_unicode_line_separators_inside_strings_keep_the_record(tmp_path):
    # Record 97 holds a raw U+2028 and record 98 a raw U+0085 / U+2029 (valid in JSON strings):
    # str.splitlines() split both, so with `error` line 97 was "malformed" and with `skip` two
    # records were dropped. JSONL lines end at "\n" only.
    records = [chat_with(f"q{i}") for i in range(100)]
    records[96] = chat_with("first\u2028second")
    records[97] = chat_with("a\x85b", answer="c\u2029d")
    path = tmp_path / "train_ls.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    for mode in ("error", "skip"):
        rf = read_records(path, on_bad_record=mode)
        assert len(rf.records) == 100 and rf.skipped == {} and rf.skipped_lines == {}
        assert [r.line for r in rf.records] == list(range(1, 101))
        assert rf.records[96].messages[0]["content"] == "first\u2028second"
        assert rf.records[97].messages[0]["content"] == "a\x85b"
        assert rf.records[97].answer == "c\u2029d"
        assert rf.records[98].messages[0]["content"] == "q98"


def test_crlf_endings_and_a_bom_on_line_one_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    body = (json.dumps(GOOD_CHAT) + "\r\n" + json.dumps(chat_with("two")) + "\r\n\r\n"
            + json.dumps(chat_with("three", answer="end")))  # no final newline
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rf = read_records(path)
    assert rf.bom is True
    assert [r.line for r in rf.records] == [1, 2, 4]
    assert [r.answer for r in rf.records] == ["Hello", "ok", "end"]  # no "\r" left on any value
    assert read_records(write_lines(tmp_path / "plain.jsonl", [GOOD_CHAT])).bom is False
    # A BOM anywhere else is not a line start of the file: that line is malformed, named by line.
    later = tmp_path / "later.jsonl"
    later.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode() + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(later))}:2: invalid JSON"):
        read_records(later)


def test_skipped_lines_are_kept_per_reason_and_named_in_the_warning(tmp_path):
    lines = [GOOD_CHAT]
    for _ in range(7):
        lines += ["{broken", {"text": "no fields"}]
    path = write_lines(tmp_path / "noisy.jsonl", lines)
    rf = read_records(path, on_bad_record="skip")
    assert rf.skipped == {"malformed_json": 7, "missing_field": 7}
    # line 1 is good; the malformed ones are lines 2, 4, 6, ...; only the first five are kept
    assert rf.skipped_lines == {"malformed_json": [2, 4, 6, 8, 10], "missing_field": [3, 5, 7, 9, 11]}
    assert rf.skip_warning("data.train") == (
        f"warning: data.train={str(path)!r}: skipped 14 records (data.on_bad_record=skip): "
        "malformed_json 7 (lines 2, 4, 6, 8, 10, ...), missing_field 7 (lines 3, 5, 7, 9, 11, ...)")
    one = read_records(write_lines(tmp_path / "one.jsonl", [GOOD_CHAT, "{"]), on_bad_record="skip")
    assert one.skip_warning() == f"warning: {str(tmp_path / 'one.jsonl')!r}: skipped 1 record " \
                                 "(data.on_bad_record=skip): malformed_json 1 (line 2)"
    assert read_records(write_lines(tmp_path / "ok.jsonl", [GOOD_CHAT])).skip_warning() is None


def test_load_records_says_what_it_skipped(tmp_path, capsys, monkeypatch):
    path = write_lines(tmp_path / "test.jsonl", [GOOD_PC, "{", GOOD_PC])
    monkeypatch.delenv("RANK", raising=False)
    recs = load_records(path, on_bad_record="skip", key="data.test")
    assert [r.line for r in recs] == [1, 3]
    assert capsys.readouterr().err == (f"warning: data.test={str(path)!r}: skipped 1 record "
                                       "(data.on_bad_record=skip): malformed_json 1 (line 2)\n")
    load_records(path, on_bad_record="skip", warn=False)
    monkeypatch.setenv("RANK", "1")  # one warning per run, from rank 0
    load_records(path, on_bad_record="skip")
    assert capsys.readouterr().err == ""


def test_json_errors_read_once_at_column(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [GOOD_CHAT, '{"input": "unterminated'])
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value) == (f"{path}:2: invalid JSON (Unterminated string starting at column 11); "
                               "expected one JSON object per line")
    path = write_lines(tmp_path / "ctl.jsonl", ['{"input": "a\tb", "output": "x"}'])
    with pytest.raises(DataError, match=r":1: invalid JSON \(Invalid control character at column 13\)"):
        read_records(path)
    path = write_lines(tmp_path / "v.jsonl", ['{"input": }'])
    with pytest.raises(DataError, match=r":1: invalid JSON \(Expecting value at column 11\)"):
        read_records(path)


def test_a_directory_is_called_a_directory(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError) as info:
        read_records(tmp_path / "train.jsonl")
    assert str(info.value) == f"data file {str(tmp_path / 'train.jsonl')!r} is a directory; expected a JSONL file"
    with pytest.raises(DataError, match="does not exist; expected a JSONL file"):
        read_records(tmp_path / "missing.jsonl")


def test_iter_lines_splits_at_newline_only_and_bounds_each_line():
    import io

    from nemo_adapt.data.formats import Line, iter_lines

    raw = "a\u2028b\r\nc\x0cd\re\n\nlong-line\r\ntail".encode()
    assert [(x.number, x.data) for x in iter_lines(io.BytesIO(raw))] == [
        (1, "a\u2028b".encode()), (2, b"c\x0cd\re"), (3, b""), (4, b"long-line"), (5, b"tail")]
    # With a limit, a longer line is passed over (data None) but its size is still counted exactly.
    assert list(iter_lines(io.BytesIO(raw), max_bytes=5)) == [
        Line(1, "a\u2028b".encode(), 5), Line(2, b"c\x0cd\re", 5), Line(3, b"", 0), Line(4, None, 9), Line(5, b"tail", 4)]
    big = b"x" * (3 << 20) + b"\r\nok\n"
    assert list(iter_lines(io.BytesIO(big), max_bytes=1000)) == [Line(1, None, 3 << 20), Line(2, b"ok", 2)]


def test_other_jsonl_readers_split_at_newline_only(tmp_path, monkeypatch, capsys):
    # metrics.jsonl: a "\r" between JSON tokens is whitespace, not a line end.
    from nemo_adapt.logging.run_logger import read_metrics, truncate_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1,\r"loss": 2.5}\n{"step": 2, "loss": 2.0}\r\n{"step": 3, "loss": 1.5}\n')
    assert read_metrics(metrics) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    assert truncate_metrics(metrics, 2) == 1
    assert read_metrics(metrics) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]

    # The triage generator's CLI reads back what it wrote (ensure_ascii=False) at "\n" only: a U+2028
    # in a ticket made it count 3 records for 2 and fail on half a record.
    from nemo_adapt.data.domains import triage

    real_generate = triage.generate

    def generate_with_separator(seed, sizes):
        splits = real_generate(seed, sizes)
        for records in splits.values():
            records[0]["messages"][1]["content"] += "\u2028(continued)"
        return splits

    monkeypatch.setattr(triage, "generate", generate_with_separator)
    triage.main(["--out", str(tmp_path / "triage"), "--train", "2", "--validation", "2", "--test", "2"])
    out = capsys.readouterr().out
    assert out.count(": 2 examples;") == 3, out
