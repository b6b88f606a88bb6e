"""Sequence parallelism on CPU over gloo (torchrun): TP2 with `parallel.sequence_parallel=true` runs
Megatron-Core's own SP path (sequence-sharded activations, all-gather / reduce-scatter around the
TP linears, norm gradients summed over TP) and trains exactly as TP2 without it, on packed rows."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import torchrun, train_losses, write_tiny_recipe

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
RUN = "-m nemo_adapt.cli"
# The tiny task's examples are 59 tokens: at the recipe's 64 positions a row holds one, at 128 two,
# so packing (several examples per row, attention kept within each) is really exercised.
SEQ_LENGTH = 128


def _run_tp2(tmp_path: Path, name: str, data, env, sequence_parallel: bool, peft: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    recipe = write_tiny_recipe(d, data, parallel={"tensor": 2, "sequence_parallel": sequence_parallel}, peft=peft)
    torchrun(2, RUN, "run", str(recipe), f"data.seq_length={SEQ_LENGTH}", env=env)
    return d / "run"


def _check_run_layout(run_dir: Path, sequence_parallel: bool, method: str) -> None:
    """What the run actually resolved and did: TP2 (SP on or off) on one DP rank, packed rows."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["parallel"]["tensor"] == 2 and cfg["parallel"]["sequence_parallel"] is sequence_parallel
    assert cfg["peft"]["method"] == method
    assert cfg["data"]["seq_length"] == SEQ_LENGTH and cfg["data"]["packing"] is True
    results = json.loads((run_dir / "results.json").read_text())
    assert {k: results["layout"][k] for k in ("tensor", "pipeline", "data")} == {"tensor": 2, "pipeline": 1, "data": 1}
    assert results["megatron"]["sequence_parallel"] is sequence_parallel  # what Megatron's config says
    train = results["data"]["stats"]["train"]
    assert train["rows"] < train["examples"], f"rows hold one example each, packing not exercised: {train}"


@pytest.mark.parametrize("peft", [{}, {"method": "none"}], ids=["lora", "full"])
def test_sequence_parallel_losses_match_tp2_without_it(tmp_path, tiny_data, cache_env, peft):
    """5 steps at TP2 with and without sequence parallelism: per-step losses within 1e-4."""
    method = peft.get("method", "lora")
    ref_dir = _run_tp2(tmp_path, "tp2", tiny_data, cache_env, False, peft)
    sp_dir = _run_tp2(tmp_path, "tp2_sp", tiny_data, cache_env, True, peft)
    _check_run_layout(ref_dir, False, method)
    _check_run_layout(sp_dir, True, method)

    ref, got = train_losses(ref_dir), train_losses(sp_dir)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4, 5]
    assert ref[5] < ref[1], f"training did not reduce the loss: {ref}"
    for step, value in ref.items():
        assert abs(got[step] - value) <= 1e-4, f"{method} step {step}: SP {got[step]} vs no SP {value}"
