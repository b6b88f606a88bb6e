"""Layout search, constraints, recipes and the `nemo-adapt plan` command, including the acceptance cases."""

import json
import re
from pathlib import Path

import pytest

from nemo_adapt.cli import main
from nemo_adapt.errors import ConfigError, ParallelLayoutError
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.planner.gpus import get_gpu
from nemo_adapt.planner.memory import Layout
from nemo_adapt.planner.search import (
    PlanRequest,
    allowed_tensor_sizes,
    check_layout,
    enumerate_layouts,
    evaluate_layout,
    layout_violations,
    plan,
    request_from_recipe,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
H100 = get_gpu("h100-80gb")


@pytest.fixture(scope="module")
def llama70b():
    return get_model_spec("llama3_70b")


# --- acceptance: published layouts fit their hardware; 70B full fine-tuning on one node is refused -------

FITTING = [
    ("llama3_70b_lora.yaml", (2, 4, 20, 1, 1), 8),
    ("llama3_70b_full.yaml", (4, 4, 5, 1, 2), 32),
    ("llama3_8b_lora.yaml", (1, 1, 1, 1, 8), 8),
    ("llama3_70b_lora_tp8.yaml", (8, 1, 1, 1, 1), 8),
]


@pytest.mark.parametrize(("recipe", "shape", "gpus"), FITTING, ids=[f[0] for f in FITTING])
def test_published_recipe_layouts_fit(recipe, shape, gpus):
    result = plan(request_from_recipe(RECIPES / recipe))
    lay = result.request.layout
    assert (lay.tp, lay.pp, lay.vp, lay.cp, lay.dp) == shape and result.world_size == gpus
    assert result.explicit_error is None
    assert result.explicit.fits, result.explicit.fit.reason
    assert result.explicit.fit.required_gib < H100.memory_gib
    assert result.ok and result.ranked  # alternatives are ranked too
    speeds = [round(c.perf.tokens_per_s_per_gpu) for c in result.ranked]  # ties within 1 tok/s -> memory
    assert speeds == sorted(speeds, reverse=True)


def test_70b_full_finetuning_on_one_node_is_refused_with_the_breakdown():
    result = plan(request_from_recipe(RECIPES / "llama3_70b_full.yaml", nodes=1))
    # The recipe's TP4 x PP4 = 16 cannot run on 8 GPUs ...
    assert "[world_size]" in result.explicit_error and "16" in result.explicit_error
    # ... and no other layout fits either: 70.6e9 params x (6 + 12/DP) B over 8 GPUs >= 78 GiB of states.
    assert not result.ok and not result.ranked and result.infeasible
    closest = result.infeasible[0]
    assert not closest.fits and closest.fit.required_gib > 150  # 18 B/param x 70.6e9 / 8 = 158 GiB
    assert "over by" in closest.fit.reason and "optimizer" in closest.fit.reason
    assert closest.fit.breakdown.worst.optimizer / 2**30 > 90  # the term that overflows


def test_70b_full_finetuning_explicit_single_node_layout_does_not_fit(llama70b):
    cand = evaluate_layout(llama70b, Layout(tp=8, dp=1, sequence_parallel=True, recompute="full"), H100,
                           gpus_per_node=8, seq_length=4096, global_batch_size=32, precision="fp8")
    assert not cand.fits and cand.fit.headroom_gib < -70


# --- constraints --------------------------------------------------------------------------------------


def test_tensor_not_dividing_heads_names_the_constraint(llama70b):
    with pytest.raises(ParallelLayoutError) as err:
        check_layout(llama70b, Layout(tp=3, dp=1), seq_length=4096, global_batch_size=32, world_size=3,
                     nvlink_domain=8)
    msg = str(err.value)
    assert "tensor=3 does not divide num_attention_heads=64 (allowed tensor sizes: 1, 2, 4, 8)" in msg
    assert "ffn_hidden_size=28672" in msg


@pytest.mark.parametrize(("layout", "world", "gbs", "constraint", "text"), [
    (Layout(tp=2, pp=3, dp=1), 6, 32, "pp_layers", "does not divide num_layers=80"),
    (Layout(tp=8, pp=4, vp=3, dp=1), 32, 32, "pp_layers", "4*3 = 12"),
    (Layout(tp=4, pp=2, dp=1), 16, 32, "world_size", "does not equal the 16 GPUs"),
    (Layout(tp=2, cp=3, dp=1), 6, 32, "cp_seq", "multiple of 2*context=6"),
    (Layout(tp=2, dp=4, micro_batch_size=3), 8, 32, "batch", "micro_batch_size*data = 3*4"),
    (Layout(tp=2, pp=4, vp=2, dp=1), 8, 6, "interleave", "multiple of pipeline=4"),
    (Layout(tp=16, dp=1), 16, 32, "tp_nvlink", "NVLink domain of 8"),
])
def test_each_constraint_is_named(llama70b, layout, world, gbs, constraint, text):
    bad = layout_violations(llama70b, layout, seq_length=4096, global_batch_size=gbs, world_size=world,
                            nvlink_domain=8)
    assert constraint in {v.constraint for v in bad}
    assert text in " ".join(v.message for v in bad)


def test_explicit_invalid_layout_is_reported_and_alternatives_ranked(llama70b):
    req = PlanRequest(model="llama3_70b", gpu="h100", nodes=1, gpus_per_node=8, method="lora",
                      layout=Layout(tp=3, dp=1))
    result = plan(req)
    assert "tensor=3 does not divide num_attention_heads=64" in result.explicit_error
    assert result.explicit is None and not result.ok and result.ranked


def test_kv_heads_may_be_replicated_but_not_split_unevenly(llama70b):
    # 8 KV heads: TP16 replicates them (16 % 8 == 0), which Megatron-Core allows; 64 heads and 28672 FFN split.
    assert allowed_tensor_sizes(llama70b, 16) == [1, 2, 4, 8, 16]
    # An NVL72 domain: TP must divide 72, so 16 is out.
    assert allowed_tensor_sizes(llama70b, 72) == [1, 2, 4, 8]
    # 60 heads / 6 KV heads: TP4 divides the heads but can neither split nor replicate 6 KV heads.
    odd = llama70b.replace(name="odd", num_attention_heads=60, num_query_groups=6, head_dim=128)
    assert allowed_tensor_sizes(odd, 8) == [1, 2]


def test_gb200_nvlink_spans_trays(llama70b):
    gb200 = get_gpu("gb200")
    assert gb200.nvlink_domain_size(4) == 72  # NVL72 across 4-GPU trays
    assert allowed_tensor_sizes(llama70b, gb200.nvlink_domain_size(4)) == [1, 2, 4, 8]
    assert allowed_tensor_sizes(llama70b, H100.nvlink_domain_size(4)) == [1, 2, 4]  # 4-GPU nodes cap TP


def test_every_enumerated_layout_is_valid(llama70b):
    layouts, rejected = enumerate_layouts(llama70b, world_size=32, nvlink_domain=8, seq_length=4096,
                                          global_batch_size=32)
    assert layouts and rejected
    for lay in layouts:
        assert lay.world_size == 32
        assert not layout_violations(llama70b, lay, seq_length=4096, global_batch_size=32, world_size=32,
                                     nvlink_domain=8), lay.label()
    assert {lay.recompute for lay in layouts} == {"none", "full"}  # selective == none under flash attention
    assert any(lay.vp > 1 for lay in layouts) and any(lay.cp > 1 for lay in layouts)


def test_405b_uses_the_embedding_and_loss_aware_pipeline_split():
    spec = get_model_spec("llama31_405b")  # 126 layers: PP 8 needs (126 + 2) / 8 = 16 per stage
    lay = Layout(tp=8, pp=8, dp=1, sequence_parallel=True, embedding_loss_split=True)
    assert [lay.stage_layers(126, k) for k in range(8)] == [15, 16, 16, 16, 16, 16, 16, 15]
    assert not layout_violations(spec, lay, seq_length=4096, global_batch_size=64, world_size=64, nvlink_domain=8)
    bad = layout_violations(spec, Layout(tp=8, pp=8, dp=1), seq_length=4096, global_batch_size=64, world_size=64,
                            nvlink_domain=8)
    assert bad[0].constraint == "pp_layers" and "num_layers+2" in bad[0].message


# --- bad input ------------------------------------------------------------------------------------------


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(ConfigError, match="Did you mean h100-80gb"):
        get_gpu("h100-8gb")
    with pytest.raises(ConfigError, match="a100-40gb or a100-80gb"):
        get_gpu("a100")
    with pytest.raises(ConfigError, match="unknown GPU type 'tpu-v5'"):
        plan(PlanRequest(model="llama3_8b", gpu="tpu-v5", nodes=1, gpus_per_node=8))


def test_impossible_request_names_the_bound():
    # tiny_llama: 4 heads, 4 layers; GBS 4, seq 64 -> at most TP4 x PP4 x CP16 x DP4 = 1024 GPUs.
    with pytest.raises(ParallelLayoutError) as err:
        plan(PlanRequest(model="tiny_llama", gpu="h100", nodes=1024, gpus_per_node=8, seq_length=64,
                         global_batch_size=4))
    msg = str(err.value)
    assert "no parallel layout of 8192 GPUs" in msg and "num_layers=4" in msg and "num_attention_heads=4" in msg
    assert "4*4*16*4 = 1024" in msg


def test_fp8_on_a100_and_unknown_model_are_refused():
    with pytest.raises(ConfigError, match="fp8 needs FP8 tensor cores"):
        plan(PlanRequest(model="llama3_8b", gpu="a100-80gb", nodes=1, gpus_per_node=8, precision="fp8"))
    with pytest.raises(ConfigError, match="model.name: .*llama3_80b.*Did you mean"):
        plan(PlanRequest(model="llama3_80b", gpu="h100", nodes=1, gpus_per_node=8))


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "r.yaml"
    model = "model: {name: llama3_8b, checkpoint: /checkpoints/Meta-Llama-3-8B}\n"
    bad.write_text(model + "data: {seq_length: 2048}\ntrain: {global_batch_size: 8}\n")
    with pytest.raises(ConfigError, match="cluster.gpu"):
        request_from_recipe(bad)
    bad.write_text(model + "train: {global_batch_size: 8, precision: fp16}\n"
                   "data: {seq_length: 2048}\ncluster: {gpu: h100, nodes: 1, gpus_per_node: 8}\n")
    with pytest.raises(ConfigError, match="train.precision='fp16'"):
        request_from_recipe(bad)
    # The trainer would open the default checkpoint (the embedded SmolLM2) and refuse it for llama3_8b.
    bad.write_text("model: {name: llama3_8b}\ncluster: {gpu: h100}\n")
    with pytest.raises(ConfigError, match=r"model.checkpoint='embedded:smollm2_135m' \(its default\) holds the "
                                          r"smollm2_135m architecture, but model.name='llama3_8b'; give model.checkpoint"):
        request_from_recipe(bad)
    # A misspelt key is refused as the trainer refuses it (the recipe goes through the trainer's loader).
    bad.write_text(model + "parallel: {tensr: 2}\ncluster: {gpu: h100}\n")
    with pytest.raises(ConfigError, match="tensr"):
        request_from_recipe(bad)


# --- the planner's defaults are the trainer's -------------------------------------------------------------


def test_layout_defaults_are_the_trainers():
    """`Layout()` describes what the trainer runs when a recipe leaves `parallel:` and the micro-batch unset."""
    from nemo_adapt.config.schema import ParallelConfig, TrainConfig

    par, train, lay = ParallelConfig(), TrainConfig(), Layout()
    assert (lay.tp, lay.pp, lay.cp) == (par.tensor, par.pipeline, par.context)
    assert lay.vp == (par.virtual_pipeline or 1)
    assert lay.sequence_parallel == par.sequence_parallel
    assert lay.distributed_optimizer == par.distributed_optimizer
    assert lay.recompute == (par.recompute or "none")
    assert lay.micro_batch_size == train.micro_batch_size


def test_the_planner_counts_with_the_trainers_config():
    """The planner keeps no defaults of its own: with no arguments it plans each method's config as the trainer
    builds it, and its count is the method's own (`PeftMethod.parameter_counts`)."""
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.peft.base import get_peft_method, peft_config_class
    from nemo_adapt.planner.memory import normalize_peft_args, peft_methods, peft_trainable_params

    spec = get_model_spec("llama3_8b")
    for method in peft_methods():
        assert normalize_peft_args(method) == peft_config_class(method)(method=method), method
        if method != "none":
            training, _ = get_peft_method(method).parameter_counts(peft_config_class(method)(), spec)
            assert peft_trainable_params(spec, method) == sum(training.values()) > 0, method


def test_recipe_keys_left_unset_take_the_trainers_defaults(tmp_path):
    """A recipe that leaves keys unset is planned as the trainer runs it, not with planner literals."""
    from nemo_adapt.config.schema import DataConfig, ParallelConfig
    from nemo_adapt.peft.lora import LoRAConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: llama3_8b, checkpoint: /checkpoints/Meta-Llama-3-8B}\npeft: {method: lora}\n"
                      "train: {global_batch_size: 32}\ncluster: {gpu: h100-80gb, nodes: 1, gpus_per_node: 8}\n")
    req = request_from_recipe(recipe)
    lay = req.layout  # no `parallel:` section: the trainer runs TP1/PP1, so that layout is evaluated
    assert (lay.tp, lay.pp, lay.vp, lay.cp, lay.dp) == (1, 1, 1, 1, 8)
    assert lay.distributed_optimizer is ParallelConfig().distributed_optimizer is False
    assert req.peft_args["rank"] == LoRAConfig().rank
    assert req.seq_length == DataConfig().seq_length
    assert req.precision == "bf16"  # train.precision=auto: bf16 on a GPU
    # The same recipe with the key set explicitly plans the distributed optimizer.
    recipe.write_text(recipe.read_text() + "parallel: {distributed_optimizer: true}\n")
    assert request_from_recipe(recipe).layout.distributed_optimizer is True


