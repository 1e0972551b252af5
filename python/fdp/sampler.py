"""Sampling actions from a factorized policy: ``fdp.Sampler`` and ``fdp.sample``.

Noise contract (docs/design.md): ``x_T`` is the initial noise
``[B, Ta, Da]``; ``step_noise[i]`` is the noise the i-th step (in sampling
order) adds, ``[T, B, Ta, Da]``, and a step that adds none ignores its slice.
With a ``generator`` instead, noise is drawn as a diffusers loop with that
generator draws it: ``x_T`` first, then one draw per step that adds noise, each
on the generator's device in the sample's dtype. Drawing all of it up front
gives the same numbers because the model itself consumes no randomness.
"""

from __future__ import annotations

import logging

import torch

from ._validation import check_finite, check_tensor
from .backends import resolve_backend
from .policy import FactorizedPolicy
from .profiling import nvtx_range

log = logging.getLogger("fdp")


def _draw(shape, generator, device, dtype):
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class Sampler:
    """Packs a policy once for a backend and samples action chunks from it.

    Args:
        policy: a :class:`fdp.FactorizedPolicy`.
        scheduler: an :class:`fdp.DDPMScheduler` or :class:`fdp.DDIMScheduler`.
        num_inference_steps: denoising steps per call (None: the scheduler's
            current ``num_inference_steps``, else its training steps).
        eta: DDIM's eta (0: deterministic); must be 0 for DDPM.
        backend: ``"auto"`` or a name from :func:`fdp.available_backends`.
        dtype: weight dtype for fused backends (None: the policy's dtype).

    ``sampler.backend`` names the backend in use (``auto`` resolves it once,
    here, and logs why the faster ones were skipped).
    """

    def __init__(self, policy: FactorizedPolicy, scheduler, num_inference_steps: int | None = 10,
                 eta: float = 0.0, backend: str = "auto", dtype: torch.dtype | None = None):
        if not isinstance(policy, FactorizedPolicy):
            raise TypeError(f"`policy` must be an fdp.FactorizedPolicy, got {type(policy).__name__}")
        if not hasattr(scheduler, "step_table"):
            raise TypeError(f"`scheduler` must be an fdp.DDPMScheduler or fdp.DDIMScheduler, got "
                            f"{type(scheduler).__name__} (diffusers schedulers: use fdp.DDIMScheduler.from_config"
                            "(s.config))")
        if policy.num_components != policy.router.num_components:
            raise ValueError(f"policy has {policy.num_components} components but its router has "
                             f"{policy.router.num_components} outputs: K must match")
        if num_inference_steps is None:
            num_inference_steps = scheduler.num_inference_steps or scheduler.config["num_train_timesteps"]
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}")
        self.policy = policy
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.table = scheduler.step_table(num_inference_steps, eta=self.eta)
        param = next(policy.parameters())
        self.device = param.device
        self.dtype = dtype or param.dtype
        # Features and noise live in the policy's own dtype (the dtype of a
        # diffusers loop's sample); fused backends cast weights to self.dtype.
        self.sample_dtype = param.dtype
        be = resolve_backend(backend, policy, self.table, self.device, self.dtype)
        self.backend = be.name
        if backend == "auto":
            skipped = {n: r for n, r in resolve_backend.last_reasons.items()}
            log.info("fdp.Sampler: backend 'auto' picked %r on %s%s", be.name, self.device,
                     "".join(f"; skipped {n!r}: {r}" for n, r in skipped.items()))
        with nvtx_range("fdp.pack"):
            self._prepared = be.prepare(policy, self.table, self.dtype)

    @property
    def num_steps(self) -> int:
        return len(self.table.timesteps)

    def noise(self, batch_size: int, generator: torch.Generator | None = None, dtype=None):
        """Draw ``(x_T, step_noise)`` as the diffusers loop would with ``generator``.

        ``dtype`` defaults to the policy's dtype, the one ``__call__`` draws in.
        """
        dtype = dtype or self.sample_dtype
        shape = (batch_size, self.policy.horizon, self.policy.action_dim)
        x_T = _draw(shape, generator, self.device, dtype)
        adds = self.table.adds_noise.tolist()
        if not any(adds):
            return x_T, None
        step_noise = torch.zeros((len(adds), *shape), device=self.device, dtype=dtype)
        for i, a in enumerate(adds):
            if a:
                step_noise[i] = _draw(shape, generator, self.device, dtype)
        return x_T, step_noise

    def __call__(self, global_cond: torch.Tensor, x_T: torch.Tensor | None = None,
                 step_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample action chunks ``[B, horizon, action_dim]`` for features ``global_cond [B, Dc]``."""
        with nvtx_range("fdp.sample"):
            policy = self.policy
            check_tensor("global_cond", global_cond, ndim=2, dtype="floating", device=self.device)
            B = global_cond.shape[0]
            check_tensor("global_cond", global_cond, shape=(B, policy.cond_dim))
            check_finite("global_cond", global_cond)
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
            if generator is not None and (x_T is not None or step_noise is not None):
                raise ValueError("pass either `generator` or explicit `x_T`/`step_noise`, not both")
            shape = (B, policy.horizon, policy.action_dim)
            if x_T is None:
                drawn_x, drawn_noise = self.noise(B, generator)
                x_T = drawn_x
                if step_noise is None:
                    step_noise = drawn_noise
            else:
                check_tensor("x_T", x_T, shape=shape, dtype="floating", device=self.device)
                check_finite("x_T", x_T)
            if step_noise is None and bool(self.table.adds_noise.any()):
                step_noise = self.noise(B, generator)[1]
            if step_noise is not None:
                check_tensor("step_noise", step_noise, shape=(self.num_steps, *shape), dtype="floating",
                             device=self.device)
            dt = self.sample_dtype
            if step_noise is not None:
                step_noise = step_noise.to(dt)
            return self._prepared.run(global_cond.to(dt), x_T.to(dt), step_noise)


def sample(policy: FactorizedPolicy, global_cond: torch.Tensor, scheduler, num_inference_steps: int | None = None,
           eta: float = 0.0, x_T: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """One-shot sampling: builds a :class:`Sampler` (packing the policy) and calls it.

    For repeated calls (closed-loop control), build a ``Sampler`` once instead.
    """
    sampler = Sampler(policy, scheduler, num_inference_steps=num_inference_steps, eta=eta, backend=backend)
    return sampler(global_cond, x_T=x_T, step_noise=step_noise, generator=generator)
