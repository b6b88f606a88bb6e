"""Serving many LoRA adapters over one base (`generation.multi_lora`): hot-swap time, and decode throughput of a
mixed-adapter batch against the base, one adapter, and serving the same rows one adapter at a time.

Embedded SmolLM2-135M-Instruct (fp32, CPU); N random LoRA adapters (rank 16 on linear_qkv, linear_proj,
linear_fc1, linear_fc2; A and B both non-zero) written through `save_adapter` into a temporary directory and
read back through `load_lora_adapters`, as a server would. Per N it prints:

- hot-swap: ms to copy one adapter's A/B into the live LoRA modules (`MultiLoRA.activate`), cycling over the N;
- decode tokens/s (the steps after the first token: generating `new_tokens` minus generating 1, the
  definition `eval --latency` uses) of one batch of `batch` chat prompts for: the base (adapters bypassed),
  one adapter unmerged, one adapter merged into the base weights, a mixed batch whose rows cycle through the
  N adapters (one forward per step), and the same rows served one adapter at a time (each adapter's rows as
  their own batch, after a hot-swap, one batch after the other);
- the ratios against the base, against one adapter, and mixed against one-at-a-time.

Variants are measured in interleaved rounds (every variant once per round) and the median kept, so a busy
machine slows them alike. Never fails on a time. Usage:
    .venv/bin/python bench/serving.py [--batch 8] [--new-tokens 32] [--repeats 1] [--adapters 1,4,16] [--swaps 20]
        [--threads 1]
"""

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings

import torch

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "What is 2+2?", "Explain photosynthesis in one sentence.", "Give me a synonym for happy.",
    "What is the boiling point of water?", "List two prime numbers.",
]
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def make_adapters(model, source, cfg, count: int, root: str) -> list[str]:
    """`count` random LoRA adapters of `model` (LoRA already applied at `cfg`), saved as artifacts under `root`."""
    from nemo_adapt.artifacts.adapter import save_adapter
    from nemo_adapt.models.loader import base_fingerprint

    meta = {"base_model": source.spec.name, "base_checkpoint": "embedded:smollm2_135m",
            "base_model_fingerprint": base_fingerprint(source)}
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if getattr(p, "is_adapter", False):
                    # A at its Kaiming-uniform scale 1/sqrt(in); B small but non-zero, as after some training.
                    std = p.shape[1] ** -0.5 if name.endswith("down.weight") else 0.01
                    p.copy_(std * torch.randn(p.shape, generator=gen))
        dirs.append(str(save_adapter(model, os.path.join(root, f"adapter{i:02d}"), cfg, meta)))
    return dirs


