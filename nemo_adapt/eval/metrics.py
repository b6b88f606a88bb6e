"""Task metrics for generated answers, each with a bootstrap confidence interval.

Every test example gets a score per metric (1/0, or a token F1 in [0, 1]); a metric is the mean over
examples, reported with a 95% percentile-bootstrap interval over examples (Efron & Tibshirani 1993; computed
by `scipy.stats.bootstrap`, fixed seed), so two models' scores can be told apart from noise.

- `exact_match`: the answer equals the reference after whitespace and case normalisation.
- `token_f1`: SQuAD's token overlap F1 (Rajpurkar et al. 2016): lower case, punctuation and articles
  removed, bag-of-words precision and recall against the reference — partial credit for free text.
- `field_accuracy`: for `key: value` answers (`team: Ledger Ops; priority: P1`, parts separated by `;` or
  new lines), each field of the reference scored on its own: the prediction's value for that key equals it.
- `label_accuracy`: for label fields (a field — or the whole answer — whose reference values repeat: at most
  `MAX_LABELS` distinct values, each example's value one of them), lenient parsing: the prediction names
  exactly one allowed label (whole words, case-insensitive; in its own value for that key when it has one,
  else anywhere in the answer) and it is the reference's. A confusion table per label field counts what
  was named for each reference label (`(none)` or `(several)` when not exactly one).

The task metric a run is judged by (`eval.metric`) is one of these; for the per-field ones, the mean over
fields (`task_score`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from nemo_adapt.eval.task import normalize_answer

METRICS = ("exact_match", "token_f1", "field_accuracy", "label_accuracy")
"""Task metrics `eval.metric` may name."""
CONFIDENCE = 0.95
"""Level of every reported interval."""
RESAMPLES = 1000
"""Bootstrap resamples: at n = 200 the interval ends move by about 0.005 between seeds."""
SEED = 0
"""Bootstrap seed: the same predictions always give the same interval."""
MAX_LABELS = 32
"""Most distinct reference values a field may have and still count as a label field."""
NONE, SEVERAL = "(none)", "(several)"

_PART = re.compile(r"[;\n]")
_KEY_VALUE = re.compile(r"^\s*([A-Za-z][\w .\-/]{0,40}?)\s*:\s*(.*?)\s*$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def parse_fields(text: str) -> dict[str, str] | None:
    """The `key: value` fields of an answer, keys case-folded, in order.

    Parts are separated by `;` or new lines; empty parts are skipped. Returns None when the answer has no
    part, any part is not `key: value`, or a key repeats — it is then not a field answer.

    >>> parse_fields("team: Ledger Ops; priority: P1")
    {'team': 'Ledger Ops', 'priority': 'P1'}
    """
    fields: dict[str, str] = {}
    for part in _PART.split(text):
        if not part.strip():
            continue
        m = _KEY_VALUE.match(part)
        if m is None:
            return None
        key = normalize_answer(m.group(1))
        if key in fields:
            return None
        fields[key] = m.group(2)
    return fields or None


def _squad_tokens(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 of a prediction against a reference (1.0 when both have no tokens, 0.0 when one has none).

    Example: pred "the Ledger Ops team", ref "Ledger Ops" -> tokens [ledger, ops, team] vs [ledger, ops]:
    precision 2/3, recall 1, F1 0.8.
    """
    p, r = _squad_tokens(pred), _squad_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def named_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The allowed labels a text names: whole-word, case-insensitive matches, a label inside a longer named
    label not counted (`Ops` is not named by `Ledger Ops`). Returns them in `labels`' order."""
    low = normalize_answer(text)
    spans = {}
    for label in labels:
        m = re.search(r"(?<!\w)" + re.escape(normalize_answer(label)) + r"(?!\w)", low)
        if m:
            spans[label] = m.span()
    inside = {a for a, (s, e) in spans.items() for b, (s2, e2) in spans.items()
              if a != b and s2 <= s and e <= e2 and (e2 - s2) > (e - s)}
    return [label for label in labels if label in spans and label not in inside]


def interval(scores: Sequence[float], seed: int = SEED) -> dict:
    """Mean of per-example scores with its 95% percentile-bootstrap interval.

    Args:
        scores: one score per example (0/1, or in [0, 1]).
        seed: bootstrap seed.

    Returns:
        {"value", "low", "high", "n"}; with fewer than 2 examples, or all scores equal, low = high = value
        (no spread to resample).
    """
    x = np.asarray(scores, dtype=np.float64)
    n = int(x.size)
    value = float(x.mean()) if n else 0.0
    if n < 2 or np.all(x == x[0]):
        return {"value": value, "low": value, "high": value, "n": n}
    from scipy.stats import bootstrap

    ci = bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return {"value": value, "low": float(ci.low), "high": float(ci.high), "n": n}


