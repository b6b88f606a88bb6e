"""`bench/gpu_check.py --reduced`: the one-GPU check's code paths at tiny scale on the CPU, in CI.

What only a GPU run proves (Transformer Engine's THD attention, fused kernels, FP8, CUDA sampling, real
throughput) is not proven here; this keeps the script runnable and its checks able to fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def test_reduced_gpu_check_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--reduced", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "NEMO_ADAPT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["reduced"] is True and r["gpu"] is None

    a = r["a_packed_isolation"]
    assert a["backend"] == "local_block_diagonal_mask" and a["dtype"] == "bf16"
    assert a["max_abs_logit_diff_packed_vs_alone"] <= a["tolerance"] < a["max_abs_logit_diff_without_isolation"]
    assert a["passed"] is True

    b = r["b_main_job"]
    assert b["status"] == "ran" and b["precision"] == "bf16" and b["steps"] == 4 and b["n"] == 8
    assert 0.0 <= b["exact_match"] <= 1.0 and b["tokens_seen"] > 0

    c = r["c_lora_throughput"]
    assert c["tokens_per_s_per_gpu"] > 0 and c["recompute"] == "selective" and c["gpu"] == "cpu"
    assert c["mfu"] is None and c["planner"] is None  # no catalog entry for a CPU: nothing invented

    d = r["d_sampling"]
    assert d["passed"] and d["same_seed_same_tokens"] and d["in_vocabulary"] and d["tokens"] == [16, 16]
    assert "| (a) packed-row isolation, bf16 | pass |" in proc.stdout


def test_throughput_check_reports_mfu_next_to_the_planner_for_a_catalog_gpu(monkeypatch):
    """The GPU-only branch of (c), on CPU numbers: MFU = measured tokens/s x model FLOPs/token / peak."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    from nemo_adapt.parallel import runtime
    from nemo_adapt.planner.gpus import get_gpu

    h200 = get_gpu("h200-141gb")
    monkeypatch.setattr(gpu_check, "_catalog_gpu", lambda: h200)
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    c = gpu_check.check_lora_throughput(reduced=True)
    assert c["planner"]["gpu"] == "h200-141gb" and c["planner"]["tokens_per_s_per_gpu"] > 0
    assert 0 < c["mfu"] < 1e-3  # a CPU against an H200's peak
    assert c["measured_over_planner"] == pytest.approx(c["tokens_per_s_per_gpu"] / c["planner"]["tokens_per_s_per_gpu"],
                                                       rel=0.02)
