"""Every recipe in recipes/ loads and validates, names registered things, says how to use it, and passes
`nemo-adapt launch --dry-run` on its own `cluster:` section (the trainer's recipe checks and the planner).

A new recipe is picked up by file name; nothing here needs editing when one is added.
"""

import os
import re
from pathlib import Path

import pytest

from nemo_adapt.config import load_recipe
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.planner.gpus import get_gpu

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

_HARDWARE_LINE = re.compile(r"(?i)\b(sized for|hardware)\b.*\b(gpus?|cpus?|nodes?|[abh]\d{2,3}|gb\d{3})\b")
_LAUNCH_LINE = re.compile(r"(?i)\blaunch\b.*?:\s*(sbatch|srun|torchrun|nemo-adapt|python)\b")


def _header(path: Path) -> list[str]:
    """The comment lines the file starts with, without the leading `#`."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_recipes_exist():
    assert RECIPES, f"no recipes in {RECIPES_DIR}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    cfg = load_recipe(path)
    get_model_spec(cfg.model.name)  # KeyError names the registered models
    if cfg.cluster.gpu is not None:
        get_gpu(cfg.cluster.gpu)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_file_name_starts_with_model(path):
    cfg = load_recipe(path)
    assert path.stem.startswith(cfg.model.name), (
        f"{path.name}: recipes are named <model>_<size>_<method>.yaml; this one trains {cfg.model.name}")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_says_what_where_how(path):
    header = _header(path)
    assert len(header) >= 3, f"{path.name}: start with a comment header (what it trains, hardware, launch command)"
    cfg = load_recipe(path)
    first = _squash(header[0])
    assert _squash(cfg.model.name) in first, (
        f"{path.name}: the first header line should name the model ({cfg.model.name}): {header[0]!r}")
    method = "full" if cfg.peft.method == "none" else cfg.peft.method
    assert _squash(method) in first, (
        f"{path.name}: the first header line should name the method ({method}): {header[0]!r}")
    assert any(_HARDWARE_LINE.search(line) for line in header), (
        f"{path.name}: the header needs a line naming the hardware, e.g. '# Sized for: 1 node x 8 H100-80GB'")
    assert any(_LAUNCH_LINE.search(line) for line in header), (
        f"{path.name}: the header needs a launch command, e.g. '# Launch: sbatch launch/lora_70b.sh'")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_passes_launch_dry_run(path, monkeypatch, capsys):
    """On this machine (no GPU, no data or checkpoint files): the trainer's checks against the recipe's cluster
    (GPU type, the default image, nodes x GPUs), the planner's memory check for GPU recipes, the rendered
    script and the commands it runs."""
    from nemo_adapt.cli import main

    for key in [k for k in os.environ if k.startswith("NEMO_ADAPT_")]:
        monkeypatch.delenv(key)  # the calling shell's image or GPUs per node must not decide
    code = main(["launch", "--dry-run", str(path)])
    out = capsys.readouterr()
    assert code == 0, f"{path.name}: {out.err}"
    cfg = load_recipe(path)
    assert f"#SBATCH --nodes={cfg.cluster.nodes}" in out.out
    assert f"--nproc-per-node={cfg.cluster.gpus_per_node}" in out.out
    if cfg.cluster.gpu is not None:
        assert "# planner: layout" in out.err and " fits: " in out.err
