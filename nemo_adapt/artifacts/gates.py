"""Promotion gates: thresholds on a registered version's recorded evaluation, read from a gates file.

A gates file is YAML data (see `gates/`):

    name: production                      # optional: a label for the audit log (default: the file's stem)
    description: customer-facing triage   # optional
    gates:
      - {metric: exact_match, min: 0.75}                # the task metric's 95% lower bound >= 0.75
      - {metric: exact_match, min_over_baseline: 0.05}  # lower bound >= the prompt-only baseline's value + 0.05
      - {metric: forgetting, max: 2.0}                  # general-text loss increase, 95% upper bound (nats/token)
      - {metric: latency_overhead, max: 0.25}           # decode time per token vs the base, minus 1 (batch 1)
      - {metric: peak_memory_gib, max: 8}               # peak memory while serving as evaluated
      - {metric: examples, min: 200}                    # test examples the evaluation scored
      - {suites: [general_knowledge, safety]}           # regression suites that must have run and passed
      - {dataset: current}                              # evaluated on the test file's bytes as they are now

Every value comes from files stored with the version (its eval.json and eval_baseline.json, hash-checked when
read), never from the working directory — except `dataset: current`, which hashes the test file as it is now to
ask whether the evaluation is of today's data. A metric the evaluation did not measure fails its gate ("not
measured"); a metric name that does not exist is an error naming the file, line and the valid names.

Judging on interval ends makes a gate mean "with 95% confidence": a task metric passes when its lower bound
reaches the threshold, forgetting when its upper bound stays under it — so a small test split cannot pass by luck.

A merged model (a version with merge_config.json) is held to two more rules whatever the file says: its merge
validation status must be `validated`, and at least one regression suite must have run and passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from pathlib import Path
from typing import Any

from nemo_adapt.errors import ConfigError
from nemo_adapt.yaml_lines import read_yaml

TASK_METRICS = ("exact_match", "token_f1", "field_accuracy", "label_accuracy")
"""Task metrics of `eval.metrics` (`field_accuracy.<field>`, `label_accuracy.<field>` name one field)."""
PER_FIELD = ("field_accuracy", "label_accuracy")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How one gate metric is read and judged."""

    ops: tuple[str, ...]
    """The threshold keys it takes: `min`, `max`, `min_over_baseline`."""
    what: str
    """How the value is judged, for the printed gate (e.g. `95% lower bound`)."""
    unit: str = ""
    """Unit shown after values."""


METRICS: dict[str, MetricSpec] = {
    **{m: MetricSpec(("min", "min_over_baseline"), "95% lower bound") for m in TASK_METRICS},
    "forgetting": MetricSpec(("max",), "95% upper bound", "nats/token"),
    "latency_overhead": MetricSpec(("max",), "decode time per token vs the base - 1, batch 1, unmerged"),
    "latency_overhead_merged": MetricSpec(("max",), "decode time per token vs the base - 1, batch 1, merged"),
    "peak_memory_gib": MetricSpec(("max",), "peak memory serving as evaluated", "GiB"),
    "artifact_mib": MetricSpec(("max",), "size of the stored adapter or model", "MiB"),
    "examples": MetricSpec(("min",), "test examples scored"),
}
"""Every metric a gate may name (plus `field_accuracy.<field>` and `label_accuracy.<field>`)."""


@dataclasses.dataclass(frozen=True)
class Gate:
    """One line of a gates file."""

    kind: str
    """`metric`, `suites` or `dataset`."""
    line: int
    """Its line in the gates file."""
    metric: str | None = None
    """kind metric: the metric name (a key of `METRICS`, or `field_accuracy.<field>`)."""
    op: str | None = None
    """kind metric: `min`, `max` or `min_over_baseline`."""
    threshold: float | None = None
    """kind metric: the threshold (for `min_over_baseline`: the margin over the baseline)."""
    suites: tuple[str, ...] = ()
    """kind suites: suite names that must have run and passed."""
    test_file: str | None = None
    """kind dataset: the test file whose bytes are the current version (None: the one the evaluation names)."""
    test_sha256: str | None = None
    """kind dataset: the current version's test sha256, given directly instead of a file."""


