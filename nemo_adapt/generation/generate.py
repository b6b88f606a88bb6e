"""Batched autoregressive generation from a Megatron-Core model at any TP/PP layout.

Keys and values are cached in Megatron-Core's `StaticInferenceContext`, so each decode step runs
only the new token through the model. Prompts of different lengths share one batch without padding
masks: the batch is prefilled up to the shortest prompt, then advanced one position at a time; a
sequence whose prompt is still running is fed its own next prompt token instead of the sampled one
(the scheme Megatron's static text generation uses). Every position attends only to real tokens,
so results equal running each prompt alone.

Prompts that start with the same tokens (the same system prompt and chat header, as in every
evaluation) share them: the common prefix is prefilled once, in one batch row, its cached keys and
values copied to the other rows, and the rest of the prefill runs as a second chunk with an explicit
causal mask. Megatron turns its own causal masking off for any chunk after the first (it expects
single-token decode steps), so this needs the local attention, which applies a given mask; with
Transformer Engine attention the whole prefill runs as one chunk instead. When batch rows run
different functions of their tokens (a mixed-adapter batch, `generation.multi_lora`: each row its own
LoRA adapter), the model says so through `batch_rows` (below): the prefix is then prefilled once per
group of rows that compute alike, each group's cached keys and values copied to its own rows only.

Under pipeline parallelism, hidden states flow stage to stage with point-to-point sends; the last
stage gathers the vocabulary-parallel logits over its TP group, picks the next tokens and broadcasts
them back along the pipeline, so every rank ends with the same outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_adapt.data.packing import causal_chunk_mask
from nemo_adapt.errors import ConfigError
from nemo_adapt.models.builder import model_chunks


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token."""

    max_new_tokens: int = 64
    """Stop a sequence after this many generated tokens."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    seed: int = 0
    """Seed of the sampling generator (same on every rank, so TP ranks agree)."""

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be >= 0 (0 = no limit)")


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """Next token ids [b] from float logits [b, vocab]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass *before* them already reaches top_p (the first is always kept).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are prefilled with the rest (an extra forward costs more than it saves)."""


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Number of leading tokens all prompts share."""
    n = min(len(p) for p in prompts)
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return n


def accepts_chunk_masks(model) -> bool:
    """Whether every attention layer of this stage (all its chunks) applies an explicitly given mask
    during cached inference (Megatron's local `DotProductAttention`, possibly inside our prefix-tuning
    wrapper)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [getattr(m, "base_layer", m) for chunk in model_chunks(model) for name, m in chunk.named_modules()
             if name.endswith("core_attention")]
    return bool(cores) and all(isinstance(c, DotProductAttention) for c in cores)


def _copy_cached_row(ctx, length: int) -> None:
    """Copy the first `length` cached positions of batch row 0 to every other row, in every layer
    this stage holds (cache layout [seq, batch, heads, head_dim])."""
    for key, value in ctx.key_value_memory_dict.values():
        key[:length, 1:] = key[:length, :1]
        value[:length, 1:] = value[:length, :1]


def _copy_cached_rows(ctx, length: int, sources: torch.Tensor) -> None:
    """Set the first `length` cached positions of every batch row i to those of row `sources[i]`, in
    every layer this stage holds. The right-hand side is gathered before anything is written, so a
    source row may itself be overwritten."""
    for key, value in ctx.key_value_memory_dict.values():
        key[:length] = key[:length, sources]
        value[:length] = value[:length, sources]


def batch_rows(model):
    """The per-row state of a batch whose rows compute different functions of their tokens, or None.

    A mixed-adapter batch (`generation.multi_lora.MultiLoRA.mixed`) puts the same object on every model
    chunk as the attribute `batch_rows` for as long as the rows are selected. It offers `row_keys()`:
    one hashable key per batch row, rows with equal keys computing the same function of their tokens;
    and `only_rows(rows)`: a context manager inside which the model's forwards run on those batch
    rows only, in that order. Generation needs both only to prefill a shared prompt prefix once per
    group of rows instead of once for all (the cached keys and values of row 0 would be wrong for a
    row that runs another adapter); every other step runs on all rows, in their order, so the rows
    and their selection never drift apart.
    """
    for chunk in model_chunks(model):
        rows = getattr(chunk, "batch_rows", None)
        if rows is not None:
            return rows
    return None


def _stage_forward(model, tokens, positions, ctx, hidden_shape, dtype, attention_mask=None):
    """Run this rank's pipeline stage on a chunk of positions; returns logits on the last stage, else None.

    Under an interleaved pipeline the rank holds several model chunks and runs them in virtual-stage
    order: chunk v takes its input from the previous pipeline rank (the last rank's chunk v - 1, for
    chunk v of the first rank) and sends its output to the next (wrapping around likewise).
    """
    from megatron.core import parallel_state as ps

    from nemo_adapt.peft.virtual_tokens import unwrap

    out = None
    for chunk in model_chunks(model):
        gpt = unwrap(chunk)
        first, last = gpt.pre_process, gpt.post_process
        if not first:
            hidden = torch.empty(hidden_shape, dtype=dtype, device=tokens.device)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        # Megatron gathers the vocabulary-parallel logits over TP itself in inference mode.
        out = chunk(tokens if first else None, positions, attention_mask, inference_context=ctx,
                    runtime_gather_output=True)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = None
    return out


def _first_chunk(model):
    return model_chunks(model)[0]


@contextlib.contextmanager
def _eval_mode(model):
    """Every chunk in eval mode inside the block; each chunk's training flag restored after."""
    chunks = model_chunks(model)
    was = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, w in zip(chunks, was):
            c.train(w)


