"""The pieces the training entry composes: model, optimizer, schedule, batches and one step.

Everything distributed is Megatron-Core's: `DistributedDataParallel` (grad buffers, bucketing,
distributed optimizer), `get_megatron_optimizer` (AdamW, grad clipping), and the pipeline schedule
from `get_forward_backward_func` (1F1B, interleaved, or no pipelining). Loss is a per-token mean
over the whole global batch (Megatron's `calculate_per_token_loss`), so the same global batch gives
the same loss and gradients at any TP/PP/DP split and micro-batch size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from nemo_adapt.config.schema import RecipeConfig
from nemo_adapt.errors import ConfigError
from nemo_adapt.models.builder import model_chunks


def resolve_dtype(precision: str) -> torch.dtype:
    """Parameter dtype for `train.precision` (auto: bf16 on GPU, fp32 on CPU).

    bf16 runs on the CPU too, through exactly the GPU path (bf16 weights in Megatron's `Float16Module`,
    fp32 main parameters and gradients in the optimizer); fp8 keeps bf16 weights and runs Transformer
    Engine GEMMs in FP8 (the preflight refuses it where no FP8 GPU or Transformer Engine exists).
    """
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision in ("bf16", "fp8"):
        return torch.bfloat16
    return torch.float32


def wrap_ddp(chunks, cfg: RecipeConfig):
    """Megatron's wrappers around each model chunk: `Float16Module` for bf16 (casts the first stage's
    inputs to bf16 and the last stage's outputs to fp32), then DDP (contiguous fp32 grad buffers, DP
    all-reduce or reduce-scatter).

    Args:
        chunks: this rank's `GPTModel` stage, or its chunks (a list: one per virtual-pipeline stage).
        cfg: the recipe.

    Returns:
        The wrapped stage, or the wrapped chunks in the same order (the form given).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # Per-token loss: gradients are summed over DP and divided by the global token count
        # in finalize_model_grads, not averaged by the DP size.
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks(chunks)):
        if chunk.config.bf16 or chunk.config.fp16:
            chunk = Float16Module(chunk.config, chunk)
        # Megatron-LM buckets only the first chunk's grads (the others reduce as one bucket each).
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0))
    return wrapped if isinstance(chunks, list | tuple) else wrapped[0]


def connect_schedule_hooks(ddp_chunks, optimizer) -> None:
    """Tell Megatron's schedules how to finish a step: DP grad reduction, tied-embedding and
    sequence-parallel grad all-reduces, division by the global token count (finalize_model_grads),
    and no grad sync between micro-batches of one step (per chunk under an interleaved pipeline)."""
    from megatron.core.distributed import finalize_model_grads

    from nemo_adapt.peft.virtual_tokens import with_shared_grad_reduction

    ddp_chunks = model_chunks(ddp_chunks)
    config = ddp_chunks[0].config  # the schedules read the hooks from the first chunk's config
    # Prefix tuning's reparameterisation MLP is replicated on every TP x PP rank (and chunk) and each
    # copy sees only its layers' and heads' share of its gradient: summed first (no-op otherwise).
    config.finalize_model_grads_func = with_shared_grad_reduction(finalize_model_grads, ddp_chunks)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync


def build_optimizer(ddp_chunks, cfg: RecipeConfig, lr_multipliers: dict[str, float] | None = None):
    """AdamW over the trainable parameters (Megatron's optimizer, with grad clipping). Under bf16 it keeps
    fp32 main parameters and steps on the fp32 grads (Megatron's `Float16OptimizerWithFloat16Params`, or the
    distributed optimizer's sharded fp32 copies).

    Args:
        ddp_chunks: the Megatron DDP-wrapped stage, or its chunks.
        cfg: the recipe.
        lr_multipliers: parameter-name pattern -> learning-rate multiplier (the PEFT method's
            `lr_multipliers()`, e.g. LoRA+'s B matrices); each becomes its own parameter group with
            Megatron's `lr_mult` set, which `set_lr` applies at every step.
    """
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer

    o = cfg.optim
    ddp_chunks = model_chunks(ddp_chunks)
    dtype = ddp_chunks[0].config.params_dtype
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=cfg.train.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    overrides = None
    if lr_multipliers:
        from megatron.core.optimizer import get_standard_config_overrides

        # Passing overrides replaces Megatron's defaults (no weight decay on biases and norms): keep them.
        overrides = dict(get_standard_config_overrides(opt_config))
        for pattern, mult in lr_multipliers.items():
            overrides[ParamKey(name=pattern)] = {"lr_mult": mult}
    return get_megatron_optimizer(opt_config, list(ddp_chunks), config_overrides=overrides)


