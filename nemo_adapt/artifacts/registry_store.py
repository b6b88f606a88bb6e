"""Where a registry keeps its bytes: a local directory, or an object store through `fsspec`.

The registry needs four things of a location, and each backend gives them as its medium allows:

| need | local directory | object store (s3://, gs://, ... via fsspec) |
|---|---|---|
| a file appears whole or not at all | written to `tmp/`, fsynced, then hard-linked into place | one PUT: an object appears whole |
| create only if absent (a manifest, an audit entry) | `os.link` fails on an existing name: atomic | `fs.pipe_file(mode="create")`: S3's conditional write (`If-None-Match: *`, s3fs); elsewhere fsspec checks then writes, which is not atomic (a warning says so) |
| one writer at a time | `filelock` (an `flock` on `.lock`; the kernel drops it when the holder dies, even by SIGKILL) | no lock: the conditional create above is what keeps two writers apart |
| listing | `os.listdir` | `fs.ls` with the listing cache dropped first |

We use `fsspec` (and `filelock`) rather than our own clients: they are the well-kept, widely used layer every
Python data tool speaks; a new store is one `pip install` (s3fs, gcsfs, adlfs) away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from nemo_adapt.errors import ConfigError

LOCK = ".lock"
"""The local lock file, at the registry root."""
TMP = "tmp"
"""Local staging directory, at the registry root: on the same filesystem, so publishing is a link or rename."""
PROBE = "store.json"
"""(object stores) Whether the server honoured a conditional write when this registry was first written."""
_CHUNK = 1 << 20

ATOMIC_CREATE_PROTOCOLS = frozenset({"s3", "s3a"})
"""Object-store protocols whose create-if-absent is one conditional request (s3fs sends `If-None-Match: *`, which
AWS S3 honours since 2024-08 and which moto, MinIO and Ceph RGW implement)."""


class RegistryWarning(UserWarning):
    """A registry location gives weaker guarantees than the registry wants (printed as one `warning:` line)."""


class Store(Protocol):
    """The operations the registry needs of a location (paths are relative, `/`-separated)."""

    url: str
    """The location as the user named it (credentials never appear: fsspec takes them from the environment)."""

    def read(self, rel: str) -> bytes:
        """The bytes at `rel` (FileNotFoundError when absent)."""

    def open(self, rel: str) -> BinaryIO:
        """A binary reader for `rel` (FileNotFoundError when absent)."""

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists."""

    def listdir(self, rel: str) -> list[str]:
        """Entry names directly under directory `rel` (empty when it does not exist)."""

    def find(self, rel: str) -> list[str]:
        """Every file under directory `rel`, recursively, as paths relative to `rel` (one listing on object stores)."""

    def put_object(self, src: Path, rel: str, sha256: str) -> bool:
        """Store the file `src` at `rel` unless something is there (True: stored now); its bytes are hashed while
        copied and must equal `sha256` (ConfigError otherwise: the file changed while being added)."""

    def create(self, rel: str, data: bytes) -> bool:
        """Write `data` at `rel` only if absent, atomically (True: written now; False: something was there)."""

    def replace(self, rel: str, data: bytes) -> None:
        """Write `data` at `rel` whole, replacing what is there (only for the audit log's head pointer)."""

    def size(self, rel: str) -> int | None:
        """Bytes at `rel`, or None when absent (one stat or HEAD request; no read)."""

    def fetch(self, rel: str, dest: Path) -> None:
        """Copy `rel` to the local file `dest`."""

    def lock(self) -> contextlib.AbstractContextManager:
        """Held around every read-decide-create sequence (manifest and audit entry writes)."""

    def leftovers(self) -> list[str]:
        """Temporary files that interrupted writes left behind (harmless; never listed as versions)."""


