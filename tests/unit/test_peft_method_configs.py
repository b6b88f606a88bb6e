"""Bad settings of DoRA, IA3 and adapters fail before training, naming the key, the value and what is allowed."""

import pytest

from nemo_adapt.errors import ConfigError
from nemo_adapt.peft.adapter import AdapterConfig
from nemo_adapt.peft.base import get_peft_method, list_peft_methods
from nemo_adapt.peft.dora import DoRAConfig
from nemo_adapt.peft.ia3 import IA3Config


def test_registered_with_papers():
    for name, arxiv in (("dora", "2402.09353"), ("ia3", "2205.05638"), ("adapter", "1902.00751")):
        assert name in list_peft_methods()
        cls = get_peft_method(name)
        assert arxiv in cls.paper
        assert arxiv in __import__(cls.__module__, fromlist=["_"]).__doc__


@pytest.mark.parametrize("cls,kwargs,words", [
    (DoRAConfig, {"rank": 0}, ["peft.rank", "0"]),
    (DoRAConfig, {"target_modules": ["linear_q"]}, ["linear_q", "linear_qkv"]),
    (DoRAConfig, {"detach_norm": "yes"}, ["peft.detach_norm", "yes"]),
    (IA3Config, {"targets": ["queries"]}, ["queries", "keys, values, ffn"]),
    (IA3Config, {"targets": []}, ["peft.targets", "keys"]),
    (IA3Config, {"targets": ["keys", "keys"]}, ["twice"]),
    (AdapterConfig, {"bottleneck": -4}, ["peft.bottleneck", "-4"]),
    (AdapterConfig, {"placements": ["ffn"]}, ["ffn", "attention, mlp"]),
    (AdapterConfig, {"mode": "sequential"}, ["peft.mode", "sequential", "serial, parallel"]),
    (AdapterConfig, {"activation": "softmax"}, ["softmax", "relu, gelu, silu, tanh"]),
    (AdapterConfig, {"dropout": 1.5}, ["peft.dropout", "1.5"]),
])
def test_invalid_values_name_key_value_and_allowed(cls, kwargs, words):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    for w in words:
        assert w in str(err.value), f"{w!r} missing from: {err.value}"


@pytest.mark.megatron
def test_unmatched_targets_and_unsupported_layouts_are_refused():
    import torch

    from nemo_adapt.models.builder import build_model
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    torch.manual_seed(0)
    spec = get_model_spec("tiny_llama")
    # A model without linear_fc2 modules under that name: rename them so the IA3 ffn target matches nothing.
    model = build_model(spec)
    for layer in model.decoder.layers:
        layer.mlp.add_module("down", layer.mlp.linear_fc2)
        del layer.mlp._modules["linear_fc2"]
    with pytest.raises(ConfigError, match=r"peft.targets \['ffn'\] matched no module"):
        apply_peft(model, IA3Config())
    # The bottleneck is split over TP: a width TP does not divide is refused (TP size patched to 2 here;
    # the battery runs the real TP2 layouts).
    from nemo_adapt.peft.adapter import Bottleneck

    with pytest.raises(ConfigError, match="peft.bottleneck=3 must be divisible by parallel.tensor=2"):
        from unittest import mock

        with mock.patch("megatron.core.parallel_state.get_tensor_model_parallel_world_size", return_value=2):
            Bottleneck(spec.hidden_size, AdapterConfig(bottleneck=3), model.config, seed=0)
