"""``backend="triton"``: fused Triton kernels for MLPDenoiser policies, one launch per denoising step.

Serves a :class:`fdp.FactorizedPolicy` whose K components are
:class:`fdp.MLPDenoiser` s of one shape (``packing.mlp_unsupported_reason``)
within the kernels' limits (K <= 8, 16 <= H <= 512, D = horizon * action_dim
<= 512) in float32, bfloat16 or float16 weights. ``prepare`` packs the weights
(:func:`fdp.packing.pack_policy`) and the router and conditioning projections
(:func:`fdp.packing.pack_cond`), computes the timestep terms of the T steps
and moves the scheduler table to the device, once; every sampling call then
makes T + 1 launches and no other device work: :func:`fdp_kernels.call_terms.call_terms`
(the router weights and per-sample terms, and the zeroing of the split kernel's
counters), then :func:`fdp_kernels.mlp_step.mlp_step` T times, the first from
``x_T`` (float32: read in place) into the output buffer, the others in place
on it. Each step launch evaluates all K components, their weighted sum and
the scheduler update for its rows; accumulation is float32 whatever the weight
dtype. The packed weights are copies: :class:`fdp.Sampler` prepares again when
the policy changes. The kernels read every step's noise from one ``[T, B, D]``
tensor, so the sampler draws it up front. :class:`TritonBackendBase` is shared
with ``triton-persistent`` (:mod:`fdp.backends.triton_persistent_backend`),
which runs the whole loop in one launch instead.

On the CPU the kernels run in the Triton interpreter when ``TRITON_INTERPRET=1``
is set before they are first imported (slow: for tests). Interpreted, both
backends must be asked for by name: ``auto`` ranks them below ``torch``.
"""

from __future__ import annotations

import os
import sys

import torch

from fdp_kernels import abi

from .. import packing
from .._state import state_mode
from .base import Backend
from .captured import CapturedCall, CapturesCalls, capturing

# Every kernel a Triton sampling call launches: (module, kernel attribute).
_KERNELS = (("fdp_kernels.call_terms", "call_terms_kernel"), ("fdp_kernels.mlp_step", "mlp_step_kernel"),
            ("fdp_kernels.mlp_persistent", "mlp_persistent_kernel"))


def _interpreted_kernels(interpreted: bool) -> list[str]:
    """The modules of :data:`_KERNELS` whose kernel is (``interpreted``), or is not (else), the Triton
    interpreter's: as imported, or for one not imported yet as TRITON_INTERPRET would make it (the variable
    is read when a kernel module is first imported)."""
    pending = os.environ.get("TRITON_INTERPRET") == "1"
    found = []
    for name, attr in _KERNELS:
        mod = sys.modules.get(name)
        is_interpreted = pending if mod is None else type(getattr(mod, attr)).__name__ == "InterpretedFunction"
        if is_interpreted == interpreted:
            found.append(name)
    return found


_TRITON_CPU_REASON = ("Triton kernels need a CUDA device; set TRITON_INTERPRET=1 to run them (slowly) on the CPU")


