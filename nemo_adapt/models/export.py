"""Export a (possibly TP/PP-sharded) Megatron-Core model as a Hugging Face checkpoint directory.

Every TP rank helps gather its stage's tensors; TP rank 0 of the first data-parallel replica of
each pipeline stage writes that stage's shard, and global rank 0 writes config, tokenizer and the
index, then moves the directory into place. The layout of the files depends only on the pipeline
size, never on TP: a TP2 model exports byte-for-byte the same tensors as a TP1 model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nemo_adapt.models import hf
from nemo_adapt.models.spec import ModelSpec
from nemo_adapt.models.weights import megatron_to_hf
from nemo_adapt.parallel.staged_write import write_from_stages


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

    # Gathering over TP is a collective: every rank does it, one rank per stage writes.
    tensors = megatron_to_hf(model, spec, ps.get_tensor_model_parallel_world_size(),
                             ps.get_tensor_model_parallel_group())

    def finish(tmp: Path) -> None:
        hf.write_metadata(tmp, spec, ps.get_pipeline_model_parallel_world_size(), dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_from_stages(out_dir, lambda tmp, pp_rank, pp: hf.write_shard(tmp, pp_rank, pp, tensors, dtype),
                             finish)
