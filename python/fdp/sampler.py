"""Sampling actions from a factorized policy: ``fdp.Sampler`` and ``fdp.sample``.

Noise contract (docs/design.md): ``x_T`` is the initial noise
``[B, Ta, Da]``; ``step_noise[i]`` is the noise the i-th step (in sampling
order) adds, ``[T, B, Ta, Da]``, and a step that adds none ignores its slice.
With a ``generator`` instead, noise is drawn as a diffusers loop with that
generator draws it: ``x_T`` first, then one draw per step that adds noise, each
on the generator's device in the sample's dtype. Backends that take the noise
step by step (``torch``) get each step's draw when the step runs, so that only
one step's noise is in memory; the fused backends read all of it at once and
get it drawn up front, ``[T, B, Ta, Da]`` (the same numbers: the model itself
consumes no randomness).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

import torch

from ._validation import (InvalidArgument, InvalidArgumentType, check_bool, check_finite, check_float_dtype, check_int,
                          check_tensor, inputs_already_checked)
from ._state import state_mode
from ._watch import PolicyWatch
from .backends import select, weight_dtype
from .inpainting import RULES, replacements
from .policy import FactorizedPolicy
from .profiling import nvtx_range
from .schedulers import _draw_noise

if TYPE_CHECKING:  # the annotation of prepare(), which imports it when called
    from .static_call import StaticCall

log = logging.getLogger("fdp")


def _draw(shape, generator, device, dtype):
    return _draw_noise(shape, generator, torch.device(device), dtype)  # diffusers' randn_tensor


class _StepNoise:
    """Step noise drawn when step ``i`` asks for ``[i]``, in step order: a diffusers loop's
    draws, one step's worth in memory at a time (None for a step that adds none)."""

    def __init__(self, adds, shape, generator, device, dtype):
        self.adds, self.shape, self.generator, self.device, self.dtype = adds, shape, generator, device, dtype
        self._next = 0

    def __len__(self) -> int:
        return len(self.adds)

    def __getitem__(self, i: int):
        if i != self._next:
            raise IndexError(f"step noise is drawn in step order: step {i} asked for it, step {self._next} is next")
        self._next += 1
        return _draw(self.shape, self.generator, self.device, self.dtype) if self.adds[i] else None


