"""Reading JSONL training data: chat (`messages`) and prompt/completion (`input`/`output`) records.

Every record becomes one normalised chat (a tuple of `{"role", "content"}` dicts) that ends with an
assistant turn; prompt/completion records become `[user, assistant]`. A bad line either raises a
`DataError` that names the file, the 1-based line and what was expected, or (with
`on_bad_record="skip"`) is skipped and counted under one reason, so a 10-GB file with three broken
lines does not have to be fixed by hand before training, but the skips are never silent.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nemo_adapt.errors import NemoAdaptError

FORMATS = ("chat", "prompt_completion")
"""Record forms a file can hold (`auto` picks one per file from its first valid record)."""
ROLES = ("system", "user", "assistant")

# Skip reasons, as reported in the stats: one counter per reason.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
WRONG_ROLE = "wrong_role"
EMPTY_ANSWER = "empty_answer"
WRONG_FORMAT = "wrong_format"

_CHAT_EXPECTED = ('a chat record {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} '
                  "with an optional system message first, then user/assistant turns alternating, "
                  "ending with a non-empty assistant answer")
_PC_EXPECTED = 'a prompt/completion record {"input": str, "output": non-empty str}'


class DataError(NemoAdaptError, ValueError):
    """A data file is missing, empty or holds a record that is not valid training data."""


class _BadRecord(Exception):
    """One invalid record: `reason` is the skip counter, `message` what was wrong and expected."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Record:
    """One example as a chat that ends with the assistant's answer.

    Attributes:
        messages: the whole chat, `{"role", "content"}` dicts; a system message only comes first.
        path: the file it came from.
        line: its 1-based line number in that file.
    """

    messages: tuple[dict[str, str], ...]
    path: str
    line: int

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The chat without its final assistant turn: what a model is asked at evaluation."""
        return [dict(m) for m in self.messages[:-1]]

    @property
    def answer(self) -> str:
        """The reference answer: the content of the final assistant turn."""
        return self.messages[-1]["content"]

    def with_system_prompt(self, system_prompt: str | None, replace: bool = False) -> Record:
        """This record with `system_prompt` as its system message when it has none (or always, with `replace`).

        Args:
            system_prompt: the default system message; None leaves the record unchanged.
            replace: put `system_prompt` in place of the record's own system message too.

        Returns:
            The record, or a copy with the system message prepended or replaced.
        """
        has_system = self.messages[0]["role"] == "system"
        if system_prompt is None or (has_system and not replace):
            return self
        system = {"role": "system", "content": system_prompt}
        rest = self.messages[1:] if has_system else self.messages
        return Record(messages=(system, *rest), path=self.path, line=self.line)


@dataclass
class RecordFile:
    """The valid records of one file, the form they were read as, and what was skipped.

    Attributes:
        path: the file.
        format: `chat` or `prompt_completion`.
        records: the valid records, in file order.
        skipped: skip reason -> number of records skipped for it (only with `on_bad_record="skip"`).
    """

    path: str
    format: str
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)


def detect_format(obj: object) -> str | None:
    """The form of one parsed record: `chat`, `prompt_completion`, or None when it is neither.

    Args:
        obj: a parsed JSON value.

    Returns:
        The format name, or None.
    """
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "input" in obj or "output" in obj:
        return "prompt_completion"
    return None


def _parse_chat(obj: dict) -> tuple[dict[str, str], ...]:
    msgs = obj.get("messages")
    if msgs is None:
        raise _BadRecord(MISSING_FIELD, f'missing field "messages"; expected {_CHAT_EXPECTED}')
    if not isinstance(msgs, list) or not msgs:
        raise _BadRecord(WRONG_TYPE, f'"messages" is {_describe(msgs)}, not a non-empty list; '
                                     f"expected {_CHAT_EXPECTED}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _BadRecord(WRONG_TYPE, f"{where} is {_describe(m)}; expected an object with "
                                         f'"role" and "content"')
        for key in ("role", "content"):
            if key not in m:
                raise _BadRecord(MISSING_FIELD, f'{where} has no "{key}"; expected an object with '
                                                f'"role" and "content"')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise _BadRecord(WRONG_ROLE, f"{where} has role {role!r}; expected one of "
                                         f"{', '.join(map(repr, ROLES))}")
        if not isinstance(content, str):
            raise _BadRecord(WRONG_TYPE, f'{where} "content" is {_describe(content)}; expected a string')
        out.append({"role": role, "content": content})
    # Order: [system] user assistant user assistant ... — what chat templates are written for.
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise _BadRecord(MISSING_FIELD, f"the chat has only a system message; expected {_CHAT_EXPECTED}")
    offset = len(out) - len(turns)
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _BadRecord(WRONG_ROLE, f"messages[{j + offset}] has role {m['role']!r} where "
                                         f"{want!r} was expected; expected {_CHAT_EXPECTED}")
    if turns[-1]["role"] != "assistant":
        raise _BadRecord(MISSING_FIELD, f"the chat ends with a {turns[-1]['role']!r} message and has no "
                                        f"answer; expected it to end with an assistant message")
    for j, m in enumerate(turns):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _BadRecord(EMPTY_ANSWER, f"messages[{j + offset}] is an empty assistant answer; "
                                           f"expected non-empty text to train on")
    return tuple(out)


def _parse_prompt_completion(obj: dict) -> tuple[dict[str, str], ...]:
    for key in ("input", "output"):
        if key not in obj:
            raise _BadRecord(MISSING_FIELD, f'missing field "{key}"; expected {_PC_EXPECTED}')
        if not isinstance(obj[key], str):
            raise _BadRecord(WRONG_TYPE, f'"{key}" is {_describe(obj[key])}; expected {_PC_EXPECTED}')
    if not obj["output"].strip():
        raise _BadRecord(EMPTY_ANSWER, f'"output" is empty; expected {_PC_EXPECTED}')
    return ({"role": "user", "content": obj["input"]}, {"role": "assistant", "content": obj["output"]})


def _describe(value: object) -> str:
    """A short description of a JSON value for error messages (type and a clipped repr)."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def read_records(path: str | os.PathLike, fmt: str = "auto", on_bad_record: str = "error") -> RecordFile:
    """Read and validate one JSONL file.

    Blank lines are ignored (a trailing newline is not a record). With `fmt="auto"` the first valid
    record decides the form for the whole file; records of the other form are then bad records.

    Args:
        path: the JSONL file.
        fmt: `auto`, `chat` or `prompt_completion`.
        on_bad_record: `error` (raise at the first bad record) or `skip` (count it and go on).

    Returns:
        The valid records, the form they were read as, and the skip counts per reason.

    Raises:
        DataError: the file is missing, unreadable, empty or has no valid record; or (with
            `on_bad_record="error"`) a record is bad — the message names file and line.
    """
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"data format {fmt!r} is not allowed; choose one of: 'auto', 'chat', 'prompt_completion'")
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record={on_bad_record!r} is not allowed; choose one of: 'error', 'skip'")
    name = str(path)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {name!r} does not exist (expected a JSONL file)")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {name!r}: {err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # Name the line of the first undecodable byte: the file is otherwise unreadable as a whole.
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 ({err.reason}); expected UTF-8 JSONL") from err

    records: list[Record] = []
    skipped: Counter[str] = Counter()
    form = None if fmt == "auto" else fmt
    saw_content = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        saw_content = True
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _BadRecord(MALFORMED_JSON, f"invalid JSON ({err.msg} at column {err.colno}); "
                                                 f"expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise _BadRecord(NOT_AN_OBJECT, f"the line holds {_describe(obj)}; expected a JSON object: "
                                                f"{_CHAT_EXPECTED}, or {_PC_EXPECTED}")
            kind = detect_format(obj)
            if kind is None:
                want = {"chat": _CHAT_EXPECTED, "prompt_completion": _PC_EXPECTED}.get(
                    form, f"{_CHAT_EXPECTED}, or {_PC_EXPECTED}")
                raise _BadRecord(MISSING_FIELD, f'no "messages", "input" or "output" field; expected {want}')
            if form is not None and kind != form:
                why = "format" if fmt != "auto" else "first valid record's format"
                raise _BadRecord(WRONG_FORMAT, f"a {kind} record in a {form} file (set by the {why}); "
                                               f"expected {_CHAT_EXPECTED if form == 'chat' else _PC_EXPECTED}")
            messages = _parse_chat(obj) if kind == "chat" else _parse_prompt_completion(obj)
        except _BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(f"{name}:{lineno}: {bad.message}") from None
            skipped[bad.reason] += 1
            continue
        form = kind  # the first valid record fixes the form under `auto`
        records.append(Record(messages=messages, path=name, line=lineno))

    if not saw_content:
        raise DataError(f"data file {name!r} is empty; expected one JSON record per line")
    if not records:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        raise DataError(f"data file {name!r} has no valid records (skipped {detail})")
    return RecordFile(path=name, format=form or "chat", records=records, skipped=dict(sorted(skipped.items())))


def load_records(path: str | os.PathLike, fmt: str = "auto", on_bad_record: str = "error",
                 system_prompt: str | None = None, replace_system_prompt: bool = False) -> list[Record]:
    """The valid records of a JSONL file, e.g. test examples for the evaluator.

    Each record's `.prompt` is the chat without the final assistant turn and `.answer` is the
    reference answer string.

    Args:
        path: the JSONL file.
        fmt: `auto`, `chat` or `prompt_completion`.
        on_bad_record: `error` or `skip` (see `read_records`).
        system_prompt: system message for records that have none (None: leave them as they are).
        replace_system_prompt: use `system_prompt` in place of the records' own system messages too.

    Returns:
        The records in file order.

    Raises:
        DataError: as `read_records`.
    """
    rf = read_records(path, fmt, on_bad_record)
    return [r.with_system_prompt(system_prompt, replace_system_prompt) for r in rf.records]