def variants_of(served, model, prompts, index, with_single: bool) -> dict:
    """Variant name -> the (context manager factory, prompts) batches it runs, one after the other."""
    from nemo_adapt.peft.lora import LoRA

    @contextlib.contextmanager
    def active(k):
        served.activate(k)
        yield

    @contextlib.contextmanager
    def merged():
        served.activate(0)
        LoRA.merge_into_base(model)
        try:
            yield
        finally:
            LoRA.unmerge_from_base(model)

    out = {}
    if with_single:  # the base, one adapter and merged do not depend on N: measured once
        out = {"base": [(lambda: active(-1), prompts)], "one": [(lambda: active(0), prompts)],
               "merged": [(merged, prompts)]}
    out["mixed"] = [(lambda: served.mixed(index), prompts)]
    # The alternative without mixed batches: each adapter's rows as their own batch, after a hot-swap.
    out["one_at_a_time"] = [((lambda k=k: active(k)), [p for p, j in zip(prompts, index) if j == k])
                            for k in sorted(set(index))]
    return out


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved timed rounds (median kept)")
    ap.add_argument("--adapters", default="1,4,16", help="comma-separated adapter counts N")
    ap.add_argument("--swaps", type=int, default=20, help="hot-swaps timed per N")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared 2-core machine, OpenMP threads waiting on "
                         "each other while other processes run made the same run vary up to 10x")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.adapters.split(",")]

    import megatron.core

    from nemo_adapt.generation.generate import SamplingParams, generate
    from nemo_adapt.generation.multi_lora import MultiLoRA, load_lora_adapters
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig
    from nemo_adapt.tokenizer import load_tokenizer

    started = time.perf_counter()
    runtime.initialize(runtime.ParallelLayout())
    source = open_source("embedded:smollm2_135m")
    model, source = load_model(source)
    spec = source.spec
    tok = load_tokenizer(source.tokenizer_path)
    qs = (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in qs]
    cfg = LoRAConfig(rank=16, alpha=32, target_modules=TARGETS)
    apply_peft(model, cfg, seed=0)
    tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
    try:
        dirs = make_adapters(model, source, cfg, max(counts), tmp.name)

        def gen(batch, n):
            # No EOS: every row generates exactly n tokens.
            t = time.perf_counter()
            generate(model, batch, SamplingParams(max_new_tokens=n), set(), spec.vocab_size, spec.hidden_size)
            return time.perf_counter() - t

        def decode_seconds(batches):
            """Seconds of the decode steps (n tokens minus 1 token) over (context manager factory, prompts) batches
            run one after the other."""
            total = 0.0
            for setup, batch in batches:
                with setup():
                    total += gen(batch, args.new_tokens) - gen(batch, 1)
            return total

        decode_tokens = args.batch * (args.new_tokens - 1)
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"megatron-core {megatron.core.__version__}")
        print(f"SmolLM2-135M fp32, batch {args.batch} chat prompts, {args.new_tokens} new tokens; LoRA rank 16 "
              f"alpha 32 on {', '.join(TARGETS)}; decode tokens/s = {args.batch} x {args.new_tokens - 1} tokens / "
              f"(time of {args.new_tokens} tokens - time of 1), median of {args.repeats} interleaved round(s)", flush=True)

        rows = []
        single = None
        for n in counts:
            adapters = load_lora_adapters(dirs[:n], source)
            with MultiLoRA(model, adapters) as served:
                del adapters  # the stacks hold the tensors now
                swap_s = []
                for i in range(args.swaps):
                    t = time.perf_counter()
                    served.activate(i % n)
                    swap_s.append(time.perf_counter() - t)
                index = [i % n for i in range(args.batch)]
                variants = variants_of(served, model, prompts, index, with_single=single is None)
                with served.mixed(index):  # warm-up (first calls allocate), untimed
                    gen(prompts, 2)
                gen(prompts, 2)
                times = {k: [] for k in variants}
                for _ in range(args.repeats):
                    for k, batches in variants.items():
                        times[k].append(decode_seconds(batches))
                tps = {k: decode_tokens / statistics.median(v) for k, v in times.items()}
                if single is None:
                    single = {k: tps[k] for k in ("base", "one", "merged")}
                rows.append((n, len(set(index)), 1000 * statistics.median(swap_s), tps["mixed"], tps["one_at_a_time"]))
                print(f"  N={n} measured ({time.perf_counter() - started:.0f} s)", flush=True)

        base, one, merged_tps = single["base"], single["one"], single["merged"]
        print("\none model, decode tokens/s:")
        print(f"  base (adapters bypassed)   {base:8.1f}   1.00x base")
        print(f"  one adapter, unmerged      {one:8.1f}   {one / base:.2f}x base")
        print(f"  one adapter, merged        {merged_tps:8.1f}   {merged_tps / base:.2f}x base   {merged_tps / one:.2f}x one")
        print("\nN adapters (rows of the batch cycle through them):")
        print("   N  in batch  swap ms  mixed tok/s  vs base  vs one  one-at-a-time tok/s  mixed / one-at-a-time")
        for n, used, swap_ms, mixed, seq in rows:
            print(f"  {n:2d}  {used:8d}  {swap_ms:7.2f}  {mixed:11.1f}  {mixed / base:6.2f}x  {mixed / one:5.2f}x  "
                  f"{seq:19.1f}  {mixed / seq:20.2f}x")
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:  # a temporary directory of up to 16 x 20 MB: removed even when interrupted
        tmp.cleanup()
        runtime.shutdown()


if __name__ == "__main__":
    main()
