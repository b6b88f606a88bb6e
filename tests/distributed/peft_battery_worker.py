"""Worker of the shared PEFT battery, launched once per layout by `test_peft_battery.py` (torchrun).

For every row of `peft_cases.PEFT_CASES` (or those named with --cases), at one TP/PP layout:

1. base logits of `random:tiny_llama`, then the method applied: trainable parameters held by this
   rank and summed over the model-parallel group (replicated copies once); step-0 logits, and
   logits under `adapters_disabled` (must equal the base);
2. 3 optimizer steps on fixed synthetic batches (packed rows, or padded rows for virtual tokens)
   through the real engine (Megatron DDP, optimizer, pipeline schedule); an adapter-only checkpoint
   after step 2; the 3 losses;
3. after training: the adapter artifact (safetensors, TP-gathered) and a fresh model's logits with it loaded
   (`apply_adapter`: each rank takes its shard); logits under
   `adapters_disabled` (the base again) and its greedy generation; mergeable rows: logits merged
   (`merge_into_base`), the merged Hugging Face export (not under an interleaved pipeline) with the
   adapted logits beside it, and logits after unmerge;
   with --export-check (not for Houlsby adapters, which have no HF PEFT form): the trained model's logits on
   four prompts and 16 greedy tokens each, written beside the artifact;
4. greedy generation of a few tokens with the KV cache (pipeline p2p) and the same tokens found
   without a cache, one full forward per token; one cached decode step's logits vs a full forward;
5. collapsible rows: logits before and after `collapse`, the count after it, generation and the
   decode-step check again;
6. with --resume-from: a fresh model at this layout runs step 3 once with its own fresh adapter and
   once after loading that directory's step-2 checkpoint of the same row (saved at another layout).

Each rank writes `<out>/rank<r>.json` with what it knows (logit comparisons on the last stage only).

Usage: torchrun --standalone --nproc-per-node N peft_battery_worker.py --tp T --pp P [--vp V] --out DIR
       [--resume-from DIR] [--cases id,id] [--export-check]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

SEQ, MBS, GBS, STEPS, SAVE_AFTER = 24, 2, 4, 3, 2
# A shared 9-token prefix and own parts of 3 and 4 tokens: generation takes its shared-prefix path.
PROMPTS = [[5, 17, 33, 9, 12, 8, 21, 7, 30, 11, 6, 14], [5, 17, 33, 9, 12, 8, 21, 7, 30, 40, 41, 42, 43]]
NEW_TOKENS = 3
# With --export-check: four equal-length prompts (no padding on the Hugging Face side) and 16 greedy tokens each,
# the adapted model's side of "HF PEFT loads our export and computes what we do" (test_peft_battery.py).
EXPORT_PROMPTS = [[5, 17, 33, 9, 12, 8, 21, 7], [60, 3, 44, 90, 12, 71, 8, 30], [11, 11, 52, 6, 99, 23, 4, 15],
                  [77, 31, 9, 64, 40, 2, 18, 55]]
EXPORT_TOKENS = 16


def batches(step: int, packed: bool = True) -> list[dict]:
    """The global batch of step `step` (DP=1 everywhere), as MBS-row micro-batches.

    Packed: two examples per row (segments 1 and 2, positions restarting), no padding. Unpacked: one
    example per row, of length SEQ - 3 * row, padded (pad id 0, segment 0, no loss). The loss covers
    the second half of each example (its "answer").
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
            rows["loss_mask"][i, n // 2:n - 1] = 1
            rows["tokens"][i, n:] = 0
            rows["labels"][i, n - 1:] = 0
            rows["segment_ids"][i, n:] = 0
            rows["position_ids"][i, n:] = torch.arange(SEQ - n)
    return [{k: v[i:i + MBS] for k, v in rows.items()} for i in range(0, GBS, MBS)]


def recipe(case, tp: int, pp: int, vp: int | None = None):
    from nemo_adapt.config.schema import RecipeConfig
    from tests.distributed.peft_cases import peft_config

    cfg = RecipeConfig()
    cfg.peft = peft_config(case)
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline = tp, pp, vp
    cfg.train.global_batch_size, cfg.train.micro_batch_size = GBS, MBS
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps = 0.01, "constant", 0
    return cfg


def build(cfg):
    """A fresh adapted model (this rank's stage, or its list of chunks under an interleaved pipeline),
    its DDP wrapper(s) and optimizer, and the base logits before the method."""
    from nemo_adapt.models.loader import load_model_chunks
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.training import engine

    chunks, source = load_model_chunks("random:tiny_llama", "tiny_llama")
    chunks[0].config.calculate_per_token_loss = True
    model = chunks if len(chunks) > 1 else chunks[0]
    base = logits(model, source.spec)
    methods = [apply_peft(c, cfg.peft, seed=7) for c in chunks]
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg, methods[0].lr_multipliers())
    engine.connect_schedule_hooks(ddp, optimizer)
    return model, source.spec, ddp, optimizer, base