def lr_at(step: int, cfg: RecipeConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay schedule."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        # Hold the peak, then a linear decay whose last step (total_steps - 1) lands on min_lr.
        decay = min(o.decay_steps or max(1, round(0.2 * (total_steps - o.warmup_steps))), total_steps)
        into = step - (total_steps - decay) + 1
        return o.lr if into <= 0 else o.lr + (o.min_lr - o.lr) * min(1.0, into / decay)
    decay_steps = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / decay_steps)
    if o.schedule == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - progress)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set this step's learning rate; a group with a multiplier (`lr_mult`, see `build_optimizer`)
    gets that multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@dataclass
class BatchPlan:
    """How a global batch is cut: per DP rank and per micro-batch."""

    global_batch_size: int
    micro_batch_size: int
    data_parallel: int

    def __post_init__(self):
        per_rank, rem = divmod(self.global_batch_size, self.data_parallel)
        if rem or per_rank % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size x data-parallel size = {self.micro_batch_size} x {self.data_parallel}"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)


class StepData:
    """Rows of the training set in the order they are consumed: epoch permutations laid end to end.

    The data position is a count of consumed samples, not a step number: a step with global batch
    size G reads positions [c, c + G) of the stream, where c is the samples consumed before it, and
    data-parallel rank d takes its contiguous share. Position p is row `order(p // N)[p % N]` of an
    N-row split, so a step may run from the end of one epoch into the next and no row is ever
    skipped (an epoch is N samples, whatever G is). Resuming needs only the consumed count, which
    stays right when a resumed run uses another global batch size.
    """

    def __init__(self, dataset, plan: BatchPlan, seed: int):
        self.dataset = dataset
        self.plan = plan
        self.seed = seed
        self.rows = len(dataset)
        if self.rows < plan.global_batch_size:
            raise ConfigError(
                f"the training split has {self.rows} rows, fewer than train.global_batch_size="
                f"{plan.global_batch_size}; lower the global batch size or add data"
            )
        self._orders: dict[int, list[int]] = {}

    def steps_for_epochs(self, max_epochs: float, consumed: int = 0) -> int:
        """Steps still needed to read max_epochs x N samples after `consumed`: ceil((target - consumed) / G).

        Rounding up means no row of the last pass is left out (the final step may start the next pass).
        A fresh run gets at least one step.
        """
        target = math.ceil(max_epochs * self.rows - 1e-9)
        steps = math.ceil(max(0, target - consumed) / self.plan.global_batch_size)
        return steps if consumed else max(1, steps)

    def epoch_of(self, consumed: int) -> int:
        """The epoch the next sample after `consumed` samples belongs to."""
        return consumed // self.rows

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            # A step straddles at most two epochs: keep the previous order beside the new one.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self.dataset.epoch_order(epoch, self.seed)
        return self._orders[epoch]

    def row_at(self, position: int) -> int:
        """The row index at stream position `position` (0-based sample count)."""
        epoch, i = divmod(position, self.rows)
        return self._order(epoch)[i]

    def microbatches(self, consumed: int, dp_rank: int) -> list[dict]:
        """This rank's micro-batches (collated dicts of [mbs, s] tensors) for the step after `consumed` samples."""
        per_rank = self.plan.global_batch_size // self.plan.data_parallel
        start = consumed + dp_rank * per_rank
        rows = [self.row_at(p) for p in range(start, start + per_rank)]
        mbs = self.plan.micro_batch_size
        return [self.dataset.collate([self.dataset[i] for i in rows[j:j + mbs]]) for j in range(0, per_rank, mbs)]

    def coverage(self, consumed: int, total: int) -> dict:
        """What a run reading stream positions [consumed, total) sees, for the run's report.

        Whole epochs in the range add one visit to every row; only the partial epochs at either end
        need their orders, so this costs O(N) however long the run.

        Returns:
            {"rows", "samples" (to read), "epochs" (samples / rows), "rows_seen" (distinct rows read),
             "rows_unseen", "min_times_seen", "max_times_seen"}.
        """
        import numpy as np

        n, samples = self.rows, max(0, total - consumed)
        counts = np.zeros(n, dtype=np.int64)
        pos = consumed
        while pos < total:
            epoch, i = divmod(pos, n)
            j = min(n, i + total - pos)
            if i == 0 and j == n:
                counts += 1
            else:
                counts[np.asarray(self._order(epoch)[i:j], dtype=np.int64)] += 1
            pos += j - i
        seen = int((counts > 0).sum())
        return {"rows": n, "samples": samples, "epochs": round(samples / n, 4), "rows_seen": seen,
                "rows_unseen": n - seen, "min_times_seen": int(counts.min()), "max_times_seen": int(counts.max())}


