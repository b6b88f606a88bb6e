"""`nemo-adapt run RECIPE [key=value ...]`: the training entry, top to bottom.

    setup     check every input, start process groups, data, model + PEFT, optimizer, resume
    train     Megatron-Core schedule per step; log, validate, checkpoint, stop on a signal
    evaluate  test split: adapted model vs prompt-only baseline (exact match)
    cleanup   final checkpoint, the adapter (PEFT) or model/ (full fine-tuning), results, loss curve, W&B finish

Runs as one process or under torchrun/srun (one process per GPU, or per CPU rank over gloo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

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


def run(recipe: str, overrides: list[str]) -> int:
    from nemo_adapt.config import config_to_dict, load_recipe, resolve_run_dir, save_resolved
    from nemo_adapt.data import build_datasets
    from nemo_adapt.data.dataset import data_summary, print_data_report
    from nemo_adapt.data.formats import load_records
    from nemo_adapt.eval.cli import baseline_records
    from nemo_adapt.eval.metrics import task_score
    from nemo_adapt.eval.runner import evaluate_baselines, evaluate_task, write_predictions
    from nemo_adapt.logging import RunLogger
    from nemo_adapt.models.builder import BuildOptions
    from nemo_adapt.models.loader import base_fingerprint, load_model_chunks
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import adapters_disabled, apply_peft, trainable_parameters
    from nemo_adapt.peft.virtual_tokens import unwrap
    from nemo_adapt.tokenizer import load_tokenizer
    from nemo_adapt.training import checkpoint as ckpt
    from nemo_adapt.training import engine, resume
    from nemo_adapt.training.signals import EXIT_REQUEUE, PreemptionHandler, RunInterrupted

    # ---------------------------------------------------------------- setup
    cfg = load_recipe(recipe, overrides)
    source, start_adapter = preflight(cfg, _world_size())
    run_dir = resolve_run_dir(cfg)
    latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is not None and cfg.checkpoint.resume == "never":
        raise ConfigError(f"run directory {str(run_dir)!r} already holds checkpoint {latest.name} and "
                          "checkpoint.resume=never; choose another run.name or set checkpoint.resume=auto")
    state = ckpt.read_state(latest) if latest is not None else None
    settings, accepted = resume.resume_settings(cfg), []
    if state is not None:
        # Before any expensive work: a resume that would silently change the run is refused here.
        # A run length in steps is known now; one in epochs only with the data (checked below).
        sched = resume.schedule_change(state.schedule, state.settings, cfg, state.step, cfg.run.max_steps) \
            if cfg.run.max_steps else None
        accepted = resume.check_settings(state.settings, settings, cfg.checkpoint.resume_changes, str(latest),
                                         schedule=sched)
    preemption = PreemptionHandler(enabled=cfg.checkpoint.save_on_signal)

    p = cfg.parallel
    info = runtime.initialize(runtime.ParallelLayout(tensor=p.tensor, pipeline=p.pipeline,
                                                     virtual_pipeline=p.virtual_pipeline, context=p.context,
                                                     sequence_parallel=p.sequence_parallel), seed=cfg.run.seed)
    main_rank = info.rank == 0

    tokenizer = load_tokenizer(source.tokenizer_path)
    # Rank 0 tokenizes and fills the cache; the others then read it (same fingerprint). SIGTERM/SIGINT
    # here end the run at once (nothing to checkpoint yet; the run directory does not exist yet).
    try:
        with preemption.interrupt_on_signal("data preparation"):
            if main_rank:
                print(f"preparing data: data.train={cfg.data.train!r}", flush=True)
                data = build_datasets(cfg.data, tokenizer, cfg.run.seed)
            dist.barrier()
            if not main_rank:
                data = build_datasets(cfg.data, tokenizer, cfg.run.seed)
    except RunInterrupted as err:
        print(f"nemo-adapt run: {err}", file=sys.stderr, flush=True)
        preemption.restore()
        runtime.shutdown()
        return err.exit_code
    if main_rank:
        print_data_report(data)  # stats per split, and a warning naming any skipped records
    seq = cfg.data.seq_length

    dtype = engine.resolve_dtype(cfg.train.precision)
    options = BuildOptions(params_dtype=dtype, sequence_parallel=p.sequence_parallel, recompute=p.recompute,
                           fp8=cfg.train.precision == "fp8", packed_sequences=cfg.data.packing,
                           context_parallel=p.context)
    # One chunk per virtual-pipeline stage this rank holds (one without an interleaved pipeline).
    chunks, source = load_model_chunks(source, options=options)
    spec = source.spec
    chunks[0].config.calculate_per_token_loss = True  # one TransformerConfig, shared by the chunks
    methods = [apply_peft(c, cfg.peft, seed=cfg.run.seed, tokenizer=tokenizer) for c in chunks]
    method = methods[0]
    if start_adapter is not None and state is None:  # a resume continues from its checkpoint instead
        from nemo_adapt.artifacts.adapter import apply_adapter

        apply_adapter(chunks, start_adapter)
        if main_rank:
            print(f"adapter starts from peft.init_from={cfg.peft.init_from!r} ({start_adapter.files.format}, "
                  f"{len(start_adapter.tensors)} tensors)", flush=True)
    n_trainable = _sum_over_model_parallel(trainable_parameters(chunks, unique=True))
    ddp = engine.wrap_ddp(chunks, cfg)
    optimizer = engine.build_optimizer(ddp, cfg, method.lr_multipliers() if method else None)
    engine.connect_schedule_hooks(ddp, optimizer)
    packed = cfg.data.packing

    plan = engine.BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, info.data_parallel)
    steps = engine.StepData(data.train, plan, cfg.run.seed)
    # The data position is a sample count: it stays exact if the global batch size changed.
    start_step, consumed = (state.step, state.consumed_samples) if state else (0, 0)
    total_steps = cfg.run.max_steps or start_step + steps.steps_for_epochs(cfg.run.max_epochs, consumed)
    if state is not None and not cfg.run.max_steps:  # a run length in epochs must not re-shape the LR schedule
        accepted += resume.check_schedule(state.schedule, state.settings, cfg, start_step, total_steps,
                                          cfg.checkpoint.resume_changes, str(latest))
    if data.validation is not None and len(data.validation) < plan.global_batch_size:
        raise ConfigError(f"the validation split has {len(data.validation)} rows, fewer than "
                          f"train.global_batch_size={plan.global_batch_size}")
    trainable_only = cfg.peft.method != "none"
    fingerprint = base_fingerprint(source)
    layout = {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
              "context": p.context, "data": info.data_parallel}

    tokens_seen = 0
    if state is not None:
        if state.base_model_fingerprint != fingerprint:
            raise ConfigError(f"checkpoint {str(latest)!r} was trained on base model {state.base_model_fingerprint}, "
                              f"but model.checkpoint is {fingerprint}")
        if state.peft_method != cfg.peft.method:
            raise ConfigError(f"checkpoint {str(latest)!r} was trained with peft.method={state.peft_method!r}, "
                              f"the recipe now says {cfg.peft.method!r}")
        new_data = data.fingerprint["combined"]
        if state.data_fingerprint != new_data:
            accepted += resume.check_settings(None, settings, cfg.checkpoint.resume_changes, str(latest),
                                              data_changed=(state.data_fingerprint, new_data))
        ckpt.load_checkpoint(latest, ddp, optimizer, trainable_only, same_layout=state.layout == layout)
        tokens_seen = state.tokens_seen
        if accepted and main_rank:
            print(_describe_changes(accepted, state, cfg, start_step, total_steps), flush=True)
    coverage = steps.coverage(consumed, consumed + (total_steps - start_step) * plan.global_batch_size)
    if main_rank:
        print(_describe_coverage(coverage, total_steps - start_step, plan.global_batch_size), flush=True)

    # Only now, with data, model and any checkpoint validated, does the run directory come to exist:
    # a bad input leaves nothing behind (and never touches an existing run's checkpoints).
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_interrupted(run_dir)
        save_resolved(cfg, run_dir / "config.yaml")
    dist.barrier()

    logger = RunLogger(cfg.logging, run_dir, cfg.run.name, config_to_dict(cfg), is_main=main_rank,
                       total_steps=total_steps, start_step=start_step)
    if main_rank:
        logger.truncate_after(start_step)
        (run_dir / "data_fingerprint.json").write_text(json.dumps(
            {"fingerprint": data.fingerprint, "stats": data.stats}, indent=2, default=str) + "\n")
        logger.update_summary(data_summary(data))
        if latest is not None:
            logger.event("resumed", step=start_step, checkpoint=latest.name, layout=layout,
                         consumed_samples=consumed)
            if accepted:
                logger.event("resume_changes", step=start_step, changes=[
                    {"key": k, "checkpoint": o, "recipe": n} for k, o, n in accepted])

    def save(step: int) -> Path:
        state = ckpt.TrainState(step=step, consumed_samples=consumed, epoch=steps.epoch_of(consumed),
                                tokens_seen=tokens_seen, layout=layout, peft_method=cfg.peft.method,
                                data_fingerprint=data.fingerprint["combined"], base_model_fingerprint=fingerprint,
                                seed=cfg.run.seed, schedule=resume.schedule_record(cfg, total_steps),
                                settings=settings)
        return ckpt.save_checkpoint(run_dir, ddp, optimizer, state, trainable_only, cfg.checkpoint.keep_last)

    # ---------------------------------------------------------------- train
    exit_code = 0
    step = start_step
    while step < total_steps:
        t0 = time.perf_counter()
        batches = steps.microbatches(consumed, info.dp_rank)
        lr = engine.lr_at(step, cfg, total_steps)
        loss, grad_norm, _ = engine.train_step(ddp, optimizer, batches, seq, plan.micro_batch_size, lr, packed)
        dt = time.perf_counter() - t0
        if dt < _MIN_STEP_SECONDS:  # test pacing only (see _MIN_STEP_SECONDS)
            time.sleep(_MIN_STEP_SECONDS - dt)
        # Non-padding tokens of the whole global batch: this rank's count x DP ranks (equal shares).
        step_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches) * info.data_parallel
        tokens_seen += step_tokens
        step += 1
        consumed += plan.global_batch_size
        if step % cfg.run.log_interval == 0 or step == total_steps:
            logger.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                              "train/tokens_per_s": step_tokens / dt, "train/step_time_s": dt,
                              "train/trainable_params": n_trainable, "train/peak_memory_gib": _peak_memory_gib(),
                              "train/tokens_seen": tokens_seen})
        if data.validation is not None and cfg.run.eval_interval and step % cfg.run.eval_interval == 0:
            logger.log(step, {"val/loss": engine.validation_loss(ddp, data.validation, plan, info.dp_rank, seq,
                                                                 cfg.run.eval_batches, packed)})
        if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step < total_steps:
            save(step)
        if preemption.requested():
            path = save(step)
            logger.event("preempted", step=step, signal=preemption.signal_name or "peer", checkpoint=path.name)
            exit_code = EXIT_REQUEUE
            break

    # ---------------------------------------------------------------- evaluate
    results = {}
    adapter_dir = model_dir = None
    # The bare GPTModel chunks (inside DDP and Float16Module): what generation and artifacts walk.
    module = [unwrap(c) for c in ddp] if len(ddp) > 1 else unwrap(ddp[0])
    if exit_code == 0:
        save(step)
        if trainable_only:
            from nemo_adapt.artifacts.adapter import save_adapter

            adapter_dir = save_adapter(module, run_dir / "adapter", cfg.peft, {
                "base_model": spec.name, "base_checkpoint": source.location,
                "base_model_fingerprint": fingerprint, "data_fingerprint": data.fingerprint["combined"],
                "run": cfg.run.name, "step": step})
        else:
            model_dir = _export_model(module, spec, source, run_dir, main_rank)
        if data.validation is not None:
            logger.log(step, {"val/loss": engine.validation_loss(ddp, data.validation, plan, info.dp_rank, seq,
                                                                 cfg.run.eval_batches, packed)})
        if cfg.eval.enabled and cfg.data.test:
            d = cfg.data
            # The adapted model is asked the way it was trained; the baseline gets the records' own
            # instructions (they differ only with data.replace_system_prompt).
            test = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, d.replace_system_prompt,
                                max_record_bytes=d.max_record_bytes, key="data.test")
            results["adapted"] = evaluate_task(module, tokenizer, spec, test, cfg.eval, label="adapted",
                                               over_length=d.over_length)
            if trainable_only and cfg.eval.baseline:
                baseline_test, train_records = baseline_records(cfg)
                with adapters_disabled(module):
                    results.update(evaluate_baselines(module, tokenizer, spec, baseline_test, train_records, cfg.eval,
                                                      cfg.run.seed, over_length=d.over_length))
            if main_rank:  # every record's prediction, for error analysis; results.json stays compact
                results = {k: write_predictions(v, run_dir / f"predictions_{k}.jsonl") for k, v in results.items()}
            summary = {f"eval/{k}_exact_match": v["exact_match"] for k, v in results.items()}
            summary.update({f"eval/{k}_{cfg.eval.metric}": task_score(v["metrics"], cfg.eval.metric)
                            for k, v in results.items()})
            logger.update_summary(summary)

    # ---------------------------------------------------------------- cleanup
    if main_rank:
        final = ckpt.latest_checkpoint(run_dir)
        record = {"step": step, "total_steps": total_steps, "exit_code": exit_code, "tokens_seen": tokens_seen,
                  "trainable_params": n_trainable, "base_params": spec.num_parameters(),
                  "checkpoint": final.name if final else None,
                  "checkpoint_bytes": _dir_bytes(final) if final else None,
                  "base_checkpoint_bytes": _dir_bytes(Path(source.location)),
                  "base_fp32_bytes": 4 * spec.num_parameters(),
                  "adapter_bytes": _dir_bytes(adapter_dir) if adapter_dir else None,
                  "model_dir": str(model_dir) if model_dir else None,
                  "model_bytes": _dir_bytes(model_dir) if model_dir else None, "eval": results,
                  "data": {"fingerprint": data.fingerprint["combined"], "stats": data.stats,
                           "consumed_samples": consumed, "coverage": coverage},
                  "base_model_fingerprint": fingerprint, "layout": layout,
                  # What Megatron actually ran with (not only what the recipe asked for).
                  "megatron": {"sequence_parallel": bool(chunks[0].config.sequence_parallel),
                               "params_dtype": str(chunks[0].config.params_dtype).removeprefix("torch."),
                               "fp8": chunks[0].config.fp8, "model_chunks": len(chunks)}}
        (run_dir / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _print_results(results, run_dir, record, cfg.eval.metric)
    logger.close(exit_code)
    preemption.restore()
    runtime.shutdown()
    return exit_code


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

