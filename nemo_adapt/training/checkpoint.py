"""Training checkpoints: Megatron-Core `dist_checkpointing`, written atomically, resumable at any layout.

Layout of a run directory's checkpoints:

    checkpoints/
      step_00000050/          complete checkpoints only (renamed into place when fully written)
        dist/                 model (trainable parameters only under PEFT) + optimizer, sharded
        state.json            step, data position, schedule, fingerprints, layout it was saved at
        rng/rank_00000.safetensors   RNG states per rank (restored when the layout is unchanged)
      latest                  name of the newest complete checkpoint, replaced last (os.replace)
      .tmp-step_00000060/     a write in progress (or interrupted): never read, removed on resume

A process killed while writing leaves only a `.tmp-*` directory and the old `latest`, so a resume
uses the previous complete checkpoint. Only the newest `keep_last` complete checkpoints are kept.

Training checkpoints are read only from the run directory this tool wrote. Adapters handed to other
people and tools are exported separately as safetensors + JSON (see `nemo_adapt.artifacts`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.builder import model_chunks

_PREFIX = "step_"


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs."""

    step: int
    """Optimizer steps completed."""
    consumed_samples: int
    """Training rows consumed: the data position (the sum of each step's global batch size)."""
    epoch: int
    """Epoch of the next sample (consumed_samples // rows)."""
    tokens_seen: int
    """Non-padding training tokens processed so far."""
    layout: dict
    """tensor/pipeline/data sizes the checkpoint was saved at."""
    peft_method: str
    """Adaptation method (`none` = full fine-tuning)."""
    data_fingerprint: str
    """Fingerprint of the training data it was trained on."""
    base_model_fingerprint: str
    """Fingerprint of the base weights."""
    seed: int
    """Run seed."""
    schedule: dict | None = None
    """The resolved learning-rate schedule: {"total_steps", "optim"} (see `training.resume`)."""
    settings: dict | None = None
    """The recipe settings a resume compares (see `training.resume.resume_settings`)."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Interrupted writes are never returned."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith(_PREFIX) or not (path / "state.json").is_file():
        raise CheckpointError(f"{str(pointer)!r} names {name!r}, which is not a complete checkpoint")
    return path


def _chunk_sharded_state_dict(chunk, trainable_only: bool) -> dict:
    sd = chunk.sharded_state_dict(prefix="")
    if not trainable_only:
        return sd
    keep = {}
    for key, value in sd.items():
        data = getattr(value, "data", None)
        if isinstance(data, torch.nn.Parameter) and data.requires_grad:
            keep[key] = value
    return keep


def _model_sharded_state_dict(chunks: list, trainable_only: bool) -> dict:
    """The sharded state of this rank's model chunks: the chunk's dict without an interleaved pipeline,
    else {"chunk0": ..., "chunk1": ...}. The nesting is local only: every tensor is stored under its
    global key (Megatron numbers layers globally), so checkpoints reshard between VP and non-VP layouts."""
    per_chunk = [_chunk_sharded_state_dict(c, trainable_only) for c in chunks]
    # A pipeline stage may legitimately hold none (prompt tuning trains only the first stage's
    # virtual tokens); only a model with none on any stage is an error. All ranks get here together.
    count = torch.tensor([sum(len(sd) for sd in per_chunk)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(count, group=ps.get_model_parallel_group())
    if int(count.item()) == 0:
        raise CheckpointError("no trainable parameters found to checkpoint")
    return per_chunk[0] if len(chunks) == 1 else {f"chunk{i}": sd for i, sd in enumerate(per_chunk)}


def _split_chunks(model_sd: dict, n: int) -> list[dict]:
    """The per-chunk dicts of a (loaded) `_model_sharded_state_dict` for n chunks (an absent chunk: {})."""
    return [model_sd] if n == 1 else [model_sd.get(f"chunk{i}", {}) for i in range(n)]


def _rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    for name, s in get_cuda_rng_tracker().get_states().items():
        if isinstance(s, torch.Tensor):
            state[f"tracker/{name}"] = s.cpu()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    tracker = get_cuda_rng_tracker()
    tracked = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracked:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tracker.set_states({k: v.to(device) if device == "cuda" else v for k, v in tracked.items()})


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""The distributed optimizer's state is stored per parameter (gathered over DP on save), so a
checkpoint resumes at another TP/PP/DP; Megatron's older default format no longer saves on 0.16+."""


def _ignore_preemption_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _preemption_proof_write_queue() -> None:
    """Start dist_checkpointing's result-queue manager ourselves, ignoring preemption signals.

    Megatron spawns a multiprocessing Manager for its writer results at the first save and reuses it.
    Slurm preempts by signalling every process of the step, and a spawned process does not inherit our
    handler, so the manager would die and the very save the signal asked for would fail. Ignoring the
    signals there leaves it to end with its parent (or to SIGKILL after Slurm's KillWait).
    """
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_ignore_preemption_signals)
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._nemo_adapt_manager = manager  # keep it referenced for the process lifetime


