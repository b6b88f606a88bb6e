"""Hugging Face checkpoint directories: read config.json (+ generation_config.json) and safetensors
(single file or sharded with an index), map them to a `ModelSpec`, and write a directory
`transformers` loads.

Every config.json key is accounted for: the ones nemo-adapt models become spec fields; the ones that
would change the model's output but cannot be represented are refused with the key, the value and
what is supported; the ones only consumers read (pad_token_id, initializer_range, an inactive
sliding window, ...) ride along in `ModelSpec.hf_extra` and are written back on export.

Only safetensors are read: `pytorch_model.bin` files are pickles and are refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.spec import (
    SHAPE_FIELDS,
    CheckpointSettingWarning,
    ModelSpec,
    RopeScaling,
    adopt_checkpoint_settings,
    setting_differences,
)
from nemo_adapt.models.weights import TensorSource, hf_shapes

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# What `transformers` uses when config.json omits a key (LlamaConfig, MistralConfig, Qwen2Config):
# a checkpoint that omits one runs with this value in transformers, so it is the checkpoint's value.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096},
}
_DEFAULT_RMS_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0

# config.json keys that become ModelSpec fields (read in spec_from_hf_config, written by hf_config_from_spec).
_MODELLED = frozenset({
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "hidden_act", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "quantization_config",
})
# Keys every writer produces for itself: the export states its own architecture class, dtype and version.
_REGENERATED = frozenset({"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                          "_from_model_config"})


def read_config(path: str | os.PathLike) -> dict:
    """Parse `config.json` of a Hugging Face checkpoint directory.

    Args:
        path: the checkpoint directory.

    Returns:
        The parsed config.

    Raises:
        CheckpointError: directory or config.json missing, unreadable or not JSON.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory; expected a Hugging Face checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(cfg_path)!r} is missing; a Hugging Face checkpoint directory needs config.json")
    return _read_json(cfg_path)


def read_generation_config(path: str | os.PathLike) -> dict | None:
    """Parse `generation_config.json` of a checkpoint directory, if it has one.

    Args:
        path: the checkpoint directory.

    Returns:
        The parsed dict, or None when the file does not exist.

    Raises:
        CheckpointError: the file exists but is unreadable or not a JSON object.
    """
    gen_path = Path(path) / "generation_config.json"
    return _read_json(gen_path) if gen_path.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err.msg.removesuffix(' at')} (line {err.lineno}, "
                              f"column {err.colno})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(value).__name__}, not a JSON object")
    return value


def _ids(value, where: str) -> list[int]:
    """Token ids of a config's bos/eos value (an int, a list of ints or null) as a list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise CheckpointError(f"{where}={value!r} must be a token id or a list of token ids")
    return list(items)


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and llama3 scaling from config.json (transformers 4 `rope_scaling` + top-level
    `rope_theta`, or transformers 5 `rope_parameters` holding both)."""
    rope_cfg = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope_cfg, dict):
        raise CheckpointError(f"config.json rope_scaling={rope_cfg!r} must be an object")
    theta = cfg.get("rope_theta")
    if theta is None:
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", rope_cfg.get("rope_theta", _DEFAULT_ROPE_THETA))
    partial = cfg.get("partial_rotary_factor", rope_cfg.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise CheckpointError(f"config.json partial_rotary_factor={partial!r}: only rotary embeddings over the whole "
                              "head (partial_rotary_factor=1.0) are supported")
    rope_type = rope_cfg.get("rope_type", rope_cfg.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope_cfg["factor"]),
            low_freq_factor=float(rope_cfg.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_cfg.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_cfg.get("original_max_position_embeddings", 8192)),
        )
        if (scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings) != (1.0, 4.0, 8192):
            raise CheckpointError(
                f"config.json rope_scaling={rope_cfg}: Megatron-Core's llama3 scaling supports "
                "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 only"
            )
        return float(theta), scaling
    if rope_type not in ("default", None):
        raise CheckpointError(f"config.json rope scaling type {rope_type!r} (rope_scaling={rope_cfg}) is not "
                              "supported; supported: default, llama3")
    return float(theta), None


