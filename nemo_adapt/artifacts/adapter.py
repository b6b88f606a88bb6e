"""Adapter artifacts: the trained PEFT parameters as one safetensors file plus a JSON description.

Unlike training checkpoints (sharded, with optimizer state, for resuming), an artifact is what a
team versions, shares, evaluates, merges and serves: full (TP-gathered) tensors under global
names that do not depend on the layout it was trained at, the method and its settings, and the
fingerprint of the base model it belongs to, so applying it to another base is refused.

    <dir>/adapter_model.safetensors   tensors, e.g. decoder.layers.17.mlp.linear_fc1.adapter.up.weight
    <dir>/adapter_config.json          method, settings, base model, fingerprints, lineage

Wherever an adapter is accepted (eval, generate, export, merge, `peft.init_from`), a Hugging Face PEFT
adapter directory is accepted too: `open_adapter` tells the formats apart, `load_adapter` converts an HF
PEFT adapter through its method's `from_hf_peft` into the same form, and `apply_adapter` copies either
into a model at any TP/PP layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_adapt.errors import CheckpointError, ConfigError
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


NEMO_ADAPT, HF_PEFT = "nemo-adapt", "hf-peft"
"""The two adapter directory formats accepted wherever an adapter is: ours and Hugging Face PEFT's."""


@dataclass
class AdapterFiles:
    """An adapter directory, opened: its format, description and method (tensors not read yet)."""

    path: Path
    format: str
    """`nemo-adapt` (an artifact written by training) or `hf-peft` (a Hugging Face PEFT adapter)."""
    description: dict
    """adapter_config.json as read."""
    method: str
    """The registered PEFT method it is (an HF PEFT adapter: the method that imports its peft_type)."""

    @property
    def base_checkpoint(self) -> str | None:
        """The base checkpoint it names (ours: the one trained on; HF PEFT: `base_model_name_or_path`)."""
        d = self.description
        return d.get("base_checkpoint") if self.format == NEMO_ADAPT else d.get("base_model_name_or_path")

    @property
    def base_fingerprint(self) -> str | None:
        """The base model fingerprint it was trained on, when recorded (ours, and HF PEFT exports of ours)."""
        d = self.description
        if self.format == NEMO_ADAPT:
            return d.get("base_model_fingerprint")
        return (d.get("nemo_adapt") or {}).get("base_model_fingerprint")

    @property
    def base_model(self) -> str | None:
        """The registered architecture name the base was opened under, when recorded (ours, and HF PEFT exports
        of ours: the fingerprint covers the name, so the base must be opened under it again)."""
        d = self.description
        return d.get("base_model") if self.format == NEMO_ADAPT else (d.get("nemo_adapt") or {}).get("base_model")


@dataclass
class Adapter:
    """An adapter in our form, whatever directory format it came from."""

    files: AdapterFiles
    config: PeftConfig
    """The method's config (for an HF PEFT adapter: the settings that reproduce it exactly)."""
    tensors: dict[str, torch.Tensor]
    """Full (TP-gathered) tensors under global Megatron names, as `adapter_state` gives them."""


