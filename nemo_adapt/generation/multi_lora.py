"""Many LoRA adapters over one base model: hot-swap, and batches whose rows use different adapters.

Serving N fine-tunes of one base as N merged models costs N copies of the base. Two ways avoid that,
both here, over a model built once with LoRA applied (`peft.lora.LoRALinear` modules):

* hot-swap (`MultiLoRA.activate`): copy adapter k's A/B into the live LoRA modules and set their
  scale; nothing is rebuilt, the cost is one copy of the adapter's parameters (milliseconds);
* mixed batches (`MultiLoRA.mixed`): each batch row names its adapter (-1: the base), and one
  forward computes, per row b, y_b = base(x_b) + s_k * (x_b A_k^T) B_k^T with k = index[b], by
  gathering A and B per row from the stacked adapters and two batched matmuls: Punica's BGMV
  (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547), the scheme S-LoRA
  (Sheng et al. 2023, arXiv:2311.03285) and vLLM also use; here in plain `torch.bmm`, not a fused
  kernel. Inference only: no dropout, no gradients wanted. The rows' A and B are gathered once per
  selection (a generate() call keeps its rows), so a batch of b rows holds b adapters' copies for it.

Adapters of different ranks are served together: each is zero-padded to the largest rank R (zero rows
of A, zero columns of B), which computes the same update (the zero terms add nothing; a matmul of another
width may round the last bit differently), and keeps its own scale alpha_k / r_k.
The model's live LoRA modules must then have rank R (`serving_config` gives the config to apply).
Adapters must agree on everything else that decides where updates go (method LoRA, target modules,
layers) and belong to the same base (its fingerprint, checked by `load_adapter`); otherwise loading is
refused naming the adapter directory and what differs.

Tensor parallelism: the stacks hold each rank's own shards, cut as the live parameters are cut
(`artifacts.adapter._local_part`), and the mixed path repeats the live modules' communication: a
column-parallel layer's replicated A and column-split B need none (under sequence parallelism the
rank-r activations are all-gathered over the sequence, as `ColumnParallelLinear` does); a row-parallel
layer's row-split A gives partial rank-r activations that are all-reduced over TP (reduce-scattered
over the sequence under SP), as `RowParallelLinear` does, before the replicated B. So any TP size
works the same way as TP1; pipeline stages each stack their own layers and `generate` finds the
selection on every stage. Tested at TP1 (`tests/unit/test_multi_lora.py`) and TP2, where the mixed batch
gives TP1's tokens and logits (`tests/distributed/test_multi_lora_tp.py`); the sequence-parallel branch
(SP runs on GPUs only here) and pipeline parallelism are not tested.

Typical use:

    adapters = load_lora_adapters([dir0, dir1, dir2], source)
    apply_peft(model, serving_config(adapters))
    with MultiLoRA(model, adapters) as served:
        served.activate(1)                                   # hot-swap: generate() now uses adapter 1
        with served.mixed([0, 2, -1, 1]):                    # one adapter per prompt, -1: the base
            outs = generate(model, prompts, params, eos, vocab_size, hidden_size)
    # the model's LoRA modules hold what they held before
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from nemo_adapt.errors import CheckpointError, ConfigError
from nemo_adapt.models.builder import model_chunks
from nemo_adapt.peft.base import global_module_name
from nemo_adapt.peft.lora import LoRAConfig, LoRALinear


def load_lora_adapters(paths: Sequence[str | os.PathLike], source) -> list:
    """Read LoRA adapters of one base to serve together, each checked against that base and the first.

    Args:
        paths: adapter directories (ours or Hugging Face PEFT LoRA), at least one.
        source: the opened base checkpoint (`models.loader.open_source`).

    Returns:
        The `artifacts.adapter.Adapter`s, in the order given.

    Raises:
        CheckpointError: not an adapter directory, or an adapter trained on another base (fingerprint).
        ConfigError: no paths; an adapter that is not plain LoRA (DoRA's magnitude and other methods do not
            stack); target modules or layers that differ from the first adapter's — naming the directory.
    """
    from nemo_adapt.artifacts.adapter import CONFIG, load_adapter

    if not paths:
        raise ConfigError("no adapters given: serving several LoRA adapters needs at least one adapter directory")
    adapters = [load_adapter(p, source) for p in paths]
    first = adapters[0]
    for a in adapters:
        where = a.files.path / CONFIG
        if a.config.method != "lora":
            raise ConfigError(f"{where}: a {a.config.method} adapter; only LoRA adapters are served together "
                              "(one base, per-row A/B)")
        for field in ("target_modules", "layers"):
            mine, theirs = getattr(a.config, field), getattr(first.config, field)
            if (mine is None) != (theirs is None) or (mine is not None and sorted(mine) != sorted(theirs)):
                raise ConfigError(f"{where}: peft.{field}={mine!r}, but {first.files.path} has {theirs!r}; adapters "
                                  f"served over one model must adapt the same modules")
    return adapters


def serving_config(adapters: Sequence) -> LoRAConfig:
    """The LoRA config to apply to the base so its live modules can hold any of `adapters`.

    Its rank is the largest adapter rank (smaller ones are zero-padded); alpha is that adapter's, but the
    scale of whichever adapter is active or selected replaces it anyway.
    """
    largest = max(adapters, key=lambda a: a.config.rank)
    c = largest.config
    return LoRAConfig(rank=c.rank, alpha=c.alpha, target_modules=list(c.target_modules),
                      layers=None if c.layers is None else list(c.layers))


_ABSENT = object()


def _lora_modules(model) -> list[tuple[str, LoRALinear]]:
    """(global name, module) of every plain LoRA layer this rank holds, over all its chunks."""
    out = []
    for chunk in model_chunks(model):
        for name, module in chunk.named_modules():
            if type(module) is LoRALinear:  # DoRALinear subclasses it, but its update is not B A alone
                out.append((global_module_name(chunk, name), module))
    return out


def _padded(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `rank` (A [r, in]: dim 0; B [out, r]: dim 1)."""
    pad = rank - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class AdapterRows:
    """Which adapter each batch row uses, shared by every LoRA layer (and chunk) of a model while selected.

    Holds each layer's stacked A [N+1, R, in_local] and B [N+1, out_local, R] and the scales [N+1];
    slot N is all zeros, so a row with index -1 gets an update of exactly 0 and its output is the base's.
    This is the object `generation.generate.batch_rows` finds.
    """

    def __init__(self, index: torch.Tensor, stacks: dict, scales: torch.Tensor, count: int):
        self.index = index
        """[b] adapter per batch row as given (-1: the base)."""
        self._stacks = stacks
        self._scales = scales
        self._slots = torch.where(index < 0, count, index)  # -1 -> the zero slot N
        self._active = self._slots
        # Per layer, the active rows' A^T [b, in, R], B^T [b, R, out] and scales [b, 1, 1], gathered once per
        # selection: the rows keep their adapters for a whole generate() call, and gathering at every step
        # cost about half of the base layer's own matmul on a CPU (batch 8); this costs b adapters' memory.
        self._gathered: dict = {}

    def row_keys(self) -> list[int]:
        """One key per batch row: its adapter index (rows with the same adapter compute alike)."""
        return self.index.tolist()

    @contextlib.contextmanager
    def only_rows(self, rows: Sequence[int]):
        """Inside, forwards run on batch rows `rows` only (in that order), e.g. one row per adapter."""
        before = self._active, self._gathered
        self._active = self._slots[torch.as_tensor(list(rows), dtype=torch.long, device=self._slots.device)]
        self._gathered = {}
        try:
            yield
        finally:
            self._active, self._gathered = before

    def delta(self, module: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """Each row's LoRA update s_k (x A_k^T) B_k^T for one layer, in the layout of the layer's output.

        Args:
            module: the LoRA layer (its stacks were registered by `MultiLoRA`).
            x: the adapter input [s, b, in_local] (sequence-first; s is a sequence shard under SP).

        Returns:
            [s', b, out_local], the layer output's shape (s' = s, or the SP shard for a row-parallel layer).

        Raises:
            ValueError: the batch does not have one row per selected adapter index.
        """
        slots = self._active
        if x.shape[1] != slots.numel():
            raise ValueError(f"a mixed-adapter batch selects {slots.numel()} rows, but the layer got a batch of "
                             f"{x.shape[1]}; generate() keeps the rows in step by itself (batch_rows), other "
                             "callers must pass one row per adapter index")
        gathered = self._gathered.get(module)
        if gathered is None:
            a, b = self._stacks[module]
            gathered = (a[slots].transpose(1, 2).contiguous(), b[slots].transpose(1, 2).contiguous(),
                        self._scales[slots].view(-1, 1, 1))
            self._gathered[module] = gathered
        a_t, b_t, scale = gathered
        h = torch.bmm(x.transpose(0, 1), a_t).transpose(0, 1)  # [s, b, R]
        h = self._communicate(module, h)
        y = torch.bmm(h.transpose(0, 1), b_t)  # [b, s', out_local]
        # Scale in float then round once, as the single-adapter path's `python float * tensor` does.
        return (y.float() * scale).to(y.dtype).transpose(0, 1)

    @staticmethod
    def _communicate(module: LoRALinear, h: torch.Tensor) -> torch.Tensor:
        """The live adapter pair's TP communication between A and B (nothing at TP1)."""
        if module.kind == "row":
            down = module.adapter.down  # RowParallelLinear: partial sums over the input split
            if getattr(down, "tp_group", None) is None or dist.get_world_size(down.tp_group) == 1:
                return h
            from megatron.core.tensor_parallel.mappings import (
                reduce_from_tensor_model_parallel_region,
                reduce_scatter_to_sequence_parallel_region,
            )

            if down.sequence_parallel:
                return reduce_scatter_to_sequence_parallel_region(h.contiguous(), group=down.tp_group)
            return reduce_from_tensor_model_parallel_region(h.contiguous(), group=down.tp_group)
        up = module.adapter.up  # ColumnParallelLinear: all-gathers its input over the sequence under SP
        if getattr(up, "sequence_parallel", False):
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            return gather_from_sequence_parallel_region(h.contiguous(), group=up.tp_group)
        return h


class MultiLoRA:
    """N LoRA adapters stacked over one model's live LoRA modules: hot-swap and mixed-adapter batches.

    A context manager: on exit (or `close()`) every live module gets back the A, B, scale and enabled flag
    it had before, and no selection is left on the model.

    Args:
        model: this rank's stage (or its chunks) with LoRA applied at `serving_config(adapters)`'s rank,
            targets and layers, not merged.
        adapters: from `load_lora_adapters` (same base, same targets and layers).

    Raises:
        ConfigError: the model has no plain LoRA layers, has them merged, or at another rank.
        CheckpointError: an adapter lacks a tensor a live layer needs (naming the adapter and the tensor), or
            holds tensors no layer on any rank uses.
    """

    def __init__(self, model, adapters: Sequence):
        from nemo_adapt.artifacts.adapter import CONFIG, _local_part

        if not adapters:
            raise ConfigError("MultiLoRA needs at least one adapter")
        self.model = model
        adapters = list(adapters)
        # Their descriptions only: the tensors live on in the stacks (the caller may drop the Adapters).
        self.files = [a.files for a in adapters]
        self.configs = [a.config for a in adapters]
        self.count = len(adapters)
        self.rank = max(c.rank for c in self.configs)
        self.modules = _lora_modules(model)
        if not self.modules and not any(c.layers is not None for c in self.configs):
            raise ConfigError("the model has no LoRA layers: apply_peft(model, serving_config(adapters)) first")
        for name, m in self.modules:
            live = m.adapter.down.weight.shape[0]
            if live != self.rank:
                raise ConfigError(f"the model's LoRA layer {name} has rank {live}, but the largest adapter rank is "
                                  f"{self.rank}: apply_peft(model, serving_config(adapters)) so every adapter fits")
            if m.merged:
                raise ConfigError(f"the model's LoRA layer {name} is merged into its base weights; unmerge it "
                                  "(LoRA.unmerge_from_base) before serving several adapters")
        ref = self.modules[0][1].adapter.down.weight if self.modules else None
        # Scales in float32 whatever the model dtype; slot N (rows with index -1) is 0.
        self._scale_values = [c.alpha / c.rank for c in self.configs]  # as LoRALinear computes it
        self.scales = torch.tensor(self._scale_values + [0.0],
                                   dtype=torch.float32, device=None if ref is None else ref.device)
        self._stacks: dict[LoRALinear, tuple[torch.Tensor, torch.Tensor]] = {}
        used: set[str] = set()
        with torch.no_grad():
            for name, m in self.modules:
                down, up = m.adapter.down.weight, m.adapter.up.weight
                a_parts, b_parts = [], []
                for adapter in adapters:
                    got = []
                    for leaf, live, dim in (("down", down, 0), ("up", up, 1)):
                        key = f"{name}.adapter.{leaf}.weight"
                        full = adapter.tensors.get(key)
                        part = None if full is None else _local_part(_padded(full, self.rank, dim), live)
                        if part is None or part.shape != live.shape:
                            have = "none" if full is None else str(list(full.shape))
                            raise CheckpointError(f"{adapter.files.path / CONFIG}: serving needs {key!r} of this "
                                                  f"rank's shape {list(live.shape)} at rank {self.rank} (got {have}); "
                                                  "the adapter was made for another model or other settings")
                        got.append(part.to(device=live.device, dtype=live.dtype))
                        used.add(key)
                    a_parts.append(got[0])
                    b_parts.append(got[1])
                a_parts.append(torch.zeros_like(down))
                b_parts.append(torch.zeros_like(up))
                self._stacks[m] = (torch.stack(a_parts), torch.stack(b_parts))
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, sorted(used))
            used = {k for keys in everyone for k in keys}
        for adapter in adapters:
            unused = sorted(set(adapter.tensors) - used)
            if unused:
                raise CheckpointError(f"{adapter.files.path / CONFIG}: {len(unused)} tensor(s) not in the model, e.g. "
                                      f"{unused[:3]}; the adapter was made for another model or other settings")
        # What the live modules held, for close().
        self._saved = [(m, m.adapter.down.weight.detach().clone(), m.adapter.up.weight.detach().clone(), m.scale,
                        m.adapter_enabled) for _, m in self.modules]
        self.active: int | None = None
        """The hot-swapped adapter (-1: the base), or None before the first `activate`."""
        self._closed = False

    @property
    def names(self) -> list[str]:
        """The adapter directories, in index order."""
        return [str(f.path) for f in self.files]

    def _check_index(self, k: int, what: str) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not -1 <= k < self.count:
            raise ValueError(f"{what}={k!r}: adapter indices are 0..{self.count - 1}, or -1 for the base")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this MultiLoRA is closed; the model's LoRA modules were restored")

    @torch.no_grad()
    def activate(self, k: int) -> None:
        """Hot-swap: the live LoRA modules compute adapter k from now on (-1: the base, adapters bypassed).

        Copies k's A and B shards into the live parameters and sets each module's scale alpha_k / r_k;
        the same as a model freshly built with adapter k (to the rounding of the zero padding, if any).

        Raises:
            ValueError: k out of range.
            ConfigError: a live module is merged (swapping under a merged update would corrupt the base).
        """
        self._check_open()
        self._check_index(k, "adapter")
        for _, m in self.modules:
            if m.merged:
                raise ConfigError("a LoRA layer is merged into its base weights; unmerge it before a swap")
        for _, m in self.modules:
            if k < 0:
                m.adapter_enabled = False
                continue
            a, b = self._stacks[m]
            m.adapter.down.weight.copy_(a[k])
            m.adapter.up.weight.copy_(b[k])
            m.scale = self._scale_values[k]
            m.adapter_enabled = True
        self.active = k

    @contextlib.contextmanager
    def mixed(self, index: Sequence[int] | torch.Tensor):
        """Inside, batch row i of every forward uses adapter `index[i]` (-1: the base), in one pass.

        Works with `generation.generate.generate` (KV cache, shared-prefix prefill per adapter group) and
        `forward_logits`; the batch must have len(index) rows. The hot-swapped adapter (or the base, after
        `activate(-1)`) is not used inside and is live again after; `peft.base.adapters_disabled` around
        this block does not bypass the rows' adapters (the selection says which rows run the base).

        Yields:
            The `AdapterRows` selection.

        Raises:
            ValueError: an index out of range, or an empty index.
            ConfigError: a live module is merged.
        """
        self._check_open()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() == 0:
            raise ValueError("a mixed-adapter batch needs at least one row")
        for i, k in enumerate(index.tolist()):
            self._check_index(k, f"index[{i}]")
        for _, m in self.modules:
            if m.merged:
                raise ConfigError("a LoRA layer is merged into its base weights; the update of a row's own adapter "
                                  "would add to the merged one: unmerge it first")
        rows = AdapterRows(index.to(self.scales.device), self._stacks, self.scales, self.count)
        # The selection decides every row, whatever was hot-swapped (even -1, which bypasses the modules).
        before = [(m, m.row_adapters, m.adapter_enabled) for _, m in self.modules]
        chunks = [(c, c.__dict__.get("batch_rows", _ABSENT)) for c in model_chunks(self.model)]
        for m, _, _ in before:
            m.row_adapters = rows
            m.adapter_enabled = True
        for c, _ in chunks:
            c.batch_rows = rows  # found by generate() on every stage, even one without LoRA layers
        try:
            yield rows
        finally:
            for m, prev, enabled in before:
                m.row_adapters = prev
                m.adapter_enabled = enabled
            for c, prev in chunks:
                if prev is _ABSENT:
                    del c.batch_rows
                else:
                    c.batch_rows = prev

    @torch.no_grad()
    def close(self) -> None:
        """Give every live LoRA module back what it held before (A, B, scale, enabled flag)."""
        if self._closed:
            return
        for m, down, up, scale, enabled in self._saved:
            m.adapter.down.weight.copy_(down)
            m.adapter.up.weight.copy_(up)
            m.scale = scale
            m.adapter_enabled = enabled
        self._closed = True

    def __enter__(self) -> MultiLoRA:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
