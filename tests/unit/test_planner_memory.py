"""Memory estimator: every term of three configurations checked against arithmetic done by hand.

Shapes used below (from the published config.json files):
  llama3_70b: L=80, h=8192, ffn f=28672, a=64 heads, g=8 KV groups, d=128, V=128256
  llama3_8b:  L=32, h=4096, f=14336, a=32, g=8, d=128, V=128256
"""

import pytest

from nemo_adapt.errors import ConfigError, ParallelLayoutError
from nemo_adapt.models.spec import get_model_spec, list_models
from nemo_adapt.planner.gpus import GIB, get_gpu
from nemo_adapt.planner.memory import (
    Layout,
    LayoutDoesNotFitError,
    MemoryAssumptions,
    activation_bytes_per_layer,
    check_fits,
    estimate_memory,
    inflight_layers,
    padded_vocab_size,
    rank_params,
    state_bytes_per_param,
)

FIXED = 2 * GIB  # MemoryAssumptions.fixed_overhead_gib
FRACTION = 0.05  # MemoryAssumptions.overhead_fraction


def _overhead(tensor_bytes: float) -> float:
    return FIXED + FRACTION * tensor_bytes


@pytest.fixture(scope="module")
def llama70b():
    return get_model_spec("llama3_70b")


@pytest.fixture(scope="module")
def llama8b():
    return get_model_spec("llama3_8b")


# --- parameter counting -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(list_models()))
def test_rank_params_at_tp1_add_up_to_the_model(name):
    spec = get_model_spec(name)
    rp = rank_params(spec, 1)
    # TP1 pads the vocabulary to a multiple of 128 only; undo it to compare with the unpadded count.
    pad_rows = rp.padded_vocab - spec.vocab_size
    total = spec.num_layers * rp.layer + rp.final_norm + rp.embedding - pad_rows * spec.hidden_size
    if not spec.tie_word_embeddings:
        total += rp.output_layer - pad_rows * spec.hidden_size
    assert total == spec.num_parameters()


def test_rank_params_70b_tp2_by_hand(llama70b):
    rp = rank_params(llama70b, 2)
    # qkv: 8192 x (64/2 + 2*8/2) x 128 = 8192 x 5120 = 41,943,040
    # proj: (32 x 128) x 8192 = 33,554,432
    # fc1: 8192 x (2 x 28672 / 2) = 234,881,024;  fc2: (28672/2) x 8192 = 117,440,512
    # norms: 2 x 8192 = 16,384  ->  427,835,392 per layer
    assert rp.layer == 41_943_040 + 33_554_432 + 234_881_024 + 117_440_512 + 16_384 == 427_835_392
    # 128256 = 128 x 1002 is already a multiple of 128*2: no padding; 64128 rows x 8192.
    assert rp.padded_vocab == 128_256
    assert rp.embedding == 64_128 * 8192 == 525_336_576


@pytest.mark.parametrize(("tp", "padded"), [(1, 128_256), (2, 128_256), (4, 128_512), (8, 129_024)])
def test_vocab_padding_is_megatrons(tp, padded):
    # multiple of 128*tp: 512 -> ceil(128256/512)=251 -> 128,512; 1024 -> 126 x 1024 = 129,024
    assert padded_vocab_size(128_256, tp) == padded


def test_state_bytes_per_param_match_the_published_table():
    # bf16 weights 2 + fp32 grads 4 + fp32 master 4 + Adam 8 = 18 B
    assert sum(state_bytes_per_param("bf16", "fp32", False, 8)) == 18
    # distributed optimizer: 6 + 12/DP
    assert sum(state_bytes_per_param("bf16", "fp32", True, 8)) == 6 + 12 / 8
    # fp32 training: 16 B, distributed 8 + 8/DP (Megatron distributed-optimizer table)
    assert sum(state_bytes_per_param("fp32", "fp32", False, 4)) == 16
    assert sum(state_bytes_per_param("fp32", "fp32", True, 4)) == 8 + 8 / 4
    # bf16 gradient reduction: 2 + 2 + 12/DP
    assert sum(state_bytes_per_param("bf16", "bf16", True, 2)) == 4 + 6


# --- activations ------------------------------------------------------------------------------------


