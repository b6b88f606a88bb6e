"""Every adaptation method on the main job, side by side: one command regenerates README's table.

Runs each method's SmolLM2-135M recipe (`recipes/smollm2_135m_*.yaml`, plus full fine-tuning) through
the real CLI, one after the other (`nemo-adapt run RECIPE run.output_dir=OUT/METHOD ...`), then reads
each run directory and tabulates, per method and for the prompt-only baseline:

  test exact match     results.json eval.adapted (the baseline row: eval.baseline of the LoRA run,
                       the same base model with adapters bypassed; other runs skip it)
  trainable params     results.json trainable_params (and the share of the base model's parameters)
  adapter artifact     results.json adapter_bytes (the `adapter/` directory users ship)
  resume checkpoint    results.json checkpoint_bytes (trainable weights + optimizer state; for full
                       fine-tuning all weights)
  train tokens/s       median of metrics.jsonl train/tokens_per_s over logged steps, the first step
                       (warm-up) excluded; non-padding tokens of the global batch / step time
  peak memory          max of metrics.jsonl train/peak_memory_gib: peak RSS of the process on CPU,
                       torch.cuda.max_memory_allocated on a GPU
  budget, wall         steps x global batch x seq length from the run's resolved config.yaml, tokens
                       seen, and the wall time of the whole `nemo-adapt run` (load, train, evaluate)

Every method keeps its recipe's own settings (the virtual-token recipes train unpacked rows, so
their step counts differ: the budget column shows it); `--steps` and `--max-examples` override
run.max_steps and eval.max_examples for all of them alike. `run.log_interval=1` is always passed so
that the tokens/s median sees every step (it changes nothing about training).

The table is printed, written as JSON to OUT/peft_table.json, and written into README.md between
`<!-- peft-table:start -->` and `<!-- peft-table:end -->` (the markers are added under a
"### Methods compared on the main job" heading at the end of README's "### The main job" section
when missing). A failed run becomes a row that says so, with its log, and the command exits 1.
`--only m1,m2` reruns some methods and keeps the other rows of OUT/peft_table.json when they were
measured with the same settings.

    .venv/bin/python bench/peft_table.py [--steps N] [--max-examples N] [--only lora,ia3]
                                         [--readme README.md] [--out runs/peft_table]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE_GLOB = "smollm2_135m_*.yaml"
RECIPE_PREFIX = "smollm2_135m_"
BASE_RECIPE = "lora"  # its run also scores the prompt-only baseline (the same base model for everyone)
FULL = "full"
START = "<!-- peft-table:start -->"
END = "<!-- peft-table:end -->"
MAIN_JOB_HEADING = "### The main job"
TABLE_HEADING = "### Methods compared on the main job"
JSON_NAME = "peft_table.json"
# Display order: the baseline, full fine-tuning, then reparameterisations, then virtual tokens.
ORDER = ["baseline", FULL, "lora", "dora", "ia3", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning"]
COLUMNS = ["method", "test exact match", "trainable params", "adapter artifact", "resume checkpoint",
           "train tokens/s", "peak memory", "budget (steps x rows x seq, lr)", "tokens seen", "wall"]


class TableError(Exception):
    """README markers or inputs that the command cannot use as they are."""


# --------------------------------------------------------------------------------------------------
# Methods and runs


def discover_methods(recipes_dir: Path) -> dict[str, Path | None]:
    """Method name -> recipe path, from `recipes/smollm2_135m_*.yaml`; full fine-tuning maps to None
    (derived from the LoRA recipe) unless `smollm2_135m_full.yaml` exists."""
    methods: dict[str, Path | None] = {}
    for path in sorted(recipes_dir.glob(RECIPE_GLOB)):
        methods[path.stem[len(RECIPE_PREFIX):]] = path
    if FULL not in methods and BASE_RECIPE in methods:
        methods[FULL] = None
    return dict(sorted(methods.items(), key=lambda kv: _order_key(kv[0])))


def _order_key(method: str) -> tuple[int, str]:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def derive_full_recipe(lora_recipe: Path, dest: Path) -> Path:
    """Write a full fine-tuning recipe: the LoRA recipe with `peft: {method: none}` (an override cannot
    drop the LoRA keys, which `peft.method=none` refuses), so data, steps, batch and eval stay the same."""
    data = yaml.safe_load(lora_recipe.read_text(encoding="utf-8"))
    data["peft"] = {"method": "none"}
    data.setdefault("run", {})["name"] = str(data.get("run", {}).get("name", "smollm2_135m")).replace(
        "lora", FULL)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated by bench/peft_table.py from {lora_recipe}: the same job, full fine-tuning (peft.method=none).\n"
    dest.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dest


def run_overrides(method: str, run_dir: Path, steps: int | None, max_examples: int | None) -> list[str]:
    """The `key=value` overrides every run gets: its own directory, every step logged, the shared budget."""
    over = [f"run.output_dir={run_dir}", "run.log_interval=1"]
    if steps is not None:
        over.append(f"run.max_steps={steps}")
    if max_examples is not None:
        over.append(f"eval.max_examples={max_examples}")
    if method != BASE_RECIPE:
        over.append("eval.baseline=false")  # the baseline is the same base model: scored once, in the LoRA run
    return over


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run of this command so the run starts fresh (an existing checkpoint would be resumed).

    Raises:
        TableError: the directory exists but does not look like a run directory this command wrote.
    """
    if not run_dir.exists():
        return
    looks_like_run = run_dir.is_dir() and (
        not any(run_dir.iterdir()) or any((run_dir / f).exists() for f in ("config.yaml", "metrics.jsonl")))
    if not looks_like_run:
        raise TableError(f"{run_dir} exists and is not a run directory; remove it or choose another --out")
    shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------------------
