"""Peak memory of `nemo-adapt merge` on three SmolLM2-135M checkpoints, against the size of one model.

Writes the embedded SmolLM2 as a Hugging Face directory and two perturbed copies (each tensor plus a little
seeded noise), then runs `nemo-adapt merge` in a child process for each merge method family and samples the
child's anonymous resident memory (`RssAnon` in /proc/<pid>/status: the heap, what merging allocates; the
checkpoints' mmapped file pages are page cache, reclaimable and shared, and are reported beside it as VmHWM)
every 5 ms. Prints, per merge: peak anonymous memory, the interpreter's own anonymous memory before merging
(imports: torch, transformers), the merge's share above it, and each against one model's size on disk.
Never fails on a number. Usage:
    .venv/bin/python bench/merge_memory.py [--dtype float32|bfloat16] [--work DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024  # kB -> bytes
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


# The child imports everything first, reports its baseline, then merges (one process, as `nemo-adapt merge`).
CHILD = """
import sys, time
from pathlib import Path
import torch, transformers  # noqa: F401  everything the merge imports, before the baseline
from nemo_adapt.merge.cli import load_merge_config, run_merge
print("ready", flush=True)
sys.stdin.readline()
run_merge(load_merge_config(sys.argv[1]), progress=False)
print("done", flush=True)
"""


def measure(merge_file: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(merge_file)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    baseline = _status(proc.pid).get("RssAnon", 0)
    peak = {"RssAnon": baseline, "VmHWM": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            s = _status(proc.pid)
            for k, v in s.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    proc.wait()
    return {"baseline": baseline, "peak_anon": peak["RssAnon"], "peak_rss": peak["VmHWM"], "seconds": seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the three checkpoints and of the merge's output")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="merge_memory_"))
    work.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import load_file, save_file

    from nemo_adapt.cli import main as cli

    base = work / "base"
    if not (base / "model.safetensors").exists():
        assert cli(["export", str(base), "--checkpoint", "embedded:smollm2_135m", "--dtype", args.dtype]) == 0
    size = (base / "model.safetensors").stat().st_size
    for i in (1, 2):
        d = work / f"ft{i}"
        if not (d / "model.safetensors").exists():
            import shutil

            shutil.copytree(base, d)
            gen = torch.Generator().manual_seed(i)
            tensors = load_file(str(base / "model.safetensors"))
            save_file({k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(v.dtype).contiguous()
                       for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
            del tensors
    models = [str(base), str(work / "ft1"), str(work / "ft2")]
    merges = {
        "linear (3 models)": {"merge_method": "linear", "models": models},
        "ties (base + 3 models)": {"merge_method": "ties", "base_model": str(base),
                                   "models": [{"model": m, "density": 0.5} for m in models]},
    }
    mib = 2**20
    print(f"one model: {size / mib:.0f} MiB ({args.dtype}, SmolLM2-135M); bar: peak anonymous memory < 2x = "
          f"{2 * size / mib:.0f} MiB")
    print(f"{'merge':<24} {'peak anon':>10} {'before':>8} {'merge share':>12} {'x model':>8} {'peak RSS':>9} {'s':>5}")
    for name, spec in merges.items():
        f = work / "merge.yaml"
        f.write_text(json.dumps({**spec, "dtype": args.dtype, "out": str(work / "out")}))
        r = measure(f)
        share = r["peak_anon"] - r["baseline"]
        print(f"{name:<24} {r['peak_anon'] / mib:>8.0f}Mi {r['baseline'] / mib:>6.0f}Mi {share / mib:>10.0f}Mi "
              f"{r['peak_anon'] / size:>7.2f}x {r['peak_rss'] / mib:>7.0f}Mi {r['seconds']:>5.1f}")


if __name__ == "__main__":
    main()
