"""Layout search: enumerate Megatron-Core layouts, check their constraints, estimate and rank them.

`plan(PlanRequest) -> PlanResult` is the entry point the CLI and the launcher use. It evaluates an
explicit layout when one is given (a recipe's `parallel:` section), enumerates every layout of the
cluster that satisfies the constraints, estimates memory (memory.py) and step time (perf.py) for each,
ranks the ones that fit by tokens/s/GPU and explains the ones that do not.

Constraints (each has a short name used in messages and in `PlanResult.rejected`):

- `world_size`: TP x PP x CP x DP equals the number of GPUs.
- `tp_heads`, `tp_kv_heads`, `tp_ffn`: TP divides the attention heads and the FFN width; the KV heads
  are a multiple or a divisor of TP (Megatron-Core replicates KV heads when TP exceeds them). The
  vocabulary is *padded* to a multiple of 128 x TP rather than rejected.
- `tp_nvlink`: TP divides the NVLink domain (the node; 72 on GB200 NVL72), so TP groups stay on NVLink.
- `pp_layers`: PP x VP divides the number of layers; or, with Megatron-Core's embedding/loss-aware
  split (`Layout.embedding_loss_split`, tried when PP does not divide L), the number of layers + 2.
- `cp_seq`: the sequence length is a multiple of 2 x CP (load-balanced causal context parallelism);
  `cp_max`: CP at most `max_context_parallel`.
- `sp_seq`: with sequence parallelism, seq_length / CP is divisible by TP.
- `batch`: the global batch is divisible by micro-batch x DP.
- `interleave`: with VP > 1 the micro-batches per step are a multiple of PP (Megatron-Core's
  `microbatch_group_size_per_vp_stage` defaults to PP).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nemo_adapt.errors import ConfigError, ParallelLayoutError
from nemo_adapt.models.spec import ModelSpec, get_model_spec
from nemo_adapt.planner.gpus import GPUSpec, get_gpu
from nemo_adapt.planner.memory import (
    PRECISIONS,
    RECOMPUTE_MODES,
    FitReport,
    Layout,
    MemoryAssumptions,
    PeftParams,
    estimate_memory,
    explain_fit,
    normalize_peft_args,
    padded_vocab_size,
    peft_param_breakdown,
)
from nemo_adapt.planner.perf import PerfAssumptions, PerfEstimate, estimate_step_time

# --------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One broken constraint."""

    constraint: str
    """Short name (`tp_heads`, `pp_layers`, ...)."""
    message: str
    """What is wrong and what is allowed."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_violations(spec: ModelSpec, tp: int, domain: int) -> list[Violation]:
    """Constraints on TP alone."""
    out = []
    a, g, f = spec.num_attention_heads, spec.num_query_groups, spec.ffn_hidden_size
    if a % tp:
        out.append(Violation("tp_heads", f"tensor={tp} does not divide num_attention_heads={a}"))
    if g % tp and tp % g:
        out.append(Violation("tp_kv_heads", f"tensor={tp} is neither a divisor nor a multiple of "
                                            f"num_query_groups={g}"))
    if f % tp:
        out.append(Violation("tp_ffn", f"tensor={tp} does not divide ffn_hidden_size={f}"))
    if domain % tp:
        out.append(Violation("tp_nvlink", f"tensor={tp} does not divide the NVLink domain of {domain} GPUs, "
                                          "so a TP group would span nodes"))
    return out


def allowed_tensor_sizes(spec: ModelSpec, domain: int) -> list[int]:
    """TP sizes that satisfy every TP constraint within an NVLink domain of `domain` GPUs."""
    return [t for t in _divisors(domain) if not _tp_violations(spec, t, domain)]


def layout_violations(spec: ModelSpec, layout: Layout, *, seq_length: int, global_batch_size: int,
                      world_size: int, nvlink_domain: int, max_context_parallel: int = 16) -> list[Violation]:
    """Every constraint an explicit layout breaks (empty when valid); see the module docstring.

    Args:
        spec: model architecture.
        layout: the layout to check.
        seq_length: tokens per sequence.
        global_batch_size: sequences per step.
        world_size: GPUs in the job.
        nvlink_domain: GPUs per NVLink domain (`GPUSpec.nvlink_domain_size`).
        max_context_parallel: largest CP considered.

    Returns:
        Violations, each naming the constraint, the values and what is allowed.
    """
    out = []
    t, p, v, c, d = layout.tp, layout.pp, layout.vp, layout.cp, layout.dp
    if layout.world_size != world_size:
        out.append(Violation("world_size", f"tensor*pipeline*context*data = {t}*{p}*{c}*{d} = {layout.world_size} "
                                           f"does not equal the {world_size} GPUs of the job"))
    tp_bad = _tp_violations(spec, t, nvlink_domain)
    if tp_bad:
        allowed = ", ".join(map(str, allowed_tensor_sizes(spec, nvlink_domain))) or "none"
        out += [Violation(x.constraint, f"{x.message} (allowed tensor sizes: {allowed})") for x in tp_bad]
    L = spec.num_layers
    split_error = layout.split_violation(L)
    if split_error:
        allowed = ", ".join(str(x) for x in _divisors(L))
        extra = ", ".join(str(x) for x in _divisors(L + 2) if x > 1 and (L + 2) // x >= 2)
        out.append(Violation("pp_layers", f"{split_error} (PP*VP must divide num_layers: {allowed}; or, with "
                                          f"embedding_loss_split, num_layers+2: {extra})"))
    if c > 1 and seq_length % (2 * c):
        out.append(Violation("cp_seq", f"seq_length={seq_length} is not a multiple of 2*context={2 * c}"))
    if c > max_context_parallel:
        out.append(Violation("cp_max", f"context={c} exceeds max_context_parallel={max_context_parallel}"))
    if layout.sp and (seq_length // c) % t:
        out.append(Violation("sp_seq", f"sequence_parallel needs seq_length/context = {seq_length // c} "
                                       f"divisible by tensor={t}"))
    mbs = layout.micro_batch_size
    if global_batch_size % (mbs * d):
        out.append(Violation("batch", f"global_batch_size={global_batch_size} is not divisible by "
                                      f"micro_batch_size*data = {mbs}*{d} = {mbs * d}"))
    elif v > 1:
        m = global_batch_size // (mbs * d)
        if m % p:
            out.append(Violation("interleave", f"virtual_pipeline={v} needs the {m} micro-batches per step to "
                                               f"be a multiple of pipeline={p} (Megatron-Core groups PP "
                                               "micro-batches per virtual stage)"))
    return out


def check_layout(spec: ModelSpec, layout: Layout, *, seq_length: int, global_batch_size: int, world_size: int,
                 nvlink_domain: int, max_context_parallel: int = 16) -> None:
    """Raise if an explicit layout breaks a constraint.

    Args:
        As for `layout_violations`.

    Raises:
        ParallelLayoutError: naming every broken constraint, e.g. "tensor=3 does not divide
            num_attention_heads=64 (allowed tensor sizes: 1, 2, 4, 8)".
    """
    bad = layout_violations(spec, layout, seq_length=seq_length, global_batch_size=global_batch_size,
                            world_size=world_size, nvlink_domain=nvlink_domain,
                            max_context_parallel=max_context_parallel)
    if bad:
        raise ParallelLayoutError(f"layout {layout.label()} for {spec.name}: " + "; ".join(v.message for v in bad))


def enumerate_layouts(spec: ModelSpec, *, world_size: int, nvlink_domain: int, seq_length: int,
                      global_batch_size: int, micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
                      max_context_parallel: int = 16, flash_attention: bool = True
                      ) -> tuple[list[Layout], Counter]:
    """All layouts of `world_size` GPUs that satisfy the constraints.

    Sequence parallelism is tried on and off when TP > 1; the distributed optimizer on and off when
    DP*CP > 1; recompute none/selective/full (selective is skipped under flash attention, where it is
    identical to none).

    Returns:
        (layouts, rejected) where rejected counts the pruned choices by constraint name.
    """
    rejected: Counter = Counter()
    out: list[Layout] = []
    L = spec.num_layers
    modes = ("none", "full") if flash_attention else RECOMPUTE_MODES
    for tp in _divisors(world_size):
        bad = _tp_violations(spec, tp, nvlink_domain)
        if bad:
            rejected[bad[0].constraint] += 1
            continue
        for pp in _divisors(world_size // tp):
            # Even split when PP divides L; otherwise Megatron-Core's embedding/loss-aware split when PP
            # divides L + 2 (first and last stages one layer short).
            if L % pp == 0:
                split, chunk_layers = False, L // pp
            elif pp > 1 and (L + 2) % pp == 0 and (L + 2) // pp >= 2:
                split, chunk_layers = True, (L + 2) // pp
            else:
                rejected["pp_layers"] += 1
                continue
            for cp in _divisors(world_size // (tp * pp)):
                if cp > max_context_parallel:
                    rejected["cp_max"] += 1
                    continue
                if cp > 1 and seq_length % (2 * cp):
                    rejected["cp_seq"] += 1
                    continue
                dp = world_size // (tp * pp * cp)
                for mbs in micro_batch_sizes:
                    if global_batch_size % (mbs * dp):
                        rejected["batch"] += 1
                        continue
                    m = global_batch_size // (mbs * dp)
                    for vp in (_divisors(chunk_layers) if pp > 1 else [1]):
                        if split and chunk_layers // vp < 2:
                            rejected["pp_layers"] += 1
                            continue
                        if vp > 1 and m % pp:
                            rejected["interleave"] += 1
                            continue
                        for sp in ((True, False) if tp > 1 else (False,)):
                            if sp and (seq_length // cp) % tp:
                                rejected["sp_seq"] += 1
                                continue
                            for rc in modes:
                                for do in ((True, False) if dp * cp > 1 else (True,)):
                                    out.append(Layout(tp=tp, pp=pp, vp=vp, cp=cp, dp=dp, micro_batch_size=mbs,
                                                      sequence_parallel=sp, recompute=rc,
                                                      distributed_optimizer=do, embedding_loss_split=split))
    return out, rejected


# --------------------------------------------------------------------------------------------------
# Request / result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a model, a method, a cluster and a batch; optionally a layout to evaluate."""

    model: str | ModelSpec
    """Registered model name or a ModelSpec."""
    gpu: str | GPUSpec
    """GPU type (catalog name or shorthand)."""
    nodes: int
    """Number of nodes."""
    gpus_per_node: int
    """GPUs per node."""
    seq_length: int = 4096
    """Tokens per sequence."""
    global_batch_size: int = 32
    """Sequences per optimizer step."""
    method: str = "none"
    """PEFT method; `none` is full fine-tuning."""
    peft_args: dict = field(default_factory=dict)
    """PEFT method arguments (rank, target_modules, bottleneck, num_virtual_tokens, ...)."""
    precision: str = "bf16"
    """bf16, fp8 or fp32."""
    layout: Layout | None = None
    """Explicit layout to evaluate (a recipe's `parallel:` section); alternatives are ranked anyway."""
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Micro-batch sizes the search tries."""
    max_context_parallel: int = 16
    """Largest context-parallel size the search tries."""
    memory: MemoryAssumptions = field(default_factory=MemoryAssumptions)
    """Memory allowances and dtype choices."""
    perf: PerfAssumptions = field(default_factory=PerfAssumptions)
    """Efficiency assumptions."""
    source: str | None = None
    """Recipe path the request came from, if any."""

    def __post_init__(self):
        for key in ("nodes", "gpus_per_node", "seq_length", "global_batch_size", "max_context_parallel"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"plan: {key}={value!r} must be a positive integer")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"plan: precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if not self.micro_batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.micro_batch_sizes):
            raise ConfigError(f"plan: micro_batch_sizes={self.micro_batch_sizes!r} must be positive integers")


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout."""

    layout: Layout
    """The layout."""
    fit: FitReport
    """Memory estimate and whether it fits."""
    perf: PerfEstimate
    """Step time and throughput estimate."""

    @property
    def fits(self) -> bool:
        """Worst stage within GPU memory."""
        return self.fit.fits

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {"layout": self.layout.to_dict(), "label": self.layout.label(), "fits": self.fits,
                "reason": self.fit.reason, "memory_gib": round(self.fit.required_gib, 3),
                "memory": self.fit.breakdown.to_dict(),
                "perf": {k: v for k, v in self.perf.to_dict().items() if k != "flops"},
                "flops_per_token": self.perf.to_dict()["flops"]}


