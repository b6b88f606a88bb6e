"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

W x + (alpha / r) * B A x, with A [r, in] and B [out, r]; B starts at zero so training starts at
the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, name_seed, register_peft
from nemo_adapt.validation import check_positive

LINEAR_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig(PeftConfig):
    """Low-rank adapters on Megatron-Core linear layers."""

    method: str = "lora"
    """Registered method name."""
    rank: int = 8
    """Rank r of the update B A."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_TARGETS))
    """Which linear layers get adapters: any of linear_qkv, linear_proj, linear_fc1, linear_fc2."""
    layers: list[int] | None = None
    """Decoder layers (global, 0-based) that get adapters; None: all. Adapting only the upper layers
    also skips the backward pass through the frozen lower ones (as HF PEFT's `layers_to_transform`)."""
    lr_ratio_b: float = 1.0
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B trains at this multiple of the learning rate, A
    at the rate itself; 1 is plain LoRA. HF PEFT's `loraplus_lr_ratio`; the paper uses 2 to 16."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("peft.rank", self.rank)
        check_positive("peft.alpha", self.alpha, integer=False)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError(f"peft.target_modules is empty; choose from {', '.join(LINEAR_TARGETS)}")
        for t in self.target_modules:
            if t not in LINEAR_TARGETS:
                raise ConfigError(f"peft.target_modules entry {t!r} is not a linear layer of the model; "
                                  f"allowed: {', '.join(LINEAR_TARGETS)}")
        check_positive("peft.lr_ratio_b", self.lr_ratio_b, integer=False)
        if self.layers is not None:
            if not self.layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers):
                raise ConfigError(f"peft.layers={self.layers!r} must be a non-empty list of layer indices >= 0 "
                                  "(or null for every layer)")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"peft.layers={self.layers!r} lists a layer twice")


def children_sharded_state_dict(module, prefix, sharded_offsets, metadata) -> dict:
    """Megatron `sharded_state_dict` for a plain container: each child describes its own sharding."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import sharded_state_dict_default

    out = {}
    for name, child in module.named_children():
        # Pass the TP group explicitly: with only the DP group in `metadata`, Megatron would give
        # replicated tensors the same replica id on every TP rank and reject the save.
        out.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                              tp_group=ps.get_tensor_model_parallel_group()))
    return out


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def linear_kind(module: torch.nn.Module) -> str | None:
    """`column` or `row` for Megatron-Core (local or Transformer Engine) parallel linear layers."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    mode = getattr(module, "parallel_mode", None)  # Transformer Engine linears
    if mode in ("column", "row"):
        return mode
    if mode == "duplicated" or (mode is None and hasattr(module, "te_return_bias")):
        return "column"  # TP1 TE layers report no mode; both halves of LoRA are then local
    return None


def full_in_out(module: torch.nn.Module, kind: str, tp: int) -> tuple[int, int]:
    """Unsharded (in_features, out_features) of a TP-sharded linear layer."""
    out_local, in_local = module.weight.shape
    return (in_local, out_local * tp) if kind == "column" else (in_local * tp, out_local)


