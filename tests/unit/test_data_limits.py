"""Bounded work per record and a prompt stop: a 50 MB record is refused in seconds with bounded memory,
the limit is a validated recipe setting, and SIGTERM/SIGINT during data preparation end the run in
seconds with a clear message (before, the signal was only noted and data preparation went on)."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nemo_adapt.config.schema import DataConfig
from nemo_adapt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

# Runs in a fresh interpreter: peak RSS (ru_maxrss, KiB on Linux) after the imports, then after reading.
_MEASURE = r"""
import json, resource, sys, time
from nemo_adapt.data.formats import DataError, read_records

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

path, mode = sys.argv[1], sys.argv[2]
base = peak_kib()
t0 = time.perf_counter()
try:
    rf = read_records(path, on_bad_record=mode)
    result = {"records": [r.line for r in rf.records], "skipped": rf.skipped, "lines": rf.skipped_lines}
except DataError as err:
    result = {"error": str(err)}
result.update(seconds=time.perf_counter() - t0, extra_mib=(peak_kib() - base) / 1024)
print(json.dumps(result))
"""


def _write_with_huge_record(path: Path, content_bytes: int) -> int:
    """Lines: a good record, a valid chat record of about `content_bytes`, a good record; its line's size."""
    head = '{"messages": [{"role": "user", "content": "'
    tail = '"}, {"role": "assistant", "content": "ok"}]}'
    with path.open("w") as f:
        f.write(json.dumps(GOOD) + "\n" + head)
        chunk = "abcdefgh " * (1 << 17)  # ~1.1 MB, written piece by piece
        written = 0
        while written < content_bytes:
            piece = chunk[: content_bytes - written]
            f.write(piece)
            written += len(piece)
        f.write(tail + "\n" + json.dumps(GOOD) + "\n")
    return len(head) + content_bytes + len(tail)


def _measure(path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_50_mb_record_is_refused_in_seconds_with_bounded_memory(tmp_path):
    # Before: 3 min 15 s and 22 GiB, then SIGKILL. Now the line is passed over in 1-MiB reads.
    path = tmp_path / "huge.jsonl"
    size = _write_with_huge_record(path, 50 * 10**6)
    refused = _measure(path, "error")
    assert refused["error"] == (
        f"{path}:2: the record is {size:,} bytes ({size / 2**20:.1f} MiB), over the limit "
        f"data.max_record_bytes=1048576 (1.0 MiB); it was not read. Raise the limit (e.g. "
        f"data.max_record_bytes={-(-size // 2**20) * 2**20}) to train on it, or set data.on_bad_record=skip "
        f"to skip records this large")
    assert refused["seconds"] < 10, refused
    assert refused["extra_mib"] < 256, refused  # measured: a few MiB; the line itself is 50 MB

    skipped = _measure(path, "skip")
    assert skipped["records"] == [1, 3]
    assert skipped["skipped"] == {"too_large": 1} and skipped["lines"] == {"too_large": [2]}
    assert skipped["seconds"] < 10 and skipped["extra_mib"] < 256, skipped


@pytest.mark.parametrize("value", [0, -1, "1MB", 1.5, True])
def test_max_record_bytes_is_validated(value):
    with pytest.raises(ConfigError) as info:
        DataConfig(train="t.jsonl", max_record_bytes=value)
    assert str(info.value) == f"data.max_record_bytes={value!r} must be an integer > 0"


def test_max_record_bytes_default_is_one_mib():
    assert DataConfig(train="t.jsonl").max_record_bytes == 1 << 20


def test_signal_during_a_phase_raises_a_named_interruption():
    from nemo_adapt.training.signals import PreemptionHandler, RunInterrupted

    handler = PreemptionHandler(enabled=True)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        with pytest.raises(RunInterrupted) as info, handler.interrupt_on_signal("data preparation"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        assert info.value.signal_name == "SIGTERM" and info.value.exit_code == 143
        assert str(info.value) == ("SIGTERM received during data preparation; stopped before training, nothing "
                                   "was trained or saved (exit status 143)")
        assert {s: signal.getsignal(s) for s in before} == before  # the trainer's handlers are back

        with pytest.raises(RunInterrupted) as info, handler.interrupt_on_signal("data preparation"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert info.value.exit_code == 130

        # A SIGTERM noted before the phase (e.g. while the tokenizer loaded) stops it at its start.
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.signal_name == "SIGTERM"
        with pytest.raises(RunInterrupted), handler.interrupt_on_signal("data preparation"):
            pytest.fail("the phase must not start after a SIGTERM")
    finally:
        handler.restore()


def test_a_collective_failing_after_the_signal_is_the_interruption():
    """A rank blocked at the barrier while rank 0 prepares data sees the barrier fail when rank 0 stops
    on the signal; that failure must end the rank as the same clean interruption."""
    from nemo_adapt.training.signals import PreemptionHandler, RunInterrupted

    handler = PreemptionHandler(enabled=True)
    try:
        with pytest.raises(RunInterrupted) as info, handler.interrupt_on_signal("data preparation"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except RunInterrupted:
                raise RuntimeError("[gloo] Connection closed by peer") from None
        assert info.value.exit_code == 143 and isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(RuntimeError, match="no signal"), handler.interrupt_on_signal("data preparation"):
            raise RuntimeError("no signal: a fault of its own stays itself")
    finally:
        handler.restore()


def _start_run(tmp_path: Path, rows: int) -> tuple[subprocess.Popen, Path]:
    sys.path.insert(0, str(REPO))
    from tests.conftest import write_tiny_chat_data, write_tiny_recipe

    data = write_tiny_chat_data(tmp_path / "data", rows=8)
    record = data["train"].read_text().splitlines()[0]
    big = tmp_path / "data" / "many.jsonl"
    big.write_text((record + "\n") * rows)  # valid, and slow to tokenize: tens of seconds
    recipe = write_tiny_recipe(tmp_path, {**data, "train": big})
    env = {**os.environ, "NEMO_ADAPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "nemo_adapt.cli", "run", str(recipe)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return proc, tmp_path / "run"


def _wait_for_line(stream, prefix: str, timeout: float) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")


def test_sigterm_during_data_preparation_ends_the_run_in_seconds(tmp_path):
    # SIGINT takes the same path (exit 130; see test_signal_during_a_phase_raises_a_named_interruption).
    sig, code = "SIGTERM", 143
    proc, run_dir = _start_run(tmp_path, rows=100_000)
    try:
        _wait_for_line(proc.stdout, "preparing data:", timeout=240)
        time.sleep(1.0)  # well inside reading + tokenizing 100,000 records (a minute on 2 CPU cores)
        sent = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
        elapsed = time.monotonic() - sent
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's own process group
            proc.wait()
    assert proc.returncode == code, err[-2000:]
    assert f"nemo-adapt run: {sig} received during data preparation; stopped before training" in err
    assert "Traceback" not in err
    assert elapsed < 15, elapsed  # measured 2.5-5 s, most of it interpreter exit on a loaded 2-core machine
    assert not run_dir.exists()  # nothing was written for the run
