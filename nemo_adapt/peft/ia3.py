"""IA3: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638), section 3.3: (IA)^3, Infused Adapter by Inhibiting and Amplifying Inner
Activations.

Three learned vectors per layer rescale activations elementwise: l_k the keys, l_v the values (both
of width g*d: one entry per channel of every KV head) and l_ff the FFN intermediate activation
(width f, the input of linear_fc2). All start at one, so training starts at the base model.

Megatron-Core layout. Keys and values are part of the fused linear_qkv output, laid out per KV
group as [q heads of the group..., k, v]; the scaling vector of linear_qkv is therefore ones on the
query rows and l_k / l_v on each group's key and value rows. Under tensor parallelism linear_qkv is
column-parallel by whole KV groups and linear_fc2 row-parallel by FFN columns, so each rank holds
exactly its groups' slice of l_k, l_v and its columns' slice of l_ff; no communication is added.

Merge folds the vectors into the weights: rows of linear_qkv (and its bias) are scaled by the
vector, columns of linear_fc2 by l_ff; unmerge divides them out again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, register_peft
from nemo_adapt.peft.dora import mark_tp_sharded, vector_sharded_state_dict

IA3_TARGETS = ("keys", "values", "ffn")


@dataclass
class IA3Config(PeftConfig):
    """Learned rescaling of keys, values and FFN activations."""

    method: str = "ia3"
    """Registered method name."""
    targets: list[str] = field(default_factory=lambda: list(IA3_TARGETS))
    """Which activations get a vector: any of keys, values (linear_qkv output), ffn (linear_fc2 input)."""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ConfigError(f"peft.targets={self.targets!r} must be a non-empty list; "
                              f"allowed entries: {', '.join(IA3_TARGETS)}")
        for t in self.targets:
            if t not in IA3_TARGETS:
                raise ConfigError(f"peft.targets entry {t!r} is not an IA3 target; allowed: {', '.join(IA3_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"peft.targets={list(self.targets)!r} names a target twice")


class IA3Vectors(torch.nn.Module):
    """Scaling vectors of one layer's linear (this rank's shard), all split over TP along dim 0."""

    def __init__(self, sizes: dict[str, int], dtype: torch.dtype):
        super().__init__()
        for name, n in sizes.items():
            p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
            mark_tp_sharded(p)
            self.register_parameter(name, p)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return vector_sharded_state_dict(self, prefix, sharded_offsets, {n: 0 for n, _ in self.named_parameters()})


class IA3QKV(torch.nn.Module):
    """linear_qkv whose key and/or value rows are rescaled (same call signature and outputs)."""

    def __init__(self, base_layer: torch.nn.Module, targets: list[str]):
        super().__init__()
        from megatron.core import parallel_state as ps

        cfg = base_layer.config
        tp = ps.get_tensor_model_parallel_world_size()
        if cfg.num_query_groups is not None and cfg.num_query_groups < tp:
            raise ConfigError(f"peft.method=ia3 on keys/values needs parallel.tensor <= the model's KV groups "
                              f"({cfg.num_query_groups}); got parallel.tensor={tp}")
        if getattr(cfg, "attention_output_gate", False):
            raise ConfigError("peft.method=ia3 does not support attention with an output gate")
        self.base_layer = base_layer
        groups = cfg.num_query_groups or cfg.num_attention_heads
        self.groups_local = groups // tp
        self.q_per_group = cfg.num_attention_heads // groups
        self.head_dim = cfg.kv_channels
        self.targets = [t for t in ("keys", "values") if t in targets]
        width = self.groups_local * self.head_dim
        self.scaling = IA3Vectors({t: width for t in self.targets}, base_layer.weight.dtype)
        mark_adapter(self.scaling)
        self.merged = False
        self.adapter_enabled = True

    def row_scale(self) -> torch.Tensor:
        """Per local output row: 1 on queries, l_k on keys, l_v on values ([g_local * (q/g + 2) * d])."""
        g, d = self.groups_local, self.head_dim
        dtype = self.base_layer.weight.dtype
        ones = torch.ones(g, d, dtype=dtype, device=self.base_layer.weight.device)
        key = self.scaling.keys.view(g, d) if "keys" in self.targets else ones
        value = self.scaling.values.view(g, d) if "values" in self.targets else ones
        query = torch.ones(g, self.q_per_group * d, dtype=dtype, device=ones.device)
        return torch.cat([query, key, value], dim=1).reshape(-1)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        result, bias = out if isinstance(out, tuple) else (out, None)
        extra = None
        if isinstance(result, tuple):  # TE layer-norm linear returning (output, normed input)
            result, extra = result
        if not self.merged and self.adapter_enabled:
            # The output includes the bias (Megatron adds it inside unless skip_bias_add): HF PEFT also
            # scales k_proj(x) + b as a whole.
            scale = self.row_scale()
            result = result * scale
            if bias is not None:
                bias = bias * scale
        if extra is not None:
            result = (result, extra)
        return result, bias

    @torch.no_grad()
    def merge(self) -> None:
        """Scale the weight rows (and bias) of linear_qkv by the vectors."""
        if not self.merged:
            self._apply(self.row_scale())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`."""
        if self.merged:
            self._apply(1 / self.row_scale())
            self.merged = False

    def _apply(self, scale: torch.Tensor) -> None:
        self.base_layer.weight.mul_(scale[:, None].to(self.base_layer.weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and bias.numel():
            bias.mul_(scale.to(bias.dtype))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from nemo_adapt.peft.lora import children_sharded_state_dict

        return children_sharded_state_dict(self, prefix, sharded_offsets, metadata)


class IA3FFN(torch.nn.Module):
    """linear_fc2 whose input (the FFN intermediate activation, TP-split by columns) is rescaled."""

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer
        # linear_fc2 is [h, f/t]: one entry per local input column.
        self.scaling = IA3Vectors({"ffn": base_layer.weight.shape[1]}, base_layer.weight.dtype)
        mark_adapter(self.scaling)
        self.merged = False
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self.merged and self.adapter_enabled:
            x = x * self.scaling.ffn
        return self.base_layer(x, *args, **kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Scale the input columns of linear_fc2 by l_ff (its bias is added after the GEMM: unchanged)."""
        if not self.merged:
            self.base_layer.weight.mul_(self.scaling.ffn[None, :].to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`."""
        if self.merged:
            self.base_layer.weight.div_(self.scaling.ffn[None, :].to(self.base_layer.weight.dtype))
            self.merged = False

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from nemo_adapt.peft.lora import children_sharded_state_dict

        return children_sharded_state_dict(self, prefix, sharded_offsets, metadata)


@register_peft("ia3")
class IA3(PeftMethod):
    """IA3 (Liu et al. 2022): vectors on keys and values (linear_qkv) and on the input of linear_fc2."""

    config_class = IA3Config
    paper = ("Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
             "In-Context Learning, arXiv:2205.05638")
    merges_into_base = True  # key/value rows of linear_qkv scaled, linear_fc2's input columns scaled

    @classmethod
    def parameter_counts(cls, config, spec):
        """Per layer one vector per target: keys g*d, values g*d, the FFN activation f (llama3_8b: 16,384)."""
        widths = {"keys": spec.num_query_groups * spec.kv_channels,
                  "values": spec.num_query_groups * spec.kv_channels, "ffn": spec.ffn_hidden_size}
        comps = {f"ia3.{t}": spec.num_layers * widths[t] for t in config.targets}
        return comps, dict(comps)

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """The vectors follow their heads (local KV heads x d) and FFN columns (f / t)."""
        kv = spec.local_kv_heads(tp) * spec.kv_channels
        widths = {"keys": kv, "values": kv, "ffn": spec.ffn_hidden_size / tp}
        return float(sum(widths[t] for t in config.targets)), 0.0, 0.0

    # Our vector -> (HF module path under a decoder layer, whether HF PEFT treats it as feedforward).
    HF_TARGETS = {"keys": ("self_attn.k_proj", False), "values": ("self_attn.v_proj", False),
                  "ffn": ("mlp.down_proj", True)}

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """HF PEFT's IA3 (`peft_type: IA3`, `peft/tuners/ia3/layer.py`): one `ia3_l` vector per target
        `nn.Linear`; a module in `feedforward_modules` multiplies its input (`ia3_l` of shape
        [1, in_features]), any other multiplies its output, bias included (`ia3_l` [out_features, 1]).
        Files store it as `<module>.ia3_l` (adapter name removed).

        Ours maps exactly: l_k and l_v scale the key and value rows of the fused linear_qkv output, bias
        included, i.e. the outputs of HF's k_proj and v_proj (kv heads x head_dim rows, group-major as
        Megatron's per-group layout, so GQA needs no reordering); l_ff scales the input of linear_fc2,
        i.e. HF's down_proj as a feedforward module.

        Args:
            config: the `IA3Config` the adapter was trained with.
            tensors: the artifact's tensors (`decoder.layers.<i>.self_attention.linear_qkv.scaling.{keys,values}`,
                `decoder.layers.<i>.mlp.linear_fc2.scaling.ffn`, full TP-gathered shapes).
            spec: the base model's `ModelSpec` (vector widths checked against it).

        Returns:
            (adapter_config fields, tensors under HF PEFT's names).

        Raises:
            ConfigError: a tensor that is not an IA3 vector, or one whose width is not the model's.
        """
        widths = {"keys": spec.num_query_groups * spec.kv_channels, "values": spec.num_query_groups * spec.kv_channels,
                  "ffn": spec.ffn_hidden_size}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            parts = name.split(".")  # decoder.layers.<i>.<block>.<linear>.scaling.<keys|values|ffn>
            if (len(parts) != 7 or parts[:2] != ["decoder", "layers"] or parts[5] != "scaling"
                    or parts[6] not in cls.HF_TARGETS
                    or parts[4] != ("linear_fc2" if parts[6] == "ffn" else "linear_qkv")):
                raise ConfigError(f"IA3 tensor {name!r} is not decoder.layers.<i>.<block>.<linear>.scaling."
                                  "<keys|values|ffn>")
            which = parts[6]
            if tensor.shape != (widths[which],):
                raise ConfigError(f"IA3 vector {name!r} has shape {tuple(tensor.shape)}, but {spec.name}'s "
                                  f"{which} width is {widths[which]}")
            module, feedforward = cls.HF_TARGETS[which]
            # HF's shapes: [1, in] scales a feedforward module's input, [out, 1] any other's output.
            shaped = tensor.reshape(1, -1) if feedforward else tensor.reshape(-1, 1)
            out[f"base_model.model.model.layers.{int(parts[2])}.{module}.ia3_l"] = shaped.contiguous()
        targets = sorted(cls.HF_TARGETS[t][0].rsplit(".", 1)[1] for t in config.targets)
        feedforward = sorted(cls.HF_TARGETS[t][0].rsplit(".", 1)[1] for t in config.targets if cls.HF_TARGETS[t][1])
        fields = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
                  "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
        return fields, out

    hf_peft_type = "IA3"

    @classmethod
    def from_hf_peft(cls, hf_config, tensors, spec, base_tensor=None):
        """An HF PEFT IA3 adapter as ours (the inverse of `to_hf_peft`): `ia3_l` of k_proj / v_proj
        ([out, 1], scaling outputs) become the key / value vectors, down_proj's ([1, in], a feedforward
        module scaling its input) the ffn vector. Layers the adapter leaves alone get vectors of ones.

        Raises:
            ConfigError: a vector on another module (q_proj, o_proj, gate/up_proj, or down_proj scaling its
                output), `fan_in_fan_out` / `modules_to_save`, or a shape that is not the model's.
        """
        import re

        for key in ("fan_in_fan_out", "modules_to_save"):
            if hf_config.get(key):
                raise ConfigError(f"HF PEFT IA3 setting {key}={hf_config[key]!r} has no nemo-adapt form")
        kv = spec.num_query_groups * spec.kv_channels
        # HF module -> (our target, the shape HF PEFT stores: [out, 1] scales outputs, [1, in] inputs).
        ours = {"k_proj": ("keys", (kv, 1)), "v_proj": ("values", (kv, 1)), "down_proj": ("ffn", (1, spec.ffn_hidden_size))}
        pattern = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.ia3_l$")
        vectors: dict[tuple[int, str], torch.Tensor] = {}
        for name, tensor in tensors.items():
            m = pattern.match(name)
            if m is None or m.group(3) not in ours or int(m.group(1)) >= spec.num_layers:
                raise ConfigError(f"HF PEFT tensor {name!r} has no nemo-adapt IA3 form: ours scales the outputs of "
                                  f"k_proj and v_proj and the input of down_proj in layers 0..{spec.num_layers - 1}")
            target, shape = ours[m.group(3)]
            if tuple(tensor.shape) != shape:
                how = "input (a feedforward module)" if shape[0] == 1 else "output"
                raise ConfigError(f"HF PEFT IA3 vector {name!r} has shape {list(tensor.shape)}; nemo-adapt scales "
                                  f"{m.group(3)}'s {how}, shape {list(shape)}")
            vectors[(int(m.group(1)), target)] = tensor.reshape(-1)
        if not vectors:
            raise ConfigError("HF PEFT IA3 adapter holds no ia3_l tensors")
        targets = [t for t in IA3_TARGETS if any(t == target for _, target in vectors)]
        dtype = next(iter(vectors.values())).dtype
        out = {}
        for layer in range(spec.num_layers):
            for target in targets:
                linear = "mlp.linear_fc2" if target == "ffn" else "self_attention.linear_qkv"
                width = spec.ffn_hidden_size if target == "ffn" else kv
                vec = vectors.get((layer, target), torch.ones(width, dtype=dtype))
                out[f"decoder.layers.{layer}.{linear}.scaling.{target}"] = vec.contiguous()
        return cls.config_class(targets=targets), out

    def transform(self, module, name):
        from nemo_adapt.peft.lora import linear_kind

        leaf = name.rsplit(".", 1)[-1]
        targets = self.config.targets
        if leaf == "linear_qkv" and ("keys" in targets or "values" in targets) and linear_kind(module) == "column":
            return IA3QKV(module, targets)
        if leaf == "linear_fc2" and "ffn" in targets and linear_kind(module) == "row":
            return IA3FFN(module)
        return module

    def validate_matches(self, matched):
        leaves = {m.rsplit(".", 1)[-1] for m in matched}
        needed = {"keys": "linear_qkv", "values": "linear_qkv", "ffn": "linear_fc2"}
        missing = [t for t in self.config.targets if needed[t] not in leaves]
        if missing:
            raise ConfigError(f"peft.targets {missing} matched no module of the model (IA3 needs "
                              f"{', '.join(sorted({needed[t] for t in missing}))}); allowed: {', '.join(IA3_TARGETS)}")
