"""`nemo-adapt compare STUDY.yaml`: the adaptation strategy matrix.

Trains what a study (`eval.study`) names and has not been trained, evaluates every candidate the same way, and
writes the matrix with a recommendation per deployment scenario:

    OUT/<candidate>/          each trained candidate's run directory (`nemo-adapt run`), its eval.json beside
    OUT/<baseline>/           the prompt-only baseline's config.yaml and eval_baseline.json
    OUT/logs/<candidate>.log  the training process's output
    OUT/matrix.json           every row and every scenario's verdicts, with the dataset version and study hash
    OUT/report.md             the table, the scenarios and how each column is measured
    OUT/report.html           the same with plots: quality vs trainable parameters, quality vs training cost,
                              latency overhead per method

Training runs as its own process (`nemo-adapt run`, under `torchrun` when the recipe's layout needs more than
one rank), so a candidate killed half way resumes from its last checkpoint the next time; a finished run is
reused when its resolved config equals the candidate's, and a finished evaluation when its inputs are the
same (candidate weights, suites, general text and settings). Evaluation runs in this process, one model at a
time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nemo_adapt.errors import ConfigError
from nemo_adapt.eval.study import (
    Candidate,
    Scenario,
    Study,
    check_candidates,
    load_study,
    write_candidate_recipe,
)

STATE = "study_state.json"


# --------------------------------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename: a killed study never leaves half a report or state file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _config_sha(cfg) -> str:
    """Identity of a resolved recipe: the text `nemo-adapt run` writes to RUN_DIR/config.yaml."""
    from nemo_adapt.config.loader import dump_resolved

    return hashlib.sha256(dump_resolved(cfg).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    from nemo_adapt.data.fingerprint import sha256_file

    return sha256_file(path)


def metrics_records(path: Path) -> list[dict]:
    """metrics.jsonl records that carry metrics (events skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:
                out.append(rec)
    return out


def train_throughput(records: list[dict]) -> float | None:
    """Median train/tokens_per_s over logged steps after the first (warm-up), or step 1's when it is all."""
    by_step = {r["step"]: r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r}
    later = [v for s, v in by_step.items() if s > 1]
    return statistics.median(later) if later else by_step.get(1)


# --------------------------------------------------------------------------------------------------
# The study's state: what was trained and evaluated, so a killed study resumes


@dataclasses.dataclass
class StudyState:
    """OUT/study_state.json: per candidate, its training wall time and its evaluation's identity."""

    path: Path
    data: dict

    @classmethod
    def open(cls, path: Path) -> StudyState:
        return cls(path, _read_json(path) or {"candidates": {}})

    def entry(self, name: str) -> dict:
        return self.data["candidates"].setdefault(name, {})

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(self.data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Training


def _nproc(cfg) -> int:
    """Ranks the recipe's model-parallel layout needs on this machine (one data-parallel replica)."""
    p = cfg.parallel
    return p.tensor * p.pipeline * p.context


def check_out_dir(out_dir: Path, name: str) -> None:
    """Refuse an output directory that is not this study's: a file, or a non-empty directory without the state of a
    study of this name (another study's output, or anything else) — before any work.

    Raises:
        ConfigError: naming the directory and what it holds.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; the study writes a directory there")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    state = _read_json(out_dir / STATE)
    if state is None:
        raise ConfigError(f"--out {str(out_dir)!r} is not empty and holds no study (no {STATE}); choose an empty "
                          "or new directory")
    if state.get("study") not in (None, name):
        raise ConfigError(f"--out {str(out_dir)!r} holds study {state['study']!r}, not {name!r}; choose another "
                          "directory")


def finished_run(run_dir: Path) -> dict | None:
    """results.json of a run that trained to its last step and evaluated, else None."""
    res = _read_json(run_dir / "results.json")
    if res and res.get("exit_code") == 0 and res.get("step") == res.get("total_steps"):
        return res
    return None


def train_candidate(c: Candidate, recipe: Path, overrides: list[str], cfg, run_dir: Path, log: Path,
                    state: StudyState) -> dict:
    """Train a candidate unless a finished run of the same resolved config is in `run_dir`.

    A run directory holding a finished run of another config is refused (it is never overwritten); an
    unfinished one is resumed by `nemo-adapt run` itself.

    Returns:
        The run's results.json.

    Raises:
        ConfigError: `run_dir` holds another configuration's finished run, or training failed (exit status and
            the log's last lines named).
    """
    from nemo_adapt.config import load_resolved

    want = _config_sha(cfg)
    done = finished_run(run_dir)
    if done is not None:
        have = _config_sha(load_resolved(run_dir / "config.yaml"))
        if have == want:
            return done
        raise ConfigError(f"candidate {c.name!r}: {run_dir} holds a finished run of another configuration "
                          f"(its config.yaml differs from {recipe} with the study's overrides); remove it or "
                          "use another --out — a finished run is never overwritten")
    n = _nproc(cfg)
    cmd = [sys.executable, "-m", "nemo_adapt.cli", "run", str(recipe), *overrides]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "nemo_adapt.cli", "run", str(recipe), *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # Its own session: a terminal's Ctrl-C reaches this process only, which then asks the run to stop the
        # way a scheduler does (SIGTERM: it checkpoints), instead of killing it mid-step.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C): the run checkpoints on SIGTERM, so the next compare resumes it.
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
            if proc.poll() is None:
                proc.kill()
            raise
        finally:
            entry = state.entry(c.name)
            entry["train_wall_s"] = round(entry.get("train_wall_s", 0.0) + time.monotonic() - start, 1)
            state.save()
    done = finished_run(run_dir)
    if code != 0 or done is None:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise ConfigError(f"candidate {c.name!r}: `nemo-adapt run` exited with {code}; the study stops "
                          f"(rerun to resume). Log {log}, last lines:\n{tail}")
    return done


# --------------------------------------------------------------------------------------------------
# Evaluation


def _eval_key(study: Study, c: Candidate, weights: Path | None, max_examples: int | None) -> str:
    """Identity of an evaluation's inputs: the candidate's weights, the test file, suites, general text, settings."""
    ev = study.evaluation
    parts = {
        "weights": _file_sha(weights) if weights is not None and weights.is_file() else str(weights),
        "dataset": study.dataset.sha256,  # the test split, and the train split the k-shot examples come from
        "suites": [_file_sha(Path(s)) for s in ev.suites],
        "forgetting": _file_sha(Path(ev.forgetting)) if ev.forgetting else None,
        "latency_tokens": ev.latency_tokens, "few_shot": ev.few_shot if c.baseline else None,
        "max_examples": max_examples,
    }  # not the code version: a commit alone does not re-evaluate a study (each result records it)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _weights_file(run_dir: Path, cfg) -> Path | None:
    if cfg.peft.method == "none":
        files = sorted((run_dir / "model").glob("*.safetensors"))
        return files[0] if files else None
    files = sorted((run_dir / "adapter").glob("adapter_model.*"))
    return files[0] if files else None


def evaluate_candidate(study: Study, c: Candidate, cfg, run_dir: Path, state: StudyState,
                       max_examples: int | None) -> dict:
    """Evaluate a candidate as every other one (task metrics with intervals, suites, forgetting, inference cost),
    reusing an earlier evaluation of the same inputs.

    Returns:
        A trained candidate's eval.json, or for the baseline {"baseline": best, "baseline_<k>shot": ...}.
    """
    from nemo_adapt.eval.cli import evaluate_baselines_of_run, evaluate_run

    ev = study.evaluation
    key = _eval_key(study, c, None if c.baseline else _weights_file(run_dir, cfg), max_examples)
    entry = state.entry(c.name)
    written = run_dir / ("eval_baseline.json" if c.baseline else "eval.json")
    if entry.get("eval_key") == key and written.is_file():
        data = _read_json(written)
        if data is not None:
            return data
    start = time.monotonic()
    if c.baseline:
        result = evaluate_baselines_of_run(run_dir, ev.few_shot, max_examples, ev.suites, latency=ev.latency_tokens)
        result = {k: {kk: vv for kk, vv in v.items() if kk != "written"} for k, v in result.items()}
    else:
        result = evaluate_run(run_dir, max_examples, suites=ev.suites, general_text=ev.forgetting,
                              latency=ev.latency_tokens)
    entry.update(eval_key=key, eval_wall_s=round(time.monotonic() - start, 1))
    state.save()
    return result


# --------------------------------------------------------------------------------------------------
# The matrix


def gpu_hours(study: Study, cfg, steps: int) -> dict:
    """The planner's training cost of `steps` steps of `cfg` on the study's target cluster.

    Returns:
        {"gpu_hours", "step_time_s", "layout", "gpus"} or {"gpu_hours": None, "reason"}.
    """
    if study.target is None:
        return {"gpu_hours": None, "reason": "the study names no target cluster"}
    from nemo_adapt.planner.search import plan, request_from_config

    t = study.target
    try:
        result = plan(request_from_config(cfg, gpu=t.gpu, nodes=t.nodes, gpus_per_node=t.gpus_per_node))
    except ConfigError as err:
        return {"gpu_hours": None, "reason": str(err)}
    best = result.explicit if result.explicit is not None and result.explicit.fits else (
        result.ranked[0] if result.ranked else None)
    if best is None:
        return {"gpu_hours": None, "reason": f"no layout fits on {t.nodes}x{t.gpus_per_node} {t.gpu}"}
    step = best.perf.step_time_s
    return {"gpu_hours": step * steps * result.world_size / 3600, "step_time_s": step,
            "layout": best.layout.label(), "gpus": result.world_size, "gpu": result.gpu.name}


def _decode_rate(cost: dict | None) -> float | None:
    if not cost:
        return None
    rates = cost.get("decode_tokens_per_s") or {}
    return rates.get("1", rates.get(1))


def _interval(entry: dict | None) -> dict | None:
    return None if entry is None else {k: entry[k] for k in ("value", "low", "high") if k in entry}


def candidate_row(study: Study, c: Candidate, cfg, run_dir: Path, results: dict | None, evaluation: dict,
                  state: StudyState) -> dict:
    """One row of the matrix (see `COLUMNS` in the report for what each field means)."""
    from nemo_adapt.eval.metrics import task_score
    from nemo_adapt.peft.base import get_peft_method

    metric = cfg.eval.metric
    entry = state.data["candidates"].get(c.name, {})
    if c.baseline:
        best = evaluation["baseline"]
        others = {k: v for k, v in evaluation.items() if k != "baseline"}
        row = {"name": c.name, "kind": "baseline", "method": f"prompt-only ({best['shots']}-shot)",
               "shots": best["shots"], "trainable_params": 0, "artifact_bytes": 0, "train_tokens_per_s": None,
               "train_wall_s": 0.0, "tokens_seen": 0, "gpu_hours": 0.0, "peak_train_memory_gib": None,
               "forgetting": {"value": 0.0, "low": 0.0, "high": 0.0, "note": "the base itself"},
               "alternatives": {k: {"shots": v["shots"], "metric": _interval(v["metrics"].get(metric)) or
                                    {"value": task_score(v["metrics"], metric)}, "exact_match": v["exact_match"]}
                                for k, v in others.items()},
               "prompt_tokens_mean": best.get("prompt_tokens_mean")}
        result = best
    else:
        method = cfg.peft.method
        records = metrics_records(run_dir / "metrics.jsonl")
        peaks = [r["train/peak_memory_gib"] for r in records if "train/peak_memory_gib" in r]
        full = method == "none"
        plan = gpu_hours(study, cfg, results["step"])
        forgetting = (evaluation.get("forgetting") or {}).get("loss_delta")
        row = {"name": c.name, "kind": "full" if full else "peft", "method": "full fine-tuning" if full else method,
               "trainable_params": results["trainable_params"],
               "artifact_bytes": results.get("model_bytes") if full else results.get("adapter_bytes"),
               "train_tokens_per_s": train_throughput(records), "train_wall_s": entry.get("train_wall_s"),
               "steps": results["step"], "tokens_seen": results.get("tokens_seen"),
               "gpu_hours": plan.get("gpu_hours"), "gpu_hours_detail": plan,
               "peak_train_memory_gib": max(peaks) if peaks else None,
               "forgetting": _interval(forgetting),
               "merges_into_base": bool(not full and get_peft_method(method).merges_into_base),
               "prompt_tokens_mean": evaluation.get("prompt_tokens_mean")}
        result = evaluation
    row.update(base_params=None if c.baseline else results.get("base_params"),
               # The base's weights at the dtype the candidate's artifact is written in (the training parameters'),
               # so base, adapters and full models compare in one unit.
               base_bytes=None if c.baseline else results["base_params"] * _dtype_bytes(results),
               run_dir=str(run_dir), eval_wall_s=entry.get("eval_wall_s"), metric=metric,
               score=_interval(result["metrics"].get(metric)) or {"value": task_score(result["metrics"], metric)},
               exact_match=_interval(result["metrics"]["exact_match"]), n=result["n"],
               fields={k: v["value"] for k, v in (result["metrics"].get("field_accuracy") or {}).items()},
               suites={name: {"pass": s["pass"], "passed": s["passed"], "checked": s["checked"],
                              "sha256": s["sha256"]} for name, s in (result.get("suites") or {}).items()},
               inference=result.get("inference_cost"), provenance=result.get("provenance"))
    if row["score"].get("low") is None and metric in ("field_accuracy", "label_accuracy"):
        # A per-field metric is the mean over fields; its interval is the fields' intervals averaged (a
        # conservative summary: the fields' errors are correlated within an example).
        fields = result["metrics"][metric]
        row["score"] = {k: sum(v[k] for v in fields.values()) / len(fields) for k in ("value", "low", "high")}
    return row


def _dtype_bytes(results: dict) -> int:
    dtype = (results.get("megatron") or {}).get("params_dtype", "float32")
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


def add_serving_figures(rows: list[dict]) -> None:
    """Latency overheads against the base (decode time per token at batch 1, minus 1), unmerged and merged, and
    the context length each row is asked with. The base rate is measured in the same process as the candidate
    (adapters bypassed) where it can be; a full fine-tuning model is compared with the baseline's base."""
    base_rate = next((_decode_rate(r["inference"].get("as_evaluated")) for r in rows
                      if r["kind"] == "baseline" and r.get("inference")), None)
    trained = next((r for r in rows if r["kind"] != "baseline"), None)
    for r in rows:  # the baseline serves the base the trained candidates start from (one study, one base)
        if r["kind"] == "baseline" and trained is not None:
            r["base_params"], r["base_bytes"] = trained["base_params"], trained["base_bytes"]
    for r in rows:
        inf = r.get("inference") or {}
        own = _decode_rate(inf.get("as_evaluated"))
        ref = _decode_rate(inf.get("base")) or base_rate
        if r["kind"] == "baseline":
            r["latency_overhead"], r["latency_overhead_merged"] = 0.0, None
        else:
            r["latency_overhead"] = ref / own - 1 if own and ref else None
            merged = _decode_rate(inf.get("merged"))
            r["latency_overhead_merged"] = ref / merged - 1 if merged and ref else None
        r["context_tokens"] = (inf.get("as_evaluated") or {}).get("context_tokens")
        if r["kind"] == "baseline" and r.get("prompt_tokens_mean") is not None:
            r["context_tokens"] = r["prompt_tokens_mean"]  # the shots make the baseline's prompts longer


# --------------------------------------------------------------------------------------------------
# Scenarios


def _served_overhead(row: dict, variants: int) -> float | None:
    """Latency overhead as the row would be served: one variant of a method that folds into the base is served
    merged; several variants over one base are served unmerged (one base, N adapters)."""
    if variants == 1 and row.get("latency_overhead_merged") is not None:
        return row["latency_overhead_merged"]
    return row.get("latency_overhead")


def serving_bytes(row: dict, variants: int) -> int | None:
    """Weights held in memory to serve `variants` variants: the base once plus each adapter (PEFT, unmerged; one
    variant of a folding method is served merged at the base's size), or one whole model per variant (full
    fine-tuning); the prompt-only baseline serves the base alone."""
    base = row.get("base_bytes")
    if row["kind"] == "baseline":
        return base
    if row["kind"] == "full":
        return None if row.get("artifact_bytes") is None else variants * row["artifact_bytes"]
    if base is None or row.get("artifact_bytes") is None:
        return None
    if variants == 1 and row.get("merges_into_base"):
        return base
    return base + variants * row["artifact_bytes"]


def judge(scenario: Scenario, rows: list[dict]) -> dict:
    """Check every row against a scenario's gates and recommend one.

    Gates (each only when the scenario sets it): the task metric's 95% lower bound >= the prompt-only baseline's
    value + min_gain, and >= min_quality; the latency overhead as served (`_served_overhead`) <= max; the
    training GPU-hours of all variants <= gpu_hours; the forgetting interval's upper bound <= max_forgetting; every
    named suite passed. Among rows that pass: `prefer: quality` takes the highest metric, and among those whose
    interval overlaps it, the cheapest; `prefer: cost` takes the cheapest (serving memory, then GPU-hours).

    Returns:
        {"scenario", "recommendation": row name or None, "why", "verdicts": {row name: {"pass", "failed": [...]}}}
    """
    baseline = next((r for r in rows if r["kind"] == "baseline"), None)
    base_value = baseline["score"]["value"] if baseline else None
    verdicts = {}
    for r in rows:
        failed = []
        low = r["score"].get("low", r["score"]["value"])
        if scenario.min_gain is not None and base_value is not None and r is not baseline:
            need = base_value + scenario.min_gain
            if low < need:
                failed.append(f"{r['metric']} lower bound {low:.3f} < baseline {base_value:.3f} + {scenario.min_gain}")
        if scenario.min_gain is not None and r is baseline and scenario.min_gain > 0:
            failed.append(f"the baseline cannot gain {scenario.min_gain} over itself")
        if scenario.min_quality is not None and low < scenario.min_quality:
            failed.append(f"{r['metric']} lower bound {low:.3f} < {scenario.min_quality}")
        if scenario.max_latency_overhead is not None:
            over = _served_overhead(r, scenario.variants)
            if over is None:
                failed.append("latency overhead not measured")
            elif over > scenario.max_latency_overhead:
                failed.append(f"latency overhead {100 * over:+.0f}% > {100 * scenario.max_latency_overhead:.0f}%")
        if scenario.gpu_hours is not None:
            hours = r.get("gpu_hours")
            if hours is None:
                failed.append("GPU-hours not estimated")
            elif hours * scenario.variants > scenario.gpu_hours:
                failed.append(f"{scenario.variants} variant(s) x {hours:.3g} GPU-h > budget {scenario.gpu_hours}")
        if scenario.max_forgetting is not None:
            f = r.get("forgetting")
            high = None if f is None else f.get("high", f.get("value"))
            if high is None:
                failed.append("forgetting not measured")
            elif high > scenario.max_forgetting:
                failed.append(f"forgetting upper bound {high:+.3f} > {scenario.max_forgetting} nats/token")
        for name in scenario.suites:
            s = r["suites"].get(name)
            if s is None or not s["pass"]:
                what = "not run" if s is None else f"{s['passed']}/{s['checked']}"
                failed.append(f"suite {name} failed ({what})")
        verdicts[r["name"]] = {"pass": not failed, "failed": failed,
                               "serving_bytes": serving_bytes(r, scenario.variants),
                               "served_overhead": _served_overhead(r, scenario.variants)}
    passing = [r for r in rows if verdicts[r["name"]]["pass"]]

    def cost(r):
        mem = verdicts[r["name"]]["serving_bytes"]
        return (math.inf if mem is None else mem, r.get("gpu_hours") or 0.0, r["trainable_params"])

    if not passing:
        return {"scenario": dataclasses.asdict(scenario), "recommendation": None, "verdicts": verdicts,
                "why": "no candidate meets every gate; see each one's failed gates"}
    if scenario.prefer == "cost":
        pick = min(passing, key=cost)
        why = "the cheapest to serve and train of the candidates that meet every gate"
    else:
        top = max(passing, key=lambda r: r["score"]["value"])
        tied = [r for r in passing if r["score"].get("high", r["score"]["value"]) >= top["score"].get("low", top["score"]["value"])]
        pick = min(tied, key=cost)
        why = ("the best task metric of those that meet every gate" if pick is top else
               f"within the confidence interval of the best ({top['name']}) and cheaper to serve and train")
    mem = verdicts[pick["name"]]["serving_bytes"]
    why += (f": {pick['metric']} {pick['score']['value']:.3f}"
            + (f" [{pick['score']['low']:.3f}, {pick['score']['high']:.3f}]" if "low" in pick["score"] else "")
            + (f", serving {scenario.variants} variant(s) in {mem / 2**30:.2f} GiB" if mem else "")
            + (f", {pick['gpu_hours'] * scenario.variants:.3g} GPU-h to train" if pick.get("gpu_hours") else ""))
    return {"scenario": dataclasses.asdict(scenario), "recommendation": pick["name"], "why": why, "verdicts": verdicts}


# --------------------------------------------------------------------------------------------------
# Reports


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} M" if n >= 10**6 else (f"{n / 1e3:.1f} k" if n >= 10**3 else str(n))


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


def _fmt_wall(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{int(s // 60)} min {int(s % 60)} s" if s >= 60 else f"{s:.0f} s"


def _fmt_ci(e: dict | None, signed: bool = False) -> str:
    if not e or e.get("value") is None:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    out = f.format(e["value"])
    if "low" in e and "high" in e and e["low"] is not None:
        out += f" [{f.format(e['low'])}, {f.format(e['high'])}]"
    return out


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.0f}%"


COLUMNS = [
    ("candidate", "the study's name for it"),
    ("method", "prompt-only (k-shot: the best of zero-shot and k-shot), a PEFT method, or full fine-tuning"),
    ("metric [95% CI]", "the recipe's eval.metric on the test split, percentile bootstrap interval over examples"),
    ("fields", "per-field accuracy for `key: value` answers"),
    ("trainable", "trainable parameters (share of the base model's)"),
    ("artifact", "what is shipped: adapter/ (PEFT) or model/ (full fine-tuning); 0 for prompting"),
    ("train tok/s", "median non-padding tokens/s over training steps after the first, on this machine"),
    ("train wall", "wall time of `nemo-adapt run` on this machine (start-up, training, its own evaluation), summed "
                   "over the invocations that trained it"),
    ("GPU-h (target)", "the planner's step time on the study's target cluster x steps x GPUs"),
    ("forgetting", "general-text loss change against the base, nats/token [95% CI]"),
    ("suites", "regression suites passed/checked (a suite with only_where_base_passes checks only the cases the "
               "base passes)"),
    ("TTFT", "time to first token, batch 1, ms"),
    ("decode b1 / bN", "decode tokens/s at batch 1 and at batch 8"),
    ("overhead", "decode time per token against the base, unmerged / merged, the base measured in the same process "
                 "(full fine-tuning: against the baseline's measurement of the base — the same architecture, so its "
                 "overhead is measurement noise)"),
    ("context", "tokens attended per prompt: the prompt plus virtual tokens and prefixes (the baseline's shots)"),
]


def _cells(r: dict) -> list[str]:
    inf = (r.get("inference") or {}).get("as_evaluated") or {}
    rates = inf.get("decode_tokens_per_s") or {}
    share = ""
    if r.get("base_params") and r["trainable_params"]:
        share = f" ({100 * r['trainable_params'] / r['base_params']:.2f}%)"
    suites = ", ".join(f"{n} {s['passed']}/{s['checked']}{'' if s['pass'] else ' FAIL'}" for n, s in r["suites"].items())
    overhead = _fmt_pct(r.get("latency_overhead"))
    if r.get("latency_overhead_merged") is not None:
        overhead += f" / {_fmt_pct(r['latency_overhead_merged'])}"
    forgetting = _fmt_ci(r.get("forgetting"), signed=True)
    if r["kind"] == "baseline":  # zero by definition, not measured: the baseline is the base
        forgetting, overhead = "0 (the base)", "0 (the base)"
    return [
        r["name"], r["method"], _fmt_ci(r["score"]),
        ", ".join(f"{k} {v:.3f}" for k, v in r["fields"].items()) or "—",
        _fmt_count(r["trainable_params"]) + share, _fmt_bytes(r.get("artifact_bytes")),
        "—" if r.get("train_tokens_per_s") is None else f"{r['train_tokens_per_s']:.0f}",
        _fmt_wall(r.get("train_wall_s")),
        "—" if r.get("gpu_hours") is None else f"{r['gpu_hours']:.3g}",
        forgetting, suites or "—",
        "—" if not inf else f"{1000 * inf['ttft_s']:.0f}",
        " / ".join("—" if v is None else f"{v:.1f}" for v in rates.values()) or "—", overhead,
        "—" if r.get("context_tokens") is None else f"{r['context_tokens']:.0f}",
    ]


def report_markdown(matrix: dict) -> str:
    """report.md: the matrix, the scenarios' recommendations with their deciding numbers, and the legend."""
    rows, out = matrix["rows"], io.StringIO()
    out.write(f"# Strategy matrix: {matrix['study']}\n\n")
    out.write(_provenance_line(matrix) + "\n\n")
    head = [name for name, _ in COLUMNS]
    out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for r in rows:
        out.write("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |\n")
    for r in rows:
        for alt in (r.get("alternatives") or {}).values():
            out.write(f"\nAlso scored: {r['name']} {alt['shots']}-shot, {r['metric']} {_fmt_ci(alt['metric'])}.")
    if matrix["scenarios"]:
        out.write("\n\n## Scenarios\n\n")
        for s in matrix["scenarios"]:
            sc = s["scenario"]
            out.write(f"**{sc['name']}** ({sc['description'] or 'no description'}; {_scenario_terms(sc)}): ")
            out.write(f"**{s['recommendation']}** — {s['why']}.\n" if s["recommendation"] else f"none — {s['why']}.\n")
            for name, v in s["verdicts"].items():
                if not v["pass"]:
                    out.write(f"- {name}: {'; '.join(v['failed'])}\n")
            out.write("\n")
    out.write("\n## Columns\n\n")
    for name, doc in COLUMNS:
        out.write(f"- **{name}**: {doc}\n")
    return out.getvalue()


def _provenance_line(matrix: dict) -> str:
    """Which data, study and machine, and how long: this invocation's wall time and the training plus evaluation
    time of every candidate summed over the invocations that did it (a resumed study reuses finished work)."""
    ds = matrix["dataset"]
    splits = ", ".join(f"{k} {ds['files'][k]} sha256 {v[:12]}" for k, v in ds["sha256"].items())
    total = matrix.get("compute_s")
    return (f"Dataset `{ds['version']}` ({splits}); study {matrix['study_file']} (sha256 "
            f"{matrix['study_sha256'][:12]}); {matrix['machine']}; training and evaluation "
            f"{_fmt_wall(total)} in all, this invocation {_fmt_wall(matrix['wall_s'])} ({matrix['when']}).")


def _scenario_terms(sc: dict) -> str:
    """A scenario's thresholds as written in the study, e.g. `min_gain=0.05, variants=16; prefer cost`."""
    gates = [f"{k}=[{', '.join(v)}]" if isinstance(v, list | tuple) else f"{k}={v}" for k, v in sc.items()
             if k not in ("name", "description", "prefer") and v not in (None, (), [])]
    return f"{', '.join(gates)}; prefer {sc['prefer']}"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()[buf.getvalue().find("<svg"):]


def report_html(matrix: dict) -> str:
    """report.html: the table, scenarios and three plots (inline SVG, matplotlib): quality vs trainable
    parameters, quality vs training cost, and latency overhead per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix["rows"]
    metric = rows[0]["metric"] if rows else "metric"
    plots = []

    def scatter(xkey: str, xlabel: str, log: bool) -> str:
        fig, ax = plt.subplots(figsize=(6, 4))
        positive = [r[xkey] for r in rows if (r.get(xkey) or 0) > 0]
        floor = min(positive) / 10 if positive else 1.0  # where a zero (prompting) goes on a log axis
        for r in rows:
            x = r.get(xkey)
            if x is None:
                continue
            x = x if x > 0 or not log else floor
            s = r["score"]
            err = [[s["value"] - s.get("low", s["value"])], [s.get("high", s["value"]) - s["value"]]]
            ax.errorbar([x], [s["value"]], yerr=err, fmt="o", capsize=3)
            ax.annotate(r["name"], (x, s["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (95% CI)")
        ax.grid(alpha=0.3)
        svg = _svg(fig)
        plt.close(fig)
        return svg

    plots.append(("Quality vs trainable parameters", scatter("trainable_params", "trainable parameters (prompting: "
                                                            "none, plotted a decade left of the fewest)", True)))
    plots.append(("Quality vs training cost", scatter("gpu_hours", "GPU-hours on the target cluster (prompting: "
                                                     "none, plotted a decade left of the least)", True)))
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["name"] for r in rows]
    ax.bar(names, [100 * (r.get("latency_overhead") or 0) for r in rows], label="unmerged")
    ax.bar(names, [100 * (r.get("latency_overhead_merged") or 0) for r in rows], width=0.4, label="merged")
    ax.set_ylabel("decode time per token vs base (%)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    plots.append(("Latency overhead per candidate", _svg(fig)))
    plt.close(fig)

    esc = html.escape
    table = "<tr>" + "".join(f"<th title='{esc(doc)}'>{esc(name)}</th>" for name, doc in COLUMNS) + "</tr>"
    for r in rows:
        table += "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(r)) + "</tr>"
    scen = ""
    for s in matrix["scenarios"]:
        sc = s["scenario"]
        pick = esc(s["recommendation"] or "none")
        fails = "".join(f"<li>{esc(n)}: {esc('; '.join(v['failed']))}</li>" for n, v in s["verdicts"].items()
                        if not v["pass"])
        scen += (f"<h3>{esc(sc['name'])}</h3><p>{esc(sc['description'])} ({esc(_scenario_terms(sc))})</p>"
                 f"<p><b>{pick}</b> — {esc(s['why'])}</p><ul>{fails}</ul>")
    figs = "".join(f"<h3>{esc(t)}</h3>{svg}" for t, svg in plots)
    legend = "".join(f"<li><b>{esc(name)}</b>: {esc(doc)}</li>" for name, doc in COLUMNS)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(matrix['study'])}</title><style>"
            "body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
            f"<h1>Strategy matrix: {esc(matrix['study'])}</h1><p>{esc(_provenance_line(matrix))}</p>"
            f"<table>{table}</table><h2>Scenarios</h2>{scen}<h2>Plots</h2>{figs}<h2>Columns</h2><ul>{legend}</ul>"
            "</body></html>\n")


def _machine() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {gpu}, torch {torch.__version__}"


# --------------------------------------------------------------------------------------------------
# The command


def _eta(study: Study, configs: dict, state: StudyState, remaining: list[str]) -> str:
    """Seconds left, from this study's measured seconds per training row-token and mean evaluation time."""
    walls, toks, evals = 0.0, 0, []
    for c in study.candidates:
        e = state.data["candidates"].get(c.name, {})
        if e.get("train_done") and e.get("train_wall_s"):
            walls += e["train_wall_s"]
            toks += e["row_tokens"]
        if e.get("eval_wall_s"):
            evals.append(e["eval_wall_s"])
    if not toks or not evals:
        return "ETA after the first candidate"
    left = 0.0
    for name in remaining:
        c = next(x for x in study.candidates if x.name == name)
        cfg = configs[name][2]
        e = state.data["candidates"].get(name, {})
        if not c.baseline and not e.get("train_done"):
            left += walls / toks * _row_tokens(cfg)
        if not (e.get("eval_key") and (c.baseline or e.get("train_done"))):  # else most likely reused as it is
            left += statistics.mean(evals)
    return f"about {_fmt_wall(left)} left"


def _row_tokens(cfg) -> int:
    """Training row-tokens of a run: steps x global batch x sequence length (padding included)."""
    return (cfg.run.max_steps or 0) * cfg.train.global_batch_size * cfg.data.seq_length


def compare(study_path: str | Path, out: str | Path | None = None, max_examples: int | None = None,
            progress: Callable[[str], None] = print) -> dict:
    """Run a study: train what is missing, evaluate every candidate, judge the scenarios, write the reports.

    Args:
        study_path: the study file (`eval.study`).
        out: output directory (default: runs/studies/<study name>).
        max_examples: at most this many test examples per candidate (default: the study's evaluation.max_examples).
        progress: where progress lines go.

    Returns:
        The matrix (also OUT/matrix.json).

    Raises:
        ConfigError: a bad study, recipe, dataset version, suite or general-text file (before anything is trained);
            a run directory of another configuration; a failed training run.
    """
    from nemo_adapt.config.loader import save_resolved
    from nemo_adapt.data.general_corpus import load as load_general
    from nemo_adapt.eval.suites import load_suite

    started = time.monotonic()
    study = load_study(study_path)
    max_examples = max_examples or study.evaluation.max_examples
    for s in study.evaluation.suites:
        load_suite(s)
    if study.evaluation.forgetting:
        load_general(study.evaluation.forgetting)
    if study.target is not None:
        from nemo_adapt.planner.gpus import get_gpu

        try:
            get_gpu(study.target.gpu)
        except (KeyError, ConfigError) as err:
            raise ConfigError(f"{study.path}: target.gpu={study.target.gpu!r}: {err}") from None
    out_dir = Path(out) if out is not None else Path("runs") / "studies" / study.name
    check_out_dir(out_dir, study.name)
    with tempfile.TemporaryDirectory() as tmp:  # every recipe loads and uses the dataset version
        checked = check_candidates(study, Path(tmp))
    out_dir.mkdir(parents=True, exist_ok=True)
    state = StudyState.open(out_dir / STATE)
    state.data.update(study=study.name, study_sha256=study.sha256)
    configs = {}
    from nemo_adapt.config import load_recipe

    for c in study.candidates:
        recipe = write_candidate_recipe(study, c, out_dir / "recipes" / f"{c.name}.yaml")
        overrides = [*checked[c.name][1], f"run.output_dir={out_dir / c.name}"]
        configs[c.name] = (recipe, overrides, load_recipe(recipe, overrides))
    n = len(study.candidates)
    rows = []
    for i, c in enumerate(study.candidates, 1):
        recipe, overrides, cfg = configs[c.name]
        run_dir = out_dir / c.name
        remaining = [x.name for x in study.candidates[i - 1:]]
        results = None
        if c.baseline:
            if not (run_dir / "config.yaml").is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                save_resolved(cfg, run_dir / "config.yaml")
        else:
            entry = state.entry(c.name)
            if finished_run(run_dir) is None:
                progress(f"[{i}/{n}] {c.name}: training {recipe} ({cfg.run.max_steps} steps; log "
                         f"{out_dir / 'logs' / (c.name + '.log')}); {_eta(study, configs, state, remaining)}")
            results = train_candidate(c, recipe, overrides, cfg, run_dir, out_dir / "logs" / f"{c.name}.log", state)
            entry.update(train_done=True, row_tokens=_row_tokens(cfg))
            state.save()
        progress(f"[{i}/{n}] {c.name}: evaluating; {_eta(study, configs, state, remaining)}")
        evaluation = evaluate_candidate(study, c, cfg, run_dir, state, max_examples)
        row = candidate_row(study, c, cfg, run_dir, results, evaluation, state)
        rows.append(row)
        progress(f"[{i}/{n}] {c.name}: {row['metric']} {_fmt_ci(row['score'])}")
    add_serving_figures(rows)
    from datetime import UTC, datetime

    matrix = {
        "study": study.name, "study_file": str(study.path), "study_sha256": study.sha256,
        "dataset": {"version": study.dataset.version, "files": study.dataset.files, "sha256": study.dataset.sha256,
                    "fingerprint": study.dataset.fingerprint},
        "target": dataclasses.asdict(study.target) if study.target else None,
        "evaluation": dataclasses.asdict(study.evaluation), "machine": _machine(),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": round(time.monotonic() - started, 1),
        "compute_s": round(sum((e.get("train_wall_s") or 0) + (e.get("eval_wall_s") or 0)
                               for name, e in state.data["candidates"].items() if name in configs), 1),
        "rows": rows,
    }
    matrix["scenarios"] = [judge(s, rows) for s in study.scenarios]
    _atomic_write(out_dir / "matrix.json", json.dumps(matrix, indent=2, default=str) + "\n")
    _atomic_write(out_dir / "report.md", report_markdown(matrix))
    _atomic_write(out_dir / "report.html", report_html(matrix))
    return {**matrix, "out_dir": str(out_dir)}


def register(sub) -> None:
    p = sub.add_parser("compare", help="the strategy matrix: train and evaluate a study's candidates the same way "
                       "and recommend one per deployment scenario")
    p.add_argument("study", help="study YAML (see recipes/studies/)")
    p.add_argument("--out", default=None, help="output directory (default: runs/studies/<study name>); a killed "
                   "study resumes from it")
    p.add_argument("--max-examples", type=int, default=None, help="at most this many test examples per candidate")

    def run(args) -> int:
        if args.max_examples is not None and args.max_examples < 1:
            raise ConfigError(f"--max-examples {args.max_examples}: must be 1 or more")
        try:
            matrix = compare(args.study, args.out, args.max_examples)
        except KeyboardInterrupt:
            print("nemo-adapt compare: interrupted; the running candidate was asked to checkpoint — rerun the same "
                  "command to continue", file=sys.stderr, flush=True)
            return 130
        print(report_markdown(matrix).split("\n## Columns")[0], flush=True)
        out = Path(matrix["out_dir"])
        print(f"written {out / 'report.md'}, {out / 'report.html'}, {out / 'matrix.json'}", flush=True)
        return 0

    p.set_defaults(func=run)
