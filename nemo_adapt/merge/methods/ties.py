"""TIES merging: trim each task vector to its largest entries, elect a sign per entry, merge the agreeing.

Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708.
"""

import torch

from nemo_adapt.merge.methods import elect_and_merge, merge_method, task_vectors


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density x numel) entries of largest magnitude (ties broken by position), zero the rest."""
    k = int(round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    # A stable sort makes the choice among equal magnitudes deterministic (earlier positions first).
    keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    return (flat * keep).view_as(delta)


@merge_method("ties", needs_base=True, elementwise=True, trims_by_magnitude=True,
              paper="Yadav et al. 2023, arXiv:2306.01708")
def ties(base, tensors, weights, densities, params):
    """base + lambda * disjoint_merge(sign_elect(trim(t_i - base, density_i)))."""
    deltas = task_vectors(base, tensors)
    trimmed = torch.stack([trim_to_density(d, rho) for d, rho in zip(deltas, densities)])
    return base.float() + params.lambda_ * elect_and_merge(trimmed, weights, params.normalize)
