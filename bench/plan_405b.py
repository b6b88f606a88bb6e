"""Time `plan` for Llama-3.1 405B on 128 nodes x 8 H100 (1,024 GPUs), the issue's 2-second budget.

    PYTHONPATH=. python bench/plan_405b.py

Prints the wall time of each search next to the budget and the ratio; never asserts on time.
Also times a wider search (Llama-3 70B on 64 nodes, whose 80 layers admit many more PP/VP splits).
"""

from __future__ import annotations

import statistics
import time

from nemo_adapt.planner import PlanRequest, plan

BUDGET_S = 2.0
"""Acceptance budget for one `plan` call (issue text)."""

CASES = [
    ("llama31_405b LoRA r16, 128 x 8 h100, seq 4096, GBS 512",
     PlanRequest(model="llama31_405b", method="lora", gpu="h100-80gb", nodes=128, gpus_per_node=8,
                 seq_length=4096, global_batch_size=512, precision="fp8")),
    ("llama31_405b full FT, 128 x 8 h100, seq 4096, GBS 512",
     PlanRequest(model="llama31_405b", method="none", gpu="h100-80gb", nodes=128, gpus_per_node=8,
                 seq_length=4096, global_batch_size=512, precision="fp8")),
    ("llama3_70b full FT, 64 x 8 h100, seq 4096, GBS 512 (wide search)",
     PlanRequest(model="llama3_70b", method="none", gpu="h100-80gb", nodes=64, gpus_per_node=8,
                 seq_length=4096, global_batch_size=512, precision="fp8")),
]


def main(repeats: int = 3) -> None:
    print(f"{'case':<66} {'layouts':>8} {'fit':>6} {'median s':>9} {'budget s':>9} {'ratio':>6}  best layout")
    for name, request in CASES:
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = plan(request)
            times.append(time.perf_counter() - start)
        med = statistics.median(times)
        best = result.best
        best_txt = (f"{best.layout.label()} ~{best.perf.tokens_per_s_per_gpu:,.0f} tok/s/GPU, "
                    f"{best.fit.required_gib:.1f} GiB") if best else (
            f"none fits (closest over by {-result.infeasible[0].fit.headroom_gib:.1f} GiB)")
        print(f"{name:<66} {result.considered:>8} {len(result.ranked):>6} {med:9.3f} {BUDGET_S:9.1f} "
              f"{med / BUDGET_S:6.2f}  {best_txt}")


if __name__ == "__main__":
    main()
