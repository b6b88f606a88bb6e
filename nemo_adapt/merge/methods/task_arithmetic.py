"""Task arithmetic: add a weighted sum of task vectors (model - base) to the base.

Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089.
"""

from nemo_adapt.merge.methods import merge_method, task_vectors, weight_column


@merge_method("task_arithmetic", needs_base=True, elementwise=True, paper="Ilharco et al. 2023, arXiv:2212.04089")
def task_arithmetic(base, tensors, weights, densities, params):
    """base + lambda * sum_i w_i (t_i - base)."""
    deltas = task_vectors(base, tensors)
    return base.float() + params.lambda_ * (deltas * weight_column(weights, deltas)).sum(dim=0)
