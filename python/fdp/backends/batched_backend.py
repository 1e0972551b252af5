"""``backend="torch-batched"``: the K MLP components as batched matmuls in PyTorch, on any device.

Serves what the fused MLP kernels serve (K :class:`fdp.MLPDenoiser` s of one
shape, ``packing.mlp_unsupported_reason``) in float32, bfloat16 or float16
weights, with no size limits. ``prepare`` packs the weights
(:func:`fdp.packing.pack_policy`, in the weight dtype, then widened to float32
once: the values the kernels compute with) and computes the timestep terms of
the T steps; a call computes the router weights and the per-sample terms
(:func:`fdp.packing.call_terms`) once and then runs, per step,
:func:`fdp.packing.reference_eps` (one batched matmul per layer for all K,
a zero router weight leaving its component out of the row, NaN weights giving
NaN rows) and the scheduler update (:func:`fdp.schedulers.apply_coefficients`).
Everything after the router is float32, as in the kernels. On a CPU this is
the torch loop without the K-fold Python and per-step recomputation of the
timestep and feature terms (the bench's ``batched`` path is the same
computation with its matmuls in the weight dtype).

The packed weights are copies: :class:`fdp.Sampler` prepares again when the
policy changes. Noise: step ``i`` reads ``step_noise[i]`` only when it adds
noise, in step order (``noise_per_step``), so the sampler hands over a source
that draws each step's noise when it runs.
"""

from __future__ import annotations

import torch

from .. import inpainting
from .. import packing
from ..schedulers import apply_coefficients
from .base import Backend


class BatchedPrepared:
    noise_per_step = True

    def __init__(self, policy, table, dtype):
        param = next(policy.parameters())
        self.policy = policy
        self.param_dtype = param.dtype
        pack = packing.pack_policy(policy, dtype or param.dtype)
        # The kernels' numbers: weights rounded to the pack dtype, arithmetic in float32.
        self.packed = packing.PackedMLP(**{f: getattr(pack, f).float() if isinstance(getattr(pack, f), torch.Tensor)
                                           else getattr(pack, f) for f in pack.__dataclass_fields__})
        self.steps = packing.step_terms(policy, table.timesteps.to(param.device))
        self.coef = table.coef.to(device=param.device, dtype=torch.float32)
        self.adds = tuple(table._adds)
        self.clip, self.clip_range = bool(table.clip_sample), float(table.clip_range)
        self.D = policy.horizon * policy.action_dim

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        cond = global_cond.to(self.param_dtype)
        call = packing.call_terms(self.policy, cond, self.policy.weights(cond))
        B = x_T.shape[0]
        x = x_T.reshape(B, self.D).float()
        for i, adds in enumerate(self.adds):
            eps = packing.reference_eps(self.packed, self.steps.t_in[i], self.steps.t_shift[i], call, x)
            noise = step_noise[i].reshape(B, self.D).float() if adds and step_noise is not None else None
            x = apply_coefficients(self.coef[i], x, eps, noise, self.clip, self.clip_range)[0]
            if known_mask is not None:  # inpainting: the step's epilogue, on the flat [B, D] state
                x = inpainting.epilogue(x.view(x_T.shape), known.float(), known_mask, i).reshape(B, self.D)
        return x.reshape(x_T.shape).to(x_T.dtype)


class BatchedBackend(Backend):
    name = "torch-batched"
    priority = 5
    supports_inpainting = True

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, policy, table, dtype):
        reason = packing.mlp_unsupported_reason(policy)
        if reason:
            return reason
        dtype = dtype or next(policy.parameters()).dtype
        if dtype not in packing.WEIGHT_DTYPES:
            return f"weight dtype must be one of {list(packing.WEIGHT_DTYPES)}, got {dtype}"
        return None

    def prepare(self, policy, table, dtype=None):
        reason = self.unsupported_reason(policy, table, dtype)
        if reason:
            raise ValueError(f"backend {self.name!r} cannot serve this policy: {reason}")
        return BatchedPrepared(policy, table, dtype)


BACKEND = BatchedBackend()
