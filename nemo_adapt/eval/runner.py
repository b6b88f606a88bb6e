"""Task evaluation: generate answers for the test split and score them (`eval.metrics`: exact match,
token F1, per-field and label accuracy, each with a bootstrap interval), for the adapted model and for the
prompt-only baselines (the base model given the full instructions, zero-shot and k-shot, no training).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from nemo_adapt.config.schema import EvalConfig
from nemo_adapt.data.tokenize import encode_prompt
from nemo_adapt.errors import ConfigError
from nemo_adapt.eval.metrics import task_metrics, task_score
from nemo_adapt.eval.task import baseline_messages, exact_match, few_shot_messages
from nemo_adapt.generation.generate import SamplingParams, generate, stop_token_ids
from nemo_adapt.models.builder import model_chunks
from nemo_adapt.peft.virtual_tokens import virtual_token_count


def encode_test_prompts(tokenizer, records: Sequence, shots: Sequence[dict] = ()) -> list[list[int]]:
    """Token ids of each record's prompt (after the few-shot `shots`), with the generation prompt.

    Raises:
        DataError: a prompt's special-token text cannot be kept as text (names the record's file:line).
    """
    return [encode_prompt(tokenizer, baseline_messages(shots, r.prompt) if shots else r.prompt, f"{r.path}:{r.line}")
            for r in records]


def prompt_budget(context: int, max_new_tokens: int, virtual_tokens: int = 0) -> int:
    """Longest prompt that fits: the model's context minus the generation budget and any virtual tokens.

    Raises:
        ConfigError: nothing fits (names eval.max_new_tokens and the context).
    """
    budget = context - max_new_tokens - virtual_tokens
    if budget < 1:
        extra = f" + {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise ConfigError(f"eval.max_new_tokens={max_new_tokens}{extra} leaves no room for a prompt in the model's "
                          f"context of {context} tokens; lower eval.max_new_tokens")
    return budget


def fit_prompts(prompts: list[list[int]], records: Sequence, budget: int, policy: str,
                split: str = "data.test") -> tuple[list[int], list[list[int]], dict]:
    """Apply the over-length policy of training (`data.over_length`) to evaluation prompts.

    `drop` leaves over-long records out; `truncate` keeps the last `budget` tokens of the prompt
    (its end holds the question and the generation prompt the answer follows; cutting the end as
    training does would leave nothing to answer). Either is counted and named (file:line).

    Args:
        prompts: token ids per record.
        records: the records (for `path`/`line`).
        budget: longest prompt that fits (`prompt_budget`).
        policy: `truncate` or `drop`.
        split: the config key of the file, for messages.

    Returns:
        (indices of kept records, their prompts, report {"budget", "policy", "truncated", "dropped",
        "over_length": ["file:line (n tokens)", ... up to 5], "longest"}).

    Raises:
        ConfigError: no prompt fits and the policy drops them all.
    """
    over = [i for i, p in enumerate(prompts) if len(p) > budget]
    named = [f"{records[i].path}:{records[i].line} ({len(prompts[i])} tokens)" for i in over[:5]]
    report = {"budget": budget, "policy": policy, "truncated": len(over) if policy == "truncate" else 0,
              "dropped": len(over) if policy == "drop" else 0, "over_length": named,
              "longest": max((len(p) for p in prompts), default=0)}
    if policy == "truncate":
        return list(range(len(prompts))), [p[-budget:] if len(p) > budget else p for p in prompts], report
    keep = [i for i in range(len(prompts)) if len(prompts[i]) <= budget]
    if prompts and not keep:
        raise ConfigError(f"no prompt of {split} fits the model: every one is longer than {budget} tokens (the context "
                          f"minus eval.max_new_tokens), e.g. {named[0]}; data.over_length=drop leaves none to evaluate")
    return keep, [prompts[i] for i in keep], report


def fit_note(result: dict) -> str:
    """`, N prompt(s) truncated` (or dropped) for a result's score line; empty when every prompt fit."""
    fit = result.get("over_length") or {}
    if fit.get("truncated"):
        return f", {fit['truncated']} prompt(s) truncated"
    return f", {fit['dropped']} prompt(s) dropped as too long" if fit.get("dropped") else ""


