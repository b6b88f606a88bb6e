"""Process groups and seeds: one entry point for one process, `torchrun`, or Slurm's `srun`.

`initialize(layout)` starts torch.distributed (NCCL on GPUs, gloo on CPU), creates Megatron-Core's
tensor/pipeline/context/data-parallel groups and seeds every RNG stream the way Megatron expects.
On a CPU-only machine it installs the CPU backend first (see `cpu_backend`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_adapt.errors import ParallelLayoutError


@dataclass(frozen=True)
class ParallelLayout:
    """How the model and batch are split across processes."""

    tensor: int = 1
    """Tensor-parallel size: each layer's matrices are split over this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel size: the layers are split into this many consecutive stages."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (None: not interleaved)."""
    context: int = 1
    """Context-parallel size: the sequence is split over this many ranks in attention."""
    sequence_parallel: bool = False
    """Shard layer-norm/dropout activations along the sequence over the TP group (GPU only)."""

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context


@dataclass(frozen=True)
class RuntimeInfo:
    """What this process is, once the groups exist."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    data_parallel: int
    device: torch.device
    cpu_backend: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def initialize(layout: ParallelLayout = ParallelLayout(), seed: int = 1234) -> RuntimeInfo:
    """Start distributed execution and Megatron-Core's parallel state for `layout`.

    Works under `torchrun`/`srun` (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and as a
    plain single process (a private file store, no port). Calling it again with the same layout is a
    no-op; with a different layout the model-parallel groups are rebuilt.

    Raises:
        ParallelLayoutError: the world size is not a multiple of tensor x pipeline x context.
    """
    from megatron.core import parallel_state as ps

    cpu = not torch.cuda.is_available()
    if cpu:
        from nemo_adapt.parallel import cpu_backend

        cpu_backend.install()

    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        backend = "gloo" if cpu else "nccl"
        if not cpu:
            torch.cuda.set_device(local_rank)
        if "MASTER_ADDR" in os.environ and world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:
            # One process: a file store in a private temporary directory needs no port.
            store_dir = tempfile.mkdtemp(prefix="nemo-adapt-store-")
            dist.init_process_group(backend, init_method=f"file://{store_dir}/store", rank=0, world_size=1)

    world_size = dist.get_world_size()
    needed = layout.model_parallel_size()
    if world_size % needed:
        raise ParallelLayoutError(
            f"world size {world_size} is not a multiple of tensor x pipeline x context = "
            f"{layout.tensor} x {layout.pipeline} x {layout.context} = {needed}; launch a multiple of "
            f"{needed} processes or change parallel.tensor/pipeline/context"
        )
    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == layout.tensor
                and ps.get_pipeline_model_parallel_world_size() == layout.pipeline
                and ps.get_context_parallel_world_size() == layout.context)
        if not same:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
            context_parallel_size=layout.context,
        )
    seed_all(seed)
    return info()


def seed_all(seed: int) -> None:
    """Seed torch and Megatron's tracked RNG streams (default, tensor-parallel, expert)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    # Pipeline stages hold different layers: offset their seeds so layer init differs per stage,
    # as Megatron-LM does (seed + 100 * pp_rank).
    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(stage_seed)
    else:
        from nemo_adapt.parallel.cpu_backend import seed_model_parallel_rng

        seed_model_parallel_rng(stage_seed, tp_rank)


def info() -> RuntimeInfo:
    """Ranks and sizes of this process (after `initialize`)."""
    from megatron.core import parallel_state as ps

    cpu = not torch.cuda.is_available()
    return RuntimeInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        data_parallel=ps.get_data_parallel_world_size(),
        device=torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device()),
        cpu_backend=cpu,
    )


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
