"""Adapter artifacts: the trained PEFT parameters as one safetensors file plus a JSON description.

Unlike training checkpoints (sharded, with optimizer state, for resuming), an artifact is what a
team versions, shares, evaluates, merges and serves: full (TP-gathered) tensors under global
names that do not depend on the layout it was trained at, the method and its settings, and the
fingerprint of the base model it belongs to, so applying it to another base is refused.

    <dir>/adapter_model.safetensors   tensors, e.g. decoder.layers.17.mlp.linear_fc1.adapter.up.weight
    <dir>/adapter_config.json          method, settings, base model, fingerprints, lineage
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_adapt.errors import CheckpointError
from nemo_adapt.peft.base import PeftConfig, global_module_name

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _gather_full(param: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor of a (possibly tensor-parallel) parameter, on every TP rank."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    dim = param.partition_dim
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    if getattr(param, "glu_interleaved", False):
        # Each rank holds [gate shard; up shard]: regroup to [all gate rows; all up rows].
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Full adapter tensors of this pipeline stage under global names (all TP ranks call this).

    Args:
        model: this rank's stage, or the list of its virtual-pipeline chunks (a parameter replicated in
            every chunk, as prefix tuning's MLP, is stored once: the copies are equal).
    """
    out = {}
    for chunk in model if isinstance(model, list | tuple) else [model]:
        for name, param in chunk.named_parameters():
            if getattr(param, "is_adapter", False):
                module_name, _, leaf = name.rpartition(".")
                out[f"{global_module_name(chunk, module_name)}.{leaf}"] = _gather_full(param)
    return out


def save_adapter(model, out_dir: str | os.PathLike, peft_config: PeftConfig, metadata: dict,
                 dtype: torch.dtype | None = None) -> Path:
    """Write this model's adapter as an artifact directory (all ranks call it; atomic).

    Args:
        model: this rank's stage (or list of virtual-pipeline chunks) with a PEFT method applied.
        out_dir: destination directory (replaced if it exists).
        peft_config: the method's config (saved as JSON).
        metadata: base model name, base fingerprint, data fingerprint, run, step, ... (JSON-able).
        dtype: tensor dtype to store (default: as trained).

    Returns:
        The artifact directory.
    """
    from safetensors.torch import load_file, save_file

    from nemo_adapt.parallel.staged_write import write_from_stages

    state = adapter_state(model)  # a TP collective: every rank gathers, one per stage writes
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}

    def write_stage(tmp: Path, pp_rank: int, pp: int) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"stage{pp_rank:03d}.safetensors"))

    def finish(tmp: Path) -> None:
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(tmp.glob("stage*.safetensors")):
            merged.update(load_file(str(f)))
            f.unlink()
        save_file(dict(sorted(merged.items())), str(tmp / WEIGHTS), metadata={"format": "pt"})
        description = {"peft": asdict(peft_config), **metadata,
                       "num_parameters": int(sum(v.numel() for v in merged.values())),
                       "num_tensors": len(merged)}
        (tmp / CONFIG).write_text(json.dumps(description, indent=2, default=str) + "\n")

    return write_from_stages(out_dir, write_stage, finish)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON description of an adapter artifact.

    Raises:
        CheckpointError: not an adapter directory or unreadable description.
    """
    cfg = Path(path) / CONFIG
    if not cfg.is_file() or not (Path(path) / WEIGHTS).is_file():
        raise CheckpointError(f"{str(path)!r} is not an adapter artifact (needs {CONFIG} and {WEIGHTS})")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(cfg)!r}: {err}") from err
