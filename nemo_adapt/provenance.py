"""Where a result came from: the code version recorded in merge configs and evaluation results."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


@cache
def code_version() -> str:
    """The installed nemo-adapt version, with the git commit when running from a checkout
    (`0.1.0+3f2a9c1`, `+dirty` appended when tracked files have uncommitted changes).

    Returns:
        The version string; the package version alone when git or the checkout is not there.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("nemo-adapt")
    except PackageNotFoundError:
        v = "0"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=here).stdout.strip()
        dirty = commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{v}+{commit}{'.dirty' if dirty else ''}" if commit else v
