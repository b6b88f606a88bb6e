"""Per-GPU memory of a fine-tuning job on Megatron-Core, term by term, for the worst pipeline stage.

Units: parameter counts are per GPU (after tensor/pipeline sharding) unless a name says otherwise;
memory is in bytes (`*_gib` helpers divide by 2**30). Sources:

- Model states: Megatron-LM distributed-optimizer notes. Mixed precision keeps bf16 weights (2 B),
  fp32 main gradients (4 B), an fp32 master copy (4 B) and Adam's two moments (8 B): 18 B per trainable
  parameter; the distributed optimizer shards the master copy and the moments over the data-parallel
  ranks: 6 + 12/DP B. A frozen base under PEFT costs its bf16 weights only, 2 B per parameter.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), Table 2. Bytes per layer for a micro-batch of b sequences of length s:
  no parallelism `sbh(34 + 5as/h)`; tensor parallel `sbh(10 + 24/t + 5as/(ht))`; tensor + sequence
  parallel `(sbh/t)(34 + 5as/h)`; selective recompute drops the `5as/h` attention-score term; full
  recompute keeps only the layer input, `2sbh` (sharded by t under sequence parallelism).
- Pipeline in-flight micro-batches: Megatron-Core's 1F1B schedules (`pipeline_parallel/schedules.py`)
  and Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM" (arXiv:2104.04473): the first stage holds activations of min(PP, m) micro-batches;
  the interleaved schedule multiplies that by (1 + (PP-1)/(PP*VP)).

The docstrings of each function state the assumptions; docs/planner.md collects them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from nemo_adapt.errors import ConfigError, ParallelLayoutError
from nemo_adapt.models.spec import ModelSpec
from nemo_adapt.planner.gpus import GIB, GPUSpec

PRECISIONS = ("bf16", "fp8", "fp32")
"""Training precisions the planner models."""
RECOMPUTE_MODES = ("none", "selective", "full")
"""Activation recomputation granularities (Megatron-Core `recompute_granularity`; none = off)."""
VOCAB_DIVISIBLE_BY = 128
"""Megatron's `make_vocab_size_divisible_by`: the vocabulary is padded to a multiple of this times TP."""


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A Megatron-Core parallel layout; world size = tp * pp * cp * dp."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (physical stages)."""
    vp: int = 1
    """Virtual pipeline stages (model chunks) per physical stage; 1 = plain 1F1B."""
    cp: int = 1
    """Context-parallel size (the sequence is split over cp ranks for attention)."""
    dp: int = 1
    """Data-parallel size."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards norm/dropout activations over TP); no effect at TP=1."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (whole layer)."""
    distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam states over the data-parallel (x context-parallel) ranks. Off by
    default, as the trainer's `parallel.distributed_optimizer` (`config.schema.ParallelConfig`); the field
    defaults of this class equal the trainer's (tests/unit/test_planner_search.py checks them)."""
    embedding_loss_split: bool = False
    """Megatron-Core `account_for_embedding_in_pipeline_split` + `account_for_loss_in_pipeline_split`:
    the embedding and the loss count as one layer each, so PP*VP divides num_layers + 2 and the first and
    last stages hold one transformer layer fewer (how 126-layer Llama-3.1-405B splits over PP 8 or 16)."""

    def __post_init__(self):
        for key in ("tp", "pp", "vp", "cp", "dp", "micro_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel layout: {key}={value!r} must be a positive integer")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(
                f"parallel layout: recompute={self.recompute!r}; allowed: {', '.join(RECOMPUTE_MODES)}"
            )
        if self.vp > 1 and self.pp == 1:
            raise ParallelLayoutError(
                f"virtual_pipeline={self.vp} needs pipeline > 1 (interleaving splits each pipeline stage)"
            )
        if self.embedding_loss_split and self.pp == 1:
            raise ParallelLayoutError("embedding_loss_split needs pipeline > 1")

    @property
    def world_size(self) -> int:
        """GPUs the layout occupies."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        """Sequence parallelism actually in effect (it needs TP > 1)."""
        return self.sequence_parallel and self.tp > 1

    def label(self) -> str:
        """Compact text form, e.g. `TP2 PP4 VP20 CP1 DP1 MBS1 SP rc=selective DO`."""
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"VP{self.vp}", f"CP{self.cp}", f"DP{self.dp}",
                 f"MBS{self.micro_batch_size}"]
        if self.sp:
            parts.append("SP")
        parts.append(f"rc={self.recompute}")
        if self.distributed_optimizer and self.dp * self.cp > 1:
            parts.append("DO")
        if self.embedding_loss_split:
            parts.append("EL")
        return " ".join(parts)

    def to_dict(self) -> dict:
        """JSON-friendly form using the recipe's `parallel:` key names."""
        return {"tensor": self.tp, "pipeline": self.pp, "virtual_pipeline": self.vp, "context": self.cp,
                "data": self.dp, "micro_batch_size": self.micro_batch_size,
                "sequence_parallel": self.sp, "recompute": self.recompute,
                "distributed_optimizer": self.distributed_optimizer,
                "account_for_embedding_and_loss": self.embedding_loss_split}

    def stage_layers(self, num_layers: int, stage: int) -> int:
        """Transformer layers on a physical pipeline stage (all its virtual chunks).

        Even split: L/PP. With `embedding_loss_split`: (L+2)/PP, minus one on the first stage (the
        embedding takes a layer's slot) and minus one on the last (the loss does).
        """
        if not self.embedding_loss_split:
            return num_layers // self.pp
        per = (num_layers + 2) // self.pp
        return per - (stage == 0) - (stage == self.pp - 1)

    def split_violation(self, num_layers: int) -> str | None:
        """Why PP x VP cannot split `num_layers`, or None."""
        p, v = self.pp, self.vp
        if not self.embedding_loss_split:
            if num_layers % (p * v):
                return f"pipeline*virtual_pipeline = {p}*{v} = {p * v} does not divide num_layers={num_layers}"
            return None
        if (num_layers + 2) % (p * v):
            return (f"pipeline*virtual_pipeline = {p}*{v} = {p * v} does not divide num_layers+2={num_layers + 2} "
                    "(embedding and loss counted as layers)")
        if (num_layers + 2) // (p * v) < 2:
            return (f"pipeline*virtual_pipeline = {p * v} leaves the first/last chunk without a transformer layer "
                    f"(num_layers+2={num_layers + 2})")
        return None


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Vocabulary rows Megatron allocates: `vocab_size` rounded up to a multiple of divisible_by * tp.

    Example: Llama-3's 128,256 at TP4 -> multiple of 512 -> 128,512 (256 padding rows).
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


