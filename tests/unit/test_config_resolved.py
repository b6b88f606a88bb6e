"""The resolved config: plain dict, YAML in the run directory, exact round trip; run dir; `nemo-adapt config`."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from nemo_adapt.cli import main
from nemo_adapt.config import (
    RecipeConfig,
    config_to_dict,
    load_recipe,
    load_resolved,
    resolve_run_dir,
    save_resolved,
)
from nemo_adapt.config.schema import RunConfig
from nemo_adapt.peft.lora import LoRAConfig

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))

TRICKY = r"""
run:
  name: '2024-05-01'
  output_dir: out/${run.name}
  max_steps: 10
  max_epochs: null
data:
  train: data/train.jsonl
  system_prompt: 'Answer with yes or no. Use \${slots}: äöü, ''quotes'', #hash'
logging:
  wandb_tags: ['on', '1e-4', 'null', '']
  wandb_group: '0x10'
optim:
  lr: 3e-4
  adam_eps: 1.0e-12
peft:
  method: lora
  alpha: 32
  target_modules: [linear_qkv]
"""


def test_config_to_dict_is_plain_and_in_schema_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TRICKY)
    d = config_to_dict(load_recipe(path))
    assert list(d) == ["run", "model", "data", "peft", "parallel", "train", "optim", "checkpoint", "logging",
                       "eval", "cluster"]
    assert d["peft"] == {"method": "lora", "init_from": None, "rank": 8, "alpha": 32.0, "dropout": 0.0,
                         "target_modules": ["linear_qkv"], "layers": None, "lr_ratio_b": 1.0}
    assert d["run"]["output_dir"] == "out/2024-05-01"
    yaml.safe_dump(d)  # only YAML-safe types


def test_config_to_dict_copies_lists():
    cfg = RecipeConfig()
    d = config_to_dict(cfg)
    d["logging"]["wandb_tags"].append("x")
    assert cfg.logging.wandb_tags == []


def test_round_trip_is_exact_for_tricky_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TRICKY)
    cfg = load_recipe(path)
    assert cfg.data.system_prompt == "Answer with yes or no. Use ${slots}: äöü, 'quotes', #hash"
    assert cfg.logging.wandb_tags == ["on", "1e-4", "null", ""]
    out = save_resolved(cfg, tmp_path / "run" / "nested" / "config.yaml")
    assert out == tmp_path / "run" / "nested" / "config.yaml"
    back = load_resolved(out)
    assert back == cfg
    assert type(back.peft) is LoRAConfig
    assert config_to_dict(back) == config_to_dict(cfg)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_resolved_file_is_commented_yaml_with_every_key(tmp_path):
    out = save_resolved(RecipeConfig(), tmp_path / "config.yaml")
    text = out.read_text()
    assert text.startswith("# Resolved nemo-adapt config")
    assert yaml.safe_load(text) == config_to_dict(RecipeConfig())


def test_load_resolved_takes_values_literally(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data: {system_prompt: 'keep ${run.name} as is'}\n")
    assert load_resolved(path).data.system_prompt == "keep ${run.name} as is"


def test_load_resolved_still_validates(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  micro_batch_size: 0\n")
    with pytest.raises(Exception, match=r"config.yaml:2: train.micro_batch_size=0 must be an integer > 0"):
        load_resolved(path)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_round_trips(tmp_path, recipe):
    cfg = load_recipe(recipe)
    assert load_resolved(save_resolved(cfg, tmp_path / "config.yaml")) == cfg


def test_resolve_run_dir():
    assert resolve_run_dir(RecipeConfig(run=RunConfig(name="exp1"))) == Path("runs/exp1")
    assert resolve_run_dir(RecipeConfig(run=RunConfig(name="x", output_dir="/scratch/a"))) == Path("/scratch/a")
    assert resolve_run_dir(RecipeConfig(run=RunConfig(output_dir="~/r"))) == Path.home() / "r"


# --- nemo-adapt config ---------------------------------------------------------------------------


def test_cli_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""
        run: {name: demo, output_dir: 'runs/${run.name}'}
        peft: {method: lora}
    """))
    code = main(["config", str(path), "run.name=cli", "peft.rank=4", "logging.wandb_tags=[a,b]"])
    out = capsys.readouterr().out
    assert code == 0
    d = yaml.safe_load(out)
    assert d["run"]["output_dir"] == "runs/cli" and d["peft"]["rank"] == 4
    assert d["logging"]["wandb_tags"] == ["a", "b"]
    assert d == config_to_dict(load_recipe(path, ["run.name=cli", "peft.rank=4", "logging.wandb_tags=[a,b]"]))


def test_cli_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  micro_bach_size: 2\n")
    assert main(["config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"nemo-adapt config: error: {path}:2: unknown key 'train.micro_bach_size'; "
                            f"did you mean 'train.micro_batch_size'?\n")


def test_cli_bad_override_is_exit_code_2(capsys):
    assert main(["config", str(RECIPES[0]), "optim.lr"]) == 2
    assert "override 1 'optim.lr': expected key=value" in capsys.readouterr().err


def test_cli_module_import_is_cheap():
    # `nemo-adapt --help` imports every subcommand module; torch must wait until a recipe is loaded.
    code = "import sys, nemo_adapt.config.cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_public_api_resolves():
    import nemo_adapt.config as config

    for name in config.__all__:
        assert getattr(config, name).__name__ == name
