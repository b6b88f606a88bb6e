"""Two processes at once, and a process killed mid-add: the registry stays consistent.

- 20 rounds, each of two processes started together: each adds a run of its own and the same shared run, then
  promotes its own to `production` (one of them, every other round, through gates it fails). Afterwards verify
  finds nothing wrong: no version lost or doubled, the shared content is one version each round (exactly one of
  the two adds created it), the audit log is 1..40 with every move starting where the previous one left the alias
  (no lost update), and the alias is where the last move put it.
- `nemo-adapt registry add` killed with SIGKILL while it copies files, twice at different points: no version is
  listed, verify passes, and the next add completes (reusing what the killed ones had stored).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nemo_adapt.artifacts.registry import Registry
from tests.registry_helpers import write_gates, write_merged, write_run, write_test_file

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 20


def _worker(location: str, own: str, shared: str, gates: str, start, out) -> None:
    try:
        start.wait(30)
        reg = Registry(location)
        mine = reg.add(own, name="triage")
        common = reg.add(shared, name="shared")
        promoted = reg.promote(f"triage:{mine.version.id}", "production", gates)
        out.put((mine.version.id, mine.created, common.version.id, common.created, promoted.moved))
    except BaseException as err:  # report, do not hang the parent
        out.put(("error", repr(err)))
        raise


def test_twenty_rounds_of_two_concurrent_writers_leave_a_consistent_registry(tmp_path):
    test = write_test_file(tmp_path / "data")
    location = str(tmp_path / "reg")
    passing = write_gates(tmp_path, "gates:\n  - {metric: exact_match, min: 0.5}\n  - {dataset: current}\n", "pass.yaml")
    failing = write_gates(tmp_path, "gates:\n  - {metric: exact_match, min: 0.99}\n", "fail.yaml")
    ctx = multiprocessing.get_context("fork")  # the children share this process's imports: each round is fast
    outcomes = []
    for r in range(ROUNDS):
        runs = [write_run(tmp_path / "runs" / f"r{r}_{w}", test, seed=100 * r + w) for w in range(2)]
        shared = write_run(tmp_path / "runs" / f"shared{r}", test, seed=10_000 + r)
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(location, str(runs[w]), str(shared),
                                                   str(failing if (w == 1 and r % 2) else passing), start, out))
                 for w in range(2)]
        for p in procs:
            p.start()
        start.set()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0, got
        assert all(g[0] != "error" for g in got), got
        assert got[0][2] == got[1][2] and sorted([got[0][3], got[1][3]]) == [False, True], got  # one shared version
        outcomes += got

    reg = Registry(location)
    report = reg.verify()
    assert report.problems == [] and report.versions == 3 * ROUNDS
    assert len(reg.versions("triage")) == 2 * ROUNDS and len(reg.versions("shared")) == ROUNDS
    entries = reg.audit()
    assert [e["seq"] for e in entries] == list(range(1, 2 * ROUNDS + 1))
    assert sum(e["action"] == "refused" for e in entries) == ROUNDS // 2
    moves = [e for e in entries if e["action"] == "promote"]
    assert len(moves) == sum(o[4] for o in outcomes) == 2 * ROUNDS - ROUNDS // 2
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"]  # each move starts where the one before left the alias
    assert reg.aliases()["triage"]["production"] == moves[-1]["to"]


def _objects(reg: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(reg / "objects"))


def _add_killed_after(model: Path, reg: Path, stored: int) -> int:
    """Start `registry add`, SIGKILL it once `stored` more files are in the store (it is still copying); returns
    how many there were when it died."""
    before = _objects(reg)
    proc = subprocess.Popen([sys.executable, "-m", "nemo_adapt.cli", "registry", "add", str(model), "--registry",
                             str(reg)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _objects(reg) < before + stored:
            assert proc.poll() is None, f"add ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _objects(reg)


def test_sigkill_during_add_leaves_no_partial_version(tmp_path):
    files = 400  # margin: on a loaded machine the poller may wake late; the add must still be copying
    # Many files: the add spends its time copying them one by one (each fsynced), so the kills land mid-copy.
    model = write_merged(tmp_path / "merged", "validated", files=files, file_bytes=32 * 1024)
    reg = tmp_path / "reg"
    first = _add_killed_after(model, reg, 1)
    second = _add_killed_after(model, reg, files // 2)
    assert 1 <= first < second < files + 2, (first, second)  # + config.json and merge_config.json

    registry = Registry(str(reg))
    assert registry.names() == [] or registry.versions("merged") == []  # no partial version is listed
    report = registry.verify()
    assert report.problems == [] and report.versions == 0
    assert any("belong to no version" in n for n in report.notes)

    result = registry.add(model)
    assert result.created and result.new_objects == files + 2 - second  # what the killed adds stored is reused
    report = registry.verify()
    assert report.problems == [] and report.versions == 1 and report.files == files + 2
    assert [n.split(" temporary file(s)")[0].isdigit() for n in report.notes] == [True]  # only the killed copies' tmp/
