"""Merge methods as registered, pure tensor functions: one file each, one decorator each.

A method takes, for one tensor name, the base model's tensor (None for methods without a base), the
fine-tuned models' tensors, their weights and densities and the merge parameters, and returns the merged
tensor. Everything is computed in fp32 (callers cast the result). Nothing else keeps a list of methods:
`list_merge_methods()` is the registry's.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nemo_adapt.errors import ConfigError


@dataclass(frozen=True)
class MergeParams:
    """Method-wide merge parameters (per-model weight and density are passed alongside the tensors)."""

    lambda_: float = 1.0
    """Scale of the merged task vector added to the base (task arithmetic, TIES, DARE)."""
    normalize: bool = True
    """Divide a weighted sum by the sum of weights (linear; TIES/DARE-TIES divide by the agreeing weights)."""
    t: float = 0.5
    """SLERP interpolation factor: 0 gives the first model, 1 the second."""
    seed: int = 0
    """Seed of DARE's random drop (the same seed gives the same merge)."""


MergeFn = Callable[[torch.Tensor | None, Sequence[torch.Tensor], Sequence[float], Sequence[float], MergeParams],
                   torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function and what it needs."""

    name: str
    fn: MergeFn
    needs_base: bool
    """True when the method works on task vectors (model - base)."""
    num_models: int | None = None
    """Exactly this many fine-tuned models (SLERP: 2); None for any number >= 1."""
    paper: str = ""


_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, needs_base: bool, num_models: int | None = None, paper: str = ""):
    """Decorator: register `fn(base, tensors, weights, densities, params) -> tensor` as merge method `name`."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        _METHODS[name] = MergeMethod(name, fn, needs_base, num_models, paper)
        return fn

    return deco


def _load() -> None:
    # Importing a method module runs its @merge_method.
    from nemo_adapt.merge.methods import dare, linear, slerp, task_arithmetic, ties  # noqa: F401


def list_merge_methods() -> list[str]:
    """Registered method names."""
    _load()
    return sorted(_METHODS)


def get_merge_method(name: str) -> MergeMethod:
    """The registered method `name`.

    Raises:
        ConfigError: unknown name (lists the registered ones and the closest match).
    """
    _load()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"merge_method={name!r} is not a registered merge method.{hint} "
                          f"Allowed: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, *shape] fp32 stack of model - base (Ilharco et al. 2023's task vectors)."""
    b = base.float()
    return torch.stack([t.float() - b for t in tensors])


def weight_column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as [n, 1, 1, ...] to broadcast over a [n, *shape] stack."""
    return torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def elect_and_merge(deltas: torch.Tensor, weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES' sign election and disjoint merge over weighted task vectors [n, *shape].

    The elected sign of each entry is the sign of the weighted sum (the side with more total mass);
    entries of models that disagree with it (or are zero) are left out, and the rest are summed
    (divided by the agreeing models' weights with `normalize`).
    """
    w = weight_column(weights, deltas)
    weighted = deltas * w
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    total = (weighted * agree).sum(dim=0)
    if not normalize:
        return total
    mass = (w * agree).sum(dim=0)
    return torch.where(mass > 0, total / mass.clamp_min(1e-12), torch.zeros_like(total))
