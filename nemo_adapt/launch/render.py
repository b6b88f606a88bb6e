"""Render the sbatch script for a recipe, after checking that the recipe fits the requested GPUs.

The rendered script is a launch file like those in launch/: `#SBATCH` headers, the environment knobs
of the shared library (slurm/lib/nemo_adapt.sh), then `na_train RECIPE key=value ...`. The library
decides the srun/torchrun lines at job time from the allocation; `dry_run_commands` runs the script
in the library's dry-run mode to show them without Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nemo_adapt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LIBRARY = "slurm/lib/nemo_adapt.sh"
DEFAULT_CONTAINER = "nvcr.io/nvidia/nemo:25.11"
"""The pinned NGC NeMo image; keep equal to NA_DEFAULT_CONTAINER in slurm/lib/nemo_adapt.sh."""

# Environment knobs a rendered script may set; anything else (WANDB_API_KEY above all) stays in the
# submitting environment and reaches the job through sbatch's --export=ALL, never the script text.
KNOBS = ("NEMO_ADAPT_CONTAINER", "NEMO_ADAPT_MOUNTS", "NEMO_ADAPT_DATA_DIR", "NEMO_ADAPT_MODELS_DIR",
         "NEMO_ADAPT_RUNS_DIR", "NEMO_ADAPT_VENV", "NEMO_ADAPT_GPUS_PER_NODE", "WANDB_PROJECT", "WANDB_ENTITY",
         "WANDB_RUN_GROUP", "WANDB_TAGS")
_SECRET = re.compile(r"(?i)(^|[._])(api_?key|token|secret|password)$")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass
class LaunchSpec:
    """What to launch and where: the inputs of `render_train`."""

    recipe: str
    """Recipe file (as the job will see it: relative to the checkout, or absolute)."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` recipe overrides."""
    nodes: int = 1
    """Nodes."""
    gpus_per_node: int = 8
    """Ranks per node (GPUs; CPU ranks when `gpu` is None)."""
    gpu: str | None = None
    """GPU type (planner catalog); None: a CPU job (no --gpus-per-node, no planner check)."""
    container: str = DEFAULT_CONTAINER
    """Container image for pyxis, or `none` for bare metal from a virtual environment."""
    job_name: str = "nemo-adapt"
    """Slurm job name (logs are logs/<job name>-<job id>.out)."""
    time: str = "04:00:00"
    """Time limit."""
    signal_seconds: int = 300
    """Seconds before the time limit at which SIGUSR1 asks for a checkpoint (Slurm may be ~30 s late)."""
    partition: str | None = None
    """Partition (None: the cluster's default)."""
    account: str | None = None
    """Account (None: the user's default)."""
    cpus_per_task: int | None = None
    """CPUs for each node's task (None: Slurm's default)."""
    env: dict[str, str] = field(default_factory=dict)
    """Knob values to write into the script (see KNOBS)."""
    home: str = str(REPO)
    """The checkout the job runs from (NEMO_ADAPT_HOME)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options, e.g. `--exclusive`, `--constraint=h100`."""

    def __post_init__(self):
        for key in ("nodes", "gpus_per_node", "signal_seconds"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if not _TIME.match(self.time):
            raise ConfigError(f"time={self.time!r} is not a Slurm time limit (HH:MM:SS, MM:SS or D-HH:MM:SS)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.job_name):
            raise ConfigError(f"job name {self.job_name!r} may only hold letters, digits, '_', '.' and '-'")
        for key in self.env:
            if key not in KNOBS:
                raise ConfigError(f"environment knob {key!r} cannot be written into a script; allowed: "
                                  f"{', '.join(KNOBS)} (secrets such as WANDB_API_KEY stay in the environment)")


def default_container(gpu: str | None, container: str | None = None) -> str:
    """The image a job runs in: `container` when given, else $NEMO_ADAPT_CONTAINER, else the pinned NGC
    image for GPU jobs and bare metal (`none`) for CPU jobs (as `nemo-adapt launch` renders it)."""
    return container or os.environ.get("NEMO_ADAPT_CONTAINER") or (DEFAULT_CONTAINER if gpu else "none")


def check_fits(recipe: str, overrides: list[str], nodes: int, gpus_per_node: int, gpu: str | None,
               container: str | None = None):
    """Refuse a recipe that cannot run on `nodes` x `gpus_per_node` before anything is submitted.

    Loads and validates the recipe with its overrides (errors name file:line or the override), then runs
    the trainer's own recipe checks (`training.preflight.check_recipe`: the layout divides the model and
    the world size, the batch splits, virtual-pipeline micro-batch groups, sequence/context parallelism,
    FP8) against the cluster (`Target.cluster(gpu, container)`, the architecture from the model registry;
    no weights or data files are read, so data paths that exist only inside the job are fine). Then the
    launch-only checks: tensor parallelism stays within a node, and, for GPU jobs, the planner says the
    recipe's layout fits the GPU's memory.

    Args:
        recipe: recipe file.
        overrides: `key=value` overrides.
        nodes, gpus_per_node: the allocation.
        gpu: GPU type for the memory check (None: CPU job, no memory check).
        container: the image the job runs in, or `none` for bare metal (decides whether Transformer
            Engine is there); None: `default_container(gpu)`.

    Returns:
        (cfg, plan_result): the validated config and the planner's result (None for CPU jobs).

    Raises:
        ConfigError: the recipe is invalid or does not fit; the message names the recipe and the allocation,
            says why and what would work.
    """
    from nemo_adapt.config import load_recipe
    from nemo_adapt.errors import NemoAdaptError
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.planner import plan
    from nemo_adapt.planner.search import model_name_for_recipe, request_from_config
    from nemo_adapt.training.preflight import Target, check_recipe

    cfg = load_recipe(recipe, overrides)
    p = cfg.parallel
    where = f"{recipe} on {nodes} node(s) x {gpus_per_node} " + (f"GPU(s) of {gpu}" if gpu else "CPU rank(s)")
    try:
        try:
            spec = get_model_spec(model_name_for_recipe(cfg))
        except KeyError as err:
            raise ConfigError(f"model.name: {err.args[0]}") from None
        check_recipe(cfg, spec, nodes * gpus_per_node, Target.cluster(gpu, default_container(gpu, container)))
    except NemoAdaptError as err:
        raise type(err)(f"{where}: {err}") from None
    if p.tensor > gpus_per_node:
        raise ConfigError(f"{where}: parallel.tensor={p.tensor} spans nodes; keep it <= {gpus_per_node} "
                          "(tensor parallelism needs NVLink)")
    if gpu is None:
        return cfg, None

    try:
        result = plan(request_from_config(cfg, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node))
    except NemoAdaptError as err:
        raise type(err)(f"{where}: {err}") from None
    if not result.ok:
        if result.explicit_error:
            why = f"the layout breaks a constraint: {result.explicit_error}"
        else:
            why = f"the layout {result.explicit.fit.reason}"
        alternative = ""
        if result.ranked:
            best = result.ranked[0]
            alternative = (f"; a layout that fits: {best.layout.label()} "
                           f"({best.fit.required_gib:.1f} of {best.fit.capacity_gib:.1f} GiB)")
        raise ConfigError(f"{where}: refused before submitting: {why}{alternative} "
                          f"(details: nemo-adapt plan {recipe} --gpu {gpu} --nodes {nodes} --gpus-per-node {gpus_per_node})")
    return cfg, result


def _q(value: str) -> str:
    return shlex.quote(str(value))


def render_train(spec: LaunchSpec) -> str:
    """The sbatch script that trains `spec.recipe` (text; exact, nothing is left to fill in).

    Raises:
        ConfigError: a secret-looking value in the overrides or knobs.
    """
    for text in spec.overrides:
        key = text.split("=", 1)[0].strip()
        if _SECRET.search(key):
            raise ConfigError(f"override {key!r} looks like a secret; pass secrets through the environment "
                              "(e.g. WANDB_API_KEY), never in a script")
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by `nemo-adapt launch {spec.recipe}`: {spec.nodes} node(s) x {spec.gpus_per_node} "
        f"{'GPU' if spec.gpu else 'CPU rank'}(s){' of ' + spec.gpu if spec.gpu else ''}.",
        "# Submit from the checkout: sbatch <this file>. Logs: logs/<job name>-<job id>.out",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if spec.gpu:
        lines += [f"#SBATCH --gpus-per-node={spec.gpus_per_node}", "#SBATCH --exclusive"]
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    lines += [
        f"#SBATCH --time={spec.time}",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:USR1@{spec.signal_seconds}",
        "#SBATCH --requeue",
    ]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    lines += [f"#SBATCH {opt}" for opt in spec.extra_sbatch]
    lines += [
        "set -euo pipefail",
        f"export NEMO_ADAPT_HOME={_q(spec.home)}",
        f"export NEMO_ADAPT_CONTAINER={_q(spec.container)}",
        f"export NEMO_ADAPT_GPUS_PER_NODE={spec.gpus_per_node}",
    ]
    lines += [f"export {k}={_q(v)}" for k, v in sorted(spec.env.items())
              if k not in ("NEMO_ADAPT_CONTAINER", "NEMO_ADAPT_GPUS_PER_NODE")]
    lines += [
        f"# shellcheck source={LIBRARY}",
        f'source "$NEMO_ADAPT_HOME/{LIBRARY}"',
        " ".join(["na_train", _q(spec.recipe), *(_q(o) for o in spec.overrides)]),
    ]
    return "\n".join(lines) + "\n"


def render_followup(kind: str, run_dir: str, spec: LaunchSpec, job_name: str) -> str:
    """A one-node, one-task job that runs after training: `eval` evaluates the run's adapter on the test split.

    Raises:
        ConfigError: an unknown follow-up kind.
    """
    commands = {"eval": ["-m", "nemo_adapt.cli", "eval", run_dir]}
    if kind not in commands:
        raise ConfigError(f"--chain {kind!r} is not available; choose from: {', '.join(commands)}")
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by `nemo-adapt launch --chain {kind}`: runs after the training job succeeds (afterok).",
        f"#SBATCH --job-name={job_name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
    ]
    if spec.gpu:
        lines.append("#SBATCH --gpus-per-node=1")
    lines += [f"#SBATCH --time={spec.time}", "#SBATCH --output=logs/%x-%j.out", "#SBATCH --open-mode=append"]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    lines += [
        "set -euo pipefail",
        f"export NEMO_ADAPT_HOME={_q(spec.home)}",
        f"export NEMO_ADAPT_CONTAINER={_q(spec.container)}",
        f"# shellcheck source={LIBRARY}",
        f'source "$NEMO_ADAPT_HOME/{LIBRARY}"',
        " ".join(["na_python_step", *(_q(c) for c in commands[kind])]),
    ]
    return "\n".join(lines) + "\n"


def dry_run_commands(script: str, nodes: int, job_id: int = 4242, env: dict[str, str] | None = None) -> str:
    """What the job would run: the script executed in the library's dry-run mode (no Slurm needed).

    Args:
        script: a rendered or launch/ script.
        nodes: nodes of the pretend allocation (hosts node1..nodeN).
        job_id: the pretend job id (the rendezvous port derives from it).
        env: extra environment.

    Returns:
        The printed commands: one line each, shell-quoted.
    """
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_env.update({"NEMO_ADAPT_DRY_RUN": "1", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": str(nodes),
                    "SLURM_SUBMIT_DIR": str(REPO)})
    run_env.update(env or {})
    proc = subprocess.run(["bash", "-s"], input=script, text=True, capture_output=True, env=run_env,
                          cwd=REPO, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(f"the script fails in dry-run mode: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout
