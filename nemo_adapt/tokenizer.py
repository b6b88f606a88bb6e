"""Tokenizers and chat templates, from a Hugging Face directory or a GGUF file.

`transformers` does the work (BPE, special tokens, Jinja chat templates). Converting a GGUF
vocabulary takes seconds, so the converted tokenizer is cached on disk (`nemo_adapt.cache`), keyed
on the content of the GGUF file's metadata (where the vocabulary, merges, special tokens and chat
template live), the versions of transformers, tokenizers and gguf that convert it, and this
module's conversion code. The entry's manifest holds a digest of each cached file, so an edited
`chat_template.jinja` (or any other cached file) is noticed and the entry rebuilt.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from pathlib import Path

from nemo_adapt.cache import cache_dir, cache_key, cached_directory, package_versions, source_digest
from nemo_adapt.errors import CheckpointError

__all__ = ["TOKENIZER_CACHE_FORMAT", "cache_dir", "gguf_metadata_sha256", "load_tokenizer"]

TOKENIZER_CACHE_FORMAT = 2
"""Layout of a cached converted tokenizer; bump when what is cached, or how, changes.
2: keyed on the GGUF metadata's content and the converting libraries' versions, with a manifest."""

# GGUF metadata value types (gguf-py's GGUFValueType) -> byte size; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def quiet_transformers():
    """Silence transformers' info logs and progress bars (they would land on our commands' stderr)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer for a checkpoint directory or a .gguf file.

    A GGUF file's tokenizer is converted once and cached (see the module docstring); an entry whose
    files were changed after they were written is rebuilt, and the rebuild is reported on stderr.

    Args:
        path: a Hugging Face checkpoint directory or a .gguf file.

    Returns:
        The tokenizer.

    Raises:
        CheckpointError: the path has no tokenizer, or it cannot be loaded.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path = _converted_gguf_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(f"no tokenizer at {str(path)!r}: expected a checkpoint directory or .gguf file")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load a tokenizer from {str(path)!r}: {err}") from err


def tokenizer_if_any(path: str | os.PathLike, what: str, tool: str):
    """The checkpoint's tokenizer, or None with a note on stderr when it has none that loads.

    For writers of whole checkpoints (export, merge): a weights-only directory still gives a complete model;
    saying so beats refusing the export.

    Args:
        path: as `load_tokenizer`.
        what: the checkpoint as the user named it (for the note).
        tool: the command writing, for the note's prefix.
    """
    import sys

    try:
        return load_tokenizer(path)
    except CheckpointError as err:
        print(f"{tool}: note: no tokenizer saved ({what!r} has none that loads: {err})", file=sys.stderr)
        return None


def _converted_gguf_tokenizer(gguf_path: Path) -> Path:
    """The cache directory holding the tokenizer converted from `gguf_path` (converted now if needed)."""
    key = {
        "kind": "gguf-tokenizer",
        "format": TOKENIZER_CACHE_FORMAT,
        "gguf_metadata_sha256": gguf_metadata_sha256(gguf_path),
        "versions": package_versions("transformers", "tokenizers", "gguf", "nemo-adapt"),
        "code": source_digest(__name__),
    }
    entry = cache_dir() / "tokenizers" / cache_key(key)
    return cached_directory(entry, key, lambda out: _convert_gguf(gguf_path, out),
                            what=f"tokenizer converted from {gguf_path.name}")


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Convert a GGUF file's tokenizer with transformers and save it (tokenizer.json, template, config)."""
    from transformers import AutoTokenizer

    # Convert from a directory holding only (a link to) the GGUF file: given a directory, transformers
    # also reads a tokenizer.json or tokenizer_config.json lying next to the file, which the key does
    # not cover.
    with tempfile.TemporaryDirectory(prefix="nemo-adapt-gguf-") as alone:
        link = Path(alone) / gguf_path.name
        os.symlink(gguf_path.resolve(), link)
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def gguf_metadata_sha256(path: str | os.PathLike) -> str:
    """sha256 of a GGUF file's header: its metadata (tokenizer included) and tensor descriptions.

    The header is the file's first few MB; the tensor data after it (gigabytes) does not change the
    tokenizer and is not read. A file whose header cannot be walked is hashed whole.

    Args:
        path: the .gguf file.

    Returns:
        The hex digest.

    Raises:
        CheckpointError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return hashlib.sha256(b"").hexdigest()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                try:
                    end = _gguf_header_end(m)
                except (ValueError, struct.error):
                    end = size  # not a header we can walk: the whole file is the content
                h = hashlib.sha256()
                for start in range(0, end, 1 << 24):  # 16 MiB at a time
                    h.update(m[start:min(end, start + (1 << 24))])
                return h.hexdigest()
    except OSError as err:
        raise CheckpointError(f"cannot read GGUF file {str(path)!r}: {err.strerror or err}") from err


def _gguf_header_end(m: mmap.mmap) -> int:
    """Byte offset where a GGUF (v2/v3) file's key-value metadata and tensor descriptions end.

    Raises:
        ValueError: not a GGUF v2/v3 header, or it runs past the end of the file.
        struct.error: the header is truncated.
    """
    if m[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    (version,) = struct.unpack_from("<I", m, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written big-endian
        order = ">"
        (version,) = struct.unpack_from(">I", m, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", m, 8)
    pos = 24
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def string(pos: int) -> int:
        (length,) = u64.unpack_from(m, pos)
        return pos + 8 + length

    def value(pos: int, kind: int) -> int:
        if kind in _GGUF_SIZES:
            return pos + _GGUF_SIZES[kind]
        if kind == _GGUF_STRING:
            return string(pos)
        if kind == _GGUF_ARRAY:
            (item,) = u32.unpack_from(m, pos)
            (count,) = u64.unpack_from(m, pos + 4)
            pos += 12
            if item in _GGUF_SIZES:
                return pos + count * _GGUF_SIZES[item]
            for _ in range(count):
                pos = value(pos, item)
                if pos > len(m):
                    raise ValueError("array runs past the end of the file")
            return pos
        raise ValueError(f"unknown GGUF value type {kind}")

    for _ in range(n_kv):
        pos = string(pos)
        (kind,) = u32.unpack_from(m, pos)
        pos = value(pos + 4, kind)
        if pos > len(m):
            raise ValueError("metadata runs past the end of the file")
    for _ in range(n_tensors):
        pos = string(pos)
        (n_dims,) = u32.unpack_from(m, pos)
        pos += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
        if pos > len(m):
            raise ValueError("tensor descriptions run past the end of the file")
    return pos
