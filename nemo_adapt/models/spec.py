"""Architectures as data: a `ModelSpec` describes a Llama-style decoder and is all that is needed
to build it on Megatron-Core, size it in the planner and map its weights to and from Hugging Face.

Families register their specs where they are defined (`models/llama.py`, `models/qwen2.py`, ...)
with `register_model`; everything else looks them up by short name with `get_model_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling (Meta's `rope_type: llama3`)."""

    factor: float = 8.0
    """Divisor applied to low frequencies (8 for Llama-3.1)."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained at before scaling."""


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention."""

    name: str
    """Registered short name (`smollm2_135m`, `llama3_70b`)."""
    family: str
    """Hugging Face `model_type` this spec maps to: `llama`, `mistral` or `qwen2`."""
    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model width h."""
    ffn_hidden_size: int
    """Intermediate size of the SwiGLU MLP (per branch: gate and up each have this many rows)."""
    num_attention_heads: int
    """Query heads a."""
    num_query_groups: int
    """Key/value heads (GQA groups); equals num_attention_heads for plain multi-head attention."""
    vocab_size: int
    """Tokenizer vocabulary size (before any padding for tensor parallelism)."""
    max_position_embeddings: int
    """Longest context the model supports."""
    head_dim: int | None = None
    """Per-head width; defaults to hidden_size // num_attention_heads."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling | None = None
    """Llama-3.1 RoPE scaling, or None."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output projection."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, if the tokenizer has one."""
    eos_token_id: int | None = None
    """End-of-sequence token id."""
    description: str = ""
    """One line shown by `nemo-adapt models`."""
    hf_extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Extra Hugging Face config keys written on export (sliding window, ...)."""

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {key}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model {self.name!r}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}; grouped-query attention needs whole groups"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model {self.name!r}: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
            )
        if self.family not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model {self.name!r}: family={self.family!r}; allowed: llama, mistral, qwen2")

    @property
    def kv_channels(self) -> int:
        """Per-head width (Megatron calls it kv_channels)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count of the unpadded model (embeddings counted once when tied)."""
        h, d = self.hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h  # two RMSNorm weight vectors
        emb = self.vocab_size * h
        return self.num_layers * per_layer + h + emb * (1 if self.tie_word_embeddings else 2)

    def replace(self, **changes) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry under its name; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_families() -> None:
    # Importing a family module runs its register_model calls.
    from nemo_adapt.models import llama, mistral, qwen2, smollm2, tiny  # noqa: F401


def get_model_spec(name: str) -> ModelSpec:
    """Look a spec up by registered name.

    Raises:
        KeyError: unknown name; the message lists the closest registered names.
    """
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown model architecture {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def list_models() -> dict[str, ModelSpec]:
    """All registered specs by name."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))