def test_korthikanti_formulas_without_flash_attention(llama70b):
    s, b, h, a, t = 4096, 1, 8192, 64, 8
    sbh = s * b * h
    sp = Layout(tp=t, sequence_parallel=True)
    # TP + SP: (sbh/t)(34 + 5as/h)
    assert activation_bytes_per_layer(llama70b, s, b, sp, flash_attention=False) == pytest.approx(
        sbh / t * (34 + 5 * a * s / h))
    # TP without SP: sbh(10 + 24/t + 5as/(ht))
    assert activation_bytes_per_layer(llama70b, s, b, Layout(tp=t), flash_attention=False) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    # selective recompute: 34 sbh/t
    sel = Layout(tp=t, sequence_parallel=True, recompute="selective")
    assert activation_bytes_per_layer(llama70b, s, b, sel, flash_attention=False) == pytest.approx(34 * sbh / t)
    # full recompute: 2sbh (sharded over t under SP)
    full = Layout(tp=t, sequence_parallel=True, recompute="full")
    assert activation_bytes_per_layer(llama70b, s, b, full, flash_attention=False) == pytest.approx(2 * sbh / t)
    assert activation_bytes_per_layer(llama70b, s, b, Layout(tp=t, recompute="full")) == pytest.approx(2 * sbh)
    # flash attention drops the 5as/h score term: none == selective
    assert activation_bytes_per_layer(llama70b, s, b, sp) == pytest.approx(34 * sbh / t)


def test_context_parallel_splits_the_sequence(llama70b):
    base = activation_bytes_per_layer(llama70b, 8192, 1, Layout(tp=2, sequence_parallel=True))
    cp4 = activation_bytes_per_layer(llama70b, 8192, 1, Layout(tp=2, cp=4, sequence_parallel=True))
    assert cp4 == pytest.approx(base / 4)