class ParallelAdapterPair(torch.nn.Module):
    """Two low-rank projections `down` [r, in] and `up` [out, r] laid out for a parallel base layer.

    Column-parallel base (output split over TP): `down` replicated, `up` column-parallel.
    Row-parallel base (input split over TP): `down` row-parallel (its output reduced over TP), `up`
    replicated. Either way the pair's output has exactly the base layer's output layout, including
    sequence-parallel scatter. Replicated halves see only a sequence shard under SP, so their grads
    are marked for Megatron's TP all-reduce (`sequence_parallel` attribute).
    """

    def __init__(self, kind: str, in_features: int, out_features: int, rank: int, config, seed: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.kind = kind

        def no_init(w):
            return w

        if kind == "column":
            self.down = torch.nn.Linear(in_features, rank, bias=False, dtype=config.params_dtype)
            self.up = ColumnParallelLinear(rank, out_features, config=config, init_method=no_init, bias=False,
                                           gather_output=False, skip_bias_add=True)
            replicated = self.down
        else:
            self.down = RowParallelLinear(in_features, rank, config=config, init_method=no_init, bias=False,
                                          input_is_parallel=True, skip_bias_add=True)
            self.up = torch.nn.Linear(rank, out_features, bias=False, dtype=config.params_dtype)
            replicated = self.up
        if config.sequence_parallel:
            replicated.weight.sequence_parallel = True
        self.reset_parameters(in_features, rank, seed)

    @torch.no_grad()
    def reset_parameters(self, in_features: int, rank: int, seed: int) -> None:
        """down ~ Kaiming-uniform (as in the LoRA reference code), up = 0; layout-independent."""
        import math

        from megatron.core import parallel_state as ps

        gen = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in))
        full = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
        if self.kind == "row":
            full = full.chunk(ps.get_tensor_model_parallel_world_size(), dim=1)[ps.get_tensor_model_parallel_rank()]
        self.down.weight.copy_(full.to(self.down.weight.dtype))
        self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        h = h[0] if isinstance(h, tuple) else h
        y = self.up(h)
        return y[0] if isinstance(y, tuple) else y

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Parallel halves keep their TP sharding in checkpoints; replicated halves are replicated."""
        return children_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def delta_weight(self) -> torch.Tensor:
        """up @ down on this rank's shard: the same shape as the base layer's local weight."""
        return self.up.weight @ self.down.weight


class LoRALinear(torch.nn.Module):
    """A Megatron-Core parallel linear layer plus a LoRA update, same call signature and outputs."""

    def __init__(self, base_layer: torch.nn.Module, kind: str, config: LoRAConfig, seed: int, glu: bool = False,
                 layer_slot: tuple[int, int] | None = None):
        super().__init__()
        self.base_layer = base_layer
        # (position, count) of this layer among the adapted layers when only some layers have
        # adapters: checkpoints stack adapters over those layers only, not over all decoder layers.
        self.layer_slot = layer_slot
        # linear_fc1 of a gated MLP: each TP rank's output is [gate shard; up shard], so the rows of
        # a column-parallel `up` follow that per-rank layout (see glu_interleaved below).
        self.glu = glu and kind == "column"
        tp = _tp_size()
        in_f, out_f = full_in_out(base_layer, kind, tp)
        self.scale = config.alpha / config.rank
        self.dropout = torch.nn.Dropout(config.dropout) if config.dropout else torch.nn.Identity()
        self.kind = kind
        self.adapter = ParallelAdapterPair(kind, in_f, out_f, config.rank, base_layer.config, seed)
        mark_adapter(self.adapter)
        if self.glu:
            self.adapter.up.weight.glu_interleaved = True
        self.merged = False
        self.adapter_enabled = True
        # Set while a mixed-adapter batch is served (generation.multi_lora): each batch row then gets
        # its own adapter's update from it instead of this module's `adapter`.
        self.row_adapters = None
        if hasattr(base_layer, "return_layernorm_output"):
            # Transformer Engine fuses the pre-norm into linear_qkv/linear_fc1: ask it for the normed
            # input too, so the adapter sees what the base GEMM sees.
            base_layer.return_layernorm_output = True
            if hasattr(base_layer, "return_layernorm_output_gathered"):
                base_layer.return_layernorm_output_gathered = False

    def _base_forward(self, x: torch.Tensor, *args, **kwargs):
        """The base layer's (output, bias, adapter input): TE's layer-norm linear also returns the normed input."""
        out = self.base_layer(x, *args, **kwargs)
        result, bias = out if isinstance(out, tuple) else (out, None)
        adapter_in = x
        if isinstance(result, tuple):  # TE layer-norm linear: (output, normed input)
            result, adapter_in = result
        return result, bias, adapter_in

    def forward(self, x: torch.Tensor, *args, **kwargs):
        result, bias, adapter_in = self._base_forward(x, *args, **kwargs)
        if self.merged or not self.adapter_enabled:
            return result, bias
        if self.row_adapters is not None:
            return result + self.row_adapters.delta(self, adapter_in), bias
        if self.kind == "row" and self.training and not isinstance(self.dropout, torch.nn.Identity):
            # The input is split over TP ranks: each rank's shard needs its own dropout mask.
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                dropped = self.dropout(adapter_in)
        else:
            dropped = self.dropout(adapter_in)
        return result + self.scale * self.adapter(dropped), bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (serving pays nothing for the adapter)."""
        if not self.merged:
            self.base_layer.weight.add_(self.scale * self.adapter.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, restoring the base weight."""
        if self.merged:
            self.base_layer.weight.sub_(self.scale * self.adapter.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint layout for Megatron's dist_checkpointing (TP/PP-reshardable).

        For a gated linear_fc1, the column-parallel `up` is stored as separate gate and up halves
        (Megatron's swiglu factory, as for the base fc1 weight), so TP2 -> TP1 reshards correctly.
        """
        if self.layer_slot is not None and sharded_offsets and sharded_offsets[0][0] == 0:
            # Megatron stacks per-layer tensors along a prepended axis (0, global layer, num_layers).
            sharded_offsets = ((0, *self.layer_slot), *sharded_offsets[1:])
        sd = children_sharded_state_dict(self, prefix, sharded_offsets, metadata)
        if self.glu:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}adapter.up.weight"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        return sd