def _check_sliding_window(cfg: dict, model_type: str, context: int) -> None:
    """Refuse a sliding window that is active and shorter than the context.

    nemo-adapt's attention is full causal. Sliding-window attention over `w` positions computes the
    same thing for sequences of at most `w` tokens, so a window at least as long as the context (or
    none) is exact; a shorter one changes every output past position `w`.
    """
    if model_type == "llama":
        return  # LlamaAttention has no sliding window; the key would be ignored by transformers too
    window = cfg.get("sliding_window", _FAMILY_DEFAULTS[model_type]["sliding_window"])
    layers = int(cfg.get("num_hidden_layers", 0))
    if model_type == "qwen2":
        use = bool(cfg.get("use_sliding_window", False))
        # Qwen2 applies the window only when use_sliding_window is set, and then to layers from
        # max_window_layers on (or to those layer_types names "sliding_attention").
        types = cfg.get("layer_types")
        if types is not None:
            sliding = sum(t == "sliding_attention" for t in types)
        else:
            sliding = max(0, layers - int(cfg.get("max_window_layers", 28)))
        if not use or not sliding:
            return
        stated = f"sliding_window={window!r} with use_sliding_window=true on {sliding} of {layers} layers"
    else:
        stated = f"sliding_window={window!r}"
    if window is None or int(window) >= context:
        return
    raise CheckpointError(
        f"config.json {stated} is shorter than max_position_embeddings={context}: nemo-adapt's attention is "
        f"full causal, which equals sliding-window attention only for sequences up to {window} tokens. Supported: "
        f"sliding_window null or >= max_position_embeddings; to use this checkpoint at up to {window} tokens, set "
        f"max_position_embeddings to {window} in config.json"
    )


def spec_from_hf_config(cfg: dict, name: str = "hf", generation_config: dict | None = None) -> ModelSpec:
    """Build a `ModelSpec` from a Hugging Face config dict (and its generation config).

    Keys config.json omits take `transformers`' default for the family, since that is what the
    checkpoint runs with there. The eos ids are the union of config.json's and generation_config.json's
    (config.json's order first): `transformers` stops generation at generation_config.json's, and a
    chat model often lists its end-of-turn token only there.

    Args:
        cfg: parsed config.json.
        name: the spec's name.
        generation_config: parsed generation_config.json, or None.

    Returns:
        The spec, with the keys nemo-adapt does not model but consumers read in `hf_extra`
        (and generation_config.json's other keys in `hf_generation_extra`).

    Raises:
        CheckpointError: an architecture we do not support, or a key whose value changes the model's
            output in a way our model cannot represent (named with its value and what is supported).
    """
    model_type = cfg.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"config.json {key}={cfg[key]!r}: biases beyond Qwen2's query/key/value bias are not "
                                  "supported (attention_bias and mlp_bias must be false)")
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise CheckpointError(f"config.json quantization_config (quant_method={method!r}): quantized checkpoints are "
                              "not supported; give the unquantized (fp32/bf16/fp16) weights")
    theta, scaling = _rope(cfg)
    if "auto_map" in cfg:
        warnings.warn(f"config.json auto_map={cfg['auto_map']!r}: the checkpoint ships its own modeling code; "
                      f"nemo-adapt builds the standard {model_type} architecture from the config and cannot check "
                      "that the custom code computes the same (auto_map is written back on export)",
                      CheckpointSettingWarning, stacklevel=2)
    gen = dict(generation_config or {})
    eos = _ids(cfg.get("eos_token_id"), "config.json eos_token_id")
    eos += _ids(gen.get("eos_token_id"), "generation_config.json eos_token_id")
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
    try:
        heads = int(cfg["num_attention_heads"])
        context = int(cfg.get("max_position_embeddings") or _FAMILY_DEFAULTS[model_type]["max_position_embeddings"])
        _check_sliding_window(cfg, model_type, context)
        eps = cfg.get("rms_norm_eps")
        return ModelSpec(
            name=name,
            family=model_type,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=context,
            head_dim=cfg.get("head_dim"),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(_DEFAULT_RMS_NORM_EPS if eps is None else eps),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            bos_token_id=bos,
            eos_token_id=eos or None,
            hf_extra={k: v for k, v in cfg.items() if k not in _MODELLED | _REGENERATED},
            hf_generation_extra={k: v for k, v in gen.items() if k not in {"eos_token_id"} | _REGENERATED},
        )
    except KeyError as err:
        raise CheckpointError(f"config.json lacks required key {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config.json describes an invalid model: {err}") from err


