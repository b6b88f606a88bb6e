"""Jobs on the real local Slurm cluster: multi-node parity with torchrun, preemption -> checkpoint ->
requeue -> resume, bad input failing fast, training -> evaluation chains, rank-sweep arrays."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, torchrun, train_losses
from tests.slurm.conftest import data_overrides, log_of, wait_for_step

pytestmark = [pytest.mark.slow]
TINY = REPO / "launch" / "tiny_cpu.sh"
RECIPE = "recipes/tiny_llama_lora_cpu.yaml"


def test_tiny_cpu_two_nodes_matches_torchrun_tp2_and_pp2(slurm_cluster, tiny_data, tmp_path):
    """sbatch launch/tiny_cpu.sh on 2 nodes x 2 ranks, once with TP2 and once with PP2 (DP2 each): per-step
    losses equal the same recipe under plain torchrun on one machine within 1e-5. Both jobs run at once
    (the cluster has room), the torchrun references meanwhile."""
    common = [*data_overrides(tiny_data), "run.max_steps=4", "logging.wandb_mode=disabled"]
    jobs = {layout: slurm_cluster.sbatch(TINY, *common, f"parallel.{layout}=2",
                                         f"run.output_dir={tmp_path / layout / 'slurm'}", cwd=tmp_path)
            for layout in ("tensor", "pipeline")}
    for layout in jobs:
        torchrun(4, "-m nemo_adapt.cli", "run", str(REPO / RECIPE), *common, f"parallel.{layout}=2",
                 f"run.output_dir={tmp_path / layout / 'ref'}", env=slurm_cluster.reference_env())
    for layout, job in jobs.items():
        info = slurm_cluster.wait(job)
        log = log_of(info)
        assert info["JobState"] == "COMPLETED", log[-3000:]
        assert info["NumNodes"] == "2" and "on 2 node(s) x 2 rank(s)" in log
        assert f"starting the ranks, rendezvous nanode1:{20000 + int(job) % 20000}" in log
        got, want = train_losses(tmp_path / layout / "slurm"), train_losses(tmp_path / layout / "ref")
        assert sorted(got) == sorted(want) == [1, 2, 3, 4]
        for step, value in want.items():
            assert abs(got[step] - value) <= 1e-5, f"{layout} step {step}: slurm {got[step]} vs torchrun {value}"
        # All 4 ranks of both nodes took part: 2-way model parallel x DP2.
        assert json.loads((tmp_path / layout / "slurm" / "results.json").read_text())["layout"] == {
            "tensor": 2 if layout == "tensor" else 1, "pipeline": 2 if layout == "pipeline" else 1,
            "virtual_pipeline": None, "context": 1, "data": 2}


def test_preemption_checkpoints_requeues_and_resumes_same_run(slurm_cluster, tiny_data, tmp_path):
    """SIGUSR1 to the batch shell (the --signal=B:USR1 path) and then SIGTERM to the job's tasks (what
    preemption sends): each time the ranks checkpoint, the job requeues itself and resumes.
    The final losses equal an uninterrupted run's within 1e-6; the restart count is 2 in the log, the
    run directory and the W&B run, which is one run throughout."""
    from nemo_adapt.logging.wandb_offline import read_offline_run

    steps = 24
    overrides = [*data_overrides(tiny_data), f"run.max_steps={steps}", "logging.wandb_mode=offline"]
    run_dir = tmp_path / "preempted"
    # Tiny steps take milliseconds; pace them (1 s each, numerics unchanged) so the signals land mid-run.
    paced = slurm_cluster.env(NEMO_ADAPT_MIN_STEP_SECONDS="1")
    job = slurm_cluster.sbatch(TINY, *overrides, f"run.output_dir={run_dir}", options=("--nodes=1",), cwd=tmp_path,
                               env=paced)

    wait_for_step(run_dir, 3, restarts=0)
    slurm_cluster.scancel("--signal=USR1", "--batch", job)
    # The requeued job resumes from the checkpoint written on the signal; signal again 2 steps later.
    wait_for_step(run_dir, 1, restarts=1)
    first = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    wait_for_step(run_dir, min(first + 2, steps - 1), restarts=1)
    # Preemption signals the job's tasks with SIGTERM (srun in the batch step is left out here: it answers
    # SIGTERM by killing the step, see docs/launch.md).
    slurm_cluster.scancel("--signal=TERM", job)
    info = slurm_cluster.wait(job, timeout=300)
    log = log_of(info)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "2"

    torchrun(2, "-m nemo_adapt.cli", "run", str(REPO / RECIPE), *overrides, "logging.wandb_mode=disabled",
             f"run.output_dir={tmp_path / 'straight'}", env=slurm_cluster.reference_env())
    got, want = train_losses(run_dir), train_losses(tmp_path / "straight")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    # Two checkpoints written on signals (the trainer prints its events), then resumed from each.
    import re

    saved = [int(s) for s in re.findall(r"event preempted step=(\d+) signal=SIG\w+", log)]
    resumed = [int(s) for s in re.findall(r"event resumed step=(\d+)", log)]
    diffs = {step: abs(got[step] - value) for step, value in want.items()}
    assert max(diffs.values()) <= 1e-6, f"resumed after steps {saved}; |resumed - uninterrupted| per step: {diffs}"
    # The second signal may land during the last step (it can take seconds to arrive): then the resumed
    # attempt only finishes up.
    assert len(saved) == 2 and saved == resumed and 3 <= saved[0] < saved[1] <= steps, (saved, resumed)
    assert "received SIGUSR1" in log
    assert log.count("checkpoint written on a signal; requeueing job") == 2
    for restart in (0, 1, 2):
        assert f"; restart {restart}" in log
    assert (run_dir / "restarts").read_text().strip() == "2"
    wb = read_offline_run(run_dir)  # raises if the starts wrote different W&B runs
    assert wb.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert len(wb.files) == 3 and wb.summary["run/restarts"] == 2
    assert abs(wb.summary["train/loss"] - want[steps]) <= 1e-6


def test_bad_input_fails_the_job_in_its_first_seconds(slurm_cluster, tiny_data, tmp_path):
    """A missing data file, an unreadable resume checkpoint and a missing container image each end the
    job within seconds with a message naming the problem; nothing trains."""
    broken = tmp_path / "broken_run" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "latest").write_text("step_00000004\n")  # names a checkpoint that was never completed
    cases = {
        "data": ([f"data.train={tmp_path / 'missing.jsonl'}", "data.validation=null", "data.test=null"], {},
                 f"data.train='{tmp_path / 'missing.jsonl'}' does not exist"),
        "checkpoint": ([*data_overrides(tiny_data), f"run.output_dir={tmp_path / 'broken_run'}"], {},
                       "which is not a complete checkpoint"),
        "container": (data_overrides(tiny_data), {"NEMO_ADAPT_CONTAINER": str(tmp_path / "nemo.sqsh")},
                      f"container image NEMO_ADAPT_CONTAINER={tmp_path / 'nemo.sqsh'} does not exist"),
    }
    jobs = {}
    for name, (overrides, env, _) in cases.items():
        jobs[name] = slurm_cluster.sbatch(TINY, *overrides, options=("--nodes=1", f"--job-name=bad-{name}"),
                                          cwd=tmp_path, env=slurm_cluster.env(**env))
    for name, (_, _, message) in cases.items():
        info = slurm_cluster.wait(jobs[name], timeout=120)
        log = log_of(info)
        assert info["JobState"] == "FAILED", log
        assert message in log, log
        # Stopped by the checks, before the ranks were started (nothing loaded weights or trained).
        assert "starting the ranks" not in log and "step 1/" not in log, log


def _launch(slurm_cluster, cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nemo_adapt.cli", "launch", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or slurm_cluster.env())


def test_chain_runs_evaluation_after_training_and_reports_a_failed_training(slurm_cluster, tiny_data, tmp_path):
    """`nemo-adapt launch --chain eval --wait`: evaluation runs after a successful training (afterok);
    when training fails, evaluation never runs and the failure names the job id and the log path."""
    common = ["--nodes", "1", "--gpus-per-node", "1", "--chain", "eval", "--wait", "--wait-timeout", "300",
              str(REPO / RECIPE), *data_overrides(tiny_data, test=True), "run.max_steps=2", "checkpoint.save_interval=1",
              "eval.max_examples=4", "logging.wandb_mode=disabled"]
    ok_dir, bad_dir = tmp_path / "ok_run", tmp_path / "bad_run"
    # Both chains at once, one node each. In the second, rank 0 is killed right after its step-1
    # checkpoint, so that training job fails.
    ok_proc = _launch(slurm_cluster, tmp_path, *common, f"run.output_dir={ok_dir}")
    bad_proc = _launch(slurm_cluster, tmp_path, *common, f"run.output_dir={bad_dir}",
                       env=slurm_cluster.env(NEMO_ADAPT_FAULT="after_checkpoint:1"))
    ok, bad = (subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read(), p.stderr.read())
               for p in (ok_proc, bad_proc))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("COMPLETED") == 2, ok.stdout
    result = json.loads((ok_dir / "eval.json").read_text())
    assert result["n"] == 4 and result["adapter_step"] == 2
    predictions = (ok_dir / "predictions_eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["line"] for line in predictions] == [1, 2, 3, 4]

    assert bad.returncode == 1, bad.stdout + bad.stderr
    train_job = bad.stdout.split("submitted training job ", 1)[1].split(":", 1)[0]
    eval_job = bad.stdout.split("submitted eval job ", 1)[1].split(" ", 1)[0]
    log_path = tmp_path / "logs" / f"tiny_llama_lora_cpu-{train_job}.out"
    assert f"FAILED: job {train_job} (tiny_llama_lora_cpu) ended FAILED" in bad.stderr, bad.stderr
    assert f"log: {log_path}" in bad.stderr, bad.stderr
    assert log_path.is_file()
    assert f"job {eval_job} (tiny_llama_lora_cpu-eval) did not run" in bad.stderr, bad.stderr
    never_ran = slurm_cluster.job(eval_job)
    assert never_ran["JobState"] == "CANCELLED" and never_ran["Reason"] == "DependencyNeverSatisfied", never_ran
    assert not Path(never_ran["StdOut"]).exists()
    assert not (bad_dir / "eval.json").exists()


def test_rank_sweep_array_runs_each_element_with_its_own_override_and_run_dir(slurm_cluster, tiny_data, tmp_path):
    """A 2-element job array of launch/tiny_cpu_rank_sweep.sh: ranks 2 and 4, each in its own run
    directory, same W&B group."""
    runs = tmp_path / "runs"
    env = slurm_cluster.env(NEMO_ADAPT_SWEEP_RANKS="2 4", NEMO_ADAPT_RUNS_DIR=str(runs))
    job = slurm_cluster.sbatch(REPO / "launch" / "tiny_cpu_rank_sweep.sh", *data_overrides(tiny_data),
                               "run.max_steps=2", "logging.wandb_mode=disabled", options=("--array=0-1",),
                               cwd=tmp_path, env=env)
    from nemo_adapt.artifacts.adapter import read_adapter_config
    from nemo_adapt.config import load_resolved

    deadline = time.monotonic() + 240
    for index, rank in enumerate((2, 4)):
        info = slurm_cluster.wait(f"{job}_{index}", timeout=max(10, deadline - time.monotonic()))
        assert info["JobState"] == "COMPLETED", log_of(info)[-3000:]
        run_dir = runs / f"sweep{job}-rank{rank}"
        cfg = load_resolved(run_dir / "config.yaml")
        assert cfg.peft.rank == rank and cfg.logging.wandb_group == f"sweep-{job}"
        assert read_adapter_config(run_dir / "adapter")["peft"]["rank"] == rank
        assert sorted(train_losses(run_dir)) == [1, 2]
    assert sorted(p.name for p in runs.iterdir()) == [f"sweep{job}-rank2", f"sweep{job}-rank4"]
