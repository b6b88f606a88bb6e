"""The trainer's recipe checks that need neither weights nor data: one function for every caller.

`check_recipe(cfg, spec, world_size, target)` runs in `nemo-adapt run` (against this machine) and in
`nemo-adapt launch --dry-run` / the planner-side launch check (against the recipe's `cluster:` section,
with the architecture taken from the model registry), so a recipe the trainer would refuse is refused
on the login node too, with the same message.

A `Target` says what the ranks will run on: GPU or CPU, FP8 tensor cores, Transformer Engine. Every
check names the key, the value and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_adapt.errors import ConfigError, ParallelLayoutError

FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x)."""


@dataclass(frozen=True)
class Target:
    """What the training ranks run on."""

    gpu: str | None
    """GPU name (CUDA device name or the planner catalog's key); None for CPU ranks."""
    fp8: bool
    """The GPU has FP8 tensor cores (compute capability >= 8.9)."""
    transformer_engine: bool
    """Transformer Engine imports where the ranks run (NGC containers ship it)."""
    where: str
    """How to name the target in messages ("this machine (CPU only)", "cluster.gpu=h100-80gb ...")."""

    @classmethod
    def here(cls) -> Target:
        """This process's machine: the current CUDA device, or the CPU."""
        import torch

        from nemo_adapt.models.builder import have_transformer_engine

        if not torch.cuda.is_available():
            return cls(None, False, False, "this machine (CPU only, no GPU)")
        name = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
        te = have_transformer_engine()
        return cls(name, tuple(cap) >= FP8_MIN_CAPABILITY, te,
                   f"this machine ({name}, compute capability {cap[0]}.{cap[1]}, Transformer Engine "
                   f"{'importable' if te else 'not importable'})")

    @classmethod
    def cluster(cls, gpu: str | None, container: str | None) -> Target:
        """The recipe's cluster: `gpu` from the planner's catalog (None: CPU nodes); Transformer Engine is
        assumed inside a container image (NGC images ship it) and absent on bare metal (`none`), where
        our own virtual environment is used and does not install it."""
        if gpu is None:
            return cls(None, False, False, "CPU nodes (cluster.gpu unset)")
        from nemo_adapt.planner.gpus import get_gpu

        spec = get_gpu(gpu)
        te = bool(container) and container != "none"
        how = f"container {container}" if te else "bare metal (no container: Transformer Engine not installed)"
        return cls(spec.name, spec.fp8_tflops is not None, te, f"cluster.gpu={spec.name} ({spec.description}, {how})")


def check_recipe(cfg, spec, world_size: int, target: Target) -> None:
    """Refuse a recipe the trainer cannot run as written on `target` with `world_size` ranks.

    Args:
        cfg: the validated `RecipeConfig`.
        spec: the base model's `ModelSpec` (from the checkpoint, or the registry for a dry run).
        world_size: ranks the job launches.
        target: what the ranks run on.

    Raises:
        ConfigError / ParallelLayoutError: the first problem, with the key, value and what would work.
    """
    from nemo_adapt.models.builder import check_layout
    from nemo_adapt.peft.base import get_peft_method
    from nemo_adapt.training.engine import BatchPlan

    p, t, d = cfg.parallel, cfg.train, cfg.data
    method = get_peft_method(cfg.peft.method)
    if method is not None:
        method.check_recipe(cfg.peft, cfg, spec)  # e.g. virtual tokens need room and no packing
    check_layout(spec, p.tensor, p.pipeline, p.virtual_pipeline)
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ParallelLayoutError(
            f"{world_size} processes cannot hold tensor x pipeline x context = {p.tensor} x {p.pipeline} x "
            f"{p.context} = {model_parallel}; launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    microbatches = BatchPlan(t.global_batch_size, t.micro_batch_size, dp).num_microbatches  # raises if uneven
    if p.virtual_pipeline and microbatches % p.pipeline:
        # Megatron's interleaved schedule runs micro-batches in groups of PP per model chunk.
        raise ConfigError(
            f"parallel.virtual_pipeline={p.virtual_pipeline} runs micro-batches in groups of parallel.pipeline="
            f"{p.pipeline}, but a step has {microbatches} per rank (train.global_batch_size={t.global_batch_size} "
            f"/ (micro_batch_size {t.micro_batch_size} x data-parallel {dp})); use a multiple of {p.pipeline}")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel=true shards activations over the tensor-parallel group, "
                          "which needs parallel.tensor > 1; set it to false at parallel.tensor=1")
    if d.seq_length > spec.max_position_embeddings:
        raise ConfigError(f"data.seq_length={d.seq_length} exceeds the model's context of "
                          f"{spec.max_position_embeddings} tokens")
    if p.context > 1:
        if not target.transformer_engine:
            raise ConfigError(
                f"parallel.context={p.context} needs Transformer Engine attention (Megatron-Core runs context-"
                f"parallel ring attention there; its local attention refuses it), which {target.where} lacks; "
                "set parallel.context=1")
        if d.seq_length % (2 * p.context):
            raise ConfigError(
                f"data.seq_length={d.seq_length} must be divisible by 2 x parallel.context = {2 * p.context} "
                "(each sequence is cut into 2 x CP chunks, two per rank, to balance causal attention)")
        if d.packing:
            raise ConfigError(
                f"parallel.context={p.context} with data.packing=true is not supported: packed rows under context "
                "parallelism need each example padded to a multiple of 2 x CP and THD partitioning; set "
                "data.packing=false or parallel.context=1")
        if method is not None and not method.supports_context_parallel:
            raise ConfigError(
                f"peft.method={cfg.peft.method} cannot run with parallel.context={p.context}: "
                f"{method.context_parallel_note}; set parallel.context=1")
    if t.precision == "fp8":
        missing = []
        if target.gpu is None:
            missing.append("a GPU")
        elif not target.fp8:
            missing.append(f"FP8 tensor cores (compute capability 8.9+: H100, H200, L40S, B200; {target.gpu} has none)")
        if not target.transformer_engine:
            missing.append("Transformer Engine")
        if missing:
            raise ConfigError(f"train.precision='fp8' needs {' and '.join(missing)}, which {target.where} lacks; "
                              "use train.precision=bf16")