@register_peft("lora")
class LoRA(PeftMethod):
    """LoRA (Hu et al. 2021) on any of linear_qkv, linear_proj, linear_fc1, linear_fc2."""

    config_class = LoRAConfig
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685"
    resume_safe_fields = ("alpha", "dropout", "lr_ratio_b")
    training_fields = ("dropout", "lr_ratio_b")
    merges_into_base = True  # W + s B A (DoRA: m / ||W + s B A||_c * (W + s B A))
    has_magnitude: ClassVar[bool] = False
    """DoRA adds a magnitude vector of `out` per target (counted by the same formulas)."""

    @classmethod
    def parameter_counts(cls, config, spec):
        """Per adapted layer and target r * (in + out) (A is r x in, B is out x r; `ModelSpec.linear_shape`),
        plus `out` for DoRA's magnitude. E.g. llama3_8b, rank 16, all four targets: 16 x 69,632 x 32 layers."""
        layers = spec.num_layers if config.layers is None else len(config.layers)
        if config.layers is not None and max(config.layers) >= spec.num_layers:
            raise ConfigError(f"peft.layers={list(config.layers)}: {spec.name} has layers 0..{spec.num_layers - 1}")
        comps = {}
        for target in config.target_modules:
            fan_in, fan_out = spec.linear_shape(target)
            comps[f"{target}.lora_A"] = layers * config.rank * fan_in
            comps[f"{target}.lora_B"] = layers * config.rank * fan_out
            if cls.has_magnitude:
                comps[f"{target}.magnitude"] = layers * fan_out
        return comps, dict(comps)

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """Megatron-Bridge's parallel adapters: on a column-parallel target (qkv, fc1) A (r x in) is replicated
        and B (out/t x r) split; on a row-parallel one (proj, fc2) A is split (r x in/t) and B replicated.
        DoRA's magnitude follows the output. linear_qkv's output per rank is (a/t + 2 * local KV heads) x d."""
        r, per_layer = config.rank, 0.0
        for target in config.target_modules:
            fan_in, fan_out = spec.linear_shape(target)
            if target == "linear_qkv":
                fan_out = (spec.num_attention_heads // tp + 2 * spec.local_kv_heads(tp)) * spec.kv_channels
                per_layer += r * fan_in + r * fan_out + (fan_out if cls.has_magnitude else 0)
            elif target == "linear_fc1":
                per_layer += r * fan_in + r * fan_out / tp + (fan_out / tp if cls.has_magnitude else 0)
            else:  # row-parallel: linear_proj, linear_fc2
                per_layer += r * fan_in / tp + r * fan_out + (fan_out if cls.has_magnitude else 0)
        if config.layers is not None:
            # Spread over all layers: exact in total, an average per stage (adapters are ~1% of a stage).
            per_layer *= len(config.layers) / spec.num_layers
        return per_layer, 0.0, 0.0

    @classmethod
    def check_recipe(cls, config, recipe, spec):
        layers = config.layers
        if layers is None:
            return
        bad = [i for i in layers if i >= spec.num_layers]
        if bad:
            raise ConfigError(f"peft.layers has {bad}, but {spec.name} has layers 0..{spec.num_layers - 1}")
        pp = recipe.parallel.pipeline
        first_stage = spec.num_layers // pp  # Megatron splits layers evenly over pipeline stages
        if pp > 1 and min(layers) >= first_stage:
            # Megatron's distributed checkpoint keeps the optimizer's common state (step count,
            # parameter groups) from global rank 0 only, which sits on the first stage.
            raise ConfigError(f"peft.layers={layers} puts no adapter on the first pipeline stage (layers "
                              f"0..{first_stage - 1} at parallel.pipeline={pp}); include one of them or use "
                              "parallel.pipeline=1")

    def lr_multipliers(self):
        # B is `adapter.up.weight` of every LoRALinear (DoRA's too); A keeps the schedule's rate.
        ratio = float(self.config.lr_ratio_b)
        return {} if ratio == 1.0 else {"*.adapter.up.weight": ratio}

    # Megatron linear -> the Hugging Face (Llama/Qwen2) projections it fuses, in output-row order.
    HF_TARGETS = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                  "linear_proj": ("self_attn", ("o_proj",)),
                  "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
                  "linear_fc2": ("mlp", ("down_proj",))}

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """HF PEFT LoRA: fused layers split into their projections. A fused layer has one A for all its
        outputs (B A x): each projection gets that A and its rows of B (q/k/v rows from Megatron's
        per-query-group interleaving, gate/up halves), which gives the same update as the fused pair.
        HF PEFT's scaling is lora_alpha / r as ours."""
        from nemo_adapt.models.weights import _split_qkv

        out: dict[str, torch.Tensor] = {}
        layers: set[int] = set()
        for name, tensor in tensors.items():
            parts = name.split(".")  # decoder.layers.<i>.<block>.<linear>.adapter.<down|up>.weight
            if len(parts) != 8 or parts[:2] != ["decoder", "layers"] or parts[5] != "adapter":
                raise ConfigError(f"LoRA tensor {name!r} is not decoder.layers.<i>.<block>.<linear>.adapter.<down|up>.weight")
            layer, linear, which = int(parts[2]), parts[4], parts[6]
            block, projections = cls.HF_TARGETS[linear]
            if which == "down":
                pieces = [tensor.clone() for _ in projections]  # one A per projection (HF PEFT's files)
            elif linear == "linear_qkv":
                pieces = list(_split_qkv(spec, tensor))
            elif linear == "linear_fc1":
                pieces = list(tensor.chunk(2, dim=0))
            else:
                pieces = [tensor]
            lora = "lora_A" if which == "down" else "lora_B"
            for proj, piece in zip(projections, pieces):
                out[f"base_model.model.model.layers.{layer}.{block}.{proj}.{lora}.weight"] = piece.contiguous()
            layers.add(layer)
        targets = [p for t in config.target_modules for p in cls.HF_TARGETS[t][1]]
        fields = {"peft_type": "LORA", "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                  "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                  "use_dora": False, "layers_to_transform": sorted(layers) if config.layers is not None else None}
        return fields, out

    hf_peft_type = "LORA"
    # Settings of an HF PEFT LoRA that change what it computes and have no form here, with their defaults.
    HF_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "lora_bias": False,
                      "layer_replication": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
                      "use_qalora": False}

    @classmethod
    def claims_hf_peft(cls, hf_config):
        return hf_config.get("peft_type") == "LORA" and not hf_config.get("use_dora", False)

    @classmethod
    def from_hf_peft(cls, hf_config, tensors, spec, base_tensor=None):
        """An HF PEFT LoRA adapter as ours: its projections fused back into linear_qkv / linear_fc1.

        HF PEFT keeps one (A, B) per `nn.Linear`; a fused Megatron layer takes one A for all its outputs.
        Per fused layer: when every adapted projection has the same A (our own exports, see `to_hf_peft`)
        it is that A, rank r; otherwise the A's are stacked, [A_q; A_v] of rank r_q + r_v, and each
        projection's B fills its output rows in its own columns, [[B_q, 0]; [0, 0]; [0, B_v]] for q/k/v,
        which is the same update (B_q A_q x on q's rows, nothing on k's). Projections and layers without
        an adapter get zero rows. Every layer is then padded with zero rows of A / columns of B to the
        largest rank R, and one scale s = alpha / R holds for all: alpha = s_ref * R with s_ref HF PEFT's
        lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), and a projection whose `rank_pattern` /
        `alpha_pattern` gives another scale s_p has its B multiplied by s_p / s_ref. The adapted model
        computes exactly what `PeftModel` does; further training starts from it (zero-padded parts of a
        layer receive no gradient through A = 0 unless their B is non-zero).

        Raises:
            ConfigError: a setting that changes the computation and has no form here (`bias`, `fan_in_fan_out`,
                `modules_to_save`, ...), a tensor on a module that is not one of the decoder layers' linear
                projections (embeddings, lm_head), a missing A or B, or a shape that is not the model's.
        """
        config, out, _ = cls._lora_from_hf(hf_config, tensors, spec)
        return config, out

    @classmethod
    def _lora_from_hf(cls, hf_config, tensors, spec, magnitudes: bool = False):
        """(LoRAConfig, our tensors, {(layer, linear): {projection: magnitude tensor}}) of an HF PEFT LoRA."""
        import math
        import re

        from nemo_adapt.models.weights import _fuse_qkv, hf_shapes

        for key, default in cls.HF_UNSUPPORTED.items():
            value = hf_config.get(key, default)
            if value != default and value not in ([], {}, None):
                raise ConfigError(f"HF PEFT LoRA setting {key}={value!r} has no nemo-adapt form (it needs "
                                  f"{key}={default!r}); merge the adapter in PEFT and import the merged model instead")
        of_projection = {proj: (linear, block, i) for linear, (block, projs) in cls.HF_TARGETS.items()
                         for i, proj in enumerate(projs)}
        blocks = {"self_attn": "self_attention", "mlp": "mlp"}
        pattern = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                             r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            m = pattern.match(name)
            if m is None or m.group(3) not in of_projection or of_projection[m.group(3)][1] != m.group(2):
                raise ConfigError(f"HF PEFT tensor {name!r} is not a LoRA tensor of a decoder layer's q/k/v/o, "
                                  "gate/up/down projection; adapters on other modules (embeddings, lm_head) "
                                  "have no nemo-adapt form")
            kind = m.group(4).split(".")[0]
            if kind == "lora_magnitude_vector" and not magnitudes:
                raise ConfigError(f"HF PEFT tensor {name!r} is a DoRA magnitude, but the config has use_dora false")
            layer = int(m.group(1))
            if layer >= spec.num_layers:
                raise ConfigError(f"HF PEFT tensor {name!r} is on layer {layer}, but {spec.name} has layers "
                                  f"0..{spec.num_layers - 1}")
            parts.setdefault((layer, m.group(3)), {})[kind] = tensor
        if not parts:
            raise ConfigError("HF PEFT LoRA adapter holds no lora_A / lora_B tensors")

        shapes = hf_shapes(spec)
        r_cfg = hf_config.get("r", 8)
        if not isinstance(r_cfg, int) or isinstance(r_cfg, bool) or r_cfg < 1:
            raise ConfigError(f"r={r_cfg!r} must be a positive integer (HF PEFT's LoraConfig.r)")
        alpha_cfg = hf_config.get("lora_alpha", 8)
        if not isinstance(alpha_cfg, int | float) or isinstance(alpha_cfg, bool):
            raise ConfigError(f"lora_alpha={alpha_cfg!r} must be a number (HF PEFT's LoraConfig.lora_alpha)")
        use_rslora = bool(hf_config.get("use_rslora", False))

        def scale_of(alpha: float, r: int) -> float:
            return alpha / math.sqrt(r) if use_rslora else alpha / r

        def alpha_for(module_key: str) -> float:
            for pat, value in (hf_config.get("alpha_pattern") or {}).items():
                if module_key == pat or re.match(rf"(.*\.)?({pat})$", module_key):
                    return float(value)
            return float(hf_config.get("lora_alpha", 8))

        s_ref = scale_of(float(hf_config.get("lora_alpha", 8)), r_cfg)
        # Per projection: A [r_p, in], B [out_p, r_p] already multiplied by s_p / s_ref.
        pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for (layer, proj), got in parts.items():
            where = f"layer {layer} {proj}"
            if "lora_A" not in got or "lora_B" not in got:
                raise ConfigError(f"HF PEFT LoRA adapter: {where} has {sorted(got)} but needs lora_A and lora_B")
            a, b = got["lora_A"], got["lora_B"]
            out_p, in_p = shapes[f"model.layers.{layer}.{of_projection[proj][1]}.{proj}.weight"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_p or b.shape[0] != out_p or a.shape[0] != b.shape[1]:
                raise ConfigError(f"HF PEFT LoRA adapter: {where} has lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)}; {spec.name} needs [r, {in_p}] and [{out_p}, r]")
            ratio = scale_of(alpha_for(f"model.layers.{layer}.{of_projection[proj][1]}.{proj}"), a.shape[0]) / s_ref
            pairs[(layer, proj)] = (a, b if ratio == 1.0 else b * ratio)

        linears = [t for t in LINEAR_TARGETS if any(of_projection[p][0] == t for _, p in pairs)]
        present_layers = sorted({layer for layer, _ in pairs})
        fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in present_layers:
            for linear in linears:
                block, projs = cls.HF_TARGETS[linear]
                have = [(p, pairs[(layer, p)]) for p in projs if (layer, p) in pairs]
                if not have:
                    continue
                a0 = have[0][1][0]
                if all(a.shape == a0.shape and torch.equal(a, a0) for _, (a, _) in have):
                    down, offsets = a0, {p: 0 for p, _ in have}  # one shared A: rank r
                else:
                    down = torch.cat([a for _, (a, _) in have])
                    starts = [0]
                    for _, (a, _) in have[:-1]:
                        starts.append(starts[-1] + a.shape[0])
                    offsets = {p: s for (p, _), s in zip(have, starts)}
                rank = down.shape[0]
                ups = []
                for p in projs:
                    out_p = shapes[f"model.layers.{layer}.{block}.{p}.weight"][0]
                    piece = down.new_zeros(out_p, rank)
                    if (layer, p) in pairs:
                        b = pairs[(layer, p)][1]
                        piece[:, offsets[p]:offsets[p] + b.shape[1]] = b
                    ups.append(piece)
                up = _fuse_qkv(spec, *ups) if linear == "linear_qkv" else torch.cat(ups)
                fused[(layer, linear)] = (down, up)
        rank = max(d.shape[0] for d, _ in fused.values())
        alpha = float(hf_config.get("lora_alpha", 8)) if rank == r_cfg and not use_rslora else s_ref * rank
        out: dict[str, torch.Tensor] = {}
        for layer in present_layers:
            for linear in linears:
                block, projs = cls.HF_TARGETS[linear]
                prefix = f"decoder.layers.{layer}.{blocks[block]}.{linear}.adapter"
                if (layer, linear) in fused:
                    down, up = fused[(layer, linear)]
                else:  # no adapter on this layer's linear in HF: an all-zero pair computes nothing
                    in_f = shapes[f"model.layers.{layer}.{block}.{projs[0]}.weight"][1]
                    out_f = sum(shapes[f"model.layers.{layer}.{block}.{p}.weight"][0] for p in projs)
                    dtype = next(iter(tensors.values())).dtype
                    down, up = torch.zeros(0, in_f, dtype=dtype), torch.zeros(out_f, 0, dtype=dtype)
                pad = rank - down.shape[0]
                out[f"{prefix}.down.weight"] = torch.cat([down, down.new_zeros(pad, down.shape[1])]).contiguous()
                out[f"{prefix}.up.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1).contiguous()
        layers = None if len(present_layers) == spec.num_layers else present_layers
        config = cls.config_class(rank=rank, alpha=alpha, dropout=float(hf_config.get("lora_dropout", 0.0) or 0.0),
                                  target_modules=linears, layers=layers)
        mags: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for (layer, proj), got in parts.items():
            if "lora_magnitude_vector" in got:
                mags.setdefault((layer, of_projection[proj][0]), {})[proj] = got["lora_magnitude_vector"]
        return config, out, mags

    def apply(self, model, seed=0):
        layers = self.config.layers
        num_layers = model.config.num_layers
        if layers is not None and max(layers) >= num_layers:
            bad = [i for i in layers if i >= num_layers]
            raise ConfigError(f"peft.layers has {bad}, but the model's layers are 0..{num_layers - 1}")
        return super().apply(model, seed)

    def transform(self, module, name):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in self.config.target_modules or not self._layer_selected(name):
            return module
        kind = linear_kind(module)
        if kind is None:
            return module
        glu = leaf == "linear_fc1" and module.config.gated_linear_unit
        return LoRALinear(module, kind, self.config, name_seed(self.seed, name), glu=glu,
                          layer_slot=self._layer_slot(name))

    def _layer_slot(self, name: str) -> tuple[int, int] | None:
        parts = name.split(".")
        if self.config.layers is None or parts[:2] != ["decoder", "layers"]:
            return None
        chosen = sorted(self.config.layers)
        return chosen.index(int(parts[2])), len(chosen)

    def _layer_selected(self, name: str) -> bool:
        parts = name.split(".")
        if self.config.layers is None or parts[:2] != ["decoder", "layers"]:
            return True
        return int(parts[2]) in self.config.layers

    def validate_matches(self, matched):
        if not matched and self.config.layers is not None:
            return  # a pipeline stage that holds none of peft.layers has nothing to adapt
        leaves = {m.rsplit(".", 1)[-1] for m in matched}
        missing = [t for t in self.config.target_modules if t not in leaves]
        if missing:
            raise ConfigError(f"peft.target_modules {missing} matched no module of the model; "
                              f"allowed: {', '.join(LINEAR_TARGETS)}")