# --------------------------------------------------------------------------------------------------
# PEFT parameters: each method states its own (`PeftMethod.parameter_counts`, `rank_parameter_counts`,
# `context_tokens`); the planner keeps no table of methods.
# --------------------------------------------------------------------------------------------------


def peft_methods() -> tuple[str, ...]:
    """What the planner models: `none` (full fine-tuning) and every registered PEFT method."""
    from nemo_adapt.peft.base import list_peft_methods

    return tuple(list_peft_methods())  # `none` first


def normalize_peft_args(method: str, **method_args):
    """The method's typed config from planner arguments: the method's own defaults and validation.

    Args:
        method: `none` or a registered method (`peft.method` in recipes).
        **method_args: fields of the method's config class (e.g. `peft.lora.LoRAConfig`); None takes the default.

    Returns:
        The validated config (`PeftConfig` for `none`).

    Raises:
        ConfigError: unknown method, unknown argument or an invalid value (named in the message).
    """
    import dataclasses

    from nemo_adapt.peft.base import peft_config_class

    allowed = peft_methods()
    if method not in allowed:
        raise ConfigError(f"peft.method={method!r} is not supported; allowed: {', '.join(allowed)}")
    cls = peft_config_class(method)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("method", "init_from")]
    unknown = sorted(set(method_args) - set(fields))
    if unknown:
        raise ConfigError(f"peft.method={method}: unknown argument(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(fields) or 'no arguments'}")
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in method_args.items() if v is not None}
    return cls(method=method, **values)


