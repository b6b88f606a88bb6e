"""Hugging Face checkpoint directories: read config.json + safetensors (single file or sharded with
an index), map config.json to a `ModelSpec`, and write a directory `transformers` loads.

Only safetensors are read: `pytorch_model.bin` files are pickles and are refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.spec import ModelSpec, RopeScaling
from nemo_adapt.models.weights import TensorSource, hf_shapes

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_config(path: str | os.PathLike) -> dict:
    """Parse `config.json` of a Hugging Face checkpoint directory.

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
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {str(cfg_path)!r}: {err}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: line {err.lineno}: {err.msg}") from err


def spec_from_hf_config(cfg: dict, name: str = "hf") -> ModelSpec:
    """Build a `ModelSpec` from a Hugging Face config dict.

    Raises:
        CheckpointError: an architecture we do not support, or a field our model cannot represent.
    """
    model_type = cfg.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError("config.json attention_bias/mlp_bias=true: biases beyond Qwen2's qkv bias are not supported")
    rope_cfg = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope_cfg.get("rope_theta", 10000.0))
    rope_type = rope_cfg.get("rope_type", rope_cfg.get("type", "default"))
    scaling = None
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
    elif rope_type not in ("default", None):
        raise CheckpointError(f"config.json rope scaling type {rope_type!r} is not supported (default, llama3)")
    try:
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        return ModelSpec(
            name=name,
            family=model_type,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
    except KeyError as err:
        raise CheckpointError(f"config.json lacks required key {err.args[0]!r}") from err
    except ValueError as err:
        raise CheckpointError(f"config.json describes an invalid model: {err}") from err


def hf_config_from_spec(spec: ModelSpec) -> dict:
    """The config.json that `transformers` needs to rebuild `spec`."""
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
        "eos_token_id": spec.eos_token_id,
    }
    if spec.rope_scaling:
        r = spec.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                               "high_freq_factor": r.high_freq_factor,
                               "original_max_position_embeddings": r.original_max_position_embeddings}
    if spec.family != "llama":
        cfg.pop("attention_bias")
    cfg.update(spec.hf_extra)
    return cfg


def check_spec_matches(spec: ModelSpec, other: ModelSpec, source: str) -> None:
    """Raise if a checkpoint's architecture differs from the requested spec (names the fields)."""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "kv_channels", "tie_word_embeddings", "qkv_bias")
    diffs = [f"{f}: checkpoint {getattr(other, f)} vs model {getattr(spec, f)}"
             for f in fields if getattr(spec, f) != getattr(other, f)]
    if diffs:
        raise CheckpointError(f"{source} does not match model {spec.name!r}: " + "; ".join(diffs))


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


def open_checkpoint(directory: str | os.PathLike, spec: ModelSpec | None = None) -> tuple[ModelSpec, TensorSource]:
    """Open a Hugging Face checkpoint directory and check it against `spec` (or derive the spec).

    Returns:
        (spec, source): the architecture and a function returning full tensors by HF name.

    Raises:
        CheckpointError: missing/unreadable files, architecture mismatch, missing or misshapen tensors.
    """
    cfg = read_config(directory)
    found = spec_from_hf_config(cfg, name=spec.name if spec else Path(directory).name)
    if spec is not None:
        check_spec_matches(spec, found, f"checkpoint {str(directory)!r}")
    else:
        spec = found
    return spec, SafetensorsSource(directory, spec)


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
    gen = {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id}
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


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an existing one is replaced only afterwards."""
    import shutil

    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
