"""Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190).

Every attention layer gets n trainable keys and values that its queries attend before the
sequence's own (GQA: one prefix per KV head, i.e. query group). Saved/served parameters:
2 * L * n * g * d. Under TP each rank holds the prefixes of its own query groups (split over
heads); under PP each layer's prefix lives on the stage that owns the layer.

Reparameterisation (the paper's stabilising trick, default on): while training, the prefixes are
MLP(E) with a trainable E [n, h] and an MLP h -> H (tanh) -> 2 * L * g * d. E and the first linear
layer are shared by all layers, so they are replicated on every rank (gradients summed over the
TP x PP group, see `virtual_tokens.with_shared_grad_reduction`); the output layer's rows belong to
one layer and one KV head each, so each layer holds its own rows, split over TP like the prefixes.
`collapse()` evaluates the MLP once and keeps only the prefixes.

Prefix keys carry no rotary position (they are prepended after RoPE, as Hugging Face PEFT's
`past_key_values`), never enter the KV cache, and are visible to every query, including every
example of a packed row. See `virtual_tokens` for the shared rules. Unlike ours, HF PEFT's real
tokens take positions n, n + 1, ... behind the prefix; `PrefixTuning.to_hf_peft` exports the
collapsed prefixes with the keys rotated to position n, which gives HF PEFT our attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_adapt.data.packing import causal_chunk_mask
from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, name_seed, register_peft
from nemo_adapt.peft.virtual_tokens import mark_model_parallel_shared, model_device, seeded, sharded_params
from nemo_adapt.validation import check_positive


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Trainable key/value prefixes in every attention layer."""

    method: str = "prefix_tuning"
    """Registered method name."""
    num_prefix_tokens: int = 20
    """Prefix length n: keys and values added in front of every layer's keys and values."""
    reparameterize: bool = True
    """Train the prefixes as MLP(embedding) (Li & Liang 2021) and collapse after; false: train them directly."""
    reparam_hidden: int = 512
    """Hidden width H of the reparameterisation MLP (Li & Liang use 512 for GPT-2)."""
    init_std: float = 1.0
    """Std of the normal init of the prefixes (reparameterize=false) or of the MLP's input embedding
    (1.0 = torch.nn.Embedding's default, as Hugging Face PEFT)."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("peft.num_prefix_tokens", self.num_prefix_tokens)
        if not isinstance(self.reparameterize, bool):
            raise ConfigError(f"peft.reparameterize={self.reparameterize!r} must be true or false")
        check_positive("peft.reparam_hidden", self.reparam_hidden)
        check_positive("peft.init_std", self.init_std, integer=False)


class PrefixEncoder(torch.nn.Module):
    """The shared part of the reparameterisation: tanh(Linear(E)), E [n, h] -> [n, H]."""

    def __init__(self, n: int, h: int, hidden: int, std: float):
        super().__init__()
        self.embedding = torch.nn.Parameter(torch.randn(n, h) * std)
        self.down = torch.nn.Linear(h, hidden)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.down(self.embedding))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Replicated on every TP and PP rank and model chunk; the primary copy (the embedding's chunk) writes it."""
        return sharded_params(self, prefix, sharded_offsets, replica=0 if getattr(self, "primary_copy", True) else 1)


def prefix_attention_mask(attention_mask: torch.Tensor | None, n: int, sq: int, sk: int,
                          device: torch.device) -> torch.Tensor:
    """Megatron boolean mask (True = masked) [b or 1, 1, sq, n + sk] for n prefix keys + sk keys.

    Prefix columns are never masked. Without a given mask the real keys are causal, aligned at the
    end: query i is position sk - sq + i, which covers training and prefill (sq = sk) and KV-cache
    decode steps (sq = 1, every cached key visible). A given mask (packed rows) is kept as is.
    """
    real = causal_chunk_mask(sq, sk, device) if attention_mask is None else attention_mask.to(torch.bool)
    if n == 0:
        return real
    prefix = torch.zeros(*real.shape[:-1], n, dtype=torch.bool, device=real.device)
    return torch.cat([prefix, real], dim=-1)


