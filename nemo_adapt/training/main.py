"""`nemo-adapt run RECIPE [key=value ...]`: the training entry, top to bottom (`run`, then one function each).

    setup     check every input, start process groups, data, model + PEFT, optimizer, resume   `_setup`
    train     Megatron-Core schedule per step; log, validate, checkpoint, stop on a signal      `_train`
    evaluate  final checkpoint, the adapter (PEFT) or model/ (full fine-tuning), test split:     `_evaluate`
              adapted model vs prompt-only baselines
    results   results.json and the console summary                                              `_write_results`
    cleanup   logger closed (loss curve, W&B finish with the exit code), signal handlers         `run`'s finally
              restored, process groups destroyed — also when a step raises

Runs as one process or under torchrun/srun (one process per GPU, or per CPU rank over gloo).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_adapt.errors import ConfigError


def preflight(cfg, world_size: int, target=None):
    """Validate everything that can be checked without building the model.

    Data files must exist and be readable, the base checkpoint must open (config and tensor index, no
    weights), an adapter to start from (`peft.init_from`) must belong to it (its settings then replace the
    recipe's in `cfg.peft`), and the recipe must pass `training.preflight.check_recipe` on `target`
    (default: this machine) with `world_size` ranks.

    Returns:
        (the opened checkpoint, the `peft.init_from` adapter or None).

    Raises:
        ConfigError / CheckpointError / ParallelLayoutError: the first problem found, clearly named.
    """
    from nemo_adapt.data.formats import data_path_problem
    from nemo_adapt.models.loader import open_source
    from nemo_adapt.training.preflight import Target, check_recipe, check_test_split

    for key in ("train", "validation", "test"):
        path = getattr(cfg.data, key)
        if key == "train" and not path:
            raise ConfigError("data.train is empty; give a JSONL file of training examples")
        problem = data_path_problem(path) if path else None
        if problem is not None:
            raise ConfigError(f"data.{key}={path!r} {problem} (relative paths are from {os.getcwd()!r})")
    source = open_source(cfg.model.checkpoint, cfg.model.name)
    start = None
    if cfg.peft.init_from:
        from nemo_adapt.artifacts.adapter import load_adapter, settings_from_adapter
        from nemo_adapt.errors import CheckpointError

        try:
            start = load_adapter(cfg.peft.init_from, source)
        except (CheckpointError, ConfigError) as err:
            raise type(err)(f"peft.init_from: {err}") from None
        cfg.peft = settings_from_adapter(cfg.peft, start)
    check_recipe(cfg, source.spec, world_size, target or Target.here())
    # The test split and evaluation settings too: a bad or over-long test record is named now,
    # not after training.
    check_test_split(cfg, source, announce=int(os.environ.get("RANK", "0")) == 0)
    return source, start


_MIN_STEP_SECONDS = float(os.environ.get("NEMO_ADAPT_MIN_STEP_SECONDS", "0") or 0)
"""Test hook: make each step last at least this long, so signals sent by Slurm tests land mid-run.
Numerics are unchanged; logged step times exclude the wait."""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class _Run:
    """What the phases of one run share, built by `_setup` (names as in the recipe: cfg.run, cfg.data, ...)."""

    cfg: Any
    info: Any                # runtime.RuntimeInfo: ranks and the data-parallel size
    run_dir: Path
    source: Any              # the opened base checkpoint (spec, tokenizer, location)
    tokenizer: Any
    data: Any                # the tokenized splits, their fingerprints and stats
    chunks: list             # one GPTModel per virtual-pipeline stage this rank holds
    ddp: list                # the chunks wrapped for data parallelism (what the optimizer steps)
    optimizer: Any
    method: Any              # the PEFT method applied (None: full fine-tuning)
    plan: Any                # engine.BatchPlan
    steps: Any               # engine.StepData: which samples each step reads
    logger: Any              # logging.RunLogger (set when the run directory opens)
    preemption: Any          # training.signals.PreemptionHandler
    fingerprint: str         # the base model's
    layout: dict
    settings: dict           # resume-relevant settings, as recorded in each checkpoint
    n_trainable: int
    total_steps: int
    coverage: dict
    latest: Path | None      # the checkpoint this run resumed from
    step: int = 0
    consumed: int = 0        # samples consumed so far: the data position, exact across batch-size changes
    tokens_seen: int = 0     # non-padding training tokens so far
    adapter_dir: Path | None = None  # written at the end: adapter/ (PEFT) ...
    model_dir: Path | None = None    # ... or model/ (full fine-tuning)

    @property
    def main_rank(self) -> bool:
        return self.info.rank == 0

    @property
    def trainable_only(self) -> bool:
        return self.cfg.peft.method != "none"


def run(recipe: str, overrides: list[str]) -> int:
    """Train (and evaluate) a recipe: setup -> train -> evaluate -> write results, with cleanup in `finally`.

    Returns:
        0 when done; `EXIT_REQUEUE` after a checkpoint on SIGTERM/SIGUSR1 (Slurm requeues); the signal's exit code
        when interrupted before training; 1 when training failed (traceback, then one `error:` line on stderr).

    Raises:
        NemoAdaptError (ConfigError, CheckpointError, ...): bad input, before training where it can be known;
            the CLI prints it as one line (exit 2). The logger is closed and the process groups destroyed either way.
    """
    from nemo_adapt.config import load_recipe, resolve_run_dir
    from nemo_adapt.errors import NemoAdaptError
    from nemo_adapt.parallel import runtime
    from nemo_adapt.training.signals import PreemptionHandler, RunInterrupted

    # Everything that can be checked without process groups or weights, first.
    cfg = load_recipe(recipe, overrides)
    source, start_adapter = preflight(cfg, _world_size())
    run_dir = resolve_run_dir(cfg)
    resume_from = _resume_point(cfg, run_dir)
    preemption = PreemptionHandler(enabled=cfg.checkpoint.save_on_signal)
    p = cfg.parallel
    info = runtime.initialize(runtime.ParallelLayout(tensor=p.tensor, pipeline=p.pipeline,
                                                     virtual_pipeline=p.virtual_pipeline, context=p.context,
                                                     sequence_parallel=p.sequence_parallel), seed=cfg.run.seed)
    r, exit_code = None, 1
    try:
        r = _setup(cfg, info, run_dir, source, start_adapter, resume_from, preemption)
        exit_code = _train(r)
        results = _evaluate(r) if exit_code == 0 else {}
        if r.main_rank:
            _write_results(r, results, exit_code)
        return exit_code
    except RunInterrupted as err:  # a signal during data preparation: nothing to checkpoint yet
        print(f"nemo-adapt run: {err}", file=sys.stderr, flush=True)
        exit_code = err.exit_code
        return exit_code
    except NemoAdaptError:
        raise
    except Exception as err:  # a fault, not bad input: the traceback for whoever debugs it, then one line
        traceback.print_exc()
        where = f"at step {r.step} of {r.total_steps}" if r is not None else "during setup"
        last = f"; checkpoint {r.latest.name} resumes the run" if r is not None and r.latest is not None else ""
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"nemo-adapt run: error: training failed {where}: {type(err).__name__}: {first_line}{last}",
              file=sys.stderr, flush=True)
        exit_code = 1
        return exit_code
    finally:
        if r is not None and r.logger is not None:
            r.logger.close(exit_code)  # W&B marks the run failed on a non-zero code
        preemption.restore()
        runtime.shutdown()


def _resume_point(cfg, run_dir: Path) -> tuple:
    """(latest checkpoint, its state, the recipe's resume settings, changes accepted) — a resume that would silently
    change the run is refused here, before any expensive work."""
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import resume

    latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is not None and cfg.checkpoint.resume == "never":
        raise ConfigError(f"run directory {str(run_dir)!r} already holds checkpoint {latest.name} and "
                          "checkpoint.resume=never; choose another run.name or set checkpoint.resume=auto")
    state = ckpt.read_state(latest) if latest is not None else None
    settings, accepted = resume.resume_settings(cfg), []
    if state is not None:
        # A run length in steps is known now; one in epochs only with the data (checked in `_setup`).
        sched = resume.schedule_change(state.schedule, state.settings, cfg, state.step, cfg.run.max_steps) \
            if cfg.run.max_steps else None
        accepted = resume.check_settings(state.settings, settings, cfg.checkpoint.resume_changes, str(latest),
                                         schedule=sched)
    return latest, state, settings, accepted


def _prepare_data(cfg, tokenizer, main_rank: bool, preemption):
    """Rank 0 tokenizes and fills the cache; the others then read it (same fingerprint). SIGTERM/SIGINT here end
    the run at once (RunInterrupted: nothing to checkpoint yet, and the run directory does not exist yet)."""
    from nemo_adapt.data import build_datasets
    from nemo_adapt.data.dataset import print_data_report

    with preemption.interrupt_on_signal("data preparation"):
        if main_rank:
            print(f"preparing data: data.train={cfg.data.train!r}", flush=True)
            data = build_datasets(cfg.data, tokenizer, cfg.run.seed)
        dist.barrier()
        if not main_rank:
            data = build_datasets(cfg.data, tokenizer, cfg.run.seed)
    if main_rank:
        print_data_report(data)  # stats per split, and a warning naming any skipped records
    return data


def _build_model(cfg, source, tokenizer, start_adapter, resuming: bool, main_rank: bool):
    """(chunks, source, PEFT method or None): the base as Megatron-Core chunks with the PEFT transform applied,
    and `peft.init_from`'s weights loaded unless a checkpoint will be (a resume continues from it instead)."""
    from nemo_adapt.models.builder import BuildOptions
    from nemo_adapt.models.loader import load_model_chunks
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.training import engine

    p = cfg.parallel
    options = BuildOptions(params_dtype=engine.resolve_dtype(cfg.train.precision),
                           sequence_parallel=p.sequence_parallel, recompute=p.recompute,
                           fp8=cfg.train.precision == "fp8", packed_sequences=cfg.data.packing,
                           context_parallel=p.context)
    # One chunk per virtual-pipeline stage this rank holds (one without an interleaved pipeline).
    chunks, source = load_model_chunks(source, options=options)
    chunks[0].config.calculate_per_token_loss = True  # one TransformerConfig, shared by the chunks
    methods = [apply_peft(c, cfg.peft, seed=cfg.run.seed, tokenizer=tokenizer) for c in chunks]
    if start_adapter is not None and not resuming:
        from nemo_adapt.artifacts.adapter import apply_adapter

        apply_adapter(chunks, start_adapter)
        if main_rank:
            print(f"adapter starts from peft.init_from={cfg.peft.init_from!r} ({start_adapter.files.format}, "
                  f"{len(start_adapter.tensors)} tensors)", flush=True)
    return chunks, source, methods[0]


def _setup(cfg, info, run_dir: Path, source, start_adapter, resume_from: tuple, preemption) -> _Run:
    """Data, model + PEFT, optimizer, the resumed checkpoint; then (only then) the run directory and the logger."""
    from nemo_adapt.models.loader import base_fingerprint
    from nemo_adapt.peft.base import trainable_parameters
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training import engine, resume

    latest, state, settings, accepted = resume_from
    main_rank, p = info.rank == 0, cfg.parallel
    tokenizer = load_tokenizer(source.tokenizer_path)
    data = _prepare_data(cfg, tokenizer, main_rank, preemption)
    chunks, source, method = _build_model(cfg, source, tokenizer, start_adapter, state is not None, main_rank)
    n_trainable = _sum_over_model_parallel(trainable_parameters(chunks, unique=True))
    ddp = engine.wrap_ddp(chunks, cfg)
    optimizer = engine.build_optimizer(ddp, cfg, method.lr_multipliers() if method else None)
    engine.connect_schedule_hooks(ddp, optimizer)

    plan = engine.BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, info.data_parallel)
    steps = engine.StepData(data.train, plan, cfg.run.seed)
    start_step, consumed = (state.step, state.consumed_samples) if state else (0, 0)
    total_steps = cfg.run.max_steps or start_step + steps.steps_for_epochs(cfg.run.max_epochs, consumed)
    if state is not None and not cfg.run.max_steps:  # a run length in epochs must not re-shape the LR schedule
        accepted += resume.check_schedule(state.schedule, state.settings, cfg, start_step, total_steps,
                                          cfg.checkpoint.resume_changes, str(latest))
    if data.validation is not None and len(data.validation) < plan.global_batch_size:
        raise ConfigError(f"the validation split has {len(data.validation)} rows, fewer than "
                          f"train.global_batch_size={plan.global_batch_size}")
    r = _Run(cfg=cfg, info=info, run_dir=run_dir, source=source, tokenizer=tokenizer, data=data, chunks=chunks,
             ddp=ddp, optimizer=optimizer, method=method, plan=plan, steps=steps, logger=None, preemption=preemption,
             fingerprint=base_fingerprint(source), settings=settings, n_trainable=n_trainable,
             total_steps=total_steps, coverage={}, latest=latest, step=start_step, consumed=consumed,
             layout={"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
                     "context": p.context, "data": info.data_parallel})
    if state is not None:
        _load_resumed(r, state, accepted)
    r.coverage = steps.coverage(consumed, consumed + (total_steps - start_step) * plan.global_batch_size)
    if main_rank:
        print(_describe_coverage(r.coverage, total_steps - start_step, plan.global_batch_size), flush=True)
    _open_run_dir(r, accepted)
    return r


def _load_resumed(r: _Run, state, accepted: list) -> None:
    """Load the checkpoint `r.latest` (`state` its record) after checking it is this run's: the same base model and
    method, and data changed only as `checkpoint.resume_changes` allows."""
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import resume

    cfg, latest = r.cfg, r.latest
    if state.base_model_fingerprint != r.fingerprint:
        raise ConfigError(f"checkpoint {str(latest)!r} was trained on base model {state.base_model_fingerprint}, "
                          f"but model.checkpoint is {r.fingerprint}")
    if state.peft_method != cfg.peft.method:
        raise ConfigError(f"checkpoint {str(latest)!r} was trained with peft.method={state.peft_method!r}, "
                          f"the recipe now says {cfg.peft.method!r}")
    new_data = r.data.fingerprint["combined"]
    if state.data_fingerprint != new_data:
        accepted += resume.check_settings(None, r.settings, cfg.checkpoint.resume_changes, str(latest),
                                          data_changed=(state.data_fingerprint, new_data))
    ckpt.load_checkpoint(latest, r.ddp, r.optimizer, r.trainable_only, same_layout=state.layout == r.layout)
    r.tokens_seen = state.tokens_seen
    if accepted and r.main_rank:
        print(_describe_changes(accepted, state, cfg, r.step, r.total_steps), flush=True)


def _open_run_dir(r: _Run, accepted: list) -> None:
    """Only now, with data, model and any checkpoint validated, does the run directory come to exist (a bad input
    leaves nothing behind and never touches an existing run's checkpoints); then the logger (`r.logger`)."""
    from nemo_adapt.config import config_to_dict, save_resolved
    from nemo_adapt.data.dataset import data_summary
    from nemo_adapt.logging import RunLogger
    from nemo_adapt.training import checkpoint as ckpt

    cfg, run_dir, start = r.cfg, r.run_dir, r.step
    if r.main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_interrupted(run_dir)
        save_resolved(cfg, run_dir / "config.yaml")
    dist.barrier()
    r.logger = RunLogger(cfg.logging, run_dir, cfg.run.name, config_to_dict(cfg), is_main=r.main_rank,
                         total_steps=r.total_steps, start_step=start)
    if not r.main_rank:
        return
    r.logger.truncate_after(start)
    (run_dir / "data_fingerprint.json").write_text(json.dumps(
        {"fingerprint": r.data.fingerprint, "stats": r.data.stats}, indent=2, default=str) + "\n")
    r.logger.update_summary(data_summary(r.data))
    if r.latest is not None:
        r.logger.event("resumed", step=start, checkpoint=r.latest.name, layout=r.layout, consumed_samples=r.consumed)
        if accepted:
            r.logger.event("resume_changes", step=start, changes=[
                {"key": k, "checkpoint": o, "recipe": n} for k, o, n in accepted])


def _save(r: _Run) -> Path:
    """A checkpoint of the run as it stands (`r.latest` then names it)."""
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import resume

    cfg = r.cfg
    state = ckpt.TrainState(step=r.step, consumed_samples=r.consumed, epoch=r.steps.epoch_of(r.consumed),
                            tokens_seen=r.tokens_seen, layout=r.layout, peft_method=cfg.peft.method,
                            data_fingerprint=r.data.fingerprint["combined"], base_model_fingerprint=r.fingerprint,
                            seed=cfg.run.seed, schedule=resume.schedule_record(cfg, r.total_steps),
                            settings=r.settings)
    r.latest = ckpt.save_checkpoint(r.run_dir, r.ddp, r.optimizer, state, r.trainable_only, cfg.checkpoint.keep_last)
    return r.latest


def _train(r: _Run) -> int:
    """Megatron-Core's schedule, one global batch per step: log, validate, checkpoint, and on a signal checkpoint
    and stop. Returns 0 when the run reached its last step, EXIT_REQUEUE when a signal stopped it."""
    from nemo_adapt.training import engine
    from nemo_adapt.training.signals import EXIT_REQUEUE

    cfg, seq, packed = r.cfg, r.cfg.data.seq_length, r.cfg.data.packing
    while r.step < r.total_steps:
        t0 = time.perf_counter()
        batches = r.steps.microbatches(r.consumed, r.info.dp_rank)
        lr = engine.lr_at(r.step, cfg, r.total_steps)
        loss, grad_norm, _ = engine.train_step(r.ddp, r.optimizer, batches, seq, r.plan.micro_batch_size, lr, packed)
        dt = time.perf_counter() - t0
        if dt < _MIN_STEP_SECONDS:  # test pacing only (see _MIN_STEP_SECONDS)
            time.sleep(_MIN_STEP_SECONDS - dt)
        # Non-padding tokens of the whole global batch: this rank's count x DP ranks (equal shares).
        step_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches) * r.info.data_parallel
        r.tokens_seen += step_tokens
        r.step += 1
        r.consumed += r.plan.global_batch_size
        if r.step % cfg.run.log_interval == 0 or r.step == r.total_steps:
            r.logger.log(r.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                  "train/tokens_per_s": step_tokens / dt, "train/step_time_s": dt,
                                  "train/trainable_params": r.n_trainable, "train/peak_memory_gib": _peak_memory_gib(),
                                  "train/tokens_seen": r.tokens_seen})
        if r.data.validation is not None and cfg.run.eval_interval and r.step % cfg.run.eval_interval == 0:
            r.logger.log(r.step, {"val/loss": engine.validation_loss(r.ddp, r.data.validation, r.plan, r.info.dp_rank,
                                                                     seq, cfg.run.eval_batches, packed)})
        if cfg.checkpoint.save_interval and r.step % cfg.checkpoint.save_interval == 0 and r.step < r.total_steps:
            _save(r)
        if r.preemption.requested():
            path = _save(r)
            r.logger.event("preempted", step=r.step, signal=r.preemption.signal_name or "peer", checkpoint=path.name)
            return EXIT_REQUEUE
    return 0


