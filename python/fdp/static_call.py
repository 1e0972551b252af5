"""A sampling call with fixed shapes and buffers of its own: ``call = sampler.prepare(batch_size)``.

A control loop calls its policy at 10-1000 Hz with the same shapes every time.
:meth:`fdp.Sampler.__call__` re-does, at every call, what is the same from one
call to the next: argument checks (a device read on CUDA for the finiteness
check), the policy watch (host metadata of every parameter), drawing the noise
with separate launches, copying the inputs into a captured graph's buffers and
the output out of them. A :class:`StaticCall` does all of that once:

- its input buffers are attributes (``call.global_cond``, and ``call.x_T``,
  ``call.step_noise``, ``call.known``, ``call.known_mask`` where used): write
  the observation features into ``call.global_cond`` and call ``call()``, or
  pass a tensor and it is copied in (one copy);
- on CUDA the whole call (the noise draws from the device's default generator,
  the inpainting replacement of ``x_T``, and the backend's call) is one CUDA
  graph, captured here: a call is one graph replay;
- the result is ``call.out``, a buffer the next call overwrites (pass ``out=``
  to have it copied into your own tensor instead).

What a call still checks, from metadata only: that a tensor passed in has the
buffer's shape, dtype and device (a few attribute reads; a wrong one raises
ValueError / TypeError naming it, never a device fault). What it checks only
when asked: finiteness of the inputs (``check_inputs=True``, a device read) and
whether the policy changed since it was packed (``watch_policy=True``, the
Sampler's watch). Without the watch, call :meth:`StaticCall.refresh` after
changing the policy (an optimizer step, ``load_state_dict``, ...); a repack of
the Sampler itself (its own calls saw a change, or :meth:`fdp.Sampler.repack`)
is noticed at every call for free and the call is built again.

Noise: drawn into ``call.x_T`` (and ``call.step_noise`` where the schedule
adds noise) by in-place ``normal_`` on the device's default generator, so each
call draws new noise, captured graph or not; not the draw order of
``Sampler.__call__(generator=...)``. ``draw_noise=False`` leaves both buffers
to you (reproducible calls: fill them before each call).

Inpainting: ``inpaint=True`` adds the buffers ``call.known`` and the bool
``call.known_mask`` (all False at first: nothing fixed) with the clean rule
(:mod:`fdp.inpainting`, the default rule of ``Sampler.__call__``); the
backend must support inpainting.
"""

from __future__ import annotations

import torch

from ._state import state_mode
from ._validation import InvalidArgument, check_bool, check_finite, check_int, check_tensor, inputs_already_checked
from .backends.captured import capture_graph
from .inpainting import replacements

__all__ = ["StaticCall"]


