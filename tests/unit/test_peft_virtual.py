"""Virtual-token methods without Megatron's runtime: configs and their errors, recipe checks, the
prefix attention mask, the trainer's placeholder positions, init from text, and trainable counts
against Hugging Face PEFT for SmolLM2-135M (the distributed tests check our modules against the same
closed form at every layout)."""

import pytest
import torch

from nemo_adapt.config.schema import RecipeConfig
from nemo_adapt.errors import ConfigError
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.peft.base import get_peft_method, list_peft_methods
from nemo_adapt.peft.p_tuning import PromptEncoder, PTuningConfig
from nemo_adapt.peft.prefix_tuning import PrefixEncoder, PrefixTuningConfig, prefix_attention_mask
from nemo_adapt.peft.prompt_tuning import PromptTuningConfig, init_token_ids
from nemo_adapt.peft.virtual_tokens import prepend_virtual_positions
from nemo_adapt.planner.memory import peft_param_breakdown, peft_trainable_params

SMOL = get_model_spec("smollm2_135m")  # h 576, 30 layers, 9 heads in 3 KV groups of width 64


def test_methods_are_registered_with_their_papers():
    for name, arxiv in (("prompt_tuning", "2104.08691"), ("p_tuning", "2103.10385"), ("prefix_tuning", "2101.00190")):
        assert name in list_peft_methods()
        assert arxiv in get_peft_method(name).paper


@pytest.mark.parametrize("cls,kwargs,named", [
    (PromptTuningConfig, {"num_virtual_tokens": 0}, "peft.num_virtual_tokens=0"),
    (PromptTuningConfig, {"init": "zeros"}, "peft.init='zeros'"),
    (PromptTuningConfig, {"init": "text"}, "peft.init_text"),
    (PromptTuningConfig, {"init": "vocab", "init_text": "hi"}, "peft.init=text"),
    (PTuningConfig, {"encoder": "gru"}, "'lstm'"),
    (PTuningConfig, {"encoder": "mlp", "encoder_layers": 1}, "peft.encoder_layers=1"),
    (PTuningConfig, {"encoder_hidden": -3}, "peft.encoder_hidden=-3"),
    (PrefixTuningConfig, {"num_prefix_tokens": 2.5}, "peft.num_prefix_tokens=2.5"),
    (PrefixTuningConfig, {"reparameterize": "yes"}, "peft.reparameterize='yes'"),
    (PrefixTuningConfig, {"reparam_hidden": 0}, "peft.reparam_hidden=0"),
])
def test_config_errors_name_key_and_value(cls, kwargs, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        cls(**kwargs)


def _recipe(method_config, packing: bool, seq: int) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.peft = method_config
    cfg.data.packing, cfg.data.seq_length = packing, seq
    return cfg


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=8), PTuningConfig(num_virtual_tokens=8)],
                         ids=["prompt_tuning", "p_tuning"])
def test_virtual_tokens_refuse_packing_and_too_long_sequences(config):
    method = get_peft_method(config.method)
    method.check_recipe(config, _recipe(config, False, 256), SMOL)  # fine
    with pytest.raises(ConfigError, match="data.packing=false"):
        method.check_recipe(config, _recipe(config, True, 256), SMOL)
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=8 \+ data.seq_length=8190 = 8198 exceeds .* 8192"):
        method.check_recipe(config, _recipe(config, False, 8190), SMOL)


def test_prefix_tuning_keeps_packing():
    config = PrefixTuningConfig()
    get_peft_method("prefix_tuning").check_recipe(config, _recipe(config, True, 512), SMOL)


def test_prefix_mask_causal_decode_and_packed():
    # Training / prefill: 2 prefix columns open, then causal over 3 keys.
    m = prefix_attention_mask(None, 2, 3, 3, torch.device("cpu"))[0, 0]
    assert m.shape == (3, 5)
    assert not m[:, :2].any()
    assert m[:, 2:].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # Decode step: one query after 4 cached keys sees all of them and the prefix.
    assert not prefix_attention_mask(None, 2, 1, 5, torch.device("cpu")).any()
    # A packed row's block-diagonal mask is kept; the prefix is open to both examples.
    packed = torch.tensor([[True, True, True], [True, False, True], [True, False, False]]).view(1, 1, 3, 3)
    got = prefix_attention_mask(packed, 2, 3, 3, torch.device("cpu"))
    assert torch.equal(got[..., 2:], packed) and not got[..., :2].any()


def test_placeholder_positions_in_front_of_every_row():
    batch = {"tokens": torch.tensor([[7, 8, 9, 0]]), "labels": torch.tensor([[8, 9, 0, 0]]),
             "loss_mask": torch.tensor([[0.0, 1.0, 0.0, 0.0]]), "position_ids": torch.tensor([[0, 1, 2, 0]]),
             "segment_ids": torch.tensor([[1, 1, 1, 0]])}
    out = prepend_virtual_positions(batch, 2)
    assert out["tokens"].tolist() == [[0, 0, 7, 8, 9, 0]]
    assert out["labels"].tolist() == [[0, 0, 8, 9, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 0, 0]]  # the same answer token, no loss on placeholders
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0]]
    packed = dict(batch, segment_ids=torch.tensor([[1, 1, 2, 2]]))
    with pytest.raises(ValueError, match="packing=false"):
        prepend_virtual_positions(packed, 2)


class _Tokenizer:
    vocab_size = 100

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 100 for c in text]}