# Collection


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records that carry metrics (events skipped); NaN/Infinity parse as floats."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:
                records.append(rec)
    return records


def throughput(records: list[dict]) -> tuple[float | None, int, bool]:
    """Median train/tokens_per_s over logged steps, excluding step 1 (warm-up).

    Returns:
        (median or None, number of steps in it, whether only step 1 was available and used).
    """
    by_step = {r["step"]: r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r}
    later = [v for s, v in by_step.items() if s > 1]
    if later:
        return statistics.median(later), len(later), False
    if 1 in by_step:
        return by_step[1], 1, True
    return None, 0, False


def collect_run(method: str, run_dir: Path, log: Path | None = None, returncode: int | None = 0,
                wall_s: float | None = None) -> dict:
    """One table row from a run directory.

    Args:
        method: the method name.
        run_dir: its run directory (results.json, metrics.jsonl, config.yaml).
        log: the run's combined stdout/stderr, named in a failure row.
        returncode: the exit status of `nemo-adapt run` (None: not run by us).
        wall_s: wall time of the run.

    Returns:
        A row dict: `status` "ok" with the figures, or "failed" with `reason` and `log`.
    """
    row: dict = {"method": method, "run_dir": str(run_dir), "log": str(log) if log else None, "wall_s": wall_s}

    def failed(reason: str) -> dict:
        row.update(status="failed", reason=reason)
        return row

    if returncode not in (0, None):
        return failed(f"nemo-adapt run exited with {returncode}")
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        return failed(f"no results.json in {run_dir}")
    try:
        res = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return failed(f"unreadable results.json: {e}")
    if res.get("exit_code", 0) != 0:
        return failed(f"the run stopped early (exit_code {res['exit_code']} at step {res.get('step')})")
    if res.get("step") != res.get("total_steps"):
        return failed(f"the run stopped at step {res.get('step')} of {res.get('total_steps')}")
    adapted = (res.get("eval") or {}).get("adapted")
    if not adapted:
        return failed("results.json has no eval.adapted (evaluation disabled or no test split)")
    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    tps, tps_n, first_only = throughput(records)
    peaks = [r["train/peak_memory_gib"] for r in records if "train/peak_memory_gib" in r]
    if tps is None or not peaks:
        return failed(f"no train/tokens_per_s or train/peak_memory_gib in {metrics_path}")
    row.update(
        status="ok",
        exact_match=adapted["exact_match"], correct=adapted.get("correct"), n=adapted.get("n"),
        trainable_params=res["trainable_params"], base_params=res.get("base_params"),
        adapter_bytes=res.get("adapter_bytes"), checkpoint_bytes=res.get("checkpoint_bytes"),
        tokens_per_s=tps, tokens_per_s_steps=tps_n, tokens_per_s_first_step_only=first_only,
        peak_memory_gib=max(peaks), steps=res.get("step"), tokens_seen=res.get("tokens_seen"),
        budget=_budget(run_dir / "config.yaml"),
    )
    baseline = res["eval"].get("baseline")
    if baseline:
        row["baseline"] = {"exact_match": baseline["exact_match"], "correct": baseline.get("correct"),
                           "n": baseline.get("n")}
    return row


