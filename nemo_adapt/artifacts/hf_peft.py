"""Hugging Face PEFT format out: `nemo-adapt export OUT --adapter ADAPTER_DIR --format peft`.

Writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained(base, OUT)`
loads, where `base` is the Hugging Face form of the adapter's base model (`nemo-adapt export --checkpoint`).
Each PEFT method owns its mapping (`PeftMethod.to_hf_peft`); a method without an HF PEFT form refuses with
what to do instead. The base checkpoint named in the artifact (or `--base`) must be the one it was trained on
(fingerprints compared) before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

from nemo_adapt.errors import CheckpointError, ConfigError


def _peft_config(meta: dict, where: Path):
    from nemo_adapt.peft.base import peft_config_class

    raw = dict(meta.get("peft") or {})
    if "method" not in raw:
        raise CheckpointError(f"{where}: no peft.method recorded")
    cls = peft_config_class(raw["method"])
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})


def _registered(name: str | None) -> str | None:
    from nemo_adapt.models.spec import list_models

    return name if name in list_models() else None


def export_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None) -> Path:
    """Write an adapter artifact in Hugging Face PEFT's format.

    Args:
        adapter_dir: a nemo-adapt adapter artifact (`adapter_config.json` + `adapter_model.safetensors`).
        out_dir: destination directory (appears only when complete; replaced if it exists).
        base: the base checkpoint (HF directory, .gguf, embedded name); default: the one the artifact names.

    Returns:
        The destination directory.

    Raises:
        CheckpointError: not an adapter artifact, the base is missing or is not the one it was trained on.
        ConfigError: the method has no HF PEFT form.
    """
    from safetensors.torch import load_file, save_file

    from nemo_adapt.artifacts.adapter import CONFIG, WEIGHTS, read_adapter_config
    from nemo_adapt.models.hf import replace_dir
    from nemo_adapt.models.loader import base_fingerprint, open_source
    from nemo_adapt.peft.base import get_peft_method

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    config = _peft_config(meta, adapter_dir / CONFIG)
    method = get_peft_method(config.method)
    if method is None:
        raise ConfigError(f"{adapter_dir}: a full fine-tuning run has no adapter; export its weights instead")
    base = base or meta.get("base_checkpoint")
    if not base:
        raise ConfigError(f"{adapter_dir / CONFIG} names no base_checkpoint; pass --base CHECKPOINT")
    # Open the base as the run did: under its registered architecture name when it had one (the
    # fingerprint covers the name), else as the checkpoint describes itself.
    source = open_source(base, _registered(meta.get("base_model")))
    trained_on, now = meta.get("base_model_fingerprint"), base_fingerprint(source)
    if trained_on and trained_on != now:
        raise CheckpointError(f"{adapter_dir / CONFIG}: the adapter was trained on base model {trained_on}, but "
                              f"{base!r} is {now}")
    fields_, tensors = method.to_hf_peft(config, load_file(str(adapter_dir / WEIGHTS)), source.spec)
    hf_config = {**fields_, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "inference_mode": True,
                 # A method's own notes (`nemo_adapt` in its fields: how it was mapped) join ours.
                 "nemo_adapt": {**fields_.get("nemo_adapt", {}), "method": config.method, "base_model_fingerprint": now,
                                "data_fingerprint": meta.get("data_fingerprint"), "run": meta.get("run"),
                                "step": meta.get("step")}}
    out = Path(out_dir).resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