def test_model_given_only_by_its_checkpoint(tmp_path):
    """`embedded:` and `random:` checkpoints name their architecture; model.name must agree with it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {checkpoint: 'embedded:smollm2_135m'}\ntrain: {global_batch_size: 8}\n"
                      "cluster: {gpu: h100-80gb, nodes: 1, gpus_per_node: 8}\n")
    assert request_from_recipe(recipe).model == "smollm2_135m"
    recipe.write_text("model: {checkpoint: 'random:tiny_llama'}\ncluster: {gpu: h100-80gb}\n")
    with pytest.raises(ConfigError, match="holds the tiny_llama architecture, but model.name='smollm2_135m'.*"
                                          "set model.name=tiny_llama"):
        request_from_recipe(recipe)
    recipe.write_text("model: {name: tiny_llama, checkpoint: 'random:tiny_llama'}\ntrain: {global_batch_size: 8}\n"
                      "cluster: {gpu: h100-80gb}\n")
    assert request_from_recipe(recipe).model == "tiny_llama"


# --- recipes and CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")
                                          if p.name in {f[0] for f in FITTING}))
def test_recipes_have_a_header_with_hardware_and_launch_command(recipe):
    head = (RECIPES / recipe).read_text().split("\nmodel:")[0]
    assert head.startswith("#") and "Sized for" in head
    assert re.search(r"Launch: +sbatch .*launch/\w+\.sh", head)


def test_cli_json_and_exit_codes(capsys):
    assert main(["plan", str(RECIPES / "llama3_70b_lora.yaml"), "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["explicit"]["fits"] and len(data["ranked"]) == 3
    assert data["explicit"]["layout"]["virtual_pipeline"] == 20
    stage0 = data["explicit"]["memory"]["stages"][0]
    assert stage0["frozen_weights"] == pytest.approx(16.917, abs=1e-3)

    assert main(["plan", str(RECIPES / "llama3_70b_full.yaml"), "--nodes", "1"]) == 1
    out = capsys.readouterr().out
    assert "NO LAYOUT FITS" in out and "INVALID: [world_size]" in out and "optimizer" in out

    assert main(["plan", str(RECIPES / "llama3_8b_lora.yaml"), "--gpu", "h100-8gb"]) == 2
    assert "Did you mean h100-80gb" in capsys.readouterr().err


def test_cli_without_recipe(capsys):
    code = main(["plan", "--model", "llama3_8b", "--method", "lora", "--gpu", "h200", "--nodes", "1",
                 "--gpus-per-node", "8", "--seq-len", "2048", "--global-batch", "16", "--top", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Layouts that fit" in out and "h200-141gb" in out and "Best layout" in out
    assert main(["plan", "--model", "llama3_8b"]) == 2
    assert "--gpu, --nodes, --gpus-per-node" in capsys.readouterr().err