@dataclasses.dataclass(frozen=True)
class Gates:
    """A loaded, validated gates file."""

    path: Path
    """The file."""
    sha256: str
    """sha256 of its bytes (recorded in the audit log)."""
    name: str
    """Its `name` (default: the file's stem)."""
    description: str
    """Its `description`."""
    gates: tuple[Gate, ...]
    """The gates, in file order."""


@dataclasses.dataclass(frozen=True)
class GateResult:
    """One gate checked against one version."""

    gate: str
    """What is checked, e.g. `exact_match (95% lower bound)`."""
    value: str
    """The recorded value, as printed (`not measured` when the evaluation lacks it)."""
    threshold: str
    """The threshold, as printed (`>= 0.700`)."""
    passed: bool
    """The verdict."""
    line: int | None = None
    """The gate's line in the gates file (None for the merged-model rules)."""

    def as_dict(self) -> dict:
        """JSON form (the audit log's)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Evidence:
    """What a version recorded, as the gates read it."""

    result: dict | None
    """Its evaluation (eval.json), or None when it has none."""
    baseline: dict | None
    """The prompt-only baseline's result (eval_baseline.json's `baseline`), or None."""
    artifact_bytes: int
    """Bytes of its adapter or model files."""
    merge_status: str | None = None
    """A merged model's merge_config.json `status`; None for anything else."""


def _valid_metric_names() -> str:
    return ", ".join([*METRICS, "field_accuracy.<field>", "label_accuracy.<field>"])


def _check_metric(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: metric must be a name, got {name!r}; valid metrics: {_valid_metric_names()}")
    head, dot, field = name.partition(".")
    if name in METRICS or (dot and head in PER_FIELD and field):
        return name
    close = difflib.get_close_matches(name, list(METRICS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{where}: metric {name!r} does not exist; {hint}valid metrics: {_valid_metric_names()}")


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _metric_gate(raw: dict, where: str, line: int) -> Gate:
    metric = _check_metric(raw.get("metric"), where)
    spec = METRICS[metric.partition(".")[0]]
    ops = [k for k in raw if k not in ("metric", "__line__")]
    unknown = [k for k in ops if k not in ("min", "max", "min_over_baseline")]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} for metric {metric}; it takes "
                          f"{' or '.join(spec.ops)}")
    if len(ops) != 1 or ops[0] not in spec.ops:
        raise ConfigError(f"{where}: metric {metric} takes exactly one of {', '.join(spec.ops)} "
                          f"(judged on: {spec.what}), got {', '.join(ops) or 'none'}")
    op = ops[0]
    threshold = _number(raw[op], op, where)
    head = metric.partition(".")[0]
    if head in TASK_METRICS and op == "min" and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{where}: {metric} min={threshold} must be within [0, 1] (the metric is a fraction)")
    if op == "min_over_baseline" and not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"{where}: {metric} min_over_baseline={threshold} must be within [-1, 1]")
    if head in ("peak_memory_gib", "artifact_mib") and threshold <= 0:
        raise ConfigError(f"{where}: {metric} max={threshold} must be > 0")
    if head.startswith("latency_overhead") and threshold < -1:
        raise ConfigError(f"{where}: {metric} max={threshold} must be >= -1 (a relative change)")
    if head == "examples" and (threshold < 1 or threshold != int(threshold)):
        raise ConfigError(f"{where}: examples min={raw[op]!r} must be a whole number >= 1")
    return Gate("metric", line, metric=metric, op=op, threshold=threshold)


