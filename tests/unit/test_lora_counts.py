"""The planner's closed-form LoRA size equals what the LoRA transform actually adds to a Megatron-Core model."""

import pytest

from nemo_adapt.models.builder import build_model
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.parallel import runtime
from nemo_adapt.peft.base import apply_peft, trainable_parameters
from nemo_adapt.peft.lora import LoRAConfig
from nemo_adapt.planner.memory import peft_trainable_params

pytestmark = pytest.mark.megatron


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "smollm2_135m"])
@pytest.mark.parametrize("rank,targets", [(8, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
                                          (4, ["linear_qkv"]), (16, ["linear_proj", "linear_fc2"])])
def test_planner_lora_count_equals_model(name, rank, targets):
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    spec = get_model_spec(name)
    model = build_model(spec)
    apply_peft(model, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets), seed=0)
    actual = trainable_parameters(model)
    # Per layer and target: r x (in + out), e.g. SmolLM2 linear_qkv: 8 x (576 + (9 + 2 x 3) x 64) = 12,288.
    assert actual == peft_trainable_params(spec, "lora", rank=rank, target_modules=targets)
    assert actual > 0
