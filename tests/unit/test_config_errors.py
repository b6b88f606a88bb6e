"""Bad recipes and overrides fail early with one ConfigError that says where, what, and what would do."""

import textwrap

import pytest

from nemo_adapt.config import ConfigError, load_recipe


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return str(info.value)


@pytest.fixture
def recipe(tmp_path):
    return write(tmp_path, """
        # a small LoRA recipe
        run:
          name: demo
        peft:
          method: lora
          rank: 8
        train:
          global_batch_size: 8
          micro_batch_size: 2
        optim:
          lr: 1.0e-4
    """)


# --- the file ---------------------------------------------------------------------------------


def test_missing_file_names_it_and_suggests_a_sibling(tmp_path, recipe):
    msg = error(tmp_path / "recipe.yml")
    assert "recipe.yml" in msg and "does not exist" in msg
    assert f"did you mean {str(recipe)!r}" in msg


def test_missing_file_without_a_similar_one(tmp_path, recipe):
    msg = error(tmp_path / "zzzz.yaml")
    assert "does not exist" in msg and "did you mean" not in msg


def test_directory_is_not_a_recipe(tmp_path):
    assert "is a directory" in error(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "run: {name: x}\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", refuse)
    assert error(path) == f"recipe {str(path)!r} cannot be read: Permission denied"


def test_binary_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    assert error(path) == f"{path}: not a text file (not UTF-8 at byte 0)"


def test_yaml_syntax_error_has_file_and_line(tmp_path):
    path = write(tmp_path, """
        run:
          name: x
        peft: {method: lora, target_modules: [linear_qkv,
        train: {}
    """)
    msg = error(path)
    assert msg.startswith(f"{path}:")
    assert "not valid YAML" in msg and "flow sequence" in msg
    line = int(msg[len(str(path)) + 1:].split(":", 1)[0])
    assert line in (3, 4, 5)  # PyYAML reports where it noticed, within the broken flow sequence


def test_tab_indentation_is_a_yaml_error_with_line(tmp_path):
    path = write(tmp_path, "run:\n\tname: x\n")
    assert error(path).startswith(f"{path}:2: not valid YAML")


def test_two_documents_are_refused(tmp_path):
    path = write(tmp_path, "run: {name: a}\n---\nrun: {name: b}\n")
    msg = error(path)
    assert msg.startswith(f"{path}:2:") and "single document" in msg


def test_duplicate_key_names_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_size: 2\n  micro_batch_size: 4\n")
    assert error(path) == f"{path}:3: duplicate key 'train.micro_batch_size' (first set at line 2)"


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- run\n- train\n")
    msg = error(path)
    assert msg.startswith(f"{path}: a recipe must be a YAML mapping of sections (run, model, data, peft,")
    assert msg.endswith("got a list")


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "run: {name: x}\ntrain: 8\n")
    msg = error(path)
    assert msg.startswith(f"{path}:2: section 'train' must be a mapping of its keys (global_batch_size,")
    assert msg.endswith("got an integer 8")


def test_unknown_key_in_file_has_line_and_suggestion(recipe):
    recipe.write_text(recipe.read_text().replace("micro_batch_size: 2", "micro_bach_size: 2"))
    assert error(recipe) == (f"{recipe}:9: unknown key 'train.micro_bach_size'; "
                             f"did you mean 'train.micro_batch_size'?")


def test_unknown_section_has_line_and_suggestion(tmp_path):
    path = write(tmp_path, "run: {name: x}\noptimizer: {lr: 1.0}\n")
    assert error(path) == f"{path}:2: unknown section 'optimizer'; did you mean 'optim'?"


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n")
    assert error(path) == f"{path}:2: unknown key 'train.lr'; did you mean 'optim.lr'?"
    path = write(tmp_path, "lr: 0.1\n", "top.yaml")
    assert error(path) == f"{path}:1: unknown section 'lr'; did you mean 'optim.lr'? (keys go under their section)"


def test_unknown_key_without_a_close_match_lists_the_section(tmp_path):
    path = write(tmp_path, "checkpoint:\n  zzz: 1\n")
    assert error(path) == (f"{path}:2: unknown key 'checkpoint.zzz'; "
                           f"checkpoint has: save_interval, keep_last, resume, save_on_signal, resume_changes")


def test_non_string_key(tmp_path):
    path = write(tmp_path, "run:\n  name: x\n  1: y\n")
    assert error(path) == f"{path}:3: key 1 in section 'run' is not a field name"


# --- peft: keys depend on the method ------------------------------------------------------------


def test_peft_key_of_another_method(tmp_path):
    path = write(tmp_path, "peft:\n  method: none\n  rank: 8\n")
    assert error(path) == (f"{path}:3: unknown key 'peft.rank' for peft.method='none'; "
                           f"'rank' is a setting of peft.method dora / lora")


