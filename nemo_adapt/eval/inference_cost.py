"""Inference cost of a model as it will be served: time to first token, decode throughput, context, memory.

What a team trades against quality when it picks a method: an unmerged LoRA adds matrix products to every layer,
a merged one costs nothing extra, prompt and p-tuning lengthen every request by their virtual tokens, prefix
tuning adds attended keys and values, Houlsby adapters add layers.

Measured with the same greedy generation the evaluation uses (KV cache; no end-of-sequence, so every row
generates exactly the requested tokens), after one untimed warm-up, as the median of `repeats` runs:

- `ttft_s`: prefill plus the first token for one prompt (batch 1);
- `decode_tokens_per_s[b]`: tokens per second of the remaining `new_tokens - 1` steps at batch size b,
  from the difference between generating `new_tokens` and one token for the same b prompts;
- `context_tokens`: what attention sees for the first prompt — its tokens plus virtual tokens plus prefix
  positions;
- `peak_memory_bytes`: on a GPU, the CUDA allocator's peak during the measurement (reset first); on a CPU the
  process's peak resident memory since it started (the OS keeps no resettable peak), named so in `memory_kind`.

Timings are wall-clock on a shared machine: compare variants measured in one process, one after another.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"  # KiB on Linux


def measure(model, spec, prompts: Sequence[Sequence[int]], new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 8),
            repeats: int = 3, extra_context: int = 0) -> dict:
    """Inference cost of `model` on `prompts` (token ids; every rank of the model-parallel group calls this).

    Args:
        model: this rank's model stage (or virtual-pipeline chunks).
        spec: its ModelSpec.
        prompts: at least max(batch_sizes) prompts (the first b are used at batch size b).
        new_tokens: tokens generated per row for the decode measurement (>= 2).
        batch_sizes: batch sizes to measure decode throughput at.
        repeats: timed runs per measurement (median reported).
        extra_context: attended positions the model adds beyond the prompt and virtual tokens (prefix tuning's
            prefix length), for `context_tokens`.

    Returns:
        {"ttft_s", "decode_tokens_per_s": {b: tokens/s, or None when not measurable}, "context_tokens", "new_tokens", "repeats",
         "peak_memory_bytes", "memory_kind"}.

    Raises:
        ValueError: fewer prompts than the largest batch, or new_tokens < 2.
    """
    from nemo_adapt.generation.generate import SamplingParams, generate
    from nemo_adapt.models.builder import model_chunks
    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: the decode rate needs at least 2 generated tokens")
    if len(prompts) < max(batch_sizes):
        raise ValueError(f"{len(prompts)} prompts for batch sizes up to {max(batch_sizes)}")
    prompts = [list(p) for p in prompts]

    def run(batch: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        generate(model, batch, SamplingParams(max_new_tokens=n), set(), spec.vocab_size, spec.hidden_size,
                 spec.max_position_embeddings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run(prompts[:1], 2)  # warm-up: allocator, kernels, caches
    ttft = statistics.median(run(prompts[:1], 1) for _ in range(repeats))
    decode = {}
    for b in batch_sizes:
        batch = prompts[:b]
        # Decoding time = (first token + n - 1 more) - (first token alone), each pair timed back to back so a
        # burst of load on a shared machine hits both sides; the median over pairs. A tiny model's decode can
        # drown in such noise: up to two more rounds of pairs are taken before giving up.
        diffs: list[float] = []
        for _ in range(3):
            diffs += [run(batch, new_tokens) - run(batch, 1) for _ in range(repeats)]
            if statistics.median(diffs) > 0:
                break
        decode_s = statistics.median(diffs)
        # None when the timer cannot separate decoding from the first token (a tiny model, a short budget).
        decode[b] = round(b * (new_tokens - 1) / decode_s, 2) if decode_s > 0 else None
    peak, kind = _peak_memory()
    n_virtual = virtual_token_count(model_chunks(model)[0])
    return {"ttft_s": round(ttft, 4), "decode_tokens_per_s": decode,
            "context_tokens": len(prompts[0]) + n_virtual + extra_context, "new_tokens": new_tokens,
            "repeats": repeats, "peak_memory_bytes": peak, "memory_kind": kind}


def extra_context_of(peft_config) -> int:
    """Attended positions a method adds that are not virtual tokens (`PeftMethod.attended_tokens`: prefix
    tuning's prefix length), else 0."""
    from nemo_adapt.peft.base import get_peft_method

    method = get_peft_method(peft_config.method)
    return method.attended_tokens(peft_config) if method is not None else 0
