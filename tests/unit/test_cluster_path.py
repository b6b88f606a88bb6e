"""The GPU path's settings, checked on CPU: what each attention backend receives for packed rows, what
bf16 mixed precision and FP8 configure, and the trainer preflight's refusals (each before any weights)."""

import dataclasses

import pytest
import torch

from nemo_adapt.config import load_recipe
from nemo_adapt.errors import ConfigError, ParallelLayoutError
from nemo_adapt.models.builder import BuildOptions, transformer_config
from nemo_adapt.models.spec import get_model_spec
from nemo_adapt.training.engine import packed_inputs, uses_thd_packing
from nemo_adapt.training.preflight import Target, check_recipe

TINY = "recipes/tiny_llama_lora_cpu.yaml"
LLAMA70 = "recipes/llama3_70b_lora.yaml"
H100 = Target("NVIDIA H100 80GB HBM3", fp8=True, transformer_engine=True, where="an H100 node")


def _packed_batch():
    # Two rows of 8: row 0 packs examples of 3 and 4 tokens + 1 padding; row 1 one example of 6 + 2 padding.
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]])
    tokens = torch.arange(16).view(2, 8)
    return {"tokens": tokens, "labels": tokens + 1, "loss_mask": (seg > 0).long(), "position_ids": pos,
            "segment_ids": seg}


def test_packed_rows_reach_transformer_engine_as_thd_with_cu_seqlens():
    batch, mask, params = packed_inputs(_packed_batch(), thd=True)
    assert mask is None
    assert params.qkv_format == "thd"
    # A sequence starts at every segment change and every row start: [0,3) [3,7) [7,8) | [8,14) [14,16).
    assert params.cu_seqlens_q.tolist() == [0, 3, 7, 8, 14, 16]
    assert params.cu_seqlens_kv.tolist() == [0, 3, 7, 8, 14, 16]
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == 6
    assert batch["tokens"].shape == (1, 16) and batch["tokens"][0, 8].item() == 8
    assert batch["loss_mask"].shape == (1, 16)


def test_packed_rows_reach_local_attention_as_block_diagonal_mask():
    batch, mask, params = packed_inputs(_packed_batch(), thd=False)
    assert params is None and batch["tokens"].shape == (2, 8)
    assert mask.shape == (2, 1, 8, 8)
    # Megatron convention: True = masked. Token 3 (second example) must not see tokens 0-2 of the first.
    assert mask[0, 0, 3, :3].all() and not mask[0, 0, 3, 3]
    assert not mask[0, 0, 2, :3].any()
    # Rows holding one example each: plain causal attention on the local path; THD keeps its shape
    # (pipeline p2p shapes must not change between micro-batches) with one sequence per run.
    single = {k: v[1:] for k, v in _packed_batch().items()}
    assert packed_inputs(single, thd=False)[1:] == (None, None)
    flat, mask, params = packed_inputs(single, thd=True)
    assert mask is None and flat["tokens"].shape == (1, 8) and params.cu_seqlens_q.tolist() == [0, 6, 8]


def test_local_spec_on_gpu_never_routes_packed_masks_through_the_causal_fused_softmax(monkeypatch):
    """Megatron's fused causal softmax applies its own triangle and ignores a given mask; packed data on
    the local spec (no Transformer Engine) must take the unfused softmax, which applies it."""
    from nemo_adapt.models import builder

    monkeypatch.setattr(builder, "_on_gpu", lambda: True)
    spec = get_model_spec("tiny_llama")
    kw = {"params_dtype": torch.bfloat16, "use_te": False}
    assert transformer_config(spec, 1, 1, BuildOptions(**kw)).masked_softmax_fusion is True
    assert transformer_config(spec, 1, 1, BuildOptions(**kw, packed_sequences=True)).masked_softmax_fusion is False
    # With TE the packed rows arrive as THD (above); the fused softmax setting does not see them.
    te = BuildOptions(params_dtype=torch.bfloat16, use_te=True, packed_sequences=True)
    assert transformer_config(spec, 1, 1, te).masked_softmax_fusion is True


