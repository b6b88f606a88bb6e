"""Bad input is refused with a message naming the file, tensor, key or constraint — before any
model is built or weights are read."""

import json

import pytest
import torch

from nemo_adapt.errors import CheckpointError, ParallelLayoutError
from nemo_adapt.models.builder import check_layout, padded_vocab_size
from nemo_adapt.models.loader import open_source
from nemo_adapt.models.spec import get_model_spec, list_models


def test_registry_has_the_families_and_sizes_are_right():
    models = list_models()
    for name in ("smollm2_135m", "llama3_8b", "llama3_70b", "llama31_8b", "mistral_7b", "qwen25_7b",
                 "tiny_llama", "tiny_qwen2"):
        assert name in models
    # Published parameter counts: Llama-3-8B 8.03B, 70B 70.55B, Qwen2.5-7B 7.62B, SmolLM2 134.5M.
    assert abs(models["llama3_8b"].num_parameters() / 1e9 - 8.03) < 0.01
    assert abs(models["llama3_70b"].num_parameters() / 1e9 - 70.55) < 0.01
    assert abs(models["qwen25_7b"].num_parameters() / 1e9 - 7.62) < 0.01
    assert abs(models["smollm2_135m"].num_parameters() / 1e6 - 134.5) < 0.1


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(KeyError, match="llama3_8b"):
        get_model_spec("llama3_8")


@pytest.mark.parametrize("tp,pp,match", [
    (2, 1, "parallel.tensor=2 does not divide num_attention_heads=9"),
    (1, 4, "parallel.pipeline=4 does not divide num_layers=30"),
    (0, 1, "parallel.tensor=0 must be a positive integer"),
])
def test_layout_that_does_not_divide_the_model_is_refused(tp, pp, match):
    with pytest.raises(ParallelLayoutError, match=match):
        check_layout(get_model_spec("smollm2_135m"), tp, pp)


def test_tp_not_dividing_kv_heads_or_ffn_is_refused():
    spec = get_model_spec("tiny_llama").replace(num_attention_heads=8, num_query_groups=2, hidden_size=64)
    with pytest.raises(ParallelLayoutError, match="num_query_groups"):
        check_layout(spec, 4, 1)
    spec = get_model_spec("tiny_llama").replace(ffn_hidden_size=129)
    with pytest.raises(ParallelLayoutError, match="ffn_hidden_size=129"):
        check_layout(spec, 2, 1)


def test_vocab_padding_is_tp_independent_for_powers_of_two():
    assert padded_vocab_size(49152, 1) == padded_vocab_size(49152, 8) == 49152
    assert padded_vocab_size(32001, 2) == 32128
    assert padded_vocab_size(256, 3) == 384


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_source(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json. is missing"):
        open_source(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not valid JSON: Expecting property name enclosed in double quotes "
                                              r"\(line 1, column 2\)"):
        open_source(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama')
    with pytest.raises(CheckpointError) as err:
        open_source(tmp_path)
    assert "Unterminated string starting (line 1, column 16)" in str(err.value) and " at (" not in str(err.value)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2' is not supported"):
        open_source(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path, tiny_hf_dir):
    for f in tiny_hf_dir.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-loaded")
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        open_source(tmp_path, "tiny_qwen2")
    with pytest.raises(CheckpointError, match="pickles and are not loaded"):
        open_source(tmp_path / "pytorch_model.bin")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, tiny_hf_dir):
    from safetensors.torch import load_file, save_file

    for f in tiny_hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight'.*shape \(100, 64\).*expects \(128, 64\)"):
        open_source(tmp_path, "tiny_qwen2")


def test_missing_tensor_is_named(tmp_path, tiny_hf_dir):
    from safetensors.torch import load_file, save_file

    for f in tiny_hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor.*model.layers.2.self_attn.k_proj.bias"):
        open_source(tmp_path, "tiny_qwen2")


def test_checkpoint_of_another_architecture(tiny_hf_dir):
    with pytest.raises(CheckpointError, match="does not match model 'tiny_llama'.*qkv_bias"):
        open_source(tiny_hf_dir, "tiny_llama")


def test_embedded_gguf_matches_its_spec_and_wrong_spec_is_refused():
    src = open_source("embedded:smollm2_135m")
    assert src.spec.num_layers == 30 and src.spec.tie_word_embeddings
    with pytest.raises(CheckpointError, match="does not match model 'tiny_llama'"):
        open_source("embedded:smollm2_135m", "tiny_llama")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        open_source(bad)
