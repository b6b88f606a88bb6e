"""PEFT methods as registered, model-agnostic transforms over Megatron-Core modules.

A method is a `PeftMethod` subclass registered with `@register_peft("name")` next to its
definition, paired with a typed `PeftConfig` subclass. Applying it:

1. freezes every base parameter;
2. walks the model's modules and calls `transform(module, name, config)` on each, which returns
   the module to keep (the same one, or a wrapper holding it as `base_layer`);
3. lets `apply_model_level` add things that are not per-module (virtual-token embeddings, ...).

Parameters a method adds are marked `is_adapter = True` (weight maps and adapter checkpoints key on
it) and keep `requires_grad=True`. Some methods wrap linear layers (LoRA, DoRA, IA3), some insert
modules after attention/MLP (adapters), some prepend to the embeddings (prompt tuning, p-tuning),
some add per-layer keys/values (prefix tuning); all fit these three hooks.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import ClassVar

import torch

from nemo_adapt.errors import ConfigError

_METHODS: dict[str, type[PeftMethod]] = {}


@dataclass
class PeftConfig:
    """Settings shared by every method; each method subclasses this with its own fields."""

    method: str = "none"
    """Registered method name (`none` trains every parameter: full fine-tuning)."""
    init_from: str | None = None
    """An adapter directory (a nemo-adapt artifact or a Hugging Face PEFT adapter) of this method and base model
    whose tensors a fresh run starts from, to continue training it. Its settings that shape the adapter (rank,
    targets, layers, token counts, alpha, ...) replace the recipe's, with one warning naming each; the
    recipe keeps its training settings (`training_fields`). A resume starts from its checkpoint instead."""

    def __post_init__(self):
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"peft.init_from={self.init_from!r} must be an adapter directory path (or null)")
        if self.init_from is not None and self.method == "none":
            raise ConfigError("peft.init_from starts an adapter from a saved one; peft.method=none (full "
                              "fine-tuning) has no adapter: set model.checkpoint to the weights to start from")


class PeftMethod:
    """Base class of a PEFT method. Subclasses set `config_class` and override the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PeftConfig]] = PeftConfig
    paper: ClassVar[str] = ""
    supports_context_parallel: ClassVar[bool] = True
    """Whether the method runs with context parallelism (the sequence split over ranks in attention)."""
    context_parallel_note: ClassVar[str] = ""
    """Why not, when it does not (shown in the preflight error)."""
    resume_safe_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields a resume may change (`checkpoint.resume_changes`): they leave the adapter's tensors as
    they are. Any other field changes what the checkpoint holds (rank, targets, layers, token counts)."""
    training_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields that change how the adapter trains, not what it is or computes (dropout, learning-rate
    ratios, how it is initialised): `peft.init_from` keeps the recipe's values for these."""
    tokenizer = None
    """The model's tokenizer, for methods initialised from text (set by `apply_peft`; may stay None)."""

    # ---- what the method costs: the planner asks these (no other module keeps a method's formulas)

    @classmethod
    def parameter_counts(cls, config: PeftConfig, spec) -> tuple[dict[str, int], dict[str, int]]:
        """Trainable parameters on the whole model (no sharding), by component, in closed form.

        Args:
            config: the method's validated config.
            spec: `models.spec.ModelSpec`.

        Returns:
            (while training, in the saved adapter): {component: parameters}. They differ where training uses
            what is not saved (a p-tuning encoder, a prefix-tuning reparameterisation).

        Raises:
            ConfigError: the config does not fit the model (e.g. a layer index beyond it).
        """
        raise NotImplementedError(f"PEFT method {cls.name!r} does not state its parameter counts")

    @classmethod
    def rank_parameter_counts(cls, config: PeftConfig, spec, tp: int) -> tuple[float, float, float]:
        """Trainable parameters one tensor-parallel rank holds while training: (per transformer layer, extra on
        the first pipeline stage, extra on every stage). At tp=1, num_layers * per_layer + first + every equals
        the training total of `parameter_counts`."""
        raise NotImplementedError(f"PEFT method {cls.name!r} does not state its per-rank parameter counts")

    @classmethod
    def context_tokens(cls, config: PeftConfig) -> int:
        """Tokens the method prepends to every sequence (prompt and p-tuning's virtual tokens): the model then
        processes seq_length + this many positions. 0 for methods that leave the sequence as it is."""
        return 0

    @classmethod
    def attended_tokens(cls, config: PeftConfig) -> int:
        """Positions every query attends beyond the sequence without being part of it (prefix tuning's keys and
        values): they cost attention and KV-cache memory, not positions. 0 for other methods."""
        return 0

    def __init__(self, config: PeftConfig):
        self.config = config

    def transform(self, module: torch.nn.Module, name: str) -> torch.nn.Module:
        """Return the module to use in place of `module` (named `name` in the model)."""
        return module

    def apply_model_level(self, model: torch.nn.Module) -> None:
        """Add parts that are not per-module (default: nothing)."""

    def validate_matches(self, matched: list[str]) -> None:
        """Called with the names `transform` changed; raise ConfigError if that is not enough."""

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate multipliers for some of this method's parameters.

        Returns:
            Parameter-name pattern (fnmatch over the names the optimizer sees, as Megatron's
            `ParamKey`) -> multiplier of the schedule's learning rate; {} (the default) trains every
            parameter at the recipe's rate.
        """
        return {}

    @classmethod
    def to_hf_peft(cls, config: PeftConfig, tensors: dict[str, torch.Tensor], spec) -> tuple[dict, dict]:
        """This method's adapter in Hugging Face PEFT's format, for `nemo-adapt export --format peft`.

        Args:
            config: the method's config (as trained).
            tensors: the adapter artifact's tensors (global Megatron names, full TP-gathered shapes).
            spec: the base model's `ModelSpec`.

        Returns:
            (adapter_config fields, tensors under HF PEFT's names in `adapter_model.safetensors`).

        Raises:
            ConfigError: the method has no HF PEFT form (the default), saying what to do instead.
        """
        raise ConfigError(f"peft.method={cls.name} has no Hugging Face PEFT export yet; serve the nemo-adapt "
                          "adapter artifact, or export a merged Hugging Face model where the method merges")

    merges_into_base: ClassVar[bool] = False
    """Whether the trained update folds into the base model's weights (`merge()` on its modules), for a
    merged export: a plain Hugging Face model that computes what the adapted one does."""
    merge_note: ClassVar[str] = "it has no form in the base model's weights"
    """Why it does not fold, and what to do instead (the refusal's wording)."""

    @classmethod
    def check_mergeable(cls) -> None:
        """Raise ConfigError, saying why and what to do instead, when this method does not fold into the base."""
        if not cls.merges_into_base:
            raise ConfigError(f"peft.method={cls.name} cannot be merged into the base weights: {cls.merge_note}")

    @classmethod
    def merge_into_base(cls, model) -> int:
        """Fold every adapted module's update into its base weights, in place, at any TP/PP (each rank folds its
        own shards: the modules' `merge()`). Returns the number of modules folded.

        Raises:
            ConfigError: the method does not fold (`check_mergeable`).
        """
        cls.check_mergeable()
        folded = 0
        with torch.no_grad():
            for chunk in _chunks(model):
                for module in chunk.modules():
                    if hasattr(module, "adapter_enabled") and callable(getattr(module, "merge", None)):
                        module.merge()
                        folded += 1
        return folded

    @classmethod
    def unmerge_from_base(cls, model) -> int:
        """Undo `merge_into_base` in place: every folded module's update taken back out of its base weights, the
        adapter path live again. Returns the number of modules unfolded."""
        unfolded = 0
        with torch.no_grad():
            for chunk in _chunks(model):
                for module in chunk.modules():
                    if hasattr(module, "adapter_enabled") and callable(getattr(module, "unmerge", None)):
                        module.unmerge()
                        unfolded += 1
        return unfolded

    hf_peft_type: ClassVar[str | None] = None
    """The `peft_type` of the Hugging Face PEFT adapters this method imports (None: it imports none)."""

    @classmethod
    def claims_hf_peft(cls, hf_config: dict) -> bool:
        """Whether a Hugging Face PEFT `adapter_config.json` describes an adapter of this method."""
        return cls.hf_peft_type is not None and hf_config.get("peft_type") == cls.hf_peft_type

    @classmethod
    def from_hf_peft(cls, hf_config: dict, tensors: dict[str, torch.Tensor], spec,
                     base_tensor=None) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """A Hugging Face PEFT adapter as this method's config and artifact tensors (the inverse of `to_hf_peft`).

        Args:
            hf_config: the adapter's `adapter_config.json`.
            tensors: its `adapter_model.safetensors` (HF PEFT's names, adapter name removed).
            spec: the base model's `ModelSpec` (every shape is checked against it).
            base_tensor: `name -> tensor` of the base checkpoint under Hugging Face names, for methods whose
                conversion needs base weights (DoRA's magnitudes of projections the adapter leaves alone).

        Returns:
            (the method's config, tensors under the artifact's global Megatron names, full TP-gathered shapes).

        Raises:
            ConfigError: a setting or tensor this method cannot represent, named with what would work.
        """
        raise ConfigError(f"peft.method={cls.name} imports no Hugging Face PEFT adapters")

    @classmethod
    def check_recipe(cls, config: PeftConfig, recipe, spec) -> None:
        """Raise ConfigError for recipe settings this method cannot run with (before anything is built).

        Args:
            config: this method's config.
            recipe: the whole `RecipeConfig` (data, parallel, ... settings).
            spec: the base model's `ModelSpec`.
        """

    def apply(self, model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        """Freeze the base model and add this method's trainable parts, in place.

        `transform` sees global module names (pipeline stages number their layers locally; the
        global name is the same at every layout), so per-module initialisation seeded from the name
        gives identical adapters at TP1, TP2, PP2, ...

        Returns:
            The same model object.
        """
        self.seed = seed
        for p in model.parameters():
            p.requires_grad_(False)
        changed = []
        # Collect first: wrapping while iterating named_modules would visit the wrappers.
        for name, module in list(model.named_modules()):
            if not name:
                continue
            new = self.transform(module, global_module_name(model, name))
            if new is not module:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, new)
                changed.append(name)
        self.validate_matches(changed)
        self.apply_model_level(model)
        return model


def global_module_name(model: torch.nn.Module, name: str) -> str:
    """`decoder.layers.<local>.rest` -> `decoder.layers.<global>.rest` (other names unchanged)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "decoder" and parts[1] == "layers" and parts[2].isdigit():
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)  # Megatron's layer_number is global and 1-based
    return ".".join(parts)


def name_seed(seed: int, name: str) -> int:
    """A per-module seed that depends only on the run seed and the global module name."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def mark_adapter(module_or_param) -> None:
    """Mark parameters as adapter parameters (trainable, saved in adapter checkpoints)."""
    params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else module_or_param.parameters()
    for p in params:
        p.is_adapter = True
        p.requires_grad_(True)


def register_peft(name: str):
    """Class decorator: register a `PeftMethod` subclass under `name`."""

    def deco(cls: type[PeftMethod]) -> type[PeftMethod]:
        if name in _METHODS:
            raise ValueError(f"PEFT method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_methods() -> None:
    # Importing a method module runs its @register_peft.
    from nemo_adapt.peft import adapter, dora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401


def list_peft_methods() -> list[str]:
    """Registered method names, plus `none` (full fine-tuning)."""
    _load_methods()
    return ["none", *sorted(_METHODS)]


def get_peft_method(name: str) -> type[PeftMethod] | None:
    """The registered class for `name`; None for `none` (full fine-tuning).

    Raises:
        ConfigError: unknown name (lists the registered ones and the closest match).
    """
    _load_methods()
    if name == "none":
        return None
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list_peft_methods(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"peft.method={name!r} is not a registered method.{hint} "
                          f"Allowed: {', '.join(list_peft_methods())}")
    return _METHODS[name]


def method_for_hf_peft(hf_config: dict, where: str) -> type[PeftMethod]:
    """The registered method that imports a Hugging Face PEFT adapter described by `hf_config`.

    Raises:
        ConfigError: no registered method imports its `peft_type` (names the ones that are imported).
    """
    _load_methods()
    for cls in _METHODS.values():
        if cls.claims_hf_peft(hf_config):
            return cls
    known = sorted({c.hf_peft_type for c in _METHODS.values() if c.hf_peft_type})
    raise ConfigError(f"{where}: Hugging Face PEFT peft_type={hf_config.get('peft_type')!r} has no nemo-adapt "
                      f"form; adapters of peft_type {', '.join(known)} are imported")


def peft_config_class(name: str) -> type[PeftConfig]:
    """The typed config class of method `name` (`PeftConfig` for `none`)."""
    cls = get_peft_method(name)
    return PeftConfig if cls is None else cls.config_class


def apply_peft(model: torch.nn.Module, config: PeftConfig, seed: int = 0, tokenizer=None) -> PeftMethod | None:
    """Apply the method named by `config.method` to `model` (no-op for `none`); `tokenizer` is
    passed to methods that initialise from text."""
    cls = get_peft_method(config.method)
    if cls is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    method = cls(config)
    method.tokenizer = tokenizer
    method.apply(model, seed)
    return method


def trainable_parameters(model, unique: bool = False) -> int:
    """Number of trainable parameter elements held by this rank (over all its model chunks).

    With `unique`, parameters replicated over tensor-parallel ranks count on TP rank 0 only, so
    summing over the TP and PP ranks of one replica gives the model's total; copies Megatron marks
    `shared` (a tied output layer, the prefix-tuning MLP outside the embedding's chunk) are not counted.

    Args:
        model: a module, or the list of this rank's virtual-pipeline chunks.
    """
    tp_rank = 0
    if unique:
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
    return sum(p.numel() for chunk in _chunks(model) for p in chunk.parameters()
               if p.requires_grad and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
               and not (unique and getattr(p, "shared", False)))


def _chunks(model) -> list:
    return list(model) if isinstance(model, list | tuple) else [model]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: every adapter module (attribute `adapter_enabled`) is bypassed inside.

    Args:
        model: a module, or the list of this rank's virtual-pipeline chunks.
    """
    modules = [m for chunk in _chunks(model) for m in chunk.modules() if hasattr(m, "adapter_enabled")]
    before = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, b in zip(modules, before):
            m.adapter_enabled = b