def test_thd_only_when_every_core_attention_is_transformer_engines():
    class TEDotProductAttention(torch.nn.Module):
        pass

    class DotProductAttention(torch.nn.Module):
        pass

    def model(core):
        layer = torch.nn.Module()
        layer.self_attention = torch.nn.Module()
        layer.self_attention.core_attention = core()
        m = torch.nn.Module()
        m.layers = torch.nn.ModuleList([layer])
        return m

    assert uses_thd_packing(model(TEDotProductAttention))
    assert not uses_thd_packing(model(DotProductAttention))


def test_fp8_configures_megatrons_hybrid_delayed_recipe():
    spec = get_model_spec("tiny_llama")
    cfg = transformer_config(spec, 1, 1, BuildOptions(params_dtype=torch.bfloat16, fp8=True))
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 1024, "max")
    assert transformer_config(spec, 1, 1, BuildOptions(params_dtype=torch.bfloat16)).fp8 is None


def test_two_rank_interleaved_pipeline_uses_unbatched_p2p():
    spec = get_model_spec("tiny_llama")
    assert transformer_config(spec, 1, 2, virtual_pipeline=2).batch_p2p_comm is False
    assert transformer_config(spec, 1, 2).batch_p2p_comm is True


# ---------------------------------------------------------------- preflight refusals


def _check(recipe, overrides, world, target=H100):
    cfg = load_recipe(recipe, overrides)
    check_recipe(cfg, get_model_spec(cfg.model.name), world, target)


def test_shipped_70b_recipe_passes_the_trainer_preflight_on_its_cluster():
    _check(LLAMA70, [], 8)


@pytest.mark.parametrize("recipe,overrides,world,match", [
    (TINY, ["parallel.virtual_pipeline=2"], 2, r"parallel.virtual_pipeline=2 needs parallel.pipeline > 1; set parallel.virtual_pipeline=null"),
    (TINY, ["parallel.pipeline=2", "parallel.virtual_pipeline=3"], 2,
     r"parallel.pipeline x virtual_pipeline = 2 x 3 = 6 does not divide num_layers=4 of model 'tiny_llama'; with parallel.pipeline=2, virtual_pipeline sizes that do: 2$"),
    (LLAMA70, ["train.global_batch_size=6", "train.micro_batch_size=1"], 8,
     r"groups of parallel.pipeline=4, but a step has 6 per rank.*use a multiple of 4"),
    (LLAMA70, ["parallel.context=2", "parallel.pipeline=2", "parallel.virtual_pipeline=40",
               "data.seq_length=4094", "data.packing=false"], 8,
     r"data.seq_length=4094 must be divisible by 2 x parallel.context = 4"),
    (LLAMA70, ["parallel.context=2", "parallel.pipeline=2", "parallel.virtual_pipeline=40"], 8,
     r"parallel.context=2 with data.packing=true is not supported"),
    (TINY, ["parallel.sequence_parallel=true"], 1, r"sequence_parallel=true .* needs parallel.tensor > 1"),
    (TINY, ["parallel.tensor=2"], 3, r"3 processes cannot hold tensor x pipeline x context = 2 x 1 x 1"),
])
def test_layout_refusals(recipe, overrides, world, match):
    with pytest.raises((ConfigError, ParallelLayoutError), match=match):
        _check(recipe, overrides, world)


def test_context_parallel_needs_transformer_engine():
    no_te = dataclasses.replace(H100, transformer_engine=False, where="bare metal")
    with pytest.raises(ConfigError, match=r"parallel.context=2 needs Transformer Engine attention.*bare metal lacks"):
        _check(LLAMA70, ["parallel.context=2", "parallel.pipeline=2", "parallel.virtual_pipeline=40",
                         "data.packing=false", "train.precision=bf16"], 8, no_te)


