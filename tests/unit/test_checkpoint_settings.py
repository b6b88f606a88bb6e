"""Settings a checkpoint states win over the registered architecture it is loaded as, with a warning
naming each; settings nemo-adapt cannot represent are refused with the key and value; keys only
consumers read are carried to the export."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from nemo_adapt.errors import CheckpointError
from nemo_adapt.models.hf import hf_config_from_spec, spec_from_hf_config, write_metadata
from nemo_adapt.models.loader import open_source
from nemo_adapt.models.spec import CheckpointSettingWarning, RopeScaling, get_model_spec
from tests.conftest import write_tiny_hf_checkpoint
from tests.unit.test_stop_tokens import _write_gguf

PROMPTS = torch.tensor([[5, 17, 33, 9, 12, 8, 21, 7, 40, 41, 42, 43, 3, 4, 90, 11] * 4])


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def rope_dir(tmp_path_factory):
    """The tiny Llama checkpoint with rope_theta 500000 (transformers 5 writes it in rope_parameters)."""
    from nemo_adapt.models.random_init import char_tokenizer

    directory = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("rope") / "tiny_llama_500k", "tiny_llama")
    _edit_config(directory, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    char_tokenizer().save_pretrained(str(directory))
    return directory


def test_checkpoint_rope_theta_wins_over_the_registered_spec_with_a_warning(rope_dir):
    assert open_source(rope_dir).spec.rope_theta == 500000.0
    with pytest.warns(CheckpointSettingWarning, match=r"rope_theta: checkpoint 500000.0, registered 10000.0.*"
                                                      r"checkpoint's values win") as record:
        spec = open_source(rope_dir, "tiny_llama").spec
    assert len([w for w in record if w.category is CheckpointSettingWarning]) == 1
    assert spec.name == "tiny_llama" and spec.rope_theta == 500000.0


@pytest.mark.megatron
def test_built_model_and_export_carry_the_checkpoint_rope_theta(rope_dir, tmp_path):
    import transformers

    from nemo_adapt.cli import main
    from nemo_adapt.generation.generate import forward_logits
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    with pytest.warns(CheckpointSettingWarning, match="rope_theta"):
        source = open_source(rope_dir, "tiny_llama")
    model, source = load_model(source)
    d = source.spec.kv_channels
    expected = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, expected)
    ours = forward_logits(model, PROMPTS, source.spec.vocab_size, source.spec.hidden_size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(rope_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(PROMPTS).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    # What the registry's rope_theta used to build: visibly different logits.
    stale = dataclasses.replace(source, spec=source.spec.replace(rope_theta=10000.0))
    old_model, _ = load_model(stale)
    old = forward_logits(old_model, PROMPTS, source.spec.vocab_size, source.spec.hidden_size)
    assert (old - ref).abs().max().item() > 1e-3

    out = tmp_path / "export"
    assert main(["export", str(out), "--checkpoint", str(rope_dir), "--model", "tiny_llama"]) == 0
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 500000.0
    assert transformers.AutoConfig.from_pretrained(str(out)).rope_parameters["rope_theta"] == 500000.0


def test_every_differing_setting_is_named_and_taken_from_the_checkpoint(tmp_path):
    directory = write_tiny_hf_checkpoint(tmp_path / "ckpt", "tiny_qwen2")
    _edit_config(directory, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=7, eos_token_id=[2, 0],
                 rope_parameters={"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
    with pytest.warns(CheckpointSettingWarning) as record:
        spec = open_source(directory, "tiny_qwen2").spec
    (message,) = [str(w.message) for w in record if w.category is CheckpointSettingWarning]
    for text in ("max_position_embeddings: checkpoint 128, registered 256",
                 "norm_eps: checkpoint 1e-05, registered 1e-06",
                 "bos_token_id: checkpoint 7, registered 1",
                 "eos_token_id: checkpoint [2, 0], registered 2",
                 "rope_scaling: checkpoint RopeScaling(factor=8.0"):
        assert text in message
    assert (spec.max_position_embeddings, spec.norm_eps, spec.bos_token_id, spec.eos_token_id) == (128, 1e-5, 7, (2, 0))
    assert spec.rope_scaling == RopeScaling(factor=8.0)


def test_shapes_still_refuse(tiny_hf_dir):
    with pytest.raises(CheckpointError, match="does not match model 'tiny_llama'.*qkv_bias"):
        open_source(tiny_hf_dir, "tiny_llama")


def _cfg(name="tiny_llama", **changes):
    cfg = hf_config_from_spec(get_model_spec(name))
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("cfg,match", [
    (_cfg("tiny_llama", model_type="mistral", max_position_embeddings=8192),
     r"sliding_window=4096 is shorter than max_position_embeddings=8192"),  # MistralConfig's default window
    (_cfg("tiny_llama", model_type="mistral", sliding_window=128), r"sliding_window=128 is shorter"),
    (_cfg("tiny_qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2),
     r"sliding_window=64 with use_sliding_window=true on 2 of 4 layers"),
    (_cfg(quantization_config={"quant_method": "gptq", "bits": 4}), r"quantization_config \(quant_method='gptq'\)"),
    (_cfg(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5"),
    (_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope scaling type 'yarn'.*supported: default, llama3"),
    (_cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}), r"low_freq_factor=1"),
    (_cfg(hidden_act="gelu"), r"hidden_act='gelu'"),
    (_cfg(mlp_bias=True), r"mlp_bias=True"),
    (_cfg(eos_token_id="</s>"), r"eos_token_id='</s>'"),
], ids=["mistral_default_window", "mistral_window", "qwen2_window", "quantized", "partial_rotary", "yarn",
        "llama3_factors", "gelu", "mlp_bias", "eos_text"])
def test_unrepresentable_settings_are_refused_naming_the_key(cfg, match):
    with pytest.raises(CheckpointError, match=match):
        spec_from_hf_config(cfg)


def test_inactive_or_long_sliding_windows_are_accepted_and_carried(tmp_path):
    qwen = spec_from_hf_config(_cfg("tiny_qwen2", use_sliding_window=False, sliding_window=64, max_window_layers=2))
    assert hf_config_from_spec(qwen)["use_sliding_window"] is False
    assert hf_config_from_spec(qwen)["sliding_window"] == 64
    long = spec_from_hf_config(_cfg(model_type="mistral", sliding_window=256))
    assert hf_config_from_spec(long)["sliding_window"] == 256
    # A Mistral spec without a window must say so: MistralConfig's default is a 4096-token window.
    none = spec_from_hf_config(_cfg(model_type="mistral", sliding_window=None))
    assert hf_config_from_spec(none)["sliding_window"] is None
    assert hf_config_from_spec(none.replace(hf_extra={}))["sliding_window"] is None


def test_consumer_keys_are_carried_to_the_export(tmp_path):
    cfg = _cfg(pad_token_id=0, initializer_range=0.01, attention_dropout=0.1, pretraining_tp=2, use_cache=False,
               custom_note="kept")
    gen = {"eos_token_id": 2, "bos_token_id": 1, "temperature": 0.6, "top_p": 0.9, "do_sample": True,
           "transformers_version": "4.0"}
    spec = spec_from_hf_config(cfg, generation_config=gen)
    write_metadata(tmp_path, spec, 1)
    out = json.loads((tmp_path / "config.json").read_text())
    for key in ("pad_token_id", "initializer_range", "attention_dropout", "pretraining_tp", "use_cache", "custom_note"):
        assert out[key] == cfg[key], key
    out_gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert {k: out_gen[k] for k in ("temperature", "top_p", "do_sample", "bos_token_id", "eos_token_id")} == \
        {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "bos_token_id": 1, "eos_token_id": 2}


def test_gguf_settings_win_over_the_registered_spec(tmp_path):
    path = _write_gguf(tmp_path / "s.gguf", freq_base=500000.0, eps=1e-6, context=128)
    with pytest.warns(CheckpointSettingWarning) as record:
        spec = open_source(path, "tiny_llama").spec
    (message,) = [str(w.message) for w in record if w.category is CheckpointSettingWarning]
    for text in ("rope_theta: checkpoint 500000.0, registered 10000.0", "norm_eps: checkpoint 1e-06, registered 1e-05",
                 "max_position_embeddings: checkpoint 128, registered 256"):
        assert text in message
    assert (spec.rope_theta, spec.norm_eps, spec.max_position_embeddings) == (500000.0, 1e-6, 128)
    # float32 storage of the same value is not a difference
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointSettingWarning)
        same = open_source(_write_gguf(tmp_path / "same.gguf"), "tiny_llama").spec
    assert same.norm_eps == 1e-5


def test_gguf_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path):
    import gguf
    import numpy as np

    from nemo_adapt.models.gguf_io import _llama3_rope_factors

    spec = get_model_spec("tiny_llama")
    factors = _llama3_rope_factors(500000.0, spec.kv_channels, RopeScaling(factor=8.0)).astype(np.float32)
    path = tmp_path / "l31.gguf"
    orig = gguf.GGUFWriter.write_header_to_file

    def with_freqs(self, *a, **k):  # the converter stores the divisors as one more tensor
        self.add_tensor("rope_freqs.weight", factors)
        return orig(self, *a, **k)

    gguf.GGUFWriter.write_header_to_file = with_freqs
    try:
        _write_gguf(path, freq_base=500000.0)
        _write_gguf(tmp_path / "bad.gguf", freq_base=10000.0)  # divisors that do not fit this base
    finally:
        gguf.GGUFWriter.write_header_to_file = orig
    assert open_source(path).spec.rope_scaling == RopeScaling(factor=8.0)
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        open_source(tmp_path / "bad.gguf")


@pytest.mark.parametrize("meta,match", [
    ({"rope_scaling_type": "yarn"}, r"llama.rope.scaling.type='yarn'"),
    ({"sliding_window": 64}, r"llama.attention.sliding_window=64"),
    ({"expert_count": 8}, r"llama.expert_count=8"),
    ({"rope_dimension_count": 8}, r"llama.rope.dimension_count=8.*whole head \(16\)"),
], ids=["yarn", "window", "experts", "partial_rotary"])
def test_gguf_unrepresentable_settings_are_refused(tmp_path, meta, match):
    import gguf

    if "rope_scaling_type" in meta:
        meta = {"rope_scaling_type": gguf.RopeScalingType.YARN}
    with pytest.raises(CheckpointError, match=match):
        open_source(_write_gguf(tmp_path / "x.gguf", **meta))
