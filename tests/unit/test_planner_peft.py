"""Closed-form PEFT parameter counts (the PEFT implementations are later checked against these).

llama3_8b: L=32, h=4096, f=14336, a=32, g=8, d=128. Megatron-Core target shapes:
  linear_qkv [4096 -> (32 + 2*8) x 128 = 6144], linear_proj [4096 -> 4096],
  linear_fc1 [4096 -> 2 x 14336 = 28672], linear_fc2 [14336 -> 4096].
"""

import pytest
import torch

from nemo_adapt.errors import ConfigError
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.peft.lora import LINEAR_TARGETS
from nemo_adapt.peft.p_tuning import lstm_params
from nemo_adapt.planner.memory import (
    peft_methods,
    peft_param_breakdown,
    peft_rank_params,
    peft_trainable_params,
)


@pytest.fixture(scope="module")
def spec():
    return get_model_spec("llama3_8b")


def test_target_shapes(spec):
    assert [spec.linear_shape(t) for t in LINEAR_TARGETS] == [
        (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def test_lora(spec):
    # per layer r(in+out): 16 x (10240 + 8192 + 32768 + 18432) = 16 x 69,632 = 1,114,112; x 32 layers
    assert peft_trainable_params(spec, "lora", rank=16) == 32 * 1_114_112 == 35_651_584
    # qkv only, rank 8: 8 x (4096 + 6144) x 32 = 2,621,440
    assert peft_trainable_params(spec, "lora", rank=8, target_modules=["linear_qkv"]) == 2_621_440
    # alpha scales the update; it adds no parameters
    assert peft_trainable_params(spec, "lora", rank=16, alpha=32) == 35_651_584


def test_lora_matches_torch_modules(spec):
    # A as nn.Linear(in, r, bias=False), B as nn.Linear(r, out, bias=False) on every target of one layer.
    r = 4
    per_layer = 0
    for target in LINEAR_TARGETS:
        fan_in, fan_out = spec.linear_shape(target)
        a = torch.nn.Linear(fan_in, r, bias=False, device="meta")
        b = torch.nn.Linear(r, fan_out, bias=False, device="meta")
        per_layer += sum(p.numel() for p in (*a.parameters(), *b.parameters()))
    assert peft_trainable_params(spec, "lora", rank=r) == spec.num_layers * per_layer


def test_dora_adds_one_magnitude_per_output(spec):
    # magnitudes: 32 x (6144 + 4096 + 28672 + 4096) = 32 x 43,008 = 1,376,256
    assert peft_trainable_params(spec, "dora", rank=16) == 35_651_584 + 1_376_256
    parts = peft_param_breakdown(spec, "dora", rank=16).training
    assert parts["linear_fc1.magnitude"] == 32 * 28672


def test_adapter(spec):
    # per placement 2 x 4096 x 32 = 262,144 weights + 32 + 4096 biases = 266,272; x 2 placements x 32 layers
    assert peft_trainable_params(spec, "adapter", bottleneck=32) == 64 * 266_272 == 17_041_408
    assert peft_trainable_params(spec, "adapter", bottleneck=32, bias=False) == 64 * 262_144
    assert peft_trainable_params(spec, "adapter", bottleneck=32, placements=["mlp"]) == 32 * 266_272


def test_ia3(spec):
    # keys 8 x 128 + values 8 x 128 + ffn 14336 = 16,384 per layer x 32
    assert peft_trainable_params(spec, "ia3") == 524_288


def test_prompt_tuning(spec):
    assert peft_trainable_params(spec, "prompt_tuning", num_virtual_tokens=20) == 20 * 4096


def test_ptuning_mlp_encoder_is_training_only(spec):
    # virtual tokens 20 x 4096 = 81,920; MLP 4096 -> 4096 -> 4096 with biases = 2 x (4096^2 + 4096)
    mlp = 2 * (4096 * 4096 + 4096)
    assert peft_trainable_params(spec, "p_tuning", num_virtual_tokens=20) == 81_920 + mlp
    assert peft_trainable_params(spec, "p_tuning", num_virtual_tokens=20, training=False) == 81_920
    enc = torch.nn.Sequential(torch.nn.Linear(4096, 1024, device="meta"), torch.nn.Linear(1024, 4096, device="meta"))
    got = peft_param_breakdown(spec, "p_tuning", encoder_hidden=1024).training["encoder.mlp"]
    assert got == sum(p.numel() for p in enc.parameters())


def test_ptuning_lstm_encoder_matches_torch(spec):
    lstm = torch.nn.LSTM(4096, 512, num_layers=2, bidirectional=True, device="meta")
    # The head after the LSTM is NeMo 1's and Hugging Face PEFT's: Linear 2H -> 2H, ReLU, Linear 2H -> h.
    head = torch.nn.Sequential(torch.nn.Linear(2 * 512, 2 * 512, device="meta"),
                               torch.nn.Linear(2 * 512, 4096, device="meta"))
    assert lstm_params(4096, 512) == sum(p.numel() for p in lstm.parameters())
    parts = peft_param_breakdown(spec, "p_tuning", encoder="lstm", encoder_hidden=512).training
    assert parts["encoder.lstm"] + parts["encoder.head"] == sum(
        p.numel() for p in (*lstm.parameters(), *head.parameters()))


def test_prefix_tuning(spec):
    # keys + values on the KV heads: 2 x 32 layers x 20 prefixes x 8 x 128 = 1,310,720 (saved)
    assert peft_trainable_params(spec, "prefix_tuning", num_prefix_tokens=20, reparameterize=False) == 1_310_720
    # reparameterised: embedding 20 x 4096 + MLP 4096 -> 512 -> 2*32*8*128 = 65,536 with biases
    train = 20 * 4096 + (4096 * 512 + 512) + (512 * 65_536 + 65_536)
    assert peft_trainable_params(spec, "prefix_tuning", num_prefix_tokens=20) == train == 35_799_552
    assert peft_trainable_params(spec, "prefix_tuning", num_prefix_tokens=20, training=False) == 1_310_720


def test_full_finetuning_counts_the_model(spec):
    assert peft_trainable_params(spec, "none") == spec.num_parameters() == 8_030_261_248


@pytest.mark.parametrize("method", [m for m in peft_methods() if m != "none"])
def test_rank_sharding_at_tp1_is_the_closed_form(spec, method):
    peft = peft_param_breakdown(spec, method)
    per_layer, first, every = peft_rank_params(spec, 1, peft)
    assert spec.num_layers * per_layer + first + every == peft.training_total


def test_lora_tp_sharding_replicates_one_factor(spec):
    peft = peft_param_breakdown(spec, "lora", rank=16)
    per_layer_tp4 = peft_rank_params(spec, 4, peft)[0]
    # qkv: A 16 x 4096 + B 16 x (8 + 4) x 128; proj: A 16 x 1024 + B 16 x 4096;
    # fc1: A 16 x 4096 + B 16 x 7168; fc2: A 16 x 3584 + B 16 x 4096
    expected = 16 * (4096 + 1536 + 1024 + 4096 + 4096 + 7168 + 3584 + 4096)
    assert per_layer_tp4 == expected
    assert 4 * per_layer_tp4 > 1_114_112  # replicated halves: TP ranks together hold more than the model's LoRA


def test_unknown_method_and_argument_are_named(spec):
    with pytest.raises(ConfigError, match="peft.method='qlora' is not supported; allowed: none, adapter, ") as err:
        peft_trainable_params(spec, "qlora")
    assert str(err.value).count("none") == 1
    with pytest.raises(ConfigError, match="unknown argument.*rnak"):
        peft_trainable_params(spec, "lora", rnak=8)
    with pytest.raises(ConfigError, match="linear_q"):
        peft_trainable_params(spec, "lora", target_modules=["linear_q"])
    with pytest.raises(ConfigError, match="rank=0"):
        peft_trainable_params(spec, "lora", rank=0)