def _evaluate(r: _Run) -> dict:
    """The final checkpoint and artifact (adapter/ or model/), the validation loss, and the test split: the
    adapted model, and for PEFT the prompt-only baselines with adapters bypassed. Returns {label: result}."""
    from nemo_adapt.data.formats import load_records
    from nemo_adapt.eval.cli import baseline_records
    from nemo_adapt.eval.metrics import task_score
    from nemo_adapt.eval.runner import evaluate_baselines, evaluate_task, write_predictions
    from nemo_adapt.peft.base import adapters_disabled
    from nemo_adapt.peft.virtual_tokens import unwrap
    from nemo_adapt.training import engine

    cfg, results = r.cfg, {}
    # The bare GPTModel chunks (inside DDP and Float16Module): what generation and artifacts walk.
    module = [unwrap(c) for c in r.ddp] if len(r.ddp) > 1 else unwrap(r.ddp[0])
    _save(r)
    if r.trainable_only:
        from nemo_adapt.artifacts.adapter import save_adapter

        r.adapter_dir = save_adapter(module, r.run_dir / "adapter", cfg.peft, {
            "base_model": r.source.spec.name, "base_checkpoint": r.source.location,
            "base_model_fingerprint": r.fingerprint, "data_fingerprint": r.data.fingerprint["combined"],
            "run": cfg.run.name, "step": r.step})
    else:
        r.model_dir = _export_model(module, r.source.spec, r.source, r.run_dir, r.main_rank)
    if r.data.validation is not None:
        r.logger.log(r.step, {"val/loss": engine.validation_loss(r.ddp, r.data.validation, r.plan, r.info.dp_rank,
                                                                 cfg.data.seq_length, cfg.run.eval_batches,
                                                                 cfg.data.packing)})
    if not (cfg.eval.enabled and cfg.data.test):
        return results
    d = cfg.data
    # The adapted model is asked the way it was trained; the baseline gets the records' own instructions (they
    # differ only with data.replace_system_prompt).
    test = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, d.replace_system_prompt,
                        max_record_bytes=d.max_record_bytes, key="data.test")
    results["adapted"] = evaluate_task(module, r.tokenizer, r.source.spec, test, cfg.eval, label="adapted",
                                       over_length=d.over_length)
    if r.trainable_only and cfg.eval.baseline:
        baseline_test, train_records = baseline_records(cfg)
        with adapters_disabled(module):
            results.update(evaluate_baselines(module, r.tokenizer, r.source.spec, baseline_test, train_records,
                                              cfg.eval, cfg.run.seed, over_length=d.over_length))
    if r.main_rank:  # every record's prediction, for error analysis; results.json stays compact
        results = {k: write_predictions(v, r.run_dir / f"predictions_{k}.jsonl") for k, v in results.items()}
    summary = {f"eval/{k}_exact_match": v["exact_match"] for k, v in results.items()}
    summary.update({f"eval/{k}_{cfg.eval.metric}": task_score(v["metrics"], cfg.eval.metric)
                    for k, v in results.items()})
    r.logger.update_summary(summary)
    return results