def test_init_from_text_repeats_and_cuts_and_vocab_samples_stay_in_range():
    text = PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="abc")
    assert init_token_ids(text, 5, 0, 100, _Tokenizer()).tolist() == [97, 98, 99, 97, 98]
    assert init_token_ids(text, 2, 0, 100, _Tokenizer()).tolist() == [97, 98]
    with pytest.raises(ConfigError, match="tokenizer"):
        init_token_ids(text, 5, 0, 100, None)
    vocab = PromptTuningConfig(num_virtual_tokens=50, vocab_sample_size=10)
    ids = init_token_ids(vocab, 50, 3, 100, None)
    assert ids.min() >= 0 and ids.max() < 10
    assert torch.equal(ids, init_token_ids(vocab, 50, 3, 100, None))  # seeded: the same on every rank


# ---------------------------------------------------------------------------------------------------
# Trainable counts: our closed form (planner) == our modules == Hugging Face PEFT, SmolLM2-135M
# ---------------------------------------------------------------------------------------------------


def _hf_count(peft_config) -> int:
    """Trainable parameters Hugging Face PEFT reports for SmolLM2-135M (built from config, no download)."""
    import transformers
    from peft import get_peft_model

    from nemo_adapt.models.hf import hf_config_from_spec

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config_from_spec(SMOL).items()
                                               if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    trainable, _ = get_peft_model(model, peft_config).get_nb_trainable_parameters()
    return trainable


def test_prompt_tuning_count_equals_hf():
    from peft import PromptTuningConfig as HF

    n, h = 20, SMOL.hidden_size
    ours = peft_trainable_params(SMOL, "prompt_tuning", num_virtual_tokens=n)
    assert ours == n * h == 11_520
    assert _hf_count(HF(task_type="CAUSAL_LM", num_virtual_tokens=n)) == ours


@pytest.mark.parametrize("encoder,hidden,layers", [("mlp", 576, 3), ("mlp", 128, 2), ("lstm", 128, 2)])
def test_p_tuning_count_equals_module_and_hf(encoder, hidden, layers):
    from peft import PromptEncoderConfig as HF

    n, h = 20, SMOL.hidden_size
    config = PTuningConfig(num_virtual_tokens=n, encoder=encoder, encoder_hidden=hidden, encoder_layers=layers)
    formula = peft_trainable_params(SMOL, "p_tuning", num_virtual_tokens=n, encoder=encoder, encoder_hidden=hidden,
                                    encoder_layers=layers)
    with torch.device("meta"):
        module = PromptEncoder(n, h, config)  # the [n, h] input embedding and the encoder
    assert sum(p.numel() for p in module.parameters()) == formula
    assert peft_trainable_params(SMOL, "p_tuning", training=False, num_virtual_tokens=n, encoder=encoder,
                                 encoder_hidden=hidden, encoder_layers=layers) == n * h  # collapsed table
    if encoder == "mlp" and layers != 3:
        return  # Hugging Face PEFT's MLP encoder always has 3 Linear layers
    # (HF's MLP ignores encoder_num_layers, and warns when it is set: pass it for the LSTM only.)
    extra = {"encoder_num_layers": layers} if encoder == "lstm" else {}
    hf = HF(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_reparameterization_type=encoder.upper(),
            encoder_hidden_size=hidden, **extra)
    assert _hf_count(hf) == formula


def test_prefix_tuning_count_equals_hf():
    from peft import PrefixTuningConfig as HF

    n, L, g, d, h, H = 20, SMOL.num_layers, SMOL.num_query_groups, SMOL.kv_channels, SMOL.hidden_size, 512
    direct = peft_trainable_params(SMOL, "prefix_tuning", num_prefix_tokens=n, reparameterize=False)
    assert direct == 2 * L * n * g * d == 230_400  # keys + values on the 3 KV heads of every layer
    assert _hf_count(HF(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False)) == direct

    # Reparameterised: E [n, h] -> Linear h -> H, tanh -> Linear H -> 2*L*g*d (Li & Liang's code).
    ours = peft_trainable_params(SMOL, "prefix_tuning", num_prefix_tokens=n, reparam_hidden=H)
    assert ours == n * h + (h * H + H) + (H * 2 * L * g * d + 2 * L * g * d)
    with torch.device("meta"):
        shared = PrefixEncoder(n, h, H, 1.0)
    assert sum(p.numel() for p in shared.parameters()) == n * h + h * H + H
    assert peft_param_breakdown(SMOL, "prefix_tuning", num_prefix_tokens=n).saved_total == direct
    # The definitions differ here: for grouped-query models Hugging Face PEFT sets token_dim to the KV
    # width g*d (192), so its embedding is [n, g*d] and its first Linear g*d -> H; ours start from the
    # model width h (576). Everything else is the same, so the counts differ by exactly (n + H)(h - g*d).
    hf = _hf_count(HF(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=H))
    assert ours - hf == (n + H) * (h - g * d)


def test_text_init_without_tokenizer_falls_back_to_random_with_a_warning():
    """`nemo-adapt eval` re-creates the method without a tokenizer, then loads the trained values."""
    from types import SimpleNamespace

    from nemo_adapt.peft.prompt_tuning import initial_prompt

    gpt = SimpleNamespace(pre_process=True, config=SimpleNamespace(hidden_size=8))
    config = PromptTuningConfig(num_virtual_tokens=3, init="text", init_text="abc")
    with pytest.warns(UserWarning, match="without a tokenizer"):
        table = initial_prompt(gpt, config, 3, 0, None)
    assert table.shape == (3, 8) and table.abs().max() <= config.init_range
    assert initial_prompt(SimpleNamespace(pre_process=False), config, 3, 0, None) is None
