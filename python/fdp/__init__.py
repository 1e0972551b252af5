"""fdp: fast sampling for factorized diffusion policies.

K component denoisers, a router that weighs them per observation, and their
weighted noise predictions composed at every denoising step; fused Triton and
CUDA backends evaluate all of it in one launch per step. ``import fdp`` never
needs Triton or the CUDA extension: both load on first use.
"""

from . import diagnostics
from ._extension import extension_status
from .async_sampler import AsyncSampler
from .backends import available_backends
from .mlp import MLPDenoiser
from .policy import FactorizedPolicy
from .router import Router
from .sampler import Sampler, sample
from .schedulers import DDIMScheduler, DDPMScheduler, StepTable, apply_step
from .static_call import StaticCall
from .unet import ConditionalUnet1D

__version__ = "0.1.0"

__all__ = [
    "ConditionalUnet1D", "MLPDenoiser", "Router", "FactorizedPolicy",
    "DDPMScheduler", "DDIMScheduler", "StepTable", "apply_step",
    "Sampler", "sample", "StaticCall", "AsyncSampler", "available_backends", "extension_status", "diagnostics",
]
