"""Deterministic random checkpoints for tiny test configs: `random:tiny_llama` as a checkpoint name.

A Hugging Face directory (config.json, safetensors written by `transformers`) plus a character-level
tokenizer with a ChatML template, so the whole product path — data, chat templates, training,
generation, export — runs on a model that trains in seconds. Created once per (spec, seed) in the
cache directory; the same name gives the same bytes on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from nemo_adapt.errors import CheckpointError

PREFIX = "random:"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as SmolLM2 and Qwen2 use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer: the three ChatML specials, newline and printable ASCII (99 ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", *(chr(c) for c in range(32, 127))]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def random_checkpoint(name: str, seed: int = 0) -> Path:
    """Path of the random checkpoint for registered spec `name`, creating it if needed.

    Raises:
        CheckpointError: `name` is not a tiny test config (random weights of a real model are useless
            and would take minutes to write).
    """
    import torch
    import transformers

    from nemo_adapt.models.hf import hf_config_from_spec
    from nemo_adapt.models.spec import get_model_spec
    from nemo_adapt.tokenizer import cache_dir

    spec = get_model_spec(name)
    if spec.num_parameters() > 50_000_000:
        raise CheckpointError(f"random:{name} is {spec.num_parameters() / 1e6:.0f}M parameters; random checkpoints "
                              "are for tiny test configs (tiny_llama, tiny_qwen2)")
    target = cache_dir() / "random" / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    cfg = hf_config_from_spec(spec)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok = char_tokenizer()
    if len(tok) > spec.vocab_size:
        raise CheckpointError(f"the character tokenizer needs {len(tok)} ids, more than {name}'s vocabulary")
    tok.save_pretrained(str(tmp))
    (tmp / "nemo_adapt_random.json").write_text(json.dumps({"spec": name, "seed": seed}) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process created it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
