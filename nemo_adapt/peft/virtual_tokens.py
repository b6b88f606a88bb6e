"""What prompt tuning, p-tuning and prefix tuning share: virtual tokens, prefixes, their layout rules.

Semantics, the same at every TP/PP layout, in training and in generation:

- **Virtual tokens** (prompt tuning, p-tuning). A sequence of s tokens becomes n + s positions on
  every pipeline stage: virtual token i sits at position i, the sequence's own tokens at n, n+1, ...
  The trainer (`prepend_virtual_positions`) and the generator add n placeholder positions in front
  (id 0, no loss); a forward hook on the first stage's embedding (`VirtualPrompt`) replaces the
  embedding at every position < n with row `position` of the prompt table. Pipeline p2p shapes use
  seq_length + n. Rows must hold one example each (`data.packing: false`, checked before training):
  a packed row's later examples would not start after the prompt, and their positions restart at 0.
- **Prefixes** (prefix tuning). Every attention layer prepends n trainable keys and values to the
  keys and values its queries see (`PrefixAttention`, around `core_attention`). They are added after
  rotary embedding, so they carry no position (as Hugging Face PEFT's `past_key_values` prefixes),
  every query may attend them (each example of a packed row too, so packing stays on), and they
  never enter the KV cache: prefill and decode steps prepend them again, so the generator is
  unchanged. Under TP each rank holds the prefixes of its own KV heads (query groups).

Parameters replicated over model-parallel ranks whose gradient each rank only sees part of (the
prefix-tuning reparameterisation MLP, used by every layer of every stage) are marked
`model_parallel_shared`; `with_shared_grad_reduction` sums their gradients over the TP x PP group
before Megatron's own gradient finalisation, and copies on pipeline stages after the first are
marked `shared` so grad-norm clipping and parameter counts take them once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

VIRTUAL_PROMPT_ATTR = "virtual_prompt"
"""Attribute of the GPTModel holding the `VirtualPrompt` module (on every pipeline stage)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP/Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_device() -> torch.device:
    """Where new parameters go: the current GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def seeded(seed: int):
    """Build modules with torch's default initialisation from `seed`, without touching the global RNG.

    Initialisation runs on the CPU (fork_rng covers its generator), so the weights depend only on
    the seed, never on the layout or the device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def virtual_token_count(model: torch.nn.Module) -> int:
    """Positions an enabled prompt/p-tuning method puts in front of every sequence (0: none).

    Known on every pipeline stage (the `VirtualPrompt` module exists on each; its table only on the
    first), and 0 inside `adapters_disabled`.
    """
    module = getattr(unwrap(model), VIRTUAL_PROMPT_ATTR, None)
    return module.num_virtual_tokens if module is not None and module.adapter_enabled else 0


def prepend_virtual_positions(batch: dict, n: int) -> dict:
    """A training batch with n placeholder positions in front of every row (see module docstring).

    Args:
        batch: collated [b, s] tensors (tokens, labels, loss_mask, position_ids, segment_ids).
        n: number of virtual tokens.

    Returns:
        A new dict of [b, n + s] tensors: placeholders have token/label 0, loss 0, segment 1;
        position ids run 0 .. n + s - 1 (Megatron's RoPE uses exactly these implicit positions).

    Raises:
        ValueError: a row holds several packed examples.
    """
    seg = batch["segment_ids"]
    if bool((seg.max(dim=1).values > 1).any()):
        raise ValueError("virtual tokens need one example per row; set data.packing=false")
    b, s = batch["tokens"].shape
    out = dict(batch)
    for key in ("tokens", "labels", "loss_mask"):
        t = batch[key]
        out[key] = torch.cat([torch.zeros(b, n, dtype=t.dtype, device=t.device), t], dim=1)
    out["segment_ids"] = torch.cat([torch.ones(b, n, dtype=seg.dtype, device=seg.device), seg], dim=1)
    out["position_ids"] = torch.arange(n + s, device=seg.device).unsqueeze(0).expand(b, -1).contiguous()
    return out