class PrefixAttention(torch.nn.Module):
    """A Megatron-Core core attention (local or Transformer Engine) with key/value prefixes."""

    def __init__(self, base_layer: torch.nn.Module, config: PrefixTuningConfig, seed: int, encoder: PrefixEncoder | None):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
        from megatron.core.transformer.enums import AttnMaskType

        self.base_layer = base_layer
        self.adapter_enabled = True
        mc = base_layer.config
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        g, d, n = mc.num_query_groups, mc.kv_channels, config.num_prefix_tokens
        gl = g // tp
        self.n, self.groups, self.head_dim = n, gl, d
        dtype, device = mc.params_dtype, model_device()
        # Full (all-heads) tensors from a per-layer seed, then this rank's query groups: the same
        # prefixes at every TP size.
        gen = torch.Generator().manual_seed(seed)
        self._encoder = [encoder] if encoder is not None else []  # a list: not a submodule of each layer
        if encoder is None:
            for name in ("prefix_key", "prefix_value"):
                full = torch.randn(n, g, d, generator=gen) * config.init_std
                p = torch.nn.Parameter(full[:, r * gl:(r + 1) * gl].to(device, dtype).contiguous())
                set_tensor_model_parallel_attributes(p, True, 1, 1)
                setattr(self, name, p)
            self.tp_axes = {"prefix_key": 1, "prefix_value": 1}
        else:
            # This layer's rows of the MLP's output layer, H -> g*d for keys and for values, with
            # torch.nn.Linear's default init U(-1/sqrt(H), 1/sqrt(H)).
            hid = config.reparam_hidden
            bound = hid ** -0.5
            rows = slice(r * gl * d, (r + 1) * gl * d)
            for name, shape in (("key_weight", (g * d, hid)), ("key_bias", (g * d,)),
                                ("value_weight", (g * d, hid)), ("value_bias", (g * d,))):
                full = (torch.rand(*shape, generator=gen) * 2 - 1) * bound
                p = torch.nn.Parameter(full[rows].to(device, dtype).contiguous())
                set_tensor_model_parallel_attributes(p, True, 0, 1)
                setattr(self, name, p)
            self.tp_axes = {"key_weight": 0, "key_bias": 0, "value_weight": 0, "value_bias": 0}
        for name in self.tp_axes:
            mark_adapter(getattr(self, name))
        softmax = getattr(base_layer, "scale_mask_softmax", None)
        if softmax is not None:
            # Local attention: this wrapper always passes an explicit mask, which the softmax must
            # use (its causal mode would build its own [s, s] mask, and a fused causal kernel
            # ignores the mask).
            softmax.attn_mask_type = AttnMaskType.padding

    @property
    def reparameterized(self) -> bool:
        return bool(self._encoder)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's key and value prefixes, each [n, local query groups, head dim]."""
        if not self.reparameterized:
            return self.prefix_key, self.prefix_value
        hidden = self._encoder[0]()  # [n, H]
        shape = (self.n, self.groups, self.head_dim)
        return (F.linear(hidden, self.key_weight, self.key_bias).view(shape),
                F.linear(hidden, self.value_weight, self.value_bias).view(shape))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None:
            raise NotImplementedError("prefix tuning does not support the THD packed-sequence format; "
                                      "packed rows use the block-diagonal attention mask instead")
        n = 0
        if self.adapter_enabled:
            pk, pv = self.prefixes()
            n, b = pk.shape[0], key.shape[1]
            key = torch.cat([pk.unsqueeze(1).expand(-1, b, -1, -1).to(key.dtype), key], dim=0)
            value = torch.cat([pv.unsqueeze(1).expand(-1, b, -1, -1).to(value.dtype), value], dim=0)
        mask = prefix_attention_mask(attention_mask, n, query.shape[0], key.shape[0] - n, query.device)
        return self.base_layer(query, key, value, mask, attn_mask_type=AttnMaskType.arbitrary,
                               attention_bias=attention_bias, packed_seq_params=None, **kwargs)

    @torch.no_grad()
    def collapse(self) -> bool:
        """Replace the reparameterisation by its output: static prefixes (trainable, marked adapter)."""
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        if not self.reparameterized:
            return False
        k, v = self.prefixes()
        for name in self.tp_axes:
            delattr(self, name)
        for name, t in (("prefix_key", k), ("prefix_value", v)):
            p = torch.nn.Parameter(t.detach().clone())
            set_tensor_model_parallel_attributes(p, True, 1, 1)
            mark_adapter(p)
            setattr(self, name, p)
        self.tp_axes = {"prefix_key": 1, "prefix_value": 1}
        self._encoder = []
        return True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Prefixes (or output rows) split over TP along the query groups; the base layer as before."""
        sd = {}
        if hasattr(self.base_layer, "sharded_state_dict"):
            sd.update(self.base_layer.sharded_state_dict(prefix=f"{prefix}base_layer.",
                                                         sharded_offsets=sharded_offsets, metadata=metadata))
        sd.update(sharded_params(self, prefix, sharded_offsets, tp_axes=self.tp_axes, skip=("base_layer",)))
        return sd


def _rotary_inv_freq(spec) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2] our model uses for `spec` (Megatron-Core's own computation,
    built as `models.builder` builds the GPTModel's, on the CPU)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = spec.rope_scaling
    base = int(spec.rope_theta) if float(spec.rope_theta).is_integer() else float(spec.rope_theta)
    return RotaryEmbedding(spec.kv_channels, 1.0, rotary_base=base, rope_scaling=rope is not None,
                           rope_scaling_factor=rope.factor if rope else 8.0, use_cpu_initialization=True).inv_freq


def rotate_keys(key: torch.Tensor, position: int, spec) -> torch.Tensor:
    """Keys [..., head_dim] rotated by RoPE to `position` (negative: back), as Megatron-Core and transformers
    rotate (rotate-half layout) with this spec's frequencies; computed in float64, returned as float32."""
    angle = position * _rotary_inv_freq(spec).double()  # one angle per rotary pair
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()
    key = key.double()
    x1, x2 = key.chunk(2, dim=-1)
    return (key * cos + torch.cat([-x2, x1], dim=-1) * sin).float()