def test_context_parallel_refused_for_virtual_token_methods():
    with pytest.raises(ConfigError, match=r"peft.method=p_tuning cannot run with parallel.context=2"):
        _check("recipes/llama3_8b_p_tuning.yaml", ["parallel.context=2", "data.packing=false"], 8)


def test_fp8_needs_an_fp8_gpu_and_transformer_engine():
    with pytest.raises(ConfigError, match=r"^train.precision='fp8' needs a GPU and Transformer Engine, which "
                                          r"this machine \(CPU only, no GPU\) lacks; use train.precision=bf16$"):
        _check(TINY, ["train.precision=fp8"], 1, Target.here())
    a100 = Target.cluster("a100-80gb", "nvcr.io/nvidia/nemo:25.07")
    with pytest.raises(ConfigError, match=r"needs FP8 tensor cores \(compute capability 8.9\+.*a100-80gb has none\)"):
        _check(LLAMA70, [], 8, a100)
    with pytest.raises(ConfigError, match=r"needs Transformer Engine, which cluster.gpu=h100-80gb .*bare metal"):
        _check(LLAMA70, [], 8, Target.cluster("h100-80gb", "none"))
    _check(LLAMA70, [], 8, Target.cluster("h100-80gb", "nvcr.io/nvidia/nemo:25.07"))


def test_fp8_is_refused_by_nemo_adapt_run_in_one_line_before_anything_is_built(tmp_path):
    """The whole CLI on this CPU machine: exit 2, one line naming the setting, no run directory."""
    import subprocess
    import sys

    from tests.conftest import write_tiny_chat_data, write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path, write_tiny_chat_data(tmp_path / "data", rows=16))
    proc = subprocess.run([sys.executable, "-m", "nemo_adapt.cli", "run", str(recipe), "train.precision=fp8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["nemo-adapt run: error: train.precision='fp8' needs a GPU and Transformer Engine, which this "
                     "machine (CPU only, no GPU) lacks; use train.precision=bf16"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- bf16 mixed precision, in process


@pytest.mark.megatron
def test_bf16_training_keeps_fp32_main_params_and_grads():
    from megatron.core.transformer.module import Float16Module

    from nemo_adapt.models.loader import load_model_chunks
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import apply_peft
    from nemo_adapt.peft.lora import LoRAConfig
    from nemo_adapt.training import engine

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    cfg = load_recipe(TINY, ["train.precision=bf16", "train.global_batch_size=2", "train.micro_batch_size=1"])
    dtype = engine.resolve_dtype("bf16")
    assert dtype == torch.bfloat16  # on a CPU-only machine too
    chunks, _ = load_model_chunks("random:tiny_llama", "tiny_llama", BuildOptions(params_dtype=dtype))
    chunks[0].config.calculate_per_token_loss = True
    apply_peft(chunks[0], LoRAConfig(rank=4, alpha=8), seed=0)
    ddp = engine.wrap_ddp(chunks, cfg)
    assert isinstance(ddp[0].module, Float16Module)
    optimizer = engine.build_optimizer(ddp, cfg)
    engine.connect_schedule_hooks(ddp, optimizer)
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    assert {type(o).__name__ for o in inner} == {"Float16OptimizerWithFloat16Params"}
    trainable = [p for p in ddp[0].parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    mains = [p for o in inner for g in o.fp32_from_float16_groups for p in g]
    assert len(mains) == len(trainable) and all(p.dtype == torch.float32 for p in mains)

    s = 16
    tokens = torch.randint(3, 200, (1, s))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(1, s, dtype=torch.long),
             "position_ids": torch.arange(s).unsqueeze(0), "segment_ids": torch.ones(1, s, dtype=torch.long)}
    before = [m.detach().clone() for m in mains]
    loss, grad_norm, updated = engine.train_step(ddp, optimizer, [batch, batch], s, 1, 1e-2)
    assert updated and grad_norm > 0 and 0 < loss < 20
    assert all(p.main_grad.dtype == torch.float32 for p in trainable)  # fp32 grad buffers (grad_reduce_in_fp32)
    assert any((m - b).abs().max() > 0 for m, b in zip(mains, before))
    # The bf16 weights are the rounded fp32 main weights.
    for p, m in zip(trainable, mains):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16).view_as(p))