def chunks_of(model) -> list:
    from nemo_adapt.models.builder import model_chunks

    return model_chunks(model)


def logits(model, spec, seq=None):
    """Full-forward logits of one sequence (default: both prompts back to back); None off the last stage."""
    from nemo_adapt.generation.generate import forward_logits

    tokens = torch.tensor([seq if seq is not None else PROMPTS[0] + PROMPTS[1]])
    return forward_logits(model, tokens, spec.vocab_size, spec.hidden_size)


def max_diff(a, b):
    return None if a is None or b is None else float((a - b).abs().max())


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
        lg = logits(model, spec, seq)
        nxt = torch.zeros(1, dtype=torch.long)
        if lg is not None:
            nxt[0] = int(lg[0, -1].argmax())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        seq.append(int(nxt[0]))
    return seq[len(prompt):]


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
    from one full forward: the cached path with the method applied (None off the last stage)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_adapt.generation.generate import _stage_forward
    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    full = logits(model, spec, prompt)
    first = chunks_of(model)[0]
    seq = torch.tensor([[0] * virtual_token_count(first) + list(prompt)])
    s = seq.shape[1]
    dtype = next(first.parameters()).dtype
    for c in chunks_of(model):
        c.eval()
    with torch.no_grad():
        ctx = StaticInferenceContext(1, s)
        _stage_forward(model, seq[:, :-1], torch.arange(s - 1).unsqueeze(0), ctx, (s - 1, 1, spec.hidden_size), dtype)
        ctx.increment_sequence_len_offset(s - 1)
        ctx.enable_decode_mode()
        out = _stage_forward(model, seq[:, -1:], torch.tensor([[s - 1]]), ctx, (1, 1, spec.hidden_size), dtype)
    for c in chunks_of(model):
        c.train()
    return None if out is None else float((out[0, -1, :spec.vocab_size].float() - full[0, -1]).abs().max())


def save(run_dir: Path, ddp, optimizer, step: int, method: str, tp: int, pp: int, vp: int | None):
    from nemo_adapt.training import checkpoint as ckpt

    state = ckpt.TrainState(step=step, consumed_samples=step * GBS, epoch=0, tokens_seen=0,
                            layout={"tensor": tp, "pipeline": pp, "virtual_pipeline": vp, "data": 1},
                            peft_method=method,
                            data_fingerprint="battery", base_model_fingerprint="random:tiny_llama", seed=7)
    ckpt.save_checkpoint(run_dir, ddp, optimizer, state, trainable_only=True, keep_last=1)