def test_peft_key_typo_is_suggested(tmp_path):
    path = write(tmp_path, "peft:\n  method: lora\n  rnak: 8\n")
    assert error(path) == f"{path}:3: unknown key 'peft.rnak' for peft.method='lora'; did you mean 'peft.rank'?"


def test_peft_unknown_key_lists_the_method_keys(tmp_path):
    path = write(tmp_path, "peft:\n  method: lora\n  zzz: 8\n")
    assert error(path) == (f"{path}:3: unknown key 'peft.zzz' for peft.method='lora'; "
                           f"peft.method='lora' has: method, init_from, rank, alpha, dropout, target_modules, layers, lr_ratio_b")


def test_peft_method_switched_by_override_says_so(recipe):
    assert error(recipe, ["peft.method=none"]) == (
        f"{recipe}:6: unknown key 'peft.rank' for peft.method='none'; 'rank' is a setting of peft.method dora / lora "
        f"(peft.method='none' comes from override 1 'peft.method=none')")


def test_unknown_peft_method_suggests(tmp_path):
    path = write(tmp_path, "run: {name: x}\npeft: {method: lorra}\n")
    msg = error(path)
    assert msg.startswith(f"{path}:2: peft.method='lorra' is not a registered method. Did you mean 'lora'?")
    assert "none" in msg and "lora" in msg


def test_peft_method_must_be_a_string(tmp_path):
    path = write(tmp_path, "peft:\n  method: [lora]\n")
    msg = error(path)
    assert msg.startswith(f"{path}:2: peft.method=['lora']: expected a string")


# --- types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ("train: {micro_batch_size: true}", "train.micro_batch_size=true: expected an integer, got a boolean"),
    ("train: {micro_batch_size: 2.0}", "train.micro_batch_size=2.0: expected an integer, got a number"),
    ("train: {micro_batch_size: two}", "train.micro_batch_size='two': expected an integer, got a string"),
    ("train: {micro_batch_size: null}", "train.micro_batch_size=null: expected an integer, got null"),
    ("optim: {lr: fast}", "optim.lr='fast': expected a number, got a string"),
    ("optim: {lr: true}", "optim.lr=true: expected a number, got a boolean"),
    ("run: {max_steps: 1e3}", "run.max_steps='1e3': expected an integer or null, got a string"),
    ("data: {packing: 1}", "data.packing=1: expected true or false, got an integer"),
    ("data: {packing: 'true'}", "data.packing='true': expected true or false, got a string"),
    ("run: {name: 1234}", "run.name=1234: expected a string, got an integer; quote it to pass a string"),
    ("run: {name: no}", "run.name=false: expected a string, got a boolean; quote it to pass a string"),
    ("data: {system_prompt: [a]}", "data.system_prompt=['a']: expected a string or null, got a list; "
                                   "quote it to pass a string"),
    ("logging: {wandb_tags: a}", "logging.wandb_tags='a': expected a list of strings, got a string; "
                                 "write a list: logging.wandb_tags=[a]"),
    ("logging: {wandb_tags: [a, 2]}", "logging.wandb_tags=['a', 2]: expected a list of strings, got a list; "
                                      "item 1 is an integer 2"),
    ("logging: {wandb_tags: {a: 1}}", "logging.wandb_tags={a: 1}: expected a list of strings, got a mapping"),
])
def test_wrong_type_names_key_value_and_expected_type(tmp_path, line, message):
    path = write(tmp_path, line + "\n")
    assert error(path) == f"{path}:1: {message}"


def test_wrong_type_on_its_own_line(tmp_path):
    path = write(tmp_path, "run:\n  name: x\n  seed: abc\n")
    assert error(path) == f"{path}:3: run.seed='abc': expected an integer, got a string"


# --- values (the schema's own checks), located -------------------------------------------------


def test_schema_error_gets_file_and_line_of_the_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-4\n  min_lr: 0.1\n")
    assert error(path) == f"{path}:3: optim.min_lr=0.1 is larger than optim.lr=0.0001"


def test_schema_choice_error_lists_allowed(tmp_path):
    path = write(tmp_path, "run: {name: x}\ntrain:\n  precision: fp16\n")
    assert error(path) == (f"{path}:3: train.precision='fp16' is not allowed; "
                           f"choose one of: 'auto', 'bf16', 'fp8', 'fp32'")


def test_schema_error_for_a_key_not_in_the_file_points_at_the_section(tmp_path):
    path = write(tmp_path, "run: {name: x}\nparallel:\n  virtual_pipeline: 2\n")
    assert error(path) == (f"{path}:3: parallel.virtual_pipeline=2 needs parallel.pipeline > 1; "
                           "set parallel.virtual_pipeline=null at parallel.pipeline=1")


def test_virtual_pipeline_of_one_is_refused_not_read_as_interleaving(tmp_path):
    path = write(tmp_path, "run: {name: x}\nparallel:\n  pipeline: 2\n  virtual_pipeline: 1\n")
    assert error(path).endswith("parallel.virtual_pipeline=1 is one model chunk per rank, the plain 1F1B "
                                "schedule: set it to null, or to 2 or more to interleave")