def sampling_generator(device: torch.device, seed: int) -> torch.Generator:
    """The sampling RNG, on the device the logits live on (`torch.multinomial` refuses a generator on
    another device); the same seed gives every rank the same draws."""
    return torch.Generator(device=device).manual_seed(seed)


def stop_token_ids(spec, tokenizer=None) -> set[int]:
    """The token ids that end a generated answer; generation and evaluation both stop at this set.

    A checkpoint may state several stop ids (Llama-3-Instruct: 128001 and 128009), the tokenizer has
    its own eos, and the chat template may close a turn with yet another token (Qwen2.5 base models
    declare `<|endoftext|>` as eos while their turns end with `<|im_end|>`). A model fine-tuned on
    chats learns to write the template's end-of-turn token, so stopping only at eos would run on to
    `max_new_tokens`.

    Args:
        spec: the model's `ModelSpec` (its `eos_token_ids`).
        tokenizer: the chat tokenizer, or None.

    Returns:
        The union of the spec's eos ids, the tokenizer's eos id and the id of the chat template's
        end-of-turn token (`nemo_adapt.data.tokenize.end_of_turn_text`).
    """
    ids = set(spec.eos_token_ids)
    if tokenizer is None:
        return ids
    from nemo_adapt.data.tokenize import end_of_turn_text

    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = end_of_turn_text(tokenizer)
    if eot:
        tid = tokenizer.convert_tokens_to_ids(eot)
        # An unknown text maps to the unk id; that is a stop id only when the text is the unk token.
        if tid is not None and (tid != tokenizer.unk_token_id or eot == tokenizer.unk_token):
            ids.add(int(tid))
    return ids


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, eos_token_ids: set[int],
             vocab_size: int, hidden_size: int, max_sequence_length: int | None = None) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts.

    All ranks of a model-parallel group call this with the same prompts and get the same result.

    Args:
        model: this rank's `GPTModel` stage, or the list of its virtual-pipeline chunks.
        prompts: token ids per prompt (non-empty).
        params: sampling settings.
        eos_token_ids: ids that end a sequence (not included in the output); `stop_token_ids` gives
            the set for a model and tokenizer.
        vocab_size: real vocabulary size (logits beyond it are TP padding).
        hidden_size: model width (shape of the hidden states sent between stages).
        max_sequence_length: the model's context limit, checked before any work.

    Returns:
        The generated token ids per prompt, without the prompt and without the EOS token.

    Raises:
        ConfigError: an empty prompt, or prompt + max_new_tokens longer than the model's context.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt must contain at least one token")
    # Prompt tuning / p-tuning: n placeholder positions in front of each prompt; the first stage's
    # embedding hook puts the virtual tokens there, so prefill includes them. They count as prompt.
    n_virtual = virtual_token_count(_first_chunk(model))
    prompts = [[0] * n_virtual + list(p) for p in prompts]
    lengths = [len(p) for p in prompts]
    total = max(lengths) + params.max_new_tokens
    if max_sequence_length is not None and total > max_sequence_length:
        extra = f" (including {n_virtual} virtual tokens)" if n_virtual else ""
        raise ConfigError(
            f"longest prompt ({max(lengths)} tokens{extra}) + max_new_tokens ({params.max_new_tokens}) = {total} "
            f"exceeds the model's context of {max_sequence_length} tokens"
        )
    device = next(_first_chunk(model).parameters()).device
    dtype = next(_first_chunk(model).parameters()).dtype
    batch = len(prompts)
    # Fills positions past each prompt until a token is written there; never fed to the model or
    # returned, so any id works. The smallest stop id keeps it the same on every rank and run.
    pad = min(eos_token_ids) if eos_token_ids else 0
    tokens = torch.full((batch, total), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths_t = torch.tensor(lengths, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    end = lengths_t + params.max_new_tokens  # exclusive end position per sequence
    gen = sampling_generator(device, params.seed)
    eos = torch.tensor(sorted(eos_token_ids) or [-1], device=device)

    ctx = StaticInferenceContext(batch, total)
    prev, cur = 0, min(lengths)
    # At least one own prompt token per row after the shared part: its logits start each row's answer.
    shared = min(common_prefix_length(prompts), cur - 1) if batch > 1 and accepts_chunk_masks(model) else 0
    rows = batch_rows(model)
    with _eval_mode(model):
        if shared >= MIN_SHARED_PREFIX and rows is None:
            positions = torch.arange(shared, device=device).unsqueeze(0)
            _stage_forward(model, tokens[:1, :shared], positions, ctx, (shared, 1, hidden_size), dtype)
            ctx.increment_sequence_len_offset(shared)
            _copy_cached_row(ctx, shared)
            prev = shared
        elif shared >= MIN_SHARED_PREFIX:
            # One prefill row per group (its first row), in cache rows 0..g-1; then every row takes
            # its group's. The keys are the same on every rank, so all stages agree on g.
            keys = list(rows.row_keys())
            if len(keys) != batch:
                raise ValueError(f"the model's batch_rows select {len(keys)} rows, but generate was given "
                                 f"{batch} prompts")
            firsts = {}
            for i, k in enumerate(keys):
                firsts.setdefault(k, i)
            reps = list(firsts.values())
            g = len(reps)
            slot = {k: j for j, k in enumerate(firsts)}
            positions = torch.arange(shared, device=device).unsqueeze(0).expand(g, -1)
            with rows.only_rows(reps):
                _stage_forward(model, tokens[reps, :shared], positions, ctx, (shared, g, hidden_size), dtype)
            ctx.increment_sequence_len_offset(shared)
            _copy_cached_rows(ctx, shared, torch.tensor([slot[k] for k in keys], device=device))
            prev = shared
        while cur < total and not bool(done.all()):
            chunk = tokens[:, prev:cur]
            positions = torch.arange(prev, cur, device=device).unsqueeze(0).expand(batch, -1)
            mask = None
            if prev > 0 and cur - prev > 1:
                mask = causal_chunk_mask(cur - prev, cur, device)
            elif prev > 0:
                ctx.enable_decode_mode()
            out = _stage_forward(model, chunk, positions, ctx, (cur - prev, batch, hidden_size), dtype, mask)
            ctx.increment_sequence_len_offset(cur - prev)
            nxt = torch.empty(batch, dtype=torch.long, device=device)
            if ps.is_pipeline_last_stage():
                # Columns past vocab_size only pad the vocabulary for TP.
                logits = out[:, -1, :vocab_size].float()
                nxt = _pick(logits, params, gen).to(device)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
            in_prompt = cur < lengths_t
            write = ~in_prompt & ~done
            tokens[:, cur] = torch.where(write, nxt, tokens[:, cur])
            hit_eos = write & torch.isin(nxt, eos)
            done |= hit_eos | (~in_prompt & (cur + 1 >= end))
            # A sequence that hit EOS keeps its EOS at `cur`; later positions are never read back.
            prev, cur = cur, cur + 1

    results = []
    for i, n in enumerate(lengths):
        out_ids = tokens[i, n: min(int(end[i]), cur)].tolist()
        cut = next((j for j, t in enumerate(out_ids) if t in eos_token_ids), len(out_ids))
        results.append(out_ids[:cut])
    return results


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, vocab_size: int, hidden_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab] of one forward pass across the pipeline (no cache).

    Returns the logits on the last pipeline stage and None on the others. With virtual tokens
    (prompt tuning, p-tuning) they are prepended and the logits of `tokens`' positions returned.
    """
    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    n_virtual = virtual_token_count(_first_chunk(model))
    if n_virtual:
        tokens = torch.cat([torch.zeros(tokens.shape[0], n_virtual, dtype=tokens.dtype, device=tokens.device),
                            tokens], dim=1)
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    dtype = next(_first_chunk(model).parameters()).dtype
    with _eval_mode(model):
        out = _stage_forward(model, tokens, positions, None, (s, b, hidden_size), dtype)
    return None if out is None else out[:, n_virtual:, :vocab_size].float()
