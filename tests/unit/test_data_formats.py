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