def check_test_split(cfg, source, tokenizer=None, announce: bool = True) -> dict:
    """Validate what evaluation will read after training, before training starts.

    The test split is read (a bad record raises with its file:line, as for training data), every
    prompt is tokenized the way evaluation will ask it — for the adapted model and, when the
    prompt-only baseline runs, with its few-shot examples — and measured against the model's
    context minus `eval.max_new_tokens` (and any virtual tokens). Prompts over that budget get the
    training data's `data.over_length` policy (see `eval.runner.fit_prompts`), named and counted
    now rather than discovered when the model has been trained.

    Args:
        cfg: the validated `RecipeConfig`.
        source: the opened base checkpoint (`models.loader.CheckpointSource`).
        tokenizer: its tokenizer (loaded from the checkpoint when None).
        announce: print a warning line for prompts the policy changes.

    Returns:
        {label: fit report} for `adapted` and (when it runs) `baseline`; empty without evaluation.

    Raises:
        DataError / ConfigError: a bad test record, no room for a prompt, (with data.over_length=drop) no
            prompt that fits, or a per-field eval.metric the answers cannot give.
    """
    from nemo_adapt.data.formats import load_records
    from nemo_adapt.eval.metrics import check_task_metric
    from nemo_adapt.eval.runner import (
        baseline_shots,
        describe_fit,
        encode_test_prompts,
        fit_prompts,
        prompt_budget,
    )
    from nemo_adapt.peft.base import get_peft_method
    from nemo_adapt.tokenizer import load_tokenizer

    d, e = cfg.data, cfg.eval
    if not (e.enabled and d.test):
        return {}
    tokenizer = tokenizer or load_tokenizer(source.tokenizer_path)
    method = get_peft_method(cfg.peft.method)
    n_virtual = method.context_tokens(cfg.peft) if method is not None else 0  # prompt / p-tuning positions
    context = source.spec.max_position_embeddings
    limit = e.max_examples or None
    reports = {}
    test = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, d.replace_system_prompt,
                        max_record_bytes=d.max_record_bytes, key="data.test")[:limit]
    check_task_metric(e.metric, [r.answer for r in test], d.test)
    _, _, reports["adapted"] = fit_prompts(encode_test_prompts(tokenizer, test), test,
                                           prompt_budget(context, e.max_new_tokens, n_virtual), d.over_length)
    if cfg.peft.method != "none" and e.baseline:
        base = load_records(d.test, d.format, d.on_bad_record, d.system_prompt, max_record_bytes=d.max_record_bytes,
                            warn=False)[:limit]
        shots = []
        if e.baseline_few_shot:
            train = load_records(d.train, d.format, "skip", d.system_prompt, max_record_bytes=d.max_record_bytes,
                                 warn=False)
            shots = baseline_shots(train, e.baseline_few_shot, cfg.run.seed)
        _, _, reports["baseline"] = fit_prompts(encode_test_prompts(tokenizer, base, shots), base,
                                                prompt_budget(context, e.max_new_tokens), d.over_length,
                                                split="data.test (prompt-only baseline)")
    if announce:
        for label, report in reports.items():
            line = describe_fit(report, "data.test" if label == "adapted" else "data.test (prompt-only baseline)")
            if line:
                print(line, flush=True)
    return reports
