"""Run Megatron-Core on CPU over gloo: the development and CI backend.

Megatron-Core is written for CUDA. On a machine without it, a handful of places fail:

* device placement: `torch.cuda.current_device()`, `device="cuda"` tensors in the pipeline
  schedules, p2p communication, the DDP grad buffer, rotary embeddings and the optimizer;
* CUDA streams and synchronisation in the DDP grad buffer and p2p communication;
* the CUDA RNG tracker (`get_cuda_rng_tracker().fork()` around dropout, and
  `model_parallel_cuda_manual_seed`), which reads and writes CUDA generator states;
* type checks that expect `'torch.cuda.FloatTensor'` (grad clipping, optimizer param groups)
  and `tensor.cuda()` calls (tied-embedding sync across pipeline stages, optimizer reload);
* activation recompute (`parallel.recompute`): Megatron's `CheckpointFunction` saves and restores
  the CUDA generator state around the recomputed forward (`_get_cuda_rng_state`/`_set_cuda_rng_state`);
  on CPU the generator is the CPU one, whose state it then saves and restores (dropout masks of the
  recomputed forward equal the first forward's, as on GPU);
* sequence parallelism: `WrappedTorchNorm`, the norm Megatron builds without Transformer Engine or
  apex, refuses `sequence_parallel=True`.

`install()` fixes exactly these, and only when CUDA is unavailable; on a GPU it returns at once and
the GPU path runs unmodified. It does not touch `torch` globally: inside Megatron-Core's own modules,
the name `torch` is rebound to a view that forwards everything to torch except CUDA placement
requests, which it sends to the CPU. The two type-check/`.cuda()` sites are wrapped so that, only
for the duration of those calls, CPU tensors answer as their CUDA counterparts would.

Sequence parallelism (TP > 1 with `sequence_parallel=True`) runs through Megatron's own SP code.
Under SP each TP rank holds a slice of the sequence, and the replicated norm weights get a partial
gradient on each rank; Megatron's other norms mark those weights `sequence_parallel`, and
`finalize_model_grads` sums their gradients over the TP group. On CPU `WrappedTorchNorm` is built
as without SP and its parameters get the same mark; the norm's forward is per token, so nothing
else differs. The SP collectives need no substitute: gloo (torch 2.13, the pinned version)
implements every one Megatron-Core calls on this path, natively and for fp32/bf16/fp16 alike:
`torch.distributed.all_gather_into_tensor` (module alias `dist_all_gather_func` in
`tensor_parallel.mappings` and `.layers`: sequence gather before column-parallel layers, and its
async re-gather in their backward), `torch.distributed.reduce_scatter_tensor` (alias
`dist_reduce_scatter_func`: sequence reduce-scatter after row-parallel layers, and the async
input-grad reduce-scatter in column-parallel backward) and `all_reduce` (the norm gradients, in
`finalize_model_grads`). (Older torch releases had no gloo reduce-scatter; the pin is what makes
a substitute unnecessary.) Gloo computes these itself, so an SP run's losses equal a non-SP run's
to float rounding (tests/distributed/test_sequence_parallel.py).

Nothing here changes numerics: every operation still runs in torch on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import sys
import types

import torch

_INSTALLED = False

# Modules whose functions we need on CPU. Importing them before rebinding `torch` means their
# module globals exist; modules Megatron imports later are covered by a second pass in install().
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.inference.contexts.static_context",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.utils",
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int is a CUDA ordinal in Megatron's usage (`device=torch.cuda.current_device()` on GPU).
    return isinstance(device, int) and not isinstance(device, bool)


class _NullStream:
    """Stands in for a CUDA stream/event: CPU work is synchronous, so there is nothing to order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(*args, **kwargs):
    return None


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as Megatron-Core sees it on CPU: the CPU is the current device."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: torch.device("cpu")
        self.is_available = lambda: False
        self.synchronize = _noop
        self.empty_cache = _noop
        self.Stream = _NullStream
        self.Event = _NullStream
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.default_stream = lambda *a, **k: _NullStream()
        self.current_stream = lambda *a, **k: _NullStream()
        self.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=lambda *a, **k: contextlib.nullcontext())
        self.manual_seed = torch.manual_seed
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.reset_peak_memory_stats = _noop

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu(types.ModuleType):
    """`torch` as Megatron-Core's modules see it on CPU: tensor factories asked for a CUDA device
    build CPU tensors, and `torch.cuda` is `_CpuCuda`. Everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
                  "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_ANSWERING_AS_CUDA = False


@contextlib.contextmanager
def _cpu_tensors_answer_as_cuda():
    """While active, `t.type()` of a CPU tensor names its CUDA type and `t.cuda()` returns `t`.

    Megatron asserts `param.grad.type() == 'torch.cuda.FloatTensor'` and calls `.cuda()` in a few
    functions; this is applied around exactly those calls (see install()).
    """
    global _ANSWERING_AS_CUDA
    if _ANSWERING_AS_CUDA:  # nested wrapped calls (DistributedOptimizer.__init__ -> its helpers)
        yield
        return
    orig_type, orig_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return orig_type(self).replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, *args, **kwargs)

    def cuda_(self, *args, **kwargs):
        return self

    torch.Tensor.type, torch.Tensor.cuda = type_, cuda_
    _ANSWERING_AS_CUDA = True
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = orig_type, orig_cuda
        _ANSWERING_AS_CUDA = False


def _scoped(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_answer_as_cuda():
            return fn(*args, **kwargs)

    wrapper._nemo_adapt_cpu = True
    return wrapper


def _wrap_attr(owner, name: str) -> None:
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if fn is None or getattr(fn, "_nemo_adapt_cpu", False):
        return
    if isinstance(fn, staticmethod):
        setattr(owner, name, staticmethod(_scoped(fn.__func__)))
    elif isinstance(fn, classmethod):
        setattr(owner, name, classmethod(_scoped(fn.__func__)))
    else:
        setattr(owner, name, _scoped(fn))


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams, kept as CPU generator states.

        Same contract as CudaRNGStatesTracker: `add(name, seed)` registers a stream, `fork(name)`
        runs a block on that stream and restores the default stream afterwards.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU counterpart of Megatron's `model_parallel_cuda_manual_seed`, with the same seed offsets.

    The default stream (data-parallel regions) gets `seed` on every rank; the tensor-parallel
    stream gets `seed + 2718 + tp_rank` so dropout differs across TP shards, as on GPU.
    """
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def _rebind_torch_in_megatron(view: types.ModuleType) -> int:
    count = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = view
            count += 1
    return count