@dataclass(frozen=True)
class PeftParams:
    """Trainable parameters a PEFT method adds to a model, whole model (no sharding)."""

    method: str
    """PEFT method name."""
    config: object
    """The method's validated config (`normalize_peft_args`)."""
    training: dict[str, int]
    """Trainable parameters during training, by component (includes training-only encoders)."""
    saved: dict[str, int]
    """Parameters in the saved adapter (after training: no p-tuning encoder, prefix MLP folded away)."""
    _rank_cache: dict = field(default_factory=dict, compare=False, repr=False)
    """Memo of `peft_rank_params` by TP size (the planner evaluates thousands of layouts)."""

    @property
    def training_total(self) -> int:
        """Trainable parameters while training."""
        return sum(self.training.values())

    @property
    def saved_total(self) -> int:
        """Parameters in the exported adapter."""
        return sum(self.saved.values())

    @property
    def method_class(self):
        """The registered `PeftMethod` subclass."""
        from nemo_adapt.peft.base import get_peft_method

        return get_peft_method(self.method)


def peft_param_breakdown(spec: ModelSpec, method: str, **method_args) -> PeftParams:
    """Closed-form trainable-parameter counts of a PEFT method on a Megatron-Core GPT model, as the method
    states them (`PeftMethod.parameter_counts`; each method's docstring gives its formula and paper).

    Args:
        spec: model architecture.
        method: a registered method.
        **method_args: the method's config fields, see `normalize_peft_args`.

    Returns:
        PeftParams with per-component counts for training and for the saved adapter.

    Raises:
        ConfigError: unknown method or argument, or one that does not fit the model.
    """
    config = normalize_peft_args(method, **method_args)
    if method == "none":
        raise ConfigError("peft.method=none (full fine-tuning) adds no PEFT parameters; count the model instead")
    from nemo_adapt.peft.base import get_peft_method

    training, saved = get_peft_method(method).parameter_counts(config, spec)
    return PeftParams(method=method, config=config, training=training, saved=saved)


def peft_trainable_params(spec: ModelSpec, method: str, *, training: bool = True, **method_args) -> int:
    """Trainable parameters of a PEFT method (whole model), see `peft_param_breakdown`.

    Args:
        spec: model architecture.
        method: a registered method; `none` returns the full model's parameter count.
        training: count what trains (True, includes p-tuning encoders and prefix MLPs) or what is saved.
        **method_args: method arguments.

    Returns:
        Parameter count.

    Raises:
        ConfigError: unknown method or argument.
    """
    if method == "none":
        normalize_peft_args(method, **method_args)
        return spec.num_parameters()
    breakdown = peft_param_breakdown(spec, method, **method_args)
    return breakdown.training_total if training else breakdown.saved_total


# --------------------------------------------------------------------------------------------------
# Per-rank parameter counts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankParams:
    """Parameters one TP rank holds for one transformer layer and for the embedding/output layers."""

    layer: int
    """Per layer: GEMM weights (sharded) + biases + two RMSNorm vectors (replicated)."""
    layer_gemm: int
    """Per layer: GEMM weights only (what FP8 casts and FLOPs count)."""
    embedding: int
    """Word embedding rows on this rank: padded_vocab / tp * h."""
    output_layer: int
    """Output projection on this rank: padded_vocab / tp * h."""
    final_norm: int
    """Final RMSNorm weight (h, replicated)."""
    padded_vocab: int
    """Vocabulary after Megatron's padding."""


