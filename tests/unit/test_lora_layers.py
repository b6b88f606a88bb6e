"""LoRA on a subset of decoder layers (`peft.layers`): validation, what gets adapted, and its count."""

import pytest

from nemo_adapt.config import load_recipe
from nemo_adapt.errors import ConfigError
from nemo_adapt.models.builder import build_model
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.parallel import runtime
from nemo_adapt.peft.base import apply_peft, trainable_parameters
from nemo_adapt.peft.lora import LoRA, LoRAConfig
from nemo_adapt.planner.memory import peft_trainable_params

RECIPE = "recipes/smollm2_135m_lora.yaml"


@pytest.mark.parametrize("override,message", [
    ("peft.layers=[-1]", "peft.layers=[-1] must be a non-empty list of layer indices >= 0"),
    ("peft.layers=[]", "peft.layers=[] must be a non-empty list"),
    ("peft.layers=[3,3]", "peft.layers=[3, 3] lists a layer twice"),
    ("peft.layers=[a]", "item 0 is a string 'a'"),
])
def test_bad_layer_lists_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(RECIPE, [override])


def test_layers_must_exist_and_reach_the_first_pipeline_stage():
    spec = get_model_spec("smollm2_135m")  # 30 layers
    cfg = load_recipe(RECIPE, ["peft.layers=[29,30]"])
    with pytest.raises(ConfigError, match=r"peft.layers has \[30\], but smollm2_135m has layers 0..29"):
        LoRA.check_recipe(cfg.peft, cfg, spec)
    cfg = load_recipe(RECIPE, ["peft.layers=[20,29]", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match=r"no adapter on the first pipeline stage \(layers 0..14"):
        LoRA.check_recipe(cfg.peft, cfg, spec)
    LoRA.check_recipe(load_recipe(RECIPE, ["peft.layers=[14,29]", "parallel.pipeline=2"]).peft,
                      load_recipe(RECIPE, ["parallel.pipeline=2"]), spec)


@pytest.mark.megatron
def test_only_the_chosen_layers_get_adapters_and_the_count_follows():
    runtime.initialize(runtime.ParallelLayout(), seed=0)
    spec = get_model_spec("tiny_llama")  # 4 layers
    model = build_model(spec)
    apply_peft(model, LoRAConfig(rank=4, alpha=8, layers=[1, 3]), seed=0)
    adapted = {name.split(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1", "3"}
    # Two of four layers: half the all-layer count, which the planner states per layer.
    all_layers = peft_trainable_params(spec, "lora", rank=4)
    assert trainable_parameters(model) == all_layers // 2
    assert peft_trainable_params(spec, "lora", rank=4, layers=[1, 3]) == all_layers // 2
