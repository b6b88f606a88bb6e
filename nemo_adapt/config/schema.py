"""The recipe schema: one typed dataclass per YAML section; keys map 1:1 onto fields.

Every field carries a one-line docstring (shown by `nemo-adapt config --help` style tools and in
error messages); `__post_init__` validates values and names the key, the value and what is allowed.
The `peft` section's class depends on `peft.method` and comes from the PEFT registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig
from nemo_adapt.validation import check_choice, check_positive


@dataclass
class RunConfig:
    """What this run is called, where it writes, how long it trains."""

    name: str = "run"
    """Run name: the run directory and the W&B run name default to it."""
    output_dir: str | None = None
    """Run directory (default: runs/<name>). Running again on an existing one resumes it."""
    seed: int = 1234
    """Seed for weights of new modules, data order and dropout; same seed, same run."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: use max_epochs)."""
    max_epochs: float | None = 1.0
    """Stop after this many passes over the training data (used when max_steps is None)."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    eval_interval: int = 0
    """Compute validation loss every this many steps (0: only at the end)."""
    eval_batches: int | None = None
    """Validation batches per evaluation (None: the whole validation split)."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name={self.name!r} must be a non-empty name without '/'")
        if self.max_steps is not None:
            check_positive("run.max_steps", self.max_steps)
        if self.max_steps is None and self.max_epochs is None:
            raise ConfigError("set run.max_steps or run.max_epochs (both are None)")
        if self.max_epochs is not None:
            check_positive("run.max_epochs", self.max_epochs, integer=False)
        check_positive("run.log_interval", self.log_interval)
        check_positive("run.eval_interval", self.eval_interval, allow_zero=True)
        if self.eval_batches is not None:
            check_positive("run.eval_batches", self.eval_batches)


@dataclass
class ModelConfig:
    """The base model."""

    name: str = "smollm2_135m"
    """Registered architecture (`nemo-adapt models` lists them)."""
    checkpoint: str = "embedded:smollm2_135m"
    """Weights: a Hugging Face directory, a .gguf file, or `embedded:smollm2_135m`."""


@dataclass
class DataConfig:
    """Training data: JSONL files in chat (`messages`) or prompt/completion (`input`/`output`) form."""

    train: str = ""
    """Training split (JSONL)."""
    validation: str | None = None
    """Validation split (JSONL) for validation loss; None: no validation."""
    test: str | None = None
    """Test split (JSONL) for the task evaluation after training; never trained on."""
    format: str = "auto"
    """`chat`, `prompt_completion`, or `auto` (decided per file from the first record)."""
    seq_length: int = 2048
    """Tokens per training row (after packing)."""
    packing: bool = False
    """Pack several examples per row; attention stays within each example."""
    over_length: str = "truncate"
    """Examples longer than seq_length: `truncate` (keep the start) or `drop`; either is counted."""
    on_bad_record: str = "error"
    """Malformed line, missing field, empty answer or too large record: `error` (names file and line) or
    `skip` (counted per reason, with the first line numbers, in a warning on the console and the stats)."""
    max_record_bytes: int = 1 << 20
    """Longest record in bytes of its JSONL line (default 1 MiB); a longer one is refused before it is
    parsed, naming its file:line (or, with on_bad_record=skip, counted as `too_large`). Without a limit
    one runaway line (a log dump, an inlined file) took minutes and tens of GiB to parse and tokenize
    before being truncated to seq_length anyway. 1 MiB of JSON is ~250k tokens of English, beyond
    any seq_length here; raise it for long-context data with heavily escaped (e.g. CJK as \\uXXXX) text."""
    system_prompt: str | None = None
    """System message added to prompt/completion examples (and to chats that have none)."""
    replace_system_prompt: bool = False
    """Use `system_prompt` in place of the records' own system messages, in training and in the adapted
    model's evaluation; the prompt-only baseline keeps the records' instructions. Fine-tuning teaches
    the instructions, so the adapted model can serve with a short prompt (fewer tokens per request)."""
    shuffle: bool = True
    """Shuffle training examples each epoch (deterministic for a seed)."""
    cache_dir: str | None = None
    """Tokenized-data cache (default: $NEMO_ADAPT_CACHE/datasets); reused only on a fingerprint match."""

    def __post_init__(self):
        check_choice("data.format", self.format, ("auto", "chat", "prompt_completion"))
        check_positive("data.seq_length", self.seq_length)
        check_choice("data.over_length", self.over_length, ("truncate", "drop"))
        check_choice("data.on_bad_record", self.on_bad_record, ("error", "skip"))
        check_positive("data.max_record_bytes", self.max_record_bytes)
        if self.replace_system_prompt and self.system_prompt is None:
            raise ConfigError("data.replace_system_prompt=true needs data.system_prompt (the text that replaces "
                              "each record's system message)")


@dataclass
class ParallelConfig:
    """How the model and batch are split over GPUs (data parallel is what is left over)."""

    tensor: int = 1
    """Tensor-parallel size (divides heads, KV heads and FFN size; within a node)."""
    pipeline: int = 1
    """Pipeline-parallel size (divides the layers)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (None: not interleaved)."""
    context: int = 1
    """Context-parallel size (sequence split in attention)."""
    sequence_parallel: bool = False
    """Shard norm/dropout activations over the TP group along the sequence (GPU, TP > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state (and fp32 master weights) over data-parallel ranks."""
    recompute: str | None = None
    """Activation recompute: None, `selective` (attention core) or `full` (whole layers)."""

    def __post_init__(self):
        for key in ("tensor", "pipeline", "context"):
            check_positive(f"parallel.{key}", getattr(self, key))
        if self.virtual_pipeline is not None:
            check_positive("parallel.virtual_pipeline", self.virtual_pipeline)
            if self.pipeline == 1:
                raise ConfigError(f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline > 1; "
                                  "set parallel.virtual_pipeline=null at parallel.pipeline=1")
            if self.virtual_pipeline == 1:
                raise ConfigError("parallel.virtual_pipeline=1 is one model chunk per rank, the plain 1F1B "
                                  "schedule: set it to null, or to 2 or more to interleave")
        check_choice("parallel.recompute", self.recompute, (None, "selective", "full"))


@dataclass
class TrainConfig:
    """Batching and numerics."""

    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bf16`, `fp8` (Transformer Engine), or `fp32`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self):
        check_positive("train.global_batch_size", self.global_batch_size)
        check_positive("train.micro_batch_size", self.micro_batch_size)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp8", "fp32"))
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True, integer=False)


@dataclass
class OptimConfig:
    """AdamW with warmup and decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """Decay after warmup: `cosine` or `linear` to min_lr over the remaining steps, `constant`, or `wsd`
    (warmup-stable-decay: hold lr, then decay linearly to min_lr over the last `decay_steps`)."""
    decay_steps: int = 0
    """`wsd` only: length of the final decay in steps (0: the last fifth of the steps after warmup)."""

    def __post_init__(self):
        check_positive("optim.lr", self.lr, integer=False)
        check_positive("optim.min_lr", self.min_lr, allow_zero=True, integer=False)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is larger than optim.lr={self.lr}")
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True, integer=False)
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"optim.{key}={value!r} must be in [0, 1)")
        check_positive("optim.adam_eps", self.adam_eps, integer=False)
        check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("optim.schedule", self.schedule, ("cosine", "linear", "constant", "wsd"))
        check_positive("optim.decay_steps", self.decay_steps, allow_zero=True)
        if self.decay_steps and self.schedule != "wsd":
            raise ConfigError(f"optim.decay_steps={self.decay_steps} applies to optim.schedule=wsd only "
                              f"(schedule is {self.schedule!r})")


@dataclass
class CheckpointConfig:
    """When to save and how to resume."""

    save_interval: int = 0
    """Save every this many steps (0: only at the end and on preemption signals)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """`auto`: resume from the run directory's latest complete checkpoint if any; `never`: refuse a used run directory."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (Slurm preemption, time limit) save a checkpoint at the next step boundary and stop."""
    resume_changes: list[str] = field(default_factory=list)
    """Settings a resume may change from the checkpoint's, e.g. `[run.max_steps]`, `[train.global_batch_size]`,
    a section (`optim`, `peft`) or `data` (changed training data); any other change is refused."""

    def __post_init__(self):
        check_positive("checkpoint.save_interval", self.save_interval, allow_zero=True)
        check_positive("checkpoint.keep_last", self.keep_last)
        check_choice("checkpoint.resume", self.resume, ("auto", "never"))
        if not isinstance(self.resume_changes, list) or not all(
                isinstance(k, str) and k.strip() for k in self.resume_changes):
            raise ConfigError(f"checkpoint.resume_changes={self.resume_changes!r} must be a list of setting names, "
                              "e.g. [run.max_steps]")


@dataclass
class LoggingConfig:
    """Weights & Biases and local metrics."""

    wandb_project: str = "nemo-adapt"
    """W&B project (env WANDB_PROJECT overrides)."""
    wandb_entity: str | None = None
    """W&B entity/team (env WANDB_ENTITY overrides)."""
    wandb_name: str | None = None
    """W&B run name (default: run.name)."""
    wandb_group: str | None = None
    """W&B group, e.g. a sweep name (env WANDB_RUN_GROUP overrides)."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags (env WANDB_TAGS, comma-separated, adds to them)."""
    wandb_mode: str = "auto"
    """`auto` (online when WANDB_API_KEY is set, offline otherwise), `online`, `offline`, `disabled`."""
    progress_bar: str = "auto"
    """Progress bar with ETA: `auto` (only on an interactive terminal), `always`, `never`."""
    loss_curve: bool = True
    """Write loss_curve.png in the run directory at the end."""

    def __post_init__(self):
        check_choice("logging.wandb_mode", self.wandb_mode, ("auto", "online", "offline", "disabled"))
        check_choice("logging.progress_bar", self.progress_bar, ("auto", "always", "never"))


@dataclass
class EvalConfig:
    """Task evaluation on the test split after training, against a prompt-only baseline."""

    enabled: bool = True
    """Evaluate after training (needs data.test)."""
    metric: str = "exact_match"
    """The task metric a model is judged by (every one is reported, each with a 95% bootstrap interval):
    `exact_match` (whitespace- and case-normalised), `token_f1` (SQuAD token overlap), `field_accuracy` (mean over
    the fields of `key: value` answers) or `label_accuracy` (mean over label fields, lenient: the answer names
    exactly one allowed label). It picks the best prompt-only baseline."""
    max_new_tokens: int = 32
    """Generation budget per test example."""
    batch_size: int = 16
    """Prompts generated together."""
    baseline: bool = True
    """Also score the prompt-only baseline: the base model (adapters bypassed) given the instructions."""
    baseline_few_shot: int = 0
    """k > 0: a k-shot prompt-only baseline (k worked examples from the training split, seeded by run.seed) is
    scored beside the zero-shot one and the better is the baseline (0: zero-shot only)."""
    max_examples: int | None = None
    """Evaluate at most this many test examples (None: all)."""

    def __post_init__(self):
        from nemo_adapt.eval.metrics import METRICS

        check_choice("eval.metric", self.metric, METRICS)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.batch_size", self.batch_size)
        check_positive("eval.baseline_few_shot", self.baseline_few_shot, allow_zero=True)
        if self.max_examples is not None:
            check_positive("eval.max_examples", self.max_examples)


@dataclass
class ClusterConfig:
    """Hardware the recipe was sized for (used by `plan` and `launch`)."""

    gpu: str | None = None
    """GPU type from the planner's catalog (h100-80gb, ...); None for CPU recipes."""
    nodes: int = 1
    """Nodes."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""

    def __post_init__(self):
        check_positive("cluster.nodes", self.nodes)
        check_positive("cluster.gpus_per_node", self.gpus_per_node)


@dataclass
class RecipeConfig:
    """A whole recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    """Name, output directory, seed, duration."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenization."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Adaptation method (`method: none` = full fine-tuning) and its settings."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching and numerics."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B and local metrics."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Task evaluation."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Hardware the recipe was sized for."""