@functools.lru_cache(maxsize=256)
def rank_params(spec: ModelSpec, tp: int) -> RankParams:
    """Per-TP-rank parameter counts (Megatron-Core column/row-parallel sharding).

    linear_qkv holds (a/t + 2*kv_local) heads of width d; linear_proj a/t heads; fc1 2f/t; fc2 f/t.
    With tp=1 and no vocabulary padding, L * layer + embedding + output + final_norm equals
    `ModelSpec.num_parameters()` (output counted once when embeddings are tied).
    """
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    a_loc = spec.num_attention_heads // tp
    kv_loc = spec.local_kv_heads(tp)
    qkv_out = (a_loc + 2 * kv_loc) * d
    gemm = h * qkv_out + a_loc * d * h + h * (2 * f // tp) + (f // tp) * h
    bias = qkv_out if spec.qkv_bias else 0
    vp = padded_vocab_size(spec.vocab_size, tp)
    emb = vp // tp * h
    return RankParams(layer=gemm + bias + 2 * h, layer_gemm=gemm, embedding=emb, output_layer=emb,
                      final_norm=h, padded_vocab=vp)


def peft_rank_params(spec: ModelSpec, tp: int, peft: PeftParams) -> tuple[float, float, float]:
    """Trainable PEFT parameters on one TP rank while training: (per layer, first-stage extra, every-stage
    extra), as the method states them (`PeftMethod.rank_parameter_counts`), memoised per (spec, tp)."""
    key = (spec, tp)
    if key not in peft._rank_cache:
        peft._rank_cache[key] = peft.method_class.rank_parameter_counts(peft.config, spec, tp)
    return peft._rank_cache[key]


# --------------------------------------------------------------------------------------------------
# Activations and the pipeline schedule
# --------------------------------------------------------------------------------------------------


def activation_bytes_per_layer(spec: ModelSpec, seq_length: int, micro_batch_size: int, layout: Layout,
                               flash_attention: bool = True) -> float:
    """Activation memory one transformer layer keeps for one micro-batch, bytes (Korthikanti et al. 2022).

    With s the per-rank sequence (seq_length / cp), b the micro-batch, h hidden, a heads, t TP:

    - no recompute, TP + SP: (s*b*h/t) * (34 + 5*a*S/h)   [S = full sequence the scores span]
    - no recompute, TP without SP: s*b*h * (10 + 24/t + 5*a*S/(h*t))
    - selective recompute: the same without the 5aS/h attention-score term
    - full recompute: 2*s*b*h (the layer input only), / t under sequence parallelism

    Flash-attention-style fused kernels (Megatron-Core with Transformer Engine) never materialise the
    a x S x S score, softmax and dropout tensors, so with `flash_attention` the 5aS/h term is dropped for
    every mode (selective recompute then saves nothing more). The constant 34 is Korthikanti's count for
    a GPT layer (4h GeLU MLP, dropout); re-deriving it for Llama-3's SwiGLU (f = 3.5h) with GQA and no
    dropout gives 33.5-34, so it is kept.

    Args:
        spec: model architecture.
        seq_length: tokens per sequence (including any virtual tokens).
        micro_batch_size: sequences per micro-batch.
        layout: parallel layout (tp, cp, sp, recompute are used).
        flash_attention: fused attention kernels in use.

    Returns:
        Bytes.
    """
    t, h, a = layout.tp, spec.hidden_size, spec.num_attention_heads
    s_loc = seq_length / layout.cp
    sbh = s_loc * micro_batch_size * h
    if layout.recompute == "full":
        return 2 * sbh / (t if layout.sp else 1)
    # a x S x (S/cp) score elements per sequence, 5 bytes each (softmax 2 + dropout mask 1 + output 2), / t.
    scores = 0.0 if (flash_attention or layout.recompute == "selective") else (
        5 * a * seq_length * s_loc * micro_batch_size / t)
    if layout.sp:
        return 34 * sbh / t + scores
    return sbh * (10 + 24 / t) + scores


def num_microbatches(layout: Layout, global_batch_size: int) -> int:
    """Micro-batches per step on each data-parallel rank: GBS / (MBS * DP)."""
    return global_batch_size // (layout.micro_batch_size * layout.dp)


def inflight_layers(stage_layers: int, layout: Layout, microbatches: int, stage: int) -> float:
    """Layer-micro-batches of activations a pipeline stage holds at its peak (Megatron-Core schedules).

    - PP=1: one micro-batch through all L layers at a time (gradient accumulation frees in between): L.
    - 1F1B (VP=1): stage k runs PP-k-1 warm-up forwards plus one before its first backward, so it holds
      min(PP-k, m) micro-batches of its L/PP layers; the first stage holds L layers' worth (Korthikanti).
    - Interleaved (VP>1): stage k warms up (PP-k-1)*2 + (VP-1)*PP chunks of L/(PP*VP) layers, +1;
      capped at m*VP. For the first stage that is L * (1 + (PP-1)/(PP*VP)) (Narayanan et al. 2021).

    Args:
        stage_layers: transformer layers on this stage (L/PP for an even split).
        layout: pp, vp used.
        microbatches: m per step.
        stage: physical stage index, 0-based.

    Returns:
        Layer-micro-batches held.
    """
    p, v = layout.pp, layout.vp
    if p == 1:
        return float(stage_layers)
    if v == 1:
        return float(min(p - stage, microbatches) * stage_layers)
    chunks = min((p - stage - 1) * 2 + (v - 1) * p + 1, microbatches * v)
    return chunks * stage_layers / v


# --------------------------------------------------------------------------------------------------
# Breakdown
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryAssumptions:
    """Modelling choices that are not in the formulas above; printed with every plan."""

    fixed_overhead_gib: float = 2.0
    """CUDA context (~0.5 GiB), NCCL communicator buffers and cuBLAS/Transformer Engine workspaces."""
    overhead_fraction: float = 0.05
    """Caching-allocator fragmentation and transient buffers (gradient of the current layer, p2p
    buffers, all-gather staging), as a fraction of the modelled tensors."""
    grad_dtype: str = "fp32"
    """Main-gradient buffer dtype: fp32 (18 B/param accounting) or bf16 (Megatron `grad_reduce_in_fp32=False`)."""
    flash_attention: bool = True
    """Fused attention kernels: no a*s*s score tensors are stored."""

    def __post_init__(self):
        if self.grad_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"grad_dtype={self.grad_dtype!r}; allowed: fp32, bf16")


