"""Tokenizers and chat templates, from a Hugging Face directory or a GGUF file.

`transformers` does the work (BPE, special tokens, Jinja chat templates). Converting a GGUF
vocabulary takes seconds, so the converted tokenizer is cached on disk keyed by the file's
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from nemo_adapt.errors import CheckpointError


def cache_dir() -> Path:
    """Where converted artifacts are cached ($NEMO_ADAPT_CACHE, default ~/.cache/nemo-adapt)."""
    return Path(os.environ.get("NEMO_ADAPT_CACHE", Path.home() / ".cache" / "nemo-adapt"))


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer for a checkpoint directory or a .gguf file.

    Raises:
        CheckpointError: the path has no tokenizer.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir() / "tokenizers" / key
        if not (cached / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cached.parent))
            tok.save_pretrained(str(tmp))
            try:
                tmp.rename(cached)
            except OSError:  # another process cached it first
                shutil.rmtree(tmp, ignore_errors=True)
        path = cached
    if not path.is_dir():
        raise CheckpointError(f"no tokenizer at {str(path)!r}: expected a checkpoint directory or .gguf file")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load a tokenizer from {str(path)!r}: {err}") from err
