"""Talk to Slurm: submit scripts with sbatch, read job state with scontrol, explain failures.

Only the commands every Slurm installation has (sbatch, scontrol); no slurmdbd/sacct needed, so it
works on the local test cluster. A finished job stays visible to scontrol for MinJobAge seconds
(300 by default): `wait_for_jobs` reads it while it still is.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_adapt.errors import NemoAdaptError

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


class SlurmError(NemoAdaptError):
    """Slurm is missing, refused a submission, or a job failed."""


@dataclass
class JobInfo:
    """What scontrol says about one job."""

    job_id: str
    name: str
    state: str
    exit_code: str
    reason: str
    stdout: str
    dependency: str
    restarts: int

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def _slurm_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} is not on PATH: this machine is not a Slurm login node (or run "
                         "slurm/local/up.sh and export SLURM_CONF for the local test cluster)")
    return path


def sbatch(script: str | Path, *options: str, cwd: str | Path | None = None, env: dict | None = None) -> str:
    """Submit a script; return the job id.

    Args:
        script: path of the script.
        options: sbatch options placed before the script (e.g. `--dependency=afterok:12`).
        cwd: directory to submit from (relative `--output` paths and SLURM_SUBMIT_DIR).
        env: environment for sbatch (default: this process's; the job inherits it: --export=ALL).

    Raises:
        SlurmError: sbatch is missing or refused the job (its message included).
    """
    cmd = [_slurm_command("sbatch"), "--parsable", *options, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script} was refused: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict | None = None) -> JobInfo:
    """The current state of a job (scontrol show job).

    Raises:
        SlurmError: the controller does not know the job (too old, or a wrong id).
    """
    proc = subprocess.run([_slurm_command("scontrol"), "show", "job", "--oneliner", str(job_id)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip() or 'no such job'}")
    fields = {}
    for token in proc.stdout.split():
        key, eq, value = token.partition("=")
        if eq and key not in fields:
            fields[key] = value
    return JobInfo(job_id=fields.get("JobId", str(job_id)), name=fields.get("JobName", ""),
                   state=fields.get("JobState", "UNKNOWN"), exit_code=fields.get("ExitCode", ""),
                   reason=fields.get("Reason", ""), stdout=fields.get("StdOut", ""),
                   dependency=fields.get("Dependency", ""), restarts=int(fields.get("Restarts", "0") or 0))


def describe_failure(info: JobInfo) -> str:
    """One line: which job failed, how, and where its log is."""
    code = info.exit_code.split(":")[0] if info.exit_code else "?"
    return f"job {info.job_id} ({info.name}) ended {info.state} with exit code {code}; log: {info.stdout}"


def wait_for_jobs(job_ids: list[str], timeout: float = 3600, poll: float = 2.0, env: dict | None = None
                  ) -> list[JobInfo]:
    """Wait until every job finished or can never run; return their last states, in order.

    A job whose afterok dependency failed is cancelled by Slurm (`--kill-on-invalid-dep=yes`) or
    left pending with reason DependencyNeverSatisfied; either counts as finished (did not run).

    Raises:
        SlurmError: the timeout passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        infos = [job_info(j, env) for j in job_ids]
        if all(i.finished or i.reason == "DependencyNeverSatisfied" for i in infos):
            return infos
        if time.monotonic() > deadline:
            states = ", ".join(f"{i.job_id}={i.state}" for i in infos)
            raise SlurmError(f"jobs still running after {timeout:.0f} s: {states}")
        time.sleep(poll)


def report(infos: list[JobInfo]) -> tuple[bool, list[str]]:
    """Summarise a chain: (all completed, lines). The first failure names its job id and log path;
    jobs after it are reported as never run."""
    lines, ok = [], True
    for info in infos:
        if info.ok:
            lines.append(f"job {info.job_id} ({info.name}) COMPLETED; log: {info.stdout}")
        elif ok:
            ok = False
            lines.append("FAILED: " + describe_failure(info))
        else:
            lines.append(f"job {info.job_id} ({info.name}) did not run ({info.state}, {info.reason}): "
                         "an earlier job of the chain failed")
    return ok, lines

