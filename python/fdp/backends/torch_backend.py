"""``backend="torch"``: the eager reference sampler — the readable specification.

Router once per call, then for every step the K components one after another,
their weighted sum, and the scheduler update of :func:`fdp.schedulers.apply_step`.
Runs anywhere PyTorch does; every fused backend is tested against it.
"""

from __future__ import annotations

import torch

from .. import inpainting
from .._validation import inputs_already_checked
from ..profiling import nvtx_range
from ..schedulers import apply_step
from .base import Backend


class TorchPrepared:
    # Step i reads step_noise[i] only when it runs: the sampler may hand over a source that
    # draws each step's noise then, instead of a [T, B, Ta, Da] tensor.
    noise_per_step = True

    def __init__(self, policy, table, dtype):
        self.policy = policy
        self.table = table
        self.dtype = dtype
        # Host ints, read once: a call then reads no tensor back (no sync, nothing for torch.compile to break on).
        self.timesteps = tuple(int(t) for t in table.timesteps.tolist())

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        policy, table = self.policy, self.table
        with nvtx_range("fdp.router"):
            weights = policy.weights(global_cond)
        x = x_T
        # The sampler checked global_cond once; components would re-check it
        # (a device sync each on CUDA) at every step.
        with inputs_already_checked():
            for i, t in enumerate(self.timesteps):
                with nvtx_range("fdp.step", i):
                    eps = policy.compose(x, t, global_cond, weights)
                    noise = step_noise[i] if step_noise is not None else None
                    x = apply_step(table, i, x, eps, noise)
                    if known_mask is not None:  # inpainting (fdp.inpainting): the step's epilogue
                        x = inpainting.epilogue(x, known, known_mask, i)
        return x


class TorchBackend(Backend):
    name = "torch"
    reads_live_weights = True
    supports_inpainting = True
    priority = 0

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, policy, table, dtype):
        return None

    def prepare(self, policy, table, dtype=None):
        return TorchPrepared(policy, table, dtype)


BACKEND = TorchBackend()
