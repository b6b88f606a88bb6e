"""A real Slurm cluster for the tests: munged + slurmctld + 2 slurmd on this machine.

Started once per session by slurm/local/up.sh and stopped by slurm/local/down.sh, which ends exactly
the daemons up.sh started (by PID). A machine without Slurm fails these tests (setup failure);
scripts/setup.sh installs Debian's slurmctld, slurmd, slurm-client and munge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_tiny_chat_data

NODES = 2
CPUS_PER_NODE = 4


class Cluster:
    """Handle on the running test cluster: submit, inspect and wait for jobs."""

    def __init__(self, directory: Path, cache: Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.cache = cache

    def env(self, **extra: str) -> dict:
        """Environment for sbatch (jobs inherit it): this cluster, a shared cache, one thread per rank."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "NEMO_ADAPT_"))}
        env.update(SLURM_CONF=str(self.conf), NEMO_ADAPT_HOME=str(REPO), NEMO_ADAPT_CACHE=str(self.cache),
                   OMP_NUM_THREADS="1", WANDB_SILENT="true", WANDB__DISABLE_STATS="true",
                   WANDB__DISABLE_META="true", PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
        env.update(extra)
        return env

    def reference_env(self) -> dict:
        """Environment for a plain torchrun reference run: the jobs' cache and thread count. The thread
        count matters at the 1e-6 level: 2 intra-op threads sum matmul partials in another order than 1."""
        return {"NEMO_ADAPT_CACHE": str(self.cache), "OMP_NUM_THREADS": self.env()["OMP_NUM_THREADS"]}

    def sbatch(self, script: str | Path, *args: str, options: tuple[str, ...] = (), cwd: Path, env: dict | None = None
               ) -> str:
        (cwd / "logs").mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd,
                              env=env or self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        proc = subprocess.run(["scontrol", *args], env=self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"scontrol {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def scancel(self, *args: str) -> None:
        proc = subprocess.run(["scancel", *args], env=self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"scancel {' '.join(args)}: {proc.stderr}"

    def job(self, job_id: str) -> dict[str, str]:
        fields: dict[str, str] = {}
        for token in self.scontrol("show", "job", "--oneliner", job_id).split():
            key, eq, value = token.partition("=")
            if eq:
                fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        """Wait until the job has finished (a requeued job is not finished); return its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if time.monotonic() > deadline:
                self.scancel(job_id)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")
            time.sleep(1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    for exe in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(exe) is None:
            pytest.fail(f"{exe} is not installed: the Slurm tests need Debian's slurmctld, slurmd, slurm-client and "
                        "munge (scripts/setup.sh installs them with apt)")
    # Not under pytest's 0700 temp root: munged runs as the munge user and must reach its socket.
    directory = Path(tempfile.mkdtemp(prefix="nemo-adapt-slurm-"))
    proc = subprocess.run([str(REPO / "slurm/local/up.sh"), str(directory), "--nodes", str(NODES), "--cpus",
                           str(CPUS_PER_NODE)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"could not start the local Slurm cluster:\n{proc.stdout}\n{proc.stderr}")
    try:
        yield Cluster(directory, tmp_path_factory.mktemp("cache"))
    finally:
        subprocess.run([str(REPO / "slurm/local/down.sh"), str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_chat_data(tmp_path_factory.mktemp("tiny_data"))


def data_overrides(data: dict[str, Path], test: bool = False) -> list[str]:
    """Point the tiny recipe at the test data; no validation pass (saves time), test split on request."""
    return [f"data.train={data['train']}", "data.validation=null", f"data.test={data['test'] if test else 'null'}"]


def log_of(info: dict[str, str]) -> str:
    return Path(info["StdOut"]).read_text()


def wait_for_step(run_dir: Path, step: int, restarts: int = 0, timeout: float = 180) -> None:
    """Wait until the run logged `step` (after `restarts` restarts)."""
    deadline = time.monotonic() + timeout
    metrics, counter = run_dir / "metrics.jsonl", run_dir / "restarts"
    while time.monotonic() < deadline:
        if counter.exists() and counter.read_text().strip() == str(restarts) and metrics.exists():
            steps = [json.loads(line).get("step", -1) for line in metrics.read_text().splitlines()
                     if line.strip() and "train/loss" in line]
            if steps and max(steps) >= step:
                return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} did not reach step {step} after {restarts} restarts in {timeout} s")