def eos_json(spec: ModelSpec) -> int | list[int] | None:
    """The spec's eos id(s) as config files write them: an int for one id, a list for several."""
    ids = spec.eos_token_ids
    return list(ids) if len(ids) > 1 else (ids[0] if ids else None)


def hf_config_from_spec(spec: ModelSpec) -> dict:
    """The config.json that `transformers` needs to rebuild `spec`.

    Args:
        spec: the architecture.

    Returns:
        The config dict: every modelled field, then `spec.hf_extra` (keys the checkpoint carried).
    """
    cfg = {
        "architectures": [_ARCHITECTURES[spec.family]],
        "model_type": spec.family,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.kv_channels,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos_json(spec),
    }
    if spec.rope_scaling:
        r = spec.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                               "high_freq_factor": r.high_freq_factor,
                               "original_max_position_embeddings": r.original_max_position_embeddings}
    if spec.family != "llama":
        cfg.pop("attention_bias")
    if spec.family == "mistral":
        # MistralConfig defaults to a 4096-token window when the key is absent; our model has none.
        cfg["sliding_window"] = None
    cfg.update(spec.hf_extra)
    return cfg


def generation_config_from_spec(spec: ModelSpec) -> dict:
    """The generation_config.json written next to an exported config.json.

    Args:
        spec: the architecture.

    Returns:
        bos and every eos id of the spec (a list when several) plus the generation keys the source
        checkpoint carried (`hf_generation_extra`: sampling defaults, pad_token_id, ...).
    """
    return {"bos_token_id": spec.bos_token_id, **spec.hf_generation_extra, "eos_token_id": eos_json(spec)}


def _shape_differences(spec: ModelSpec, other: ModelSpec) -> list[str]:
    return [f"{f}: checkpoint {getattr(other, f)} vs model {getattr(spec, f)}"
            for f in SHAPE_FIELDS if getattr(spec, f) != getattr(other, f)]


def check_spec_matches(spec: ModelSpec, other: ModelSpec, source: str) -> None:
    """Raise if a checkpoint's architecture differs from `spec` in any shape; warn on other settings.

    Used where `spec` is the one that will be written (a merge's reference); to take a checkpoint's
    settings over a registered spec's, use `reconcile_spec`.

    Args:
        spec: the reference architecture.
        other: the checkpoint's architecture.
        source: what the checkpoint is, for messages.

    Raises:
        CheckpointError: a shape field differs (all differing fields named with both values).
    """
    diffs = _shape_differences(spec, other)
    if diffs:
        raise CheckpointError(f"{source} does not match model {spec.name!r}: " + "; ".join(diffs))
    settings = setting_differences(spec, other)
    if settings:
        what = "; ".join(f"{k}: {source} {theirs!r}, {spec.name!r} {ours!r}" for k, theirs, ours in settings)
        warnings.warn(f"{source} states settings that differ from {spec.name!r}: {what}; {spec.name!r}'s are used",
                      CheckpointSettingWarning, stacklevel=2)


def reconcile_spec(registered: ModelSpec | None, found: ModelSpec, source: str) -> ModelSpec:
    """The spec to use for a checkpoint opened as `registered` (or as itself when None).

    Args:
        registered: the registered spec the user named, or None.
        found: what the checkpoint's own metadata describes.
        source: what the checkpoint is, for messages.

    Returns:
        `found` when nothing is registered; else `registered` with the checkpoint's settings
        (`adopt_checkpoint_settings`, which warns for each one that differs).

    Raises:
        CheckpointError: a shape field differs.
    """
    if registered is None:
        return found
    diffs = _shape_differences(registered, found)
    if diffs:
        raise CheckpointError(f"{source} does not match model {registered.name!r}: " + "; ".join(diffs))
    return adopt_checkpoint_settings(registered, found, source)


