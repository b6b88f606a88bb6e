"""DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).

The adapted weight is split into a magnitude and a direction,

    W' = m * (W + s B A) / ||W + s B A||_c

with ||.||_c the norm of each output row over the input dimension (one value per output feature),
m a trainable vector initialised to ||W||_c (so W' = W at step 0, as B starts at zero) and s B A a
LoRA update on the same targets as LoRA. The layer computes m / ||W + sBA||_c * (W x + s B A x) + b:
the bias is not rescaled, and the base GEMM is the unchanged one (the adapted weight is never
materialised, except to take its row norms). Dropout, when set, applies to the input of the B A
branch only, as in LoRA.

Tensor parallelism. The row norms need every input column of a row:

* column-parallel targets (linear_qkv, linear_fc1) hold whole rows, so the norms of the local rows
  are local, and m is split over TP like the output (for the fused SwiGLU fc1 in the per-rank
  [gate shard; up shard] order, as LoRA's B);
* row-parallel targets (linear_proj, linear_fc2) hold a slice of the input columns, so each rank
  sums the squares of its columns and the sums are all-reduced over the TP group; m is replicated.

By default the norm is treated as a constant in the backward pass, as the paper does (section 4.3,
"we treat ||V + ΔV||_c as a constant") and Hugging Face PEFT does; `detach_norm: false` backpropagates
through it (the replicated LoRA half's gradient from the norm is then all-reduced over TP, because
each rank's norm depends only on its shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import mark_adapter, name_seed, register_peft
from nemo_adapt.peft.lora import LoRA, LoRAConfig, LoRALinear


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA on Megatron-Core linear layers: LoRA's settings plus how the weight norm is differentiated."""

    method: str = "dora"
    """Registered method name."""
    detach_norm: bool = True
    """Treat ||W + sBA||_c as a constant in the backward pass (the paper's choice; saves memory)."""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.detach_norm, bool):
            raise ConfigError(f"peft.detach_norm={self.detach_norm!r} must be true or false")


def vector_sharded_state_dict(module: torch.nn.Module, prefix: str, sharded_offsets: tuple,
                              tp_axes: dict[str, int]) -> dict:
    """Megatron sharded state dict of a module's own parameters: the names in `tp_axes` are split over
    TP along the given axis, the others are replicated over TP."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    own = {name: p for name, p in module.named_parameters(recurse=False)}
    return make_sharded_tensors_for_checkpoint(
        own, prefix, tp_axes, sharded_offsets, tp_group=ps.get_tensor_model_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))


def mark_tp_sharded(param: torch.nn.Parameter, dim: int = 0) -> None:
    """Tell Megatron (grad-norm, artifacts, counts) that `param` is split over TP along `dim`."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, True, dim, 1)


class DoRAMagnitude(torch.nn.Module):
    """The magnitude vector m (one entry per local output row) and its checkpoint layout."""

    def __init__(self, init: torch.Tensor, sharded: bool, glu: bool, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(init.clone())
        self.sharded = sharded
        self.glu = glu
        if sharded:
            mark_tp_sharded(self.weight)
            if glu:
                self.weight.glu_interleaved = True
        elif sequence_parallel:
            # Replicated, but multiplies sequence-sharded activations: Megatron all-reduces its grad.
            self.weight.sequence_parallel = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = vector_sharded_state_dict(self, prefix, sharded_offsets, {"weight": 0} if self.sharded else {})
        if self.glu:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}weight"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        return sd