def test_peft_schema_error_is_located(tmp_path):
    path = write(tmp_path, "peft:\n  method: lora\n  target_modules: [linear_qkv, lm_head]\n")
    assert error(path).startswith(f"{path}:3: peft.target_modules entry 'lm_head' is not a linear layer")


# --- interpolation -------------------------------------------------------------------------------


def test_interpolation_to_a_missing_key(tmp_path):
    path = write(tmp_path, "run:\n  name: x\n  output_dir: runs/${run.nmae}\n")
    assert error(path) == (f"{path}:3: run.output_dir: cannot resolve interpolation: "
                           f"Interpolation key 'run.nmae' not found; did you mean ${{run.name}}?")


def test_interpolation_cycle(tmp_path):
    path = write(tmp_path, "logging:\n  wandb_name: ${logging.wandb_group}\n  wandb_group: ${logging.wandb_name}\n")
    msg = error(path)
    assert msg.startswith(f"{path}:") and "cannot resolve interpolation" in msg and "ecursive" in msg


def test_malformed_interpolation(tmp_path):
    path = write(tmp_path, "run:\n  name: x\n  output_dir: runs/${run.name\n")
    msg = error(path)
    assert msg.startswith(f"{path}:3: run.output_dir: not a valid value or ${{...}} interpolation")


def test_resolvers_are_refused(tmp_path):
    path = write(tmp_path, "logging:\n  wandb_entity: ${oc.env:USER}\n")
    msg = error(path)
    assert msg.startswith(f"{path}:2: logging.wandb_entity='${{oc.env:USER}}' calls an interpolation resolver")
    assert "must not depend on the environment" in msg


def test_mandatory_value_left_unset(tmp_path):
    path = write(tmp_path, "run: {name: x}\ndata:\n  train: ???\n")
    assert error(path) == (f"{path}:3: data.train is '???' (a value the recipe leaves to be given); "
                           f"set it in the recipe or with an override data.train=...")
    assert load_recipe(path, ["data.train=train.jsonl"]).data.train == "train.jsonl"


# --- overrides -----------------------------------------------------------------------------------


def test_override_without_equals(recipe):
    assert error(recipe, ["train.micro_batch_size=2", "optim.lr"]) == (
        "override 2 'optim.lr': expected key=value, e.g. train.micro_batch_size=2 or "
        "peft.target_modules=[linear_qkv,linear_proj]")


@pytest.mark.parametrize("text", ["=3", "train..lr=3", "train.lr-x=3", "1train=2", " .a=1"])
def test_override_key_must_be_dotted(recipe, text):
    assert "is not a dotted key such as train.micro_batch_size" in error(recipe, [text])


def test_override_unknown_key_names_the_override_and_suggests(recipe):
    assert error(recipe, ["run.seed=1", "train.micro_bach_size=4"]) == (
        "override 2 'train.micro_bach_size=4': unknown key 'train.micro_bach_size'; "
        "did you mean 'train.micro_batch_size'?")


def test_override_unknown_section(recipe):
    assert error(recipe, ["trian.micro_batch_size=4"]) == (
        "override 1 'trian.micro_batch_size=4': unknown section 'trian'; did you mean 'train'?")


def test_override_unknown_peft_key(recipe):
    assert error(recipe, ["peft.rnk=4"]) == (
        "override 1 'peft.rnk=4': unknown key 'peft.rnk' for peft.method='lora'; did you mean 'peft.rank'?")


def test_override_bad_yaml_value(recipe):
    msg = error(recipe, ["peft.target_modules=[linear_qkv,"])
    assert msg.startswith("override 1 'peft.target_modules=[linear_qkv,': the value is not valid YAML")


def test_override_wrong_type(recipe):
    assert error(recipe, ["train.micro_batch_size=four"]) == (
        "override 1 'train.micro_batch_size=four': train.micro_batch_size='four': "
        "expected an integer, got a string")


def test_override_value_error_is_attributed_to_the_override(recipe):
    assert error(recipe, ["train.micro_batch_size=3"]) == (
        "override 1 'train.micro_batch_size=3': train.global_batch_size=8 is not a multiple of "
        "train.micro_batch_size=3")


def test_override_too_deep(recipe):
    assert error(recipe, ["train.micro_batch_size.x=1"]) == (
        "override 1 'train.micro_batch_size.x=1': train.micro_batch_size={x: 1}: "
        "expected an integer, got a mapping")


def test_override_cannot_null_a_section(recipe):
    msg = error(recipe, ["parallel=null"])
    assert msg.startswith("override 1 'parallel=null': section 'parallel' must be a mapping of its keys (tensor,")
    assert msg.endswith("got null")


def test_override_resolver_is_refused(recipe):
    assert "calls an interpolation resolver" in error(recipe, ["run.output_dir=${oc.env:HOME}"])


def test_errors_write_nothing(tmp_path, recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error(recipe, ["optim.lr=-1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
