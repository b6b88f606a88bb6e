"""Reading JSONL training data: chat (`messages`) and prompt/completion (`input`/`output`) records.

Every record becomes one normalised chat (a tuple of `{"role", "content"}` dicts) that ends with an
assistant turn; prompt/completion records become `[user, assistant]`. A bad line either raises a
`DataError` that names the file, the 1-based line and what was expected, or (with
`on_bad_record="skip"`) is skipped and counted under one reason, so a 10-GB file with three broken
lines does not have to be fixed by hand before training, but the skips are never silent.

Lines end at `\n` only (one `\r` before it is dropped): JSON strings may hold U+2028, U+0085 and the
other characters `str.splitlines` also breaks at, and those records are valid. A UTF-8 byte-order mark
at the start of the file is accepted and noted. Files are read in binary, one line at a time, and a
line longer than `max_record_bytes` is counted and passed over in bounded chunks without being held
whole, decoded or parsed: one runaway line costs seconds and a few MiB, not minutes and GiBs.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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
TOO_LARGE = "too_large"

DEFAULT_MAX_RECORD_BYTES = 1 << 20
"""Default longest record, in bytes of its JSONL line (1 MiB; see `DataConfig.max_record_bytes`)."""
SKIPPED_LINES_KEPT = 5
"""Line numbers remembered per skip reason, for the warning that names them."""
UTF8_BOM = b"\xef\xbb\xbf"
_DRAIN_CHUNK = 1 << 20  # bytes read at a time while passing over a line that is too large

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
        skipped_lines: skip reason -> 1-based line numbers of its first `SKIPPED_LINES_KEPT` skips.
        bom: the file starts with a UTF-8 byte-order mark (accepted and ignored).
    """

    path: str
    format: str
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)
    bom: bool = False

    def skip_warning(self, key: str | None = None) -> str | None:
        """The warning line for this file's skipped records, or None when none were skipped.

        Args:
            key: the recipe key that named the file (e.g. `data.test`), shown before the path.

        Returns:
            See `skip_warning`.
        """
        return skip_warning(self.path, self.skipped, self.skipped_lines, key)


@dataclass(frozen=True)
class Line:
    """One line of a JSONL file as `iter_lines` yields it.

    Attributes:
        number: 1-based line number (lines end at `\n` only).
        data: the line's bytes without the `\n` and one `\r` before it; None when it is longer
            than the limit (it was passed over, not kept).
        size: the line's length in bytes without that ending, also when it was too long.
    """

    number: int
    data: bytes | None
    size: int