def label_fields(references: Sequence[str]) -> dict[str, list[str]]:
    """The label fields of a task and their allowed labels, from its reference answers.

    Field answers (every reference parses with the same keys): each field whose values repeat (at most
    `MAX_LABELS` distinct, fewer distinct values than examples). Other answers: the whole answer as field
    `answer` under the same rule. Labels keep the references' spelling of their first occurrence.

    Returns:
        {field: sorted labels}; empty when the task has no label field (free text).
    """
    parsed = [parse_fields(r) for r in references]
    if parsed and all(p is not None for p in parsed) and len({tuple(p) for p in parsed}) == 1:
        columns = {k: [p[k] for p in parsed] for k in parsed[0]}
    else:
        columns = {"answer": list(references)}
    out = {}
    for key, values in columns.items():
        spelling: dict[str, str] = {}
        for v in values:
            spelling.setdefault(normalize_answer(v), v.strip())
        if 1 <= len(spelling) <= MAX_LABELS and len(spelling) < len(values):
            out[key] = sorted(spelling.values(), key=normalize_answer)
    return out


def task_metrics(predictions: Sequence[str], references: Sequence[str], seed: int = SEED) -> dict:
    """Every metric of the module docstring for one model's predictions on a test split.

    Args:
        predictions: generated answers, one per test example.
        references: reference answers, in the same order.
        seed: bootstrap seed.

    Returns:
        {"exact_match": interval, "token_f1": interval,
         "field_accuracy": {field: interval} (field answers only),
         "label_accuracy": {field: interval}, "confusion": {field: {reference label: {named: count}}}
         (label fields only), "ci": {"method", "level", "resamples", "seed"}} — each interval as
        `interval` returns it.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out: dict = {
        "exact_match": interval([float(normalize_answer(p) == normalize_answer(r))
                                 for p, r in zip(predictions, references)], seed),
        "token_f1": interval([token_f1(p, r) for p, r in zip(predictions, references)], seed),
        "ci": {"method": "percentile bootstrap over examples", "level": CONFIDENCE, "resamples": RESAMPLES,
               "seed": seed},
    }
    refs = [parse_fields(r) for r in references]
    preds = [parse_fields(p) or {} for p in predictions]
    field_answers = bool(refs) and all(r is not None for r in refs) and len({tuple(r) for r in refs}) == 1
    if field_answers:
        out["field_accuracy"] = {
            key: interval([float(normalize_answer(p.get(key, "\0")) == normalize_answer(r[key]))
                           for p, r in zip(preds, refs)], seed)
            for key in refs[0]}
    labels = label_fields(references)
    if labels:
        out["label_accuracy"], out["confusion"] = {}, {}
        for key, allowed in labels.items():
            scores, table = [], {label: Counter() for label in allowed}
            for pred, pf, ref, rf in zip(predictions, preds, references, refs):
                truth = rf[key] if field_answers else ref
                where = pf.get(key, pred) if field_answers else pred
                named = named_labels(where, allowed)
                said = named[0] if len(named) == 1 else (NONE if not named else SEVERAL)
                truth_label = next(lb for lb in allowed if normalize_answer(lb) == normalize_answer(truth))
                scores.append(float(said == truth_label))
                table[truth_label][said] += 1
            out["label_accuracy"][key] = interval(scores, seed)
            out["confusion"][key] = {k: dict(v) for k, v in table.items()}
    return out


def task_score(metrics: dict, metric: str) -> float:
    """The task metric `metric` (one of `METRICS`) from `task_metrics`' output: its value, or for the
    per-field metrics the mean over fields.

    Raises:
        ValueError: an unknown metric, or a per-field metric the task does not have (free-text answers have
            no fields or labels; use exact_match or token_f1).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown task metric {metric!r}; choose one of {', '.join(METRICS)}")
    entry = metrics.get(metric)
    if entry is None:
        raise ValueError(f"eval.metric={metric!r}: this task's answers have no "
                         f"{'key: value fields' if metric == 'field_accuracy' else 'label fields'}; "
                         "use exact_match or token_f1")
    if "value" in entry:
        return entry["value"]
    return float(np.mean([v["value"] for v in entry.values()]))


def check_task_metric(metric: str, references: Sequence[str], where: str) -> None:
    """Refuse, before any training, a per-field task metric the task's answers cannot give.

    Args:
        metric: `eval.metric`.
        references: the test split's reference answers.
        where: the test file, for the message.

    Raises:
        ConfigError: `field_accuracy` and the answers are not `key: value` fields with the same keys, or
            `label_accuracy` and no field's values repeat as labels do.
    """
    from nemo_adapt.errors import ConfigError

    if metric == "field_accuracy":
        parsed = [parse_fields(r) for r in references]
        if not parsed or any(p is None for p in parsed) or len({tuple(p) for p in parsed}) != 1:
            bad = next((r for r, p in zip(references, parsed) if p is None), None)
            why = f"e.g. {bad[:80]!r} is not `key: value; ...`" if bad is not None else "their keys differ"
            raise ConfigError(f"eval.metric=field_accuracy, but the answers of {where} are not `key: value` fields "
                              f"with the same keys ({why}); use exact_match, token_f1 or label_accuracy")
    if metric == "label_accuracy" and not label_fields(references):
        raise ConfigError(f"eval.metric=label_accuracy, but no answer field of {where} repeats as a label does (at "
                          f"most {MAX_LABELS} distinct values, fewer than the examples); use exact_match or token_f1")
