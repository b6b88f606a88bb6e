"""Hugging Face PEFT as the reference for our exports: `PeftModel`'s logits and greedy tokens on a batch of prompts."""

from pathlib import Path

import torch


def hf_model(base: Path | str):
    """The Hugging Face base model in float32, in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def peft_logits_and_tokens(base: Path | str, peft_dir: Path | str, prompts: torch.Tensor, new_tokens: int,
                           use_generate: bool = True) -> tuple[torch.Tensor, list[list[int]]]:
    """`PeftModel`'s logits [b, s, vocab] on `prompts` ([b, s] token ids, equal lengths: no padding) and its
    `new_tokens` greedy tokens per prompt.

    With `use_generate`, tokens come from `PeftModel.generate` (KV cache); otherwise from one full
    `PeftModel.forward` per token. peft 0.21.2's `generate` under transformers 5 mis-decodes prompt-learning
    adapters (README): with a cache it re-injects the virtual tokens, and without one its prefix-tuning positions
    drift from `forward`'s after a few tokens, so those are decoded by forwards."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(base), str(peft_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=prompts).logits[:, -prompts.shape[1]:]
        if use_generate:
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        else:
            out = prompts
            for _ in range(new_tokens):
                out = torch.cat([out, model(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return logits, out[:, prompts.shape[1]:].tolist()