def test_job_side_preflight_checks_the_recipes_gpu_when_its_step_sees_none(monkeypatch):
    """The Slurm job's one-task preflight step may start without GPUs: it then checks against the recipe's
    cluster.gpu and the job's container, not against the CPU it happens to see."""
    from nemo_adapt.launch.preflight import _job_target

    monkeypatch.setenv("NEMO_ADAPT_CONTAINER", "nvcr.io/nvidia/nemo:25.11")
    target = _job_target(load_recipe(LLAMA70, []))
    assert (target.gpu, target.fp8, target.transformer_engine) == ("h100-80gb", True, True)
    monkeypatch.setenv("NEMO_ADAPT_CONTAINER", "none")
    assert _job_target(load_recipe(LLAMA70, [])).transformer_engine is False
    assert _job_target(load_recipe(TINY, [])).gpu is None


@pytest.mark.megatron
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_on_cpu_gives_the_same_loss_and_gradients(recompute):
    """`parallel.recompute` runs on CPU (Megatron's CheckpointFunction keeps the CPU generator's state), and
    the recomputed forward redraws the same attention-dropout masks: loss and every gradient equal the
    run without recompute."""
    from nemo_adapt.models.loader import load_model_chunks
    from nemo_adapt.parallel import runtime
    from nemo_adapt.peft.base import PeftConfig, apply_peft
    from nemo_adapt.training import engine

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    cfg = load_recipe(TINY, ["train.global_batch_size=2", "train.micro_batch_size=1"])
    s = 32
    tokens = torch.randint(3, 200, (1, s), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(1, s, dtype=torch.long),
             "position_ids": torch.arange(s).unsqueeze(0), "segment_ids": torch.ones(1, s, dtype=torch.long)}

    def loss_and_grads(mode, seed=5):
        options = BuildOptions(recompute=mode, attention_dropout=0.1)
        chunks, _ = load_model_chunks("random:tiny_llama", "tiny_llama", options)
        chunks[0].config.calculate_per_token_loss = True
        apply_peft(chunks[0], PeftConfig(method="none"))
        ddp = engine.wrap_ddp(chunks, cfg)
        optimizer = engine.build_optimizer(ddp, cfg)
        engine.connect_schedule_hooks(ddp, optimizer)
        runtime.seed_all(seed)
        loss_sum, tokens_ = engine.run_schedule(ddp, [batch, batch], s, 1, forward_only=False)
        grads = {n: p.main_grad.clone() for n, p in ddp[0].named_parameters()}
        return loss_sum / tokens_, grads

    ref_loss, ref = loss_and_grads(None)
    loss, grads = loss_and_grads(recompute)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert grads.keys() == ref.keys()
    for name in ref:
        assert torch.allclose(grads[name], ref[name], atol=1e-6), name
    # Dropout was on (another seed, other masks, another loss): equal masks were needed for the match.
    assert loss_and_grads(None, seed=6)[0] != pytest.approx(ref_loss, abs=1e-6)


def test_planner_offers_no_context_parallel_layout_the_trainer_would_refuse():
    """Packed rows (the 70B LoRA recipe) cannot run with context parallelism: the planner's alternatives,
    which `launch` quotes when a layout does not fit, leave CP out; unpacked, CP layouts are offered."""
    from nemo_adapt.planner.search import plan, request_from_recipe

    packed = plan(request_from_recipe(LLAMA70))
    assert packed.ranked and all(c.layout.cp == 1 for c in packed.ranked)
    unpacked = plan(request_from_recipe(LLAMA70, overrides=["data.packing=false"]))
    assert any(c.layout.cp > 1 for c in unpacked.ranked)
