"""Resolved configs round-trip: a literal `${` (or `???`) in a recipe string survives `nemo-adapt config`, the
run's config.yaml, `nemo-adapt plan` and `nemo-adapt launch --dry-run` unchanged, and is never resolved."""

import shlex
import textwrap

import pytest
import yaml

from nemo_adapt.cli import main
from nemo_adapt.config import (
    RecipeConfig,
    config_to_dict,
    dump_resolved,
    escape_literals,
    load_recipe,
    load_resolved,
    save_resolved,
)
from nemo_adapt.config.schema import DataConfig, LoggingConfig, RunConfig
from nemo_adapt.errors import ConfigError

PROMPT = "Answer as ${team}"
"""The reproduction: a system prompt that shows a template."""

GPU_RECIPE = textwrap.dedent(r"""
    run: {name: literal}
    data:
      train: data/train.jsonl
      system_prompt: 'Answer as \${team}'
    logging:
      wandb_tags: ['\${x}', plain]
    cluster: {gpu: h100-80gb, nodes: 1, gpus_per_node: 8}
""")

# Strings whose YAML or OmegaConf spelling is easy to get wrong; each must come back exactly.
TRICKY = [
    "${team}", "Answer as ${team}", "${run.name}", "${oc.env:HOME}", "${", "${}", "$${a", "a ${ b } c",
    "\\${x}", "\\\\${x}", "\\\\\\${x}", "a\\b ${x}", "${x}\\", "${x}\\\\", "end\\", "\\", "\\\\",
    "???", "\\???", "\\\\???", "x???", "??? ", "null", "~", "true", "1e-4", "0x10", "2024-05-01", "'quoted'",
    '"double"', "#hash", "key: value", "- item", "{a: 1}", "[1, 2]", "  padded  ", "line\nbreak",
    "tab\there", "crlf\r\n", "äöü ✓ 🙂", "u2028\u2028sep", "nel\x85", "bom\ufeff", "",
]


def _config(text: str) -> RecipeConfig:
    return RecipeConfig(run=RunConfig(name="rt"), data=DataConfig(train="t.jsonl", system_prompt=text),
                        logging=LoggingConfig(wandb_tags=[text, "x"]))


@pytest.mark.parametrize("text", TRICKY, ids=repr)
def test_resolved_text_reloads_to_the_same_values_as_recipe_and_as_resolved_file(tmp_path, text):
    cfg = _config(text)
    path = save_resolved(cfg, tmp_path / "config.yaml")
    assert load_resolved(path) == cfg
    # The resolved file is a recipe too: `nemo-adapt config/plan/launch/run` read it with load_recipe.
    assert load_recipe(path) == cfg
    assert load_recipe(path).data.system_prompt == text


def test_nemo_adapt_config_round_trips_a_literal_dollar_brace(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GPU_RECIPE)
    assert main(["config", str(recipe)]) == 0
    printed = capsys.readouterr().out
    first = tmp_path / "printed.yaml"
    first.write_text(printed)
    # Re-loaded, the printed config has the recipe's values; printed again, it is the same text.
    expected = load_recipe(recipe)
    assert expected.data.system_prompt == PROMPT and expected.logging.wandb_tags == ["${x}", "plain"]
    assert load_recipe(first) == expected
    assert load_resolved(first) == expected
    assert main(["config", str(first)]) == 0
    assert capsys.readouterr().out == printed
    # The YAML itself holds the escaped spelling, as a recipe author writes it.
    assert yaml.safe_load(printed)["data"]["system_prompt"] == "Answer as \\${team}"


def test_plan_reads_the_saved_config_yaml(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GPU_RECIPE)
    saved = save_resolved(load_recipe(recipe), tmp_path / "run" / "config.yaml")
    assert main(["plan", str(recipe), "--json"]) == 0
    from_recipe = yaml.safe_load(capsys.readouterr().out)
    assert main(["plan", str(saved), "--json"]) == 0
    from_saved = yaml.safe_load(capsys.readouterr().out)
    assert from_saved.pop("recipe") == str(saved) and from_recipe.pop("recipe") == str(recipe)
    for timing in (from_recipe, from_saved):
        timing.pop("elapsed_s", None)
    assert from_saved == from_recipe
    assert from_saved["ok"] is True and from_saved["model"] == "smollm2_135m"


def test_launch_dry_run_for_gpus_reads_the_saved_config_yaml(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GPU_RECIPE)
    saved = save_resolved(load_recipe(recipe), tmp_path / "run" / "config.yaml")
    assert main(["launch", "--gpu", "h100-80gb", "--nodes", "1", "--gpus-per-node", "8", "--dry-run",
                 str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"na_train {saved}" in out
    assert "-m nemo_adapt.cli run " in out  # the library printed the job's commands


def test_launch_dry_run_carries_a_literal_dollar_brace_override_to_the_job(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: literal}\ndata: {train: data/train.jsonl}\n"
                      "cluster: {gpu: h100-80gb, nodes: 1, gpus_per_node: 8}\n")
    override = "data.system_prompt=Answer as \\${team}"
    assert main(["launch", "--dry-run", str(recipe), override]) == 0
    script = capsys.readouterr().out.split("\n# The job runs")[0]
    train_line = next(line for line in script.splitlines() if line.startswith("na_train "))
    words = shlex.split(train_line)
    assert words[1:] == [str(recipe), override]
    # What the job's ranks load from those words is the literal prompt.
    assert load_recipe(words[1], words[2:]).data.system_prompt == PROMPT


def test_escape_literals_is_what_a_recipe_author_writes():
    assert escape_literals({"a": ["Answer as ${team}", 3], "b": "\\${x}", "c": "???", "d": "no dollar \\"}) == {
        "a": ["Answer as \\${team}", 3], "b": "\\\\\\${x}", "c": "\\???", "d": "no dollar \\"}


def test_dump_resolved_has_no_unescaped_dollar_brace():
    text = dump_resolved(_config("${a} and ${b.c}"))
    assert "${a}" not in text.replace("\\${", "")
    assert yaml.safe_load(text)["data"]["system_prompt"] == "\\${a} and \\${b.c}"
    assert config_to_dict(load_recipe_text(text)) == config_to_dict(_config("${a} and ${b.c}"))


def load_recipe_text(text: str) -> RecipeConfig:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(text)
        return load_recipe(path)


def test_config_yaml_saved_before_escaping_still_loads_literally(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("# Resolved nemo-adapt config: every key, defaults included, after overrides and interpolation.\n"
                   "# Load it with nemo_adapt.config.load_resolved (values are taken literally).\n"
                   "data:\n  system_prompt: 'keep \\${x} and ${run.name}'\n")
    assert load_resolved(old).data.system_prompt == "keep \\${x} and ${run.name}"


def test_resolver_call_after_an_escaped_backslash_is_still_refused(tmp_path):
    # `\\${oc.env:HOME}` is a backslash followed by a real resolver call, not a literal.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {system_prompt: '\\\\${oc.env:HOME}'}\n")
    with pytest.raises(ConfigError, match="calls an interpolation resolver"):
        load_recipe(recipe)
    recipe.write_text("data: {system_prompt: '\\${oc.env:HOME}'}\n")
    assert load_recipe(recipe).data.system_prompt == "${oc.env:HOME}"