def test_inflight_micro_batches_follow_the_schedules():
    L = 80
    # 1F1B: stage k holds min(PP-k, m) micro-batches of L/PP layers; first stage -> L layers.
    assert inflight_layers(20, Layout(pp=4), 32, 0) == 80
    assert inflight_layers(20, Layout(pp=4), 32, 3) == 20
    assert inflight_layers(20, Layout(pp=4), 2, 0) == 40  # fewer micro-batches than stages
    # Interleaved first stage: L * (1 + (p-1)/(p*v)) (Narayanan et al. 2021), for several shapes.
    for p, v in ((4, 20), (4, 5), (2, 2), (8, 10)):
        lay = Layout(pp=p, vp=v)
        assert inflight_layers(L // p, lay, 64, 0) == pytest.approx(L * (1 + (p - 1) / (p * v)))
    # ...and the last stage warms up (v-1)*p chunks + 1: TP2/PP4/VP20 -> 77 one-layer chunks.
    assert inflight_layers(20, Layout(pp=4, vp=20), 32, 3) == 77


# --- configuration A: Llama-3 70B LoRA r16, TP2/PP4/VP20, seq 4096, GBS 32, MBS 1 (8 x H100) -------------


def test_breakdown_70b_lora_tp2_pp4_vp20(llama70b):
    lay = Layout(tp=2, pp=4, vp=20, dp=1, sequence_parallel=True, recompute="selective")
    mem = estimate_memory(llama70b, lay, "lora", seq_length=4096, global_batch_size=32, precision="fp8",
                          peft_args={"rank": 16})
    first, last = mem.stages
    assert (first.stage, last.stage) == (0, 3)
    # Frozen base on stage 0: 20 layers x 427,835,392 + embedding 525,336,576 = 9,082,044,416 params, 2 B each.
    assert first.frozen_params == 20 * 427_835_392 + 525_336_576 == 9_082_044_416
    assert first.frozen_weights == 2 * 9_082_044_416  # 16.92 GiB
    # Last stage: 20 layers + final norm 8,192 + output layer 525,336,576 (untied).
    assert last.frozen_params == 20 * 427_835_392 + 8192 + 525_336_576
    # LoRA on one TP2 rank, per layer (Megatron-Bridge sharding):
    #   qkv (column): A 16 x 8192 = 131,072 + B 16 x 5120 = 81,920
    #   proj (row):   A 16 x 4096 = 65,536  + B 16 x 8192 = 131,072
    #   fc1 (column): A 16 x 8192 = 131,072 + B 16 x 28672 = 458,752
    #   fc2 (row):    A 16 x 14336 = 229,376 + B 16 x 8192 = 131,072     -> 1,359,872 per layer
    lora = 20 * 1_359_872
    assert first.trainable_params == lora == 27_197_440
    # 2 B weights + 4 B fp32 grads + 12 B optimizer (DP=1: nothing to shard) = 18 B/param
    assert first.trainable_weights == 2 * lora and first.gradients == 4 * lora and first.optimizer == 12 * lora
    # Activations: 34 * s*b*h/t = 34 x 4096 x 8192 / 2 = 570,425,344 B per layer (flash attention);
    # stage 0 holds (4-1)*2 + (20-1)*4 + 1 = 83 one-layer chunks -> 83 x 570,425,344 = 47,345,303,552 B.
    assert mem.activation_per_layer == 570_425_344
    assert first.inflight_layers == 83 and first.activations == 83 * 570_425_344
    # Last stage: logits 6 B x 4096 x 128256 / 2 = 1,576,009,728 B, 77 chunks of activations.
    assert last.logits == 6 * 4096 * 128_256 / 2 == 1_576_009_728
    assert last.activations == 77 * 570_425_344
    tensors = first.frozen_weights + 18 * lora + first.activations
    assert first.overhead == pytest.approx(_overhead(tensors))
    # Worst stage is the first: 18.16e9 + 0.49e9 + 47.35e9 bytes + overhead = 66.5 GiB.
    assert mem.worst.stage == 0
    assert mem.total_gib == pytest.approx((tensors + _overhead(tensors)) / GIB)
    assert 66.0 < mem.total_gib < 67.0


# --- configuration B: Llama-3 70B full fine-tuning, TP4/PP4/VP5/DP2, full recompute (32 x H100) ----------


def test_breakdown_70b_full_tp4_pp4_vp5_dp2(llama70b):
    lay = Layout(tp=4, pp=4, vp=5, dp=2, sequence_parallel=True, recompute="full", distributed_optimizer=True)
    mem = estimate_memory(llama70b, lay, "none", seq_length=4096, global_batch_size=32, precision="fp8")
    first, last = mem.stages
    # Per TP4 rank per layer: qkv 8192 x (16 + 2*2) x 128 = 20,971,520; proj 16 x 128 x 8192 = 16,777,216;
    # fc1 8192 x 14336 = 117,440,512; fc2 7168 x 8192 = 58,720,256; norms 16,384 -> 213,925,888.
    # Embedding: vocab padded to 128,512 (multiple of 512) -> 32,128 rows x 8192 = 263,192,576.
    params0 = 20 * 213_925_888 + 263_192_576
    assert first.trainable_params == params0 == 4_541_710_336 and first.frozen_params == 0
    # Distributed optimizer over DP=2: 2 (bf16) + 4 (fp32 grad) + 12/2 = 12 B/param -> 54.5 GB = 50.76 GiB
    assert first.trainable_weights == 2 * params0
    assert first.gradients == 4 * params0
    assert first.optimizer == 6 * params0
    # Full recompute keeps the layer input: 2 x 4096 x 8192 / 4 = 16,777,216 B per layer; stage 0 holds
    # (3*2 + 4*4 + 1) = 23 chunks of 80/(4*5) = 4 layers = 92 layers.
    assert mem.activation_per_layer == 16_777_216
    assert first.inflight_layers == 92 and first.activations == 92 * 16_777_216
    # Last stage: + final norm + output layer; 17 chunks x 4 layers = 68; logits 6 x 4096 x 128512 / 4.
    assert last.trainable_params == 20 * 213_925_888 + 8192 + 263_192_576
    assert last.inflight_layers == 68
    assert last.logits == 6 * 4096 * 128_512 / 4 == 789_577_728
    assert 56.5 < mem.total_gib < 58.0  # fits 79.6 GiB
    assert any("128512" in n for n in mem.notes)  # padding is reported, not rejected


# --- configuration C: Llama-3 8B LoRA, TP1/PP1/DP8, no SP (8 x H100) ------------------------------------


def test_breakdown_8b_lora_tp1(llama8b):
    lay = Layout(tp=1, pp=1, dp=8, recompute="none", distributed_optimizer=True)
    mem = estimate_memory(llama8b, lay, "lora", seq_length=4096, global_batch_size=32, precision="bf16",
                          peft_args={"rank": 16})
    (only,) = mem.stages
    # Frozen: whole model, 8,030,261,248 params (32 x 218,112,000 + 4096 + 2 x 525,336,576) x 2 B.
    assert only.frozen_params == 8_030_261_248
    assert only.frozen_weights == 2 * 8_030_261_248
    # LoRA r16, whole model: 32 x 16 x [(4096+6144) + (4096+4096) + (4096+28672) + (14336+4096)] = 35,651,584;
    # distributed optimizer over DP=8: 2 + 4 + 12/8 = 7.5 B/param.
    assert only.trainable_params == 35_651_584
    assert only.trainable_weights + only.gradients + only.optimizer == pytest.approx(7.5 * 35_651_584)
    # No TP: sbh(10 + 24/1) = 34 x 4096 x 4096 = 570,425,344 B per layer, one micro-batch through 32 layers.
    assert only.activations == 32 * 570_425_344
    # Logits: 6 B x 4096 x 128256 = 3,152,019,456 B.
    assert only.logits == 3_152_019_456
    assert 38.0 < mem.total_gib < 40.0


def test_grad_dtype_decides_whether_the_published_sft_layout_keeps_all_activations(llama70b):
    h100 = get_gpu("h100-80gb")
    lay = Layout(tp=4, pp=4, vp=5, dp=2, sequence_parallel=True, recompute="none", distributed_optimizer=True)
    job = dict(seq_length=4096, global_batch_size=32, precision="fp8")
    fp32 = check_fits(llama70b, lay, h100, "none", **job)
    bf16 = check_fits(llama70b, lay, h100, "none", assumptions=MemoryAssumptions(grad_dtype="bf16"), **job)
    # fp32 grads: 4 B x 4.54e9 params = 16.9 GiB of gradients pushes stage 0 past 79.6 GiB;
    # Megatron-Bridge's run reduces gradients in bf16 (2 B), which saves 8.5 GiB and fits.
    assert not fp32.fits and 0 < -fp32.headroom_gib < 3
    assert bf16.fits
    assert fp32.breakdown.worst.gradients - bf16.breakdown.worst.gradients == pytest.approx(2 * 4_541_710_336)


def test_tied_embeddings_keep_a_copy_on_the_last_stage():
    spec = get_model_spec("tiny_llama")  # tied, L=4, h=64, V=256
    one = estimate_memory(spec, Layout(), "none", seq_length=64, global_batch_size=4)
    two = estimate_memory(spec, Layout(pp=2), "none", seq_length=64, global_batch_size=4)
    assert one.stages[0].trainable_params == spec.num_parameters()  # counted once at PP1
    first, last = two.stages
    # 256 x 64 embedding on stage 0 and again (the output-layer copy) on stage 1
    assert first.trainable_params + last.trainable_params == spec.num_parameters() + 256 * 64


def test_check_fits_refuses_70b_full_finetuning_on_one_node(llama70b):
    h100 = get_gpu("h100")
    lay = Layout(tp=8, pp=1, dp=1, sequence_parallel=True, recompute="full")
    with pytest.raises(LayoutDoesNotFitError, match="over by") as err:
        check_fits(llama70b, lay, h100, "none", seq_length=4096, global_batch_size=32, raise_on_failure=True)
    # 70.6e9 / 8 params x 18 B = 158 GiB: the optimizer term (12 B/param, no DP to shard it) dominates.
    assert "optimizer 98.6" in str(err.value)


def test_bad_layout_inputs_are_named():
    with pytest.raises(ConfigError, match="recompute='partial'"):
        Layout(recompute="partial")
    with pytest.raises(ConfigError, match="tp=0"):
        Layout(tp=0)
    with pytest.raises(ParallelLayoutError, match="virtual_pipeline=2 needs pipeline > 1"):
        Layout(vp=2)
    with pytest.raises(ParallelLayoutError, match="does not divide num_layers=80"):
        estimate_memory(get_model_spec("llama3_70b"), Layout(pp=3), "none", seq_length=128, global_batch_size=3)
