"""Linear merge (model soup): a weighted average of the models' tensors.

Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time, arXiv:2203.05482.
"""

import torch

from nemo_adapt.merge.methods import merge_method, weight_column


def _check(weights, params) -> str | None:
    if params.normalize and abs(sum(weights)) < 1e-12:
        return (f"the weights {list(weights)} sum to 0, and parameters.normalize=true divides by that sum; set "
                "normalize: false for a plain weighted sum, or weights that do not cancel")
    return None


@merge_method("linear", needs_base=False, elementwise=True, paper="Wortsman et al. 2022, arXiv:2203.05482",
              check=_check)
def linear(base, tensors, weights, densities, params):
    """sum_i w_i t_i, divided by sum_i w_i when `params.normalize`. The base is not used."""
    stack = torch.stack([t.float() for t in tensors])
    total = (stack * weight_column(weights, stack)).sum(dim=0)
    return total / sum(weights) if params.normalize else total