def uses_thd_packing(model) -> bool:
    """Whether packed rows reach this chunk's attention as Megatron's THD `PackedSeqParams`.

    True when every core attention is Transformer Engine's: its causal kernels ignore a dense mask, so
    packed rows must arrive flattened with cu_seqlens. False for Megatron's local attention (it applies
    the block-diagonal mask; the model is built without the causal-only fused softmax for packed data,
    see `BuildOptions.packed_sequences`) and for prefix tuning's wrapper, which hands the inner attention
    an explicit arbitrary mask either way.
    """
    cores = [m for name, m in _unwrap(model).named_modules() if name.endswith("core_attention")]
    return bool(cores) and all(type(m).__name__.startswith("TE") for m in cores)


def packed_inputs(batch: dict, thd: bool) -> tuple[dict, torch.Tensor | None, object | None]:
    """What the attention of a packed micro-batch receives, per backend.

    Args:
        batch: collated [b, s] tensors (tokens, labels, loss_mask, position_ids, segment_ids).
        thd: Transformer Engine's THD path (see `uses_thd_packing`).

    Returns:
        (batch, attention_mask, packed_seq_params). THD: the batch flattened to [1, b * s] and
        `PackedSeqParams` whose cu_seqlens start a sequence at every segment and row boundary, no mask
        (always, even for rows of one example: every micro-batch of a packed run must travel between
        pipeline stages in the same shape). Otherwise: the batch unchanged and a block-diagonal causal
        mask [b, 1, s, s] when some row holds several examples (None when every row holds one: plain
        causal attention).
    """
    from nemo_adapt.data import attention_mask_from_segments, packed_seq_params

    seg = batch.get("segment_ids")
    if seg is None:
        return batch, None, None
    if thd:
        flat = {k: v.reshape(1, -1) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
        return flat, None, packed_seq_params(seg)
    # Segments are numbered 1, 2, ... per row (0 = padding, which only follows the last example),
    # so a row holds several examples exactly when its largest segment id exceeds 1.
    if not bool((seg.max(dim=1).values > 1).any()):
        return batch, None, None
    return batch, attention_mask_from_segments(seg), None


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    # output_tensor: per-token cross entropy, [b, s] (all positions) or [1, n] (answer positions
    # only; loss_mask is then all ones). Return the masked sum and the token count; Megatron
    # divides gradients by the global count (calculate_per_token_loss).
    mask = loss_mask.float().reshape(-1)
    losses = output_tensor.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


@contextlib.contextmanager
def _without_output_layer(gpt):
    # GPTModel returns the final-normed hidden states [s, b, h] when post_process is off.
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = True


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_step(data_iterator: Iterator[dict], model, thd: bool = False):
    """Megatron schedule callback: run one micro-batch through this chunk.

    On the last stage, logits are computed only where the loss mask is set (answer tokens), not
    at every position: for supervised fine-tuning most positions are prompt or padding, and the
    vocabulary projection is a large share of the FLOPs (21% of SmolLM2-135M's). The loss is the
    same; under sequence parallelism the hidden states are sequence-sharded, so the full
    projection is used there. `thd`: packed rows on Transformer Engine (`uses_thd_packing`): every
    micro-batch is flattened to THD (p2p shapes must not change between micro-batches).
    """
    from megatron.core import parallel_state as ps

    from nemo_adapt.peft.virtual_tokens import prepend_virtual_positions, virtual_token_count

    batch = next(data_iterator)
    # Prompt tuning / p-tuning: n placeholder positions in front of every row, on every stage (the
    # first stage's embedding hook fills them with the virtual tokens; they carry no loss).
    n_virtual = virtual_token_count(model)
    if n_virtual:
        batch = prepend_virtual_positions(batch, n_virtual)
    batch, mask, packed_params = packed_inputs(batch, thd)
    if ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        # This rank's 2 of the 2 x CP sequence chunks (Megatron's load-balanced causal split).
        batch = get_batch_on_this_cp_rank({k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")})
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    positions = batch["position_ids"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    extra = {}
    if packed_params is not None:
        extra["packed_seq_params"] = packed_seq_params_on(packed_params, device)
    gpt = _unwrap(model)
    if not gpt.post_process or gpt.config.sequence_parallel:
        out = model(tokens, positions, mask, labels=batch["labels"].to(device), **extra)
        return out, partial(_loss_func, loss_mask)
    with _without_output_layer(gpt):
        hidden = model(tokens, positions, mask, **extra)  # [s, b, h]
    keep = loss_mask.transpose(0, 1) > 0  # [s, b]
    if not bool(keep.any()):
        # Nothing to learn in this micro-batch; keep the graph connected for the backward pass.
        return (hidden.sum() * 0).reshape(1, 1), partial(_loss_func, torch.zeros(1, device=device))
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    # Float16Module hands the last stage's output back in fp32; the projection runs in the weights' dtype.
    out_dtype = (weight if weight is not None else gpt.output_layer.weight).dtype
    selected = hidden[keep].unsqueeze(1).to(out_dtype)  # [n, 1, h]
    labels = batch["labels"].to(device).transpose(0, 1)[keep].unsqueeze(0)  # [1, n]
    logits, _ = gpt.output_layer(selected, weight=weight)
    losses = gpt.compute_language_model_loss(labels, logits)  # [1, n]
    return losses, partial(_loss_func, torch.ones_like(losses))


def packed_seq_params_on(params, device):
    """`PackedSeqParams` with its tensors (cu_seqlens) on `device`, where the attention kernels run."""
    import dataclasses

    return dataclasses.replace(params, **{f.name: getattr(params, f.name).to(device) for f in dataclasses.fields(params)
                                          if torch.is_tensor(getattr(params, f.name))})


def run_schedule(ddp_chunks, microbatches: list[dict], seq_length: int, micro_batch_size: int,
                 forward_only: bool, packed: bool = False) -> tuple[float, float]:
    """Forward (and backward) over micro-batches with Megatron's pipeline schedule (no pipelining,
    1F1B, or interleaved 1F1B over this rank's chunks).

    Returns:
        (loss_sum, token_count) over this DP rank's micro-batches, known on every rank of the
        model-parallel group (the last pipeline stage computes it; it is broadcast to the others).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_adapt.peft.virtual_tokens import virtual_token_count

    ddp_chunks = model_chunks(ddp_chunks)
    # p2p shapes: virtual tokens (prompt tuning, p-tuning) lengthen every row on every stage.
    seq_length += virtual_token_count(ddp_chunks[0])
    # Decided once per schedule: every chunk of a model has the same attention backend.
    thd = packed and uses_thd_packing(ddp_chunks[0])
    if thd:
        # THD: each micro-batch travels flattened as one row of micro_batch_size x seq_length tokens.
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    fb = get_forward_backward_func()
    interleaved = len(ddp_chunks) > 1
    # The interleaved schedule pulls micro-batches per chunk: each chunk gets its own iterator over them.
    data = [iter(microbatches) for _ in ddp_chunks] if interleaved else iter(microbatches)
    losses = fb(forward_step_func=partial(forward_step, thd=thd), data_iterator=data,
                model=list(ddp_chunks) if interleaved else [ddp_chunks[0]],
                num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
                decoder_seq_length=seq_length, forward_only=forward_only)
    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for item in losses:
            total += item["lm loss"].double().cpu()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(total[0]), float(total[1])


def global_mean(loss_sum: float, tokens: float) -> float:
    """Per-token mean over all data-parallel (and context-parallel) ranks."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([loss_sum, tokens], dtype=torch.float64)
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if group.size() > 1:
        dist.all_reduce(t, group=group)
    return float(t[0] / max(t[1], 1.0))


def train_step(ddp_chunks, optimizer, microbatches: list[dict], seq_length: int, micro_batch_size: int,
               lr: float, packed: bool = False) -> tuple[float, float, bool]:
    """One optimizer step over this rank's micro-batches, at learning rate `lr` (times a group's
    multiplier, see `set_lr`).

    Returns:
        (loss, grad_norm, updated): global per-token loss of the batch, gradient norm, and whether
        the update was applied (False only when fp16 loss scaling finds inf/nan).
    """
    for chunk in model_chunks(ddp_chunks):
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = run_schedule(ddp_chunks, microbatches, seq_length, micro_batch_size, forward_only=False,
                                    packed=packed)
    set_lr(optimizer, lr)
    updated, grad_norm, _ = optimizer.step()
    return global_mean(loss_sum, tokens), float(grad_norm or 0.0), bool(updated)


@torch.no_grad()
def validation_loss(ddp_chunks, dataset, plan: BatchPlan, dp_rank: int, seq_length: int,
                    max_batches: int | None = None, packed: bool = False) -> float:
    """Per-token loss over the validation split (every rank returns the same value)."""
    ddp_chunks = model_chunks(ddp_chunks)
    for chunk in ddp_chunks:
        chunk.eval()
    try:
        per_rank = plan.global_batch_size // plan.data_parallel
        # Whole global batches only: pipeline p2p shapes assume full micro-batches (the trainer
        # refuses a validation split smaller than one global batch).
        n = len(dataset) - len(dataset) % plan.global_batch_size
        loss_sum = tokens = 0.0
        for b, start in enumerate(range(0, n, plan.global_batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            mine = list(range(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank))
            mbs = plan.micro_batch_size
            mb = [dataset.collate([dataset[i] for i in mine[j:j + mbs]]) for j in range(0, len(mine), mbs)]
            s, t = run_schedule(ddp_chunks, mb, seq_length, mbs, forward_only=True, packed=packed)
            loss_sum += s
            tokens += t
        return global_mean(loss_sum, tokens)
    finally:
        for chunk in ddp_chunks:
            chunk.train()
