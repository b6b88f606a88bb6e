"""Step time, tokens/s/GPU and MFU of a layout from FLOPs, the pipeline bubble and communication volume.

Sources:
- FLOPs: 2 FLOPs per multiply-accumulate; forward = 2 * (GEMM parameters) per token plus causal
  attention 2 * s * a * d per layer per token (QK^T and AV, halved by the causal mask). Full
  fine-tuning costs forward + backward = 3x forward = 6N per token plus attention (Kaplan et al. 2020;
  Narayanan et al. 2021, eq. 3). With Megatron-Bridge's counting this gives 449 GFLOP/token for
  Llama-3-70B at seq 8192, matching its published 719 TFLOP/s at 1,602 tokens/s/GPU.
- "LoRA backward discount": with a frozen base the backward pass computes input gradients but no
  weight gradients for the frozen GEMMs, so training costs ~4N instead of 6N per token (Hu et al.
  2021 report the matching ~25% speed-up for GPT-3 175B).
- Pipeline bubble (Narayanan et al. 2021): (p-1)/m of the ideal time for 1F1B, (p-1)/(v*m) interleaved.
- Communication: ring all-gather/reduce-scatter move (n-1)/n of the tensor per GPU; all-reduce twice.
  Tensor parallelism with sequence parallelism does 2 all-gathers + 2 reduce-scatters of the s*b*h
  activation per layer forward and as many backward (Korthikanti et al. 2022, Fig. 5).

Efficiency assumptions live in `PerfAssumptions` and are printed with every plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nemo_adapt.models.spec import ModelSpec
from nemo_adapt.planner.gpus import GPUSpec
from nemo_adapt.planner.memory import (
    Layout,
    PeftParams,
    effective_seq_length,
    num_microbatches,
    padded_vocab_size,
    peft_param_breakdown,
    peft_rank_params,
    rank_params,
)


@dataclass(frozen=True)
class PerfAssumptions:
    """Efficiency assumptions of the throughput model (calibration described in docs/planner.md)."""

    gemm_efficiency: dict[str, float] = field(
        default_factory=lambda: {"bf16": 0.55, "fp8": 0.42, "fp32": 0.50})
    """Fraction of the dense tensor-core peak the model's math runs at, by precision. fp8 = 0.42 is
    calibrated on the published Megatron-Bridge Llama-3-70B H100 FP8 runs (LoRA 2,643 and SFT 1,638
    tokens/s/GPU); bf16 = 0.55 is an uncalibrated assumption near the 52% of peak Narayanan et al. 2021
    report on A100 (FP8 reaches a lower fraction of its doubled peak)."""
    link_efficiency: float = 0.8
    """Achieved fraction of NVLink / network line rate in NCCL collectives."""
    tp_comm_exposed: float = 0.5
    """Fraction of tensor-parallel communication not hidden behind GEMMs."""
    cp_comm_exposed: float = 0.2
    """Fraction of context-parallel KV exchange not hidden behind attention (ring attention overlaps it)."""
    pp_comm_exposed: float = 0.5
    """Fraction of pipeline point-to-point transfers not overlapped."""
    dp_comm_exposed: float = 0.2
    """Fraction of the gradient reduce / parameter all-gather left after overlap with backward/forward."""
    optimizer_bytes_per_param: float = 32.0
    """HBM traffic of one Adam update per parameter the rank updates (read grad, master, m, v; write
    master, m, v, bf16 weight)."""
    causal: bool = True
    """Causal attention: half of the s x s score matrix is computed."""


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per training token (whole model, all GPUs together)."""

    model: float
    """Useful FLOPs per token (what MFU counts): no recomputation, unpadded vocabulary."""
    executed: float
    """FLOPs actually run per token, including recomputation and the padded vocabulary."""
    forward: float
    """Forward pass FLOPs per token."""


