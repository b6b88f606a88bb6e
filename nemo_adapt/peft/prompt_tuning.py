"""Prompt tuning: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

n trainable virtual-token embeddings [n, h] are prepended to every input on the first pipeline
stage; the model is frozen. Trainable parameters: n * h. Initialisation as in the paper: random
uniform, embeddings of sampled vocabulary tokens, or the embeddings of a text (e.g. the task's
class labels or instructions) repeated/truncated to n tokens. See `virtual_tokens` for positions,
masks, packing and generation. `nemo-adapt export --format peft` writes Hugging Face PEFT's
`PROMPT_TUNING` format (`PromptTuning.to_hf_peft`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, name_seed, register_peft
from nemo_adapt.peft.virtual_tokens import VirtualPrompt, model_device
from nemo_adapt.validation import check_choice, check_positive

PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig(PeftConfig):
    """Trainable virtual-token embeddings in front of the input."""

    method: str = "prompt_tuning"
    """Registered method name."""
    num_virtual_tokens: int = 20
    """Virtual tokens n prepended to every sequence (the sequence grows to n + data.seq_length)."""
    init: str = "vocab"
    """`random` (uniform in [-init_range, init_range]), `vocab` (embeddings of sampled tokens) or `text`."""
    init_text: str | None = None
    """Text whose token embeddings initialise the prompt (init=text); repeated or cut to n tokens."""
    init_range: float = 0.5
    """Half-width of the uniform initialisation (init=random); Lester et al. use 0.5."""
    vocab_sample_size: int = 5000
    """init=vocab samples from the first this-many token ids (Lester et al.: the 5,000 most common tokens;
    BPE ids are roughly ordered by merge frequency)."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("peft.num_virtual_tokens", self.num_virtual_tokens)
        check_choice("peft.init", self.init, PROMPT_INITS)
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ConfigError(f"peft.init=text needs a non-empty peft.init_text (got {self.init_text!r})")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError(f"peft.init_text is set but peft.init={self.init!r}; set peft.init=text to use it")
        check_positive("peft.init_range", self.init_range, integer=False)
        check_positive("peft.vocab_sample_size", self.vocab_sample_size)


def check_virtual_token_recipe(n: int, recipe, spec) -> None:
    """Recipe checks shared by prompt tuning and p-tuning (raise ConfigError before training)."""
    if recipe.data.packing:
        raise ConfigError(f"peft.method={recipe.peft.method} prepends {n} virtual tokens to each example, which "
                          "needs one example per row: set data.packing=false")
    total = recipe.data.seq_length + n
    if total > spec.max_position_embeddings:
        raise ConfigError(f"peft.num_virtual_tokens={n} + data.seq_length={recipe.data.seq_length} = {total} exceeds "
                          f"the model's context of {spec.max_position_embeddings} tokens; lower one of them")


