"""Write one output directory from every pipeline stage, atomically.

Each stage's tensors live on its own ranks; the directory must appear only when complete. The
protocol: global rank 0 creates a temporary sibling; TP rank 0 of the first data-parallel replica
of each pipeline stage writes that stage's files into it; rank 0 finishes (index, config, ...) and
renames it into place. Every rank calls it; an error or SIGTERM removes the temporary sibling (only
SIGKILL leaves it, and the next write to the same destination replaces it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist


def write_from_stages(out_dir: str | Path, write_stage: Callable[[Path, int, int], None],
                      finish: Callable[[Path], None]) -> Path:
    """Run the staged write protocol (see module docstring).

    Args:
        out_dir: destination directory (replaced if it exists, only once the new one is complete).
        write_stage: called as `write_stage(tmp_dir, pp_rank, pp_size)` on one writer rank per stage.
        finish: called as `finish(tmp_dir)` on global rank 0 after all stages wrote.

    Returns:
        The destination path.
    """
    from megatron.core import parallel_state as ps

    from nemo_adapt.models.hf import replace_dir

    out_dir = Path(out_dir).resolve()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        dist.barrier()
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            write_stage(tmp, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())
        dist.barrier()
        if rank0:
            finish(tmp)
            replace_dir(tmp, out_dir)
        dist.barrier()
    except BaseException:
        # An error, a failed peer (its collective fails here) or SIGTERM (nemo_adapt.cli turns it into an
        # exception): the partial temporary directory goes; the destination was never touched.
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