@dataclass(frozen=True)
class StageMemory:
    """Memory of one GPU of one pipeline stage, bytes, by term."""

    stage: int
    """Physical pipeline stage, 0-based."""
    layers: int
    """Transformer layers on the stage (all virtual chunks)."""
    frozen_params: float
    """Frozen parameters on this GPU (the base model under PEFT)."""
    trainable_params: float
    """Trainable parameters on this GPU."""
    frozen_weights: float
    """Frozen weights, bytes (2 B/param in bf16/fp8, 4 B in fp32)."""
    trainable_weights: float
    """Trainable weights, bytes (2 B/param, 4 B in fp32)."""
    gradients: float
    """Main-gradient buffer, bytes (4 B/param fp32, 2 B bf16)."""
    optimizer: float
    """fp32 master weights + Adam moments, bytes (12 B/param; /(DP*CP) with the distributed optimizer)."""
    activations: float
    """Stored activations of the in-flight micro-batches, bytes."""
    inflight_layers: float
    """Layer-micro-batches the stage holds at its peak."""
    logits: float
    """Logits and cross-entropy buffers on the last stage, bytes."""
    overhead: float
    """Framework/communication allowance, bytes."""

    TERMS = ("frozen_weights", "trainable_weights", "gradients", "optimizer", "activations", "logits",
             "overhead")

    @functools.cached_property
    def total(self) -> float:
        """All terms, bytes."""
        return sum(getattr(self, t) for t in self.TERMS)

    def terms_gib(self) -> dict[str, float]:
        """Each term and the total in GiB."""
        out = {t: getattr(self, t) / GIB for t in self.TERMS}
        out["total"] = self.total / GIB
        return out


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory estimate of a layout: the first and last pipeline stages and the worst of them."""

    layout: Layout
    """The layout estimated."""
    method: str
    """PEFT method (`none` = full fine-tuning)."""
    precision: str
    """Training precision."""
    stages: tuple[StageMemory, ...]
    """First stage, then the last (when PP > 1), plus stage 1 standing for the middle stages under
    embedding_loss_split. Otherwise middle stages hold the first stage's layers without the embedding and
    with fewer in-flight micro-batches, so they never exceed it."""
    activation_per_layer: float
    """Bytes per layer per micro-batch (Korthikanti)."""
    microbatches: int
    """Micro-batches per step per data-parallel rank."""
    padded_vocab: int
    """Vocabulary rows after Megatron's padding."""
    notes: tuple[str, ...] = field(default=())
    """Assumptions that applied (vocabulary padding, flash attention, FP8, ...)."""

    @functools.cached_property
    def worst(self) -> StageMemory:
        """The stage that needs the most memory."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def total_bytes(self) -> float:
        """Memory of the worst stage, bytes."""
        return self.worst.total

    @property
    def total_gib(self) -> float:
        """Memory of the worst stage, GiB."""
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        """JSON-friendly form (GiB)."""
        return {
            "layout": self.layout.to_dict(), "method": self.method, "precision": self.precision,
            "total_gib": round(self.total_gib, 3), "worst_stage": self.worst.stage,
            "microbatches": self.microbatches, "padded_vocab": self.padded_vocab,
            "activation_per_layer_gib": self.activation_per_layer / GIB,
            "stages": [{"stage": s.stage, "layers": s.layers, "inflight_layers": s.inflight_layers,
                        "frozen_params": s.frozen_params, "trainable_params": s.trainable_params,
                        **{k: round(v, 3) for k, v in s.terms_gib().items()}} for s in self.stages],
            "notes": list(self.notes),
        }


def state_bytes_per_param(precision: str, grad_dtype: str, distributed_optimizer: bool,
                          shard: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per trainable parameter on one GPU.

    bf16/fp8: 2 + 4 + 12 = 18 B (fp32 grads), 2 + 2 + 12 = 16 B (bf16 grads); the distributed optimizer
    divides the 12 B (fp32 master 4 + Adam m 4 + v 4) by `shard` = DP*CP: 6 + 12/DP. fp32: 4 + 4 + 8
    (the weights are the master copy) = 16 B; distributed 8 + 8/DP (Megatron distributed-optimizer table).
    FP8 training keeps bf16 parameters (Transformer Engine casts per GEMM), so it is counted as bf16.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        weights, grads, opt = 4.0, 4.0, 8.0
    else:
        weights, grads, opt = 2.0, (4.0 if grad_dtype == "fp32" else 2.0), 12.0
    if distributed_optimizer:
        opt /= shard
    return weights, grads, opt


def effective_seq_length(seq_length: int, peft: PeftParams | None) -> int:
    """Tokens the model processes per sequence: seq_length plus what the method prepends
    (`PeftMethod.context_tokens`: prompt and p-tuning's virtual tokens)."""
    return seq_length + (peft.method_class.context_tokens(peft.config) if peft is not None else 0)


def estimate_memory(spec: ModelSpec, layout: Layout, method: str = "none", *, seq_length: int,
                    global_batch_size: int, precision: str = "bf16", peft_args: dict | None = None,
                    assumptions: MemoryAssumptions | None = None, peft: PeftParams | None = None
                    ) -> MemoryBreakdown:
    """Per-GPU memory of a fine-tuning layout, term by term, for the first and last pipeline stages.

    Stage contents: every stage holds L/PP layers (see `Layout.stage_layers` for the embedding/loss-aware
    split); the first also the word embedding, the last the final
    norm and the output layer (with tied embeddings and PP > 1 Megatron-Core still keeps a copy of the
    embedding on the last stage for the output projection, so it is counted there too).

    Args:
        spec: model architecture.
        layout: parallel layout (dp must be the real data-parallel size).
        method: PEFT method or `none` for full fine-tuning.
        seq_length: tokens per sequence.
        global_batch_size: sequences per optimizer step.
        precision: bf16, fp8 or fp32.
        peft_args: method arguments (see `normalize_peft_args`).
        assumptions: allowances and dtype choices; defaults to `MemoryAssumptions()`.
        peft: precomputed `peft_param_breakdown` (skips recomputing it; peft_args are then ignored).

    Returns:
        MemoryBreakdown.

    Raises:
        ParallelLayoutError: PP*VP does not split the layers, or GBS not divisible by MBS*DP.
        ConfigError: unknown precision, method or method argument.
    """
    a = assumptions or MemoryAssumptions()
    L, p = spec.num_layers, layout.pp
    split_error = layout.split_violation(L)
    if split_error:
        raise ParallelLayoutError(split_error)
    if global_batch_size % (layout.micro_batch_size * layout.dp):
        raise ParallelLayoutError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size*data_parallel="
            f"{layout.micro_batch_size}*{layout.dp}")
    if method == "none":
        normalize_peft_args(method, **(peft_args or {}))
        peft = None
    elif peft is None or peft.method != method:
        peft = peft_param_breakdown(spec, method, **(peft_args or {}))
    rp = rank_params(spec, layout.tp)
    shard = layout.dp * layout.cp
    w_b, g_b, o_b = state_bytes_per_param(precision, a.grad_dtype, layout.distributed_optimizer, shard)
    frozen_w_b = 4.0 if precision == "fp32" else 2.0
    m = num_microbatches(layout, global_batch_size)
    s_eff = effective_seq_length(seq_length, peft)
    act_layer = activation_bytes_per_layer(spec, s_eff, layout.micro_batch_size, layout, a.flash_attention)
    peft_layer, peft_first, peft_every = (0.0, 0.0, 0.0) if peft is None else peft_rank_params(
        spec, layout.tp, peft)

    stages = []
    # First and last stages; middle stages hold the first stage's layers minus the embedding and fewer
    # in-flight micro-batches, except under embedding_loss_split, where they hold one layer more.
    indices = {0, p - 1} | ({1} if layout.embedding_loss_split and p > 2 else set())
    for k in sorted(indices):
        layers = layout.stage_layers(L, k)
        base = layers * rp.layer
        if k == 0:
            base += rp.embedding
        if k == p - 1:
            base += rp.final_norm
            if not spec.tie_word_embeddings or p > 1:
                base += rp.output_layer
        if peft is None:
            frozen, trainable = 0.0, float(base)
        else:
            frozen = float(base)
            trainable = layers * peft_layer + peft_every + (peft_first if k == 0 else 0.0)
        inflight = inflight_layers(layers, layout, m, k)
        activations = inflight * act_layer
        logits = 0.0
        if k == p - 1:
            # bf16 logits (2 B) + fp32 copy the vocab-parallel cross entropy keeps for backward (4 B),
            # one micro-batch at a time: (s/cp) * b * V_pad / t elements.
            logits = 6.0 * (s_eff / layout.cp) * layout.micro_batch_size * rp.padded_vocab / layout.tp
        tensors = (frozen * frozen_w_b + trainable * (w_b + g_b + o_b) + activations + logits)
        overhead = a.fixed_overhead_gib * GIB + a.overhead_fraction * tensors
        stages.append(StageMemory(
            stage=k, layers=layers, frozen_params=frozen, trainable_params=trainable,
            frozen_weights=frozen * frozen_w_b, trainable_weights=trainable * w_b,
            gradients=trainable * g_b, optimizer=trainable * o_b, activations=activations,
            inflight_layers=inflight, logits=logits, overhead=overhead))

    notes = []
    if rp.padded_vocab != spec.vocab_size:
        notes.append(f"vocabulary {spec.vocab_size} padded to {rp.padded_vocab} (Megatron pads to a multiple "
                     f"of {VOCAB_DIVISIBLE_BY}*TP={VOCAB_DIVISIBLE_BY * layout.tp})")
    if spec.num_query_groups % layout.tp:
        notes.append(f"TP={layout.tp} > num_query_groups={spec.num_query_groups}: KV heads replicated")
    if a.flash_attention and layout.recompute == "selective":
        notes.append("selective recompute == no recompute for memory under flash attention")
    if precision == "fp8":
        notes.append("fp8: memory counted as bf16 (bf16 params, no cached FP8 weight copies)")
    if spec.tie_word_embeddings and p > 1:
        notes.append("tied embeddings with PP>1: the last stage keeps its own copy for the output layer")
    if layout.sequence_parallel and layout.tp == 1:
        notes.append("sequence_parallel has no effect at TP=1")
    return MemoryBreakdown(layout=layout, method=method, precision=precision, stages=tuple(stages),
                           activation_per_layer=act_layer, microbatches=m, padded_vocab=rp.padded_vocab,
                           notes=tuple(notes))


