"""Read an offline W&B run back from disk, without a server.

An offline run leaves `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`: W&B's transaction log,
the same bytes `wandb sync` uploads. wandb 0.31 has no public Python reader for it any more (the
old `wandb.sdk.internal.datastore` and `wandb sync --view` are gone; `wandb beta leet` is a terminal
UI), so this module decodes the documented container format and parses each record with W&B's own
protobuf schema (`wandb.proto.wandb_internal_pb2.Record`), which the wandb wheel ships.

Container format (LevelDB log layout, W&B flavour):
  - a 7-byte file header: b":W&B", uint16 magic 0xBEE1 (little-endian), uint8 version 0;
  - then 32 KiB blocks (counted from the start of the file, header included) of chunks, each a
    7-byte chunk header `<uint32 crc32, uint16 length, uint8 type>` and `length` payload bytes.
    type 1 = a whole record, 2/3/4 = first/middle/last piece of a record split across blocks;
    crc32 is zlib's CRC-32 over the type byte followed by the payload;
  - a block tail shorter than a chunk header is zero padding.

Used by the tests (the logged history must equal metrics.jsonl) and handy for looking at a run on
a cluster without network: `read_offline_run(run_dir).history`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")  # 7 bytes
_CHUNK_HEADER = struct.Struct("<IHB")  # 7 bytes: crc32, payload length, chunk type
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What a W&B run logged, merged over all its `.wandb` files (one per start of a resumed run)."""

    run_id: str
    """W&B run id."""
    project: str = ""
    """Project of the last start."""
    entity: str = ""
    """Entity of the last start ("" offline unless set)."""
    name: str = ""
    """Display name of the last start."""
    group: str = ""
    """Run group of the last start."""
    tags: list[str] = field(default_factory=list)
    """Tags of the last start."""
    config: dict[str, Any] = field(default_factory=dict)
    """Run config (W&B's internal `_wandb` key removed)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Final summary: the last value of each key."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """History rows in logging order, each with `_step` and the logged keys (W&B's `_runtime`/`_timestamp` too)."""
    files: list[Path] = field(default_factory=list)
    """The `.wandb` files read, oldest start first."""


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield the protobuf records of one `.wandb` file in order.

    A chunk cut short at the end of the file (a run killed mid-write) ends the iteration quietly.

    Args:
        path: The `run-<id>.wandb` file.

    Yields:
        `wandb.proto.wandb_internal_pb2.Record` messages.

    Raises:
        ValueError: The file is not a W&B transaction log, or a chunk fails its checksum.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {data[: _FILE_HEADER.size]!r})")

    pos = _FILE_HEADER.size
    pending = b""  # pieces of a record split across blocks
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if room < _CHUNK_HEADER.size:  # zero padding to the next block
            pos += room
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zeroed rest of a block
            pos += room
            continue
        start = pos + _CHUNK_HEADER.size
        payload = data[start : start + length]
        if len(payload) < length:  # torn tail
            return
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos = start + length
        if kind == _FULL:
            whole = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            whole, pending = pending + payload, b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        yield record


def run_files(directory: str | Path, run_id: str | None = None) -> list[Path]:
    """The `.wandb` files under `directory` (a run directory or its `wandb/` folder), oldest first.

    Args:
        directory: Where `wandb.init(dir=...)` pointed, or the `wandb/` folder inside it.
        run_id: Only files of this W&B run (default: all).

    Returns:
        Paths ordered by the run start time recorded inside each file.
    """
    root = Path(directory)
    pattern = f"run-{run_id}.wandb" if run_id else "run-*.wandb"
    found = list(root.glob(f"wandb/*/{pattern}")) + list(root.glob(f"*/{pattern}"))
    # wandb/latest-run is a symlink to one of the run folders: read each file once.
    unique = {p.resolve(): p for p in found if not p.parent.is_symlink()}
    return sorted(unique.values(), key=lambda p: (_start_time(p), p.parent.name))


def read_offline_run(directory: str | Path, run_id: str | None = None) -> OfflineRun:
    """Merge the config, history and summary of a (possibly resumed) offline W&B run.

    Args:
        directory: A run directory (`wandb.init(dir=...)`) or its `wandb/` folder.
        run_id: Which W&B run to read (default: the only one there).

    Returns:
        The run's data; history rows of all starts in order.

    Raises:
        FileNotFoundError: No `.wandb` file for the run.
        ValueError: Several runs are there and `run_id` was not given, or a file is corrupt.
    """
    files = run_files(directory, run_id)
    if not files:
        raise FileNotFoundError(f"no W&B run file (run-*.wandb) under {directory}")
    ids = {p.name[len("run-") : -len(".wandb")] for p in files}
    if len(ids) > 1:
        raise ValueError(f"several W&B runs under {directory} ({', '.join(sorted(ids))}); pass run_id")
    run = OfflineRun(run_id=ids.pop(), files=files)
    for path in files:
        for record in iter_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.project, run.entity, run.name, run.group = (
                    r.project,
                    r.entity,
                    r.display_name,
                    r.run_group,
                )
                run.tags = list(r.tags)
                _apply_config(run.config, r.config)
            elif kind == "config":
                _apply_config(run.config, record.config)
            elif kind == "history":
                run.history.append({_item_key(i): _item_value(i) for i in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    run.summary[_item_key(item)] = json.loads(item.value_json)
                for item in record.summary.remove:
                    run.summary.pop(_item_key(item), None)
    # W&B's own bookkeeping, not something the run logged.
    run.config.pop("_wandb", None)
    run.summary = {k: v for k, v in run.summary.items() if not k.startswith("_wandb")}
    return run


def _start_time(path: Path) -> float:
    """Start time of the run record in a file (inf when there is none, so such files sort last)."""
    try:
        for record in iter_records(path):
            if record.WhichOneof("record_type") == "run":
                return record.run.start_time.seconds + record.run.start_time.nanos * 1e-9
    except ValueError:
        pass
    return float("inf")


def _item_key(item: Any) -> str:
    # A flat key is in `key`; a key logged inside a dict ({"a": {"b": 1}}) is a path in `nested_key`,
    # which W&B shows joined by dots.
    return item.key or ".".join(item.nested_key)


def _item_value(item: Any) -> Any:
    # Newer writers may use the typed oneof instead of value_json; accept both.
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json)
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _apply_config(config: dict[str, Any], record: Any) -> None:
    for item in record.update:
        config[_item_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        config.pop(_item_key(item), None)
