"""Worker launched by `torchrun` in the planner allocation test: build a model stage the way training
does (model, PEFT transform, Megatron DDP, Megatron optimizer), take one optimizer step so Adam's
state exists, and write what this rank really holds — weights, gradient buffers, optimizer state — in
bytes, next to the planner's estimate for the same stage.

Usage: torchrun --standalone --nproc-per-node N alloc_worker.py --out DIR CASE [CASE ...]
where CASE is `model:tpT:ppP:method[:distopt]` (data parallel = N / (T * P)), e.g. tiny_llama:tp2:pp1:lora.
"""

import argparse
import json
from pathlib import Path

import torch


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the Megatron optimizer keeps per parameter (Adam moments, fp32 master
    copies), excluding the scalar step counters."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    total = 0
    seen: set[int] = set()
    for opt in inner:
        for state in opt.optimizer.state.values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and id(value) not in seen:
                    seen.add(id(value))
                    total += value.numel() * value.element_size()
        # Mixed precision keeps fp32 master copies of bf16 parameters (none in fp32 training).
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(opt, attr, None) or []:
                total += sum(p.numel() * p.element_size() for p in group)
    return total


def measure(case: str, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from nemo_adapt.config.schema import RecipeConfig
    from nemo_adapt.models.builder import BuildOptions, build_model
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft, peft_config_class
    from nemo_adapt.planner.memory import Layout, estimate_memory
    from nemo_adapt.training import engine

    model_name, tp, pp, method, *flags = case.split(":")
    tp, pp = int(tp.removeprefix("tp")), int(pp.removeprefix("pp"))
    distopt = "distopt" in flags
    info = runtime.initialize(runtime.ParallelLayout(tensor=tp, pipeline=pp), seed=0)
    spec = get_model_spec(model_name)
    cfg = RecipeConfig()
    cfg.peft = peft_config_class(method)(method=method)
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    cfg.parallel.distributed_optimizer = distopt

    model = build_model(spec, tp, pp, options=BuildOptions(params_dtype=torch.float32))
    apply_peft(model, cfg.peft, seed=0)
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # Adam allocates its moments on the first step

    actual = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers),
        "optimizer": optimizer_state_bytes(optimizer),
    }
    peft_args = {} if method == "none" else {"rank": cfg.peft.rank, "target_modules": tuple(cfg.peft.target_modules)}
    layout = Layout(tp=tp, pp=pp, dp=info.data_parallel, distributed_optimizer=distopt)
    est = estimate_memory(spec, layout, method, seq_length=64, global_batch_size=info.data_parallel,
                          precision="fp32", peft_args=peft_args)
    stage = ps.get_pipeline_model_parallel_rank()
    mem = next(s for s in est.stages if s.stage == stage)
    estimated = {"weights": mem.frozen_weights + mem.trainable_weights, "gradients": mem.gradients,
                 "optimizer": mem.optimizer}
    (out / f"{case}.rank{info.rank}.json").write_text(json.dumps(
        {"case": case, "rank": info.rank, "stage": stage, "tp_rank": ps.get_tensor_model_parallel_rank(),
         "dp_rank": info.dp_rank, "data_parallel": info.data_parallel, "actual": actual, "estimated": estimated}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()
    from nemo_adapt.parallel import runtime

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        measure(case, out)
    runtime.shutdown()


if __name__ == "__main__":
    main()