def _layer_gemm_params(spec: ModelSpec) -> int:
    """GEMM weights of one layer, unsharded: qkv h(a+2g)d + proj adh + fc1 2hf + fc2 fh."""
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    a, g = spec.num_attention_heads, spec.num_query_groups
    return h * (a + 2 * g) * d + a * d * h + 3 * h * f


def flops_per_token(spec: ModelSpec, seq_length: int, method: str = "none", *, recompute: str = "none",
                    flash_attention: bool = True, peft: PeftParams | None = None, tp: int = 1,
                    causal: bool = True) -> FlopsPerToken:
    """Training FLOPs per token.

    forward = L * (2 * N_layer + 2 * c * 2 * s * a * d + 2 * P_peft_layer) + 2 * V * h, with c = 1/2 for
    causal attention. Full fine-tuning: 3 x forward (6N + attention). PEFT: frozen GEMMs run forward and
    input-gradient only (2x), attention still 3x, adapters 3x: ~4N (the LoRA backward discount).
    Full recompute adds one forward of the layers; selective recompute adds the attention core forward
    unless flash attention already recomputes it inside its own backward.

    Args:
        spec: model architecture.
        seq_length: tokens per sequence the model sees.
        method: PEFT method or `none`.
        recompute: none, selective or full.
        flash_attention: fused attention (selective recompute is then free).
        peft: the method's parameter breakdown (adapter FLOPs); None for full fine-tuning.
        tp: tensor-parallel size (only the executed count uses the TP-padded vocabulary).
        causal: causal mask halves the attention FLOPs.

    Returns:
        FlopsPerToken.
    """
    L, h = spec.num_layers, spec.hidden_size
    attn = 4 * seq_length * spec.num_attention_heads * spec.kv_channels * (0.5 if causal else 1.0)
    gemm = 2 * _layer_gemm_params(spec)
    peft_layer = 0.0
    if peft is not None:
        peft_layer = 2 * peft_rank_params(spec, 1, peft)[0]  # per-layer adapter MACs x 2
    out_model = 2 * spec.vocab_size * h
    out_exec = 2 * padded_vocab_size(spec.vocab_size, tp) * h
    fwd_layer = gemm + attn + peft_layer
    if method == "none":
        base_mult = 3.0  # forward + input gradient + weight gradient
    else:
        base_mult = 2.0  # forward + input gradient: the LoRA backward discount
    train_layer = base_mult * gemm + 3 * attn + 3 * peft_layer
    model = L * train_layer + base_mult * out_model
    executed = L * train_layer + base_mult * out_exec
    if recompute == "full":
        executed += L * fwd_layer
    elif recompute == "selective" and not flash_attention:
        executed += L * attn
    return FlopsPerToken(model=model, executed=executed, forward=L * fwd_layer + out_model)


@dataclass(frozen=True)
class PerfEstimate:
    """Estimated step time of a layout, and what it is made of (seconds per optimizer step)."""

    step_time_s: float
    """Wall time of one optimizer step."""
    compute_s: float
    """Math on the slowest pipeline stage, all micro-batches."""
    bubble_s: float
    """Pipeline fill/drain idle time."""
    tp_comm_s: float
    """Exposed tensor-parallel communication."""
    cp_comm_s: float
    """Exposed context-parallel communication."""
    pp_comm_s: float
    """Exposed pipeline point-to-point communication."""
    dp_comm_s: float
    """Exposed gradient reduction / parameter all-gather."""
    optimizer_s: float
    """Optimizer update (HBM bound)."""
    bubble_fraction: float
    """(p-1)/(v*m)."""
    tokens_per_step: int
    """GBS * seq_length (data tokens; virtual tokens are not counted)."""
    tokens_per_s_per_gpu: float
    """Throughput per GPU."""
    model_tflops_per_gpu: float
    """Useful TFLOP/s per GPU (Megatron-Bridge's "Model TFLOP/sec/GPU")."""
    mfu: float
    """model_tflops_per_gpu / dense peak of the training precision."""
    flops: FlopsPerToken
    """FLOPs per token used."""

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)


