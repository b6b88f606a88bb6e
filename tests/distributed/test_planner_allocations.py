"""The planner's memory terms against what training really allocates, per rank, on CPU (fp32).

For each case, `alloc_worker.py` builds the stage as `nemo-adapt run` does (model, PEFT transform,
Megatron DDP, Megatron optimizer, one optimizer step so Adam's moments exist) and sums tensor sizes:
parameters (weights), DDP gradient buffers (gradients), optimizer state (Adam moments, plus fp32
master copies under mixed precision). The planner's `estimate_memory` for the same model, method and
layout must agree within 5% on each term. fp32 accounting: weights 4 B/param (the master copy),
gradients 4 B per trainable param, Adam 8 B per trainable param (/DP with the distributed optimizer).

SmolLM2-135M has 9 attention heads, so its tensor-parallel case is TP3 (TP2 cannot split it).
"""

import json
from pathlib import Path

import pytest

from tests.conftest import torchrun

WORKER = Path(__file__).with_name("alloc_worker.py")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]
TERMS = ("weights", "gradients", "optimizer")

# (ranks, cases): a case is model:tpT:ppP:method[:distopt]; data parallel = ranks / (T * P).
LAUNCHES = (
    (1, ("tiny_llama:tp1:pp1:lora", "tiny_llama:tp1:pp1:none", "smollm2_135m:tp1:pp1:lora")),
    (2, ("tiny_llama:tp2:pp1:lora", "tiny_llama:tp2:pp1:none", "tiny_llama:tp1:pp2:lora",
         "tiny_llama:tp1:pp2:none", "tiny_llama:tp1:pp1:none:distopt", "smollm2_135m:tp1:pp2:lora")),
    (3, ("smollm2_135m:tp3:pp1:lora",)),
)


@pytest.fixture(scope="module")
def allocations(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("alloc")
    for ranks, cases in LAUNCHES:
        torchrun(ranks, WORKER, "--out", str(out), *cases)
    found: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        found.setdefault(r["case"], []).append(r)
    return found


@pytest.mark.parametrize("case", [c for _, cases in LAUNCHES for c in cases])
def test_estimate_matches_allocation_within_5_percent(allocations, case):
    ranks = allocations[case]
    expected_ranks = next(n for n, cases in LAUNCHES if case in cases)
    assert len(ranks) == expected_ranks
    for r in ranks:
        for term in TERMS:
            actual, estimated = r["actual"][term], r["estimated"][term]
            assert actual > 0, (case, r["rank"], term)
            assert abs(estimated - actual) <= 0.05 * actual, (
                f"{case} rank {r['rank']} (stage {r['stage']}): {term} estimated {estimated:.0f} B, "
                f"allocated {actual} B ({100 * (estimated / actual - 1):+.2f}%)")


def test_distributed_optimizer_shards_state_over_data_parallel(allocations):
    """Full fine-tuning: at DP2 the distributed optimizer holds about half the DP1 optimizer state per rank."""
    dp1 = allocations["tiny_llama:tp1:pp1:none"][0]["actual"]["optimizer"]
    dp2 = [r["actual"]["optimizer"] for r in allocations["tiny_llama:tp1:pp1:none:distopt"]]
    print(f"\noptimizer state per rank, full fine-tuning of tiny_llama: DP1 {dp1} B; "
          f"DP2 distributed optimizer {dp2} B ({max(dp2) / dp1:.3f}x)")
    assert all(r["data_parallel"] == 2 for r in allocations["tiny_llama:tp1:pp1:none:distopt"])
    # Megatron pads the flat gradient buffer to a multiple of the DP size (and bucket alignment),
    # so each shard is half of a slightly padded total.
    assert max(dp2) <= 0.51 * dp1
    assert sum(dp2) >= dp1