class Sampler:
    """Packs a policy once for a backend and samples action chunks from it.

    Args:
        policy: a :class:`fdp.FactorizedPolicy`.
        scheduler: an :class:`fdp.DDPMScheduler` or :class:`fdp.DDIMScheduler`.
        num_inference_steps: denoising steps per call (None: the scheduler's
            current ``num_inference_steps``, else its training steps).
        eta: DDIM's eta (0: deterministic); must be 0 for DDPM.
        backend: ``"auto"`` or a name from :func:`fdp.available_backends`.
        dtype: weight dtype for fused backends: a floating ``torch.dtype`` or a
            name such as ``"float32"``, ``"bf16"``, ``"fp16"``. None: the policy's
            dtype, except that ``backend="cuda-persistent"`` packs a float32 policy
            in bfloat16 (the weights it keeps resident); ``sampler.dtype`` says which.
        batch_size: the batch size ``auto`` times backends at (calls may use any).
        verify: check a backend named in ``backend`` against the torch reference
            once, here, and raise :class:`fdp.backends.VerificationError` if it
            disagrees (``auto`` checks every candidate anyway).
        isolate: run a backend that executes compiled device code (``Backend.native_code_on``)
            for the first time in a separate process before this one runs it, when ``auto``
            or ``verify=True`` checks it: a hang or a device fault there skips the backend
            with a warning instead of taking this process down (:mod:`fdp.isolation`; the
            verdict is cached). None: on unless the environment sets ``FDP_ISOLATE=0``.
        check_inputs: check that the inputs are finite on every call (a NaN or Inf
            raises ValueError). Each check reads a flag back from the device (a sync
            on CUDA). With False a call reads nothing back: shapes, dtypes and
            devices are still checked (from metadata, free), but a NaN input gives
            NaN actions instead of an error.
        watch_policy: check at every call whether the policy changed since it was
            packed (see below), from host metadata: a few microseconds per call for
            an MLP policy, growing with the number of parameters. With False a
            call never checks: call :meth:`repack` after changing the policy
            (for a deployed, frozen policy in a fast control loop).

    ``sampler.backend`` names the backend in use; ``auto`` resolves it once,
    here, and logs why it skipped each other one. ``sampler.selection``
    (:class:`fdp.backends.Selection`) records what was tried: each backend's
    error against ``torch``, its time, and why the winner won.

    The policy may change after the Sampler is built (an optimizer step,
    ``load_state_dict``, an in-place edit, ``.to(dtype or device)``,
    ``add_component``, a new routing strategy): the next call notices it from
    host metadata alone (parameter versions and identities, no device read)
    and packs the policy again first, following its new dtype and device
    (``dtype`` stays if you gave one). If the backend cannot serve the changed
    policy, that call raises ValueError saying why. Writes through ``.data``
    bypass the version counters: call :meth:`repack` after those. Under
    ``torch.compile`` the check is skipped (compiled code is traced once), and
    ``watch_policy=False`` skips it always.

    An empty batch (``global_cond`` ``[0, Dc]``) returns an empty
    ``[0, horizon, action_dim]`` without running a backend. NaN or Inf in
    ``global_cond``, ``x_T`` or the steps of ``step_noise`` that add noise is
    refused (ValueError) while ``check_inputs`` is on; a NaN router weight or a
    NaN output of a component with a nonzero weight gives NaN actions on every
    backend, a component with weight exactly 0 is left out (see
    :meth:`fdp.FactorizedPolicy.compose`).
    """

    def __init__(self, policy: FactorizedPolicy, scheduler, num_inference_steps: int | None = 10,
                 eta: float = 0.0, backend: str = "auto", dtype: torch.dtype | None = None,
                 batch_size: int = 1, verify: bool = False, check_inputs: bool = True, watch_policy: bool = True,
                 isolate: bool | None = None):
        if not isinstance(policy, FactorizedPolicy):
            raise InvalidArgumentType(f"`policy` must be an fdp.FactorizedPolicy, got {type(policy).__name__}")
        if not hasattr(scheduler, "step_table"):
            raise InvalidArgumentType(f"`scheduler` must be an fdp.DDPMScheduler or fdp.DDIMScheduler, got "
                                      f"{type(scheduler).__name__} (diffusers schedulers: use fdp.DDIMScheduler.from_config"
                                      "(s.config))")
        _check_router_size(policy)
        if num_inference_steps is None:
            num_inference_steps = scheduler.num_inference_steps or scheduler.config["num_train_timesteps"]
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, min_value=1)
        self.policy = policy
        self.scheduler = scheduler
        self.check_inputs = check_bool("check_inputs", check_inputs)
        self.watch_policy = check_bool("watch_policy", watch_policy)
        self.num_inference_steps = num_inference_steps
        self.table = scheduler.step_table(num_inference_steps, eta=eta)  # refuses a bad eta, naming it
        self.eta = float(eta)
        self._dtype_arg = check_float_dtype("dtype", dtype)
        self._backend_arg = backend
        self._follow_policy()
        with state_mode():  # the packed state serves calls in any mode (fdp._state)
            be, prepared, self.selection = select(backend, policy, self.table, self.device, self.dtype,
                                                  batch_size=batch_size, verify=verify, isolate=isolate)
        self.backend = be.name
        if backend == "auto":
            log.info("fdp.Sampler: backend 'auto' picked %r on %s (%s)%s", be.name, self.device, self.selection.why,
                     "".join(f"; skipped {n!r}: {r}" for n, r in self.selection.skipped().items()))
        self._pack(be, prepared)

    def _follow_policy(self) -> None:
        param = next(self.policy.parameters())
        self.device = param.device
        self.dtype = weight_dtype(self._backend_arg, param.dtype, self._dtype_arg)
        # Features and noise live in the policy's own dtype (the dtype of a
        # diffusers loop's sample); fused backends cast weights to self.dtype.
        self.sample_dtype = param.dtype

    def _pack(self, be, prepared=None) -> None:
        """Pack for ``be`` (or keep ``prepared``, packed by the backend selection just now)."""
        # Snapshot before packing (a change made meanwhile shows at the next call), kept only once
        # packing succeeded (a failed repack is tried again at the next call).
        watch = PolicyWatch(self.policy, weights=not be.reads_live_weights)
        if prepared is None:
            with nvtx_range("fdp.pack"), state_mode():
                prepared = be.prepare(self.policy, self.table, self.dtype)
        self._prepared = prepared
        self._watch, self._backend_impl = watch, be
        self._inpainting_fallback = None  # prepared on the first inpainting call that needs it

    def _ensure_fresh(self) -> None:
        """Pack again if the policy changed since it was packed (host metadata only)."""
        if self.watch_policy and not torch.compiler.is_compiling() and self._watch.changed():
            self.repack()

    def repack(self) -> None:
        """Pack the policy again now, following its current dtype, device and components.

        Calls do this by themselves when they see a change (see the class
        docs); call it after writes they cannot see (through ``.data``).
        """
        policy, be = self.policy, self._backend_impl
        _check_router_size(policy)
        self._follow_policy()
        reason = be.unavailable_reason(self.device) or be.unsupported_reason(policy, self.table, self.dtype)
        if reason:
            raise InvalidArgument(f"the policy changed since this Sampler packed it, and backend {be.name!r} cannot "
                                  f"serve it now: {reason}. Build a new fdp.Sampler for it (backend='auto' picks one "
                                  "that can)")
        self._pack(be)

    def invalidate(self) -> None:
        """Drop the CUDA graphs the backend captured; each batch size captures again on its next call.

        For changes a captured graph cannot see: parameters replaced rather than updated in
        place, a new router strategy (see :mod:`fdp.backends.captured`).
        """
        drop = getattr(self._prepared, "invalidate", None)
        if drop is not None:
            drop()

    @property
    def num_steps(self) -> int:
        return len(self.table.timesteps)

    def noise(self, batch_size: int, generator: torch.Generator | None = None, dtype=None):
        """Draw ``(x_T, step_noise)`` as the diffusers loop would with ``generator``.

        ``dtype`` defaults to the policy's dtype, the one ``__call__`` draws in.
        """
        self._ensure_fresh()
        dtype = dtype or self.sample_dtype
        shape = (batch_size, self.policy.horizon, self.policy.action_dim)
        x_T = _draw(shape, generator, self.device, dtype)
        return x_T, self._drawn_step_noise(shape, generator, dtype, per_step=False)

    def _drawn_step_noise(self, shape, generator, dtype, per_step: bool):
        """Step noise from ``generator``: drawn as the steps run (``per_step``) or all now, ``[T, *shape]``."""
        adds = self.table._adds
        if not any(adds):
            return None
        source = _StepNoise(adds, shape, generator, self.device, dtype)
        if per_step:
            return source
        step_noise = torch.zeros((len(adds), *shape), device=self.device, dtype=dtype)
        for i in range(len(adds)):
            z = source[i]
            if z is not None:
                step_noise[i] = z
        return step_noise

    def _check_step_noise(self, step_noise, shape) -> None:
        check_tensor("step_noise", step_noise, shape=(self.num_steps, *shape), dtype="floating", device=self.device)
        if not self.check_inputs:
            return
        # A step that adds no noise ignores its slice: only the others must be finite.
        start = 0
        for adds, run in itertools.groupby(self.table._adds):
            n = len(tuple(run))
            if adds:
                check_finite("step_noise", step_noise[start:start + n])
            start += n

    def __call__(self, global_cond: torch.Tensor, x_T: torch.Tensor | None = None,
                 step_noise: torch.Tensor | None = None, generator: torch.Generator | None = None, *,
                 known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                 inpaint: str = "clean") -> torch.Tensor:
        """Sample action chunks ``[B, horizon, action_dim]`` for features ``global_cond [B, Dc]``.

        ``known`` ``[B, horizon, action_dim]`` and the bool ``known_mask`` of the same shape inpaint:
        the masked entries are set to ``known`` before every step's model call and once more after the
        last step (diffusion_policy's ``conditional_sample``; ``inpaint="noised"``: to ``known`` noised
        to each step's level, RePaint's rule, drawn after all other noise from ``generator``). See
        :mod:`fdp.inpainting`; :func:`fdp.inpainting.continuation` builds both from a previous chunk.
        """
        with nvtx_range("fdp.sample"):
            self._ensure_fresh()
            policy = self.policy
            if not (isinstance(global_cond, torch.Tensor) and global_cond.dim() == 2
                    and global_cond.shape[1] == policy.router.cond_dim and global_cond.is_floating_point()
                    and global_cond.device == self.device):
                # The common case above costs a few attribute reads; anything else gets the full check's message.
                check_tensor("global_cond", global_cond, ndim=2, dtype="floating", device=self.device)
                check_tensor("global_cond", global_cond, shape=(global_cond.shape[0], policy.cond_dim))
            B = global_cond.shape[0]
            if self.check_inputs:
                check_finite("global_cond", global_cond)
            if generator is not None and not isinstance(generator, torch.Generator):
                raise InvalidArgumentType(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
            if generator is not None and (x_T is not None or step_noise is not None):
                raise InvalidArgument("pass either `generator` or explicit `x_T`/`step_noise`, not both")
            shape = (B, policy.horizon, policy.action_dim)
            if x_T is not None:
                check_tensor("x_T", x_T, shape=shape, dtype="floating", device=self.device)
                if self.check_inputs:
                    check_finite("x_T", x_T)
            if step_noise is not None:
                self._check_step_noise(step_noise, shape)
            inpainting = known is not None or known_mask is not None
            if inpainting:
                self._check_known(known, known_mask, inpaint, shape)
            dt = self.sample_dtype
            prepared = self._inpainting_prepared() if inpainting else self._prepared
            if B == 0:
                # No backend runs, so all of them agree on an empty batch.
                return torch.empty(shape, device=self.device, dtype=dt)
            if x_T is None:
                x_T = _draw(shape, generator, self.device, dt)
            if step_noise is None:
                # The noised rule draws after the step noise: all of it up front, so that every backend
                # consumes the generator in the same order.
                per_step = getattr(prepared, "noise_per_step", False) and not (inpainting and inpaint != "clean")
                step_noise = self._drawn_step_noise(shape, generator, dt, per_step=per_step)
            elif step_noise.dtype != dt:
                step_noise = step_noise.to(dt)
            extra = {}
            if x_T.dtype != dt:
                x_T = x_T.to(dt)
            if inpainting:
                x_T, R = replacements(inpaint, known.to(dt), known_mask, x_T, self.scheduler, self.table.timesteps,
                                      lambda s: _draw(s, generator, self.device, dt))
                extra = dict(known=R, known_mask=known_mask)
            # Without checks, neither may the modules the backend calls (router, components) read a flag back.
            with contextlib.nullcontext() if self.check_inputs else inputs_already_checked():
                return prepared.run(global_cond if global_cond.dtype == dt else global_cond.to(dt), x_T, step_noise,
                                    **extra)

    def prepare(self, batch_size: int = 1, *, draw_noise: bool = True, inpaint: bool = False,
                check_inputs: bool = False, watch_policy: bool = False) -> "StaticCall":
        """A call for one batch size with buffers of its own, one CUDA graph replay per call on CUDA
        (:class:`fdp.StaticCall`): for control loops. Unlike this Sampler's calls it checks only the
        metadata of what it is given, unless ``check_inputs`` / ``watch_policy`` ask for more; call
        ``call.refresh()`` after changing the policy."""
        from .static_call import StaticCall

        return StaticCall(self, batch_size, draw_noise=draw_noise, inpaint=inpaint, check_inputs=check_inputs,
                          watch_policy=watch_policy)

    def _inpainting_prepared(self):
        """What runs an inpainting call: the backend's own prepared call, or, for a backend that cannot inpaint
        (``onnxruntime``: its exported graph has no mask input), the torch reference, prepared once per pack
        and named in a warning once (same numbers within the backend's tolerance, eager speed)."""
        if self._backend_impl.supports_inpainting:
            return self._prepared
        if self._inpainting_fallback is None:
            from .backends import get_backend

            log.warning("fdp.Sampler: backend %r cannot inpaint; calls with `known`/`known_mask` run on the torch "
                        "reference (name a backend that inpaints, e.g. 'torch-batched' or a GPU backend, to avoid "
                        "this)", self.backend)
            self._inpainting_fallback = get_backend("torch").prepare(self.policy, self.table, self.sample_dtype)
        return self._inpainting_fallback

    def _check_known(self, known, known_mask, inpaint, shape) -> None:
        if known is None or known_mask is None:
            raise InvalidArgument("inpainting needs both `known` and `known_mask` (got only "
                             f"`{'known' if known is not None else 'known_mask'}`)")
        if inpaint not in RULES:
            raise InvalidArgument(f"`inpaint` must be one of {RULES}, got {inpaint!r}")
        check_tensor("known", known, shape=shape, dtype="floating", device=self.device)
        check_tensor("known_mask", known_mask, shape=shape, dtype=torch.bool, device=self.device)
        if self.check_inputs:
            # Only the masked entries are ever read.
            check_finite("known", torch.where(known_mask, known, 0))

    @classmethod
    def for_unet(cls, unet, scheduler, horizon: int, action_dim: int, **options) -> "Sampler":
        """A sampler for one denoiser (e.g. a :class:`fdp.ConditionalUnet1D`) with no router work.

        The denoiser must read ``global_cond`` (``unet.global_cond_dim``); ``options`` are
        :class:`Sampler`'s (``num_inference_steps``, ``eta``, ``backend``, ``dtype``). The
        denoiser's parameters are used, not copied, and building consumes no global randomness.
        """
        from .single import single_denoiser_policy

        return cls(single_denoiser_policy(unet, horizon, action_dim, scheduler), scheduler, **options)


def _check_router_size(policy: FactorizedPolicy) -> None:
    if policy.num_components != policy.router.num_components:
        raise InvalidArgument(f"policy has {policy.num_components} components but its router has "
                              f"{policy.router.num_components} outputs: K must match")


def sample(policy: FactorizedPolicy, global_cond: torch.Tensor, scheduler, num_inference_steps: int | None = None,
           eta: float = 0.0, x_T: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """One-shot sampling: builds a :class:`Sampler` (packing the policy) and calls it.

    For repeated calls (closed-loop control), build a ``Sampler`` once instead.
    """
    sampler = Sampler(policy, scheduler, num_inference_steps=num_inference_steps, eta=eta, backend=backend)
    return sampler(global_cond, x_T=x_T, step_noise=step_noise, generator=generator)
