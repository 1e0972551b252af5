"""One denoiser as a :class:`fdp.FactorizedPolicy` (K = 1), for :meth:`fdp.Sampler.for_unet`.

A K = 1 policy gets a router with the fixed weight 1: :class:`fdp.Router`
returns fixed weights without evaluating its net, so sampling does no router
work, and the composition ``1 * eps`` is exact. Every backend that serves the
denoiser's type serves this policy.
"""

from __future__ import annotations

import torch
from torch import nn

from ._validation import InvalidArgument, InvalidArgumentType
from .policy import FactorizedPolicy
from .router import Router


def single_denoiser_policy(denoiser: nn.Module, horizon: int, action_dim: int, scheduler=None) -> FactorizedPolicy:
    """Wrap ``denoiser`` (used as is, not copied) in a K = 1 policy.

    ``denoiser.global_cond_dim`` must be set: the sampler's input is ``global_cond``.
    """
    if not isinstance(denoiser, nn.Module):
        raise InvalidArgumentType(f"`unet` must be an nn.Module denoiser, got {type(denoiser).__name__}")
    cond_dim = getattr(denoiser, "global_cond_dim", None)
    if not isinstance(cond_dim, int) or cond_dim < 1:
        raise InvalidArgument(f"`unet` must read global_cond (global_cond_dim a positive int), got "
                              f"global_cond_dim={cond_dim!r}; the sampler's input is global_cond [B, global_cond_dim]")
    param = next(denoiser.parameters(), None)
    if param is None:
        raise InvalidArgument("`unet` has no parameters")
    # The router's (never evaluated) net is initialised like any Linear: keep that
    # from advancing the global RNG, whose draws the caller may be reproducing.
    with torch.random.fork_rng(devices=[]):
        router = Router(cond_dim, 1, hidden_dim=1, strategy="fixed", fixed_weights=[1.0])
    router = router.to(device=param.device, dtype=param.dtype)
    return FactorizedPolicy([denoiser], router, horizon, action_dim, noise_scheduler=scheduler)