def save_checkpoint(run_dir: Path, chunks, optimizer, state: TrainState, trainable_only: bool,
                    keep_last: int) -> Path:
    """Write a checkpoint for `state.step` (all ranks call this) and prune old ones.

    Args:
        chunks: this rank's (DDP-wrapped) stage, or its chunks (one per virtual-pipeline stage).

    Returns:
        The path of the complete checkpoint.
    """
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from nemo_adapt.file_modes import follow_umask

    root = checkpoint_root(run_dir)
    name = f"{_PREFIX}{state.step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()

    _preemption_proof_write_queue()
    model_sd = _model_sharded_state_dict(model_chunks(chunks), trainable_only)
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}
    dist_checkpointing.save(sharded, str(tmp / "dist"))
    save_file(_rng_state(), str(tmp / "rng" / f"rank_{dist.get_rank():05d}.safetensors"))
    dist.barrier()
    _fault("during_checkpoint", state.step)
    if rank0:
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        follow_umask(tmp)  # safetensors writes owner-only files; a checkpoint gets the umask's modes
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")  # the commit point
        complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    _fault("after_checkpoint", state.step)
    return final


def _fault(point: str, step: int) -> None:
    """Fault injection for resume tests: NEMO_ADAPT_FAULT=<point>:<step> SIGKILLs the process there.

    Points: `during_checkpoint` (shards written, checkpoint not yet committed) and
    `after_checkpoint` (committed). SIGKILL, not an exception: nothing gets to clean up.
    """
    if os.environ.get("NEMO_ADAPT_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def read_state(path: Path) -> TrainState:
    """The `TrainState` of a complete checkpoint (cheap: no tensors are read)."""
    try:
        return TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"cannot read {str(path / 'state.json')!r}: {err}") from err


def load_checkpoint(path: Path, chunks, optimizer, trainable_only: bool, same_layout: bool) -> TrainState:
    """Load model (+ optimizer) state from a complete checkpoint, resharding to the current layout
    (TP, PP, DP, and with or without an interleaved pipeline).

    RNG states are restored only when the layout is unchanged (`same_layout`); otherwise the
    caller reseeds from (seed, step).

    Args:
        chunks: this rank's (DDP-wrapped) stage, or its chunks.

    Raises:
        CheckpointError: unreadable or incompatible checkpoint (names the path and the problem).
    """
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from nemo_adapt.peft.virtual_tokens import unwrap

    state = read_state(path)
    chunks = model_chunks(chunks)
    model_sd = _model_sharded_state_dict(chunks, trainable_only)
    _materialize_distributed_adam_state(optimizer)
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)}
    try:
        loaded = dist_checkpointing.load(sharded, str(path / "dist"))
    except Exception as err:  # dist_checkpointing raises several error types for missing/mismatched shards
        raise CheckpointError(f"cannot load checkpoint {str(path)!r} into this model: {err}") from err
    # A stage with nothing trainable (prompt tuning past the first stage) gets no "model" entry back.
    for chunk, chunk_sd in zip(chunks, _split_chunks(loaded.get("model", {}), len(chunks))):
        # Megatron's wrappers forward load_state_dict without returning the key report: load the GPTModel.
        chunk_sd = {_strip_wrappers(k): v for k, v in chunk_sd.items()}
        missing, unexpected = unwrap(chunk).load_state_dict(chunk_sd, strict=False)
        if unexpected:
            raise CheckpointError(f"checkpoint {str(path)!r} has parameters this model lacks: {unexpected[:3]}")
    if any(_split_chunks(model_sd, len(chunks))):  # this rank holds trainable parameters
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.safetensors"
    if same_layout and rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)))
    return state


def _strip_wrappers(key: str) -> str:
    while key.startswith("module."):  # DDP / Float16Module prefixes
        key = key[len("module."):]
    return key


def _materialize_distributed_adam_state(optimizer) -> None:
    """Create zero Adam state (step 0) for a distributed optimizer that has not stepped yet.

    Megatron's DistributedOptimizer derives its checkpoint layout from the Adam state, which torch
    creates lazily at the first step (Transformer Engine's fused Adam would create it up front); a
    resumed run has not stepped, so the state is created here and the load then overwrites it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(opt).__name__ != "DistributedOptimizer":
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def clean_interrupted(run_dir: Path) -> list[str]:
    """Remove `.tmp-*` leftovers of interrupted writes (rank 0 only). Returns their names."""
    root = checkpoint_root(run_dir)
    if not root.is_dir() or dist.get_rank() != 0:
        return []
    removed = []
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
