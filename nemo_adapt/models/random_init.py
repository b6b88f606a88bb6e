"""Deterministic random checkpoints for tiny test configs: `random:tiny_llama` as a checkpoint name.

A Hugging Face directory (config.json, safetensors written by `transformers`) plus a character-level
tokenizer with a ChatML template, so the whole product path — data, chat templates, training,
generation, export — runs on a model that trains in seconds. Created once in the cache directory per
(architecture as the registry states it, seed, versions of torch/transformers/tokenizers/safetensors
that initialise and write it, this module's code); the same name gives the same bytes on every
machine with the same versions. The entry's manifest holds a digest of each file, so an entry edited
after it was written is rebuilt (and the rebuild reported) instead of being trained on.
"""

from __future__ import annotations

import json
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


RANDOM_CACHE_FORMAT = 2
"""Layout of a cached random checkpoint; bump when what is written changes.
2: keyed on the architecture's content and the library versions, with a manifest."""


def random_checkpoint(name: str, seed: int = 0) -> Path:
    """Path of the random checkpoint for registered spec `name`, creating it if needed.

    Args:
        name: a registered tiny architecture (tiny_llama, tiny_qwen2).
        seed: torch seed of the initialisation.

    Returns:
        The cached Hugging Face directory, `<cache>/random/<name>-seed<seed>-<key>`.

    Raises:
        CheckpointError: `name` is not a tiny test config (random weights of a real model are useless
            and would take minutes to write).
    """
    from nemo_adapt.cache import cache_dir, cache_key, cached_directory, package_versions, source_digest
    from nemo_adapt.models.hf import hf_config_from_spec
    from nemo_adapt.models.spec import get_model_spec

    spec = get_model_spec(name)
    if spec.num_parameters() > 50_000_000:
        raise CheckpointError(f"random:{name} is {spec.num_parameters() / 1e6:.0f}M parameters; random checkpoints "
                              "are for tiny test configs (tiny_llama, tiny_qwen2)")
    cfg = hf_config_from_spec(spec)
    # The registry entry's values (not only its name) decide the weights: a changed rope_theta or
    # vocabulary makes another checkpoint.
    key = {"kind": "random-checkpoint", "format": RANDOM_CACHE_FORMAT, "spec": name, "seed": seed,
           "hf_config": cfg, "code": source_digest(__name__),
           "versions": package_versions("torch", "transformers", "tokenizers", "safetensors", "nemo-adapt")}
    target = cache_dir() / "random" / f"{name}-seed{seed}-{cache_key(key)[:16]}"
    return cached_directory(target, key, lambda out: _write_random(out, name, spec, cfg, seed),
                            what=f"random checkpoint random:{name} (seed {seed})")


def _write_random(out: Path, name: str, spec, cfg: dict, seed: int) -> None:
    """Initialise `spec` with `seed` in transformers and save it, with the character tokenizer, to `out`."""
    import torch
    import transformers

    from nemo_adapt.tokenizer import quiet_transformers

    quiet_transformers()  # no "Writing model shards" progress bar on stderr of a command that makes one
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    tok = char_tokenizer()
    if len(tok) > spec.vocab_size:
        raise CheckpointError(f"the character tokenizer needs {len(tok)} ids, more than {name}'s vocabulary")
    tok.save_pretrained(str(out))
    (out / "nemo_adapt_random.json").write_text(json.dumps({"spec": name, "seed": seed}) + "\n")