def _write_results(r: _Run, results: dict, exit_code: int) -> None:
    """results.json (what ran, on what, with what outcome and sizes) and the console summary; main rank only."""
    from nemo_adapt.training import checkpoint as ckpt

    spec, final = r.source.spec, ckpt.latest_checkpoint(r.run_dir)
    adapter_dir, model_dir = r.adapter_dir, r.model_dir
    config = r.chunks[0].config
    record = {"step": r.step, "total_steps": r.total_steps, "exit_code": exit_code, "tokens_seen": r.tokens_seen,
              "trainable_params": r.n_trainable, "base_params": spec.num_parameters(),
              "checkpoint": final.name if final else None,
              "checkpoint_bytes": _dir_bytes(final) if final else None,
              "base_checkpoint_bytes": _dir_bytes(Path(r.source.location)),
              "base_fp32_bytes": 4 * spec.num_parameters(),
              "adapter_bytes": _dir_bytes(adapter_dir) if adapter_dir else None,
              "model_dir": str(model_dir) if model_dir else None,
              "model_bytes": _dir_bytes(model_dir) if model_dir else None, "eval": results,
              "data": {"fingerprint": r.data.fingerprint["combined"], "stats": r.data.stats,
                       "consumed_samples": r.consumed, "coverage": r.coverage},
              "base_model_fingerprint": r.fingerprint, "layout": r.layout,
              # What Megatron actually ran with (not only what the recipe asked for).
              "megatron": {"sequence_parallel": bool(config.sequence_parallel),
                           "params_dtype": str(config.params_dtype).removeprefix("torch."),
                           "fp8": config.fp8, "model_chunks": len(r.chunks)}}
    (r.run_dir / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    _print_results(results, r.run_dir, record, r.cfg.eval.metric)


def _describe_changes(changes, state, cfg, start_step: int, total_steps: int) -> str:
    """The console note for settings a resume changed on purpose (`checkpoint.resume_changes`)."""
    from nemo_adapt.training import engine, resume

    what = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)
    text = f"resuming with changed settings (checkpoint.resume_changes): {what}"
    if state.schedule is not None:
        old = resume.lr_of_schedule(state.schedule, start_step)
        new = engine.lr_at(start_step, cfg, total_steps)
        text += (f"\nlearning rate of step {start_step + 1}: {old:.6g} under the checkpoint's schedule "
                 f"({state.schedule['total_steps']} steps), {new:.6g} under the recipe's ({total_steps} steps)")
    return text


