"""Stop tokens from the checkpoint are kept whole: every eos id of config.json and
generation_config.json (and a GGUF file's eos/eot/eom ids) goes through import, into the one stop set
generation and evaluation use, and back out on export as the list it was."""

import json
from pathlib import Path

import pytest
import torch

from nemo_adapt.generation.generate import stop_token_ids
from nemo_adapt.models.hf import hf_config_from_spec, spec_from_hf_config
from nemo_adapt.models.loader import open_source
from nemo_adapt.models.spec import get_model_spec
from tests.conftest import write_tiny_hf_checkpoint

# The character tokenizer of `random:` checkpoints: ids 0, 1, 2 are <|endoftext|>, <|im_start|>,
# <|im_end|>; "\n" is 3 and printable ASCII c is c - 28 ('&' = 10, "'" = 11, '(' = 12, ')' = 13).
ENDOFTEXT, IM_END = 0, 2


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _chain_checkpoint(directory: Path) -> Path:
    """A tiny Qwen2-style checkpoint whose greedy continuation of token 10 is 11, 12, 0, 13, 13, ...

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding:
    the model is a bigram table. Token x < 64 embeds as the unit vector e_x and lm_head row j is
    e_{pred(j)}, so the only positive logit after x is its successor in the chain.
    """
    from safetensors.torch import load_file, save_file

    from nemo_adapt.models.random_init import char_tokenizer

    write_tiny_hf_checkpoint(directory, "tiny_qwen2")
    tensors = load_file(str(directory / "model.safetensors"))
    emb = torch.zeros(256, 64)
    emb[:64] = torch.eye(64)
    emb[64:, 63] = 1.0  # any non-zero row: RMSNorm of a zero vector is not defined
    head = torch.zeros(256, 64)
    for prev, nxt in ((10, 11), (11, 12), (12, ENDOFTEXT), (ENDOFTEXT, 13), (13, 13)):
        head[nxt, prev] = 1.0
    tensors["model.embed_tokens.weight"] = emb
    tensors["lm_head.weight"] = head
    tensors["model.norm.weight"] = torch.ones(64)
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    char_tokenizer().save_pretrained(str(directory))
    # The checkpoint's own stop ids: its eos and, second, <|endoftext|> (id 0).
    _set_json(directory / "config.json", eos_token_id=[IM_END, ENDOFTEXT])
    _set_json(directory / "generation_config.json", eos_token_id=[IM_END, ENDOFTEXT], bos_token_id=1)
    return directory


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return _chain_checkpoint(tmp_path_factory.mktemp("stop") / "chain")


def test_spec_keeps_every_eos_id_and_writes_them_back():
    spec = get_model_spec("tiny_llama").replace(eos_token_id=[2, 0])
    assert spec.eos_token_id == (2, 0) and spec.eos_token_ids == (2, 0)
    assert hash(spec)  # still a frozen, hashable dataclass
    assert get_model_spec("tiny_llama").eos_token_ids == (2,)
    assert spec.replace(eos_token_id=[7, 7]).eos_token_id == 7  # one id stays an int
    assert hf_config_from_spec(spec)["eos_token_id"] == [2, 0]
    assert hf_config_from_spec(get_model_spec("tiny_llama"))["eos_token_id"] == 2
    with pytest.raises(ValueError, match="eos_token_id"):
        spec.replace(eos_token_id=[2, "x"])


def test_eos_ids_are_the_union_of_config_and_generation_config():
    cfg = hf_config_from_spec(get_model_spec("tiny_llama"))
    assert spec_from_hf_config({**cfg, "eos_token_id": 2}, generation_config={"eos_token_id": [2, 0]}).eos_token_id == (2, 0)
    # config.json's order first; generation_config.json's additions after
    assert spec_from_hf_config({**cfg, "eos_token_id": [5]}, generation_config={"eos_token_id": 2}).eos_token_id == (5, 2)
    assert spec_from_hf_config({**cfg, "eos_token_id": None}, generation_config={"eos_token_id": 9}).eos_token_id == 9


def test_stop_set_has_spec_ids_tokenizer_eos_and_end_of_turn(chain_dir):
    from nemo_adapt.models.random_init import char_tokenizer

    spec = open_source(chain_dir).spec
    tok = char_tokenizer()
    assert stop_token_ids(spec, tok) == {IM_END, ENDOFTEXT}
    assert stop_token_ids(spec) == {IM_END, ENDOFTEXT}
    # Qwen2.5 base: eos is <|endoftext|>, the ChatML template closes turns with <|im_end|>.
    qwen_base = char_tokenizer()
    qwen_base.eos_token = "<|endoftext|>"
    assert qwen_base.eos_token_id == ENDOFTEXT
    only_endoftext = spec.replace(eos_token_id=ENDOFTEXT)
    assert stop_token_ids(only_endoftext, qwen_base) == {ENDOFTEXT, IM_END}


