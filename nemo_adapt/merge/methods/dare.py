"""DARE: drop each task-vector entry with probability 1 - density and rescale the kept ones by
1 / density, then merge linearly (`dare_linear`) or with TIES' sign election (`dare_ties`).

Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch, arXiv:2311.03099.
"""

import torch

from nemo_adapt.merge.methods import elect_and_merge, merge_method, task_vectors, weight_column


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (Bernoulli), scaled by 1 / density; density 1 keeps all."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def _dropped(base, tensors, densities, params):
    # One generator per merge call, seeded by the merge seed: the same inputs and seed give the same merge.
    gen = torch.Generator().manual_seed(params.seed)
    deltas = task_vectors(base, tensors)
    return torch.stack([drop_and_rescale(d, rho, gen) for d, rho in zip(deltas, densities)])


@merge_method("dare_linear", needs_base=True, elementwise=True, paper="Yu et al. 2024, arXiv:2311.03099")
def dare_linear(base, tensors, weights, densities, params):
    """base + lambda * sum_i w_i dare(t_i - base, density_i)."""
    deltas = _dropped(base, tensors, densities, params)
    return base.float() + params.lambda_ * (deltas * weight_column(weights, deltas)).sum(dim=0)


@merge_method("dare_ties", needs_base=True, elementwise=True, paper="Yu et al. 2024, arXiv:2311.03099")
def dare_ties(base, tensors, weights, densities, params):
    """base + lambda * disjoint_merge(sign_elect(dare(t_i - base, density_i)))."""
    deltas = _dropped(base, tensors, densities, params)
    return base.float() + params.lambda_ * elect_and_merge(deltas, weights, params.normalize)