class DoRALinear(LoRALinear):
    """A Megatron-Core parallel linear layer with a DoRA update; same call signature and outputs."""

    def __init__(self, base_layer: torch.nn.Module, kind: str, config: DoRAConfig, seed: int, glu: bool = False,
                 layer_slot: tuple[int, int] | None = None):
        super().__init__(base_layer, kind, config, seed, glu=glu, layer_slot=layer_slot)
        self.detach_norm = config.detach_norm
        with torch.no_grad():
            norm = self._row_norm(base_layer.weight.float(), differentiable=False)
        self.magnitude = DoRAMagnitude(norm.to(base_layer.weight.dtype), sharded=kind == "column", glu=self.glu,
                                       sequence_parallel=base_layer.config.sequence_parallel)
        mark_adapter(self.magnitude)
        self._merged_norm: torch.Tensor | None = None

    def _row_norm(self, weight: torch.Tensor, differentiable: bool) -> torch.Tensor:
        """||weight||_c per output row of the full (unsharded) matrix, for this rank's rows."""
        sq = (weight * weight).sum(dim=1)
        if self.kind == "row":
            from megatron.core import parallel_state as ps

            if ps.get_tensor_model_parallel_world_size() > 1:
                if differentiable:
                    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

                    # Forward: sum over TP; backward: each rank's share gets the (replicated) grad.
                    sq = reduce_from_tensor_model_parallel_region(sq)
                else:
                    sq = sq.clone()
                    torch.distributed.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        return sq.sqrt()

    def _adapted_weight(self, differentiable: bool) -> torch.Tensor:
        """W + s B A on this rank's shard."""
        down, up = self.adapter.down.weight, self.adapter.up.weight
        if differentiable and _tp_world() > 1:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            # The replicated half enters each rank's norms with only that rank's rows (column) or
            # columns (row): all-reduce its gradient from this path so every rank gets the full one.
            if self.kind == "column":
                down = copy_to_tensor_model_parallel_region(down)
            else:
                up = copy_to_tensor_model_parallel_region(up)
        weight = self.base_layer.weight
        return weight + (self.scale * (up @ down)).to(weight.dtype)

    def magnitude_scale(self) -> torch.Tensor:
        """m / ||W + sBA||_c for this rank's output rows (norms summed in fp32 whatever the weight dtype)."""
        if self.detach_norm:
            with torch.no_grad():
                norm = self._row_norm(self._adapted_weight(False).float(), differentiable=False)
        else:
            norm = self._row_norm(self._adapted_weight(True).float(), differentiable=True)
        return self.magnitude.weight.float() / norm

    def forward(self, x: torch.Tensor, *args, **kwargs):
        result, bias, adapter_in = self._base_forward(x, *args, **kwargs)
        if self.merged or not self.adapter_enabled:
            return result, bias
        # The base layer added its bias itself unless it returns it (skip_bias_add): take it out,
        # rescale W x only, and put it back.
        own_bias = getattr(self.base_layer, "bias", None)
        added_bias = own_bias if bias is None and own_bias is not None and own_bias.numel() else None
        if added_bias is not None:
            result = result - added_bias
        lora = self.scale * self.adapter(self._dropped(adapter_in))
        y = self.magnitude_scale().to(result.dtype) * (result + lora)
        if added_bias is not None:
            y = y + added_bias
        return y, bias

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the LoRA branch's input only (the base GEMM sees x), as in LoRALinear."""
        if self.kind == "row" and self.training and not isinstance(self.dropout, torch.nn.Identity):
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():  # the input is split over TP: one mask per shard
                return self.dropout(x)
        return self.dropout(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Replace W by m (W + sBA) / ||W + sBA||_c (the norm is kept to undo it exactly)."""
        if self.merged:
            return
        adapted = self._adapted_weight(False).float()
        norm = self._row_norm(adapted, differentiable=False)
        self._merged_norm = norm
        factor = self.magnitude.weight.float() / norm
        self.base_layer.weight.copy_((factor[:, None] * adapted).to(self.base_layer.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W = W' ||W + sBA||_c / m - sBA."""
        if not self.merged:
            return
        factor = self._merged_norm / self.magnitude.weight.float()
        delta = self.scale * self.adapter.delta_weight().float()
        restored = factor[:, None] * self.base_layer.weight.float() - delta
        self.base_layer.weight.copy_(restored.to(self.base_layer.weight.dtype))
        self._merged_norm = None
        self.merged = False


def _tp_world() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


@register_peft("dora")
class DoRA(LoRA):
    """DoRA (Liu et al. 2024) on any of linear_qkv, linear_proj, linear_fc1, linear_fc2."""

    config_class = DoRAConfig
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv:2402.09353"
    resume_safe_fields = (*LoRA.resume_safe_fields, "detach_norm")
    training_fields = (*LoRA.training_fields, "detach_norm")
    has_magnitude = True

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """HF PEFT's DoRA: a LoRA adapter with `use_dora: true` plus one magnitude vector per projection.

        HF PEFT (`peft/tuners/lora/dora.py`, `DoraLinearLayer`) computes, per adapted `nn.Linear`,
        m / ||W + s B A||_c * (W x + s B A x) + b with the norm taken over the input dimension (one value
        per output row, `torch.linalg.norm(W + s*B@A, dim=1)`), detached, the bias not rescaled, and
        s = lora_alpha / r: the same function as ours, so the mapping is exact. Its files store m as
        `<module>.lora_magnitude_vector` (no `.weight`: `LoraModel._get_adapter_state_dict` strips it
        and `_remap_adapter_state_dict_for_load` puts it back), a vector of out_features.

        A and B map as in LoRA (fused linear_qkv / linear_fc1 split into q/k/v and gate/up, A copied to
        each). The magnitude splits with B's rows: each output row of a fused layer is one output row of
        exactly one projection, with the same input columns, so its norm ||W + s B A||_c row is that
        projection's row norm and the split is exact. `detach_norm` changes only gradients, not what
        the adapter computes, so it needs no field (HF PEFT always detaches when training further).

        Args:
            config: the `DoRAConfig` the adapter was trained with.
            tensors: the artifact's tensors (`decoder.layers.<i>.<block>.<linear>.adapter.{down,up}.weight`
                and `....<linear>.magnitude.weight`, full TP-gathered shapes).
            spec: the base model's `ModelSpec` (q/k/v row layout of linear_qkv).

        Returns:
            (adapter_config fields: LoRA's with `use_dora: true`, tensors under HF PEFT's names).

        Raises:
            ConfigError: a tensor name that is not a DoRA tensor, an adapted layer without its magnitude
                (HF PEFT would silently recompute it from the weights), or a magnitude whose length is
                not the layer's output rows.
        """
        from nemo_adapt.models.weights import _split_qkv

        lora_tensors, magnitudes = {}, {}
        for name, tensor in tensors.items():
            parts = name.split(".")  # decoder.layers.<i>.<block>.<linear>.magnitude.weight
            if len(parts) == 7 and parts[:2] == ["decoder", "layers"] and parts[5:] == ["magnitude", "weight"]:
                magnitudes[(int(parts[2]), parts[4])] = tensor
            else:
                lora_tensors[name] = tensor
        fields, out = super().to_hf_peft(config, lora_tensors, spec)
        # Output rows of each adapted layer, from B [out, r] (LoRA's export checked the names).
        rows_of = {(int(n.split(".")[2]), n.split(".")[4]): t.shape[0]
                   for n, t in lora_tensors.items() if n.endswith(".adapter.up.weight")}
        if set(rows_of) != set(magnitudes):
            unpaired = sorted(set(rows_of) ^ set(magnitudes))
            raise ConfigError(f"DoRA artifact: (layer, linear) {unpaired} lack either the LoRA pair or the "
                              "magnitude vector; the artifact is incomplete")
        for (layer, linear), m in sorted(magnitudes.items()):
            rows = rows_of[(layer, linear)]
            if m.dim() != 1 or m.shape[0] != rows:
                raise ConfigError(f"DoRA magnitude of layer {layer} {linear} has shape {tuple(m.shape)}, but the "
                                  f"layer has {rows} output rows")
            block, projections = cls.HF_TARGETS[linear]
            if linear == "linear_qkv":
                pieces = list(_split_qkv(spec, m))  # Megatron's per-query-group [q..., k, v] rows
            elif linear == "linear_fc1":
                pieces = list(m.chunk(2))  # [gate; up] as B's rows
            else:
                pieces = [m]
            for proj, piece in zip(projections, pieces):
                out[f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_magnitude_vector"] = piece.contiguous()
        return {**fields, "use_dora": True}, out

    @classmethod
    def claims_hf_peft(cls, hf_config):
        return hf_config.get("peft_type") == "LORA" and bool(hf_config.get("use_dora", False))

    @classmethod
    def from_hf_peft(cls, hf_config, tensors, spec, base_tensor=None):
        """An HF PEFT DoRA adapter (`use_dora: true`) as ours: LoRA's fusing (`LoRA.from_hf_peft`) plus the
        magnitudes, each projection's vector placed on its output rows of the fused layer.

        A fused layer's rows that HF PEFT leaves alone (k in a q/v adapter, or a whole layer's linear
        without an adapter) get m = ||W||_c of the base weight, so m / ||W + 0||_c = 1 and those rows stay
        the base's: that needs the base weights (`base_tensor`). The update s B A is the LoRA part's, so the
        norm ||W + s B A||_c is HF PEFT's on every row.

        Raises:
            ConfigError: as LoRA's import; an adapted projection without its magnitude, a magnitude whose
                length is not the projection's output rows, or base weights needed and not given.
        """
        from nemo_adapt.models.weights import _fuse_qkv, hf_shapes

        lora_config, out, mags = cls._lora_from_hf(hf_config, tensors, spec, magnitudes=True)
        shapes = hf_shapes(spec)
        blocks = {"self_attn": "self_attention", "mlp": "mlp"}
        for key in [k for k in out if k.endswith(".adapter.up.weight")]:
            parts = key.split(".")
            layer, linear = int(parts[2]), parts[4]
            block, projs = cls.HF_TARGETS[linear]
            up = out[key]
            pieces = []
            for proj in projs:
                hf_name = f"model.layers.{layer}.{block}.{proj}"
                rows = shapes[f"{hf_name}.weight"][0]
                given = mags.get((layer, linear), {}).get(proj)
                adapted = f"base_model.model.{hf_name}.lora_A.weight" in tensors
                if given is not None:
                    if given.reshape(-1).shape[0] != rows:
                        raise ConfigError(f"HF PEFT DoRA adapter: the magnitude of layer {layer} {proj} has "
                                          f"{given.numel()} entries, but the projection has {rows} output rows")
                    pieces.append(given.reshape(-1).to(up.dtype))
                elif adapted:
                    raise ConfigError(f"HF PEFT DoRA adapter: layer {layer} {proj} has lora_A / lora_B but no "
                                      "lora_magnitude_vector; the adapter is incomplete")
                elif base_tensor is None:
                    raise ConfigError(f"HF PEFT DoRA adapter leaves layer {layer} {proj} alone; importing it "
                                      "needs the base weights (their row norms), which were not given")
                else:
                    pieces.append(base_tensor(f"{hf_name}.weight").float().norm(dim=1).to(up.dtype))
            m = _fuse_qkv(spec, *pieces) if linear == "linear_qkv" else torch.cat(pieces)
            out[f"decoder.layers.{layer}.{blocks[block]}.{linear}.magnitude.weight"] = m.contiguous()
        return lora_config, out  # a DoRAConfig: `_lora_from_hf` builds cls.config_class

    def transform(self, module, name):
        wrapped = super().transform(module, name)
        if wrapped is module:
            return module
        # Build the DoRA layer instead of the LoRA one LoRA.transform chose (same targets, same seed).
        return DoRALinear(module, wrapped.kind, self.config, name_seed(self.seed, name), glu=wrapped.glu,
                          layer_slot=wrapped.layer_slot)
