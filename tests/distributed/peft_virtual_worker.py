"""Worker of the virtual-token PEFT tests (prompt tuning, p-tuning, prefix tuning), launched once per
layout by `test_peft_virtual.py` (torchrun). Same shape as the shared battery's worker.

For every case of `VIRTUAL_CASES` (or those named with --cases), at one TP/PP layout:

1. base logits of `random:tiny_llama`, then the method applied; logits under `adapters_disabled`
   (must equal the base); trainable parameters held by this rank, and summed over the model-parallel
   group (replicated copies once);
2. 3 optimizer steps on fixed synthetic batches (rows with padding, or packed rows for cases marked
   `packed`) through the real engine (Megatron DDP, optimizer, pipeline schedule with the longer
   p2p shapes); an adapter-only checkpoint after step 2; the 3 losses;
3. after training: logits under `adapters_disabled` again (and generation); greedy generation of a
   few tokens (KV cache, pipeline p2p) and the same tokens found without a cache, one full forward
   per token; the logits of one cached decode step vs a full forward;
4. for collapsible cases: logits before and after `collapse`, the count after it, generation and the
   decode-step check again;
5. with --resume-from: a fresh model at this layout loads that directory's step-2 checkpoint of the
   same case (saved at another layout) and runs step 3: its loss.

Each rank writes `<out>/rank<r>.json` (logit comparisons on the last stage only).

Usage: torchrun --standalone --nproc-per-node N peft_virtual_worker.py --tp T --pp P --out DIR
       [--resume-from DIR] [--cases id,id]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.peft_battery_worker import build, logits, max_diff, recipe
from tests.distributed.peft_cases import PeftCase

SEQ, MBS, GBS, STEPS, SAVE_AFTER = 24, 2, 4, 3, 2
PROMPTS = [[5, 17, 33, 9, 12], [40, 41, 42]]
NEW_TOKENS = 3

VIRTUAL_CASES: list[PeftCase] = [
    PeftCase("prompt_tuning", {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "vocab"}),
    PeftCase("p_tuning_mlp", {"method": "p_tuning", "num_virtual_tokens": 4, "encoder": "mlp",
                              "encoder_hidden": 32, "encoder_layers": 3}, extra={"collapse": True}),
    PeftCase("p_tuning_lstm", {"method": "p_tuning", "num_virtual_tokens": 3, "encoder": "lstm",
                               "encoder_hidden": 16}, extra={"collapse": True}),
    # Prefixes keep packing: every example of a packed row attends the prefix.
    PeftCase("prefix_tuning", {"method": "prefix_tuning", "num_prefix_tokens": 4, "reparameterize": False},
             extra={"packed": True}),
    PeftCase("prefix_tuning_mlp", {"method": "prefix_tuning", "num_prefix_tokens": 3, "reparam_hidden": 32},
             extra={"collapse": True, "packed": True}),
]
"""Rows for the virtual-token methods (sizes for tiny_llama: hidden 64, 2 KV groups of width 16, 4 layers)."""


def case_by_id(case_id: str) -> PeftCase:
    for case in VIRTUAL_CASES:
        if case.id == case_id:
            return case
    raise KeyError(f"no case {case_id!r}; have {', '.join(c.id for c in VIRTUAL_CASES)}")


def planner_args(config) -> tuple[str, dict]:
    """The planner's method name and arguments for a typed config (for the closed-form count)."""
    keys = {"prompt_tuning": ("num_virtual_tokens",),
            "p_tuning": ("num_virtual_tokens", "encoder", "encoder_hidden", "encoder_layers"),
            "prefix_tuning": ("num_prefix_tokens", "reparameterize", "reparam_hidden")}[config.method]
    return config.method, {k: getattr(config, k) for k in keys}


def batches(step: int, packed: bool) -> list[dict]:
    """The global batch of step `step` (DP=1 everywhere), as MBS-row micro-batches.

    Unpacked: one example per row, of length SEQ - 3 * row, padded (pad id 0, segment 0, positions
    restarting, no loss). Packed: two examples per row (segments 1 and 2), no padding.
    """
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(3, 100, (GBS, SEQ + 1), generator=g)
    rows = {"tokens": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone(), "loss_mask": torch.zeros(GBS, SEQ),
            "position_ids": torch.arange(SEQ).expand(GBS, -1).clone(),
            "segment_ids": torch.ones(GBS, SEQ, dtype=torch.long)}
    for i in range(GBS):
        if packed:
            cut = SEQ // 2 - 2 + i
            rows["segment_ids"][i, cut:] = 2
            rows["position_ids"][i, cut:] = torch.arange(SEQ - cut)
            rows["loss_mask"][i, cut // 2:cut - 1] = 1
            rows["loss_mask"][i, cut + (SEQ - cut) // 2:SEQ - 1] = 1
            rows["labels"][i, cut - 1] = 0
        else:
            n = SEQ - 3 * i
            rows["loss_mask"][i, n // 2:n - 1] = 1  # answer: the second half of the example
            rows["tokens"][i, n:] = 0
            rows["labels"][i, n - 1:] = 0
            rows["segment_ids"][i, n:] = 0
            rows["position_ids"][i, n:] = torch.arange(SEQ - n)
    return [{k: v[i:i + MBS] for k, v in rows.items()} for i in range(0, GBS, MBS)]


def model_parallel_sum(n: int) -> int:
    from megatron.core import parallel_state as ps

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, group=ps.get_model_parallel_group())
    return int(t.item())


def greedy_without_cache(model, spec, prompt: list[int], k: int) -> list[int]:
    """k greedy tokens, each from a full forward of the whole sequence (no KV cache)."""
    from megatron.core import parallel_state as ps

    seq = list(prompt)
    for _ in range(k):
        lg = logits_of(model, spec, seq)
        nxt = torch.zeros(1, dtype=torch.long)
        if lg is not None:
            nxt[0] = int(lg[0, -1].argmax())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        seq.append(int(nxt[0]))
    return seq[len(prompt):]


def logits_of(model, spec, seq):
    from nemo_adapt.generation.generate import forward_logits

    return forward_logits(model, torch.tensor([seq]), spec.vocab_size, spec.hidden_size)


def generation(model, spec, uncached: bool = True) -> dict:
    from nemo_adapt.generation.generate import SamplingParams, generate

    # No EOS: every prompt generates exactly NEW_TOKENS tokens, comparable with the uncached loop.
    cached = generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS), set(), spec.vocab_size,
                      spec.hidden_size, spec.max_position_embeddings)
    if not uncached:
        return {"cached": cached}
    return {"cached": cached, "uncached": [greedy_without_cache(model, spec, p, NEW_TOKENS) for p in PROMPTS]}


