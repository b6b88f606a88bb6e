"""P-tuning: Liu et al. 2021, "GPT Understands, Too" (arXiv:2103.10385).

Like prompt tuning, n virtual tokens are prepended on the first pipeline stage, but during training
they are the output of a prompt encoder applied to n trainable input embeddings: an MLP
(h -> H -> ... -> h, ReLU) or a bidirectional LSTM followed by a two-layer MLP head (Linear 2H -> 2H,
ReLU, Linear 2H -> h), the encoders of NeMo 1 and Hugging Face PEFT. The encoder couples the
virtual tokens, which the paper found trains more stably than independent embeddings.

`collapse()` (or `virtual_tokens.collapse(model)`) evaluates the encoder once and keeps only the
resulting [n, h] table, so serving pays nothing for the encoder and saves n * h parameters.
`nemo-adapt export --format peft` writes that table as a Hugging Face PEFT prompt-tuning adapter
(`PTuning.to_hf_peft`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_adapt.peft.base import PeftConfig, PeftMethod, mark_adapter, name_seed, register_peft
from nemo_adapt.peft.prompt_tuning import check_virtual_token_recipe
from nemo_adapt.peft.virtual_tokens import VirtualPrompt, model_device, seeded
from nemo_adapt.validation import check_choice, check_positive

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(PeftConfig):
    """Virtual tokens produced by a trainable prompt encoder (collapsed to a table for inference)."""

    method: str = "p_tuning"
    """Registered method name."""
    num_virtual_tokens: int = 20
    """Virtual tokens n prepended to every sequence (the sequence grows to n + data.seq_length)."""
    encoder: str = "mlp"
    """Prompt encoder: `mlp` or `lstm` (bidirectional LSTM + two-layer MLP head)."""
    encoder_hidden: int | None = None
    """Encoder width H (None: the model's hidden size h, as Hugging Face PEFT)."""
    encoder_layers: int = 2
    """mlp: Linear layers (2: h -> H -> h as NeMo 1; Hugging Face PEFT uses 3); lstm: stacked LSTM layers."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("peft.num_virtual_tokens", self.num_virtual_tokens)
        check_choice("peft.encoder", self.encoder, ENCODERS)
        if self.encoder_hidden is not None:
            check_positive("peft.encoder_hidden", self.encoder_hidden)
        check_positive("peft.encoder_layers", self.encoder_layers)
        if self.encoder == "mlp" and self.encoder_layers < 2:
            from nemo_adapt.errors import ConfigError

            raise ConfigError(f"peft.encoder_layers={self.encoder_layers} is too few for encoder=mlp; "
                              "allowed: 2 or more (input and output projections)")


class PromptEncoder(torch.nn.Module):
    """[n, h] input embeddings -> encoder -> [n, h] virtual tokens."""

    def __init__(self, n: int, h: int, config: PTuningConfig):
        super().__init__()
        hid = config.encoder_hidden or h
        self.kind = config.encoder
        self.embedding = torch.nn.Parameter(torch.randn(n, h))  # N(0, 1), like torch.nn.Embedding
        if self.kind == "mlp":
            layers: list[torch.nn.Module] = [torch.nn.Linear(h, hid), torch.nn.ReLU()]
            for _ in range(config.encoder_layers - 2):
                layers += [torch.nn.Linear(hid, hid), torch.nn.ReLU()]
            layers.append(torch.nn.Linear(hid, h))
            self.mlp = torch.nn.Sequential(*layers)
        else:
            self.lstm = torch.nn.LSTM(h, hid, num_layers=config.encoder_layers, bidirectional=True, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * hid, 2 * hid), torch.nn.ReLU(),
                                           torch.nn.Linear(2 * hid, h))

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # the n virtual tokens form one sequence
        return self.mlp(x)


class EncodedPrompt(VirtualPrompt):
    """Virtual tokens from a `PromptEncoder` (training) or a static table after `collapse()`."""

    def __init__(self, num_virtual_tokens: int, gpt, config: PTuningConfig, seed: int):
        super().__init__(num_virtual_tokens, gpt)
        self.encoder = None
        if self.pre_process:
            with seeded(seed):
                encoder = PromptEncoder(num_virtual_tokens, gpt.config.hidden_size, config)
            self.encoder = encoder.to(model_device(), gpt.config.params_dtype)
            mark_adapter(self.encoder)

    def table(self) -> torch.Tensor:
        return self.prompt if self.encoder is None else self.encoder()

    @torch.no_grad()
    def collapse(self) -> bool:
        """Replace the encoder with its output, a static [n, h] table (trainable, marked adapter)."""
        if self.encoder is None:
            return False
        self.prompt = torch.nn.Parameter(self.encoder().detach().clone())
        mark_adapter(self.prompt)
        if self.sequence_parallel:
            self.prompt.sequence_parallel = True
        self.encoder = None
        return True


def lstm_params(input_size: int, hidden_size: int, num_layers: int = 2, bidirectional: bool = True) -> int:
    """Parameters of `torch.nn.LSTM` with biases: per layer and direction 4H(in + H) + 8H (b_ih and b_hh).

    Layers after the first take 2H inputs when bidirectional.
    """
    directions = 2 if bidirectional else 1
    total = 0
    for layer in range(num_layers):
        inp = input_size if layer == 0 else hidden_size * directions
        total += directions * (4 * hidden_size * (inp + hidden_size) + 8 * hidden_size)
    return total


@register_peft("p_tuning")
class PTuning(PeftMethod):
    """P-tuning (Liu et al. 2021): virtual tokens from a trainable prompt encoder, first pipeline stage."""

    supports_context_parallel = False
    context_parallel_note = "virtual tokens are placed at positions 0..n-1 of the whole sequence, which context parallelism splits over ranks"
    config_class = PTuningConfig
    merge_note = ("its virtual tokens are extra inputs, not a change of any weight; export it as a Hugging Face PEFT "
                  "adapter instead (--format peft, PROMPT_TUNING)")
    paper = "Liu et al. 2021, GPT Understands, Too, arXiv:2103.10385"

    @classmethod
    def parameter_counts(cls, config, spec):
        """n_virtual x h saved; while training also the prompt encoder: an MLP of `encoder_layers` Linear layers
        h -> H -> ... -> h with biases, or an `encoder_layers`-layer bidirectional LSTM h -> H (`lstm_params`)
        followed by the head Linear 2H -> 2H, ReLU, Linear 2H -> h (NeMo 1 and Hugging Face PEFT). H defaults
        to h."""
        h = spec.hidden_size
        hid = config.encoder_hidden or h
        saved = {"virtual_tokens": config.num_virtual_tokens * h}
        if config.encoder == "mlp":
            encoder = {"encoder.mlp": (h * hid + hid) + (config.encoder_layers - 2) * (hid * hid + hid) + (hid * h + h)}
        else:
            encoder = {"encoder.lstm": lstm_params(h, hid, num_layers=config.encoder_layers, bidirectional=True),
                       "encoder.head": (2 * hid * 2 * hid + 2 * hid) + (2 * hid * h + h)}
        return {**saved, **encoder}, saved

    @classmethod
    def rank_parameter_counts(cls, config, spec, tp):
        """Virtual tokens and encoder sit whole on the first pipeline stage."""
        return 0.0, float(sum(cls.parameter_counts(config, spec)[0].values())), 0.0

    @classmethod
    def context_tokens(cls, config):
        return config.num_virtual_tokens

    @classmethod
    def check_recipe(cls, config, recipe, spec) -> None:
        check_virtual_token_recipe(config.num_virtual_tokens, recipe, spec)

    EXPORTED_AS = "prompt_tuning (p-tuning prompt encoder collapsed to its table)"
    """The `nemo_adapt.exported_as` note in an HF PEFT export's adapter_config.json."""

    @classmethod
    def to_hf_peft(cls, config, tensors, spec):
        """Hugging Face PEFT's `PROMPT_TUNING` form of the collapsed prompt: the encoder run once.

        The virtual tokens do not depend on the input, so the export evaluates the encoder once (in
        float32, stored in the artifact's dtype) and writes the resulting [n, h] table as a `PROMPT_TUNING`
        adapter (see `PromptTuning.to_hf_peft` for why placement and positions agree); the config says so
        in `nemo_adapt.exported_as`. HF PEFT saves its own `P_TUNING` adapters the same way (peft 0.21:
        `prompt_embeddings` = `get_prompt_embedding_to_save`, the encoder's output), but loading one with
        `inference_mode: false` rebuilds HF's encoder (an MLP of 3 linear layers or its LSTM, freshly
        initialised) and runs it over the loaded table, which is wrong for a table; `PROMPT_TUNING` uses
        the table as is in both modes. Continued training in HF PEFT then trains the table (prompt
        tuning), not our encoder.

        Args:
            config: the method's config (as trained).
            tensors: the adapter artifact's tensors: the encoder (`virtual_prompt.encoder.*`, as training
                saves it) or the collapsed table (`virtual_prompt.prompt` [n, h]).
            spec: the base model's `ModelSpec`.

        Returns:
            (adapter_config fields, {"prompt_embeddings": [n, h]}).

        Raises:
            ConfigError: the artifact holds neither a complete encoder of this config nor an [n, h] table.
        """
        from nemo_adapt.errors import ConfigError
        from nemo_adapt.peft.prompt_tuning import PROMPT_TABLE, hf_prompt_tuning_fields

        n, h = config.num_virtual_tokens, spec.hidden_size
        prefix = "virtual_prompt.encoder."
        encoder_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if encoder_state:
            dtype = next(iter(encoder_state.values())).dtype
            with seeded(0):  # the constructor's random init is overwritten; keep the global RNG untouched
                encoder = PromptEncoder(n, h, config)
            try:
                encoder.load_state_dict({k: v.float() for k, v in encoder_state.items()}, strict=True)
            except RuntimeError as err:
                raise ConfigError(f"p-tuning artifact: its encoder tensors do not fit peft.encoder={config.encoder}, "
                                  f"encoder_layers={config.encoder_layers}, hidden {config.encoder_hidden or h}: "
                                  f"{err}") from err
            with torch.no_grad():
                table = encoder.eval()().to(dtype)
        elif PROMPT_TABLE in tensors:
            table = tensors[PROMPT_TABLE]
        else:
            raise ConfigError(f"p-tuning artifact holds neither {prefix}* (the prompt encoder) nor {PROMPT_TABLE}")
        if tuple(table.shape) != (n, h):
            raise ConfigError(f"p-tuning artifact: the prompt table is {list(table.shape)}, expected [{n}, {h}]")
        fields = {**hf_prompt_tuning_fields(n, spec), "nemo_adapt": {"exported_as": cls.EXPORTED_AS}}
        return fields, {"prompt_embeddings": table.contiguous()}

    def apply_model_level(self, model):
        n = self.config.num_virtual_tokens
        EncodedPrompt(n, model, self.config, name_seed(self.seed, "virtual_prompt")).attach(model)

    @staticmethod
    def collapse(model) -> int:
        """Fold the prompt encoder into a static table (see `virtual_tokens.collapse`)."""
        from nemo_adapt.peft.virtual_tokens import collapse

        return collapse(model)
