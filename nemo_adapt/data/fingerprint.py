"""Content fingerprints of tokenized data and the on-disk cache keyed by them.

A split's fingerprint is the sha256 of: the data file's bytes, the tokenizer (vocabulary, merges,
chat template, special tokens), the data settings that change the tokenized rows, and this
pipeline's layout version. Paths and modification times are not part of it: the same bytes under
another name reuse the cache, and a touched-but-unchanged file does too. Settings that only change
the order of rows (shuffle) are not part of it either.

Cache entries are one safetensors file per fingerprint (numpy arrays plus JSON metadata, no pickle:
a cache directory may be shared, and unpickling a planted file runs code). They are written to a
temporary file in the same directory and renamed into place, so a reader never sees half a file
and two ranks writing the same entry at once both leave a complete one.

An entry is named by the fingerprint and by the code that produced it (`code_identity`: the pipeline
version, a digest of the modules that read, tokenize and pack, and the transformers/tokenizers/numpy/
safetensors/nemo-adapt versions), so a new release or a changed tokenizer library never reuses rows
an older one made. Its metadata records that identity and a sha256 of its arrays; an entry edited
after it was written (or truncated) is reported once and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from nemo_adapt.cache import cache_key, package_versions, report_rebuild, source_digest
from nemo_adapt.file_modes import follow_umask

PIPELINE_VERSION = 2
"""Bump when the row layout or tokenization logic changes, so old cache entries stop matching.
2: lines end at "\n" only (records holding U+2028 and the like are kept), and stats name skipped lines."""
TOKENIZATION_SETTINGS = ("format", "seq_length", "packing", "over_length", "on_bad_record", "system_prompt",
                         "replace_system_prompt", "max_record_bytes")
"""DataConfig fields that change the tokenized rows, hence the fingerprint."""
CODE_MODULES = ("nemo_adapt.data.formats", "nemo_adapt.data.tokenize", "nemo_adapt.data.packing",
                "nemo_adapt.data.dataset", "nemo_adapt.data.fingerprint")
"""The modules whose code turns data files into cached rows: their source is part of every cache key."""
CODE_PACKAGES = ("transformers", "tokenizers", "numpy", "safetensors", "nemo-adapt")
"""Libraries whose versions can change the cached rows (tokenization) or how they are stored."""


def code_identity() -> dict:
    """What produced a cache entry: pipeline version, source digest of `CODE_MODULES`, library versions.

    Returns:
        JSON-serialisable identity; entries made under another identity are not reused.
    """
    return {"pipeline_version": PIPELINE_VERSION, "source": source_digest(*CODE_MODULES),
            "versions": package_versions(*CODE_PACKAGES)}


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over arrays' names, dtypes, shapes and bytes, in name order.

    Args:
        arrays: name -> numpy array.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes.

    Args:
        path: the file.
        chunk: bytes read at a time.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes.

    Args:
        text: the string.

    Returns:
        The hex digest.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_fingerprint(data_sha256: str, tokenizer_sha256: str, settings: dict) -> str:
    """The fingerprint of one tokenized split.

    Args:
        data_sha256: hash of the data file's bytes.
        tokenizer_sha256: hash of `tokenize.tokenizer_identity(tokenizer)`.
        settings: the values of `TOKENIZATION_SETTINGS`.

    Returns:
        Hex sha256 over all of them and `PIPELINE_VERSION`.
    """
    payload = {"version": PIPELINE_VERSION, "data": data_sha256, "tokenizer": tokenizer_sha256,
               "settings": {k: settings[k] for k in TOKENIZATION_SETTINGS}}
    return sha256_text(json.dumps(payload, sort_keys=True))


def combined_fingerprint(per_split: dict[str, str]) -> str:
    """One hash over the fingerprints of all splits.

    Args:
        per_split: split name -> fingerprint.

    Returns:
        Hex sha256 of the sorted (split, fingerprint) pairs.
    """
    return sha256_text(json.dumps(sorted(per_split.items())))


def cache_file(cache_dir: str | os.PathLike, fingerprint: str) -> Path:
    """Where the cache entry for a fingerprint, made by this code (`code_identity`), lives.

    Args:
        cache_dir: the cache directory.
        fingerprint: a split fingerprint.

    Returns:
        `<cache_dir>/<fingerprint>-<code key>.safetensors`.
    """
    return Path(cache_dir) / f"{fingerprint}-{cache_key(code_identity())[:16]}.safetensors"


def save_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and JSON metadata to `path` atomically (temp file + rename).

    The metadata gains `code` (`code_identity()`) and `arrays_sha256`, which `load_cache` checks.
    The file gets the umask's mode (a temporary file is owner-only), so a shared cache stays shared.

    Args:
        path: the cache entry to write.
        arrays: name -> numeric numpy array.
        meta: JSON-serialisable metadata (fingerprint, stats).

    Raises:
        OSError: the entry cannot be written.
    """
    from safetensors.numpy import save

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {**meta, "code": code_identity(), "arrays_sha256": arrays_sha256(arrays)}
    blob = save(arrays, metadata={"meta": json.dumps(meta, sort_keys=True)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: Path, fingerprint: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """Read a cache entry if it exists, is readable and was written for `fingerprint` by this code.

    An entry that is unreadable (truncated by a full disk), was made by other code (`code_identity`),
    or whose arrays no longer match the digest written with them (edited afterwards) is a miss: it is
    reported once on stderr and rebuilt rather than trusted.

    Args:
        path: the cache entry.
        fingerprint: the fingerprint the entry must carry.

    Returns:
        (arrays, metadata), or None on a miss.
    """
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            if meta.get("fingerprint") != fingerprint:
                return None
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # any corruption means "rebuild", never "crash the run"
        report_rebuild(path, f"tokenized data cache cannot be read ({type(err).__name__})")
        return None
    if meta.get("code") != json.loads(json.dumps(code_identity())):
        report_rebuild(path, "tokenized data cache was made by other code or library versions")
        return None
    if meta.get("arrays_sha256") != arrays_sha256(arrays):
        report_rebuild(path, "tokenized data cache was changed after it was written (its arrays do not "
                             "match their digest)")
        return None
    return arrays, meta
