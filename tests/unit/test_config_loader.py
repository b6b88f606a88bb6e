"""Recipes and overrides become typed configs: defaults, YAML value semantics, interpolation, peft classes."""

import textwrap

import pytest

from nemo_adapt.config import (
    LoggingConfig,
    OptimConfig,
    PeftConfig,
    RecipeConfig,
    TrainConfig,
    load_recipe,
)
from nemo_adapt.peft.lora import LINEAR_TARGETS, LoRAConfig


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_missing_sections_get_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, "train: {micro_batch_size: 2}\n"))
    assert cfg.train == TrainConfig(micro_batch_size=2)
    assert cfg.optim == OptimConfig()
    assert cfg.logging == LoggingConfig()
    assert type(cfg.peft) is PeftConfig and cfg.peft.method == "none"


def test_empty_file_and_empty_section_are_all_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "# only a comment\n")) == RecipeConfig()
    assert load_recipe(write(tmp_path, "optim:\n# lr: 1.0\n", "b.yaml")) == RecipeConfig()


def test_peft_method_picks_the_config_class(tmp_path):
    cfg = load_recipe(write(tmp_path, "peft: {method: lora, rank: 4}\n"))
    assert type(cfg.peft) is LoRAConfig
    assert cfg.peft.rank == 4 and cfg.peft.target_modules == list(LINEAR_TARGETS)


def test_overrides_use_yaml_value_semantics(tmp_path):
    path = write(tmp_path, """
        peft: {method: lora}
        parallel: {pipeline: 2, virtual_pipeline: 4}
    """)
    cfg = load_recipe(path, [
        "train.micro_batch_size=2",
        "optim.lr=3e-4",
        "peft.target_modules=[linear_qkv,linear_proj]",
        "parallel.virtual_pipeline=null",
        "logging.wandb_tags=[a,b]",
        "data.packing=true",
        "data.system_prompt=Answer briefly.",
        "run.max_steps=",  # an empty value is YAML null
    ])
    assert cfg.train.micro_batch_size == 2
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.peft.target_modules == ["linear_qkv", "linear_proj"]
    assert cfg.parallel.virtual_pipeline is None and cfg.parallel.pipeline == 2
    assert cfg.logging.wandb_tags == ["a", "b"]
    assert cfg.data.packing is True
    assert cfg.data.system_prompt == "Answer briefly."
    assert cfg.run.max_steps is None


def test_later_override_wins_and_lists_are_replaced(tmp_path):
    path = write(tmp_path, "peft: {method: lora, target_modules: [linear_qkv, linear_fc1]}\n")
    cfg = load_recipe(path, ["train.micro_batch_size=2", "train.micro_batch_size=4",
                             "peft.target_modules=[linear_fc2]"])
    assert cfg.train.micro_batch_size == 4
    assert cfg.peft.target_modules == ["linear_fc2"]


def test_section_override_merges_into_the_recipe_section(tmp_path):
    path = write(tmp_path, "peft: {method: lora, rank: 16, alpha: 32}\n")
    cfg = load_recipe(path, ["peft={rank: 4, dropout: 0.1}"])
    assert (cfg.peft.rank, cfg.peft.alpha, cfg.peft.dropout) == (4, 32.0, 0.1)


def test_override_can_switch_method_when_the_keys_fit(tmp_path):
    cfg = load_recipe(write(tmp_path, "peft: {method: none}\n"), ["peft.method=lora", "peft.rank=2"])
    assert type(cfg.peft) is LoRAConfig and cfg.peft.rank == 2


def test_interpolation_sees_overrides(tmp_path):
    path = write(tmp_path, """
        run:
          name: demo
          output_dir: runs/${run.name}-seed${run.seed}
        logging:
          wandb_name: ${run.name}
          wandb_tags: ['${model.name}', fixed]
    """)
    cfg = load_recipe(path)
    assert cfg.run.output_dir == "runs/demo-seed1234"
    assert cfg.logging.wandb_name == "demo"
    assert cfg.logging.wandb_tags == ["smollm2_135m", "fixed"]
    cfg = load_recipe(path, ["run.name=other", "run.seed=7"])
    assert cfg.run.output_dir == "runs/other-seed7" and cfg.logging.wandb_name == "other"


def test_interpolation_keeps_the_referenced_type(tmp_path):
    path = write(tmp_path, "train: {global_batch_size: '${train.micro_batch_size}', micro_batch_size: 4}\n")
    assert load_recipe(path).train.global_batch_size == 4


def test_escaped_interpolation_is_literal(tmp_path):
    path = write(tmp_path, r"data: {system_prompt: 'Fill in \${name}.'}" + "\n")
    assert load_recipe(path).data.system_prompt == "Fill in ${name}."


@pytest.mark.parametrize(("text", "expected"), [
    ("optim: {lr: 1e-4}", 1e-4),      # YAML 1.1 leaves this a string
    ("optim: {lr: 1.0e-4}", 1e-4),
    ("optim: {lr: 3E-5}", 3e-5),
    ("optim: {lr: 1}", 1.0),          # int for a float field
    ("optim: {lr: '2e-3'}", 2e-3),
])
def test_float_fields_accept_ints_and_exponent_strings(tmp_path, text, expected):
    lr = load_recipe(write(tmp_path, text + "\n")).optim.lr
    assert lr == expected and type(lr) is float


def test_int_for_float_field_is_stored_as_float(tmp_path):
    cfg = load_recipe(write(tmp_path, "peft: {method: lora, alpha: 32}\nrun: {max_epochs: 2}\n"))
    assert type(cfg.peft.alpha) is float and type(cfg.run.max_epochs) is float


def test_dates_and_numbers_quoted_stay_strings(tmp_path):
    cfg = load_recipe(write(tmp_path, "run: {name: 2024-05-01}\nlogging: {wandb_group: '42'}\n"))
    assert cfg.run.name == "2024-05-01"
    assert cfg.logging.wandb_group == "42"


def test_yaml_anchors_and_merge_keys(tmp_path):
    path = write(tmp_path, """
        run: {name: &name demo}
        logging: {wandb_name: *name}
        train:
          <<: {global_batch_size: 16, micro_batch_size: 2}
          micro_batch_size: 4
    """)
    cfg = load_recipe(path)
    assert cfg.logging.wandb_name == "demo"
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (16, 4)


def test_path_may_be_str(tmp_path):
    path = write(tmp_path, "run: {name: s}\n")
    assert load_recipe(str(path)).run.name == "s"
