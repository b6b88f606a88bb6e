"""`nemo-adapt launch RECIPE [options] [key=value ...]`: render, check and submit a Slurm training job.

    nemo-adapt launch recipes/llama3_70b_lora.yaml --dry-run            # print the script and its commands
    nemo-adapt launch recipes/llama3_70b_lora.yaml --nodes 2 --chain eval --wait

Order: load and validate the recipe with its overrides, run the trainer's recipe checks against the
cluster (GPU type, container, nodes x GPUs; no weights or data read), refuse it when it cannot fit the
requested GPUs (planner), render the sbatch script, then (unless --dry-run) save it under logs/ and submit it;
`--chain` submits follow-up jobs with --dependency=afterok; `--wait` follows the chain and reports the
first failure with its job id and log path (exit 1).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

from nemo_adapt.errors import ConfigError


def _job_path(path: str) -> str:
    """A path as the job sees it: relative to the checkout when inside it, else absolute."""
    from nemo_adapt.launch.render import REPO

    p = Path(path).expanduser().resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def run(args: argparse.Namespace) -> int:
    from nemo_adapt.config import resolve_run_dir
    from nemo_adapt.launch import render, slurm

    if not Path(args.recipe).is_file():
        raise ConfigError(f"recipe {args.recipe!r} does not exist")
    from nemo_adapt.config import load_recipe

    base = load_recipe(args.recipe, args.overrides)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1 (leave it out to use the recipe's cluster section)")
    nodes = args.nodes if args.nodes is not None else base.cluster.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else base.cluster.gpus_per_node
    gpu = args.gpu if args.gpu is not None else base.cluster.gpu
    if gpu in ("none", "cpu"):
        gpu = None
    # The image decides what the ranks have (Transformer Engine for FP8 and context parallelism), so it is
    # known before the checks.
    container = render.default_container(gpu, args.container)
    cfg, result = render.check_fits(args.recipe, args.overrides, nodes, gpus, gpu, container)
    env = {k: os.environ[k] for k in render.KNOBS if os.environ.get(k) and k not in (
        "NEMO_ADAPT_CONTAINER", "NEMO_ADAPT_GPUS_PER_NODE")}
    chain = [c for c in (args.chain or "").split(",") if c]
    spec = render.LaunchSpec(recipe=_job_path(args.recipe), overrides=list(args.overrides), nodes=nodes,
                             gpus_per_node=gpus, gpu=gpu, container=container,
                             job_name=args.job_name or (cfg.run.name if cfg.run.name != "run"
                                                        else Path(args.recipe).stem),
                             time=args.time, partition=args.partition,
                             account=args.account, cpus_per_task=args.cpus_per_task, env=env)
    script = render.render_train(spec)
    runs_dir = os.environ.get("NEMO_ADAPT_RUNS_DIR")
    run_dir = str(Path(runs_dir) / cfg.run.name) if runs_dir else str(resolve_run_dir(cfg))
    followups = [(kind, render.render_followup(kind, run_dir, spec, f"{spec.job_name}-{kind}")) for kind in chain]

    if result is not None:
        best = result.explicit
        print(f"# planner: layout {best.layout.label()} {best.fit.reason}", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        print("\n# The job runs (library dry-run mode, hosts node1..nodeN, job id 4242):")
        for line in render.dry_run_commands(script, nodes).splitlines():
            print(f"#   {line}")
        for kind, text in followups:
            print(f"\n# ---- follow-up `{kind}` (sbatch --dependency=afterok:<training job id>) ----")
            print(text, end="")
        return 0

    logs = Path("logs")
    logs.mkdir(exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    stamp = f"{stamp}-{os.getpid()}"  # two launches in the same second write different files
    path = logs / f"{spec.job_name}-{stamp}.sbatch"
    path.write_text(script)
    job = slurm.sbatch(path)
    print(f"submitted training job {job}: {path}; log: logs/{spec.job_name}-{job}.out", flush=True)
    jobs, previous = [job], job
    for kind, text in followups:
        fpath = logs / f"{spec.job_name}-{kind}-{stamp}.sbatch"
        fpath.write_text(text)
        fjob = slurm.sbatch(fpath, f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes")
        print(f"submitted {kind} job {fjob} (after job {previous} succeeds): {fpath}", flush=True)
        jobs.append(fjob)
        previous = fjob
    if not args.wait:
        return 0
    ok, lines = slurm.report(slurm.wait_for_jobs(jobs, timeout=args.wait_timeout))
    for line in lines:
        print(line, file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("launch", help="render, check and submit a Slurm job for a recipe (sbatch)",
                       description=__doc__.splitlines()[0],
                       usage="nemo-adapt launch [options] RECIPE [key=value ...]  (options before the overrides)")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's cluster.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (default: cluster.gpus_per_node)")
    p.add_argument("--gpu", help="GPU type for the memory check (default: cluster.gpu; `none` for CPU jobs)")
    p.add_argument("--container", help="container image for pyxis, or `none` for bare metal (default: "
                                       "$NEMO_ADAPT_CONTAINER, else the pinned NGC NeMo image on GPUs, none on CPUs)")
    p.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task")
    p.add_argument("--job-name", help="job name (default: run.name)")
    p.add_argument("--chain", help="follow-up jobs after training succeeds, comma-separated: eval")
    p.add_argument("--dry-run", action="store_true", help="print the script and the commands it runs; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report the first failure (exit 1)")
    p.add_argument("--wait-timeout", type=float, default=24 * 3600, help="seconds --wait waits at most")
    p.set_defaults(func=run)
