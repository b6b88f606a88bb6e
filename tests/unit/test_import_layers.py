"""The recipe schema and the PEFT methods do not import each other: `config` imports the PEFT registry (the
`peft` section's class comes from it), and the methods take their value checks from `nemo_adapt.validation`.
Each side is imported alone in a fresh interpreter, and what else it pulled in is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nemo_adapt

PEFT_MODULES = sorted(f"nemo_adapt.peft.{p.stem}" for p in (Path(nemo_adapt.__file__).parent / "peft").glob("*.py")
                      if p.stem != "__init__")


def _imported_after(*modules: str) -> set[str]:
    code = (f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nemo_adapt'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_no_peft_module_imports_the_recipe_schema():
    assert len(PEFT_MODULES) >= 8  # base, every method, virtual_tokens
    loaded = _imported_after(*PEFT_MODULES)
    assert set(PEFT_MODULES) <= loaded
    assert not {m for m in loaded if m == "nemo_adapt.config" or m.startswith("nemo_adapt.config.")}, loaded


def test_the_recipe_schema_imports_alone():
    loaded = _imported_after("nemo_adapt.config.schema")
    assert "nemo_adapt.peft.base" in loaded and "nemo_adapt.validation" in loaded