class VirtualPrompt(torch.nn.Module):
    """n virtual tokens in front of the input (Lester et al. 2021; Liu et al. 2021).

    Lives on every pipeline stage so that every stage knows n (p2p shapes) and `adapters_disabled`
    switches it off everywhere; only the first stage (which holds the embedding) has parameters.
    Subclasses implement `table()` -> [n, h]. The table is replicated over TP ranks: the embedding
    output it replaces is replicated too, so every TP rank computes the same gradient. Under
    sequence parallelism the embedding output is split along the sequence; each rank fills the
    virtual positions of its own shard and Megatron all-reduces the grads of params marked
    `sequence_parallel`.
    """

    def __init__(self, num_virtual_tokens: int, gpt):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.adapter_enabled = True
        self.pre_process = bool(gpt.pre_process)
        self.sequence_parallel = bool(gpt.config.sequence_parallel)

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, gpt) -> None:
        """Put this module on the model and hook the first stage's embedding."""
        setattr(gpt, VIRTUAL_PROMPT_ATTR, self)
        if self.pre_process:
            gpt.embedding.register_forward_hook(self._inject, with_kwargs=True)
            if self.sequence_parallel:
                for p in self.parameters():
                    p.sequence_parallel = True

    def _inject(self, module, args, kwargs, output):
        if not self.adapter_enabled:
            return output
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is None:
            raise RuntimeError("virtual tokens need the embedding to be called with position_ids")
        pos = positions.transpose(0, 1).contiguous()  # [s, b], like the embedding output [s, b, h]
        if self.sequence_parallel:
            from megatron.core import parallel_state as ps

            s_local = output.shape[0]
            r = ps.get_tensor_model_parallel_rank()
            pos = pos[r * s_local:(r + 1) * s_local]
        n = self.num_virtual_tokens
        virtual = (pos < n).unsqueeze(-1)
        table = self.table().to(output.dtype)
        # contiguous: the result goes through pipeline p2p sends, which need it
        return torch.where(virtual, table[pos.clamp(max=n - 1)], output).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Replicated over TP and DP; first pipeline stage only."""
        return sharded_params(self, prefix, sharded_offsets)


def sharded_params(module: torch.nn.Module, prefix: str, sharded_offsets: tuple = (),
                   tp_axes: dict[str, int] | None = None, replica: int = 0,
                   skip: tuple[str, ...] = ()) -> dict:
    """Megatron `ShardedTensor`s for a module's own parameters (dist_checkpointing, any TP/PP).

    Args:
        module: the module; parameter names are `state_dict` names relative to it.
        prefix: key prefix (global module name + '.').
        sharded_offsets: offsets passed down by Megatron (none for these modules).
        tp_axes: parameter name -> axis split over TP ranks; the rest are TP-replicated.
        replica: nonzero for a copy that must not be written: a module replicated on every pipeline stage
            and model chunk writes only its primary copy (see `mark_model_parallel_shared`).
        skip: child-module names whose parameters are left out (e.g. the wrapped base layer).

    Returns:
        key -> ShardedTensor, with replica ids (pp, tp, dp) that make exactly one rank the writer.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

    tp_axes = tp_axes or {}
    tp_group = ps.get_tensor_model_parallel_group()
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    pp = replica
    tp, dp = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True)
    out = {}
    for name, tensor in module.state_dict(prefix="", keep_vars=True).items():
        if name.split(".", 1)[0] in skip:
            continue
        key = f"{prefix}{name}"
        if name in tp_axes:
            out[key] = make_tp_sharded_tensor_for_checkpoint(
                tensor, key, tp_axes[name], replica_id=(pp, 0, dp), prepend_offsets=sharded_offsets,
                tp_group=tp_group, dp_cp_group=dp_group)
        else:
            out[key] = make_sharded_tensor_for_checkpoint(
                tensor, key, prepend_offsets=sharded_offsets, replica_id=(pp, tp, dp),
                tp_group=tp_group, dp_cp_group=dp_group)
    return out


def mark_model_parallel_shared(module: torch.nn.Module, primary: bool) -> None:
    """Mark a module replicated on every TP x PP rank (and model chunk) whose gradient each copy sees
    only part of. `primary`: this copy sits in the chunk holding the embedding (the first virtual stage
    of the first pipeline stage); every other copy is marked `shared`."""
    module.primary_copy = primary  # the copy dist_checkpointing writes (see `sharded_params`)
    for p in module.parameters():
        p.model_parallel_shared = True
        if not primary:
            p.shared = True  # Megatron's grad norm (and our counts) take the primary copy only


def with_shared_grad_reduction(finalize, chunks):
    """Wrap Megatron's `finalize_model_grads`: first sum grads of `model_parallel_shared` parameters over
    this rank's model chunks and the model-parallel (TP x PP) group, write the sum back to every copy,
    then finalise as usual (DP reduction, token scaling). Every copy then takes the same optimizer step.

    Args:
        finalize: Megatron's `finalize_model_grads`.
        chunks: this rank's model chunks (a module or a list; every rank holds the same number).

    Returns `finalize` unchanged when the model has no such parameters or a single copy of them.
    """
    from megatron.core import parallel_state as ps

    chunks = chunks if isinstance(chunks, list | tuple) else [chunks]
    # The copies of one parameter in each chunk, in the same module order on every chunk and rank.
    per_chunk = [[p for p in unwrap(c).parameters() if p.requires_grad and getattr(p, "model_parallel_shared", False)]
                 for c in chunks]
    if not per_chunk[0] or (ps.get_model_parallel_group().size() == 1 and len(chunks) == 1):
        return finalize

    def grad_of(p):
        return p.main_grad if getattr(p, "main_grad", None) is not None else p.grad

    def finalize_with_shared(model_chunks, num_tokens=None, *args, **kwargs):
        copies = [[grad_of(p) for p in params] for params in per_chunk]
        if all(g is not None for gs in copies for g in gs):
            flat = sum(torch.cat([g.reshape(-1) for g in gs]) for gs in copies)
            dist.all_reduce(flat, group=ps.get_model_parallel_group())
            for gs in copies:
                offset = 0
                for g in gs:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        return finalize(model_chunks, num_tokens, *args, **kwargs)

    return finalize_with_shared


def collapse(model: torch.nn.Module) -> int:
    """Fold training-only reparameterisations into static tables (p-tuning encoder, prefix MLP).

    Serving then pays nothing for them; outputs are unchanged (up to float rounding). Call on every
    rank of the model-parallel group. Returns the number of modules collapsed on this rank.
    """
    gpt = unwrap(model)
    done = 0
    for m in list(gpt.modules()):
        if hasattr(m, "collapse") and m is not gpt:
            done += int(bool(m.collapse()))
    for attr in ("prefix_encoder",):
        if hasattr(gpt, attr):
            delattr(gpt, attr)
    return done