# --------------------------------------------------------------------------------------------------
# Fit check
# --------------------------------------------------------------------------------------------------


class LayoutDoesNotFitError(ParallelLayoutError):
    """The layout satisfies the constraints but needs more memory than the GPU has."""


@dataclass(frozen=True)
class FitReport:
    """Whether a layout fits a GPU, and why not."""

    fits: bool
    """Worst stage within the GPU's memory."""
    required_gib: float
    """Worst-stage memory, GiB."""
    capacity_gib: float
    """GPU memory, GiB."""
    reason: str
    """One line: headroom when it fits, overflow and the largest terms when it does not."""
    breakdown: MemoryBreakdown
    """The full estimate."""

    @property
    def headroom_gib(self) -> float:
        """Capacity minus requirement, GiB (negative: over by that much)."""
        return self.capacity_gib - self.required_gib


def explain_fit(breakdown: MemoryBreakdown, gpu: GPUSpec) -> FitReport:
    """Compare a breakdown with a GPU's memory and say which terms drive it.

    Args:
        breakdown: estimate from `estimate_memory`.
        gpu: target GPU.

    Returns:
        FitReport.
    """
    worst = breakdown.worst
    need, cap = worst.total / GIB, gpu.memory_gib
    terms = sorted(((k, v) for k, v in worst.terms_gib().items() if k != "total"), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v:.1f}" for k, v in terms[:3])
    where = f"stage {worst.stage} of {breakdown.layout.pp}"
    if need <= cap:
        reason = f"fits: {need:.1f} GiB of {cap:.1f} GiB ({cap - need:.1f} GiB free, worst {where})"
    else:
        reason = (f"does not fit: {need:.1f} GiB > {cap:.1f} GiB on {gpu.name} (over by {need - cap:.1f} GiB, "
                  f"worst {where}); largest terms (GiB): {top}")
    return FitReport(fits=need <= cap, required_gib=need, capacity_gib=cap, reason=reason,
                     breakdown=breakdown)


