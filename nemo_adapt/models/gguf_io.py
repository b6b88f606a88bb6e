"""GGUF files (llama.cpp's format): architecture metadata, dequantised weights under Hugging Face
names, and the tokenizer + chat template stored in the same file.

The `gguf` package (maintained with llama.cpp) parses the file and dequantises every ggml type;
we only rename tensors and undo llama.cpp's rotary permutation of the query/key rows.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.spec import ModelSpec, RopeScaling
from nemo_adapt.models.weights import TensorSource, hf_shapes

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor (None for tensors we do not use, e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_MAP:
            return f"model.layers.{idx}.{_LAYER_MAP[rest]}"
    return None


def _reader(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    st = path.stat()
    return _cached_reader(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int):
    # Parsing the metadata (49k tokenizer strings for SmolLM2) takes seconds; a file is opened by
    # the preflight check, the model loader and the tokenizer, so parse it once per process.
    # In-process only: the key has size, mtime, inode and ctime, so a file replaced or rewritten on
    # disk (even with its mtime restored, which changes ctime) is parsed again.
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError/struct.error/OSError for bad files
        raise CheckpointError(f"cannot read GGUF file {path!r}: {err}") from err


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _float32(value) -> float:
    # GGUF stores floats as float32; the shortest decimal that rounds to it is the value the converter
    # was given (rms epsilon 1e-5 is stored as 9.9999997e-06 and read back as 1e-05).
    return float(str(np.float32(value)))


def _llama3_rope_factors(theta: float, dim: int, scaling: RopeScaling) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as `rope_freqs.weight` for Llama-3.1
    style scaling (one per rotary pair; 1 for high frequencies, `factor` for low ones, smooth between)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling.factor)
        else:
            smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
            out.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.array(out)


def _rope_scaling_from_freqs(reader, theta: float, dim: int, source: str) -> RopeScaling | None:
    """The llama3 RoPE scaling a `rope_freqs.weight` tensor encodes (None when the file has none).

    Raises:
        CheckpointError: the stored factors are not Megatron-Core's llama3 scaling (low/high frequency
            factors 1 and 4, 8192 original context) for any scaling factor.
    """
    import gguf

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    stored = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    if stored.size and np.allclose(stored, 1.0):
        return None  # all divisors 1: no scaling
    factor = float(stored.max())
    scaling = RopeScaling(factor=_float32(factor))
    expected = _llama3_rope_factors(theta, dim, scaling)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise CheckpointError(
            f"{source}: tensor rope_freqs.weight holds RoPE frequency divisors {stored[:4].round(4).tolist()}... that "
            f"are not Llama-3.1 scaling with low_freq_factor=1, high_freq_factor=4, original context 8192 (the only "
            "RoPE scaling Megatron-Core supports besides none)")
    return scaling


def spec_from_gguf(reader, name: str, source: str) -> ModelSpec:
    """The architecture a GGUF file describes (llama and qwen2 architectures).

    Every metadata key that changes the model's output is either read (context length, rope frequency
    base and scaling, RMS epsilon, bos and every end-of-generation id) or refused with its value (an
    unsupported rope scaling type, partial rotary dimensions, experts, a sliding window shorter than
    the context, clamped qkv, a logit scale).

    Args:
        reader: a `gguf.GGUFReader` of the file.
        name: the spec's name.
        source: what the file is, for messages.

    Returns:
        The spec; the file's padding token id is carried as `hf_extra["pad_token_id"]`.

    Raises:
        CheckpointError: unsupported architecture, a missing required key or an unsupported setting.
    """
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{source}: general.architecture={arch!r} is not supported (llama, qwen2)")

    def get(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: metadata key {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    context = int(get("context_length"))
    theta = _float32(get("rope.freq_base", 10000.0))

    def refuse(key, value, supported):
        raise CheckpointError(f"{source}: metadata {arch}.{key}={value!r} is not supported; supported: {supported}")

    experts = _field(reader, f"{arch}.expert_count")
    if experts:
        refuse("expert_count", experts, "dense models (no experts)")
    rotary = _field(reader, f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        refuse("rope.dimension_count", rotary, f"rotary embeddings over the whole head ({head_dim})")
    rope_type = _field(reader, f"{arch}.rope.scaling.type")
    if rope_type not in (None, "none"):
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        refuse("rope.scaling.type", rope_type, f"none (this file's factor: {factor}); Llama-3.1 scaling is read from "
                                                 "the rope_freqs tensor")
    window = _field(reader, f"{arch}.attention.sliding_window")
    if window and int(window) < context:
        refuse("attention.sliding_window", window, f"none, or at least the context length {context} (nemo-adapt's "
                                                    "attention is full causal)")
    clamp = _field(reader, f"{arch}.attention.clamp_kqv")
    if clamp:
        refuse("attention.clamp_kqv", clamp, "none")
    logit_scale = _field(reader, f"{arch}.logit_scale")
    if logit_scale is not None and _float32(logit_scale) != 1.0:
        refuse("logit_scale", logit_scale, "1.0")
    # llama.cpp stops generation at any end-of-generation id: eos, end-of-turn, end-of-message.
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    try:
        return ModelSpec(
            name=name, family="qwen2" if arch == "qwen2" else "llama",
            num_layers=int(get("block_count")), hidden_size=hidden,
            ffn_hidden_size=int(get("feed_forward_length")), num_attention_heads=heads,
            num_query_groups=int(get("attention.head_count_kv", heads)), vocab_size=int(vocab),
            max_position_embeddings=context,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=_rope_scaling_from_freqs(reader, theta, head_dim, source),
            norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=[int(i) for i in eos if i is not None] or None,
            hf_extra={"pad_token_id": int(pad)} if pad is not None else {},
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: metadata describes an invalid model: {err}") from err


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's converter reorders each head's rows from HF's "rotate half" layout
    # [x0..x(d/2-1), y0..] to interleaved pairs [x0, y0, x1, y1, ...] for its RoPE kernel:
    # w.reshape(heads, 2, d/2, ...).swapaxes(1, 2). This is the inverse.
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource:
    """Dequantised GGUF tensors under Hugging Face names, checked against a spec."""

    def __init__(self, path: str | os.PathLike, spec: ModelSpec | None = None):
        self.path = str(path)
        self.reader = _reader(path)
        found = spec_from_gguf(self.reader, spec.name if spec else Path(path).stem, f"GGUF file {self.path!r}")
        from nemo_adapt.models.hf import reconcile_spec

        # Shapes must match a registered spec; the settings the file states win over its own.
        self.spec = reconcile_spec(spec, found, f"GGUF file {self.path!r}")
        self.arch = _field(self.reader, "general.architecture")
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        expected = hf_shapes(self.spec)
        missing = [n for n in expected if n not in self._tensors]
        if missing:
            raise CheckpointError(f"GGUF file {self.path!r} lacks tensor(s) {', '.join(missing[:3])}")
        for name, t in self._tensors.items():
            # GGUF lists dimensions fastest-first; torch order is the reverse.
            got = tuple(int(x) for x in reversed(t.shape))
            if name in expected and got != expected[name]:
                raise CheckpointError(
                    f"tensor {t.name!r} ({name}) in GGUF file {self.path!r} has shape {got}, "
                    f"model {self.spec.name!r} expects {expected[name]}"
                )

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, float32. A quantised tensor dequantises whole, so the last
        one is kept for the next block of the same tensor."""
        if getattr(self, "_last_name", None) != name:
            self._last_name, self._last = None, None  # release the previous tensor first
            self._last, self._last_name = self(name), name
        return self._last[start:stop]

    def __call__(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"GGUF file {self.path!r} lacks tensor {name!r}")
        shape = tuple(int(x) for x in reversed(t.shape))
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
        if self.arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, self.spec.num_attention_heads)
        elif self.arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, self.spec.num_query_groups)
        return w


def open_gguf(path: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[ModelSpec, TensorSource]:
    """Open a GGUF file; returns (spec, source) like `hf.open_checkpoint`.

    Args:
        path: the .gguf file.
        spec: a registered architecture to check it against (shapes must match; the file's
            settings win, with a warning naming each that differs), or None to use the file's own.

    Returns:
        (spec, source): the architecture and a function returning dequantised tensors by HF name.

    Raises:
        CheckpointError: missing or unreadable file, unsupported architecture or setting, shape
            mismatch with `spec`.
    """
    src = GGUFSource(path, spec)
    return src.spec, src
