"""The shared PEFT test table: one row per method (and notable variant). A new method adds a row here.

Each row is a `PeftCase`: a short id, the `peft:` section of a recipe (as a dict), and what the
method supports. The battery (`test_peft_battery.py`) runs every row at TP1, TP2, PP2 and TP2xPP2 in
one torchrun launch per layout; the merge tests use the `mergeable` rows. Sizes are for `tiny_llama`
(hidden 64, 4 heads in 2 KV groups of width 16, FFN 128, 4 layers): every split divides by 2.
Dropout stays 0 so every layout draws the same (no) masks and losses compare at 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeftCase:
    """One row of the battery."""

    id: str
    """Unique row name (test ids, output file names)."""
    peft: dict
    """The recipe's `peft:` section for this row, including `method`."""
    mergeable: bool = False
    """The method folds into the base weights (merge/unmerge are tested)."""
    generation: bool = True
    """Generation runs with the method applied."""
    extra: dict = field(default_factory=dict)
    """Free-form notes for methods that need more (e.g. virtual tokens need sequence room)."""


PEFT_CASES: list[PeftCase] = [
    PeftCase("lora", {"method": "lora", "rank": 4, "alpha": 8}, mergeable=True),
    PeftCase("dora", {"method": "dora", "rank": 4, "alpha": 8}, mergeable=True),
    # The norm's gradient path needs its own TP all-reduces: a row of its own.
    PeftCase("dora_norm_grad", {"method": "dora", "rank": 4, "alpha": 8, "detach_norm": False}, mergeable=True),
    PeftCase("ia3", {"method": "ia3"}, mergeable=True),
    PeftCase("adapter", {"method": "adapter", "bottleneck": 8, "activation": "gelu"}),
    PeftCase("adapter_parallel", {"method": "adapter", "bottleneck": 8, "mode": "parallel", "activation": "relu",
                                  "placements": ["mlp"]}),
]


def case_by_id(case_id: str) -> PeftCase:
    for case in PEFT_CASES:
        if case.id == case_id:
            return case
    raise KeyError(f"no PEFT case {case_id!r}; have {', '.join(c.id for c in PEFT_CASES)}")


def peft_config(case: PeftCase):
    """The typed config of a row (validated like a recipe's `peft:` section)."""
    from nemo_adapt.peft.base import peft_config_class

    return peft_config_class(case.peft["method"])(**case.peft)
