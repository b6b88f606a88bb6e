"""The on-disk cache of derived artifacts ($NEMO_ADAPT_CACHE): keys, manifests, atomic publication.

Every entry is keyed on what produced it: the content of its inputs (never a path or a modification
time alone) and the versions of the code that made it (the libraries by their installed versions,
nemo-adapt by its version and a digest of the module sources that do the work). A directory entry
also holds a manifest (`nemo_adapt_cache.json`) with its key and the sha256 of every file in it; an
entry whose files no longer match (edited after it was written, half deleted) is rebuilt, and the
rebuild is reported once per process.

    entry = cached_directory(cache_dir() / "tokenizers", key, build=convert, what="tokenizer of x.gguf")
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nemo_adapt.file_modes import follow_umask

MANIFEST = "nemo_adapt_cache.json"
"""The manifest file inside a cached directory: its key and the digest of each file."""

_reported: set[str] = set()


def cache_dir() -> Path:
    """Where derived artifacts are cached ($NEMO_ADAPT_CACHE, default ~/.cache/nemo-adapt).

    Returns:
        The cache root (not created).
    """
    return Path(os.environ.get("NEMO_ADAPT_CACHE", Path.home() / ".cache" / "nemo-adapt"))


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of distributions, for cache keys.

    Args:
        names: distribution names, e.g. "transformers", "tokenizers", "gguf", "nemo-adapt".

    Returns:
        name -> version ("not installed" when it is not).
    """
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_digest(*modules: str) -> str:
    """sha256 over the source files of modules: the version of the code that produces an entry.

    A change to any of them (a fix in tokenization, a new row layout) makes old entries stop matching
    without anyone having to remember a version bump.

    Args:
        modules: dotted module names, e.g. "nemo_adapt.data.tokenize".

    Returns:
        The hex digest (a module without a source file contributes its name only).
    """
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0")
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None) if spec is not None else None
        if origin and origin.endswith(".py") and os.path.isfile(origin):
            with open(origin, "rb") as f:
                h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(payload: Mapping[str, Any]) -> str:
    """The entry name for a key: sha256 of its canonical JSON, shortened to 32 hex digits (128 bits).

    Args:
        payload: JSON-serialisable key material (content digests, versions, settings).

    Returns:
        32 hex characters.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under a directory, by relative POSIX path (the manifest excluded).

    Args:
        directory: the entry.

    Returns:
        relative path -> hex digest.
    """
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.relative_to(directory).as_posix()] = h.hexdigest()
    return out


def report_rebuild(entry: Path, why: str) -> None:
    """Say once per process and entry that a cache entry is being rebuilt, and why.

    Args:
        entry: the cache entry.
        why: the reason, e.g. "chat_template.jinja was changed after it was written".
    """
    if str(entry) in _reported:
        return
    _reported.add(str(entry))
    print(f"nemo-adapt: cache entry {str(entry)!r}: {why}; rebuilding it", file=sys.stderr, flush=True)


def verify_entry(entry: Path, key: Mapping[str, Any]) -> str | None:
    """Why a cached directory cannot be used as it is, or None when its manifest and files match.

    Args:
        entry: the cached directory.
        key: the key it must have been built for.

    Returns:
        None when usable; otherwise a reason ("... was changed after it was written", ...).
    """
    manifest = entry / MANIFEST
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written by an older nemo-adapt, or incomplete)"
    except (OSError, ValueError) as err:
        return f"its {MANIFEST} cannot be read ({err})"
    if not isinstance(recorded, dict) or recorded.get("key") != json.loads(json.dumps(key, default=str)):
        return f"its {MANIFEST} records another key"
    files = recorded.get("files")
    if not isinstance(files, dict):
        return f"its {MANIFEST} lists no files"
    actual = file_digests(entry)
    changed = sorted(name for name in files.keys() & actual.keys() if files[name] != actual[name])
    missing = sorted(files.keys() - actual.keys())
    added = sorted(actual.keys() - files.keys())
    if changed:
        return f"{', '.join(changed)} was changed after it was written"
    if missing:
        return f"{', '.join(missing)} is missing"
    if added:
        return f"{', '.join(added)} was added after it was written"
    return None


def cached_directory(entry: Path, key: Mapping[str, Any], build: Callable[[Path], None], what: str) -> Path:
    """A verified cache directory: `entry` if its manifest matches `key` and its files, else rebuilt.

    Building happens in a temporary sibling that is renamed into place when complete (with its
    manifest and umask-derived modes), so a reader never sees half an entry; when several processes
    build at once, each publishes a complete, equal entry.

    Args:
        entry: the entry directory (its name should be `cache_key(key)`, possibly with a readable prefix).
        key: what the entry depends on; stored in the manifest and compared on every use.
        build: writes the entry's files into the directory it is given.
        what: a few words naming the entry in messages, e.g. "tokenizer of model.gguf".

    Returns:
        The entry directory.

    Raises:
        OSError: the cache directory cannot be written.
    """
    if entry.is_dir():
        why = verify_entry(entry, key)
        if why is None:
            return entry
        report_rebuild(entry, f"{what}: {why}")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        build(tmp)
        manifest = {"key": key, "files": file_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                                    encoding="utf-8")
        follow_umask(tmp)  # mkdtemp made it 0700; a shared cache must be readable as the umask allows
        _publish(tmp, entry, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _publish(tmp: Path, entry: Path, key: Mapping[str, Any]) -> None:
    """Rename a complete entry into place, replacing a stale one; keep a valid one another process made."""
    for _ in range(3):
        try:
            os.rename(tmp, entry)
            return
        except OSError:
            if not entry.exists():
                continue  # a concurrent replace was half done; try again
            if verify_entry(entry, key) is None:
                return  # another process published an equal entry first
            stale = entry.with_name(f".{entry.name}.stale{os.getpid()}")
            shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(entry, stale)
            except OSError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"cannot publish cache entry {str(entry)!r}: it keeps being replaced")