def embedding_rows(gpt, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the (vocabulary-parallel) input embedding, full width, on every TP rank."""
    from megatron.core import parallel_state as ps

    emb = gpt.embedding.word_embeddings
    weight = emb.weight
    start = getattr(emb, "vocab_start_index", 0)
    local = ids.to(weight.device) - start
    inside = (local >= 0) & (local < weight.shape[0])
    rows = weight.detach()[local.clamp(0, weight.shape[0] - 1)] * inside.unsqueeze(-1).to(weight.dtype)
    if ps.get_tensor_model_parallel_world_size() > 1:
        rows = rows.contiguous()
        dist.all_reduce(rows, group=ps.get_tensor_model_parallel_group())
    return rows


def init_token_ids(config, n: int, seed: int, vocab_size: int, tokenizer) -> torch.Tensor:
    """Token ids whose embeddings initialise n virtual tokens (init=vocab or text)."""
    if config.init == "vocab":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, min(config.vocab_sample_size, vocab_size), (n,), generator=gen)
    if tokenizer is None:
        raise ConfigError("peft.init=text needs the model's tokenizer; apply the method with tokenizer=...")
    ids = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"peft.init_text={config.init_text!r} tokenizes to nothing")
    ids = (ids * (-(-n // len(ids))))[:n]  # repeat to at least n, keep the first n (as HF PEFT)
    return torch.tensor(ids, dtype=torch.long)


class PromptTable(VirtualPrompt):
    """A static [n, h] table of virtual-token embeddings (prompt tuning; collapsed p-tuning)."""

    def __init__(self, num_virtual_tokens: int, gpt, init: torch.Tensor | None = None):
        super().__init__(num_virtual_tokens, gpt)
        if self.pre_process:
            h = gpt.config.hidden_size
            data = init if init is not None else torch.zeros(num_virtual_tokens, h)
            self.prompt = torch.nn.Parameter(data.to(model_device(), gpt.config.params_dtype).clone())
            mark_adapter(self.prompt)

    def table(self) -> torch.Tensor:
        return self.prompt


PROMPT_TABLE = "virtual_prompt.prompt"
"""Artifact name of the [n, h] virtual-token table (prompt tuning; p-tuning after `collapse()`)."""


def hf_prompt_tuning_fields(n: int, spec) -> dict:
    """adapter_config.json fields of Hugging Face PEFT's `PromptTuningConfig` for an [n, h] table.

    Format: peft 0.21's `PromptTuningConfig`/`PromptEmbedding` (`peft_type: PROMPT_TUNING`, the table saved
    as `prompt_embeddings` [num_virtual_tokens * num_transformer_submodules, token_dim]); a decoder-only
    model has one transformer submodule. `RANDOM` init: HF PEFT needs no tokenizer, the weights replace it.
    """
    return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": n, "token_dim": spec.hidden_size,
            "num_transformer_submodules": 1, "num_attention_heads": spec.num_attention_heads,
            "num_layers": spec.num_layers, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None}


def initial_prompt(gpt, config, n: int, seed: int, tokenizer) -> torch.Tensor | None:
    """The initial [n, h] virtual-token embeddings on the first stage (None elsewhere)."""
    if not gpt.pre_process:
        return None
    h = gpt.config.hidden_size
    if config.init == "text" and tokenizer is None:
        # Only when re-creating the method to load trained values into it (`nemo-adapt eval` applies
        # the method without a tokenizer); training always passes one (training/main.py).
        import warnings

        warnings.warn("prompt tuning init=text without a tokenizer: initialising randomly instead; "
                      "load trained virtual tokens before use", stacklevel=2)
        config = dataclasses.replace(config, init="random", init_text=None)
    if config.init == "random":
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand(n, h, generator=gen) * 2 - 1) * config.init_range
    vocab = tokenizer.vocab_size if tokenizer is not None else gpt.vocab_size
    ids = init_token_ids(config, n, seed, vocab, tokenizer)
    return embedding_rows(gpt, ids).float().cpu()


@register_peft("prompt_tuning")
class PromptTuning(PeftMethod):
    """Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings, first pipeline stage."""

    supports_context_parallel = False
    context_parallel_note = "virtual tokens are placed at positions 0..n-1 of the whole sequence, which context parallelism splits over ranks"
    config_class = PromptTuningConfig
    merge_note = ("its virtual tokens are extra inputs, not a change of any weight; export it as a Hugging Face PEFT "
                  "adapter instead (--format peft, PROMPT_TUNING)")
    paper = "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv:2104.08691"
    resume_safe_fields = ("init", "init_text", "init_range", "vocab_sample_size")  # used only at creation
    training_fields = resume_safe_fields

    @classmethod
    def parameter_counts(cls, config, spec):
        """One n_virtual x h table for the whole model."""
        comps = {"virtual_tokens": config.num_virtual_tokens * spec.hidden_size}
        return comps, dict(comps)

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """The table sits whole on the first pipeline stage."""
        return 0.0, float(config.num_virtual_tokens * spec.hidden_size), 0.0

    @classmethod
    def context_tokens(cls, config):
        return config.num_virtual_tokens

    @classmethod
    def check_recipe(cls, config, recipe, spec) -> None:
        check_virtual_token_recipe(config.num_virtual_tokens, recipe, spec)

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """Hugging Face PEFT's `PROMPT_TUNING` form: the [n, h] table as `prompt_embeddings`.

        HF PEFT (`PeftModelForCausalLM.forward`, and `prepare_inputs_for_generation` at prefill) concatenates
        the table in front of the input embeddings and runs the base model on n + s positions with default
        position ids 0 .. n + s - 1 and a causal mask over all of them, as we do (`virtual_tokens`): virtual
        token i at position i, the real tokens at n, n + 1, ... So the table exports unchanged.

        Generating with the export in peft 0.21.2 under transformers 5 needs `generate(..., use_cache=False)`:
        peft's `prepare_inputs_for_generation` looks for the KV cache under `past_key_values`, which
        transformers 5 passes as `cache`, so with a cache it re-injects the virtual tokens at every decode step
        and the continuation is wrong (`forward` is unaffected).

        Args:
            config: the method's config (as trained).
            tensors: the adapter artifact's tensors (`virtual_prompt.prompt` [n, h]).
            spec: the base model's `ModelSpec`.

        Returns:
            (adapter_config fields, {"prompt_embeddings": [n, h]}).

        Raises:
            ConfigError: the artifact holds no [n, h] prompt table.
        """
        table = tensors.get(PROMPT_TABLE)
        expected = (config.num_virtual_tokens, spec.hidden_size)
        if table is None or tuple(table.shape) != expected:
            got = "none" if table is None else list(table.shape)
            raise ConfigError(f"prompt tuning artifact: {PROMPT_TABLE} should be {list(expected)}, got {got}")
        return hf_prompt_tuning_fields(config.num_virtual_tokens, spec), {"prompt_embeddings": table.contiguous()}

    hf_peft_type = "PROMPT_TUNING"

    @classmethod
    def from_hf_peft(cls, hf_config, tensors, spec, base_tensor=None):
        """An HF PEFT `PROMPT_TUNING` adapter as ours: `prompt_embeddings` [n, h] is the table, used as is
        (see `to_hf_peft` for why positions agree). Our p-tuning exports import here too: they are tables.

        Raises:
            ConfigError: other tensors, more than one transformer submodule (encoder-decoder models), or a
                table whose width is not the model's hidden size.
        """
        table = tensors.get("prompt_embeddings")
        n = int(hf_config.get("num_virtual_tokens") or 0)
        if set(tensors) != {"prompt_embeddings"} or table is None:
            raise ConfigError(f"HF PEFT prompt tuning adapter should hold only prompt_embeddings; it holds "
                              f"{sorted(tensors)[:4]}")
        if int(hf_config.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError("HF PEFT prompt tuning adapter has num_transformer_submodules="
                              f"{hf_config['num_transformer_submodules']}; a decoder-only model has 1")
        if table.dim() != 2 or tuple(table.shape) != (n, spec.hidden_size):
            raise ConfigError(f"HF PEFT prompt tuning table is {list(table.shape)}; num_virtual_tokens={n} on "
                              f"{spec.name} needs [{n}, {spec.hidden_size}]")
        return cls.config_class(num_virtual_tokens=n, init="random"), {PROMPT_TABLE: table.contiguous()}

    def apply_model_level(self, model):
        n = self.config.num_virtual_tokens
        init = initial_prompt(model, self.config, n, name_seed(self.seed, "virtual_prompt"),
                              getattr(self, "tokenizer", None))
        PromptTable(n, model, init).attach(model)
