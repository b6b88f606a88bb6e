"""`nemo-adapt plan`: size a fine-tuning job before launching it.

    nemo-adapt plan recipes/llama3_70b_lora.yaml                       # hardware from the recipe
    nemo-adapt plan recipes/llama3_70b_full.yaml --nodes 1             # what if only one node?
    nemo-adapt plan --model llama31_405b --method lora --gpu h100 --nodes 128 --gpus-per-node 8 --json

Exit codes: 0 the recipe's layout (or, without one, some layout) fits; 1 it does not, or it breaks a
constraint; 2 bad input (unknown GPU/model, impossible request), printed as one line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from nemo_adapt.errors import ConfigError
from nemo_adapt.planner.memory import PRECISIONS, MemoryAssumptions
from nemo_adapt.planner.search import Candidate, PlanRequest, PlanResult, plan, request_from_recipe


def register(subparsers) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser(
        "plan", help="rank parallel layouts by estimated throughput; check a recipe's layout fits",
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("recipe", nargs="?", help="recipe YAML (model, peft, parallel, data, train, cluster)")
    p.add_argument("--model", help="registered model name (instead of a recipe, or to override it)")
    p.add_argument("--method", help="none (full fine-tuning) or a registered PEFT method (lora, dora, ...; a "
                   "wrong name is answered with the list)")
    p.add_argument("--rank", type=int, help="LoRA/DoRA rank")
    p.add_argument("--gpu", help="GPU type: a100-40gb, a100-80gb, h100-80gb, h200-141gb, b200, gb200")
    p.add_argument("--nodes", type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--precision", choices=PRECISIONS, help="training precision")
    p.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="main-gradient dtype (fp32: 18 B/param accounting; bf16: grad_reduce_in_fp32=False)")
    p.add_argument("--top", type=int, default=10, help="ranked layouts to show (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _request(args: argparse.Namespace) -> PlanRequest:
    memory = MemoryAssumptions(grad_dtype=args.grad_dtype)
    peft_over = {"rank": args.rank} if args.rank else {}
    if args.recipe:
        req = request_from_recipe(args.recipe, gpu=args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  seq_length=args.seq_len, global_batch_size=args.global_batch,
                                  precision=args.precision, memory=memory)
        changes = {}
        if args.model:
            changes["model"] = args.model
        if args.method:
            changes["method"] = args.method
            changes["peft_args"] = dict(peft_over)
        elif peft_over:
            changes["peft_args"] = {**req.peft_args, **peft_over}
        if changes:
            req = replace(req, **changes)
        return req
    missing = [flag for flag, value in (("--model", args.model), ("--gpu", args.gpu), ("--nodes", args.nodes),
                                        ("--gpus-per-node", args.gpus_per_node)) if value is None]
    if missing:
        raise ConfigError(f"without a recipe, pass {', '.join(missing)}")
    return PlanRequest(model=args.model, gpu=args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       seq_length=args.seq_len or 4096, global_batch_size=args.global_batch or 32,
                       method=args.method or "none", peft_args=peft_over, precision=args.precision or "bf16",
                       memory=memory)


def run(args: argparse.Namespace) -> int:
    """Run the planner and print the plan; returns the exit code."""
    result = plan(_request(args))
    if args.json:
        print(json.dumps(result.to_dict(top=args.top), indent=2))
    else:
        print(format_plan(result, top=args.top))
    return 0 if result.ok else 1


# --------------------------------------------------------------------------------------------------
# Text rendering
# --------------------------------------------------------------------------------------------------


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_breakdown(cand: Candidate) -> list[str]:
    """Per-stage memory table and the step-time estimate of one candidate."""
    mem = cand.fit.breakdown
    cols = ("frozen_weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "overhead",
            "total")
    heads = ("frozen", "weights", "grads", "optim", "activ", "logits", "overhead", "total")
    lines = ["    per GPU, GiB   " + "".join(f"{h:>9}" for h in heads) + "   in-flight layer-microbatches"]
    for st in mem.stages:
        if mem.layout.pp == 1:
            name = "only"
        else:
            name = "first" if st.stage == 0 else "last" if st.stage == mem.layout.pp - 1 else "middle"
        terms = st.terms_gib()
        lines.append(f"    stage {st.stage:<3}{name:>6}" + "".join(f"{terms[c]:9.2f}" for c in cols)
                     + f"   {st.inflight_layers:.4g}")
    pe = cand.perf
    lines.append(f"    step {pe.step_time_s:.2f} s = compute {pe.compute_s:.2f} + bubble {pe.bubble_s:.2f} "
                 f"({pe.bubble_fraction:.1%}) + TP {pe.tp_comm_s:.2f} + CP {pe.cp_comm_s:.2f} + PP {pe.pp_comm_s:.2f} "
                 f"+ DP {pe.dp_comm_s:.2f} + optimizer {pe.optimizer_s:.2f}")
    lines.append(f"    {pe.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, {pe.model_tflops_per_gpu:,.0f} model TFLOP/s/GPU, "
                 f"MFU {pe.mfu:.1%}; activations {mem.activation_per_layer / 2**30:.3f} GiB per layer per "
                 f"micro-batch, {mem.microbatches} micro-batches/step")
    lines += [f"    note: {n}" for n in mem.notes]
    return lines


def _non_default(method: str, args: dict) -> dict:
    """The method arguments that differ from the method's config defaults (what the header needs to say)."""
    from nemo_adapt.peft.base import peft_config_class

    defaults = peft_config_class(method)()
    out = {}
    for k, v in args.items():
        default = getattr(defaults, k, None)
        if (list(v) if isinstance(v, tuple) else v) != (list(default) if isinstance(default, tuple) else default):
            out[k] = ",".join(map(str, v)) if isinstance(v, list | tuple) else v
    return out