def open_adapter(path: str | os.PathLike) -> AdapterFiles:
    """Open an adapter directory of either format and say which method it is (reads JSON only).

    Raises:
        CheckpointError: not a directory, no adapter_config.json, unreadable JSON, weights missing or only
            as a pickle (`adapter_model.bin` is not loaded), or a description that is neither ours
            (`peft.method`) nor Hugging Face PEFT's (`peft_type`).
        ConfigError: an HF PEFT adapter of a type nothing here imports.
    """
    from nemo_adapt.peft.base import get_peft_method, method_for_hf_peft

    path = Path(path)
    cfg = path / CONFIG
    if not path.is_dir() or not cfg.is_file():
        raise CheckpointError(f"{str(path)!r} is not an adapter directory (no {CONFIG}); give a nemo-adapt adapter "
                              "artifact (a run's adapter/) or a Hugging Face PEFT adapter directory")
    try:
        description = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(cfg)!r}: {err}") from err
    if not (path / WEIGHTS).is_file():
        pickle = " (adapter_model.bin is a pickle and is not loaded; save it with safe_serialization)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{str(path)!r} has {CONFIG} but no {WEIGHTS}{pickle}")
    if not isinstance(description, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    if isinstance(description.get("peft"), dict) and "method" in description["peft"]:
        method = str(description["peft"]["method"])
        if get_peft_method(method) is None:
            raise CheckpointError(f"{cfg}: peft.method=none is a full fine-tuning run, which has no adapter")
        files = AdapterFiles(path, NEMO_ADAPT, description, method)
        _our_config(files)  # a hand-edited or damaged config is refused now, before any weights are read
        return files
    if "peft_type" in description:
        return AdapterFiles(path, HF_PEFT, description, method_for_hf_peft(description, str(cfg)).name)
    raise CheckpointError(f"{cfg} is neither a nemo-adapt adapter (no peft.method) nor a Hugging Face PEFT "
                          "adapter (no peft_type)")


def _our_config(files: AdapterFiles) -> PeftConfig:
    """The PeftConfig recorded in one of our artifacts (fields a later version dropped are ignored).

    Raises:
        CheckpointError: a setting that shapes the tensors is missing (`save_adapter` writes every one: the
            file was edited or damaged; a default would silently describe another adapter), or a value is
            invalid — both naming adapter_config.json.
    """
    from dataclasses import fields

    from nemo_adapt.peft.base import get_peft_method, peft_config_class

    cls = peft_config_class(files.method)
    known = {f.name for f in fields(cls)}
    recorded = files.description["peft"]
    # The settings that shape the tensors must be there; training-only ones (dropout, learning-rate ratios) may
    # default.
    shaping = known - set(get_peft_method(files.method).training_fields) - {"method", "init_from"}
    missing = sorted(shaping - set(recorded))
    if missing:
        raise CheckpointError(f"{files.path / CONFIG}: peft.{', peft.'.join(missing)} missing; an artifact records "
                              f"the settings that shape its tensors ({files.method}) — the file was edited or "
                              "damaged")
    try:
        return cls(**{k: v for k, v in recorded.items() if k in known})
    except ConfigError as err:
        raise CheckpointError(f"{files.path / CONFIG}: {err}") from None


def check_adapter_base(files: AdapterFiles, source, base_name: str) -> None:
    """Refuse a base model other than the one the adapter was trained on (when its fingerprint is recorded).

    Args:
        files: the opened adapter.
        source: the opened base checkpoint (`models.loader.CheckpointSource`).
        base_name: how the user named the base, for the message.

    Raises:
        CheckpointError: the fingerprints differ.
    """
    from nemo_adapt.models.loader import base_fingerprint

    trained_on = files.base_fingerprint
    if trained_on:
        now = base_fingerprint(source)
        if trained_on != now:
            raise CheckpointError(f"{files.path / CONFIG}: the adapter was trained on base model {trained_on}, but "
                                  f"{base_name!r} is {now}")


def open_adapter_base(files: AdapterFiles, checkpoint: str | None = None, model: str | None = None):
    """Open the base checkpoint an adapter is applied to, as training opened it.

    Args:
        files: the opened adapter.
        checkpoint: the base to use; default: the one the adapter names.
        model: the registered architecture to open it as (`--model`); default: the one training used, if any.

    Returns:
        The opened `models.loader.CheckpointSource` (no weights read), under the registered architecture
        name training used when there was one (the fingerprint covers the name).

    Raises:
        ConfigError: no base given and none named, or the named one is not a local checkpoint.
        CheckpointError: the base cannot be opened.
    """
    from nemo_adapt.models.loader import open_source
    from nemo_adapt.models.spec import list_models

    base = checkpoint or files.base_checkpoint
    if not base:
        raise ConfigError(f"{files.path / CONFIG} names no base checkpoint; pass the base model (--base / --checkpoint)")
    if checkpoint is None and files.format == HF_PEFT and not Path(base).exists() and ":" not in base:
        raise ConfigError(f"{files.path / CONFIG} names base_model_name_or_path={base!r}, which is not a local "
                          "checkpoint (no model hub is reached); pass the base model's directory (--base / --checkpoint)")
    name = model or (files.base_model if files.base_model in list_models() else None)
    return open_source(base, name)


def load_adapter(adapter: str | os.PathLike | AdapterFiles, source) -> Adapter:
    """Read an adapter of either format in our form, checked against the base it will be applied to.

    Args:
        adapter: the directory, or its `open_adapter` result.
        source: the opened base checkpoint (`models.loader.CheckpointSource`): its fingerprint is compared
            with the one the adapter records, its spec converts and checks an HF PEFT adapter's tensors, and
            its weights give DoRA magnitudes an HF PEFT adapter leaves out.

    Returns:
        The `Adapter` (config + full tensors under global names) for `apply_adapter`.

    Raises:
        CheckpointError: see `open_adapter`; another base; unreadable weights.
        ConfigError: an HF PEFT adapter this model cannot represent exactly (named setting or tensor).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nemo_adapt.peft.base import get_peft_method

    files = adapter if isinstance(adapter, AdapterFiles) else open_adapter(adapter)
    check_adapter_base(files, source, source.location)
    try:
        tensors = load_file(str(files.path / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {str(files.path / WEIGHTS)!r}: {err}") from err
    if files.format == NEMO_ADAPT:
        return Adapter(files, _our_config(files), tensors)
    method = get_peft_method(files.method)
    try:
        config, ours = method.from_hf_peft(files.description, tensors, source.spec, source.tensors)
    except ConfigError as err:
        raise ConfigError(f"{files.path}: {err}") from None
    return Adapter(files, config, ours)


class AdapterSettingWarning(UserWarning):
    """An adapter's settings replaced the recipe's (`peft.init_from`)."""


def settings_from_adapter(recipe: PeftConfig, adapter: Adapter) -> PeftConfig:
    """The recipe's PEFT config with the settings that shape `adapter` taken from it (`peft.init_from`).

    Every field but the method's `training_fields` (and `method`, `init_from`) comes from the adapter, so the
    model built from the result holds exactly the adapter's tensors; each replaced value is named, old and
    new, in one `AdapterSettingWarning`.

    Raises:
        ConfigError: the adapter is of another method than `peft.method`.
    """
    import warnings
    from dataclasses import fields, replace

    from nemo_adapt.peft.base import get_peft_method

    where = f"peft.init_from={recipe.init_from!r}"
    if adapter.config.method != recipe.method:
        raise ConfigError(f"{where} is a {adapter.config.method} adapter ({adapter.files.format}), but "
                          f"peft.method={recipe.method}; set peft.method={adapter.config.method} to continue it")
    keep = {"method", "init_from", *get_peft_method(recipe.method).training_fields}
    changes = {f.name: (getattr(recipe, f.name), getattr(adapter.config, f.name)) for f in fields(recipe)
               if f.name not in keep and getattr(recipe, f.name) != getattr(adapter.config, f.name)}
    if changes:
        said = ", ".join(f"peft.{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        warnings.warn(f"{where}: the adapter's settings replace the recipe's: {said}", AdapterSettingWarning,
                      stacklevel=2)
    return replace(recipe, **{k: new for k, (_, new) in changes.items()})


def _local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This TP rank's shard of a full adapter tensor (the inverse of `_gather_full`)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, rank = param.partition_dim, ps.get_tensor_model_parallel_rank()
    if getattr(param, "glu_interleaved", False):
        gate, up = full.chunk(2, dim=dim)  # [all gate rows; all up rows] -> [gate shard; up shard]
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def apply_adapter(model, adapter: Adapter) -> None:
    """Copy an adapter's tensors into a model the same method was applied to (all ranks call it; any TP/PP).

    Each rank takes its TP shard of the tensors its pipeline stage holds; every adapter parameter must
    find its tensor, and every tensor must land on some rank.

    Args:
        model: this rank's stage (or its virtual-pipeline chunks), `apply_peft(model, adapter.config)` done.
        adapter: from `load_adapter`.

    Raises:
        CheckpointError: a parameter without its tensor (or of another shape), or tensors no rank uses.
    """
    where = adapter.files.path / WEIGHTS
    used = set()
    with torch.no_grad():
        for chunk in model if isinstance(model, list | tuple) else [model]:
            for name, param in chunk.named_parameters():
                if not getattr(param, "is_adapter", False):
                    continue
                module_name, _, leaf = name.rpartition(".")
                key = f"{global_module_name(chunk, module_name)}.{leaf}"
                full = adapter.tensors.get(key)
                part = None if full is None else _local_part(full, param)
                if part is None or part.shape != param.shape:
                    got = "none" if full is None else f"{list(full.shape)}"
                    raise CheckpointError(f"{where}: the {adapter.config.method} adapter of this model needs "
                                          f"{key!r} of this rank's shape {list(param.shape)} (got {got}); the adapter "
                                          f"was made for another model or other settings (see {CONFIG})")
                param.copy_(part.to(param.dtype))
                used.add(key)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(used))
        used = {k for keys in everyone for k in keys}
    unused = sorted(set(adapter.tensors) - used)
    if unused:
        raise CheckpointError(f"{where}: {len(unused)} tensor(s) not in the model, e.g. {unused[:3]}; the adapter "
                              f"was made for another model or other settings (see {CONFIG})")


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