def _describe_coverage(c: dict, steps: int, gbs: int) -> str:
    """One line saying what the training steps of this run will read, and what they will not."""
    if steps <= 0:
        return "train plan: no steps left (the checkpoint has reached the recipe's duration)"
    text = (f"train plan: {steps} steps x {gbs} rows = {c['samples']} samples = {c['epochs']:g} epochs of "
            f"{c['rows']} rows; ")
    if c["rows_unseen"]:
        return text + f"{c['rows_unseen']} of {c['rows']} rows are not read by these steps"
    if c["min_times_seen"] == c["max_times_seen"]:
        return text + f"every row read {c['min_times_seen']} time(s)"
    return text + f"every row read {c['min_times_seen']} to {c['max_times_seen']} times"


def _sum_over_model_parallel(n: int) -> int:
    """Sum a per-rank count over the tensor- and pipeline-parallel ranks of one model replica."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([n], dtype=torch.int64)
    if dist.get_world_size() > 1:
        # Each DP replica holds a full copy; sum within one model-parallel group only.
        dist.all_reduce(t, group=ps.get_model_parallel_group())
    return int(t.item())


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _export_model(module, spec, source, run_dir: Path, main_rank: bool) -> Path:
    """A full fine-tuning result as a Hugging Face directory, RUN_DIR/model — what `adapter/` is for a PEFT run:
    the artifact `nemo-adapt eval --model`, `export`, `merge` and serving tools take. Written in the training
    parameters' dtype (float32 on CPU, bf16 on a GPU: no precision is invented); every rank calls it."""
    from nemo_adapt.models.builder import model_chunks
    from nemo_adapt.models.export import export_hf
    from nemo_adapt.tokenizer import tokenizer_if_any

    dtype = next(model_chunks(module)[0].parameters()).dtype
    tok = tokenizer_if_any(source.tokenizer_path, source.location, "run") if main_rank else None
    return export_hf(module, spec, run_dir / "model", tokenizer=tok, dtype=dtype)


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _print_results(results: dict, run_dir: Path, record: dict, metric: str) -> None:
    from nemo_adapt.eval.runner import describe_result

    for key, r in results.items():
        label = r["label"] + (" (best)" if key == "baseline" and len(results) > 2 else "")
        print(f"{label:>22}: {describe_result(r, metric)}", flush=True)
    if "adapted" in results and "baseline" in results and results["baseline"]["exact_match"] > 0:
        ratio = results["adapted"]["exact_match"] / results["baseline"]["exact_match"]
        print(f"{'improvement':>22}: {ratio:.1f}x the baseline", flush=True)
    if record.get("adapter_bytes"):
        share = record["adapter_bytes"] / record["base_fp32_bytes"]
        print(f"{'adapter':>22}: {record['adapter_bytes'] / 2**20:.1f} MiB = {100 * share:.1f}% of the base "
              f"model in fp32 ({record['base_fp32_bytes'] / 2**20:.0f} MiB)", flush=True)
    if record.get("checkpoint_bytes"):
        print(f"{'resume checkpoint':>22}: {record['checkpoint_bytes'] / 2**20:.1f} MiB (with optimizer state)",
              flush=True)
    print(f"{'run directory':>22}: {run_dir}", flush=True)


def register(sub) -> None:
    p = sub.add_parser("run", help="train (and evaluate) a recipe; resumes an existing run directory")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch_size=2")
    p.set_defaults(func=lambda args: run(args.recipe, args.overrides))

