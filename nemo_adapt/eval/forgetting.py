"""Forgetting: how much worse an adapted model predicts general text than its base.

The measure of Hugging Face PEFT's method comparison (there: the cross-entropy change on Wikipedia): the mean
per-token cross-entropy (nats) of the adapted model on held-out general passages minus the base model's on the
same passages. Positive: the adaptation made the model worse at general text. The interval is a 95% percentile
bootstrap over passages of the paired per-passage differences (`eval.metrics.interval`), so the noise of which
passages were drawn is separated from the effect. The shipped set is `datasets/general/heldout.jsonl`
(`data.general_corpus`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_TOKENS = 256
"""Tokens per passage at most (longer ones are cut): the shipped passages are ~100 tokens."""


@torch.no_grad()
def text_losses(model, tokenizer, spec, texts: Sequence[str], batch_size: int = 8) -> list[float]:
    """Mean next-token cross-entropy (nats/token) of each passage under the model (no chat template: raw text,
    BOS first when the tokenizer adds one).

    Args:
        model: this rank's model (one stage: every pipeline stage would be needed for the logits).
        tokenizer: its tokenizer.
        spec: the model's ModelSpec (vocabulary size, width).
        texts: the passages.
        batch_size: passages per forward pass (right-padded; padding is not scored).

    Returns:
        One loss per passage, in order.
    """
    from nemo_adapt.generation.generate import forward_logits

    ids = [tokenizer(t)["input_ids"][:MAX_TOKENS] for t in texts]
    out: list[float] = []
    for b in range(0, len(ids), batch_size):
        batch = ids[b:b + batch_size]
        n = max(len(x) for x in batch)
        tokens = torch.zeros(len(batch), n, dtype=torch.long)
        mask = torch.zeros(len(batch), n - 1)
        for i, x in enumerate(batch):
            tokens[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x) - 1] = 1.0
        logits = forward_logits(model, tokens, spec.vocab_size, spec.hidden_size)  # causal: padding comes after
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               tokens[:, 1:].reshape(-1), reduction="none").view(len(batch), n - 1)
        out.extend(((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist())
    return out


def forgetting(adapted: Sequence[float], base: Sequence[float]) -> dict:
    """Paired comparison of per-passage losses.

    Args:
        adapted: the adapted model's per-passage losses (`text_losses`).
        base: the base model's, same passages in the same order.

    Returns:
        {"loss_delta": {"value", "low", "high", "n"} (adapted - base, nats/token, 95% bootstrap interval),
         "adapted_loss", "base_loss" (means), "passages"}.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    from nemo_adapt.eval.metrics import interval

    if len(adapted) != len(base) or not adapted:
        raise ValueError(f"{len(adapted)} adapted and {len(base)} base passage losses; need the same, non-zero, count")
    diffs = [a - b for a, b in zip(adapted, base)]
    return {"loss_delta": interval(diffs), "adapted_loss": sum(adapted) / len(adapted),
            "base_loss": sum(base) / len(base), "passages": len(adapted)}