def describe_fit(report: dict, split: str = "data.test") -> str | None:
    """One warning line for prompts the policy changed, or None when all fit."""
    n = report["truncated"] or report["dropped"]
    if not n:
        return None
    what = "truncated to their last" if report["truncated"] else "dropped as longer than"
    more = f" and {n - len(report['over_length'])} more" if n > len(report["over_length"]) else ""
    return (f"warning: {n} prompt(s) of {split} {what} {report['budget']} tokens (model context minus "
            f"eval.max_new_tokens; data.over_length={report['policy']}): {', '.join(report['over_length'])}{more}")


def evaluate_task(model, tokenizer, spec, records: Sequence, cfg: EvalConfig, shots: Sequence[dict] = (),
                  label: str = "model", over_length: str = "truncate") -> dict:
    """Generate greedily for each record's prompt and compare with its reference answer.

    Args:
        model: this rank's model stage (every rank of the model-parallel group calls this).
        tokenizer: chat tokenizer.
        spec: the model's ModelSpec (vocab, hidden size, context, EOS).
        records: test records (`.prompt` messages without the answer, `.answer` reference).
        cfg: evaluation settings.
        shots: few-shot chat turns placed before each prompt (the baseline's examples).
        label: name used in the result.
        over_length: what to do with a prompt longer than the context minus the generation budget
            (`fit_prompts`): the recipe's `data.over_length`.

    Returns:
        {"label", "exact_match", "correct", "n", "seconds", "examples_per_s", "prompt_tokens_mean",
         "metrics": every task metric with its interval (`eval.metrics.task_metrics`),
         "over_length": the `fit_prompts` report,
         "samples": first 20 (prompt tail, prediction, reference, correct),
         "predictions": every record's (file line, prediction, reference, correct), for
         `write_predictions`}.
    """
    records = list(records)[: cfg.max_examples] if cfg.max_examples else list(records)
    budget = prompt_budget(spec.max_position_embeddings, cfg.max_new_tokens,
                           virtual_token_count(model_chunks(model)[0]))
    keep, prompts, fit = fit_prompts(encode_test_prompts(tokenizer, records, shots), records, budget, over_length)
    records = [records[i] for i in keep]
    eos = stop_token_ids(spec, tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    start = time.perf_counter()
    predictions: list[str] = []
    # Sort by length so batches hold similar prompts (less prefill waste); restore order afterwards.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, list[int]] = {}
    for b in range(0, len(order), cfg.batch_size):
        idx = order[b:b + cfg.batch_size]
        gen = generate(model, [prompts[i] for i in idx], params, eos, spec.vocab_size, spec.hidden_size,
                       spec.max_position_embeddings)
        outputs.update(zip(idx, gen))
    seconds = time.perf_counter() - start
    predictions = [tokenizer.decode(outputs[i], skip_special_tokens=True).strip() for i in range(len(records))]
    correct = [exact_match(p, r.answer) for p, r in zip(predictions, records)]
    n = len(records)
    return {
        "label": label,
        "exact_match": sum(correct) / max(n, 1),
        "correct": sum(correct),
        "n": n,
        "seconds": round(seconds, 2),
        "examples_per_s": round(n / seconds, 3) if seconds else None,
        "prompt_tokens_mean": round(sum(len(p) for p in prompts) / max(n, 1), 1),
        "metrics": task_metrics(predictions, [r.answer for r in records]),
        "over_length": fit,
        "samples": [
            {"prompt": r.prompt[-1]["content"][-200:], "prediction": p, "reference": r.answer, "correct": c}
            for r, p, c in list(zip(records, predictions, correct))[:20]
        ],
        "predictions": [{"line": r.line, "prediction": p, "reference": r.answer, "correct": c}
                        for r, p, c in zip(records, predictions, correct)],
    }


def write_predictions(result: dict, path) -> dict:
    """Write a result's per-record predictions as JSONL (one object per test record, in file order)
    and return the result without them, for the compact `results.json`.

    Args:
        result: what `evaluate_task` returned.
        path: target file (`predictions_<label>.jsonl` in the run directory).

    Returns:
        `result` minus "predictions", plus "predictions_file".
    """
    rows = result.get("predictions", [])
    Path(path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return {**{k: v for k, v in result.items() if k != "predictions"}, "predictions_file": str(path)}


def baseline_shots(train_records: Sequence, k: int, seed: int) -> list[dict]:
    """Few-shot turns for the prompt-only baseline (empty when k == 0).

    Raises:
        ConfigError: k is more than the training records there are to draw from.
    """
    train_records = list(train_records)
    if k > len(train_records):
        raise ConfigError(f"eval.baseline_few_shot={k} asks for more worked examples than the {len(train_records)} "
                          f"valid training records; lower it")
    return few_shot_messages(train_records, k, seed) if k else []


def evaluate_baselines(model, tokenizer, spec, test: Sequence, train: Sequence, cfg: EvalConfig, seed: int,
                       over_length: str = "truncate") -> dict[str, dict]:
    """The prompt-only baselines: the model as given (call it with adapters disabled, or on the base) asked
    with the records' full instructions, zero-shot and — with `eval.baseline_few_shot` k > 0 — with k worked
    examples from the training split (seeded). The best by `eval.metric` is "the prompt-only baseline" (fewer
    shots on a tie: cheaper to serve).

    Args:
        model, tokenizer, spec: as for `evaluate_task`.
        test: test records with their own (full) instructions.
        train: training records to draw the shots from.
        cfg: evaluation settings (`baseline_few_shot`, `metric`, generation budget).
        seed: the shots' sampling seed (the run's).
        over_length: the recipe's `data.over_length`.

    Returns:
        {"baseline": the best result, and "baseline_<k>shot" for each other one}; each result is
        `evaluate_task`'s with "shots": k and its label naming k.

    Raises:
        ConfigError: k is more than the valid training records (`baseline_shots`).
    """
    ks = [0] + ([cfg.baseline_few_shot] if cfg.baseline_few_shot else [])
    shots = {k: baseline_shots(train, k, seed) for k in ks}  # a bad k is refused before any generation
    runs = {k: {**evaluate_task(model, tokenizer, spec, test, cfg, shots[k], label=f"prompt-only baseline ({k}-shot)",
                                over_length=over_length), "shots": k} for k in ks}
    best = max(ks, key=lambda k: (task_score(runs[k]["metrics"], cfg.metric), -k))
    return {"baseline": runs[best], **{f"baseline_{k}shot": runs[k] for k in ks if k != best}}


def describe_result(result: dict, metric: str = "exact_match") -> str:
    """One line for a result: the task metric with its 95% interval and count, per-field accuracies, fit notes.

    Example: `exact match 0.810 [0.755, 0.865] (162/200); fields: team 0.950, priority 0.830`.
    """
    m = result.get("metrics") or {}
    head = f"exact match {result['exact_match']:.3f}"
    em = m.get("exact_match")
    if em:
        head += f" [{em['low']:.3f}, {em['high']:.3f}]"
    head += f" ({result['correct']}/{result['n']}{fit_note(result)})"
    if metric != "exact_match" and metric in m:
        head += f"; {metric.replace('_', ' ')} {task_score(m, metric):.3f}"
    fields = m.get("field_accuracy")
    if fields:
        head += "; fields: " + ", ".join(f"{k} {v['value']:.3f}" for k, v in fields.items())
    return head
