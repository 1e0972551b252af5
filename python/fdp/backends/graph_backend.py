"""``backend="graph"``: K U-Net components fused horizontally, the whole sampling loop in one CUDA graph.

Serves a :class:`fdp.FactorizedPolicy` whose components are
:class:`fdp.ConditionalUnet1D` s with one trunk configuration
(:func:`fdp.unet_fused.fusion_mismatch`) and no local conditioning (the
sampler has no ``local_cond`` input). ``prepare`` packs the K networks into
one :class:`fdp.unet_fused.FusedUnets` and computes the timestep part of every
FiLM for the T steps of the schedule, once. A sampling call then runs:

1. the router, once: ``w = policy.weights(global_cond)`` ``[B, K]``;
2. the global_cond part of every FiLM, once (``FusedUnets.call_terms``);
3. T steps, each: FiLM = step term + call term; the fused trunk gives the K
   predictions ``[K, B, Ta, Da]``; one launch of
   :func:`fdp_kernels.compose_step.compose_step` composes them with ``w`` and
   applies the scheduler update in place on the float32 sample.

On CUDA all of that is captured once per batch size (and input dtypes) into a
CUDA graph over static input buffers; a call copies its inputs in, replays the
graph and returns a copy of the static output. The first call for a batch
size runs the loop eagerly on a side stream (cuDNN algorithm selection, Triton
compilation) and then captures it (:class:`fdp.backends.captured.CapturedCall`,
which every CUDA backend shares).

What a graph freezes: the packed weights are copies taken at ``prepare`` (the
components are untouched), the router runs inside the graph on its own
parameters, read at replay, with the strategy it had at capture. A
:class:`fdp.Sampler` prepares again when the policy changes (weights,
strategy, dtype, device, components), which drops the captured graphs.

Step noise: the graph reads all T steps' noise from one static buffer, so the
sampler draws it up front, ``[T, B, Ta, Da]``.

Precision (``dtype``): float32 (default, the policy's dtype) or bfloat16 /
float16 weights. With a half dtype the trunk's stacked weights and
activations are stored in it, and its convolutions, GroupNorm statistics and
matrix products accumulate in float32 (cuDNN's and PyTorch's CUDA kernels do
so for half inputs); the FiLM terms are computed in the components' dtype and
cast once per step; the router, the sample ``x_t``, the composition and the
scheduler update stay float32. float64 runs the same loop with the torch
composition (the kernel computes in float32). In float32, convolutions follow
PyTorch's TF32 switches (``torch.backends.cudnn.allow_tf32``), as eager code does.

Memory: each captured batch size keeps its graph and a private memory pool
(its activations) for the life of the prepared object (or until ``invalidate()``).

Without Triton (or with the kernel module loaded in the Triton interpreter),
or for float64, the composition falls back to :func:`compose_step_torch`
(``apply_step`` on the weighted sum), which is capturable too;
``prepared.compose`` says which one runs. The CPU runs the same prepared object with
``GraphPrepared(..., capture=False, compose="torch")`` for tests; ``auto`` never
picks this backend off CUDA (``unavailable_reason``).
"""

from __future__ import annotations

import torch

from .. import inpainting
from ..schedulers import apply_step
from ..unet import ConditionalUnet1D
from ..unet_fused import FusedUnets, fusion_mismatch
from .base import Backend
from .captured import CapturedCall, CapturesCalls
from .triton_backend import _triton_import_error

