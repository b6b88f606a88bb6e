"""File modes of what nemo-adapt writes: the process umask decides, as for any ordinary file creation.

Writers that stage into a temporary file or directory (`tempfile.mkstemp`/`mkdtemp`, and safetensors,
which writes through a private temporary file) end up with owner-only modes (0600 files, 0700
directories), which teammates on a shared cluster cannot read. `follow_umask` gives a finished file, or
every file and directory under a finished directory, the mode an ordinary `open()`/`mkdir()` would
have given it: 0666 & ~umask for files (0777 & ~umask when the owner may execute it) and 0777 & ~umask
for directories.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    Linux reports it in /proc/self/status; elsewhere it is read by setting and restoring it, which is
    safe here because nemo-adapt creates no files from other threads meanwhile.

    Returns:
        The umask bits, e.g. 0o022.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give `path` (a file, or a directory and everything under it) umask-derived modes.

    Symbolic links are left alone (their targets are not ours to change). Call it on a finished
    temporary file or directory before renaming it into place, so the published path never has
    owner-only modes.

    Args:
        path: the file or directory.

    Raises:
        OSError: a mode cannot be changed (e.g. the file belongs to another user).
    """
    mask = current_umask()
    file_mode, dir_mode, exec_mode = 0o666 & ~mask, 0o777 & ~mask, 0o777 & ~mask
    root = Path(path)

    def fix(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            want = dir_mode
        else:
            want = exec_mode if st.st_mode & stat.S_IXUSR else file_mode
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)

    fix(root)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                fix(Path(dirpath) / name)
