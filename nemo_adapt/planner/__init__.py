"""Parallelism planner and memory estimator: which Megatron-Core layout fits, and how fast it runs.

    from nemo_adapt.planner import PlanRequest, plan
    result = plan(PlanRequest(model="llama3_70b", method="lora", gpu="h100", nodes=1, gpus_per_node=8))
    result.best.layout, result.best.perf.tokens_per_s_per_gpu

Arithmetic: gpus.py (catalog), memory.py (per-GPU memory; PEFT parameter counts come from the methods
themselves, `PeftMethod.parameter_counts`, so planning a PEFT method imports the PEFT registry and PyTorch),
perf.py (step time), search.py (constraints, enumeration, ranking), cli.py (`nemo-adapt plan`).
"""

from nemo_adapt.planner.gpus import GPUSpec, get_gpu, list_gpus
from nemo_adapt.planner.memory import (
    FitReport,
    Layout,
    LayoutDoesNotFitError,
    MemoryAssumptions,
    MemoryBreakdown,
    activation_bytes_per_layer,
    check_fits,
    estimate_memory,
    peft_param_breakdown,
    peft_trainable_params,
)
from nemo_adapt.planner.perf import PerfAssumptions, PerfEstimate, estimate_step_time, flops_per_token
from nemo_adapt.planner.search import (
    Candidate,
    PlanRequest,
    PlanResult,
    check_layout,
    evaluate_layout,
    plan,
    request_from_recipe,
)

__all__ = [
    "Candidate", "FitReport", "GPUSpec", "Layout", "LayoutDoesNotFitError", "MemoryAssumptions",
    "MemoryBreakdown", "PerfAssumptions", "PerfEstimate", "PlanRequest", "PlanResult",
    "activation_bytes_per_layer", "check_fits", "check_layout", "estimate_memory", "estimate_step_time",
    "evaluate_layout", "flops_per_token", "get_gpu", "list_gpus", "peft_param_breakdown", "peft_trainable_params",
    "plan", "request_from_recipe",
]
