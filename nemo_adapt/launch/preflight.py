"""Job-side checks that run in the first seconds of a Slurm job, before any rank loads weights.

    python -m nemo_adapt.launch.preflight --world-size N RECIPE [key=value ...]

Runs once per job (one task on the first node, inside the same container as the ranks, so paths are
checked as the ranks will see them): the recipe and overrides load; data files exist and are
readable; the base checkpoint opens (config and tensor index only, no weights); the trainer's recipe
checks (`training.preflight.check_recipe`: layout, world size, batch split, sequence/context parallelism,
FP8) pass on this node's GPU; the run directory is writable; a checkpoint to resume from is readable.
Prints `run_dir=<path>` on success; on failure prints one line naming the problem and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from nemo_adapt.errors import NemoAdaptError


def check(recipe: str, overrides: list[str], world_size: int) -> Path:
    """Validate a training job before it starts.

    Args:
        recipe: recipe file.
        overrides: `key=value` overrides.
        world_size: ranks the job will launch (nodes x ranks per node).

    Returns:
        The run directory (not necessarily existing yet).

    Raises:
        NemoAdaptError: the first problem found, naming the file, key or path.
    """
    from nemo_adapt.config import load_recipe, resolve_run_dir
    from nemo_adapt.errors import CheckpointError, ConfigError
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training.main import preflight

    cfg = load_recipe(recipe, overrides)
    preflight(cfg, world_size, _job_target(cfg))
    run_dir = resolve_run_dir(cfg)
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(f"run directory {str(run_dir)!r}: {str(existing)!r} is not writable")
    if run_dir.exists() and cfg.checkpoint.resume == "auto":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            state = latest / "state.json"
            if not os.access(state, os.R_OK):
                raise CheckpointError(f"checkpoint {str(latest)!r} to resume from is not readable")
            ckpt.read_state(latest)
    return run_dir


def _job_target(cfg):
    """What the ranks run on. This step is one task that Slurm may start without GPUs (the ranks get them);
    then the recipe's `cluster.gpu` and the job's container stand in for the node, as on the login node.
    The ranks check their own GPU again when they start."""
    import torch

    from nemo_adapt.launch.render import default_container
    from nemo_adapt.training.preflight import Target

    if torch.cuda.is_available() or cfg.cluster.gpu is None:
        return Target.here()
    return Target.cluster(cfg.cluster.gpu, default_container(cfg.cluster.gpu))


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    parser = argparse.ArgumentParser(prog="python -m nemo_adapt.launch.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="ranks the job launches")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        run_dir = check(args.recipe, args.overrides, args.world_size)
    except (NemoAdaptError, KeyError) as err:
        print(f"nemo-adapt preflight: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"run_dir={run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