def export_check(model, spec, out: Path) -> None:
    """The trained model's logits on EXPORT_PROMPTS and their EXPORT_TOKENS greedy tokens (KV cache), written by
    the last stage's first tensor-parallel rank to `out`/export_check.safetensors and .json."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from nemo_adapt.generation.generate import SamplingParams, forward_logits, generate

    lg = forward_logits(model, torch.tensor(EXPORT_PROMPTS), spec.vocab_size, spec.hidden_size)
    tokens = generate(model, EXPORT_PROMPTS, SamplingParams(max_new_tokens=EXPORT_TOKENS), set(), spec.vocab_size,
                      spec.hidden_size, spec.max_position_embeddings)
    if lg is not None and ps.get_tensor_model_parallel_rank() == 0:
        save_file({"logits": lg.contiguous()}, str(out / "export_check.safetensors"))
        (out / "export_check.json").write_text(json.dumps(tokens))


def run_case(case, tp: int, pp: int, vp: int | None, out: Path, resume_from: Path | None,
             check_export: bool = False) -> dict:
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter, save_adapter
    from nemo_adapt.models.export import export_hf
    from nemo_adapt.models.loader import load_model_chunks
    from nemo_adapt.peft.base import adapters_disabled, apply_peft, get_peft_method, trainable_parameters
    from nemo_adapt.peft.virtual_tokens import collapse
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import engine

    cfg = recipe(case, tp, pp, vp)
    model, spec, ddp, optimizer, base = build(cfg)
    rec: dict = {"trainable": model_parallel_sum(trainable_parameters(model, unique=True)),
                 "trainable_rank": trainable_parameters(model), "chunks": len(chunks_of(model)),
                 "layers_local": sum(len(c.decoder.layers) for c in chunks_of(model)),
                 "first_stage": ps.is_pipeline_first_stage()}
    rec["step0_vs_base"] = max_diff(logits(model, spec), base)
    with adapters_disabled(model):
        rec["disabled_vs_base_step0"] = max_diff(logits(model, spec), base)

    losses = []
    for step in range(STEPS):
        if step == SAVE_AFTER:
            save(out / case.id, ddp, optimizer, step, case.peft["method"], tp, pp, vp)
        loss, _, updated = engine.train_step(ddp, optimizer, batches(step, case.packed), SEQ, MBS, cfg.optim.lr)
        assert updated
        losses.append(loss)
    rec["losses"] = losses

    # Adapter artifact (TP-gathered, global names): must be the same file at every layout.
    save_adapter(model, out / case.id / "artifact", cfg.peft, {"base_model": "tiny_llama"})
    trained = logits(model, spec)
    rec["trained_vs_base"] = max_diff(trained, base)
    if check_export and case.peft["method"] != "adapter":
        export_check(model, spec, out / case.id)
    # The artifact loaded into a fresh model at this layout (each rank its TP shard of the full tensors)
    # computes what the trained model does.
    fresh_chunks, fresh_source = load_model_chunks("random:tiny_llama", "tiny_llama")
    for c in fresh_chunks:
        apply_peft(c, cfg.peft, seed=99)  # another seed: every value must come from the artifact
    fresh = fresh_chunks if len(fresh_chunks) > 1 else fresh_chunks[0]
    apply_adapter(fresh, load_adapter(out / case.id / "artifact", fresh_source))
    rec["loaded_vs_trained"] = max_diff(logits(fresh, spec), trained)
    del fresh, fresh_chunks
    with adapters_disabled(model):
        rec["disabled_vs_base"] = max_diff(logits(model, spec), base)
        rec["generation_disabled"] = generation(model, spec, uncached=False)
    if case.mergeable:
        merged_layers = [m for c in chunks_of(model) for m in c.modules()
                         if hasattr(m, "merge") and hasattr(m, "adapter_enabled")]
        assert get_peft_method(case.peft["method"]).merge_into_base(model) == len(merged_layers)
        rec["merged_vs_adapted"] = max_diff(logits(model, spec), trained)
        if not isinstance(model, list):  # the merged export (one model chunk per rank)
            export_hf(model, spec, out / case.id / "merged")
            if trained is not None:
                save_file({"logits": trained.contiguous()}, str(out / case.id / "adapted_logits.safetensors"))
        for m in merged_layers:
            m.unmerge()
        with adapters_disabled(model):
            rec["unmerged_base_vs_base"] = max_diff(logits(model, spec), base)
        rec["unmerged_vs_adapted"] = max_diff(logits(model, spec), trained)
    rec["generation"] = generation(model, spec)
    rec["decode_vs_full"] = decode_vs_full(model, spec, PROMPTS[0])
    if case.collapsible:
        for c in chunks_of(model):
            collapse(c)
        rec["collapsed_vs_trained"] = max_diff(logits(model, spec), trained)
        rec["trainable_collapsed"] = model_parallel_sum(trainable_parameters(model, unique=True))
        rec["generation_collapsed"] = generation(model, spec, uncached=False)
        rec["decode_vs_full_collapsed"] = decode_vs_full(model, spec, PROMPTS[0])

    if resume_from is not None:
        _, _, ddp2, opt2, _ = build(cfg)
        # The same step with the freshly initialised adapter (nothing loaded yet): the loaded adapter
        # must give a clearly different loss, or the checkpoint had no effect.
        fresh_sum, fresh_tokens = engine.run_schedule(ddp2, batches(SAVE_AFTER, case.packed), SEQ, MBS,
                                                      forward_only=True)
        path = ckpt.latest_checkpoint(resume_from / case.id)
        state = ckpt.load_checkpoint(path, ddp2, opt2, trainable_only=True, same_layout=False)
        loss, _, _ = engine.train_step(ddp2, opt2, batches(state.step, case.packed), SEQ, MBS, cfg.optim.lr)
        rec["resumed"] = {"from": str(resume_from), "step": state.step + 1, "loss": loss,
                          "fresh_loss": engine.global_mean(fresh_sum, fresh_tokens)}
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vp", type=int, default=None, help="virtual-pipeline chunks per rank (interleaved)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    ap.add_argument("--export-check", action="store_true", help="write the trained logits and tokens the HF PEFT "
                    "export is compared with")
    args = ap.parse_args()

    from nemo_adapt.parallel import runtime
    from tests.distributed.peft_cases import PEFT_CASES, case_by_id

    cases = [case_by_id(c) for c in args.cases.split(",")] if args.cases else PEFT_CASES
    runtime.initialize(runtime.ParallelLayout(tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vp), seed=7)
    out = Path(args.out)
    resume = Path(args.resume_from) if args.resume_from else None
    results = {}
    for case in cases:
        runtime.seed_all(7)
        results[case.id] = run_case(case, args.tp, args.pp, args.vp, out, resume, args.export_check)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
