"""Build a Megatron-Core `GPTModel` for one pipeline stage from a `ModelSpec`.

The Transformer Engine layer spec is used when TE is importable (NGC containers), the local
Megatron-Core spec otherwise (CPU development and CI). Both give the same architecture; only the
parameter names of the fused layer norms differ, which the weight maps handle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_adapt.errors import ParallelLayoutError
from nemo_adapt.models.spec import ModelSpec

# Megatron-LM pads the vocabulary so every TP shard of the embedding is a multiple of 128 rows
# (GEMM-friendly). We pad to lcm(128, TP) instead so the padded size is the same at TP 1, 2, 4, 8
# and checkpoints reshard across those without touching the vocabulary dimension.
_VOCAB_MULTIPLE = 128


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports (it is optional; NGC containers ship it)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising OSError/RuntimeError
        return False
    return torch.cuda.is_available()


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Vocabulary rows after padding for `tensor_parallel` shards."""
    multiple = math.lcm(_VOCAB_MULTIPLE, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def check_layout(spec: ModelSpec, tensor: int, pipeline: int, virtual_pipeline: int | None = None) -> None:
    """Validate that a TP/PP layout divides the model.

    Raises:
        ParallelLayoutError: naming the first constraint that fails and the sizes that would work.
    """

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)

    for key, value in (("tensor", tensor), ("pipeline", pipeline)):
        if not isinstance(value, int) or value < 1:
            raise ParallelLayoutError(f"parallel.{key}={value!r} must be a positive integer")
    checks = (
        ("num_attention_heads", spec.num_attention_heads),
        ("num_query_groups (KV heads)", spec.num_query_groups),
        ("ffn_hidden_size", spec.ffn_hidden_size),
    )
    for what, size in checks:
        if size % tensor:
            raise ParallelLayoutError(
                f"parallel.tensor={tensor} does not divide {what}={size} of model {spec.name!r}; "
                f"tensor sizes that do: {divisors(math.gcd(spec.num_attention_heads, spec.num_query_groups, spec.ffn_hidden_size))}"
            )
    stages = pipeline * (virtual_pipeline or 1)
    if spec.num_layers % stages:
        if virtual_pipeline is None or spec.num_layers % pipeline:
            raise ParallelLayoutError(
                f"parallel.pipeline={pipeline} does not divide num_layers={spec.num_layers} of model "
                f"{spec.name!r}; pipeline sizes that do: {divisors(spec.num_layers)}")
        per_stage = spec.num_layers // pipeline
        raise ParallelLayoutError(
            f"parallel.pipeline x virtual_pipeline = {pipeline} x {virtual_pipeline} = {stages} does not divide "
            f"num_layers={spec.num_layers} of model {spec.name!r}; with parallel.pipeline={pipeline}, "
            f"virtual_pipeline sizes that do: {', '.join(str(v) for v in range(2, per_stage + 1) if per_stage % v == 0)}"
        )


@dataclass(frozen=True)
class BuildOptions:
    """Numerics and kernels for building a model."""

    params_dtype: torch.dtype = torch.float32
    """Weight dtype: bf16 on GPU for training, fp32 on CPU and for parity checks."""
    use_te: bool | None = None
    """Use the Transformer Engine spec; None picks it when TE imports on a GPU."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    recompute: str | None = None
    """Activation recompute: None, 'selective' or 'full'."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (fine-tuning usually keeps it at 0)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    fp8: bool = False
    """Megatron-Core FP8 training through Transformer Engine (`FP8_RECIPE`); GPUs with FP8 tensor cores only."""
    packed_sequences: bool = False
    """Rows hold several examples (block-diagonal attention). With the local spec on a GPU this turns off
    Megatron's fused softmax, whose causal kernel applies its own triangle and ignores any given mask;
    with Transformer Engine the trainer passes `PackedSeqParams` instead and this changes nothing."""
    context_parallel: int = 1
    """Context-parallel size (Transformer Engine attention only)."""


FP8_RECIPE = {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 0, "fp8_amax_history_len": 1024,
              "fp8_amax_compute_algo": "max"}
"""Megatron-Core FP8 settings: E4M3 forward / E5M2 backward ("hybrid") with delayed scaling from the
largest amax of the last 1024 steps, the recipe NeMo and Megatron-Bridge use for Llama fine-tuning.
Adapter layers (Megatron's local linears, not Transformer Engine modules) stay in bf16."""