class SafetensorsSource:
    """Lazy, validated access to the tensors of a safetensors checkpoint (single or sharded)."""

    def __init__(self, directory: str | os.PathLike, spec: ModelSpec):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.spec = spec
        self.shapes = hf_shapes(spec)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"cannot read safetensors index {str(index)!r}: {err}") from err
        elif single.is_file():
            weight_map = None
        else:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            extra = (f" (found {', '.join(pickles)}: pickle files are not loaded; convert them to safetensors)"
                     if pickles else "")
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {str(self.directory)!r}{extra}"
            )
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._where: dict[str, str] = {}
        for fname in files:
            fpath = self.directory / fname
            try:
                handle = safe_open(str(fpath), framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read safetensors file {str(fpath)!r}: {err}") from err
            self._handles[fname] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                self._where[key] = fname
        missing = [n for n in self.shapes if n not in self._where]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(
                f"checkpoint {str(self.directory)!r} lacks tensor(s) {', '.join(missing[:3])}{more} "
                f"required by model {spec.name!r}"
            )
        for name, shape in self.shapes.items():
            if name not in self._where:
                continue
            got = tuple(self._handles[self._where[name]].get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(
                    f"tensor {name!r} in {str(self.directory / self._where[name])!r} has shape {got}, "
                    f"model {spec.name!r} expects {shape}"
                )

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint {str(self.directory)!r} lacks tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name).float()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (its first dimension) as float32; only their bytes are read."""
        if name not in self._where:
            raise CheckpointError(f"checkpoint {str(self.directory)!r} lacks tensor {name!r}")
        return self._handles[self._where[name]].get_slice(name)[start:stop].float()


def open_checkpoint(directory: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[ModelSpec, TensorSource]:
    """Open a Hugging Face checkpoint directory and check it against `spec` (or derive the spec).

    Args:
        directory: the checkpoint directory.
        spec: a registered architecture to check the checkpoint against; its shapes must match, and
            the settings the checkpoint states (rope, context, norm epsilon, bos/eos) replace its own
            with a warning naming each (see `reconcile_spec`).

    Returns:
        (spec, source): the architecture and a function returning full tensors by HF name.

    Raises:
        CheckpointError: missing/unreadable files, architecture mismatch, an unsupported setting,
            missing or misshapen tensors.
    """
    cfg = read_config(directory)
    found = spec_from_hf_config(cfg, name=spec.name if spec else Path(directory).name,
                                generation_config=read_generation_config(directory))
    spec = reconcile_spec(spec, found, f"checkpoint {str(directory)!r}")
    return spec, SafetensorsSource(directory, spec)


SHARD_BYTES = 2 * 2**30
"""Largest safetensors shard written (the Hugging Face convention for big checkpoints is a few GB per file)."""


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Tensor names per output shard: in the given order, a new shard once `max_bytes` would be passed.

    A function of names, shapes and dtype only, so the files of a checkpoint never depend on the layout
    (TP, PP) or the tool (export, merge) that wrote it.
    """
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class ShardWriter:
    """Write one safetensors file tensor by tensor, in row blocks, holding none of it in memory.

    The header (names, shapes, dtype, byte offsets) is known from the shapes alone and goes first; the
    tensors' bytes follow in the given order as `write` receives them. Written here because safetensors'
    `save_file` takes every tensor of a file at once, and merge and export must not hold a whole shard. The
    file is the safetensors format (8-byte little-endian header size, JSON header padded to 8 bytes, data)
    that `safetensors.safe_open` and `transformers` read.

    Args:
        path: the file to write.
        shapes: tensor name -> shape, in file order.
        dtype: the stored dtype (float32, bfloat16 or float16).

    Raises:
        ValueError: `write` out of order, or `close` before every tensor's bytes were written.
    """

    _CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

    def __init__(self, path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        import struct

        self.dtype = dtype
        itemsize = torch.tensor([], dtype=dtype).element_size()
        header: dict = {"__metadata__": {"format": "pt"}}
        self._plan: list[tuple[str, int]] = []
        offset = 0
        for name, shape in shapes.items():
            nbytes = itemsize * math.prod(shape)
            header[name] = {"dtype": self._CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._plan.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index, self._done = 0, 0

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (cast to the file's dtype)."""
        if self._index >= len(self._plan) or self._plan[self._index][0] != name:
            expected = self._plan[self._index][0] if self._index < len(self._plan) else "nothing"
            raise ValueError(f"safetensors shard: got rows of {name!r}, expected {expected!r}")
        data = block.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._done += len(data)
        if self._done > self._plan[self._index][1]:
            raise ValueError(f"safetensors shard: more bytes than the shape of {name!r} holds")
        self._file.write(data)
        if self._done == self._plan[self._index][1]:
            self._index, self._done = self._index + 1, 0

    def close(self) -> None:
        """Finish the file; every tensor must be complete."""
        self._file.close()
        if self._index != len(self._plan):
            raise ValueError(f"safetensors shard: {self._plan[self._index][0]!r} and later tensors were not written")


def shard_name(index: int, count: int) -> str:
    """File name of shard `index` (0-based) of `count`; a single shard is `model.safetensors`."""
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(directory: str | os.PathLike, index: int, count: int, tensors: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32) -> Path:
    """Write one safetensors shard of a Hugging Face checkpoint."""
    from safetensors.torch import save_file

    path = Path(directory) / shard_name(index, count)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    return path


def write_metadata(directory: str | os.PathLike, spec: ModelSpec, shard_count: int,
                   dtype: torch.dtype = torch.float32) -> None:
    """Write config.json, generation_config.json and (for several shards) the safetensors index.

    The shards must already be in `directory`; the index is built from their headers.
    """
    from safetensors import safe_open

    directory = Path(directory)
    cfg = hf_config_from_spec(spec)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = generation_config_from_spec(spec)
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if shard_count > 1:
        weight_map, total = {}, 0
        for i in range(shard_count):
            fname = shard_name(i, shard_count)
            with safe_open(str(directory / fname), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    weight_map[key] = fname
                    shape = f.get_slice(key).get_shape()
                    total += math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


OUTPUT_MARKERS = ("config.json", "adapter_config.json")
"""Files every directory nemo-adapt publishes holds (a Hugging Face checkpoint, an adapter, a PEFT export)."""


def check_replaceable(final: str | os.PathLike) -> None:
    """Raise unless `final` may be written: absent, an empty directory, or an earlier output of ours.

    Publishing replaces the destination whole, so a directory holding anything else (a user's notes,
    a home directory given by mistake) is refused instead of deleted.

    Raises:
        CheckpointError: `final` is a file, or a non-empty directory without config.json or
            adapter_config.json.
    """
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise CheckpointError(f"output {str(final)!r} is a file; give a directory path (it is created)")
    if any(final.iterdir()) and not any((final / m).is_file() for m in OUTPUT_MARKERS):
        raise CheckpointError(f"output directory {str(final)!r} is not empty and is not an earlier export (no "
                              f"{' or '.join(OUTPUT_MARKERS)}); it would be replaced whole, so it is left alone: "
                              "choose a new or empty directory")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an existing one is replaced only afterwards.

    Its files and directories first get the modes the umask gives ordinary files (safetensors and
    temporary directories are owner-only otherwise, unreadable to teammates on a shared cluster).

    Args:
        tmp: the finished directory.
        final: where it goes.

    Raises:
        CheckpointError: `final` holds something other than an earlier output (see `check_replaceable`).
        OSError: a mode cannot be set or a rename fails.
    """
    import shutil

    from nemo_adapt.file_modes import follow_umask

    check_replaceable(final)
    follow_umask(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
