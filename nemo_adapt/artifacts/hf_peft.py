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
from pathlib import Path


def export_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None) -> Path:
    """Write an adapter artifact in Hugging Face PEFT's format.

    Args:
        adapter_dir: a nemo-adapt adapter artifact (`adapter_config.json` + `adapter_model.safetensors`), or
            an HF PEFT adapter (rewritten in the form our export gives: fused layers' settings made uniform).
        out_dir: destination directory (appears only when complete; replaced if it exists).
        base: the base checkpoint (HF directory, .gguf, embedded name); default: the one the artifact names.

    Returns:
        The destination directory.

    Raises:
        CheckpointError: not an adapter artifact, the base is missing or is not the one it was trained on.
        ConfigError: the method has no HF PEFT form.
    """
    from safetensors.torch import save_file

    from nemo_adapt.artifacts.adapter import CONFIG, WEIGHTS, load_adapter, open_adapter, open_adapter_base
    from nemo_adapt.models.hf import replace_dir
    from nemo_adapt.models.loader import base_fingerprint
    from nemo_adapt.peft.base import get_peft_method

    files = open_adapter(adapter_dir)
    source = open_adapter_base(files, base)
    adapter = load_adapter(files, source)  # the base's fingerprint checked; an HF PEFT input converted
    config, meta, now = adapter.config, files.description, base_fingerprint(source)
    base = base or files.base_checkpoint
    fields_, tensors = get_peft_method(config.method).to_hf_peft(config, adapter.tensors, source.spec)
    hf_config = {**fields_, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "inference_mode": True,
                 # A method's own notes (`nemo_adapt` in its fields: how it was mapped) join ours.
                 "nemo_adapt": {**fields_.get("nemo_adapt", {}), "method": config.method, "base_model_fingerprint": now,
                                "base_model": files.base_model,
                                "data_fingerprint": meta.get("data_fingerprint"), "run": meta.get("run"),
                                "step": meta.get("step"), "source_format": files.format}}
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