def _suites_gate(raw: dict, where: str, line: int) -> Gate:
    extra = [k for k in raw if k not in ("suites", "__line__")]
    if extra:
        raise ConfigError(f"{where}: a suites gate takes only `suites` (a list of suite names), got "
                          f"{', '.join(map(str, extra))}")
    names = raw["suites"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: suites must be a non-empty list of suite names (the `name` in each suite "
                          f"file, e.g. [general_knowledge, safety]), got {names!r}")
    return Gate("suites", line, suites=tuple(names))


def _dataset_gate(raw: dict, where: str, line: int, base: Path) -> Gate:
    extra = [k for k in raw if k not in ("dataset", "__line__")]
    if extra:
        raise ConfigError(f"{where}: a dataset gate takes only `dataset`, got {', '.join(map(str, extra))}")
    value = raw["dataset"]
    if value == "current":
        return Gate("dataset", line)
    if isinstance(value, dict):
        spec = {k: v for k, v in value.items() if k != "__line__"}
        if list(spec) == ["test"] and isinstance(spec["test"], str) and spec["test"]:
            test = spec["test"]
            if not Path(test).exists() and not Path(test).is_absolute() and (base / test).exists():
                test = str(base / test)  # relative to the working directory, else to the gates file
            return Gate("dataset", line, test_file=test)
        if list(spec) == ["test_sha256"] and isinstance(spec["test_sha256"], str) and \
                re.fullmatch(r"[0-9a-f]{64}", spec["test_sha256"]):
            return Gate("dataset", line, test_sha256=spec["test_sha256"])
    shown = {k: v for k, v in value.items() if k != "__line__"} if isinstance(value, dict) else value
    raise ConfigError(f"{where}: dataset must be `current` (the test file the evaluation names, hashed now), "
                      f"{{test: PATH}} or {{test_sha256: '<64 hex digits>'}} (quoted), got {shown!r}")


def load_gates(path: str | Path) -> Gates:
    """Read and validate a gates file.

    Args:
        path: the YAML file.

    Returns:
        The gates, in file order.

    Raises:
        ConfigError: no such file, not valid YAML, an unknown key, a metric that does not exist (with the valid
            names and the closest one), a threshold key the metric does not take, a value out of range — each
            message starts with `FILE:LINE`.
    """
    path = Path(path)
    doc, data = read_yaml(path, "gates file")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}:1: a gates file is a mapping with `gates:` (a list), got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"name", "description", "gates", "__line__"}, key=str)
    if unknown:
        raise ConfigError(f"{path}:1: unknown key(s) {', '.join(map(str, unknown))}; allowed: name, description, gates")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}:1: name must be a string, got {name!r}")
    description = doc.get("description") or ""
    raw_gates = doc.get("gates")
    if not isinstance(raw_gates, list) or not raw_gates:
        raise ConfigError(f"{path}:1: `gates` must be a non-empty list (see `nemo-adapt registry promote --help`)")
    gates = []
    for raw in raw_gates:
        line = raw.get("__line__", 1) if isinstance(raw, dict) else 1
        where = f"{path}:{line}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: each gate is a mapping such as {{metric: exact_match, min: 0.7}}, "
                              f"{{suites: [safety]}} or {{dataset: current}}; got {raw!r}")
        kinds = [k for k in ("metric", "suites", "dataset") if k in raw]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: a gate names exactly one of metric, suites or dataset; got "
                              f"{', '.join(k for k in raw if k != '__line__') or 'none'}")
        if kinds[0] == "metric":
            gates.append(_metric_gate(raw, where, line))
        elif kinds[0] == "suites":
            gates.append(_suites_gate(raw, where, line))
        else:
            gates.append(_dataset_gate(raw, where, line, path.parent))
    return Gates(path, hashlib.sha256(data).hexdigest(), name, str(description), tuple(gates))


# --------------------------------------------------------------------------------------------------
# Reading values from an evaluation