def _budget(config_path: Path) -> dict | None:
    if not config_path.is_file():
        return None
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    run, train, data = cfg.get("run", {}), cfg.get("train", {}), cfg.get("data", {})
    return {"steps": run.get("max_steps"), "global_batch_size": train.get("global_batch_size"),
            "seq_length": data.get("seq_length"), "packing": data.get("packing"),
            "lr": cfg.get("optim", {}).get("lr"), "eval_max_examples": cfg.get("eval", {}).get("max_examples")}


def baseline_row(rows: list[dict]) -> dict:
    """The prompt-only baseline row, from the row whose run scored it (the LoRA run)."""
    for r in rows:
        if r.get("status") == "ok" and r.get("baseline"):
            return {"method": "baseline", "status": "ok", "from": r["method"], "run_dir": r["run_dir"],
                    **r["baseline"], "trainable_params": 0}
    src = next((r for r in rows if r["method"] == BASE_RECIPE), None)
    if src is None:
        return {"method": "baseline", "status": "missing",
                "reason": f"not measured: the {BASE_RECIPE} run (which scores it) was not part of this table"}
    return {"method": "baseline", "status": "failed", "log": src.get("log"),
            "reason": f"the {BASE_RECIPE} run, which scores the baseline, gave none"}


# --------------------------------------------------------------------------------------------------
# Formatting


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    if n >= 10**3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def _wall(s: float | None) -> str:
    if s is None:
        return "—"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def format_row(row: dict) -> list[str]:
    """Table cells for one row (same order as COLUMNS)."""
    name = "prompt-only baseline" if row["method"] == "baseline" else \
        ("full fine-tuning" if row["method"] == FULL else row["method"])
    blank = ["—"] * (len(COLUMNS) - 2)
    if row["status"] != "ok":
        where = f" (log: `{row['log']}`)" if row.get("log") else ""
        return [name, f"**failed**: {row['reason']}{where}", *blank]
    em = f"{row['exact_match']:.3f}"
    if row.get("n") is not None:
        em += f" ({row['correct']}/{row['n']})"
    if row["method"] == "baseline":
        return [name, em, "0 (no training)", *["—"] * (len(COLUMNS) - 3)]
    share = ""
    if row.get("base_params"):
        share = f" ({100 * row['trainable_params'] / row['base_params']:.2f}%)"
    adapter = _mib(row.get("adapter_bytes")) if row.get("adapter_bytes") is not None else \
        ("— (all weights)" if row["method"] == FULL else "—")
    tps = f"{row['tokens_per_s']:.1f}" + (" (step 1 only)" if row.get("tokens_per_s_first_step_only") else "")
    b = row.get("budget") or {}
    budget = "—"
    if b:
        budget = f"{b.get('steps')} x {b.get('global_batch_size')} x {b.get('seq_length')}" + \
            (" packed" if b.get("packing") else "") + (f", lr {b['lr']:g}" if b.get("lr") is not None else "")
    seen = "—" if row.get("tokens_seen") is None else f"{row['tokens_seen']:,}"
    return [name, em, f"{_count(row['trainable_params'])}{share}", adapter, _mib(row.get("checkpoint_bytes")),
            tps, f"{row['peak_memory_gib']:.2f} GiB", budget, seen, _wall(row.get("wall_s"))]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (baseline first, then the methods in display order)."""
    ordered = sorted(rows, key=lambda r: _order_key(r["method"]))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in format_row(r)) + " |" for r in ordered]
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in `text` as {column: cell} (for tests and readers)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    split = lambda ln: [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, (c.replace("\\|", "|") for c in split(ln)), strict=True)) for ln in lines[2:]]


def machine_description() -> str:
    """Cores and CPU model from /proc/cpuinfo (and NVIDIA GPUs the driver lists, if any)."""
    cores = os.cpu_count()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = cores
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{affinity} cores usable ({cores} online), {model}"
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    names = []
    for info in gpus:
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    return desc + (f"; GPUs: {', '.join(names)}" if names else "; no GPU (fp32 on CPU)")


def format_block(rows: list[dict], command: str, date: str, machine: str, settings: str) -> str:
    """What goes between the README markers: provenance line, table, failure notes."""
    lines = [f"Regenerated by `{command}` on {date}; machine: {machine}; settings: {settings}.", "",
             format_table(rows), ""]
    lines.append("Exact match over the test split; trainable parameters as a share of the base model's; "
                 "adapter artifact = the shipped `adapter/` directory, resume checkpoint = trainable weights + "
                 "optimizer state (all weights for full fine-tuning); train tokens/s = median over steps after "
                 "the first (non-padding tokens / step time); peak memory = max over training steps (on CPU the "
                 "process's peak RSS since start, model loading included; on a GPU max allocated CUDA memory); wall = the whole `nemo-adapt run` (load, train, "
                 "evaluate). The baseline is the LoRA run's base model with adapters bypassed.")
    for r in rows:
        if r["status"] == "ok" and r.get("reused_from"):
            lines.append(f"- {r['method']}: row kept from the run of {r['reused_from']} (same settings).")
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    """README text with `block` between the markers; adds heading + markers at the end of the main-job
    section when there are none. Applying it twice with the same block changes nothing more.

    Raises:
        TableError: a marker without its partner, markers out of order or repeated, or no main-job section.
    """
    n_start, n_end = readme.count(START), readme.count(END)
    if (n_start, n_end) == (0, 0):
        readme = _insert_markers(readme)
        n_start = n_end = 1
    if (n_start, n_end) != (1, 1) or readme.index(START) > readme.index(END):
        raise TableError(f"README must hold exactly one {START} followed by one {END} "
                         f"(found {n_start} start, {n_end} end markers); fix them by hand")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block.strip()}\n{END}{tail}"


def _headings(lines: list[str]) -> list[tuple[int, int]]:
    """(line index, level) of every Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for k, ln in enumerate(lines):
        if ln.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6})\s", ln)):
            found.append((k, len(m.group(1))))
    return found


