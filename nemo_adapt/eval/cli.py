"""`nemo-adapt eval RUN_DIR`: evaluate a finished run's adapter on its test split (one process).

The follow-up job of `nemo-adapt launch --chain eval`. Reads the run's resolved config
(RUN_DIR/config.yaml) and adapter artifact (RUN_DIR/adapter, or `--adapter DIR`: another adapter of the
same base, ours or Hugging Face PEFT), rebuilds the base model with the method applied, loads the adapter
tensors, generates answers for data.test and scores them (exact match). Writes RUN_DIR/eval.json and
prints the score.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nemo_adapt.errors import ConfigError


def load_task(run_dir: str | Path):
    """A run's evaluation task: its resolved config and test records, asked the way its adapter was trained.

    Returns:
        (the run's `RecipeConfig`, the test records).

    Raises:
        ConfigError: not a run directory, no test split, or an unreadable one.
    """
    from nemo_adapt.config import load_resolved
    from nemo_adapt.data.formats import data_path_problem, load_records

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
    d = cfg.data
    # Asked the way the adapter was trained (data.replace_system_prompt swaps in the short prompt).
    records = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, d.replace_system_prompt,
                           max_record_bytes=d.max_record_bytes, key="data.test")
    return cfg, records


def evaluate_on_task(cfg, records, checkpoint: str | None = None, model_name: str | None = None, files=None,
                     max_examples: int | None = None, label: str = "adapted") -> dict:
    """Score a model on a task's test records (one process): a checkpoint, with an adapter when `files` is given.

    Args:
        cfg: the task's run config (eval settings, precision, seed, over-length policy).
        records: its test records (`load_task`).
        checkpoint: the model (default: the run's base, `model.checkpoint`).
        model_name: the registered architecture to open it as (default: the run's `model.name`).
        files: an opened adapter (`artifacts.adapter.open_adapter`) to apply, or None.
        max_examples: at most this many test examples (default: the run's eval.max_examples).
        label: the result's label.

    Returns:
        The result of `evaluate_task` (label, exact_match, correct, n, predictions, over_length, ...).
    """
    import dataclasses

    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter
    from nemo_adapt.eval.runner import describe_fit, evaluate_task
    from nemo_adapt.models.builder import BuildOptions
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training.engine import resolve_dtype

    runtime.initialize(runtime.ParallelLayout(), seed=cfg.run.seed)
    try:
        source = open_source(checkpoint or cfg.model.checkpoint, model_name or cfg.model.name)
        # Converted and checked against the base (fingerprint, shapes) before the model is built.
        adapter = load_adapter(files, source) if files is not None else None
        model, source = load_model(source, options=BuildOptions(params_dtype=resolve_dtype(cfg.train.precision)))
        tokenizer = load_tokenizer(source.tokenizer_path)
        if adapter is not None:
            apply_peft(model, adapter.config, seed=cfg.run.seed, tokenizer=tokenizer)
            apply_adapter(model, adapter)
        eval_cfg = dataclasses.replace(cfg.eval, max_examples=max_examples or cfg.eval.max_examples)
        result = evaluate_task(model, tokenizer, source.spec, records, eval_cfg, label=label,
                               over_length=cfg.data.over_length)
        line = describe_fit(result["over_length"])
        if line:
            print(line, flush=True)
    finally:
        runtime.shutdown()
    return result


def evaluate_run(run_dir: str | Path, max_examples: int | None = None, adapter_dir: str | Path | None = None) -> dict:
    """Evaluate the adapter of a run on its test split.

    Args:
        run_dir: a run directory written by `nemo-adapt run` (config.yaml, adapter/).
        max_examples: evaluate at most this many test examples (default: the recipe's eval.max_examples).
        adapter_dir: evaluate this adapter instead of the run's (ours or Hugging Face PEFT; it must belong
            to the run's base model), on the run's task; written to RUN_DIR/eval_<parent>_<directory>.json.

    Returns:
        The result of `evaluate_task` (label, exact_match, correct, n, ...).

    Raises:
        ConfigError: no config, no test split, a full fine-tuning run (no adapter artifact), or an HF PEFT
            adapter this model cannot represent.
        CheckpointError: the adapter is not an adapter directory or does not match the model.
    """
    from nemo_adapt.artifacts.adapter import open_adapter
    from nemo_adapt.eval.runner import write_predictions

    run_dir = Path(run_dir)
    cfg, records = load_task(run_dir)
    if adapter_dir is None and cfg.peft.method == "none":
        raise ConfigError(f"{str(run_dir)!r} is a full fine-tuning run; `nemo-adapt eval` evaluates adapters")
    files = open_adapter(run_dir / "adapter" if adapter_dir is None else adapter_dir)
    result = evaluate_on_task(cfg, records, files=files, max_examples=max_examples)
    # The run's own adapter writes eval.json; another one its own files beside it, never over the run's, named
    # by its directory and the one above it (a run's adapter is always `adapter/`).
    where = f"{files.path.resolve().parent.name}_{files.path.name}"
    tag = "" if adapter_dir is None else "_" + "".join(c if c.isalnum() or c in "-." else "_" for c in where)
    result = write_predictions(result, run_dir / f"predictions_eval{tag}.jsonl")
    result = {**result, "run_dir": str(run_dir), "adapter": str(files.path), "adapter_format": files.format,
              "adapter_step": files.description.get("step"), "written": str(run_dir / f"eval{tag}.json")}
    Path(result["written"]).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run's adapter on its test split")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate at most this many test examples")
    p.add_argument("--adapter", default=None, help="evaluate this adapter directory instead of the run's own "
                   "(a nemo-adapt artifact or a Hugging Face PEFT adapter of the same base model)")

    def run(args) -> int:
        from nemo_adapt.eval.runner import fit_note

        result = evaluate_run(args.run_dir, args.max_examples, args.adapter)
        print(f"{result['label']}: exact match {result['exact_match']:.3f} ({result['correct']}/{result['n']}"
              f"{fit_note(result)}); "
              f"written {result['written']}", file=sys.stdout, flush=True)
        return 0

    p.set_defaults(func=run)