def _interval(metrics: dict, metric: str) -> dict | None:
    """{value, low, high} of a task metric (a per-field metric: the fields' ends averaged, as `compare` does),
    or None when the evaluation does not have it."""
    head, _, field = metric.partition(".")
    entry = metrics.get(head)
    if entry is None:
        return None
    if field:
        entry = entry.get(field)
        return None if entry is None else entry
    if "value" in entry:
        return entry
    fields = [v for v in entry.values() if isinstance(v, dict) and "value" in v]
    if not fields:
        return None
    return {k: sum(v.get(k, v["value"]) for v in fields) / len(fields) for k in ("value", "low", "high")}


def _fmt_interval(e: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f.format(e["value"])
    if "low" in e and "high" in e:
        text += f" [{f.format(e['low'])}, {f.format(e['high'])}]"
    return text


def _decode_rate(cost: dict | None) -> float | None:
    rates = (cost or {}).get("decode_tokens_per_s") or {}
    rate = rates.get("1", rates.get(1))
    return rate if isinstance(rate, int | float) and rate > 0 else None


def _current_test_sha(gate: Gate, result: dict) -> tuple[str | None, str]:
    """(sha256 of the current test file or None, how it was found) for a dataset gate."""
    from nemo_adapt.data.fingerprint import sha256_file

    if gate.test_sha256:
        return gate.test_sha256, "as the gates file gives it"
    test = gate.test_file or (result.get("provenance") or {}).get("test_file")
    if not test:
        return None, "the evaluation names no test file"
    path = Path(test)
    if path.is_dir():
        return None, f"{test} is a directory, not the test file"
    if not path.is_file():
        where = f" (relative to {Path.cwd()})" if not path.is_absolute() else ""
        return None, (f"{test} does not exist here{where}; run promote from where it was evaluated, or name the "
                      "current test split with {dataset: {test: PATH}}")
    return sha256_file(test), f"{test} now"


def _check_metric_gate(g: Gate, ev: Evidence, where: str) -> GateResult:
    metric, spec = g.metric, METRICS[g.metric.partition(".")[0]]
    label = f"{metric} ({spec.what})" if spec.what.startswith("95%") else metric  # the rest: see METRICS
    unit = f" {spec.unit}" if spec.unit else ""
    result = ev.result or {}
    metrics = result.get("metrics") or {}

    def out(value: str, threshold: str, passed: bool) -> GateResult:
        return GateResult(label, value, threshold, passed, g.line)

    head, _, field = metric.partition(".")
    if head in TASK_METRICS:
        if field and head in metrics and field not in metrics[head]:
            fields = ", ".join(k for k in metrics[head] if isinstance(metrics[head][k], dict))
            raise ConfigError(f"{where}: metric {metric!r} does not exist in this evaluation: {head} has the "
                              f"fields {fields}")
        e = _interval(metrics, metric)
        if g.op == "min":
            if e is None:
                return out("not measured", f">= {g.threshold:.3f}", False)
            low = e.get("low", e["value"])
            return out(f"{low:.3f}  ({_fmt_interval(e)}, n={result.get('n')})", f">= {g.threshold:.3f}",
                       low >= g.threshold)
        label = f"{metric} - prompt-only baseline (95% lower bound)"
        need = f">= {g.threshold:+.3f}"
        if e is None:
            return out("not measured", need, False)
        if ev.baseline is None:
            return out("no prompt-only baseline recorded (nemo-adapt eval RUN --baseline)", need, False)
        b = _interval(ev.baseline.get("metrics") or {}, metric)
        if b is None:
            return out("the baseline has no " + metric, need, False)
        ours = (result.get("provenance") or {}).get("test_sha256")
        theirs = (ev.baseline.get("provenance") or {}).get("test_sha256")
        if ours is None or ours != theirs:
            return out(f"baseline evaluated on another test file (sha256 {str(theirs)[:12]} vs {str(ours)[:12]})",
                       need, False)
        low = e.get("low", e["value"])
        gain = low - b["value"]
        shots = ev.baseline.get("shots")
        return out(f"{gain:+.3f}  ({low:.3f} - {b['value']:.3f}{f' {shots}-shot' if shots is not None else ''})",
                   need, gain >= g.threshold)
    if head == "forgetting":
        e = (result.get("forgetting") or {}).get("loss_delta")
        if e is None:
            return out("not measured (nemo-adapt eval RUN --forgetting)", f"<= {g.threshold:+.3f}{unit}", False)
        high = e.get("high", e["value"])
        return out(f"{high:+.3f}{unit}  ({_fmt_interval(e, signed=True)})", f"<= {g.threshold:+.3f}{unit}",
                   high <= g.threshold)
    if head.startswith("latency_overhead"):
        costs = result.get("inference_cost") or {}
        variant = "merged" if head == "latency_overhead_merged" else "as_evaluated"
        own, base = _decode_rate(costs.get(variant)), _decode_rate(costs.get("base"))
        need = f"<= {100 * g.threshold:+.1f}%"
        if own is None or base is None:
            return out(f"not measured (nemo-adapt eval RUN --latency{'; a method that folds' if variant == 'merged' else ''})",
                       need, False)
        over = base / own - 1
        return out(f"{100 * over:+.1f}%  ({own:.1f} vs base {base:.1f} tokens/s)", need, over <= g.threshold)
    if head == "peak_memory_gib":
        cost = (result.get("inference_cost") or {}).get("as_evaluated") or {}
        peak = cost.get("peak_memory_bytes")
        need = f"<= {g.threshold:.2f} GiB"
        if not isinstance(peak, int | float):
            return out("not measured (nemo-adapt eval RUN --latency)", need, False)
        return out(f"{peak / 2**30:.2f} GiB  ({cost.get('memory_kind', 'peak')})", need, peak / 2**30 <= g.threshold)
    if head == "artifact_mib":
        mib = ev.artifact_bytes / 2**20
        return out(f"{mib:.1f} MiB", f"<= {g.threshold:.1f} MiB", mib <= g.threshold)
    # examples
    n = result.get("n")
    if not isinstance(n, int):
        return out("not measured", f">= {int(g.threshold)}", False)
    return out(str(n), f">= {int(g.threshold)}", n >= g.threshold)


def check_gates(gates: Gates, ev: Evidence) -> list[GateResult]:
    """Check every gate of a file (and the merged-model rules) against a version's evidence.

    Args:
        gates: the loaded gates file.
        ev: the version's recorded evaluation, baseline, artifact size and merge status.

    Returns:
        One result per gate, in file order, then the merged-model rules when the version is a merged model.

    Raises:
        ConfigError: a gate names a field (`field_accuracy.<field>`) this evaluation does not have (file:line and
            the fields it has), or a suite close to one the evaluation ran but not among them (a typo; file:line
            and the suites recorded). A suite far from every recorded one is a failed gate ("not run").
    """
    out = []
    result = ev.result or {}
    suites = result.get("suites") or {}
    contradictions = evaluation_problems(result) if ev.result is not None else []
    if contradictions:  # registry add refuses such a file; one stored by an older nemo-adapt is judged here
        out.append(GateResult(CONSISTENT, "; ".join(contradictions), "consistent", False))
    for g in gates.gates:
        where = f"{gates.path}:{g.line}"
        if ev.result is None and g.metric != "artifact_mib":  # only the size is known without an evaluation
            what = g.metric or ("suite " + ", ".join(g.suites) if g.kind == "suites" else "dataset")
            out.append(GateResult(what, "not evaluated (register it with an evaluation)", "recorded", False, g.line))
            continue
        if g.kind == "metric":
            out.append(_check_metric_gate(g, ev, where))
        elif g.kind == "suites":
            for name in g.suites:
                s = suites.get(name)
                close = difflib.get_close_matches(name, list(suites), n=1, cutoff=0.6) if s is None else []
                if close:  # a typo, not a suite that was left out: judging it "not run" would refuse for nothing
                    raise ConfigError(f"{where}: suite {name!r} is not in this evaluation; did you mean {close[0]!r}? "
                                      f"(suites recorded: {', '.join(suites)})")
                value = "not run" if s is None else f"{s.get('passed')}/{s.get('checked')} passed"
                out.append(GateResult(f"suite {name}", value, "pass", bool(s and s.get("pass")), g.line))
        else:
            recorded = (result.get("provenance") or {}).get("test_sha256")
            current, how = _current_test_sha(g, result)
            ok = recorded is not None and current is not None and recorded == current
            value = f"test sha256 {str(recorded)[:12]}" if recorded else "the evaluation recorded no test sha256"
            out.append(GateResult("evaluated on the current dataset", value,
                                  f"= {current[:12]} ({how})" if current else f"= ? ({how})", ok, g.line))
    if ev.merge_status is not None:
        out.append(GateResult("merged model: merge validation status", ev.merge_status, "= validated",
                              ev.merge_status == "validated"))
        ran = {n: s for n, s in suites.items() if isinstance(s, dict)}
        passed = sum(bool(s.get("pass")) for s in ran.values())
        out.append(GateResult("merged model: regression suites", f"{passed}/{len(ran)} suites passed" if ran else "none run",
                              ">= 1 run, all passed", bool(ran) and passed == len(ran)))
    return out


MERGED_RULES = ("merged model: merge validation status", "merged model: regression suites")
"""Gate names of the merged-model rules: `--force` does not override them."""
CONSISTENT = "evaluation is self-consistent"
"""The rule an evaluation whose numbers contradict each other fails: `--force` does not override it either."""
UNFORCEABLE = (*MERGED_RULES, CONSISTENT)
"""Every rule `--force` does not override."""

_UNIT_INTERVAL = ("exact_match", "token_f1", "field_accuracy", "label_accuracy")


def evaluation_problems(result: dict) -> list[str]:
    """Where a `nemo-adapt eval` result contradicts itself (what an edited eval.json shows).

    Checked: the example count is a non-negative integer and every metric's own `n` equals it; `correct / n` equals
    the headline exact match, which equals `metrics.exact_match.value`; every interval holds its value (low <=
    value <= high: each is a percentile bootstrap of a mean), accuracies and F1 within [0, 1], at the 95% level the
    gates judge; a confusion table counts at most n answers; a suite's `passed` <= `checked` <= its cases and
    `pass` (a boolean) == (all checked passed, at least one); inference cost has sizes and rates; forgetting's
    interval holds its value.

    Args:
        result: eval.json as loaded.

    Returns:
        One line per contradiction (empty: consistent).
    """
    out: list[str] = []
    n = result.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        out.append(f"n = {n!r} is not a count of examples")
        n = None

    def interval(where: str, e: dict, unit: bool, of_examples: bool = True) -> None:
        nums = {k: e.get(k) for k in ("value", "low", "high") if k in e}
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in nums.values()):
            out.append(f"{where} has a non-numeric value, low or high ({nums})")
            return
        # Every interval here is a percentile bootstrap of a mean over examples (or passages), which holds the
        # mean itself: an interval beside its value was edited.
        v, lo, hi = nums.get("value"), nums.get("low"), nums.get("high")
        if lo is not None and hi is not None and lo > hi + 1e-9:
            out.append(f"{where} has low {lo} > high {hi}")
        elif v is not None and ((lo is not None and v < lo - 1e-9) or (hi is not None and v > hi + 1e-9)):
            out.append(f"{where} = {v} lies outside its own interval [{lo}, {hi}]")
        if unit and not all(-1e-9 <= x <= 1 + 1e-9 for x in nums.values()):
            out.append(f"{where} = {nums} is outside [0, 1]")
        if of_examples and n is not None and "n" in e and e["n"] != n:
            out.append(f"{where} counts n = {e['n']} examples, the evaluation n = {n}")

    metrics = result.get("metrics") or {}
    if isinstance(metrics, dict):
        for k, e in metrics.items():
            if isinstance(e, dict) and "value" in e:
                interval(f"metrics.{k}", e, k in _UNIT_INTERVAL)
            elif isinstance(e, dict) and k in ("field_accuracy", "label_accuracy"):
                for f, fe in e.items():
                    if isinstance(fe, dict) and "value" in fe:
                        interval(f"metrics.{k}.{f}", fe, True)
    ci = metrics.get("ci") if isinstance(metrics, dict) else None
    if isinstance(ci, dict) and ci.get("level") is not None and ci.get("level") != 0.95:
        out.append(f"metrics.ci.level = {ci.get('level')!r}, but gates judge 95% intervals")
    confusion = metrics.get("confusion") if isinstance(metrics, dict) else None
    if isinstance(confusion, dict) and n is not None:
        for f, table in confusion.items():
            counts = [c for row in (table or {}).values() if isinstance(row, dict) for c in row.values()]
            if any(not isinstance(c, int) or c < 0 for c in counts) or sum(c for c in counts if isinstance(c, int)) > n:
                out.append(f"metrics.confusion.{f} counts {sum(c for c in counts if isinstance(c, int))} answers "
                           f"(or a count that is not a non-negative integer) of n = {n} examples")
    for variant, cost in (result.get("inference_cost") or {}).items():
        if not isinstance(cost, dict):
            continue
        peak = cost.get("peak_memory_bytes")
        if peak is not None and (not isinstance(peak, int | float) or isinstance(peak, bool) or peak < 0):
            out.append(f"inference_cost.{variant}.peak_memory_bytes = {peak!r} is not a size")
        rates = cost.get("decode_tokens_per_s") or {}
        if isinstance(rates, dict) and any(r is not None and (not isinstance(r, int | float) or r <= 0)
                                           for r in rates.values()):
            out.append(f"inference_cost.{variant}.decode_tokens_per_s = {rates} is not a rate")
    em = result.get("exact_match")
    em_entry = metrics.get("exact_match") if isinstance(metrics, dict) else None
    if isinstance(em, int | float) and isinstance(em_entry, dict) and isinstance(em_entry.get("value"), int | float) \
            and abs(em - em_entry["value"]) > 1e-6:
        out.append(f"exact_match = {em} but metrics.exact_match.value = {em_entry['value']}")
    correct = result.get("correct")
    if isinstance(correct, int) and n:
        if not 0 <= correct <= n:
            out.append(f"correct = {correct} of n = {n}")
        elif isinstance(em, int | float) and abs(correct / n - em) > 1e-6:
            out.append(f"correct / n = {correct}/{n} = {correct / n:.4f} but exact_match = {em}")
    for name, suite in (result.get("suites") or {}).items():
        if not isinstance(suite, dict):
            continue
        passed, checked, cases = suite.get("passed"), suite.get("checked"), suite.get("cases")
        if "pass" in suite and not isinstance(suite["pass"], bool):
            out.append(f"suite {name}: pass = {suite['pass']!r} is not true or false")
            continue
        if isinstance(cases, int) and isinstance(checked, int) and checked > cases:
            out.append(f"suite {name}: checked = {checked} of its {cases} cases")
        if isinstance(passed, int) and isinstance(checked, int):
            if not 0 <= passed <= checked:
                out.append(f"suite {name}: passed = {passed} of checked = {checked}")
            elif "pass" in suite and bool(suite["pass"]) != (checked > 0 and passed == checked):
                out.append(f"suite {name}: pass = {suite['pass']} but {passed} of {checked} cases passed")
    delta = (result.get("forgetting") or {}).get("loss_delta") if isinstance(result.get("forgetting"), dict) else None
    if isinstance(delta, dict) and "value" in delta:
        interval("forgetting.loss_delta", delta, False, of_examples=False)  # its n counts passages
    return out
