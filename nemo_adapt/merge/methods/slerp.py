"""SLERP: spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); applied to model weights as in
mergekit's `slerp` method. Each tensor is treated as one vector: the angle between the two flattened
tensors decides the path; nearly parallel tensors are interpolated linearly.
"""

import math

import torch

from nemo_adapt.merge.methods import merge_method

PARALLEL_EPS = 1e-4
"""Below this angle (radians) sin(theta) is too small to divide by: linear interpolation instead."""


def _check(weights, params) -> str | None:
    if not 0.0 <= params.t <= 1.0:
        return (f"parameters.t={params.t!r} must be in [0, 1] (0 gives the first model, 1 the second); SLERP does "
                "not extrapolate")
    return None


@merge_method("slerp", needs_base=False, num_models=2, paper="Shoemake 1985 (SIGGRAPH)", check=_check)
def slerp(base, tensors, weights, densities, params):
    """sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b, theta the angle between a and b."""
    a, b = (x.float() for x in tensors)
    t = params.t
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = torch.clamp((a.reshape(-1) @ b.reshape(-1)) / (na * nb), -1.0, 1.0)
    theta = float(torch.arccos(cos))
    if theta < PARALLEL_EPS:
        return (1 - t) * a + t * b
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b