def format_plan(result: PlanResult, top: int = 10) -> str:
    """Human-readable plan: header, the recipe's layout, the ranking, what does not fit and why."""
    req, spec, gpu = result.request, result.model, result.gpu
    method = req.method if req.method != "none" else "full fine-tuning"
    args = ", ".join(f"{k}={v}" for k, v in _non_default(req.method, req.peft_args).items())
    lines = [
        f"Plan for {spec.name} · {method}{f' ({args})' if args else ''} · {req.precision} · seq {req.seq_length} "
        f"· global batch {req.global_batch_size}",
        f"Cluster: {req.nodes} node(s) x {req.gpus_per_node} {gpu.name} = {result.world_size} GPUs, "
        f"{gpu.memory_gib:.1f} GiB each" + (f" · recipe {req.source}" if req.source else ""),
        f"Parameters: {_count(result.total_params)} total, {_count(result.trainable_params)} trainable "
        f"({result.trainable_params / result.total_params:.3%})",
        "",
    ]
    if req.layout is not None:
        lines.append(f"Recipe layout {req.layout.label()}")
        if result.explicit_error:
            lines.append(f"  INVALID: {result.explicit_error}")
        elif result.explicit is not None:
            # The reason starts with the verdict ("fits: ..." / "does not fit: ..."); shout the bad one.
            reason = result.explicit.fit.reason
            lines.append(f"  {reason if result.explicit.fits else reason.replace('does not fit', 'DOES NOT FIT', 1)}")
            lines += format_breakdown(result.explicit)
        lines.append("")

    if result.ranked:
        lines.append(f"Layouts that fit, fastest first ({len(result.ranked)} fit; showing {min(top, len(result.ranked))}):")
        lines.append(f"  {'#':>3} {'TP':>3} {'PP':>3} {'VP':>3} {'CP':>3} {'DP':>4} {'MBS':>4} {'SP':>3} {'recomp':>7} "
                     f"{'DO':>3} {'GiB/GPU':>8} {'tok/s/GPU':>10} {'MFU':>6} {'step s':>7} {'bubble':>7}")
        for i, c in enumerate(result.ranked[:top], 1):
            lay, pe = c.layout, c.perf
            lines.append(
                f"  {i:>3} {lay.tp:>3} {lay.pp:>3} {lay.vp:>3} {lay.cp:>3} {lay.dp:>4} {lay.micro_batch_size:>4} "
                f"{'y' if lay.sp else '-':>3} {lay.recompute:>7} "
                f"{'y' if lay.distributed_optimizer and lay.dp * lay.cp > 1 else '-':>3} "
                f"{c.fit.required_gib:8.1f} {pe.tokens_per_s_per_gpu:10,.0f} {pe.mfu:6.1%} {pe.step_time_s:7.2f} "
                f"{pe.bubble_fraction:7.1%}")
        if req.layout is None:
            lines.append("")
            lines.append(f"Best layout {result.ranked[0].layout.label()}:")
            lines += format_breakdown(result.ranked[0])
    else:
        lines.append(f"NO LAYOUT FITS on {result.world_size} x {gpu.name}: all {result.considered} valid layouts "
                     "exceed the GPU memory.")
        if result.infeasible:
            closest = result.infeasible[0]
            lines.append(f"Closest: {closest.layout.label()}: {closest.fit.reason}")
            lines += format_breakdown(closest)
    if result.infeasible:
        lines.append("")
        shown = min(5, len(result.infeasible))
        lines.append(f"Valid layouts that do not fit: {len(result.infeasible)} (closest {shown}):")
        for c in result.infeasible[:shown]:
            lines.append(f"  {c.layout.label()}: {c.fit.reason}")
    if result.rejected:
        pruned = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
        lines.append(f"Choices pruned by constraint: {pruned}")
    m, p = req.memory, req.perf
    lines.append(
        f"Assumptions: overhead {m.fixed_overhead_gib:g} GiB + {m.overhead_fraction:.0%} of tensors; grads {m.grad_dtype}; "
        f"flash attention {'on' if m.flash_attention else 'off'}; GEMM efficiency "
        f"{p.gemm_efficiency[req.precision]:.0%} of dense {req.precision} peak; exposed comm TP {p.tp_comm_exposed:.0%} "
        f"CP {p.cp_comm_exposed:.0%} PP {p.pp_comm_exposed:.0%} DP {p.dp_comm_exposed:.0%} (see docs/planner.md)")
    lines += [f"Note: {n}" for n in result.notes]
    lines.append(f"Planned {result.considered} layouts in {result.elapsed_s:.2f} s.")
    return "\n".join(lines)