def _hashing_copy(src: Path, out: BinaryIO, sha256: str) -> None:
    """Copy `src` into `out`, hashing on the way; the bytes written are the bytes hashed."""
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
            out.write(block)
    if h.hexdigest() != sha256:
        raise ConfigError(f"{str(src)!r} changed while it was being added (sha256 {sha256[:12]} when scanned, "
                          f"{h.hexdigest()[:12]} when copied); add it again once nothing writes to it")


class LocalStore:
    """A registry in a local (or network-mounted POSIX) directory."""

    def __init__(self, root: str | os.PathLike, url: str | None = None):
        self.root = Path(root)
        self.url = url or str(self.root.absolute())  # messages name the directory wherever they are read

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def open(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def find(self, rel: str) -> list[str]:
        base = self._path(rel)
        return sorted(str(Path(d, f).relative_to(base)) for d, _, files in os.walk(base) for f in files)

    def _staged(self) -> tuple[int, Path]:
        tmp = self.root / TMP
        tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp, prefix=f"{os.getpid()}-")
        return fd, Path(name)

    def _publish(self, staged: Path, dest: Path) -> bool:
        """Link the finished, fsynced `staged` file to `dest` unless `dest` exists; remove `staged` either way."""
        from nemo_adapt.file_modes import follow_umask

        try:
            follow_umask(staged)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(staged, dest)  # atomic, and refuses an existing name: nothing is ever overwritten
            except FileExistsError:
                return False
            except OSError:
                # A filesystem without hard links (some network or FUSE mounts): every create runs under the
                # lock, so checking first and renaming is exclusive here too.
                if dest.exists():
                    return False
                os.rename(staged, dest)
            _fsync_dir(dest.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def put_object(self, src: Path, rel: str, sha256: str) -> bool:
        return self._write_new(rel, lambda out: _hashing_copy(src, out, sha256))

    def create(self, rel: str, data: bytes) -> bool:
        return self._write_new(rel, lambda out: out.write(data))

    def _stage(self, write) -> Path:
        """`write(file)` into a new temporary file under tmp/, fsynced; removed again if writing fails."""
        fd, staged = self._staged()
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return staged

    def _write_new(self, rel: str, write) -> bool:
        """Stage `write(file)`, then publish it at `rel` unless something is there."""
        dest = self._path(rel)
        if dest.exists():
            return False
        return self._publish(self._stage(write), dest)

    def replace(self, rel: str, data: bytes) -> None:
        from nemo_adapt.file_modes import follow_umask

        staged = self._stage(lambda out: out.write(data))
        try:
            follow_umask(staged)
            os.replace(staged, self._path(rel))  # atomic: a reader sees the old or the new pointer, never half
        finally:
            staged.unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        try:
            return self._path(rel).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def fetch(self, rel: str, dest: Path) -> None:
        shutil.copyfile(self._path(rel), dest)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        import filelock

        self.root.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.root / LOCK)):
            yield

    def leftovers(self) -> list[str]:
        return [f"{TMP}/{n}" for n in self.listdir(TMP)]


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (a crash right after an add must not lose the manifest's name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FsspecStore:
    """A registry on any filesystem fsspec opens (s3://bucket/prefix, gs://..., memory://...).

    Credentials and endpoints come from the filesystem's own configuration (for S3: the AWS environment
    variables, `AWS_ENDPOINT_URL` included, or ~/.aws), never from the registry URL or its files.
    """

    def __init__(self, url: str):
        import fsspec

        try:
            # fsspec's instance cache gives one client per process and options: making an S3 client parses
            # botocore's service model (about a second on a small machine).
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as err:
            protocol = url.split("://", 1)[0]
            package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
            raise ConfigError(f"registry {url!r}: the {protocol}:// filesystem is not installed "
                              f"(pip install {package.get(protocol, 'the fsspec implementation for ' + protocol)}"
                              f"{'; or nemo-adapt[s3]' if protocol in ('s3', 's3a') else ''}): {err}") from None
        except ValueError as err:
            raise ConfigError(f"registry {url!r}: not a location fsspec can open ({err})") from None
        self.root = root.rstrip("/")
        self.url = url
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.atomic_create = bool(ATOMIC_CREATE_PROTOCOLS & set(protocols))
        self._probed = False

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def open(self, rel: str) -> BinaryIO:
        return self.fs.open(self._path(rel), "rb")

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self._path(rel))
        return self.fs.exists(self._path(rel))

    def listdir(self, rel: str) -> list[str]:
        path = self._path(rel)
        self.fs.invalidate_cache(path)  # another process may have written since this one last listed
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path})

    def find(self, rel: str) -> list[str]:
        base = self._path(rel)
        self.fs.invalidate_cache(base)
        return sorted(p[len(base) + 1:] for p in self.fs.find(base))

    def put_object(self, src: Path, rel: str, sha256: str) -> bool:
        dest = self._path(rel)
        if self.exists(rel):
            return False
        try:
            with self.fs.open(dest, "wb") as out:  # one (multipart) upload: the object appears whole at close
                _hashing_copy(src, out, sha256)
        except ConfigError:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(dest)
            raise
        return True

    def create(self, rel: str, data: bytes) -> bool:
        self._check_conditional_writes()
        try:
            self.fs.pipe_file(self._path(rel), data, mode="create")
        except FileExistsError:
            return False
        return True

    def _check_conditional_writes(self) -> None:
        """Once per process and store: say when two writers at once are not kept apart.

        On S3 the server is asked once per registry (a probe object created twice; the second create must be
        refused) and the answer kept in `PROBE`, so later processes pay one read instead of three requests.
        """
        if self._probed:
            return
        self._probed = True
        if not self.atomic_create:
            warnings.warn(f"registry {self.url}: this filesystem creates a file only-if-absent by checking first and "
                          "then writing, which is not atomic: keep to one writer at a time (concurrent writers are "
                          "kept apart on local directories and S3)", RegistryWarning, stacklevel=4)
            return
        try:
            honoured = json.loads(self.fs.cat_file(self._path(PROBE)))["conditional_writes"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            honoured = self._probe()
            with contextlib.suppress(FileExistsError):  # another process may have written it meanwhile
                self.fs.pipe_file(self._path(PROBE), json.dumps({"conditional_writes": honoured}).encode(),
                                  mode="create")
        if not honoured:
            warnings.warn(f"registry {self.url}: the server ignored a conditional write (If-None-Match): two "
                          "processes writing at once could both take the same audit entry; keep to one writer at a "
                          "time", RegistryWarning, stacklevel=4)

    def _probe(self) -> bool:
        """Whether the server refuses a second create-if-absent of the same object."""
        probe = self._path(f"tmp/probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"1", mode="create")
            try:
                self.fs.pipe_file(probe, b"2", mode="create")
                return False
            except FileExistsError:
                return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(probe)

    def replace(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)  # one PUT: the object is replaced whole

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.size(self._path(rel)))
        except FileNotFoundError:
            return None

    def fetch(self, rel: str, dest: Path) -> None:
        self.fs.get_file(self._path(rel), str(dest))

    def lock(self) -> contextlib.AbstractContextManager:
        # No lock object: a lease on an object store needs expiry and fencing to survive a killed holder, and
        # the conditional creates above already make every commit exclusive (see the module docstring).
        return contextlib.nullcontext()

    def leftovers(self) -> list[str]:
        return []


def open_store(location: str) -> Store:
    """The store for a registry location: a local path (or file:// URL) or any other fsspec URL.

    Args:
        location: `registry`, `/shared/registry`, `file:///shared/registry`, `s3://bucket/prefix`, ...

    Raises:
        ConfigError: the URL's filesystem package is not installed, or fsspec cannot open it.
    """
    if "://" not in location:
        return LocalStore(location)
    if location.startswith("file://"):
        return LocalStore(location[len("file://"):], url=location)
    return FsspecStore(location)