def model_chunks(model) -> list:
    """The model chunks this rank holds: a list as given (interleaved pipeline), else `[model]`."""
    return list(model) if isinstance(model, list | tuple) else [model]


def _on_gpu() -> bool:
    # One place to ask, so tests can check what the GPU build would configure.
    return torch.cuda.is_available()


def transformer_config(spec: ModelSpec, tensor: int, pipeline: int, options: BuildOptions = BuildOptions(),
                       virtual_pipeline: int | None = None):
    """Megatron-Core `TransformerConfig` for `spec` at the given layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_layout(spec, tensor, pipeline, virtual_pipeline)
    gpu = _on_gpu()
    use_te = have_transformer_engine() if options.use_te is None else options.use_te
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=options.hidden_dropout,
        attention_dropout=options.attention_dropout,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        context_parallel_size=options.context_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        # Interleaved 1F1B on two pipeline ranks sends activations (to "next") and gradients (to
        # "prev") to the same peer in one step. Batched p2p posts both on one communicator in an order
        # the peer does not mirror, so the two messages can swap; Megatron's unbatched p2p puts the two
        # directions on different communicators for a 2-rank group and cannot mix them up.
        batch_p2p_comm=not (virtual_pipeline and pipeline == 2),
        sequence_parallel=options.sequence_parallel and tensor > 1,
        params_dtype=options.params_dtype,
        pipeline_dtype=options.params_dtype,
        bf16=options.params_dtype == torch.bfloat16,
        fp16=options.params_dtype == torch.float16,
        # Fused CUDA kernels only on GPU; on CPU the unfused PyTorch paths compute the same thing.
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        apply_rope_fusion=False,
        # The fused causal kernel ignores a given mask: packed rows on the local spec take the unfused path.
        masked_softmax_fusion=gpu and not (options.packed_sequences and not use_te),
        persist_layer_norm=gpu,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not gpu,
        # Weights come from a checkpoint almost always; random init is for tests and from-scratch.
        perform_initialization=True,
    )
    if options.fp8:
        kwargs.update(FP8_RECIPE)
    if options.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif options.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def build_model(spec: ModelSpec, tensor: int = 1, pipeline: int = 1, pp_rank: int | None = None,
                options: BuildOptions = BuildOptions(), vp_stage: int | None = None,
                virtual_pipeline: int | None = None, config=None):
    """Build this rank's stage of `spec` as a Megatron-Core `GPTModel` (random weights).

    Megatron's parallel state must be initialised (see `nemo_adapt.parallel.runtime.initialize`).

    Args:
        spec: the architecture.
        tensor, pipeline: the layout (must match the initialised parallel state).
        pp_rank: pipeline rank; defaults to this process's.
        options: dtype, kernels, recompute.
        vp_stage, virtual_pipeline: model chunk for the interleaved schedule.
        config: a `TransformerConfig` to share (the chunks of one rank share one, as Megatron's schedules
            read hooks from the first chunk's); built from the other arguments when None.

    Returns:
        The `GPTModel` holding this stage's layers (embedding on the first stage, output on the last).

    Raises:
        ParallelLayoutError: the layout does not divide the model.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(spec, tensor, pipeline, options, virtual_pipeline)
    use_te = have_transformer_engine() if options.use_te is None else options.use_te
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if pp_rank is None:
        pp_rank = ps.get_pipeline_model_parallel_rank()
    if virtual_pipeline:
        pre = pp_rank == 0 and vp_stage == 0
        post = pp_rank == pipeline - 1 and vp_stage == virtual_pipeline - 1
    else:
        pre, post = pp_rank == 0, pp_rank == pipeline - 1
    rope = spec.rope_scaling
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(spec.vocab_size, tensor),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        # Megatron computes base ** (2i/d) in float: a fractional rope_theta must not be truncated.
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else float(spec.rope_theta),
        rope_scaling=rope is not None,
        # Megatron's llama3 scaling hard-codes low/high factors 1 and 4 and 8192 original context,
        # which is what every Llama-3.1 checkpoint uses; other values are rejected in weights import.
        rope_scaling_factor=rope.factor if rope else 8.0,
        # Keep logits split over TP ranks; the loss and generation gather what they need.
        parallel_output=True,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    return GPTModel(**kwargs)
