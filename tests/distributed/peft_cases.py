"""The shared PEFT test table: one row per method (and notable variant). A new method adds a row here.

Each row is a `PeftCase`: a short id, the `peft:` section of a recipe (as a dict), and what the
method supports. The battery (`test_peft_battery.py`) runs every row at TP1, TP2, PP2 and TP2xPP2 in
one torchrun launch per layout. Sizes are for `tiny_llama` (hidden 64, 4 heads in 2 KV groups of
width 16, FFN 128, 4 layers): every split divides by 2. Dropout stays 0 so every layout draws the
same (no) masks and losses compare at 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeftCase:
    """One row of the battery."""

    id: str
    """Unique row name (test ids, output file names)."""
    peft: dict
    """The recipe's `peft:` section for this row, including `method`."""
    mergeable: bool = False
    """The method folds into the base weights: merge and unmerge are tested."""
    collapsible: bool = False
    """A training-time reparameterisation collapses into the saved form: outputs before/after are compared."""
    starts_at_base: bool = True
    """The freshly applied method computes exactly the base model (zero-initialised weight methods);
    virtual tokens and prefixes change the outputs from step 0."""
    packed: bool = True
    """Train on packed rows (two examples per row); virtual tokens need one example per row (padded)."""


PEFT_CASES: list[PeftCase] = [
    PeftCase("lora", {"method": "lora", "rank": 4, "alpha": 8}, mergeable=True),
    PeftCase("dora", {"method": "dora", "rank": 4, "alpha": 8}, mergeable=True),
    # The norm's gradient path needs its own TP all-reduces: a row of its own.
    PeftCase("dora_norm_grad", {"method": "dora", "rank": 4, "alpha": 8, "detach_norm": False}, mergeable=True),
    PeftCase("ia3", {"method": "ia3"}, mergeable=True),
    PeftCase("adapter", {"method": "adapter", "bottleneck": 8, "activation": "gelu"}),
    PeftCase("adapter_parallel", {"method": "adapter", "bottleneck": 8, "mode": "parallel", "activation": "relu",
                                  "placements": ["mlp"]}),
    PeftCase("prompt_tuning", {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "vocab"},
             starts_at_base=False, packed=False),
    PeftCase("p_tuning_mlp", {"method": "p_tuning", "num_virtual_tokens": 4, "encoder": "mlp",
                              "encoder_hidden": 32, "encoder_layers": 3},
             collapsible=True, starts_at_base=False, packed=False),
    PeftCase("p_tuning_lstm", {"method": "p_tuning", "num_virtual_tokens": 3, "encoder": "lstm",
                               "encoder_hidden": 16}, collapsible=True, starts_at_base=False, packed=False),
    # Prefixes keep packing: every example of a packed row attends the prefix.
    PeftCase("prefix_tuning", {"method": "prefix_tuning", "num_prefix_tokens": 4, "reparameterize": False},
             starts_at_base=False),
    PeftCase("prefix_tuning_mlp", {"method": "prefix_tuning", "num_prefix_tokens": 3, "reparam_hidden": 32},
             collapsible=True, starts_at_base=False),
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


def planner_args(case: PeftCase) -> tuple[str, dict]:
    """The planner's method name and arguments for a row (for the closed-form counts): every field of the row's
    typed config, as `nemo-adapt plan` reads a recipe."""
    import dataclasses

    config = peft_config(case)
    args = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("method", "init_from")}
    return config.method, args