def check_fits(spec: ModelSpec, layout: Layout, gpu: GPUSpec, method: str = "none", *, seq_length: int,
               global_batch_size: int, precision: str = "bf16", peft_args: dict | None = None,
               assumptions: MemoryAssumptions | None = None, raise_on_failure: bool = False) -> FitReport:
    """Estimate a layout's memory and compare it with the GPU.

    Args:
        spec, layout, method, seq_length, global_batch_size, precision, peft_args, assumptions:
            as for `estimate_memory`.
        gpu: target GPU.
        raise_on_failure: raise instead of returning a report that does not fit.

    Returns:
        FitReport (`.fits`, `.reason`, `.breakdown`).

    Raises:
        LayoutDoesNotFitError: when raise_on_failure and the worst stage exceeds the GPU memory.
        ParallelLayoutError, ConfigError: as for `estimate_memory`.
    """
    report = explain_fit(estimate_memory(spec, layout, method, seq_length=seq_length,
                                         global_batch_size=global_batch_size, precision=precision,
                                         peft_args=peft_args, assumptions=assumptions), gpu)
    if raise_on_failure and not report.fits:
        raise LayoutDoesNotFitError(f"{layout.label()}: {report.reason}")
    return report


def gib(num_bytes: float) -> float:
    """Bytes to GiB."""
    return num_bytes / GIB


__all__ = [
    "PRECISIONS", "RECOMPUTE_MODES", "FitReport", "Layout",
    "LayoutDoesNotFitError", "MemoryAssumptions", "MemoryBreakdown", "PeftParams", "RankParams", "StageMemory",
    "activation_bytes_per_layer", "check_fits", "effective_seq_length", "estimate_memory", "explain_fit",
    "gib", "inflight_layers", "normalize_peft_args", "peft_methods", "peft_rank_params",
    "num_microbatches", "padded_vocab_size", "peft_param_breakdown", "peft_trainable_params", "rank_params",
    "state_bytes_per_param",
]