def _insert_markers(readme: str) -> str:
    lines = readme.split("\n")
    heads = _headings(lines)
    existing = [k for k, _ in heads if lines[k].strip() == TABLE_HEADING]
    if existing:  # the heading is there, its markers were deleted: put them back right under it
        lines[existing[0] + 1:existing[0] + 1] = ["", START, END]
        return "\n".join(lines)
    main = [(k, lvl) for k, lvl in heads if lines[k].strip() == MAIN_JOB_HEADING]
    if not main:
        raise TableError(f"README has no {START} markers and no {MAIN_JOB_HEADING!r} section to add them to")
    i, level = main[0]
    j = next((k for k, lvl in heads if k > i and lvl <= level), len(lines))
    while j > i + 1 and not lines[j - 1].strip():
        j -= 1
    lines[j:j] = ["", TABLE_HEADING, "", START, END]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The command


def settings_text(steps: int | None, max_examples: int | None) -> str:
    s = "each recipe's own steps" if steps is None else f"run.max_steps={steps} for every method"
    e = "the whole test split" if max_examples is None else f"eval.max_examples={max_examples}"
    return f"{s}, {e}, recipe data/batch/seq length/learning rate, run.log_interval=1"


def merge_previous(rows: list[dict], previous: dict | None, settings: dict, methods: dict) -> list[dict]:
    """Rows of a previous table for methods not rerun now, when it was measured with the same settings."""
    if not previous or previous.get("settings") != settings:
        return rows
    have = {r["method"] for r in rows}
    for old in previous.get("rows", []):
        if old["method"] not in have and old["method"] in methods and old["method"] != "baseline":
            rows.append({**old, "reused_from": old.get("reused_from") or previous.get("date")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="override run.max_steps for every method (default: each recipe's)")
    ap.add_argument("--max-examples", type=int, help="override eval.max_examples (default: the whole test split)")
    ap.add_argument("--only", help="comma-separated methods to (re)run, e.g. lora,ia3 (default: all)")
    ap.add_argument("--readme", default=str(REPO / "README.md"), help="README to write the table into")
    ap.add_argument("--out", default=str(REPO / "runs" / "peft_table"), help="run directories, logs and JSON")
    ap.add_argument("--recipes", default=str(REPO / "recipes"), help=argparse.SUPPRESS)
    ap.add_argument("--cli", help=argparse.SUPPRESS)  # the nemo-adapt executable (tests give a stand-in)
    args = ap.parse_args(argv)
    for name in ("steps", "max_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    out = Path(args.out).resolve()
    methods = discover_methods(Path(args.recipes))
    if not methods:
        ap.error(f"no recipes match {Path(args.recipes) / RECIPE_GLOB}")
    chosen = list(methods)
    if args.only:
        chosen = list(dict.fromkeys(m.strip() for m in args.only.split(",") if m.strip()))
        unknown = [m for m in chosen if m not in methods]
        if unknown:
            ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(methods)}")
    readme = Path(args.readme)
    if not readme.is_file():
        ap.error(f"--readme {readme} does not exist")
    replace_block(readme.read_text(encoding="utf-8"), "check")  # bad markers fail now, not after an hour

    cli = Path(args.cli) if args.cli else Path(sys.executable).with_name("nemo-adapt")
    if not args.cli and not cli.exists():
        cli = REPO / ".venv" / "bin" / "nemo-adapt"
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    rows = []
    for method in chosen:
        recipe = methods[method] or derive_full_recipe(methods[BASE_RECIPE],
                                                       out / "recipes" / f"{RECIPE_PREFIX}{FULL}.yaml")
        run_dir = out / method
        log = out / "logs" / f"{method}.log"
        cmd = [str(cli), "run", str(recipe), *run_overrides(method, run_dir, args.steps, args.max_examples)]
        print(f"[{method}] {shlex.join(cmd)}\n[{method}] log: {log}", flush=True)
        try:
            clear_run_dir(run_dir)
        except TableError as e:
            rows.append({"method": method, "status": "failed", "reason": str(e), "log": None, "wall_s": None})
            print(f"[{method}] FAILED: {e}", flush=True)
            continue
        t0 = time.perf_counter()
        with log.open("w", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the log fills as it runs
        wall = time.perf_counter() - t0
        row = collect_run(method, run_dir, log, proc.returncode, wall)
        rows.append(row)
        status = "ok" if row["status"] == "ok" else f"FAILED: {row['reason']}"
        print(f"[{method}] {status} ({_wall(wall)})", flush=True)

    settings = {"steps": args.steps, "max_examples": args.max_examples}
    json_path = out / JSON_NAME
    previous = None
    if args.only and json_path.is_file():
        try:
            previous = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
    rows = merge_previous(rows, previous, settings, methods)
    fresh_baseline = BASE_RECIPE in chosen
    if fresh_baseline or not previous or previous.get("settings") != settings:
        base = baseline_row(rows)
    else:
        base = next((r for r in previous.get("rows", []) if r["method"] == "baseline"), baseline_row(rows))
        if base.get("status") == "ok":
            base = {**base, "reused_from": base.get("reused_from") or previous.get("date")}
    rows.append(base)

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = ".venv/bin/python bench/peft_table.py" + "".join(
        f" {a}" for a in _shown_args(args))
    machine = machine_description()
    block = format_block(rows, command, date, machine, settings_text(args.steps, args.max_examples))
    print("\n" + block + "\n", flush=True)

    json_path.write_text(json.dumps({"command": command, "date": date, "machine": machine, "settings": settings,
                                     "rows": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    readme.write_text(replace_block(readme.read_text(encoding="utf-8"), block), encoding="utf-8")
    print(f"wrote {json_path} and the table in {readme}", flush=True)
    failed = [r["method"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _shown_args(args) -> list[str]:
    shown = []
    if args.steps is not None:
        shown.append(f"--steps {args.steps}")
    if args.max_examples is not None:
        shown.append(f"--max-examples {args.max_examples}")
    if args.only:
        shown.append(f"--only {args.only}")
    if Path(args.readme).resolve() != (REPO / "README.md").resolve():
        shown.append(f"--readme {args.readme}")
    if Path(args.out).resolve() != (REPO / "runs" / "peft_table").resolve():
        shown.append(f"--out {args.out}")
    return shown


if __name__ == "__main__":
    sys.exit(main())