def iter_lines(stream: BinaryIO, max_bytes: int | None = None) -> Iterator[Line]:
    """The lines of a binary stream, split at `\n` only, each read with bounded memory.

    A `\r\n` ending counts as `\n`; any other byte (a lone `\r`, form feed, the UTF-8 bytes of U+2028
    or U+0085) is part of the line, as JSONL requires. With `max_bytes`, at most `max_bytes + 2` bytes
    of a line are ever held: a longer line is read past in 1-MiB chunks, only its size is kept.

    Args:
        stream: a file opened in binary mode.
        max_bytes: longest line to return whole (None: no limit).

    Returns:
        An iterator of `Line`s.
    """
    number = 0
    # Enough for a line of max_bytes plus its "\r\n": one read tells a line that fits from one that does not.
    limit = -1 if max_bytes is None else max_bytes + 2
    while True:
        chunk = stream.readline(limit)
        if not chunk:
            return
        number += 1
        if max_bytes is None or chunk.endswith(b"\n") or len(chunk) < limit:
            data = chunk[:-1] if chunk.endswith(b"\n") else chunk
            if data.endswith(b"\r"):
                data = data[:-1]
            too_long = max_bytes is not None and len(data) > max_bytes
            yield Line(number, None if too_long else data, len(data))
            continue
        # Too long: count the rest of the line without keeping it.
        size, tail = len(chunk), chunk[-2:]
        while not tail.endswith(b"\n"):
            chunk = stream.readline(_DRAIN_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            tail = (tail + chunk)[-2:]
        if tail.endswith(b"\n"):
            size -= 2 if tail == b"\r\n" else 1
        yield Line(number, None, size)


def skip_warning(path: str, skipped: dict[str, int], skipped_lines: dict[str, list[int]] | None = None,
                 key: str | None = None) -> str | None:
    """One warning line naming a file, how many records were skipped for each reason and where.

    Args:
        path: the data file.
        skipped: skip reason -> count.
        skipped_lines: skip reason -> first line numbers (see `RecordFile.skipped_lines`).
        key: the recipe key that named the file (e.g. `data.train`), shown before the path.

    Returns:
        E.g. `warning: data.train='train.jsonl': skipped 3 records (data.on_bad_record=skip):
        malformed_json 2 (lines 97, 98), too_large 1 (line 5)`; None when nothing was skipped.
    """
    total = sum(skipped.values())
    if not total:
        return None
    parts = []
    for reason, count in sorted(skipped.items()):
        lines = (skipped_lines or {}).get(reason) or []
        where = ""
        if lines:
            more = ", ..." if count > len(lines) else ""
            where = f" ({'line' if count == 1 else 'lines'} {', '.join(map(str, lines))}{more})"
        parts.append(f"{reason} {count}{where}")
    what = f"{key}={path!r}" if key else repr(path)
    plural = "record" if total == 1 else "records"
    return f"warning: {what}: skipped {total} {plural} (data.on_bad_record=skip): {', '.join(parts)}"


def data_path_problem(path: str | os.PathLike) -> str | None:
    """What keeps `path` from being read as a data file, or None when it is a readable file.

    Args:
        path: the data file's path.

    Returns:
        E.g. `is a directory; expected a JSONL file`, to follow the path in a message; or None.
    """
    p = Path(path)
    if p.is_dir():
        return "is a directory; expected a JSONL file"
    if not p.exists():
        return "does not exist; expected a JSONL file"
    if not p.is_file():
        return "is not a regular file (a device, socket or pipe); expected a JSONL file"
    if not os.access(p, os.R_OK):
        return "is not readable (check its permissions); expected a readable JSONL file"
    return None


def json_error_text(err: json.JSONDecodeError) -> str:
    """A JSON syntax error as `what at column N` (json's own messages may already end with `at`).

    Args:
        err: the error from `json.loads` on one line.

    Returns:
        E.g. `Unterminated string starting at column 12`.
    """
    msg = err.msg.removesuffix(" at")
    where = f"line {err.lineno} column {err.colno}" if err.lineno > 1 else f"column {err.colno}"
    return f"{msg} at {where}"


def jsonl_objects(text: str, path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line of a small JSONL file's text (suites, held-out text).

    Raises:
        ConfigError: a line that is not valid JSON, named `path:line`.
    """
    from nemo_adapt.errors import ConfigError

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n}: not valid JSON ({json_error_text(err)})") from None


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


def read_records(path: str | os.PathLike, fmt: str = "auto", on_bad_record: str = "error",
                 max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> RecordFile:
    """Read and validate one JSONL file.

    Lines end at `\\n` (see the module docstring); blank lines are ignored (a trailing newline is not a
    record). A UTF-8 byte-order mark before line 1 is dropped and noted in `RecordFile.bom`. With
    `fmt="auto"` the first valid record decides the form for the whole file; records of the other
    form are then bad records. A line longer than `max_record_bytes` is a bad record (`too_large`)
    found before anything of it is decoded or parsed.

    Args:
        path: the JSONL file.
        fmt: `auto`, `chat` or `prompt_completion`.
        on_bad_record: `error` (raise at the first bad record) or `skip` (count it and go on).
        max_record_bytes: longest line, in bytes without its line ending, that is read as a record
            (None: no limit).

    Returns:
        The valid records, the form they were read as, the skip counts per reason with the first
        skipped line numbers, and whether the file starts with a byte-order mark.

    Raises:
        DataError: the file is missing, a directory, unreadable, not UTF-8, empty or has no valid
            record; or (with `on_bad_record="error"`) a record is bad or too large — the message
            names file and line.
    """
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"data format {fmt!r} is not allowed; choose one of: 'auto', 'chat', 'prompt_completion'")
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record={on_bad_record!r} is not allowed; choose one of: 'error', 'skip'")
    if max_record_bytes is not None and (isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int)
                                         or max_record_bytes <= 0):
        raise DataError(f"max_record_bytes={max_record_bytes!r} must be an integer > 0 (bytes) or None")
    name = str(path)
    problem = data_path_problem(path)
    if problem is not None:
        raise DataError(f"data file {name!r} {problem}")

    records: list[Record] = []
    skipped: Counter[str] = Counter()
    skipped_lines: dict[str, list[int]] = {}
    form = None if fmt == "auto" else fmt
    saw_content = bom = False

    def bad(lineno: int, reason: str, message: str) -> None:
        if on_bad_record == "error":
            raise DataError(f"{name}:{lineno}: {message}")
        skipped[reason] += 1
        first = skipped_lines.setdefault(reason, [])
        if len(first) < SKIPPED_LINES_KEPT:
            first.append(lineno)

    try:
        with open(path, "rb") as f:
            for line in iter_lines(f, max_record_bytes):
                lineno, data = line.number, line.data
                if data is None:
                    saw_content = True
                    bad(lineno, TOO_LARGE, _too_large_message(line.size, max_record_bytes))
                    continue
                if lineno == 1 and data.startswith(UTF8_BOM):
                    bom, data = True, data[len(UTF8_BOM):]
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    # A wrong encoding is a property of the file, not of one record: never skipped.
                    raise DataError(f"{name}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start + 1} of "
                                    f"the line); expected UTF-8 JSONL") from err
                if not text.strip():
                    continue
                saw_content = True
                try:
                    kind, messages = _parse_line(text, form, fmt)
                except _BadRecord as err:
                    bad(lineno, err.reason, err.message)
                    continue
                form = kind  # the first valid record fixes the form under `auto`
                records.append(Record(messages=messages, path=name, line=lineno))
    except OSError as err:
        raise DataError(f"cannot read data file {name!r}: {err}") from err

    if not saw_content:
        raise DataError(f"data file {name!r} is empty; expected one JSON record per line")
    if not records:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        raise DataError(f"data file {name!r} has no valid records (skipped {detail})")
    return RecordFile(path=name, format=form or "chat", records=records, skipped=dict(sorted(skipped.items())),
                      skipped_lines=dict(sorted(skipped_lines.items())), bom=bom)


def _parse_line(text: str, form: str | None, fmt: str) -> tuple[str, tuple[dict[str, str], ...]]:
    """Parse and validate one non-blank line: (its format, its messages); `form` is the file's so far."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRecord(MALFORMED_JSON, f"invalid JSON ({json_error_text(err)}); "
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
    return kind, _parse_chat(obj) if kind == "chat" else _parse_prompt_completion(obj)


def _too_large_message(size: int, limit: int) -> str:
    # Suggest a limit that admits this record, rounded up to whole MiB, ready to paste as an override.
    suggestion = -(-size // 2**20) * 2**20
    return (f"the record is {size:,} bytes ({_human_bytes(size)}), over the limit data.max_record_bytes={limit} "
            f"({_human_bytes(limit)}); it was not read. Raise the limit (e.g. data.max_record_bytes={suggestion}) "
            f"to train on it, or set data.on_bad_record=skip to skip records this large")


def _human_bytes(n: int) -> str:
    """`50.0 MiB`, `2.0 KiB` or `17 bytes`."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


def load_records(path: str | os.PathLike, fmt: str = "auto", on_bad_record: str = "error",
                 system_prompt: str | None = None, replace_system_prompt: bool = False,
                 max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES, key: str | None = None,
                 warn: bool = True) -> list[Record]:
    """The valid records of a JSONL file, e.g. test examples for the evaluator.

    Each record's `.prompt` is the chat without the final assistant turn and `.answer` is the
    reference answer string. Skipped records (with `on_bad_record="skip"`) are reported as one
    warning line (see `skip_warning`) on stderr, by the process of rank 0 only (the `RANK`
    environment variable of torchrun/srun), so that a run's evaluation never drops records silently.

    Args:
        path: the JSONL file.
        fmt: `auto`, `chat` or `prompt_completion`.
        on_bad_record: `error` or `skip` (see `read_records`).
        system_prompt: system message for records that have none (None: leave them as they are).
        replace_system_prompt: use `system_prompt` in place of the records' own system messages too.
        max_record_bytes: longest record in bytes (see `read_records`).
        key: the recipe key that named the file (e.g. `data.test`), for the warning.
        warn: print that warning (False where the same file's skips were reported already).

    Returns:
        The records in file order.

    Raises:
        DataError: as `read_records`.
    """
    rf = read_records(path, fmt, on_bad_record, max_record_bytes)
    warning = rf.skip_warning(key)
    if warn and warning is not None and os.environ.get("RANK", "0") == "0":
        print(warning, file=sys.stderr, flush=True)
    return [r.with_system_prompt(system_prompt, replace_system_prompt) for r in rf.records]
