"""``FactorizedPolicy``: K component denoisers composed by a router.

    eps(x_t, t, c) = sum_k w_k(c) * eps_k(x_t, t, c),   w = router(c)

Training minimises the MSE between the composed prediction and its target
(the noise, for epsilon prediction); components and router train jointly,
with no auxiliary loss by default (the paper's objective). ``loss`` can add a
per-component term and a load-balance term that make the components
specialise (see :meth:`FactorizedPolicy.loss`). Adaptation to a new task adds a component (the router
grows one output), freezes the old ones and trains the new one and the router. Two ways to start it
(:meth:`FactorizedPolicy.add_component`): fdp's own, a new component whose router output starts where
the policy's outputs do not move; or the FDP authors', the new component a copy of an existing one and
the router re-initialised (``add_component(source=0, reset_router=True)``).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import InvalidArgument, InvalidArgumentType, check_finite, check_int, check_tensor
from .router import Router

ADAPT_MODES = ("router", "router+new", "full")
# Where adapt() starts a new component's router logit: measured on MetaWorld
# adaptation (docs/metaworld.md), -4 learns the new tasks well; -8 forgets
# less of the old ones but learns the new ones unreliably.
ADAPT_START_LOGIT = -4.0
# The same under the "tanh" strategy: a weight of tanh(0.05) ~ 0.05. Unlike softmax's
# start, the logit's own gradient is not damped here (d tanh / d logit ~ 1 near 0), so a
# small weight is enough for the router to move it. Not tuned on MetaWorld.
ADAPT_START_LOGIT_TANH = 0.05


class FactorizedPolicy(nn.Module):
    """A factorized diffusion policy.

    Args:
        components: K denoisers, each ``forward(sample [B, horizon, action_dim],
            timestep, local_cond=None, global_cond=None) -> [B, horizon, action_dim]``
            (e.g. :class:`fdp.ConditionalUnet1D` or :class:`fdp.MLPDenoiser`).
        router: a :class:`fdp.Router` with ``num_components == K``; it reads the
            same observation features ``global_cond`` the components see.
        horizon: action-chunk length.
        action_dim: action dimension.
        noise_scheduler: scheduler used by :meth:`loss` for the forward process
            (default: the paper's DDPM, 100 steps, squaredcos_cap_v2, clipped,
            epsilon prediction).
    """

    def __init__(self, components: Sequence[nn.Module], router: Router, horizon: int, action_dim: int,
                 noise_scheduler=None):
        super().__init__()
        components = list(components)
        if not components:
            raise InvalidArgument("`components` must hold at least one module")
        for i, comp in enumerate(components):
            if not isinstance(comp, nn.Module):
                raise InvalidArgumentType(f"`components[{i}]` must be an nn.Module, got {type(comp).__name__}")
        if not isinstance(router, Router):
            raise InvalidArgumentType(f"`router` must be an fdp.Router, got {type(router).__name__}")
        if router.num_components != len(components):
            raise InvalidArgument(f"`router` has {router.num_components} outputs but {len(components)} "
                                  "components were given: K must match")
        for name, v in (("horizon", horizon), ("action_dim", action_dim)):
            check_int(name, v, min_value=1)
        self.components = nn.ModuleList()
        self._takes_cond: list[bool] = []
        self.router = router
        self.horizon = horizon
        self.action_dim = action_dim
        # Which components were added after construction ("new" for adapt()).
        self.register_buffer("is_new", torch.zeros(0, dtype=torch.bool))
        # New components whose router logit still holds the output-preserving
        # start value; adapt() moves it to where training can reach it.
        self.register_buffer("awaits_start", torch.zeros(0, dtype=torch.bool))
        for comp in components:
            self._append(comp, new=False)
        if noise_scheduler is None:
            from .schedulers import DDPMScheduler

            noise_scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True, prediction_type="epsilon")
        self.noise_scheduler = noise_scheduler
        self._warned_clip = False  # loss() warns once about actions outside the clip range

    # -- structure -------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def cond_dim(self) -> int:
        return self.router.cond_dim

    def _append(self, comp: nn.Module, new: bool) -> None:
        i = len(self.components)
        for attr, want in (("input_dim", self.action_dim), ("horizon", self.horizon)):
            have = getattr(comp, attr, None)
            if have is not None and have != want:
                raise InvalidArgument(f"component {i} has {attr}={have}, but the policy expects {want}")
        multiple = getattr(comp, "horizon_multiple", 1)  # a U-Net halves the horizon at each level
        if self.horizon % multiple:
            raise InvalidArgument(f"`horizon` ({self.horizon}) must be divisible by {multiple} for component {i}, "
                                  f"whose U-Net halves it {multiple.bit_length() - 1} time(s)")
        # A component may ignore the observation (global_cond_dim 0 or None):
        # then only the router sees it, and the component gets global_cond=None.
        have = getattr(comp, "global_cond_dim", self.router.cond_dim)
        if have not in (0, None, self.router.cond_dim):
            raise InvalidArgument(f"component {i} has global_cond_dim={have}, but the router reads features of "
                                  f"size {self.router.cond_dim} (use the same, or 0/None for a component that ignores them)")
        self.components.append(comp)
        self._takes_cond.append(have not in (0, None))
        self.is_new = torch.cat([self.is_new, torch.tensor([new], device=self.is_new.device)])
        self.awaits_start = torch.cat([self.awaits_start, torch.tensor([False], device=self.is_new.device)])

    def add_component(self, module: nn.Module | None = None, initial_logit: float | None = None, *,
                      source: int = 0, reset_router: bool = False) -> int:
        """Add a component for a new task; returns its index.

        Two ways to start it, which :meth:`adapt` then trains the same way:

        - fdp's (the default): ``module`` is the new component and the
          router grows one output whose logit is the constant
          ``initial_logit``, by default one that leaves the policy's outputs
          for existing inputs unchanged (``soft``: -20, a weight of about
          e^-20 of the others'; ``tanh``: 0, a weight of exactly 0), to the
          rounding of the router's grown last layer. Such a weight is too
          small to train from (under softmax the gradients fall under Adam's
          epsilon; a weight of exactly 0 passes none), so :meth:`adapt` then
          lifts the logit to its ``start_logit``; pass another
          ``initial_logit`` to choose the starting point yourself (``adapt``
          leaves it alone).
        - the FDP authors': ``module=None`` adds a copy of component
          ``source`` (0 by default; its parameters, buffers and
          ``requires_grad`` flags), and ``reset_router=True`` draws the whole
          router afresh (:meth:`fdp.Router.reset_parameters`, from torch's
          global generator). The outputs change at once: the router's old
          routing is gone and the copy starts where its source was, so
          adaptation re-learns the routing from the components it has.

        The two options combine freely (a copy with fdp's new logit, or a
        module of your own with a fresh router). ``initial_logit`` is refused
        with ``reset_router=True``: the reset overwrites it.
        """
        if module is None:
            n = self.num_components
            if isinstance(source, bool) or not isinstance(source, int) or not -n <= source < n:
                raise InvalidArgument(f"`source` must be a component index in [0, {n}), got {source!r}")
            module = copy.deepcopy(self.components[source])
        elif not isinstance(module, nn.Module):
            raise InvalidArgumentType(f"`module` must be an nn.Module or None (a copy of component `source`), "
                            f"got {type(module).__name__}")
        if not isinstance(reset_router, bool):
            raise InvalidArgumentType(f"`reset_router` must be a bool, got {reset_router!r}")
        if reset_router and initial_logit is not None:
            raise InvalidArgument("`initial_logit` must be None with `reset_router=True`: the reset draws the "
                             "router's outputs afresh")
        ref = next(self.router.parameters())
        self._append(module.to(device=ref.device, dtype=ref.dtype), new=True)
        default = self.router.new_output_logit
        self.router.add_output(initial_logit)
        if reset_router:
            self.router.reset_parameters()
        self.awaits_start[-1] = not reset_router and (initial_logit is None or initial_logit == default)
        return self.num_components - 1

    def freeze_components(self, indices: Iterable[int] | None = None, frozen: bool = True) -> None:
        """Stop (or, with ``frozen=False``, restart) training the given components (all if None)."""
        indices = range(self.num_components) if indices is None else list(indices)
        for i in indices:
            if not isinstance(i, int) or not -self.num_components <= i < self.num_components:
                raise InvalidArgument(f"`indices` must hold component indices in [0, {self.num_components}), got {i!r}")
            self.components[i].requires_grad_(not frozen)

    def adapt(self, mode: str, start_logit: float | None = None) -> list[nn.Parameter]:
        """Set what trains for adaptation and return those parameters (for the optimiser).

        ``"router"``: the router only; ``"router+new"``: the router and the
        components added with :meth:`add_component`; ``"full"``: everything.
        In the modes that train new components, a new component still at the
        default output-preserving logit gets its logit bias set to
        ``start_logit`` (once), so that it receives gradients Adam can follow;
        outputs change from here on, as training changes them anyway. The
        default ``start_logit`` follows the router's strategy: -4 under
        ``soft`` (measured on MetaWorld, docs/metaworld.md), 0.05 under
        ``tanh`` (a weight of about 0.05; not tuned).
        """
        if mode not in ADAPT_MODES:
            raise InvalidArgument(f"`mode` must be one of {ADAPT_MODES}, got {mode!r}")
        if start_logit is None:
            start_logit = ADAPT_START_LOGIT_TANH if self.router.strategy == "tanh" else ADAPT_START_LOGIT
        if mode != "router":
            with torch.no_grad():
                for i in torch.nonzero(self.awaits_start).flatten().tolist():
                    self.router.net[2].bias[i] = start_logit
            self.awaits_start.zero_()
        for i, comp in enumerate(self.components):
            comp.requires_grad_(mode == "full" or (mode == "router+new" and bool(self.is_new[i])))
        self.router.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    # -- evaluation ------------------------------------------------------------------
    def weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Router weights ``[B, K]`` for observation features ``cond [B, Dc]``."""
        return self.router(cond)

    def check_inputs(self, sample, global_cond, weights=None) -> None:
        check_tensor("sample", sample, shape=(None, self.horizon, self.action_dim), dtype="floating")
        B = sample.shape[0]
        check_tensor("global_cond", global_cond, shape=(B, self.cond_dim), dtype="floating", device=sample.device)
        check_finite("global_cond", global_cond)
        if weights is not None:
            check_tensor("weights", weights, shape=(B, self.num_components), dtype="floating", device=sample.device)

    def forward(self, sample, timestep, local_cond=None, global_cond=None, weights=None):
        """Composed prediction ``sum_k w_k * eps_k`` (``weights`` skips the router); an empty batch gives an
        empty prediction."""
        self.check_inputs(sample, global_cond, weights)
        if sample.shape[0] == 0:
            return sample.new_empty(sample.shape)
        if weights is None:
            weights = self.weights(global_cond)
        return self.compose(sample, timestep, global_cond, weights, local_cond)

    def compose(self, sample, timestep, global_cond, weights, local_cond=None):
        """``sum_k weights[:, k] * eps_k`` without input checks (the sampler's inner loop).

        A component whose weight is exactly 0 for a row is left out of that
        row, whatever it outputs (no value, no gradient): sparse routing
        (``hard``, ``topk``) lets fused backends skip it, and all backends
        must agree even when its output is NaN. A NaN weight is not 0, so it
        gives a NaN row.
        """
        return _weighted_sum(weights, self.component_outputs(sample, timestep, global_cond, local_cond))

    def component_outputs(self, sample, timestep, global_cond, local_cond=None):
        """Each component's own prediction ``eps_k``, one at a time (an iterator), without input checks."""
        for k, comp in enumerate(self.components):
            cond_k = global_cond if self._takes_cond[k] else None
            yield comp(sample, timestep, local_cond=local_cond, global_cond=cond_k)

    def _check_training_inputs(self, actions, cond) -> None:
        """:meth:`loss`'s own checks, naming its arguments (the components would name theirs)."""
        check_tensor("actions", actions, shape=(None, self.horizon, self.action_dim), dtype="floating")
        param = next(self.components[0].parameters(), None)
        if param is not None and actions.dtype != param.dtype:
            raise InvalidArgumentType(f"`actions` must have the policy's parameter dtype {param.dtype}, got {actions.dtype} "
                                      f"(convert the actions, or the policy with .to({actions.dtype}))")
        check_tensor("cond", cond, shape=(actions.shape[0], self.cond_dim), dtype="floating", device=actions.device)
        if any(self._takes_cond) and cond.dtype != actions.dtype:
            raise InvalidArgumentType(f"`cond` must have the dtype of `actions` ({actions.dtype}): the components read it; "
                                      f"got {cond.dtype}")
        sched = self.noise_scheduler.config
        if not getattr(self, "_warned_clip", False) and sched.get("clip_sample") and actions.numel():
            limit = sched["clip_sample_range"]
            peak = float(actions.detach().abs().max())
            if peak > limit:
                self._warned_clip = True
                warnings.warn(f"`actions` reach {peak:.3g}, outside the scheduler's clip range "
                              f"[-{limit:g}, {limit:g}]: sampling clips its estimate of x_0 to that range, so "
                              "the policy cannot reproduce such actions; normalise actions to the range "
                              "(warned once per policy)", UserWarning, stacklevel=3)

    def noised(self, actions: torch.Tensor, generator: torch.Generator | None = None):
        """One draw of the forward process for training: ``(noisy actions, timesteps, target)``.

        One timestep per sample, uniform over the scheduler's training steps,
        and Gaussian noise, both from ``generator``; the target follows the
        scheduler's ``prediction_type``.
        """
        sched = self.noise_scheduler
        gen_device = generator.device if generator is not None else actions.device
        noise = torch.randn(actions.shape, generator=generator, device=gen_device, dtype=actions.dtype).to(actions.device)
        t = torch.randint(0, sched.config["num_train_timesteps"], (actions.shape[0],), generator=generator,
                          device=gen_device).to(actions.device)
        noisy = sched.add_noise(actions, noise, t)
        kind = sched.config["prediction_type"]
        target = {"epsilon": noise, "sample": actions}.get(kind)
        if target is None:
            target = sched.get_velocity(actions, noise, t)
        return noisy, t, target

    def loss(self, actions: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
             local_cond=None, component_weight: float = 0.0, balance_weight: float = 0.0) -> torch.Tensor:
        """Denoising loss: MSE of the composed prediction against its target (the paper's loss).

        The noisy actions, timesteps and target come from :meth:`noised` (drawn from ``generator``).

        Two optional terms push the components to specialise (both off by default):

        - ``component_weight * mean_b sum_k w_bk * mse(eps_k, target)_b``: each
          component is also scored on its own, weighted by its routing weight
          (gradients reach the router through ``w`` too, so it learns to send a
          sample to the components that predict it best);
        - ``balance_weight * (K * sum_k wbar_k**2 - 1)`` with ``wbar`` the
          batch-mean weights: 0 when the batch uses every component equally,
          ``K - 1`` when it uses only one (keeps the router from collapsing).

        The weights follow the router's strategy, so training with
        ``Router(..., strategy="topk", topk=k)`` trains with renormalised top-k
        routing: the weights are the softmax of the k largest logits, and
        gradients reach the router through those k logits only (the others
        get none in that step). With ``topk=1`` or ``"hard"`` every weight is a
        constant 0 or 1, so none of these terms gives the router a gradient:
        train those soft or with ``topk >= 2``. Both terms read the weights as a
        distribution, so they are refused under ``"tanh"``: a negative weight
        would reward a component's error, and the balance term's 0 means a
        uniform distribution.

        ``actions [B, horizon, action_dim]`` must have the components'
        parameter dtype, and ``cond [B, Dc]`` the same dtype where a component
        reads it. Actions are expected in the scheduler's clip range (``[-1, 1]``
        by default: normalise them): sampling clips its estimate of ``x_0`` to
        that range, so the policy could never produce actions outside it. The
        first batch that leaves it gets a warning (once per policy). An empty
        batch has no mean and is refused (ValueError naming ``actions``).
        """
        self._check_training_inputs(actions, cond)
        self.check_inputs(actions, cond)
        if actions.shape[0] == 0:
            raise InvalidArgument("`actions` must hold at least one sample: the loss is a mean over the batch")
        component_weight = _check_loss_weight("component_weight", component_weight)
        balance_weight = _check_loss_weight("balance_weight", balance_weight)
        if (component_weight or balance_weight) and self.router.strategy == "tanh":
            raise InvalidArgument("`component_weight` and `balance_weight` must be 0 under the router strategy 'tanh': "
                             "they read the weights as a distribution (non-negative, summing to 1), which signed, "
                             "unnormalised tanh weights are not")
        noisy, t, target = self.noised(actions, generator)
        weights = self.weights(cond)
        if component_weight or balance_weight:
            return self._specialisation_loss(noisy, t, cond, weights, target, local_cond, component_weight,
                                             balance_weight)
        pred = self.compose(noisy, t, cond, weights, local_cond)
        return F.mse_loss(pred, target)

    def _specialisation_loss(self, noisy, t, cond, weights, target, local_cond, component_weight, balance_weight):
        """The composed MSE plus the per-component and balance terms of :meth:`loss`."""
        outputs = list(self.component_outputs(noisy, t, cond, local_cond))
        loss = F.mse_loss(_weighted_sum(weights, outputs), target)
        if component_weight:
            per_comp = torch.stack([((o - target) ** 2).flatten(1).mean(1) for o in outputs], dim=1)  # [B, K]
            loss = loss + component_weight * (weights.to(per_comp.dtype) * per_comp).sum(1).mean()
        if balance_weight:
            wbar = weights.mean(0)
            loss = loss + balance_weight * (self.num_components * (wbar ** 2).sum() - 1)
        return loss


def _weighted_sum(weights, outputs):
    """``sum_k w_k * eps_k`` with a zero weight leaving its component out of the row (see ``compose``)."""
    out = None
    for k, eps_k in enumerate(outputs):
        w_k = weights[:, k, None, None].to(eps_k.dtype)
        term = torch.where(w_k != 0, w_k * eps_k, 0)
        out = term if out is None else out + term
    return out


def _check_loss_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(f"`{name}` must be a non-negative float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"`{name}` must be a non-negative float, got {value!r}")
    return float(value)