def _bandwidth(gpu: GPUSpec, gpus_per_node: int, span: int, a: PerfAssumptions) -> float:
    """Per-GPU bandwidth (B/s) of a process group spanning `span` consecutive ranks (Megatron's order is
    TP innermost, then CP, DP, PP): NVLink when inside one NVLink domain, the network otherwise."""
    domain = gpu.nvlink_domain_size(gpus_per_node)
    gbps = gpu.nvlink_gbps if span <= domain else gpu.internode_gbps
    return gbps * 1e9 * a.link_efficiency


def estimate_step_time(spec: ModelSpec, layout: Layout, gpu: GPUSpec, gpus_per_node: int,
                       method: str = "none", *, seq_length: int, global_batch_size: int,
                       precision: str = "bf16", peft_args: dict | None = None,
                       assumptions: PerfAssumptions | None = None, flash_attention: bool = True,
                       grad_dtype: str = "fp32", peft: PeftParams | None = None) -> PerfEstimate:
    """Estimate the step time and throughput of a (valid) layout.

    step = m * t_mb * (1 + bubble) + exposed DP communication + optimizer update, where t_mb is the
    slowest stage's time for one micro-batch through all its virtual chunks:
    executed FLOPs / (t*cp) / (peak * efficiency) + exposed TP, CP and PP communication.

    Args:
        spec: model architecture.
        layout: parallel layout (assumed valid: see search.check_layout).
        gpu: GPU type.
        gpus_per_node: GPUs per node (decides which groups stay on NVLink).
        method: PEFT method or `none`.
        seq_length: tokens per sequence.
        global_batch_size: sequences per step.
        precision: bf16, fp8 or fp32 (picks the peak).
        peft_args: PEFT method arguments.
        assumptions: efficiency assumptions.
        flash_attention: fused attention kernels.
        grad_dtype: dtype of gradient reduction (fp32 or bf16).
        peft: precomputed `peft_param_breakdown` (peft_args are then ignored).

    Returns:
        PerfEstimate.

    Raises:
        ConfigError: FP8 on a GPU without FP8, unknown precision or PEFT argument.
    """
    a = assumptions or PerfAssumptions()
    peak = gpu.peak_tflops(precision) * 1e12
    eff = a.gemm_efficiency[precision]
    if method == "none":
        peft = None
    elif peft is None or peft.method != method:
        peft = peft_param_breakdown(spec, method, **(peft_args or {}))
    s_eff = effective_seq_length(seq_length, peft)
    t, p, v, cp, dp = layout.tp, layout.pp, layout.vp, layout.cp, layout.dp
    b = layout.micro_batch_size
    m = num_microbatches(layout, global_batch_size)
    fpt = flops_per_token(spec, s_eff, method, recompute=layout.recompute, flash_attention=flash_attention,
                          peft=peft, tp=t, causal=a.causal)

    # Slowest stage: the last one also runs the output layer; under the embedding/loss-aware split the
    # middle stages hold one layer more than the first and last.
    L, h = spec.num_layers, spec.hidden_size
    out_exec = 2 * padded_vocab_size(spec.vocab_size, t) * h * (3.0 if method == "none" else 2.0)
    layer_exec = (fpt.executed - out_exec) / L
    stage_ids = {0, p - 1} | ({1} if layout.embedding_loss_split and p > 2 else set())
    stage_flops_per_token = max(layout.stage_layers(L, k) * layer_exec + (out_exec if k == p - 1 else 0.0)
                                for k in stage_ids)
    tokens_mb = b * s_eff
    compute_mb = stage_flops_per_token * tokens_mb / (t * cp) / (peak * eff)

    layers_stage = max(layout.stage_layers(L, k) for k in stage_ids)
    s_loc = s_eff / cp
    act_bytes = 2.0 * s_loc * b * h  # one bf16 s x b x h activation, bytes
    tp_mb = 0.0
    if t > 1:
        # Collectives per layer: forward 4 (2 AG + 2 RS, or 2 all-reduces = same volume); backward 4;
        # +2 all-gathers re-gathering inputs for weight gradients under SP when the base trains;
        # +4 for the recomputed forward under full recompute.
        n_coll = 8 + (2 if (layout.sp and method == "none") else 0) + (4 if layout.recompute == "full" else 0)
        volume = n_coll * layers_stage * (t - 1) / t * act_bytes
        tp_mb = a.tp_comm_exposed * volume / _bandwidth(gpu, gpus_per_node, t, a)
    cp_mb = 0.0
    if cp > 1:
        # Ring attention passes this rank's K and V around the ring (cp-1) times forward, and K, V, dK,
        # dV backward: 3 x (cp-1) x 2 tensors of s_loc*b*kv_local*d bf16 elements per layer.
        kv_bytes = 2.0 * s_loc * b * spec.local_kv_heads(t) * spec.kv_channels
        volume = layers_stage * 3 * (cp - 1) * 2 * kv_bytes
        cp_mb = a.cp_comm_exposed * volume / _bandwidth(gpu, gpus_per_node, t * cp, a)
    pp_mb = 0.0
    if p > 1:
        # One activation forward and one gradient backward per virtual chunk boundary.
        msg = act_bytes / (t if layout.sp else 1)
        pp_mb = a.pp_comm_exposed * 2 * v * msg / _bandwidth(gpu, gpus_per_node, layout.world_size, a)

    bubble = (p - 1) / (v * m) if p > 1 else 0.0
    compute = m * compute_mb
    step_pipeline = m * (compute_mb + tp_mb + cp_mb + pp_mb) * (1 + bubble)

    # Data parallel: reduce the gradients of what the largest stage trains over its DP*CP ranks.
    rp = rank_params(spec, t)
    n = dp * cp
    first_layers = layout.stage_layers(L, 0)
    if peft is None:
        last = layout.stage_layers(L, p - 1) * rp.layer + rp.final_norm
        if p > 1 or not spec.tie_word_embeddings:
            last += rp.output_layer
        trainable = max(first_layers * rp.layer + rp.embedding, layers_stage * rp.layer, last)
    else:
        per_layer, first, every = peft_rank_params(spec, t, peft)
        trainable = max(first_layers * per_layer + first, layers_stage * per_layer) + every
    g_bytes = 4.0 if (precision == "fp32" or grad_dtype == "fp32") else 2.0
    w_bytes = 4.0 if precision == "fp32" else 2.0
    dp_s = 0.0
    if n > 1:
        if layout.distributed_optimizer:  # reduce-scatter grads + all-gather updated bf16 weights
            volume = (n - 1) / n * trainable * (g_bytes + w_bytes)
        else:  # all-reduce
            volume = 2 * (n - 1) / n * trainable * g_bytes
        dp_s = a.dp_comm_exposed * volume / _bandwidth(gpu, gpus_per_node, t * cp * dp, a)
    updated = trainable / n if (layout.distributed_optimizer and n > 1) else trainable
    opt_s = updated * a.optimizer_bytes_per_param / (gpu.hbm_tbps * 1e12)

    step = step_pipeline + dp_s + opt_s
    world = layout.world_size
    tokens = global_batch_size * seq_length
    model_tflops = global_batch_size * seq_length * fpt.model / step / world / 1e12
    return PerfEstimate(
        step_time_s=step, compute_s=compute, bubble_s=step_pipeline * bubble / (1 + bubble),
        tp_comm_s=m * tp_mb, cp_comm_s=m * cp_mb, pp_comm_s=m * pp_mb, dp_comm_s=dp_s, optimizer_s=opt_s,
        bubble_fraction=bubble, tokens_per_step=tokens, tokens_per_s_per_gpu=tokens / step / world,
        model_tflops_per_gpu=model_tflops, mfu=model_tflops * 1e12 / peak, flops=fpt)


__all__ = ["FlopsPerToken", "PerfAssumptions", "PerfEstimate", "estimate_step_time", "flops_per_token"]
