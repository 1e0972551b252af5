"""Chi et al.'s ``diffusion_policy`` U-Net policies on fdp.

Serves ``DiffusionUnetLowdimPolicy`` and ``DiffusionUnetHybridImagePolicy``
(and any object with their attributes: ``model``, a ``ConditionalUnet1D``
whose parameter names are fdp's; ``noise_scheduler``, a diffusers DDPM or DDIM
scheduler; ``num_inference_steps``; and
``conditional_sample(condition_data, condition_mask, local_cond=None,
global_cond=None, generator=None, **kwargs)``), without importing that code.

fdp samples when the observation conditions the U-Net globally
(``obs_as_global_cond=True``), with no local conditioning and no extra
scheduler arguments; a ``condition_mask`` that selects entries is inpainted
with the original's rule (``known=condition_data``, ``known_mask=condition_mask``:
:mod:`fdp.inpainting`), on every backend that supports it. Other calls run
the original method, and the reason is logged once.
"""

from __future__ import annotations

import torch

from .._validation import InvalidArgumentType, check_optional_int
from ..backends import get_backend
from ..sampler import Sampler
from ..unet import ConditionalUnet1D
from ._common import Patch, fdp_scheduler, group_norm_groups, unet_from_tensors

__all__ = ["accelerate"]


def accelerate(policy, *, backend: str = "auto", num_inference_steps: int | None = None) -> Patch:
    """Make ``policy`` sample with fdp; returns the handle (``restore()``, context manager).

    Replaces this instance's ``conditional_sample``. Noise is drawn as the
    original draws it: the initial trajectory with ``torch.randn`` from
    ``generator`` (global RNG when None), then one draw per noise-adding step
    as diffusers' ``step`` does. The U-Net's parameters are shared, not
    copied; the sampler is rebuilt when they are replaced or updated in place
    and when ``policy.num_inference_steps`` changes (``num_inference_steps``
    here overrides it). ``handle.sampler`` is the sampler of the latest call.
    """
    if backend != "auto":
        get_backend(backend)  # names the known backends
    num_inference_steps = check_optional_int("num_inference_steps", num_inference_steps, min_value=1)
    for attr in ("conditional_sample", "model", "noise_scheduler", "num_inference_steps"):
        if not hasattr(policy, attr):
            raise InvalidArgumentType(f"`policy` must be a diffusion_policy U-Net policy (policy.{attr} is missing), "
                                      f"got {type(policy).__name__}")

    def network():
        return policy.model

    def steps():
        return policy.num_inference_steps if num_inference_steps is None else num_inference_steps

    def unet():
        src = network()
        if isinstance(src, ConditionalUnet1D):
            return src
        return unet_from_tensors(dict(src.named_parameters()), group_norm_groups(src), what=type(src).__name__)

    def build(horizon, action_dim):
        return Sampler.for_unet(unet(), fdp_scheduler(policy.noise_scheduler), horizon, action_dim,
                                num_inference_steps=steps(), backend=backend)

    unet()  # a layout fdp cannot map fails here, not at the first action
    fdp_scheduler(policy.noise_scheduler)
    return Patch(policy, "conditional_sample", _conditional_sample, network, build,
                 settings=lambda: (steps(), id(policy.noise_scheduler)), shape_args=None)


def _conditional_sample(handle: Patch, condition_data, condition_mask, local_cond=None, global_cond=None,
                        generator=None, **kwargs):
    args = (condition_data, condition_mask)
    call = dict(local_cond=local_cond, global_cond=global_cond, generator=generator, **kwargs)
    if kwargs:
        return handle.fallback(f"scheduler step arguments {sorted(kwargs)} were passed", *args, **call)
    if local_cond is not None:
        return handle.fallback("local_cond was given (fdp samples with global conditioning only)", *args, **call)
    if global_cond is None:
        return handle.fallback("no global_cond was given", *args, **call)
    if not isinstance(condition_mask, torch.Tensor) or condition_mask.dtype != torch.bool:
        return handle.fallback("condition_mask is not a bool tensor", *args, **call)
    inpaint = bool(condition_mask.any())  # the original indexes with the mask anyway (a device read there too)
    policy = handle.owner
    width = policy.model.final_conv[1].weight.shape[0]
    if condition_data.ndim != 3 or condition_data.shape[-1] != width:
        return handle.fallback(f"condition_data {list(condition_data.shape)} is not [B, T, {width}]", *args, **call)
    B, T, D = condition_data.shape
    sampler = handle.sampler_for(T, D)
    param = next(sampler.policy.components[0].parameters())
    # The draws of the original loop, in its order: the trajectory, then diffusers' step noise.
    x_T = torch.randn(size=condition_data.shape, dtype=condition_data.dtype, device=condition_data.device,
                      generator=generator)
    step_noise = sampler._drawn_step_noise((B, T, D), generator, param.dtype, per_step=False)
    known = dict(known=condition_data, known_mask=condition_mask) if inpaint else {}
    return sampler(global_cond, x_T=x_T, step_noise=step_noise, **known)