@pytest.mark.megatron
def test_hf_dir_with_two_eos_ids_stops_at_the_second_and_exports_both(chain_dir, tmp_path, capsys):
    import transformers

    from nemo_adapt.cli import main
    from nemo_adapt.generation.generate import SamplingParams, generate
    from nemo_adapt.models.loader import load_model
    from nemo_adapt.parallel import runtime
    from nemo_adapt.tokenizer import load_tokenizer

    source = open_source(chain_dir, "tiny_qwen2")
    assert source.spec.eos_token_id == (IM_END, ENDOFTEXT)
    tok = load_tokenizer(source.tokenizer_path)
    stops = stop_token_ids(source.spec, tok)
    assert stops == {IM_END, ENDOFTEXT}

    runtime.initialize(runtime.ParallelLayout(), seed=0)
    model, source = load_model(source)
    spec = source.spec
    params = SamplingParams(max_new_tokens=6)
    out = generate(model, [[5, 10], [10]], params, stops, spec.vocab_size, spec.hidden_size,
                   spec.max_position_embeddings)
    assert out == [[11, 12], [11, 12]]
    # The stop set the old code built ({spec eos[0], tokenizer eos} = {2}) runs on past id 0.
    assert generate(model, [[10]], params, {IM_END}, spec.vocab_size, spec.hidden_size)[0] == [11, 12, 0, 13, 13, 13]
    # transformers, reading generation_config.json, stops at the same place.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(chain_dir), dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([[5, 10]]), max_new_tokens=6, do_sample=False)[0, 2:].tolist()
    assert ref == [11, 12, ENDOFTEXT]

    # The CLI stops there too: "&" is token 10, "'(" are 11 and 12.
    assert main(["generate", "--checkpoint", str(chain_dir), "--raw", "--max-new-tokens", "6", "&"]) == 0
    assert capsys.readouterr().out.strip() == "'("

    # Export keeps both ids in both files, and reads back the same.
    exported = tmp_path / "export"
    assert main(["export", str(exported), "--checkpoint", str(chain_dir), "--model", "tiny_qwen2"]) == 0
    for name in ("config.json", "generation_config.json"):
        assert json.loads((exported / name).read_text())["eos_token_id"] == [IM_END, ENDOFTEXT], name
    assert json.loads((exported / "generation_config.json").read_text())["bos_token_id"] == 1
    assert open_source(exported).spec.eos_token_id == (IM_END, ENDOFTEXT)
    assert transformers.GenerationConfig.from_pretrained(str(exported)).eos_token_id == [IM_END, ENDOFTEXT]


def _write_gguf(path: Path, **meta) -> Path:
    """A tiny_llama-shaped GGUF file (f32 zeros) with the given extra metadata."""
    import gguf
    import numpy as np

    from nemo_adapt.models.weights import hf_shapes

    spec = get_model_spec("tiny_llama")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(spec.num_layers)
    w.add_context_length(meta.pop("context", spec.max_position_embeddings))
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.ffn_hidden_size)
    w.add_head_count(spec.num_attention_heads)
    w.add_head_count_kv(spec.num_query_groups)
    w.add_rope_freq_base(meta.pop("freq_base", spec.rope_theta))
    w.add_layer_norm_rms_eps(meta.pop("eps", spec.norm_eps))
    w.add_vocab_size(spec.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = {v: k for k, v in {
        "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight"}.items()}
    for hf_name, shape in hf_shapes(spec).items():
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, idx, rest = hf_name.split(".", 3)
            name = f"blk.{idx}.{layer[rest]}"
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_end_of_turn_id_is_a_stop_id_and_is_exported(tmp_path):
    from nemo_adapt.models.hf import generation_config_from_spec

    spec = open_source(_write_gguf(tmp_path / "eot.gguf", eot_token_id=0)).spec
    assert spec.eos_token_id == (2, 0)
    assert stop_token_ids(spec) == {2, 0}
    assert generation_config_from_spec(spec)["eos_token_id"] == [2, 0]
    assert hf_config_from_spec(spec)["eos_token_id"] == [2, 0]


def test_stop_ids_outside_the_vocabulary_are_refused():
    from nemo_adapt.errors import CheckpointError

    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "eos_token_id": [2, 999]}
    with pytest.raises(CheckpointError, match=r"token id\(s\) \[999\] are outside the vocabulary \(vocab_size=256"):
        spec_from_hf_config(cfg)
    assert get_model_spec("tiny_llama").eos_token_ids == (2,)