def decode_vs_full(model, spec, prompt: list[int]) -> float | None:
    """Logits of the last prompt token from a KV-cache decode step (after prefilling the rest) vs
    from one full forward: the cached path with virtual tokens / prefixes (None off the last stage)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_adapt.generation.generate import _stage_forward
    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    full = logits_of(model, spec, prompt)
    seq = torch.tensor([[0] * virtual_token_count(model) + list(prompt)])
    s = seq.shape[1]
    dtype = next(model.parameters()).dtype
    model.eval()
    with torch.no_grad():
        ctx = StaticInferenceContext(1, s)
        _stage_forward(model, seq[:, :-1], torch.arange(s - 1).unsqueeze(0), ctx, (s - 1, 1, spec.hidden_size), dtype)
        ctx.increment_sequence_len_offset(s - 1)
        ctx.enable_decode_mode()
        out = _stage_forward(model, seq[:, -1:], torch.tensor([[s - 1]]), ctx, (1, 1, spec.hidden_size), dtype)
    model.train()
    return None if out is None else float((out[0, -1, :spec.vocab_size].float() - full[0, -1]).abs().max())


def save(run_dir: Path, ddp, optimizer, step: int, method: str, tp: int, pp: int):
    from nemo_adapt.training import checkpoint as ckpt

    state = ckpt.TrainState(step=step, consumed_samples=step * GBS, epoch=0, tokens_seen=0,
                            layout={"tensor": tp, "pipeline": pp, "data": 1}, peft_method=method,
                            data_fingerprint="virtual", base_model_fingerprint="random:tiny_llama", seed=7)
    ckpt.save_checkpoint(run_dir, ddp, optimizer, state, trainable_only=True, keep_last=1)


def run_case(case, tp: int, pp: int, out: Path, resume_from: Path | None) -> dict:
    from nemo_adapt.peft.base import adapters_disabled, trainable_parameters
    from nemo_adapt.peft.virtual_tokens import collapse
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import engine

    packed = case.extra.get("packed", False)
    cfg = recipe(case, tp, pp)
    model, spec, ddp, optimizer, base = build(cfg)
    from megatron.core import parallel_state as ps

    rec: dict = {"trainable": model_parallel_sum(trainable_parameters(model, unique=True)),
                 "trainable_rank": trainable_parameters(model), "layers_local": len(model.decoder.layers),
                 "first_stage": ps.is_pipeline_first_stage()}
    rec["step0_vs_base"] = max_diff(logits(model, spec), base)
    with adapters_disabled(model):
        rec["disabled_vs_base_step0"] = max_diff(logits(model, spec), base)
    losses = []
    for step in range(STEPS):
        if step == SAVE_AFTER:
            save(out / case.id, ddp, optimizer, step, case.peft["method"], tp, pp)
        loss, _, updated = engine.train_step(ddp, optimizer, batches(step, packed), SEQ, MBS, cfg.optim.lr)
        assert updated
        losses.append(loss)
    rec["losses"] = losses
    trained = logits(model, spec)
    rec["trained_vs_base"] = max_diff(trained, base)
    with adapters_disabled(model):
        rec["disabled_vs_base"] = max_diff(logits(model, spec), base)
        rec["generation_disabled"] = generation(model, spec, uncached=False)
    rec["generation"] = generation(model, spec)
    rec["decode_vs_full"] = decode_vs_full(model, spec, PROMPTS[0])
    if case.extra.get("collapse"):
        collapse(model)
        rec["collapsed_vs_trained"] = max_diff(logits(model, spec), trained)
        rec["trainable_collapsed"] = model_parallel_sum(trainable_parameters(model, unique=True))
        rec["generation_collapsed"] = generation(model, spec, uncached=False)
        rec["decode_vs_full_collapsed"] = decode_vs_full(model, spec, PROMPTS[0])
    if resume_from is not None:
        _, _, ddp2, opt2, _ = build(cfg)
        # The same step on the freshly initialised adapter (nothing loaded): must differ.
        fresh_sum, fresh_tokens = engine.run_schedule(ddp2, batches(SAVE_AFTER, packed), SEQ, MBS, forward_only=True)
        path = ckpt.latest_checkpoint(resume_from / case.id)
        state = ckpt.load_checkpoint(path, ddp2, opt2, trainable_only=True, same_layout=False)
        loss, _, _ = engine.train_step(ddp2, opt2, batches(state.step, packed), SEQ, MBS, cfg.optim.lr)
        rec["resumed"] = {"from": str(resume_from), "step": state.step + 1, "loss": loss,
                          "fresh_loss": engine.global_mean(fresh_sum, fresh_tokens)}
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

    cases = [case_by_id(c) for c in args.cases.split(",")] if args.cases else VIRTUAL_CASES
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
