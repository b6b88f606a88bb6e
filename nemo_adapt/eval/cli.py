"""`nemo-adapt eval RUN_DIR`: evaluate a finished run's adapter on its test split (one process).

The follow-up job of `nemo-adapt launch --chain eval`. Reads the run's resolved config
(RUN_DIR/config.yaml) and adapter artifact (RUN_DIR/adapter), rebuilds the base model with the
method applied, loads the adapter tensors, generates answers for data.test and scores them
(exact match). Writes RUN_DIR/eval.json and prints the score.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nemo_adapt.errors import CheckpointError, ConfigError


def evaluate_run(run_dir: str | Path, max_examples: int | None = None) -> dict:
    """Evaluate the adapter of a run on its test split.

    Args:
        run_dir: a run directory written by `nemo-adapt run` (config.yaml, adapter/).
        max_examples: evaluate at most this many test examples (default: the recipe's eval.max_examples).

    Returns:
        The result of `evaluate_task` (label, exact_match, correct, n, ...).

    Raises:
        ConfigError: no config, no test split, or a full fine-tuning run (no adapter artifact).
        CheckpointError: the adapter does not match the model.
    """
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from nemo_adapt.artifacts.adapter import CONFIG, WEIGHTS, read_adapter_config
    from nemo_adapt.config import load_resolved
    from nemo_adapt.data.formats import data_path_problem, load_records
    from nemo_adapt.eval.runner import describe_fit, evaluate_task, write_predictions
    from nemo_adapt.models.builder import BuildOptions
    from nemo_adapt.models.loader import base_fingerprint, load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft, global_module_name
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training.engine import resolve_dtype

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = load_resolved(config)
    if not cfg.data.test:
        raise ConfigError(f"{config}: data.test is not set; there is nothing to evaluate on")
    problem = data_path_problem(cfg.data.test)
    if problem is not None:
        raise ConfigError(f"{config}: data.test={cfg.data.test!r} {problem}")
    adapter_dir = run_dir / "adapter"
    if cfg.peft.method == "none":
        raise ConfigError(f"{str(run_dir)!r} is a full fine-tuning run; `nemo-adapt eval` evaluates adapters")
    meta = read_adapter_config(adapter_dir)
    d = cfg.data
    # Asked the way the adapter was trained (data.replace_system_prompt swaps in the short prompt).
    records = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, d.replace_system_prompt,
                           max_record_bytes=d.max_record_bytes, key="data.test")

    runtime.initialize(runtime.ParallelLayout(), seed=cfg.run.seed)
    try:
        source = open_source(cfg.model.checkpoint, cfg.model.name)
        # The adapter is only valid on the weights it was trained on (checked before building the model).
        trained_on, now = meta.get("base_model_fingerprint"), base_fingerprint(source)
        if trained_on and trained_on != now:
            raise CheckpointError(f"{adapter_dir / CONFIG}: the adapter was trained on base model {trained_on}, but "
                                  f"{config} names model.checkpoint={cfg.model.checkpoint!r} = {now}")
        model, source = load_model(source, options=BuildOptions(params_dtype=resolve_dtype(cfg.train.precision)))
        tokenizer = load_tokenizer(source.tokenizer_path)
        apply_peft(model, cfg.peft, seed=cfg.run.seed, tokenizer=tokenizer)
        tensors = load_file(str(adapter_dir / WEIGHTS))
        used = set()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not getattr(param, "is_adapter", False):
                    continue
                module_name, _, leaf = name.rpartition(".")
                key = f"{global_module_name(model, module_name)}.{leaf}"
                if key not in tensors or tensors[key].shape != param.shape:
                    raise CheckpointError(f"{adapter_dir / WEIGHTS}: no tensor {key!r} of shape {tuple(param.shape)} "
                                          f"(adapter for {meta.get('base_model')!r}, see {CONFIG})")
                param.copy_(tensors[key].to(param.dtype))
                used.add(key)
        if used != set(tensors):
            raise CheckpointError(f"{adapter_dir / WEIGHTS}: tensors not in the model: {sorted(set(tensors) - used)[:3]}")
        eval_cfg = dataclasses.replace(cfg.eval, max_examples=max_examples or cfg.eval.max_examples)
        result = evaluate_task(model, tokenizer, source.spec, records, eval_cfg, label="adapted",
                               over_length=cfg.data.over_length)
        line = describe_fit(result["over_length"])
        if line:
            print(line, flush=True)
    finally:
        runtime.shutdown()
    result = write_predictions(result, run_dir / "predictions_eval.jsonl")
    result = {**result, "run_dir": str(run_dir), "adapter_step": meta.get("step")}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run's adapter on its test split")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate at most this many test examples")

    def run(args) -> int:
        from nemo_adapt.eval.runner import fit_note

        result = evaluate_run(args.run_dir, args.max_examples)
        print(f"{result['label']}: exact match {result['exact_match']:.3f} ({result['correct']}/{result['n']}"
              f"{fit_note(result)}); "
              f"written {Path(args.run_dir) / 'eval.json'}", file=sys.stdout, flush=True)
        return 0

    p.set_defaults(func=run)