def install() -> bool:
    """Make Megatron-Core usable on CPU. Idempotent; returns True when the CPU backend is active.

    Call it before building models when `torch.cuda.is_available()` is False (the runtime in
    `nemo_adapt.parallel.runtime` does). On a CUDA machine it does nothing and returns False.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        # Modules imported since the first call get the CPU view too.
        _rebind_torch_in_megatron(_VIEW)
        return True
    for name in _MEGATRON_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _rebind_torch_in_megatron(_VIEW)

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Sites that check CUDA tensor type names or call .cuda() (see module docstring).
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _wrap_attr(language_module.LanguageModule, "setup_embeddings_and_output_layer")
    _wrap_attr(clip_grads, "clip_grad_by_total_norm_fp32")
    _wrap_attr(optimizer, "clip_grad_by_total_norm_fp32")
    _wrap_attr(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _wrap_attr(optimizer.MegatronOptimizer, "_get_model_and_main_params_data_float16")
    _wrap_attr(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")
    _wrap_attr(distrib_optimizer.DistributedOptimizer, "__init__")
    # Gathers optimizer shards over DP for the `fully_reshardable` checkpoint format (`.cuda()`).
    _wrap_attr(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero")
    _keep_torch_adam_step_out_of_shard_loads(distrib_optimizer.DistributedOptimizer)
    _let_torch_norms_run_sequence_parallel()
    _recompute_with_cpu_rng()
    _INSTALLED = True
    return True


def _recompute_with_cpu_rng() -> None:
    """Activation recompute keeps "the CUDA RNG state" of the first forward and restores it for the
    recomputed one (`tensor_parallel.random.CheckpointFunction`, by module-level name): on CPU that
    generator is the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _let_torch_norms_run_sequence_parallel() -> None:
    """Under sequence parallelism each TP rank normalises its own slice of the sequence with a full
    copy of the norm's weight, so that weight's gradient is a partial sum per rank. Megatron's norms
    (TE's, apex's) mark their parameters `sequence_parallel` and `finalize_model_grads` then sums
    their gradients over the TP group. `WrappedTorchNorm`, the only norm without TE or apex (always
    so on CPU), does not mark them and refuses SP instead. Build it as without SP and mark its
    parameters, as the other norms do: the forward is per token, so nothing else differs."""
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    new = cls.__dict__.get("__new__")
    fn = new.__func__ if isinstance(new, staticmethod) else new
    if fn is None or getattr(fn, "_nemo_adapt_cpu", False):
        return

    @functools.wraps(fn)
    def wrapper(cls_, *args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else args[0]
        if not getattr(config, "sequence_parallel", False):
            return fn(cls_, *args, **kwargs)
        local = copy.copy(config)
        local.sequence_parallel = False
        if "config" in kwargs:
            kwargs["config"] = local
        else:
            args = (local, *args[1:])
        norm = fn(cls_, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    wrapper._nemo_adapt_cpu = True
    cls.__new__ = staticmethod(wrapper)


def _keep_torch_adam_step_out_of_shard_loads(cls) -> None:
    """Loading a distributed-optimizer checkpoint copies each saved state tensor into the live Adam
    state, key by key. Without Transformer Engine or apex (always so on CPU) the optimizer is torch's
    Adam, whose state also holds a per-parameter `step` that Megatron restores separately (from the
    parameter groups) and never saves per shard; the copy then fails on the missing key. Hide `step`
    during the copy."""
    fn = cls.__dict__.get("_set_main_param_and_optimizer_states")
    if fn is None or getattr(fn, "_nemo_adapt_cpu", False):
        return

    @functools.wraps(fn)
    def wrapper(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return fn(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return fn(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    wrapper._nemo_adapt_cpu = True
    cls._set_main_param_and_optimizer_states = wrapper


_VIEW = _TorchOnCpu()
