"""Export a (possibly TP/PP-sharded) Megatron-Core model as a Hugging Face checkpoint directory.

Every TP rank helps gather its stage's tensors; TP rank 0 of the first data-parallel replica of
each pipeline stage writes that stage's shard, and global rank 0 writes config, tokenizer and the
index, then moves the directory into place. The layout of the files depends only on the pipeline
size, never on TP: a TP2 model exports byte-for-byte the same tensors as a TP1 model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_adapt.models import hf
from nemo_adapt.models.spec import ModelSpec
from nemo_adapt.models.weights import megatron_to_hf


def export_hf(model, spec: ModelSpec, out_dir: str | os.PathLike, tokenizer=None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (this rank's stage) to `out_dir` as a Hugging Face checkpoint.

    All ranks must call it. The directory appears only when complete (temporary sibling + rename).

    Args:
        model: this rank's `GPTModel` stage.
        spec: its architecture.
        out_dir: destination directory (replaced if it exists).
        tokenizer: a `transformers` tokenizer to save alongside, or None.
        dtype: dtype of the written tensors.

    Returns:
        The destination path.
    """
    from megatron.core import parallel_state as ps

    out_dir = Path(out_dir).resolve()
    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = megatron_to_hf(model, spec, ps.get_tensor_model_parallel_world_size(),
                             ps.get_tensor_model_parallel_group())
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        hf.write_shard(tmp, pp_rank, pp, tensors, dtype)
    dist.barrier()
    if rank0:
        hf.write_metadata(tmp, spec, pp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        hf.replace_dir(tmp, out_dir)
    dist.barrier()
    return out_dir