@register_peft("prefix_tuning")
class PrefixTuning(PeftMethod):
    """Prefix tuning (Li & Liang 2021) on every self-attention layer's core attention."""

    supports_context_parallel = False
    context_parallel_note = ("its prefixes are joined to each rank's keys and values around the core attention, "
                             "while context-parallel attention passes keys and values between ranks inside it")
    config_class = PrefixTuningConfig
    merge_note = ("its prefixes are extra keys and values in every attention layer, not a change of any weight; "
                  "export it as a Hugging Face PEFT adapter instead (--format peft, PREFIX_TUNING)")
    paper = "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, arXiv:2101.00190"
    resume_safe_fields = ("init_std",)  # used only when the prefix is created
    training_fields = ("init_std",)

    @classmethod
    def parameter_counts(cls, config, spec):
        """Keys and values for every layer on the KV heads: 2 * n_prefix * g * d per layer (saved). With
        reparameterisation (default) training instead optimises an n_prefix x h embedding and an MLP
        h -> H -> 2*L*g*d with biases, whose output is what is saved."""
        n, h = config.num_prefix_tokens, spec.hidden_size
        kv_width = 2 * spec.num_layers * spec.num_query_groups * spec.kv_channels  # keys + values of every layer
        saved = {"prefix.keys_values": n * kv_width}
        if not config.reparameterize:
            return saved, dict(saved)
        hid = config.reparam_hidden
        return {"prefix.embedding": n * h, "prefix.mlp": (h * hid + hid) + (hid * kv_width + kv_width)}, saved

    @classmethod
    def attended_tokens(cls, config):
        return config.num_prefix_tokens

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """Prefixes split by layer and local KV head. Reparameterised: the embedding n x h and the first Linear
        h -> H are shared by all layers (replicated on every rank); each layer holds its rows of the output
        Linear (keys and values of its local KV heads, with biases)."""
        kv = spec.local_kv_heads(tp) * spec.kv_channels
        if not config.reparameterize:
            return float(2 * config.num_prefix_tokens * kv), 0.0, 0.0
        hid = config.reparam_hidden
        every = float(config.num_prefix_tokens * spec.hidden_size + spec.hidden_size * hid + hid)
        return float(2 * kv * (hid + 1)), 0.0, every

    _encoder: PrefixEncoder | None = None

    def _shared_encoder(self, mc) -> PrefixEncoder | None:
        if not self.config.reparameterize:
            return None
        if self._encoder is None:
            c = self.config
            with seeded(name_seed(self.seed, "prefix_encoder")):
                enc = PrefixEncoder(c.num_prefix_tokens, mc.hidden_size, c.reparam_hidden, c.init_std)
            self._encoder = enc.to(model_device(), mc.params_dtype)
            mark_adapter(self._encoder)
        return self._encoder

    def transform(self, module, name):
        if not name.endswith("self_attention.core_attention") or isinstance(module, PrefixAttention):
            return module
        return PrefixAttention(module, self.config, name_seed(self.seed, name), self._shared_encoder(module.config))

    def validate_matches(self, matched):
        if not matched:
            raise ConfigError("peft.method=prefix_tuning found no self_attention.core_attention module in the model")

    def apply_model_level(self, model):
        if self._encoder is not None:
            model.prefix_encoder = self._encoder
            mark_model_parallel_shared(self._encoder, primary=bool(model.pre_process))

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """Hugging Face PEFT's `PREFIX_TUNING` form (`prefix_projection: false`): the collapsed prefixes.

        Format (peft 0.21.2): `prompt_embeddings` [n, L * 2 * token_dim] is the prefix encoder's embedding;
        `PeftModel.get_prompt` views it as [b, n, L * 2, heads, token_dim / heads], permutes to
        [L * 2, b, heads, n, head_dim] and splits it into per-layer (key, value) pairs, so the last dim runs
        layer-major, key before value, then KV head, then head dim. `_prepare_prompt_learning_config` sets
        heads = the base config's `num_key_value_heads` and token_dim = heads * head_dim for grouped-query
        attention, which is our [n, query groups, head dim] per layer. The pairs become a `DynamicCache`
        that the base model's attention extends with the real tokens' keys and values: cached keys are used
        as stored, so the prefix keys are not rotated, as ours.

        One difference in positions: HF PEFT puts the real tokens after the cache, at positions n, n + 1, ...
        (`cache_position` from the cache length in `forward`, `cache_position += n` at prefill in
        `prepare_inputs_for_generation`), while our prefixes take no position (real tokens at 0, 1, ...).
        Between real tokens RoPE scores depend only on the position difference, which is the same. Against
        a prefix key they would not: HF's query at i + n meets the un-rotated key k with (R(i + n) q) . k, ours
        at i with (R(i) q) . k. RoPE rotations compose, (R(a) q) . (R(b) k) = (R(a - b) q) . k, so the export
        stores every prefix key as R(n) k, rotated to position n with our model's rotary frequencies
        (Megatron-Core's `RotaryEmbedding` of this spec, llama3 scaling included): HF's score
        (R(i + n) q) . (R(n) k) = (R(i) q) . k is ours, in `forward` and in `generate`. Values are as they are.

        Generating with the export in peft 0.21.2 under transformers 5 needs `generate(..., use_cache=False)`:
        peft's `prepare_inputs_for_generation` looks for the KV cache under `past_key_values`, which
        transformers 5 passes as `cache`, so with a cache it starts a fresh prefix-only cache at every decode
        step and the continuation is wrong (`forward` is unaffected).

        The reparameterisation MLP (if the artifact still has it, as training saves it) is evaluated once
        in float32; the table is stored in the artifact's dtype.

        Args:
            config: the method's config (as trained).
            tensors: the adapter artifact's tensors: `prefix_encoder.*` with each layer's
                `...core_attention.{key,value}_{weight,bias}` (reparameterised), or each layer's
                `...core_attention.prefix_{key,value}` [n, groups, head dim].
            spec: the base model's `ModelSpec`.

        Returns:
            (adapter_config fields, {"prompt_embeddings": [n, num_layers * 2 * groups * head_dim]}).

        Raises:
            ConfigError: a layer's prefixes are missing or have the wrong shape.
        """
        n, g, d = config.num_prefix_tokens, spec.num_query_groups, spec.kv_channels
        hidden = None
        if "prefix_encoder.embedding" in tensors:
            try:
                hidden = torch.tanh(F.linear(tensors["prefix_encoder.embedding"].float(),
                                             tensors["prefix_encoder.down.weight"].float(),
                                             tensors["prefix_encoder.down.bias"].float()))  # [n, H]
            except (KeyError, RuntimeError) as err:
                raise ConfigError(f"prefix tuning artifact: incomplete or misshapen prefix_encoder.*: {err}") from err
        dtype = next(iter(tensors.values())).dtype
        layers = []
        for layer in range(spec.num_layers):
            name = f"decoder.layers.{layer}.self_attention.core_attention"
            try:
                if hidden is not None:
                    key, value = (F.linear(hidden, tensors[f"{name}.{kv}_weight"].float(),
                                           tensors[f"{name}.{kv}_bias"].float()) for kv in ("key", "value"))
                else:
                    key, value = tensors[f"{name}.prefix_key"].float(), tensors[f"{name}.prefix_value"].float()
                key, value = key.reshape(n, g, d), value.reshape(n, g, d)
            except (KeyError, RuntimeError) as err:
                raise ConfigError(f"prefix tuning artifact: layer {layer}'s prefixes are missing or not "
                                  f"{n} x {g} x {d} (tokens x query groups x head dim): {err}") from err
            key = rotate_keys(key, n, spec)
            layers.append(torch.stack([key.float(), value], dim=1))  # [n, 2, g, d]: key then value
        table = torch.stack(layers, dim=1).reshape(n, spec.num_layers * 2 * g * d).to(dtype)
        fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n, "token_dim": g * d,
                  "num_transformer_submodules": 1, "num_attention_heads": g, "num_layers": spec.num_layers,
                  "encoder_hidden_size": g * d, "prefix_projection": False,
                  "nemo_adapt": {"prefix_keys": f"rotated by RoPE position {n}: HF PEFT places the real tokens "
                                                f"at positions {n}.. after the prefix, ours at 0.."}}
        return fields, {"prompt_embeddings": table.contiguous()}

    hf_peft_type = "PREFIX_TUNING"

    @classmethod
    def from_hf_peft(cls, hf_config, tensors, spec, base_tensor=None):
        """An HF PEFT `PREFIX_TUNING` adapter as ours (the inverse of `to_hf_peft`): the table
        [n, L * 2 * g * d] split into each layer's key and value prefixes, the keys rotated back by RoPE
        position -n (HF PEFT's real tokens sit at n, n + 1, ... behind the prefix, ours at 0, 1, ...).
        The prefixes are trained directly from then on (`reparameterize: false`): HF PEFT saves the table,
        not its projection MLP. A table saved by HF PEFT itself with `prefix_projection: true` is the MLP's
        output, the same table.

        Raises:
            ConfigError: other tensors, or a table whose layers, KV heads or head size are not the model's.
        """
        table = tensors.get("prompt_embeddings")
        n, layers, g, d = int(hf_config.get("num_virtual_tokens") or 0), spec.num_layers, spec.num_query_groups, spec.kv_channels
        if set(tensors) != {"prompt_embeddings"} or table is None:
            raise ConfigError(f"HF PEFT prefix tuning adapter should hold only prompt_embeddings; it holds "
                              f"{sorted(tensors)[:4]}")
        if table.dim() != 2 or tuple(table.shape) != (n, layers * 2 * g * d):
            raise ConfigError(f"HF PEFT prefix tuning table is {list(table.shape)}; num_virtual_tokens={n} on "
                              f"{spec.name} needs [{n}, {layers * 2 * g * d}] ({layers} layers x key and value x "
                              f"{g} KV heads x head dim {d})")
        per_layer = table.reshape(n, layers, 2, g, d)
        out = {}
        for layer in range(layers):
            name = f"decoder.layers.{layer}.self_attention.core_attention"
            key = rotate_keys(per_layer[:, layer, 0].float(), -n, spec)
            out[f"{name}.prefix_key"] = key.to(table.dtype).contiguous()
            out[f"{name}.prefix_value"] = per_layer[:, layer, 1].contiguous()
        return cls.config_class(num_prefix_tokens=n, reparameterize=False), out

    @staticmethod
    def collapse(model) -> int:
        """Fold the reparameterisation MLP into static prefixes (see `virtual_tokens.collapse`)."""
        from nemo_adapt.peft.virtual_tokens import collapse

        return collapse(model)
