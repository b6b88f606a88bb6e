"""`nemo-adapt eval RUN_DIR`: evaluate on a finished run's test split (one process).

The follow-up job of `nemo-adapt launch --chain eval`. Reads the run's resolved config (RUN_DIR/config.yaml)
and evaluates, on its test split, one of:

- the run's adapter (RUN_DIR/adapter), or for a full fine-tuning run its model (RUN_DIR/model) -> RUN_DIR/eval.json;
- `--adapter DIR`: another adapter of the same base, ours or Hugging Face PEFT -> eval_<parent>_<dir>-<hash>.json
  (hash: 8 hex digits of the directory's absolute path, so same-named adapters never overwrite each other);
- `--model CHECKPOINT`: a model without an adapter — a merged export, a full fine-tuning result, any
  checkpoint of the run's architecture — asked the way the adapter was trained -> eval_model_<name>-<hash>.json;
- `--baseline [--few-shot K]`: the prompt-only baselines (the run's base given the full instructions,
  zero-shot and K-shot) -> eval_baseline.json.

Every result carries all task metrics with 95% bootstrap intervals (`eval.metrics`) and its provenance: the
test file's hash, chat-template hash, system prompt, generation settings, model and adapter fingerprints and
the code version. Predictions go to predictions_<result file stem>.jsonl beside it. `--suite FILE` adds
regression suites (`eval.suites`; exit status 1 when one fails), `--forgetting [FILE]` the general-text loss
change against the base (`eval.forgetting`) and `--latency` the inference cost (`eval.inference_cost`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
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


def baseline_records(cfg) -> tuple[list, list]:
    """The prompt-only baseline's records: the test split asked with the records' own full instructions (no
    `data.replace_system_prompt`), and the valid training records its k-shot examples are drawn from."""
    from nemo_adapt.data.formats import load_records

    d = cfg.data
    test = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, max_record_bytes=d.max_record_bytes,
                        warn=False, key="data.test")
    train = load_records(d.train, d.format, "skip", d.system_prompt, max_record_bytes=d.max_record_bytes, warn=False)
    return test, train


@contextlib.contextmanager
def opened_model(cfg, checkpoint: str | None = None, model_name: str | None = None, files=None):
    """A model to evaluate in this process: the checkpoint (default: the run's base), with the adapter `files`
    (`artifacts.adapter.open_adapter`) applied when given. The parallel runtime is shut down on exit.

    Yields:
        (model, tokenizer, source, adapter or None).

    Raises:
        CheckpointError / ConfigError: the checkpoint cannot be opened as `model_name`, or the adapter does not
            belong to it (fingerprint, shapes) — checked before the model is built.
    """
    from nemo_adapt.artifacts.adapter import apply_adapter, load_adapter
    from nemo_adapt.models.builder import BuildOptions
    from nemo_adapt.models.loader import load_model, open_source
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training.engine import resolve_dtype

    runtime.initialize(runtime.ParallelLayout(), seed=cfg.run.seed)
    try:
        source = open_source(checkpoint or cfg.model.checkpoint, model_name or cfg.model.name)
        adapter = load_adapter(files, source) if files is not None else None
        model, source = load_model(source, options=BuildOptions(params_dtype=resolve_dtype(cfg.train.precision)))
        tokenizer = load_tokenizer(source.tokenizer_path)
        if adapter is not None:
            apply_peft(model, adapter.config, seed=cfg.run.seed, tokenizer=tokenizer)
            apply_adapter(model, adapter)
        yield model, tokenizer, source, adapter
    finally:
        runtime.shutdown()


def provenance(cfg, source, tokenizer, files=None, *, split: str, instructions: str) -> dict:
    """What an evaluation result depends on, for comparing results and for the registry.

    Args:
        cfg: the run's config (data, eval settings).
        source: the opened model checkpoint.
        tokenizer: its tokenizer (chat template).
        files: the opened adapter, or None.
        split: the test file evaluated.
        instructions: how prompts were asked: `adapter` (the run's data.system_prompt, as trained) or `full`
            (the records' own instructions, as the baselines are).

    Returns:
        {"test_file", "test_sha256", "chat_template_sha256", "system_prompt", "instructions", "generation",
         "metric", "model", "adapter", "code_version"}.
    """
    from nemo_adapt.data.fingerprint import sha256_file
    from nemo_adapt.models.loader import base_fingerprint
    from nemo_adapt.provenance import code_version

    template = getattr(tokenizer, "chat_template", None) or ""
    adapter = None
    if files is not None:
        weights = next((f for f in sorted(Path(files.path).glob("adapter_model.*")) if f.is_file()), None)
        adapter = {"path": str(files.path), "format": files.format,
                   "weights_sha256": sha256_file(weights) if weights else None,
                   "step": files.description.get("step")}
    e = cfg.eval
    return {
        "test_file": str(split), "test_sha256": sha256_file(split),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "system_prompt": cfg.data.system_prompt if instructions == "adapter" else None,
        "instructions": instructions,
        "generation": {"decoding": "greedy", "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size,
                       "max_examples": e.max_examples},
        "metric": e.metric,
        "model": {"checkpoint": str(source.location), "architecture": source.spec.name,
                  "fingerprint": base_fingerprint(source)},
        "adapter": adapter,
        "code_version": code_version(),
    }


def score_suites(model, tokenizer, spec, suites, base_answers: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Regression suites on an opened model: {suite name: `suites.score_suite` result}.

    The base model's answers, where a suite needs them, come from `base_answers` (another model, answered
    before) or else from this model with its adapters bypassed (`adapters_disabled`).
    """
    from nemo_adapt.eval.suites import answer_suite, score_suite
    from nemo_adapt.peft.base import adapters_disabled

    out = {}
    for suite in suites:
        answers = answer_suite(model, tokenizer, spec, suite)
        base = None
        if suite.needs_base:
            if base_answers is not None:
                base = base_answers[suite.name]
            else:
                with adapters_disabled(model):
                    base = answer_suite(model, tokenizer, spec, suite)
        out[suite.name] = score_suite(suite, answers, base)
    return out


def inference_costs(model, tokenizer, spec, records, adapter=None, batch: int = 8, new_tokens: int = 32) -> dict[str, dict]:
    """Inference cost (`eval.inference_cost.measure`, `new_tokens` generated per row) on the first `batch` test
    prompts: {"as_evaluated": ...} and,
    with an adapter, "base" (adapters bypassed) and — for methods that fold into the weights — "merged" (folded in
    place, measured, unfolded again)."""
    from nemo_adapt.eval.inference_cost import extra_context_of, measure
    from nemo_adapt.eval.runner import encode_test_prompts
    from nemo_adapt.peft.base import adapters_disabled, get_peft_method

    prompts = encode_test_prompts(tokenizer, list(records)[:batch])
    prompts = (prompts * batch)[:batch]  # a split smaller than the batch repeats its prompts
    extra = extra_context_of(adapter.config) if adapter is not None else 0
    kw = {"batch_sizes": (1, batch), "new_tokens": new_tokens}
    costs = {"as_evaluated": measure(model, spec, prompts, extra_context=extra, **kw)}
    if adapter is None:
        return costs
    with adapters_disabled(model):
        costs["base"] = measure(model, spec, prompts, **kw)
    method = get_peft_method(adapter.config.method)
    if method.merges_into_base:
        method.merge_into_base(model)
        try:
            costs["merged"] = measure(model, spec, prompts, **kw)
        finally:
            method.unmerge_from_base(model)
    return costs


def evaluate_on_task(cfg, records, checkpoint: str | None = None, model_name: str | None = None, files=None,
                     max_examples: int | None = None, label: str = "adapted", suites=(),
                     general_texts: Sequence[str] = (), latency: int = 0) -> dict:
    """Score a model on a task's test records (one process): a checkpoint, with an adapter when `files` is given.

    Args:
        cfg: the task's run config (eval settings, precision, seed, over-length policy).
        records: its test records (`load_task`).
        checkpoint: the model (default: the run's base, `model.checkpoint`).
        model_name: the registered architecture to open it as (default: the run's `model.name`).
        files: an opened adapter (`artifacts.adapter.open_adapter`) to apply, or None.
        max_examples: at most this many test examples (default: the run's eval.max_examples).
        label: the result's label.
        suites: loaded regression suites (`eval.suites.load_suite`) to score as well; with a `checkpoint`, the
            base answers a suite needs come from the run's base, loaded first.
        general_texts: held-out general passages to measure forgetting on (`eval.forgetting`): the model's
            loss minus the base's (adapters bypassed, or the run's base loaded first with a `checkpoint`).
        latency: > 0: also measure inference cost (`eval.inference_cost`) with this many generated tokens per
            row on the first test prompts: the model as evaluated, and with an adapter also the base (adapters
            bypassed) and, for methods that fold, merged.

    Returns:
        The result of `evaluate_task` (label, exact_match, correct, n, metrics, predictions, over_length, ...)
        with its "provenance".
    """
    from nemo_adapt.eval.forgetting import forgetting, text_losses
    from nemo_adapt.eval.runner import describe_fit, evaluate_task
    from nemo_adapt.peft.base import adapters_disabled

    base_answers, base_losses = None, None
    if checkpoint is not None and (general_texts or any(s.needs_base for s in suites)):
        from nemo_adapt.eval.suites import answer_suite

        with opened_model(cfg) as (base, tokenizer, source, _):
            base_answers = {s.name: answer_suite(base, tokenizer, source.spec, s) for s in suites if s.needs_base}
            base_losses = text_losses(base, tokenizer, source.spec, general_texts) if general_texts else None
    with opened_model(cfg, checkpoint, model_name, files) as (model, tokenizer, source, adapter):
        eval_cfg = dataclasses.replace(cfg.eval, max_examples=max_examples or cfg.eval.max_examples)
        result = evaluate_task(model, tokenizer, source.spec, records, eval_cfg, label=label,
                               over_length=cfg.data.over_length)
        line = describe_fit(result["over_length"])
        if line:
            print(line, flush=True)
        if suites:
            result["suites"] = score_suites(model, tokenizer, source.spec, suites, base_answers)
        if latency:
            result["inference_cost"] = inference_costs(model, tokenizer, source.spec, records, adapter,
                                                       new_tokens=latency)
        if general_texts:
            losses = text_losses(model, tokenizer, source.spec, general_texts)
            if base_losses is None:
                with adapters_disabled(model):
                    base_losses = text_losses(model, tokenizer, source.spec, general_texts)
            result["forgetting"] = forgetting(losses, base_losses)
        # The settings this result was produced with (max_examples as asked for, not the recipe's).
        result["provenance"] = provenance(dataclasses.replace(cfg, eval=eval_cfg), source, tokenizer, files,
                                          split=cfg.data.test, instructions="adapter")
    return result


def _tag(path: Path, parent: bool = True) -> str:
    """A file-name-safe tag for a directory: its name (after its parent's when `parent`) and 8 hex digits of its
    absolute path's sha256 — two directories with the same names never share result files."""
    resolved = Path(path).resolve()
    where = f"{resolved.parent.name}_{resolved.name}" if parent else resolved.name
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return "".join(c if c.isalnum() or c in "-." else "_" for c in where) + f"-{digest}"


def _write(run_dir: Path, stem: str, result: dict) -> dict:
    """Predictions to predictions_<stem>.jsonl, the result (with "written") to <stem>.json; returns it."""
    from nemo_adapt.eval.runner import write_predictions

    result = write_predictions(result, run_dir / f"predictions_{stem}.jsonl")
    result = {**result, "run_dir": str(run_dir), "written": str(run_dir / f"{stem}.json")}
    Path(result["written"]).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def evaluate_run(run_dir: str | Path, max_examples: int | None = None, adapter_dir: str | Path | None = None,
                 *, model: str | None = None, suites: Sequence[str | Path] = (),
                 general_text: str | Path | None = None, latency: int = 0) -> dict:
    """Evaluate a run's adapter — or another adapter, or a model without one — on the run's test split.

    Args:
        run_dir: a run directory written by `nemo-adapt run` (config.yaml, adapter/).
        max_examples: evaluate at most this many test examples (default: the recipe's eval.max_examples).
        adapter_dir: evaluate this adapter instead of the run's (ours or Hugging Face PEFT; it must belong
            to the run's base model), on the run's task; written to RUN_DIR/eval_<parent>_<directory>-<hash>.json.
        model: evaluate this checkpoint of the run's architecture with no adapter (a merged export, a full
            fine-tuning result), asked the way the adapter was trained; written to RUN_DIR/eval_model_<name>-<hash>.json.
        suites: regression suite files (`eval.suites`) to score as well, read and checked before any model
            is loaded; results under "suites".
        general_text: a held-out general-text file (`data.general_corpus.load`) to measure forgetting on
            (loss delta against the base); results under "forgetting".
        latency: > 0: measure inference cost too, this many generated tokens per row (`inference_costs`);
            results under "inference_cost".

    Returns:
        The result of `evaluate_task` (label, exact_match, correct, n, metrics, suites, provenance, written, ...).

    Raises:
        ConfigError: no config, no test split, both an adapter and a model, a full fine-tuning run that did not
            finish (no RUN_DIR/model), or an HF PEFT adapter this model cannot represent.
        CheckpointError: the adapter is not an adapter directory or does not match the model; the model
            cannot be opened.
    """
    from nemo_adapt.artifacts.adapter import open_adapter
    from nemo_adapt.data.general_corpus import load as load_general
    from nemo_adapt.eval.suites import load_suite

    run_dir = Path(run_dir)
    if adapter_dir is not None and model is not None:
        raise ConfigError("pass --adapter or --model, not both (a model with an adapter folded in: export it "
                          "merged first, then evaluate it with --model)")
    cfg, records = load_task(run_dir)
    loaded = [load_suite(p) for p in suites]
    texts = load_general(general_text) if general_text is not None else []
    own_model = model is None and adapter_dir is None and cfg.peft.method == "none"
    if own_model:  # a full fine-tuning run: its result is RUN_DIR/model, as a PEFT run's is RUN_DIR/adapter
        if not (run_dir / "model" / "config.json").is_file():
            raise ConfigError(f"{str(run_dir)!r} is a full fine-tuning run without a finished model/ directory "
                              "(it is written when training completes); evaluate another checkpoint with "
                              "`nemo-adapt eval RUN --model DIR`")
        model = run_dir / "model"
    if model is not None:
        result = evaluate_on_task(cfg, records, checkpoint=str(model), max_examples=max_examples,
                                  label="adapted" if own_model else "model", suites=loaded, general_texts=texts,
                                  latency=latency)
        stem = "eval" if own_model else f"eval_model_{_tag(Path(model), parent=False)}"
        return _write(run_dir, stem, {**result, "model": str(model)})
    files = open_adapter(run_dir / "adapter" if adapter_dir is None else adapter_dir)
    result = evaluate_on_task(cfg, records, files=files, max_examples=max_examples, suites=loaded,
                              general_texts=texts, latency=latency)
    # The run's own adapter writes eval.json; another one its own files beside it, never over the run's, named
    # by its directory and the one above it (a run's adapter is always `adapter/`).
    stem = "eval" if adapter_dir is None else f"eval_{_tag(files.path)}"
    return _write(run_dir, stem, {**result, "adapter": str(files.path), "adapter_format": files.format,
                                  "adapter_step": files.description.get("step")})


def evaluate_baselines_of_run(run_dir: str | Path, few_shot: int | None = None, max_examples: int | None = None,
                              suites: Sequence[str | Path] = (), latency: int = 0) -> dict[str, dict]:
    """The prompt-only baselines of a run's task: its base model, no adapter, given the test records' full
    instructions, zero-shot and k-shot (`eval.runner.evaluate_baselines`); the best is "baseline".

    Args:
        run_dir: a run directory.
        few_shot: k worked examples from the training split (default: the recipe's eval.baseline_few_shot).
        max_examples: evaluate at most this many test examples.
        suites: regression suite files to score the base model on (asked as the suites say, no instructions
            of the task); results under the best baseline's "suites" — the base's own pass rates.
        latency: > 0: the base's inference cost on the test prompts (`inference_costs`, this many generated
            tokens per row), under the best baseline's "inference_cost".

    Returns:
        {"baseline": best result, "baseline_<k>shot": the others}, each with provenance; written together to
        RUN_DIR/eval_baseline.json (predictions to predictions_eval_baseline[_<k>shot].jsonl).

    Raises:
        ConfigError: no config or test split; k negative or more than the valid training records — before
            any model is loaded.
    """
    from nemo_adapt.eval.runner import baseline_shots, describe_fit, evaluate_baselines, write_predictions
    from nemo_adapt.eval.suites import load_suite

    run_dir = Path(run_dir)
    cfg, _ = load_task(run_dir)
    loaded = [load_suite(p) for p in suites]
    k = cfg.eval.baseline_few_shot if few_shot is None else few_shot
    if k < 0:
        raise ConfigError(f"--few-shot={k}: the number of worked examples must be 0 or more")
    d = cfg.data
    test, train = baseline_records(cfg)
    baseline_shots(train, k, cfg.run.seed)  # refuse a k the training split cannot give, before loading the model
    eval_cfg = dataclasses.replace(cfg.eval, baseline_few_shot=k, max_examples=max_examples or cfg.eval.max_examples)
    with opened_model(cfg) as (model, tokenizer, source, _):
        results = evaluate_baselines(model, tokenizer, source.spec, test, train, eval_cfg, cfg.run.seed,
                                     over_length=d.over_length)
        if loaded:  # the base is its own base: a suite's base-dependent checks hold by construction
            from nemo_adapt.eval.suites import answer_suite, score_suite

            answers = {s.name: answer_suite(model, tokenizer, source.spec, s) for s in loaded}
            results["baseline"]["suites"] = {s.name: score_suite(s, answers[s.name], answers[s.name])
                                             for s in loaded}
        if latency:
            results["baseline"]["inference_cost"] = inference_costs(model, tokenizer, source.spec, test,
                                                                    new_tokens=latency)
        cfg = dataclasses.replace(cfg, eval=eval_cfg)
        where = provenance(cfg, source, tokenizer, split=d.test, instructions="full")
    for r in results.values():
        line = describe_fit(r["over_length"], "data.test (prompt-only baseline)")
        if line:
            print(line, flush=True)
    written = run_dir / "eval_baseline.json"
    out = {key: {**write_predictions(r, run_dir / f"predictions_eval_{key}.jsonl"), "provenance": where}
           for key, r in results.items()}
    written.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return {key: {**r, "written": str(written)} for key, r in out.items()}


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on a finished run's test split: its adapter, another adapter, a "
                       "model, or the prompt-only baselines")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate at most this many test examples")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--adapter", default=None, help="evaluate this adapter directory instead of the run's own "
                      "(a nemo-adapt artifact or a Hugging Face PEFT adapter of the same base model)")
    what.add_argument("--model", default=None, help="evaluate this checkpoint without an adapter (a merged "
                      "export, a full fine-tuning result), asked the way the run's adapter was trained")
    what.add_argument("--baseline", action="store_true", help="evaluate the prompt-only baselines: the base model "
                      "given the full instructions, zero-shot and --few-shot K")
    p.add_argument("--suite", action="append", default=[], metavar="FILE", help="also score this regression "
                   "suite (YAML or JSONL; repeatable), e.g. suites/general_knowledge.yaml suites/safety.yaml")
    p.add_argument("--forgetting", nargs="?", const="shipped", default=None, metavar="FILE",
                   help="also measure forgetting: the loss change on held-out general text against the base (default "
                   "text: datasets/general/heldout.jsonl; or a JSONL of {\"text\": ...} / a .txt file)")
    p.add_argument("--latency", nargs="?", type=int, const=32, default=0, metavar="NEW_TOKENS",
                   help="also measure inference cost: time to first token, decode tokens/s at batch 1 and 8 over "
                   "NEW_TOKENS generated tokens (default 32), context and memory — as evaluated, for the base, merged")
    p.add_argument("--few-shot", type=int, default=None, metavar="K", help="with --baseline: also score a K-shot "
                   "baseline (K worked examples from the training split; default: the recipe's "
                   "eval.baseline_few_shot)")

    def run(args) -> int:
        from nemo_adapt.eval.runner import describe_result

        if args.few_shot is not None and not args.baseline:
            raise ConfigError("--few-shot applies to --baseline (the prompt-only baselines)")
        if args.forgetting is not None and args.baseline:
            raise ConfigError("--forgetting compares a model with its base; the baseline is the base itself")
        if args.baseline:
            results = evaluate_baselines_of_run(args.run_dir, args.few_shot, args.max_examples, args.suite)
            metric = results["baseline"]["provenance"]["metric"]
            for key, r in results.items():
                best = " (best)" if key == "baseline" and len(results) > 1 else ""
                print(f"{r['label']}{best}: {describe_result(r, metric)}", flush=True)
            _print_suites(results["baseline"].get("suites", {}))
            print(f"written {results['baseline']['written']}", flush=True)
            return 0
        from nemo_adapt.data.general_corpus import DEFAULT

        if args.latency and args.latency < 2:
            raise ConfigError(f"--latency {args.latency}: the decode rate needs at least 2 generated tokens")

        general = None if args.forgetting is None else (DEFAULT if args.forgetting == "shipped" else args.forgetting)
        result = evaluate_run(args.run_dir, args.max_examples, args.adapter, model=args.model, suites=args.suite,
                              general_text=general, latency=args.latency)
        print(f"{result['label']}: {describe_result(result, result['provenance']['metric'])}", flush=True)
        _print_suites(result.get("suites", {}))
        for variant, c in result.get("inference_cost", {}).items():
            rates = ", ".join(f"batch {b}: {'not measurable' if r is None else f'{r:.1f}'}"
                              for b, r in c["decode_tokens_per_s"].items())
            print(f"inference ({variant}): first token {1000 * c['ttft_s']:.0f} ms, decode tokens/s {rates}, "
                  f"context {c['context_tokens']} tokens", flush=True)
        if "forgetting" in result:
            f = result["forgetting"]
            d = f["loss_delta"]
            print(f"forgetting: general-text loss {f['adapted_loss']:.3f} vs base {f['base_loss']:.3f} nats/token, "
                  f"delta {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over {f['passages']} passages",
                  flush=True)
        print(f"written {result['written']}", file=sys.stdout, flush=True)
        return 0 if all(r["pass"] for r in result.get("suites", {}).values()) else 1

    p.set_defaults(func=run)


def _print_suites(results: dict[str, dict]) -> None:
    for name, r in results.items():
        verdict = "pass" if r["pass"] else "FAIL"
        skipped = f", {len(r['skipped'])} skipped (the base fails them too)" if r["skipped"] else ""
        print(f"suite {name} [{r['sha256'][:12]}]: {verdict} — {r['passed']}/{r['checked']} checked cases pass"
              f"{skipped}", flush=True)
        for f in r["failed"][:5]:
            print(f"  {f['id']} (line {f['line']}): fails {', '.join(f['failed'])}: {f['answer'][:120]!r}", flush=True)
