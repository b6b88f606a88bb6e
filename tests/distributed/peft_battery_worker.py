"""Worker of the shared PEFT battery, launched once per layout by `test_peft_battery.py` (torchrun).

For every case of `peft_cases.PEFT_CASES` (or those named with --cases), at one TP/PP layout:

1. base logits of `random:tiny_llama`, then the method applied; step-0 logits (must equal the base
   for every method here) and logits under `adapters_disabled`;
2. 3 optimizer steps on fixed synthetic batches with the real engine pieces (Megatron DDP, optimizer,
   pipeline schedule); an adapter-only checkpoint after step 2; the 3 losses;
3. after training: logits under `adapters_disabled` (base again), and for mergeable methods logits
   after merge and after unmerge;
4. trainable parameters on this rank, and the adapter artifact (safetensors, TP-gathered);
   greedy generation of a few tokens (KV cache, pipeline p2p);
5. with --resume-from: a fresh model at this layout loads that directory's step-2 checkpoint of the
   same case (saved at another layout) and runs step 3: its loss.

Each rank writes `<out>/rank<r>.json` with what it knows (logit comparisons on the last stage only).

Usage: torchrun --standalone --nproc-per-node N peft_battery_worker.py --tp T --pp P --out DIR
       [--resume-from DIR] [--cases id,id]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

SEQ, MBS, GBS, STEPS, SAVE_AFTER = 32, 2, 4, 3, 2
PROMPTS = [[5, 17, 33, 9, 12], [40, 41, 42]]
NEW_TOKENS = 4


def batches(step: int) -> list[dict]:
    """The global batch of step `step` (DP=1 everywhere), as MBS-row micro-batches."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(3, 100, (GBS, SEQ + 1), generator=g)
    loss_mask = torch.zeros(GBS, SEQ)
    loss_mask[:, SEQ // 2:] = 1  # answer tokens: the second half
    rows = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(GBS, -1).contiguous(),
            "segment_ids": torch.ones(GBS, SEQ, dtype=torch.long)}
    return [{k: v[i:i + MBS] for k, v in rows.items()} for i in range(0, GBS, MBS)]


def recipe(case, tp: int, pp: int):
    from nemo_adapt.config.schema import RecipeConfig
    from tests.distributed.peft_cases import peft_config

    cfg = RecipeConfig()
    cfg.peft = peft_config(case)
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    cfg.train.global_batch_size, cfg.train.micro_batch_size = GBS, MBS
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps = 0.01, "constant", 0
    return cfg


def build(cfg):
    """A fresh adapted model, its DDP wrapper and optimizer, and the base logits before the method."""
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.training import engine

    model, source = load_model("random:tiny_llama", "tiny_llama")
    model.config.calculate_per_token_loss = True
    base = logits(model, source.spec)
    apply_peft(model, cfg.peft, seed=7)
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg)
    engine.connect_schedule_hooks(ddp, optimizer)
    return model, source.spec, ddp, optimizer, base


def logits(model, spec):
    from nemo_adapt.generation.generate import forward_logits

    tokens = torch.tensor([PROMPTS[0] + PROMPTS[1]])
    return forward_logits(model, tokens, spec.vocab_size, spec.hidden_size)


def max_diff(a, b):
    return None if a is None or b is None else float((a - b).abs().max())


def save(run_dir: Path, ddp, optimizer, step: int, method: str, tp: int, pp: int):
    from nemo_adapt.training import checkpoint as ckpt

    state = ckpt.TrainState(step=step, consumed_samples=step * GBS, epoch=0, tokens_seen=0,
                            layout={"tensor": tp, "pipeline": pp, "data": 1}, peft_method=method,
                            data_fingerprint="battery", base_model_fingerprint="random:tiny_llama", seed=7)
    ckpt.save_checkpoint(run_dir, ddp, optimizer, state, trainable_only=True, keep_last=1)


def run_case(case, tp: int, pp: int, out: Path, resume_from: Path | None) -> dict:
    from megatron.core import parallel_state as ps

    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.generation.generate import SamplingParams, generate
    from nemo_adapt.peft.base import adapters_disabled, trainable_parameters
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import engine

    cfg = recipe(case, tp, pp)
    model, spec, ddp, optimizer, base = build(cfg)
    rec: dict = {"step0_vs_base": max_diff(logits(model, spec), base)}
    losses = []
    for step in range(STEPS):
        if step == SAVE_AFTER:
            save(out / case.id, ddp, optimizer, step, case.peft["method"], tp, pp)
        loss, _, updated = engine.train_step(ddp, optimizer, batches(step), SEQ, MBS, cfg.optim.lr)
        assert updated
        losses.append(loss)
    rec["losses"] = losses
    rec["trainable_rank"] = trainable_parameters(model)
    rec["trainable_unique"] = trainable_parameters(model, unique=True)
    rec["layers_local"] = len(model.decoder.layers)
    rec["first_stage"] = ps.is_pipeline_first_stage()
    # Adapter artifact (TP-gathered, global names): must be the same file at every layout.
    save_adapter(model, out / case.id / "artifact", cfg.peft, {"base_model": "tiny_llama"})
    trained = logits(model, spec)
    with adapters_disabled(model):
        rec["disabled_vs_base"] = max_diff(logits(model, spec), base)
    rec["trained_vs_base"] = max_diff(trained, base)
    if case.mergeable:
        merged_layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "adapter_enabled")]
        for m in merged_layers:
            m.merge()
        rec["merged_vs_adapted"] = max_diff(logits(model, spec), trained)
        for m in merged_layers:
            m.unmerge()
        with adapters_disabled(model):
            rec["unmerged_base_vs_base"] = max_diff(logits(model, spec), base)
        rec["unmerged_vs_adapted"] = max_diff(logits(model, spec), trained)
    if case.generation:
        eos = {spec.eos_token_id} if spec.eos_token_id is not None else set()
        rec["generated"] = generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS), eos,
                                    spec.vocab_size, spec.hidden_size)
    if resume_from is not None:
        fresh, _, ddp2, opt2, _ = build(cfg)
        path = ckpt.latest_checkpoint(resume_from / case.id)
        state = ckpt.load_checkpoint(path, ddp2, opt2, trainable_only=True, same_layout=False)
        loss, _, _ = engine.train_step(ddp2, opt2, batches(state.step), SEQ, MBS, cfg.optim.lr)
        rec["resumed"] = {"from": str(resume_from), "step": state.step + 1, "loss": loss}
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    args = ap.parse_args()

    from nemo_adapt.parallel import runtime
    from tests.distributed.peft_cases import PEFT_CASES, case_by_id

    cases = [case_by_id(c) for c in args.cases.split(",")] if args.cases else PEFT_CASES
    runtime.initialize(runtime.ParallelLayout(tensor=args.tp, pipeline=args.pp), seed=7)
    out = Path(args.out)
    resume = Path(args.resume_from) if args.resume_from else None
    results = {}
    for case in cases:
        runtime.seed_all(7)
        results[case.id] = run_case(case, args.tp, args.pp, out, resume)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
