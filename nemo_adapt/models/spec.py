"""Architectures as data: a `ModelSpec` describes a Llama-style decoder and is all that is needed
to build it on Megatron-Core, size it in the planner and map its weights to and from Hugging Face.

Families register their specs where they are defined (`models/llama.py`, `models/qwen2.py`, ...)
with `register_model`; everything else looks them up by short name with `get_model_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
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
    eos_token_id: int | tuple[int, ...] | None = None
    """End-of-sequence token id, or several in the checkpoint's order (Llama-3-Instruct stops at
    128001 and 128009). A list or a one-element tuple given here is normalised: several ids are kept
    as a tuple (the spec stays hashable), a single id as an int. Use `eos_token_ids` to read it."""
    description: str = ""
    """One line shown by `nemo-adapt models`."""
    hf_extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Extra Hugging Face config.json keys written on export: settings nemo-adapt does not model but a
    consumer of the export reads (sliding window when inactive, pad_token_id, initializer_range, ...)."""
    hf_generation_extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Extra generation_config.json keys written on export (sampling defaults, pad_token_id, ...);
    eos_token_id is always written from the spec."""

    def __post_init__(self):
        # Frozen dataclass: normalise through object.__setattr__ (the only write, at construction).
        object.__setattr__(self, "eos_token_id", _normalise_ids(self.name, "eos_token_id", self.eos_token_id))
        if self.bos_token_id is not None and not _is_id(self.bos_token_id):
            raise ValueError(f"model {self.name!r}: bos_token_id={self.bos_token_id!r} must be a token id (int >= 0)")
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {key}={value!r} must be a positive integer")
        # A stop id the model can never emit would silently never stop generation.
        outside = [i for i in (*self.eos_token_ids, self.bos_token_id) if i is not None and i >= self.vocab_size]
        if outside:
            raise ValueError(f"model {self.name!r}: bos/eos token id(s) {outside} are outside the vocabulary "
                             f"(vocab_size={self.vocab_size}: ids 0..{self.vocab_size - 1})")
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
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id the checkpoint states, in its order (empty when it states none)."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return eos if isinstance(eos, tuple) else (eos,)

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

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a Megatron-Core linear layer, unsharded.

        linear_qkv: [h -> (a + 2g)d] (fused Q, K, V); linear_proj: [a*d -> h];
        linear_fc1: [h -> 2*ffn] (fused SwiGLU gate and up); linear_fc2: [ffn -> h].

        Raises:
            KeyError: `target` is not one of the four.
        """
        h, d, f = self.hidden_size, self.kv_channels, self.ffn_hidden_size
        a, g = self.num_attention_heads, self.num_query_groups
        return {"linear_qkv": (h, (a + 2 * g) * d), "linear_proj": (a * d, h),
                "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}[target]

    def local_kv_heads(self, tp: int) -> int:
        """KV heads per tensor-parallel rank; Megatron-Core replicates KV heads when TP exceeds their number."""
        g = self.num_query_groups
        return g // tp if g % tp == 0 else 1

    def replace(self, **changes) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _normalise_ids(name: str, key: str, value) -> int | tuple[int, ...] | None:
    """One id as an int, several as a tuple without repeats (first occurrence kept), none as None."""
    if value is None:
        return None
    items = list(value) if isinstance(value, list | tuple) else [value]
    bad = [v for v in items if not _is_id(v)]
    if bad:
        raise ValueError(f"model {name!r}: {key}={value!r} must be a token id or a list of token ids (ints >= 0)")
    ids = tuple(dict.fromkeys(items))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "kv_channels", "tie_word_embeddings", "qkv_bias")
"""Fields that fix the tensors' names and shapes: a checkpoint that differs here is another model."""

SETTING_FIELDS = ("max_position_embeddings", "rope_theta", "rope_scaling", "norm_eps", "bos_token_id",
                  "eos_token_id")
"""Fields a checkpoint states that do not change any tensor's shape. Every one of them changes what
the model computes or when generation stops, so the checkpoint's value is used over a registered spec's."""


class CheckpointSettingWarning(UserWarning):
    """A checkpoint states a setting that differs from the registered architecture it is loaded as."""


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06 and is the same setting.
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def setting_differences(registered: ModelSpec, found: ModelSpec) -> list[tuple[str, object, object]]:
    """The non-shape settings on which a checkpoint's spec differs from a registered one.

    Args:
        registered: the spec named by the user (`--model`, `model.name`).
        found: the spec the checkpoint's own metadata describes.

    Returns:
        (field, checkpoint value, registered value) for each differing field of `SETTING_FIELDS`.
        A bos/eos id the checkpoint does not state (None) is not a difference: the registered id is kept.
    """
    out = []
    for key in SETTING_FIELDS:
        ours, theirs = getattr(registered, key), getattr(found, key)
        if key in ("bos_token_id", "eos_token_id") and theirs is None:
            continue
        if not _same(theirs, ours):
            out.append((key, theirs, ours))
    return out


def adopt_checkpoint_settings(registered: ModelSpec, found: ModelSpec, source: str) -> ModelSpec:
    """The registered spec with every setting the checkpoint states taken from the checkpoint.

    The shapes must already have been checked equal. A registered spec is a family's published
    defaults; the checkpoint in hand is what was trained (a long-context variant with another
    rope_theta, an instruct model with extra stop ids), so its settings win. Each differing field is
    named with both values in one `CheckpointSettingWarning`. Consumer-only keys (`hf_extra`,
    `hf_generation_extra`) are merged, the checkpoint's winning on the same key.

    Args:
        registered: the spec named by the user; its name is kept.
        found: the spec read from the checkpoint's metadata.
        source: what the checkpoint is, for the warning ("checkpoint '/x/y'").

    Returns:
        The spec to build, train and export with.
    """
    diffs = setting_differences(registered, found)
    if diffs:
        what = "; ".join(f"{key}: checkpoint {_show(theirs)}, registered {_show(ours)}" for key, theirs, ours in diffs)
        warnings.warn(
            f"{source} states settings that differ from model {registered.name!r}: {what}. The checkpoint's "
            f"values win (the model is built, trained, evaluated and exported with them)",
            CheckpointSettingWarning, stacklevel=3)
    changes = {key: theirs for key, theirs, _ in diffs}
    return dataclasses.replace(registered, **changes, hf_extra={**registered.hf_extra, **found.hf_extra},
                               hf_generation_extra={**registered.hf_generation_extra, **found.hf_generation_extra})


def _show(value) -> str:
    # Several eos ids are shown as the list a config file holds.
    return str(list(value)) if isinstance(value, tuple) else repr(value)


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


def registered_name(spec: ModelSpec) -> str | None:
    """The registered architecture a checkpoint's own spec is: the one registered spec that computes the same
    model (every field but the name, description and the pass-through `hf_extra`/`hf_generation_extra` equal;
    head_dim compared as resolved), or None when none or several do.

    A checkpoint opened without naming its architecture then gets the registered name — so the same weights
    have one fingerprint (`models.loader.base_fingerprint` covers the name) however they are opened.
    """
    import dataclasses

    def key(s: ModelSpec) -> dict:
        d = dataclasses.asdict(s)
        for k in ("name", "description", "hf_extra", "hf_generation_extra"):
            d.pop(k, None)
        d["head_dim"] = s.head_dim or s.hidden_size // s.num_attention_heads
        return d

    mine = key(spec)
    matches = [name for name, r in list_models().items() if key(r) == mine]
    return matches[0] if len(matches) == 1 else None


def list_models() -> dict[str, ModelSpec]:
    """All registered specs by name."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))
