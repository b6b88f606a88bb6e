"""Adapter layers: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751).

A bottleneck module after the attention block and/or after the MLP of every transformer layer:

    serial   (Houlsby):  y = f(x) + up(act(down(f(x))))          f = the sublayer, x its input
    parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
              arXiv:2110.04366):  y = f(x) + up(act(down(x)))

followed by the layer's own residual add. `up` starts at zero, so step 0 equals the base model.

Tensor parallelism. The sublayer output reaching the adapter is the full hidden state (after the
row-parallel all-reduce; under sequence parallelism a sequence shard). The bottleneck is split over
TP like a small MLP, as Megatron's own MLP is: `down` is column-parallel (h -> bn/t per rank) and `up`
row-parallel (bn/t -> h, all-reduced). Megatron's parallel linears carry the communication and
make the gradients of the replicated input and of `up`'s bias equal on every TP rank; with sequence
parallelism they all-gather the sequence in and reduce-scatter it out, so the adapter keeps the
layout it was given. `parallel` placement reads the sublayer's input: the normalised hidden states
with Megatron's local layers (on CPU); with Transformer Engine's fused layer-norm linears the norm is
inside the sublayer and the adapter sees the residual stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, name_seed, register_peft
from nemo_adapt.validation import check_positive

PLACEMENTS = ("attention", "mlp")
ACTIVATIONS = {"relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu,
               "silu": torch.nn.functional.silu, "tanh": torch.tanh}
MODES = ("serial", "parallel")


@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters after attention and/or the MLP of every layer."""

    method: str = "adapter"
    """Registered method name."""
    bottleneck: int = 32
    """Bottleneck width bn (down: hidden -> bn, up: bn -> hidden); divisible by parallel.tensor."""
    placements: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    """Where adapters go: any of attention (after the attention block), mlp (after the MLP)."""
    mode: str = "serial"
    """serial: the adapter transforms the sublayer output (Houlsby); parallel: it reads the sublayer input."""
    activation: str = "gelu"
    """Bottleneck non-linearity: relu, gelu, silu or tanh."""
    dropout: float = 0.0
    """Dropout on the adapter output, before it is added."""
    bias: bool = True
    """Biases on the down (bn) and up (hidden) projections."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("peft.bottleneck", self.bottleneck)
        if not isinstance(self.placements, (list, tuple)) or not self.placements:
            raise ConfigError(f"peft.placements={self.placements!r} must be a non-empty list; "
                              f"allowed entries: {', '.join(PLACEMENTS)}")
        for p in self.placements:
            if p not in PLACEMENTS:
                raise ConfigError(f"peft.placements entry {p!r} is not a placement; allowed: {', '.join(PLACEMENTS)}")
        if len(set(self.placements)) != len(self.placements):
            raise ConfigError(f"peft.placements={list(self.placements)!r} names a placement twice")
        if self.mode not in MODES:
            raise ConfigError(f"peft.mode={self.mode!r} is not a placement mode; allowed: {', '.join(MODES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation={self.activation!r} is not supported; "
                              f"allowed: {', '.join(ACTIVATIONS)}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"peft.bias={self.bias!r} must be true or false")


class Bottleneck(torch.nn.Module):
    """down (column-parallel) -> activation -> up (row-parallel); input and output [s, b, h]."""

    def __init__(self, hidden: int, config: AdapterConfig, mcfg, seed: int):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp = ps.get_tensor_model_parallel_world_size()
        if config.bottleneck % tp:
            raise ConfigError(f"peft.bottleneck={config.bottleneck} must be divisible by parallel.tensor={tp} "
                              "(the bottleneck is split over tensor-parallel ranks)")

        def no_init(w):
            return w

        group = ps.get_tensor_model_parallel_group()
        self.down = ColumnParallelLinear(hidden, config.bottleneck, config=mcfg, init_method=no_init,
                                         bias=config.bias, gather_output=False, skip_bias_add=False, tp_group=group)
        self.up = RowParallelLinear(config.bottleneck, hidden, config=mcfg, init_method=no_init, bias=config.bias,
                                    input_is_parallel=True, skip_bias_add=False, tp_group=group)
        self.act = ACTIVATIONS[config.activation]
        self.reset_parameters(hidden, config.bottleneck, seed)

    @torch.no_grad()
    def reset_parameters(self, hidden: int, bottleneck: int, seed: int) -> None:
        """down ~ U(-1/sqrt(h), 1/sqrt(h)) drawn whole and sliced per TP rank; up and biases zero."""
        from megatron.core import parallel_state as ps

        gen = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(hidden)
        full = (torch.rand(bottleneck, hidden, generator=gen) * 2 - 1) * bound
        full = full.chunk(ps.get_tensor_model_parallel_world_size(), dim=0)[ps.get_tensor_model_parallel_rank()]
        self.down.weight.copy_(full.to(self.down.weight.dtype))
        self.up.weight.zero_()
        for layer in (self.down, self.up):
            if layer.bias is not None:
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.down(x)
        y, _ = self.up(self.act(h))
        return y

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from nemo_adapt.peft.lora import children_sharded_state_dict

        return children_sharded_state_dict(self, prefix, sharded_offsets, metadata)


class AdaptedSublayer(torch.nn.Module):
    """An attention block or MLP followed by a bottleneck adapter; same call signature and outputs.

    Attributes of the wrapped sublayer (e.g. `linear_qkv`, which Megatron's layer reads) are reached
    through this wrapper.
    """

    def __init__(self, base_layer: torch.nn.Module, config: AdapterConfig, seed: int):
        super().__init__()
        self.base_layer = base_layer
        mcfg = base_layer.config
        self.adapter = Bottleneck(mcfg.hidden_size, config, mcfg, seed)
        mark_adapter(self.adapter)
        self.mode = config.mode
        self.dropout = torch.nn.Dropout(config.dropout) if config.dropout else None
        self.sequence_parallel = mcfg.sequence_parallel
        self.adapter_enabled = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(hidden_states, *args, **kwargs)
        if not self.adapter_enabled:
            return output, bias
        if self.mode == "serial":
            # Megatron returns the projection bias separately (added with the residual): the adapter
            # sees the sublayer's full output, f(x) = output + bias.
            source = output if bias is None else output + bias
        else:
            source = hidden_states
        delta = self.adapter(source)
        if self.dropout is not None and self.training:
            if self.sequence_parallel:
                # Sequence shards differ per TP rank: each needs its own mask (Megatron's TP RNG stream).
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                with get_cuda_rng_tracker().fork():
                    delta = self.dropout(delta)
            else:
                delta = self.dropout(delta)  # replicated over TP: the default stream is the same on each rank
        return output + delta, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The wrapped sublayer keeps its own keys (no `base_layer.`); the adapter is under `adapter.`."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = sharded_state_dict_default(self.base_layer, prefix, sharded_offsets, metadata,
                                        tp_group=ps.get_tensor_model_parallel_group())
        sd.update(sharded_state_dict_default(self.adapter, f"{prefix}adapter.", sharded_offsets, metadata,
                                             tp_group=ps.get_tensor_model_parallel_group()))
        return sd


@register_peft("adapter")
class Adapter(PeftMethod):
    """Houlsby bottleneck adapters after the attention block and/or the MLP of every transformer layer."""

    config_class = AdapterConfig
    paper = "Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP, arXiv:1902.00751"
    resume_safe_fields = ("dropout", "mode", "activation")
    training_fields = ("dropout",)

    merge_note = ("Houlsby adapters add non-linear layers, which no linear weight holds; serve the nemo-adapt "
                  "adapter artifact with nemo-adapt, or train LoRA, DoRA or IA3 for a merged model")

    @classmethod
    def parameter_counts(cls, config, spec):
        """Per layer and placement a down projection h x bn and an up projection bn x h (2 h bn), plus biases
        bn + h when `bias`. E.g. llama3_8b, bn 32, both placements: 64 x 266,272."""
        h, bn, layers = spec.hidden_size, config.bottleneck, spec.num_layers
        comps = {}
        for placement in config.placements:
            comps[f"adapter_{placement}.weights"] = layers * 2 * h * bn
            if config.bias:
                comps[f"adapter_{placement}.biases"] = layers * (bn + h)
        return comps, dict(comps)

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """The bottleneck is split over TP (down column-parallel, up row-parallel); the up bias is replicated."""
        h, bn = spec.hidden_size, config.bottleneck
        per_placement = 2 * h * bn / tp + ((bn / tp + h) if config.bias else 0)
        return len(config.placements) * per_placement, 0.0, 0.0

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """Houlsby adapters are extra non-linear layers: HF PEFT has no such adapter type and they cannot be
        folded into the base's linear weights."""
        raise ConfigError("peft.method=adapter (Houlsby bottleneck adapters) has no Hugging Face PEFT form and "
                          "cannot be merged into the base weights (they add non-linear layers); serve the "
                          "nemo-adapt adapter artifact with nemo-adapt, or train LoRA for HF PEFT serving")

    def transform(self, module, name):
        parent, _, leaf = name.rpartition(".")
        placement = {"self_attention": "attention", "mlp": "mlp"}.get(leaf)
        # Only the direct sublayers of a transformer layer (`decoder.layers.<i>.<leaf>`).
        if placement not in self.config.placements or not parent.startswith("decoder.layers.") \
                or parent.count(".") != 2 or type(module).__name__ == "IdentityOp":
            return module
        return AdaptedSublayer(module, self.config, name_seed(self.seed, name))

    def validate_matches(self, matched):
        leaves = {m.rsplit(".", 1)[-1] for m in matched}
        wanted = {"attention": "self_attention", "mlp": "mlp"}
        missing = [p for p in self.config.placements if wanted[p] not in leaves]
        if missing:
            raise ConfigError(f"peft.placements {missing} matched no sublayer of the model; "
                              f"allowed: {', '.join(PLACEMENTS)}")
