"""Merge methods as registered, pure tensor functions: one file each, one decorator each.

A method takes, for one tensor name, the base model's tensor (None for methods without a base), the
fine-tuned models' tensors, their weights and densities and the merge parameters, and returns the merged
tensor. Everything is computed in fp32 (callers cast the result). Nothing else keeps a list of methods:
`list_merge_methods()` is the registry's.
"""

from __future__ import annotations

import difflib
import math
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
    """Seed of DARE's random drop (the same seed gives the same merge). The merge derives one seed per tensor
    and row block from it (`block_seed`), so no two blocks share a drop pattern."""

    def __post_init__(self):
        for key, value in (("lambda", self.lambda_), ("t", self.t)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{key}={value!r} must be a finite number")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r} must be true or false")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")


def block_seed(seed: int, name: str, start: int) -> int:
    """The seed of one block of a merge: the merge seed, the tensor's name and the block's first row."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(f"{name}:{start}".encode())) % (2**63)


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
    elementwise: bool = False
    """Each output entry depends only on the inputs' entries at the same place (and random draws): the merge
    runs over blocks of rows, a few MiB at a time. False: it needs whole tensors (a per-tensor statistic, as
    SLERP's angle)."""
    trims_by_magnitude: bool = False
    """The method starts by trimming each task vector to its density by magnitude (TIES) and is elementwise
    after that: the merge does the trim itself over row blocks (`magnitude_trim`, the same entries as
    `ties.trim_to_density`) and calls the method with every density 1."""
    check: Callable[[Sequence[float], MergeParams], str | None] | None = None
    """Validates the merge file's weights and parameters before anything is opened: returns what is wrong
    (with what would be valid), or None."""


_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, needs_base: bool, num_models: int | None = None, paper: str = "",
                 elementwise: bool = False, trims_by_magnitude: bool = False, check=None):
    """Decorator: register `fn(base, tensors, weights, densities, params) -> tensor` as merge method `name`
    (`check(weights, params) -> problem or None` validates a merge file's values up front)."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        _METHODS[name] = MergeMethod(name, fn, needs_base, num_models, paper, elementwise, trims_by_magnitude,
                                     check)
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


class MagnitudeTrim:
    """TIES' trim of one task vector, applied block by block: keep its k = round(density x numel) entries of
    largest magnitude, ties broken by position (earlier first), exactly as `ties.trim_to_density` on the whole.

    The k-th largest magnitude is found without holding the tensor: non-negative float32 values order as their
    int32 bit patterns, so two passes over the blocks count the high 16 bits (65,536 bins), then the low 15
    bits within the bin that holds the k-th (a radix select). Written here because the alternatives (sort,
    kthvalue, topk) need the whole tensor, several times its size with indices.

    Args:
        blocks: a function giving the task vector's float32 blocks in order (called twice).
        numel: its number of entries.
        density: the share kept.
    """

    def __init__(self, blocks, numel: int, density: float):
        k = int(round(density * numel))
        self.threshold, self.ties_left = -1, 0  # keep everything: every |bits| > -1
        if k >= numel:
            return
        if k <= 0:
            self.threshold = 2**31 - 1  # nothing is above it
            return
        hi, need = self._select(blocks, k, 65536, lambda bits: bits >> 15, lambda bits: bits)
        lo, need = self._select(blocks, need, 32768, lambda bits: bits & 0x7FFF, lambda bits: bits[(bits >> 15) == hi])
        self.threshold, self.ties_left = (hi << 15) | lo, need

    @staticmethod
    def _select(blocks, k: int, bins: int, key, pick) -> tuple[int, int]:
        """(the bin holding the k-th largest key, how many of that bin's entries the top k take)."""
        hist = torch.zeros(bins, dtype=torch.int64)
        for block in blocks():
            bits = pick(block.abs().contiguous().view(torch.int32).reshape(-1))
            hist += torch.bincount(key(bits), minlength=bins)
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, k))  # the first bin (from the top) where the count reaches k
        above = int(from_top[i - 1]) if i > 0 else 0
        return bins - 1 - i, k - above

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """The next block of the task vector, trimmed (blocks must come in order)."""
        bits = delta.abs().contiguous().view(torch.int32)
        keep = bits > self.threshold
        if self.ties_left > 0:
            equal = (bits == self.threshold).reshape(-1)
            taken = equal & (equal.cumsum(0) <= self.ties_left)
            self.ties_left -= int(taken.sum())
            keep = keep | taken.view_as(keep)
        return delta * keep
