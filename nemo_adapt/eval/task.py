"""Task metric and prompt-only baseline prompts for the evaluation after training.

The fine-tuned model is scored by exact match of its generated answer against the reference
(after whitespace and case normalisation). The baseline it is compared with is the base model
prompted with the same instructions (the records' system message) and, optionally, k worked
examples from the training split as earlier user/assistant turns.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from nemo_adapt.data.formats import Record

_WHITESPACE = re.compile(r"\s+")


def normalize_answer(s: str) -> str:
    """An answer in canonical form: stripped, inner whitespace runs collapsed to one space, case-folded.

    Args:
        s: an answer (generated or reference).

    Returns:
        The normalised answer.
    """
    return _WHITESPACE.sub(" ", s).strip().casefold()


def exact_match(pred: str, ref: str) -> bool:
    """Whether a prediction equals the reference after `normalize_answer`.

    Args:
        pred: the generated answer (special tokens already removed).
        ref: the reference answer.

    Returns:
        True on a match.
    """
    return normalize_answer(pred) == normalize_answer(ref)


def few_shot_messages(train_records: Sequence[Record], k: int, seed: int) -> list[dict[str, str]]:
    """The start of a prompt-only baseline chat: instructions and k worked examples.

    The system message is the first record's (the instructions the fine-tuned model was trained
    with); each shot contributes its non-system turns, ending with its answer. The shots are a
    seeded sample, so the baseline is the same on every run. Append the test prompt's non-system
    turns (or use `baseline_messages`).

    Args:
        train_records: training records to draw shots from.
        k: number of worked examples (0: instructions only).
        seed: sampling seed.

    Returns:
        `[system?] + [user, assistant] * k` messages.

    Raises:
        ValueError: k is negative or larger than the number of records.
    """
    if k < 0 or k > len(train_records):
        raise ValueError(f"k={k} worked examples requested from {len(train_records)} training records")
    messages: list[dict[str, str]] = []
    if train_records and train_records[0].messages[0]["role"] == "system":
        messages.append(dict(train_records[0].messages[0]))
    for i in sorted(random.Random(seed).sample(range(len(train_records)), k)):
        messages.extend(dict(m) for m in train_records[i].messages if m["role"] != "system")
    return messages


def baseline_messages(shots: Sequence[dict[str, str]], prompt: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A baseline chat: a test prompt behind the worked examples from `few_shot_messages`.

    A system message in `prompt` wins over the one in `shots` (it is the test example's own
    instruction); either way it comes first and only once.

    Args:
        shots: output of `few_shot_messages`.
        prompt: a test record's `.prompt` (chat without the final answer).

    Returns:
        The chat to generate from.
    """
    system = [dict(m) for m in prompt if m["role"] == "system"] or [dict(m) for m in shots if m["role"] == "system"]
    return ([*system[:1], *(dict(m) for m in shots if m["role"] != "system"),
             *(dict(m) for m in prompt if m["role"] != "system")])