class StaticCall:
    """One fixed-shape sampling call of a :class:`fdp.Sampler`: built by ``sampler.prepare(batch_size)``.

    Args:
        sampler: the :class:`fdp.Sampler` whose packed policy and backend the call uses.
        batch_size: B, fixed for this call.
        draw_noise: draw ``x_T`` (and the step noise) inside the call (default); False: the caller fills
            ``call.x_T`` / ``call.step_noise``.
        inpaint: add ``call.known`` / ``call.known_mask`` (clean inpainting).
        check_inputs: check the inputs are finite at every call (a device read on CUDA).
        watch_policy: check at every call whether the policy changed (the Sampler's watch) and repack.
    """

    def __init__(self, sampler, batch_size: int, *, draw_noise: bool = True, inpaint: bool = False,
                 check_inputs: bool = False, watch_policy: bool = False):
        self.sampler = sampler
        self.batch_size = B = check_int("batch_size", batch_size, min_value=1)
        self.draw_noise = check_bool("draw_noise", draw_noise)
        self.inpaint = check_bool("inpaint", inpaint)
        self.check_inputs = check_bool("check_inputs", check_inputs)
        self.watch_policy = check_bool("watch_policy", watch_policy)
        if self.inpaint and not sampler._backend_impl.supports_inpainting:
            raise InvalidArgument(f"`inpaint`: backend {sampler.backend!r} cannot inpaint; build the Sampler with one "
                                  "that can (e.g. 'torch-batched' on a CPU, a GPU backend on CUDA)")
        policy, dev, dt = sampler.policy, sampler.device, sampler.sample_dtype
        shape = (B, policy.horizon, policy.action_dim)
        with state_mode():  # buffers later calls in any mode write in place
            self.global_cond = torch.zeros((B, policy.cond_dim), device=dev, dtype=dt)
            self.x_T = torch.zeros(shape, device=dev, dtype=dt)
            adds = any(sampler.table._adds)
            self.step_noise = torch.zeros((sampler.num_steps, *shape), device=dev, dtype=dt) if adds else None
            self.known = torch.zeros(shape, device=dev, dtype=dt) if self.inpaint else None
            self.known_mask = torch.zeros(shape, device=dev, dtype=torch.bool) if self.inpaint else None
        self.out: torch.Tensor | None = None
        self.graphed = dev.type == "cuda"
        self._build()

    # -- building ------------------------------------------------------------------------------------------------

    def _body(self) -> torch.Tensor:
        """The whole call on the buffers: noise, inpainting's first replacement, the backend. Capturable."""
        if self.draw_noise:
            self.x_T.normal_()
            if self.step_noise is not None:
                self.step_noise.normal_()
        x_T, extra = self.x_T, {}
        if self.inpaint:
            # The clean rule reads neither the scheduler nor noise.
            x_T, R = replacements("clean", self.known, self.known_mask, x_T, None, None, None)
            extra = dict(known=R, known_mask=self.known_mask)
        with inputs_already_checked():
            return self._prepared.run(self.global_cond, x_T, self.step_noise, **extra)

    def _build(self) -> None:
        self._prepared = self.sampler._prepared
        if not self.graphed:
            self._replay = self._run_direct
            return
        with state_mode():
            graph, self.out = self._capture()
        self._graph = graph
        self._replay = graph.replay

    def _capture(self):
        """:meth:`_body` captured into a CUDA graph (``captured.capture_graph``); returns ``(graph, output)``.
        The one step that needs CUDA (tests emulate it on the CPU)."""
        return capture_graph(self._body, self.sampler.device)

    def _run_direct(self) -> None:
        self.out = self._body()

    def refresh(self) -> bool:
        """Repack and build again if the policy changed since it was packed; returns whether it did."""
        if self.sampler._watch.changed():
            self.sampler.repack()
        if self._prepared is self.sampler._prepared:
            return False
        self._build()
        return True

    # -- calling ---------------------------------------------------------------------------------------------------

    def __call__(self, global_cond: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``[B, horizon, action_dim]`` for ``global_cond`` (default: what ``call.global_cond`` holds).

        Returns ``call.out`` (overwritten by the next call), or ``out`` with the result copied into it.
        """
        if self.watch_policy:
            self.refresh()
        elif self._prepared is not self.sampler._prepared:
            self._build()
        if global_cond is not None and global_cond is not self.global_cond:
            self._check("global_cond", global_cond, self.global_cond)
            self.global_cond.copy_(global_cond)
        if self.check_inputs:
            check_finite("global_cond", self.global_cond)
            if not self.draw_noise:
                check_finite("x_T", self.x_T)
        self._replay()
        if out is None:
            return self.out
        self._check("out", out, self.out)
        return out.copy_(self.out)

    @staticmethod
    def _check(name: str, t, like: torch.Tensor) -> None:
        if not (isinstance(t, torch.Tensor) and t.shape == like.shape and t.dtype == like.dtype
                and t.device == like.device):
            check_tensor(name, t, shape=tuple(like.shape), dtype=like.dtype, device=like.device)

    def __repr__(self) -> str:
        return (f"<fdp.StaticCall batch_size={self.batch_size} backend={self.sampler.backend!r} "
                f"{'graph' if self.graphed else 'direct'}>")