@dataclass
class PlanResult:
    """The plan: the explicit layout's verdict, ranked layouts that fit, and why the others do not."""

    model: ModelSpec
    """Model planned for."""
    gpu: GPUSpec
    """GPU type."""
    request: PlanRequest
    """The request (with the resolved model and GPU)."""
    world_size: int
    """GPUs in the job."""
    total_params: int
    """Model parameters."""
    trainable_params: int
    """Trainable parameters while training (= total_params for full fine-tuning)."""
    explicit: Candidate | None = None
    """Evaluation of the explicit layout, when it satisfied the constraints."""
    explicit_error: str | None = None
    """Why the explicit layout is invalid (constraint violations), when it is."""
    ranked: list[Candidate] = field(default_factory=list)
    """Layouts that fit, fastest first (variants differing only in SP/DO folded into the better one)."""
    infeasible: list[Candidate] = field(default_factory=list)
    """Valid layouts that do not fit, closest to fitting first."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Choices pruned by each constraint during enumeration."""
    considered: int = 0
    """Layouts that satisfied the constraints and were estimated."""
    notes: list[str] = field(default_factory=list)
    """Warnings and assumptions that applied."""
    elapsed_s: float = 0.0
    """Planner wall time."""

    @property
    def best(self) -> Candidate | None:
        """Fastest layout that fits, or None."""
        return self.ranked[0] if self.ranked else None

    @property
    def ok(self) -> bool:
        """The explicit layout (if any) is valid and fits; otherwise, something fits."""
        if self.request.layout is not None:
            return self.explicit is not None and self.explicit.fits
        return bool(self.ranked)

    def to_dict(self, top: int = 10) -> dict:
        """JSON-friendly form; `top` limits the ranked and infeasible lists."""
        req = self.request
        return {
            "model": self.model.name, "method": req.method, "peft_args": _jsonable(req.peft_args),
            "precision": req.precision,
            "gpu": {"name": self.gpu.name, "memory_gib": self.gpu.memory_gib},
            "nodes": req.nodes, "gpus_per_node": req.gpus_per_node, "world_size": self.world_size,
            "seq_length": req.seq_length, "global_batch_size": req.global_batch_size,
            "total_params": self.total_params, "trainable_params": self.trainable_params,
            "recipe": req.source, "ok": self.ok,
            "explicit": self.explicit.to_dict() if self.explicit else None,
            "explicit_error": self.explicit_error,
            "ranked": [c.to_dict() for c in self.ranked[:top]], "num_fitting": len(self.ranked),
            "infeasible": [c.to_dict() for c in self.infeasible[:top]], "num_infeasible": len(self.infeasible),
            "rejected": dict(self.rejected), "considered": self.considered,
            "assumptions": {"memory": _jsonable(vars(req.memory)), "perf": _jsonable(vars(req.perf))},
            "notes": list(self.notes), "elapsed_s": self.elapsed_s,
        }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def _resolve_model(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    try:
        return get_model_spec(model)
    except KeyError as err:
        raise ConfigError(f"model.name: {err.args[0]}") from None


def evaluate_layout(spec: ModelSpec, layout: Layout, gpu: GPUSpec, *, gpus_per_node: int, method: str = "none",
                    seq_length: int, global_batch_size: int, precision: str = "bf16",
                    peft_args: dict | None = None, memory: MemoryAssumptions | None = None,
                    perf: PerfAssumptions | None = None, world_size: int | None = None,
                    max_context_parallel: int = 16, validate: bool = True, peft: PeftParams | None = None
                    ) -> Candidate:
    """Estimate memory and throughput of one layout.

    Args:
        spec: model architecture.
        layout: the layout.
        gpu: GPU type.
        gpus_per_node: GPUs per node.
        method, seq_length, global_batch_size, precision, peft_args: the training job.
        memory, perf: assumptions.
        world_size: GPUs in the job (defaults to the layout's size).
        max_context_parallel: largest CP allowed.
        validate: check the constraints first.
        peft: precomputed `peft_param_breakdown` (saves time when evaluating many layouts).

    Returns:
        Candidate (memory fit report and performance estimate).

    Raises:
        ParallelLayoutError: the layout breaks a constraint (message names it).
    """
    memory = memory or MemoryAssumptions()
    domain = gpu.nvlink_domain_size(gpus_per_node)
    if validate:
        check_layout(spec, layout, seq_length=seq_length, global_batch_size=global_batch_size,
                     world_size=world_size or layout.world_size, nvlink_domain=domain,
                     max_context_parallel=max_context_parallel)
    breakdown = estimate_memory(spec, layout, method, seq_length=seq_length, global_batch_size=global_batch_size,
                                precision=precision, peft_args=peft_args, assumptions=memory, peft=peft)
    estimate = estimate_step_time(spec, layout, gpu, gpus_per_node, method, seq_length=seq_length,
                                  global_batch_size=global_batch_size, precision=precision, peft_args=peft_args,
                                  assumptions=perf, flash_attention=memory.flash_attention,
                                  grad_dtype=memory.grad_dtype, peft=peft)
    return Candidate(layout=layout, fit=explain_fit(breakdown, gpu), perf=estimate)


def _impossible_message(spec: ModelSpec, req: PlanRequest, world: int, domain: int) -> str:
    tps = allowed_tensor_sizes(spec, domain)
    pps = _divisors(spec.num_layers)
    cps = [c for c in _divisors(req.max_context_parallel) if c == 1 or req.seq_length % (2 * c) == 0]
    bound = max(tps or [1]) * max(pps) * max(cps) * req.global_batch_size
    return (
        f"no parallel layout of {world} GPUs ({req.nodes} node(s) x {req.gpus_per_node}) satisfies the constraints "
        f"for {spec.name}: GPUs = TP*PP*CP*DP with TP in {tps} (divides num_attention_heads="
        f"{spec.num_attention_heads}, ffn_hidden_size={spec.ffn_hidden_size}, the {domain}-GPU NVLink domain; KV heads "
        f"{spec.num_query_groups}), PP*VP dividing num_layers={spec.num_layers}, CP in {cps} (seq_length="
        f"{req.seq_length} a multiple of 2*CP), and DP*micro_batch dividing global_batch_size="
        f"{req.global_batch_size}; at most {max(tps or [1])}*{max(pps)}*{max(cps)}*{req.global_batch_size} = {bound} "
        f"GPUs can be used and {world} must factor exactly. Use fewer GPUs or a larger global batch."
    )


def plan(request: PlanRequest) -> PlanResult:
    """Plan a fine-tuning job: evaluate the explicit layout, enumerate and rank the alternatives.

    Args:
        request: the PlanRequest.

    Returns:
        PlanResult. An explicit layout that breaks a constraint is reported in `explicit_error` (the
        alternatives are still ranked); one that does not fit is `explicit` with `fits == False`.

    Raises:
        ConfigError: unknown model, GPU type, PEFT method/argument, or FP8 on a GPU without it.
        ParallelLayoutError: no layout of the requested GPUs satisfies the constraints at all.
    """
    start = time.perf_counter()
    spec = _resolve_model(request.model)
    gpu = request.gpu if isinstance(request.gpu, GPUSpec) else get_gpu(request.gpu)
    gpu.peak_tflops(request.precision)  # FP8 on a GPU without FP8 fails here, with a clear message
    method = request.method
    peft_args = dict(request.peft_args)
    normalize_peft_args(method, **peft_args)
    peft = None if method == "none" else peft_param_breakdown(spec, method, **peft_args)
    trainable = spec.num_parameters() if peft is None else peft.training_total
    world = request.nodes * request.gpus_per_node
    domain = gpu.nvlink_domain_size(request.gpus_per_node)
    job = dict(gpus_per_node=request.gpus_per_node, method=method, seq_length=request.seq_length,
               global_batch_size=request.global_batch_size, precision=request.precision, peft_args=peft_args,
               memory=request.memory, perf=request.perf, peft=peft)
    result = PlanResult(model=spec, gpu=gpu, request=request, world_size=world, total_params=spec.num_parameters(),
                        trainable_params=trainable)
    if request.seq_length > spec.max_position_embeddings:
        result.notes.append(f"seq_length={request.seq_length} exceeds {spec.name}'s max_position_embeddings="
                            f"{spec.max_position_embeddings}")

    if request.layout is not None:
        bad = layout_violations(spec, request.layout, seq_length=request.seq_length,
                                global_batch_size=request.global_batch_size, world_size=world, nvlink_domain=domain,
                                max_context_parallel=request.max_context_parallel)
        if bad:
            result.explicit_error = "; ".join(f"[{v.constraint}] {v.message}" for v in bad)
        else:
            result.explicit = evaluate_layout(spec, request.layout, gpu, validate=False, **job)

    layouts, rejected = enumerate_layouts(
        spec, world_size=world, nvlink_domain=domain, seq_length=request.seq_length,
        global_batch_size=request.global_batch_size, micro_batch_sizes=tuple(request.micro_batch_sizes),
        max_context_parallel=request.max_context_parallel, flash_attention=request.memory.flash_attention)
    result.rejected = dict(rejected)
    if not layouts:
        msg = _impossible_message(spec, request, world, domain)
        if result.explicit_error:
            msg = f"{msg} Recipe layout: {result.explicit_error}"
        raise ParallelLayoutError(msg)

    fitting: dict[tuple, Candidate] = {}
    infeasible = []
    for layout in layouts:
        cand = evaluate_layout(spec, layout, gpu, validate=False, **job)
        if not cand.fits:
            infeasible.append(cand)
            continue
        # Fold variants that differ only in sequence parallelism / distributed optimizer: keep the faster,
        # then the smaller.
        key = (layout.tp, layout.pp, layout.vp, layout.cp, layout.dp, layout.micro_batch_size, layout.recompute,
               layout.embedding_loss_split)
        best = fitting.get(key)
        if best is None or _rank_key(cand) < _rank_key(best):
            fitting[key] = cand
    result.considered = len(layouts)
    result.ranked = sorted(fitting.values(), key=_rank_key)
    result.infeasible = sorted(infeasible, key=lambda c: c.fit.required_gib - c.fit.capacity_gib)
    vocab_pad = padded_vocab_size(spec.vocab_size, 1)
    if vocab_pad != spec.vocab_size:
        result.notes.append(f"vocabulary {spec.vocab_size} is padded by Megatron to a multiple of 128*TP "
                            f"({vocab_pad} at TP1)")
    result.elapsed_s = time.perf_counter() - start
    return result


def _rank_key(c: Candidate) -> tuple:
    # Throughput first (whole tokens/s, so exact ties fall to memory), then the smaller footprint.
    return (-round(c.perf.tokens_per_s_per_gpu), c.fit.required_gib)


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


def model_name_for_recipe(cfg) -> str:
    """The registered architecture a recipe trains, found without opening its checkpoint.

    `embedded:smollm2_135m` and `random:<name>` checkpoints name their architecture; any other checkpoint
    (a Hugging Face directory, a .gguf file: usually only reachable inside the job) is taken to be
    `model.name`, which the trainer checks against the checkpoint's config when it opens it.

    Args:
        cfg: a validated `RecipeConfig`.

    Raises:
        ConfigError: the checkpoint names an architecture other than `model.name` (the trainer refuses
            that mismatch when it opens the checkpoint).
    """
    from nemo_adapt.models.embedded import EMBEDDED_NAME, EMBEDDED_SPEC
    from nemo_adapt.models.random_init import PREFIX

    checkpoint = str(cfg.model.checkpoint)
    if checkpoint in (EMBEDDED_NAME, "embedded"):
        named = EMBEDDED_SPEC
    elif checkpoint.startswith(PREFIX):
        named = checkpoint[len(PREFIX):]
    else:
        return cfg.model.name
    if named != cfg.model.name:
        from nemo_adapt.config.schema import ModelConfig

        default = ModelConfig()  # at most one of the two is its default: the defaults agree
        if checkpoint == default.checkpoint:
            what, fix = (" (its default)", f"give model.checkpoint (a Hugging Face directory or .gguf file of "
                                           f"{cfg.model.name}) or set model.name={named}")
        else:
            what, fix = "", f"set model.name={named}"
        unset = " (its default)" if cfg.model.name == default.name else ""
        raise ConfigError(f"model.checkpoint={checkpoint!r}{what} holds the {named} architecture, but model.name="
                          f"{cfg.model.name!r}{unset}; {fix}")
    return named


def _peft_args_from_config(peft) -> tuple[str, dict]:
    """The method name and arguments to plan with: every field of the recipe's typed `peft` config, so the
    method counts its parameters with exactly the trainer's values (its defaults included)."""
    import dataclasses

    args = {f.name: getattr(peft, f.name) for f in dataclasses.fields(peft) if f.name not in ("method", "init_from")}
    return peft.method, {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def request_from_config(cfg, *, gpu: str | None = None, nodes: int | None = None, gpus_per_node: int | None = None,
                        seq_length: int | None = None, global_batch_size: int | None = None,
                        precision: str | None = None, source: str | None = None, **request_kwargs) -> PlanRequest:
    """Build a PlanRequest from a validated recipe config (`nemo_adapt.config.load_recipe`), with overrides.

    Every value the trainer would use is read from `cfg`, so a key the recipe leaves unset has the
    trainer's default (the schema dataclasses' and the PEFT method's config defaults): e.g.
    `parallel.distributed_optimizer` unset is the trainer's `false`, `peft.rank` unset is the method's
    default rank. The layout is always the recipe's (the schema's TP1/PP1 when it has no `parallel:`
    section), as the trainer would run it; `train.precision=auto` is planned as bf16 (what the trainer
    picks on a GPU).

    Reads: the architecture (`model_name_for_recipe`); peft.method and the arguments its parameter count
    takes; parallel.{tensor, pipeline, virtual_pipeline, context, sequence_parallel,
    distributed_optimizer, recompute}; data.seq_length; train.{global_batch_size, micro_batch_size,
    precision}; cluster.{gpu, nodes, gpus_per_node}.

    Args:
        cfg: the `RecipeConfig`.
        gpu, nodes, gpus_per_node, seq_length, global_batch_size, precision: override the recipe.
        source: the recipe file, for messages and `PlanRequest.source`.
        **request_kwargs: further PlanRequest fields (micro_batch_sizes, memory, perf, ...).

    Raises:
        ConfigError: no GPU type (a CPU recipe without --gpu), a method the planner does not model, or
            invalid values (named).
    """
    where = f"{source}: " if source else ""
    model = model_name_for_recipe(cfg)
    method, peft_args = _peft_args_from_config(cfg.peft)
    gpu_name = gpu if gpu is not None else cfg.cluster.gpu
    if gpu_name is None:
        raise ConfigError(f"{where}cluster.gpu is not set (a CPU recipe); pass --gpu to plan it for a GPU type")
    n_nodes = nodes if nodes is not None else cfg.cluster.nodes
    gpn = gpus_per_node if gpus_per_node is not None else cfg.cluster.gpus_per_node
    seq = seq_length if seq_length is not None else cfg.data.seq_length
    gbs = global_batch_size if global_batch_size is not None else cfg.train.global_batch_size
    prec = precision if precision is not None else cfg.train.precision
    if prec == "auto":  # the trainer's `auto` is bf16 on a GPU, which is what the planner sizes
        prec = "bf16"
    if prec not in PRECISIONS:
        raise ConfigError(f"{where}train.precision={prec!r}; the planner models: {', '.join(PRECISIONS)}")

    p = cfg.parallel
    mp = p.tensor * p.pipeline * p.context
    # A DP that does not divide evenly is reported as a `world_size` violation by the planner.
    dp = max(1, (n_nodes * gpn) // mp)
    try:
        layout = Layout(tp=p.tensor, pp=p.pipeline, vp=p.virtual_pipeline or 1, cp=p.context, dp=dp,
                        micro_batch_size=cfg.train.micro_batch_size, sequence_parallel=p.sequence_parallel,
                        recompute=p.recompute or "none", distributed_optimizer=p.distributed_optimizer)
    except ConfigError as err:
        raise type(err)(f"{where}parallel: {err}") from None
    if "max_context_parallel" not in request_kwargs and not _context_parallel_possible(cfg):
        # Alternatives must be layouts the trainer runs: no context parallelism where its preflight refuses it.
        request_kwargs["max_context_parallel"] = 1
    return PlanRequest(model=model, gpu=gpu_name, nodes=n_nodes, gpus_per_node=gpn, seq_length=seq,
                       global_batch_size=gbs, method=method, peft_args=peft_args, precision=prec, layout=layout,
                       source=source, **request_kwargs)


def _context_parallel_possible(cfg) -> bool:
    """Whether the trainer could run this recipe with context parallelism at all (see
    `training.preflight.check_recipe`): not with packed rows, nor for methods that refuse it."""
    from nemo_adapt.peft.base import get_peft_method

    method = get_peft_method(cfg.peft.method)
    return not cfg.data.packing and (method is None or method.supports_context_parallel)


def request_from_recipe(path: str | Path, *, gpu: str | None = None, nodes: int | None = None,
                        gpus_per_node: int | None = None, seq_length: int | None = None,
                        global_batch_size: int | None = None, precision: str | None = None,
                        overrides: list[str] | tuple[str, ...] = (), **request_kwargs) -> PlanRequest:
    """Build a PlanRequest from a recipe file, loaded and validated as the trainer loads it.

    The recipe goes through `nemo_adapt.config.load_recipe` (the trainer's loader: schema defaults,
    `key=value` overrides, validation with file:line), then `request_from_config`; so `nemo-adapt plan`
    and `nemo-adapt launch` plan exactly what `nemo-adapt run` would train.

    Args:
        path: recipe file.
        gpu, nodes, gpus_per_node, seq_length, global_batch_size, precision: override the recipe.
        overrides: `key=value` recipe overrides.
        **request_kwargs: further PlanRequest fields (micro_batch_sizes, memory, perf, ...).

    Raises:
        ConfigError: missing file, invalid recipe (file:line), no GPU type, or invalid values (named).
    """
    from nemo_adapt.config import load_recipe  # lazy: the schema imports the PEFT registry (PyTorch)

    cfg = load_recipe(path, list(overrides))
    return request_from_config(cfg, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, seq_length=seq_length,
                               global_batch_size=global_batch_size, precision=precision, source=str(path),
                               **request_kwargs)


__all__ = [
    "Candidate", "PlanRequest", "PlanResult", "Violation", "allowed_tensor_sizes", "check_layout",
    "enumerate_layouts", "evaluate_layout", "layout_violations", "model_name_for_recipe", "plan",
    "request_from_config", "request_from_recipe",
]

