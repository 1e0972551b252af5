"""Inpainting: sampling action chunks whose masked entries are known, and chunks that continue each other.

``sampler(obs, known=..., known_mask=...)`` samples with diffusion_policy's
rule (its ``conditional_sample(condition_data, condition_mask)``): before
every denoising step's model call the masked entries of x are set to the
known values, and once more after the last step. Equivalently, x_T is
replaced before the loop and every step's update ends with
``x = where(known_mask, known, x)``: an elementwise epilogue of the step,
which is how every backend runs it (:class:`fdp.backends.Prepared`). The
backends take the replacement as a tensor ``R`` that is either ``[B, Ta, Da]``
(the same after every step: this rule, no extra memory) or ``[T, B, Ta, Da]``
(``R[i]`` after step ``i``), so one kernel mechanism serves two rules:

- ``inpaint="clean"`` (the default): the known values themselves, every step;
  diffusion_policy's rule, bit for bit its algorithm. Deterministic (with
  DDIM at eta = 0 the call stays a function of x_T alone) and exact at the end.
- ``inpaint="noised"``: the rule of RePaint (Lugmayr et al. 2022): before the
  model call at timestep t the masked entries hold the known values noised
  to t, ``sqrt(ab_t) known + sqrt(1 - ab_t) n`` with a fresh standard normal
  ``n`` per step and ab the scheduler's ``alphas_cumprod``, so the model sees
  a sample at one noise level throughout; the final result holds the clean
  known values. (RePaint's resampling jumps are not part of it.)

For chunk continuation the default is ``"clean"``: it is the rule
diffusion_policy's checkpoints were sampled with, the entries it fixes are
the actions the robot is already committed to (their exact values matter,
not their noise level), and it adds no randomness to the call.
:func:`continuation` builds ``known``/``known_mask`` for the next chunk from
the previous one.
"""

from __future__ import annotations

import torch

from ._validation import check_int, check_tensor

__all__ = ["RULES", "replacements", "epilogue", "continuation"]

#: The replacement rules, by the name ``Sampler.__call__(inpaint=...)`` takes.
RULES = ("clean", "noised")


def epilogue(x: torch.Tensor, known: torch.Tensor, known_mask: torch.Tensor, i: int) -> torch.Tensor:
    """Step ``i``'s inpainting epilogue in torch (what the kernels do in their update):
    ``where(known_mask, R[i], x)`` for a per-step ``R``, ``where(known_mask, R, x)`` for one ``[B, Ta, Da]``."""
    return torch.where(known_mask, known if known.ndim == x.ndim else known[i], x)


def replacements(rule: str, known: torch.Tensor, known_mask: torch.Tensor, x_T: torch.Tensor, scheduler,
                 timesteps: torch.Tensor, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_T with its masked entries replaced, R)`` for a sampling call: what the backends take.

    ``draw(shape)`` gives standard normal noise for the ``"noised"`` rule (the caller's generator).
    ``R`` is ``known`` itself (``"clean"``) or ``[T, B, Ta, Da]`` (``"noised"``: ``R[i]`` is what
    the masked entries hold before step ``i + 1``'s model call, ``R[T - 1]`` the clean values).
    """
    if rule == "clean":
        return torch.where(known_mask, known, x_T), known
    if rule != "noised":
        raise ValueError(f"`inpaint` must be one of {RULES}, got {rule!r}")
    T = timesteps.shape[0]
    # ab at each step's timestep, as the scheduler's float32 table holds it; the levels in float64 (T numbers).
    ab = scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu().long()]
    noise = draw((T, *known.shape))
    k = known.to(torch.float64)
    levels = ab.to(known.device)
    # noised[j]: known at the level of step j's timestep (the value before step j's model call).
    noised = levels.sqrt().view(T, 1, 1, 1) * k + (1 - levels).sqrt().view(T, 1, 1, 1) * noise.to(torch.float64)
    noised = noised.to(known.dtype)
    R = torch.cat((noised[1:], known.unsqueeze(0)), dim=0)
    return torch.where(known_mask, noised[0], x_T), R


def continuation(previous: torch.Tensor, executed: int, overlap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(known, known_mask)`` for the next chunk so that it continues ``previous``.

    Args:
        previous: the previous chunk ``[B, Ta, Da]`` (or ``[Ta, Da]``), as sampled.
        executed: how many time steps passed between the observation ``previous`` was sampled for
            and the one the next chunk is sampled for (the actions of ``previous`` executed, or about
            to be, by then): the next chunk's action ``j`` is ``previous``'s action ``j + executed``.
        overlap: how many of the next chunk's first actions to fix to ``previous``'s (at most
            ``Ta - executed``): typically the actions the robot will execute while the next chunk is
            being sampled, plus a few to smooth the hand-over. The rest is sampled freely.

    Returns ``known`` (``previous`` shifted by ``executed``, zeros past its end) and the bool
    ``known_mask`` (True on the first ``overlap`` actions, all action dimensions), both shaped as
    ``previous``; pass them to :class:`fdp.Sampler` as ``known=``, ``known_mask=``.
    """
    check_tensor("previous", previous, dtype="floating")
    if previous.ndim not in (2, 3):
        raise ValueError(f"`previous` must be a chunk [B, Ta, Da] or [Ta, Da], got shape {list(previous.shape)}")
    Ta = previous.shape[-2]
    executed = check_int("executed", executed, min_value=0)
    if executed > Ta:
        raise ValueError(f"`executed` must be <= the chunk's {Ta} actions, got {executed}")
    overlap = check_int("overlap", overlap, min_value=0)
    if overlap > Ta - executed:
        raise ValueError(f"`overlap` must be <= Ta - executed = {Ta - executed} (the actions of `previous` not "
                         f"yet executed), got {overlap}")
    known = torch.zeros_like(previous)
    known[..., :Ta - executed, :] = previous[..., executed:, :]
    mask = torch.zeros(previous.shape, dtype=torch.bool, device=previous.device)
    mask[..., :overlap, :] = True
    return known, mask
