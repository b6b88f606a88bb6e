"""Export a (possibly TP/PP-sharded) Megatron-Core model as a Hugging Face checkpoint directory.

Every TP rank helps gather its stage's tensors; TP rank 0 of the first data-parallel replica of
each pipeline stage writes that stage's tensors to a temporary file, and global rank 0 re-shards them
by size (`hf.plan_shards`, streamed one tensor at a time), writes config, tokenizer and the
index, then moves the directory into place. The files depend on neither TP nor PP: a TP2xPP2 model
exports byte-for-byte the files of a TP1 model with the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nemo_adapt.models import hf
from nemo_adapt.models.spec import ModelSpec
from nemo_adapt.models.weights import hf_tensor_names, megatron_to_hf
from nemo_adapt.parallel.staged_write import write_from_stages


def export_hf(model, spec: ModelSpec, out_dir: str | os.PathLike, tokenizer=None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (this rank's stage) to `out_dir` as a Hugging Face checkpoint.

    All ranks must call it. The directory appears only when complete (temporary sibling + rename).

    Args:
        model: this rank's `GPTModel` stage (or its list of virtual-pipeline chunks).
        spec: its architecture.
        out_dir: destination directory (replaced if it exists).
        tokenizer: a `transformers` tokenizer to save alongside, or None.
        dtype: dtype of the written tensors.

    Returns:
        The destination path.
    """
    from megatron.core import parallel_state as ps

    from nemo_adapt.models.builder import model_chunks

    # Gathering over TP is a collective: every rank does it, one rank per stage writes. Under the
    # interleaved schedule a stage holds several chunks, each with its own layers.
    tensors = {}
    for chunk in model_chunks(model):
        tensors.update(megatron_to_hf(chunk, spec, ps.get_tensor_model_parallel_world_size(),
                                      ps.get_tensor_model_parallel_group()))

    def write_stage(tmp: Path, pp_rank: int, pp: int) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()},
                  str(tmp / f".stage{pp_rank:03d}.safetensors"))

    def finish(tmp: Path) -> None:
        from safetensors import safe_open

        stages = sorted(tmp.glob(".stage*.safetensors"))
        where = {}
        for path in stages:
            with safe_open(str(path), framework="pt") as f:
                where.update({name: (path, tuple(f.get_slice(name).get_shape())) for name in f.keys()})  # noqa: SIM118
        order = [n for n in hf_tensor_names(spec) if n in where]
        order += sorted(set(where) - set(order))
        shards = hf.plan_shards({n: where[n][1] for n in order}, dtype)
        for i, names in enumerate(shards):  # one tensor in memory at a time
            writer = hf.ShardWriter(tmp / hf.shard_name(i, len(shards)), {n: where[n][1] for n in names}, dtype)
            for name in names:
                with safe_open(str(where[name][0]), framework="pt") as f:
                    writer.write(name, f.get_tensor(name))
            writer.close()
        for path in stages:
            path.unlink()
        hf.write_metadata(tmp, spec, len(shards), dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_from_stages(out_dir, write_stage, finish)