def _triton_import_error() -> str | None:
    """Why fdp's Triton kernels cannot run with this Triton and torch at all, or None."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"Triton is not installed or failed to import ({exc}); pip install triton"
    # The kernels are launched as torch.library.triton_op's (fdp_kernels/ops.py), which torch 2.6 added;
    # fdp itself asks for torch >= 2.4, and its torch and cuda backends do not need them.
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        return (f"fdp's Triton kernels need torch >= 2.6 (torch.library.triton_op), this is torch "
                f"{torch.__version__}; upgrade torch, or use backend='cuda' or 'torch'")
    return None


class TritonPrepared(CapturesCalls):
    """A policy packed for the Triton kernels: ``run(global_cond, x_T, step_noise, seed=None)``."""

    def __init__(self, policy, table, dtype, **tuning):
        param = next(policy.parameters())
        self.policy = policy
        self.device = param.device
        self.dtype = dtype or param.dtype
        self.horizon, self.action_dim = policy.horizon, policy.action_dim
        self.D = self.horizon * self.action_dim
        self.packed = packing.pack_policy(policy, self.dtype)
        self.cond = packing.pack_cond(policy)
        self.steps = packing.step_terms(policy, table.timesteps.to(self.device))
        tbl = table.to(self.device, torch.float32)
        # The scheduler's table is the kernels' layout (both take fdp_kernels.abi's columns).
        self.coef = tbl.coef.contiguous()
        self.adds_noise = tbl.adds_noise.to(torch.int8).contiguous()
        self.adds_any = bool(table.adds_noise.any())
        self.clip_range = float(tbl.clip_range) if tbl.clip_sample else None
        self.T = len(table.timesteps)
        self.tuning = tuning
        self._scratch = self._counters = None
        self._call = CapturedCall(self._sample, self.device)

    def _workspace_for(self, B, persistent=False):
        """``(scratch, counters)`` for a call of batch ``B`` (None where the launches need none); the call's
        per-call launch zeroes the counters, and its T step launches share them (each leaves them at 0).

        Allocated once per prepared object (so once per device) and grown to the largest batch, off
        capture. While a CUDA graph is captured (or torch.compile traces), allocated here instead, once per
        call: the graph then owns them (its private pool; a cached buffer could be replaced, and freed, by a later
        larger call while the graph still uses it), and the per-call launch in it zeroes its counters at every replay.
        """
        from fdp_kernels.mlp_common import block_config, counters_numel, scratch_numel

        cfg = block_config(B, self.D, self.packed.H, self.tuning.get("block_b"), self.tuning.get("h_in_registers"),
                           self.tuning.get("precision"), self.packed.dtype, self.tuning.get("num_warps"),
                           K=self.packed.K, split=False if persistent else self.tuning.get("split"),
                           device=self.device)
        need, tiles = scratch_numel(B, self.D, self.packed.K, cfg), counters_numel(B, cfg)
        f32, i32 = torch.float32, torch.int32
        if torch.compiler.is_compiling() or capturing(self.device):
            return (torch.empty(need, device=self.device, dtype=f32) if need else None,
                    torch.empty(tiles, device=self.device, dtype=i32) if tiles else None)
        grow_scratch = need and (self._scratch is None or self._scratch.numel() < need)
        grow_counters = tiles and (self._counters is None or self._counters.numel() < tiles)
        if grow_scratch or grow_counters:
            # Kept across calls and zeroed in place: never an inference tensor, whatever the caller's mode
            # (entered only when growing: no per-call host work).
            with state_mode():
                if grow_scratch:
                    self._scratch = torch.empty(need, device=self.device, dtype=f32)
                if grow_counters:
                    self._counters = torch.empty(tiles, device=self.device, dtype=i32)
        # Every step launch leaves its counters at 0; the per-call launch zeroes them anyway, so that one launch
        # cut short (an interrupted interpreter run) cannot leave a later call combining too early.
        return (self._scratch if need else None), (self._counters[:tiles] if tiles else None)

    @staticmethod
    def _known(known, known_mask, B, D):
        """The inpainting tensors as the kernels read them: float32 ``[B, D]`` or ``[T, B, D]``, uint8 ``[B, D]``."""
        if known_mask is None:
            return None, None
        known = known.reshape(*known.shape[:-3], B, D).to(torch.float32).contiguous()
        return known, known_mask.reshape(B, D).contiguous().view(torch.uint8)

    def _inputs(self, global_cond, x_T, step_noise, seed, persistent=False):
        """What both backends' calls start with: the per-call launch (router, conditioning terms, counters), the
        sample as the kernels read it (float32 ``x_T`` itself: no copy) and an output buffer, the noise, the
        seed and the workspace."""
        from fdp_kernels.call_terms import call_terms

        B = x_T.shape[0]
        cond = self.cond
        scratch, counters = self._workspace_for(B, persistent)
        buf = torch.empty(packing.call_terms_numel(B, cond.K, cond.L, cond.H), device=self.device,
                          dtype=torch.float32)
        call_terms(cond, global_cond, out=buf, counters=counters)
        call = packing.split_call_terms(buf, B, cond.K, cond.L, cond.H)
        # The kernels read x_T and write out (each program reads its rows before writing them).
        x = x_T.reshape(B, self.D).to(torch.float32).contiguous()
        out = torch.empty(B, self.D, device=self.device, dtype=torch.float32)
        noise = None
        if seed is None and step_noise is not None and self.adds_any:
            noise = step_noise.reshape(self.T, B, self.D)
            if noise.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # what the kernels read
                noise = noise.to(torch.float32)
            noise = noise.contiguous()
        if seed is not None and not self.adds_any:
            seed = None
        return call, x, out, noise, seed, scratch, counters

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise, known=None, known_mask=None, seed: int | None = None):
        """x_0 ``[B, horizon, action_dim]`` in ``x_T``'s dtype (``seed``: draw the step noise in the kernel).

        On CUDA a call replays the graph of its batch size (:class:`~fdp.backends.captured.CapturedCall`;
        ``known`` / ``known_mask`` are static inputs of it too); with ``seed`` it launches directly (a graph
        would freeze the seed).
        """
        if not self.adds_any:
            step_noise = None  # the kernels ignore it: no copy into a static buffer
        if seed is None:
            return self._call(global_cond, x_T, step_noise, known, known_mask)
        return self._sample(global_cond, x_T, step_noise, known, known_mask, seed)

    def _sample(self, global_cond, x_T, step_noise, known=None, known_mask=None, seed=None):
        """The whole call: the per-call launch, then T step launches, x_T -> out, then in place. Capturable."""
        from fdp_kernels.mlp_step import mlp_step

        call, x, out, noise, seed, scratch, counters = self._inputs(global_cond, x_T, step_noise, seed)
        known, known_mask = self._known(known, known_mask, *x.shape)
        for i in range(self.T):
            mlp_step(self.packed, self.steps, call, self.coef, self.adds_noise, i, x if i == 0 else out, noise,
                     seed=seed, clip_range=self.clip_range, out=out, scratch=scratch, counters=counters, known=known,
                     known_mask=known_mask, validate=(i == 0), **self.tuning)
        return out.reshape(x_T.shape).to(x_T.dtype)


class TritonBackendBase(Backend):
    """What the two Triton backends share: availability, limits and packing."""

    prepared_class = TritonPrepared
    base_priority = 0
    supports_inpainting = True

    @property
    def priority(self) -> int:
        # Under TRITON_INTERPRET=1 the kernels are emulated on the host, far slower than eager PyTorch: they stay
        # available by name (that is how the tests run them) but ``auto`` never prefers them to "torch".
        return self.base_priority - 100 if os.environ.get("TRITON_INTERPRET") == "1" else self.base_priority

    @property
    def priority_note(self) -> str | None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1: the kernels are emulated on the host, slower than eager torch"
        return None

    runs_native_code = True

    def native_code_on(self, device):
        # In the interpreter (TRITON_INTERPRET=1) the kernels are emulated in Python on the host.
        return torch.device(device).type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"

    def __init__(self, **tuning):
        # Kernel tuning knobs (block_b, h_in_registers, precision, skip_unused, num_warps, split), for benchmarks.
        self.tuning = tuning

    def unavailable_reason(self, device):
        reason = _triton_import_error()
        if reason:
            return reason
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available in this PyTorch build or machine"
            # Interpreted kernels copy their CUDA tensors to the host at each launch, which a CUDA graph
            # capture (every call on CUDA) refuses: the two do not mix (as the graph backend's compose kernel).
            bad = _interpreted_kernels(True)
            if bad:
                return (f"{bad[0]} runs in the Triton interpreter (TRITON_INTERPRET=1 when it was imported); "
                        "import fdp_kernels without that variable to run the kernels on CUDA")
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return _TRITON_CPU_REASON
            bad = _interpreted_kernels(False)
            if bad:
                return (f"{bad[0]} was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled "
                        "for a GPU; set TRITON_INTERPRET=1 before anything imports fdp_kernels")
            return None
        return f"Triton kernels need a CUDA device, got {device}"

    def unsupported_reason(self, policy, table, dtype):
        reason = packing.mlp_unsupported_reason(policy)
        if reason:
            return reason
        comp = policy.components[0]
        K, H, L = len(policy.components), comp.hidden_dim, comp.num_blocks
        D = comp.horizon * comp.input_dim
        dtype = dtype or next(policy.parameters()).dtype
        if dtype not in abi.WEIGHT_DTYPES:
            return f"weight dtype must be one of {list(abi.WEIGHT_DTYPES)}, got {dtype}"
        if getattr(policy.router, "num_components", K) != K:
            return f"the router has {policy.router.num_components} outputs but there are {K} components"
        if K > abi.TRITON_MAX_K:
            return f"at most {abi.TRITON_MAX_K} components, got K = {K}"
        if not abi.TRITON_MIN_H <= H <= abi.TRITON_MAX_H:
            return f"hidden width must be in {abi.TRITON_MIN_H}..{abi.TRITON_MAX_H}, got H = {H}"
        if D > abi.TRITON_MAX_D:
            return f"D = horizon * action_dim must be <= {abi.TRITON_MAX_D}, got {D}"
        T = len(table.timesteps)
        if K * L * H * H >= 2**31 or T * K * L * H >= 2**31:
            return "the model is too large for the kernels' 32-bit weight offsets"
        return None

    def prepare(self, policy, table, dtype=None):
        reason = self.unsupported_reason(policy, table, dtype)
        if reason:
            raise ValueError(f"backend {self.name!r} cannot serve this policy: {reason}")
        return self.prepared_class(policy, table, dtype, **self.tuning)


class TritonBackend(TritonBackendBase):
    name = "triton"
    base_priority = 20


BACKEND = TritonBackend()