__all__ = ["GraphBackend", "GraphPrepared", "compose_step_torch", "BACKEND"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compose_step_torch(eps, weights, table, step, x, noise=None):
    """The reference of the compose kernel: :func:`fdp.schedulers.apply_step` on ``sum_k weights[:, k] * eps[k]``.

    ``eps [K, B, *S]``, ``weights [B, K]``, ``x [B, *S]``; computes in ``x``'s dtype.
    """
    w = weights.to(x.dtype)
    m = None
    for k in range(eps.shape[0]):
        w_k = w[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
        # A weight of exactly 0 leaves the component out, as in FactorizedPolicy.compose.
        term = torch.where(w_k != 0, w_k * eps[k].to(x.dtype), 0)
        m = term if m is None else m + term
    return apply_step(table, step, x, m, noise)


def _compose_kernel(device: torch.device):
    """The compose kernel's launcher if it can run on ``device``, else (None, why not)."""
    why = _triton_import_error()
    if why:
        return None, why
    try:
        from fdp_kernels import compose_step as mod
    except ImportError as exc:
        return None, f"Triton is not installed or failed to import ({exc})"
    # TRITON_INTERPRET is read when the module is first imported: the kernel then runs in the
    # interpreter (CPU tensors, tests) or compiled (CUDA); the two do not mix.
    interpreted = type(mod.compose_step_kernel).__name__ == "InterpretedFunction"
    if device.type == "cuda" and interpreted:
        return None, ("fdp_kernels.compose_step was imported with TRITON_INTERPRET=1, so it runs in the "
                      "interpreter; import it without that variable to run it on CUDA")
    if device.type != "cuda" and not interpreted:
        return None, (f"the compose kernel needs a CUDA device (or TRITON_INTERPRET=1 set before "
                      f"fdp_kernels.compose_step is imported, for tests), got {device}")
    return mod.compose_step, None


class GraphPrepared(CapturesCalls):
    """A U-Net policy fused for one schedule and dtype; ``run(global_cond, x_T, step_noise)``.

    Args:
        policy, table, dtype: as ``Backend.prepare``.
        capture: capture the loop into a CUDA graph per batch size (default: on CUDA).
        compose: ``"triton"`` (the compose kernel) or ``"torch"`` (:func:`compose_step_torch`);
            default: the kernel on CUDA when it can run there and the dtype is not float64, else torch.
    """

    def __init__(self, policy, table, dtype=None, *, capture: bool | None = None, compose: str | None = None):
        param = next(policy.parameters())
        self.policy = policy
        self.table = table
        self.device = param.device
        self.dtype = dtype or param.dtype
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {list(_DTYPES)}, got {self.dtype}")
        self.fused = FusedUnets.from_components(list(policy.components), dtype=self.dtype)
        # The loop's state and the composition are float32 at least.
        self.state_dtype = torch.promote_types(self.dtype, torch.float32)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, the policy is on {self.device}")
        if compose not in (None, "triton", "torch"):
            raise ValueError(f"`compose` must be None, 'triton' or 'torch', got {compose!r}")
        if compose is None and self.device.type != "cuda":
            # Importing the kernel module here would fix its interpreter / compiled mode for the
            # whole process; off CUDA the kernel is opt-in.
            compose = "torch"
        self._compose_step = None
        if compose != "torch":
            if self.state_dtype != torch.float32:
                if compose == "triton":
                    raise ValueError(f"the compose kernel computes in float32; use compose='torch' for {self.dtype}")
            else:
                self._compose_step, why = _compose_kernel(self.device)
                if compose == "triton" and why:
                    raise ValueError(f"compose='triton' is not possible: {why}")
        self.compose = "triton" if self._compose_step is not None else "torch"
        self.T = len(table)
        # The timestep half of every FiLM for the whole schedule: [T, F], off the per-step path.
        self.step_film = self.fused.step_terms(table.timesteps.to(self.device))
        dev_table = table.to(self.device, torch.float32)
        self.coef = dev_table.coef.contiguous()
        self.adds_noise = dev_table.adds_noise.contiguous()
        self.adds_any = bool(table.adds_noise.any())
        self.clip_range = float(table.clip_range) if table.clip_sample else None
        self._call = CapturedCall(self._sample, self.device, enabled=self.capture)

    # -- the loop ---------------------------------------------------------------------------------------------

    def _loop(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        """Router once, call terms once, T fused steps; returns x_0 in the state dtype. Capturable."""
        policy, fused = self.policy, self.fused
        weights = policy.weights(global_cond).to(self.state_dtype)
        call = fused.call_terms(global_cond)
        # A fresh contiguous buffer: the compose kernel updates it in place and needs a dense row-major layout.
        x = x_T.to(self.state_dtype, memory_format=torch.contiguous_format, copy=True)
        noise = step_noise if self.adds_any else None
        for i in range(self.T):
            film = self.step_film[i:i + 1]
            film = (film + call if call is not None else film).to(self.dtype)
            eps = fused.trunk(x.to(self.dtype), film)
            if self._compose_step is not None:
                self._compose_step(eps, weights, self.coef, self.adds_noise, i, x, noise,
                                   clip_range=self.clip_range, out=x, known=known, known_mask=known_mask,
                                   validate=(i == 0))
            else:
                x = compose_step_torch(eps, weights, self.table, i, x, noise[i] if noise is not None else None)
                if known_mask is not None:  # inpainting: the step's epilogue, as the kernel's
                    x = inpainting.epilogue(x, known, known_mask, i)
        return x

    def _inputs(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        global_cond = global_cond.to(next(self.policy.parameters()).dtype)
        x_T = x_T.to(self.state_dtype)
        if step_noise is not None and self.adds_any:
            step_noise = step_noise.to(self.state_dtype).contiguous()
        else:
            step_noise = None
        if known_mask is not None:
            known, known_mask = known.to(self.state_dtype).contiguous(), known_mask.contiguous()
        return global_cond, x_T, step_noise, known, known_mask

    def _sample(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        """The whole call, from the sampler's inputs to x_0 in ``x_T``'s dtype. Capturable."""
        return self._loop(*self._inputs(global_cond, x_T, step_noise, known, known_mask)).to(x_T.dtype)

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        if self.adds_any and step_noise is None:
            raise ValueError("this schedule adds noise: `step_noise` [T, B, Ta, Da] is required")
        return self._call(global_cond, x_T, step_noise if self.adds_any else None, known, known_mask)


class GraphBackend(Backend):
    name = "graph"
    priority = 10
    runs_native_code = True  # captured graphs of compiled kernels
    supports_inpainting = True

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != "cuda":
            return f"the graph backend captures CUDA graphs and needs a CUDA device, got {device}"
        if not torch.cuda.is_available():
            return "CUDA is not available in this PyTorch build or machine"
        return None

    def unsupported_reason(self, policy, table, dtype):
        comps = list(getattr(policy, "components", []))
        for i, comp in enumerate(comps):
            if not isinstance(comp, ConditionalUnet1D):
                return f"it serves ConditionalUnet1D components; component {i} is a {type(comp).__name__}"
        reason = fusion_mismatch(comps)
        if reason:
            return reason
        first = comps[0]
        if first.local_cond_dim is not None:
            return "the components take local_cond, which the sampler does not provide"
        if policy.horizon % first.horizon_multiple:
            return f"horizon {policy.horizon} is not divisible by {first.horizon_multiple} (2 ** (len(down_dims) - 1))"
        dtype = dtype or next(policy.parameters()).dtype
        if dtype not in _DTYPES:
            return f"weight dtype must be one of {list(_DTYPES)}, got {dtype}"
        return None

    def prepare(self, policy, table, dtype=None, **options):
        reason = self.unsupported_reason(policy, table, dtype)
        if reason:
            raise ValueError(f"backend {self.name!r} cannot serve this policy: {reason}")
        return GraphPrepared(policy, table, dtype, **options)


BACKEND = GraphBackend()
