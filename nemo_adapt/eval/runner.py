"""Task evaluation: generate answers for the test split and score them (exact match), for the
adapted model and for the prompt-only baseline (same instructions, optional few-shot, no training).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from nemo_adapt.config.schema import EvalConfig
from nemo_adapt.eval.task import baseline_messages, exact_match, few_shot_messages
from nemo_adapt.generation.generate import SamplingParams, generate, stop_token_ids


def _prompt_ids(tokenizer, messages) -> list[int]:
    enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(enc["input_ids"])


def evaluate_task(model, tokenizer, spec, records: Sequence, cfg: EvalConfig, shots: Sequence[dict] = (),
                  label: str = "model") -> dict:
    """Generate greedily for each record's prompt and compare with its reference answer.

    Args:
        model: this rank's model stage (every rank of the model-parallel group calls this).
        tokenizer: chat tokenizer.
        spec: the model's ModelSpec (vocab, hidden size, context, EOS).
        records: test records (`.prompt` messages without the answer, `.answer` reference).
        cfg: evaluation settings.
        shots: few-shot chat turns placed before each prompt (the baseline's examples).
        label: name used in the result.

    Returns:
        {"label", "exact_match", "correct", "n", "seconds", "examples_per_s", "prompt_tokens_mean",
         "samples": first 20 (prompt tail, prediction, reference, correct),
         "predictions": every record's (file line, prediction, reference, correct), for
         `write_predictions`}.
    """
    records = list(records)[: cfg.max_examples] if cfg.max_examples else list(records)
    prompts = [_prompt_ids(tokenizer, baseline_messages(shots, r.prompt) if shots else r.prompt) for r in records]
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
    """Few-shot turns for the prompt-only baseline (empty when k == 0)."""
    return few_shot_messages(list(train_records), k, seed) if k else []
