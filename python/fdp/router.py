"""The router: per-observation weights over the K components.

``logits = net(c)`` with ``net = Linear(Dc, H) -> ReLU -> Linear(H, K)``, then

- ``soft``  (the default): ``w = softmax(logits)``, as the Policy Consensus
  code composes its policies;
- ``tanh``:  ``w = tanh(logits)``, signed and not normalised, as the FDP
  authors' code composes its components (its router ends in ``Tanh`` and the
  prediction is ``sum_k tanh(logit_k) * eps_k``);
- ``hard``:  one-hot of ``argmax(logits)`` (ties go to the lowest index);
- ``topk``:  softmax over the ``topk`` largest logits, 0 elsewhere (ties: the lowest indices);
- ``fixed``: user-given weights ``fixed_weights`` ([K], non-negative, summing
  to 1), the same for every observation — for composing separately trained
  policies. ``net`` is kept so state dicts have one shape whatever the strategy.

A row whose logits hold NaN or +Inf gets NaN weights under ``soft``, ``hard``
and ``topk`` alike (softmax does so by itself; an argmax or top-k would
otherwise turn a NaN into a confident choice), so a broken router shows as
NaN actions on every backend rather than as finite ones. ``tanh`` gives NaN
rows for any non-finite logit, -Inf included: ``tanh`` would turn an
overflowed logit into a confident weight of +-1, while under softmax -Inf is
a legitimate "never this component" (weight 0).

The router runs once per sampling call, never per denoising step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdp_kernels.abi import ROUTER_STRATEGIES

from ._validation import InvalidArgument, check_finite, check_int, check_optional_int, check_tensor

STRATEGIES = ROUTER_STRATEGIES  # fdp_kernels.abi: the kernels take a strategy as its index there

# Logit given to a freshly added component (see Router.add_output): small
# enough that its weight, about exp(-20) of the others', leaves every
# composed output unchanged to float32 rounding. Training cannot start from
# there (gradients that small fall under Adam's epsilon): FactorizedPolicy.adapt
# lifts it first.
NEW_COMPONENT_LOGIT = -20.0
# The same for ``tanh``: tanh(0) is exactly 0, so the new component adds
# nothing (a zero weight leaves a component out); the old logits may differ by
# a rounding, since the grown last layer's matmul can sum in another order. A
# weight of exactly
# 0 passes no gradient either (to the component or to its logit), so here too
# FactorizedPolicy.adapt lifts it first.
NEW_COMPONENT_LOGIT_TANH = 0.0


def top_mask(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Where the ``n`` largest logits of each row are, ties to the lowest index (as ``argmax``): logit k is kept
    when fewer than ``n`` logits beat it (larger, or equal at a lower index). Not ``torch.topk``, whose choice
    among equal logits is unspecified (the fused kernels must make the same one) and not a stable sort, which
    ONNX export refuses."""
    idx = torch.arange(logits.shape[-1], device=logits.device)
    a, b = logits[..., :, None], logits[..., None, :]  # [.., k, j]: logit k against logit j
    beats = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))
    return beats.sum(-1) < n


def _nan_where_softmax_is(w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # NaN < inf is False too: rows with a NaN or +Inf logit, where softmax gives NaN.
    bad = ~(logits < float("inf")).all(dim=-1, keepdim=True)
    return w.masked_fill(bad, float("nan"))


def _nan_where_not_finite(w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return w.masked_fill(~torch.isfinite(logits).all(dim=-1, keepdim=True), float("nan"))


class Router(nn.Module):
    """Weights ``[B, K]`` over K components from observation features ``[B, Dc]``.

    A two-layer MLP gives one logit per component,
    ``logits = Linear(H, K)(ReLU(Linear(Dc, H)(c)))``, and the strategy turns
    the logits into weights (every row non-negative and summing to 1, except
    under ``"tanh"``):

    - ``"soft"`` (default): ``softmax(logits)``; every component contributes,
      and the weights train with the components. This is how the Policy
      Consensus code composes policies; the FDP authors' code uses ``"tanh"``.
    - ``"tanh"``: ``tanh(logits)``, each weight in (-1, 1), signed, the row
      not normalised (``sum_k w_k`` is free): the FDP authors' composition.
      A weight of exactly 0 (logit 0) leaves its component out, as under the
      other strategies.
    - ``"hard"``: all weight on the largest logit (ties: the lowest index),
      one component per observation.
    - ``"topk"``: softmax over the ``topk`` largest logits, 0 elsewhere (ties: the lowest indices).
    - ``"fixed"``: the same ``fixed_weights`` for every observation, e.g. to
      compose separately trained policies.

    A common recipe is to train ``soft`` and deploy ``hard`` or ``topk``
    (:meth:`set_strategy`) where the router has learned to specialise. The
    router runs once per sampling call, not per denoising step.

    Example::

        router = fdp.Router(cond_dim=64, num_components=4)   # soft, hidden width 64
        w = router(obs_features)                             # [B, 4]
    """

    def __init__(self, cond_dim: int, num_components: int, hidden_dim: int | None = None,
                 strategy: str = "soft", topk: int = 2, fixed_weights=None):
        """
        Args:
            cond_dim: size ``Dc`` of the observation features (the policy's ``global_cond``).
            num_components: K, one output per component.
            hidden_dim: width H of the hidden layer; ``None`` uses ``cond_dim``.
            strategy: ``"soft"``, ``"tanh"``, ``"hard"``, ``"topk"`` or ``"fixed"`` (see the class docstring).
            topk: how many components ``"topk"`` keeps per observation (1 <= topk <= K);
                ignored by the other strategies, kept for a later :meth:`set_strategy`.
            fixed_weights: ``[K]`` non-negative weights summing to 1; required for ``"fixed"``.
        """
        super().__init__()
        cond_dim = check_int("cond_dim", cond_dim, min_value=1)
        num_components = check_int("num_components", num_components, min_value=1)
        hidden_dim = check_optional_int("hidden_dim", hidden_dim, min_value=1)
        hidden_dim = cond_dim if hidden_dim is None else hidden_dim
        self.cond_dim = cond_dim
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_components))
        self.register_buffer("fixed_weights", torch.full((num_components,), 1.0 / num_components))
        self.strategy = "soft"
        self.topk = topk
        self.set_strategy(strategy, topk=topk, fixed_weights=fixed_weights)

    @property
    def num_components(self) -> int:
        return self.net[2].out_features

    def set_strategy(self, strategy: str, topk: int | None = None, fixed_weights=None) -> None:
        """Switch routing strategy (e.g. train ``soft``, deploy ``topk``)."""
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
        K = self.num_components
        if topk is not None:
            self.topk = topk = check_int("topk", topk, min_value=1)
        if strategy == "topk" and self.topk > K:
            raise InvalidArgument(f"`topk` must be <= num_components ({K}), got {self.topk}")
        if fixed_weights is not None:
            w = torch.as_tensor(fixed_weights, dtype=self.fixed_weights.dtype).to(self.fixed_weights.device)
            if w.shape != (K,):
                raise InvalidArgument(f"`fixed_weights` must have shape [{K}], got {list(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-5:
                raise InvalidArgument(f"`fixed_weights` must be finite, non-negative and sum to 1, got {w.tolist()}")
            self.fixed_weights.copy_(w)
        elif strategy == "fixed" and self.strategy != "fixed":
            raise InvalidArgument("strategy 'fixed' needs `fixed_weights` ([K], non-negative, summing to 1)")
        self.strategy = strategy

    def _check_cond(self, cond: torch.Tensor) -> None:
        check_tensor("cond", cond, shape=(None, self.cond_dim), dtype="floating",
                     device=self.net[0].weight.device)
        check_finite("cond", cond)

    def logits(self, cond: torch.Tensor) -> torch.Tensor:
        self._check_cond(cond)
        return self.net(cond.to(self.net[0].weight.dtype))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[B, K]``; each row is non-negative and sums to 1 (``"tanh"``: each weight in [-1, 1])."""
        if self.strategy == "fixed":
            # The weights do not depend on the observation, so the net is not evaluated
            # (a single-denoiser sampler does no router work per call).
            self._check_cond(cond)
            return self.fixed_weights.to(self.net[0].weight.dtype).expand(cond.shape[0], -1).clone()
        logits = self.logits(cond)
        if self.strategy == "soft":
            return torch.softmax(logits, dim=-1)
        if self.strategy == "tanh":
            return _nan_where_not_finite(torch.tanh(logits), logits)
        if self.strategy == "hard":
            w = F.one_hot(logits.argmax(dim=-1), self.num_components).to(logits.dtype)
            return _nan_where_softmax_is(w, logits)
        w = torch.softmax(logits.masked_fill(~top_mask(logits, self.topk), -float("inf")), dim=-1)  # "topk"
        return _nan_where_softmax_is(w, logits)

    @property
    def new_output_logit(self) -> float:
        """The logit :meth:`add_output` gives a new component by default: one that leaves the
        composed outputs unchanged under the current strategy (``tanh``: 0, a weight of exactly 0;
        the others: -20, a softmax weight of about e^-20 of the others')."""
        return NEW_COMPONENT_LOGIT_TANH if self.strategy == "tanh" else NEW_COMPONENT_LOGIT

    @torch.no_grad()
    def add_output(self, initial_logit: float | None = None) -> None:
        """Grow one output for a new component; existing outputs are unchanged.

        The new logit starts as the constant ``initial_logit`` (default:
        :attr:`new_output_logit`). Under ``tanh`` the default 0 gives the new
        component a weight of exactly 0: it adds nothing to the composition.
        Under ``soft`` the old components' weights change by a factor
        ``1 / (1 + exp(initial_logit - logsumexp(old)))``, which rounds to 1 in
        float32 for the default -20. Either way the old logits are the same
        numbers up to rounding (the grown layer's matmul may sum in another
        order). Fixed weights get a 0 for the new one.
        """
        if initial_logit is None:
            initial_logit = self.new_output_logit
        old = self.net[2]
        new = nn.Linear(old.in_features, old.out_features + 1, device=old.weight.device, dtype=old.weight.dtype)
        new.weight.zero_()
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
        new.bias[-1] = initial_logit
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.net[2] = new
        self.fixed_weights = torch.cat([self.fixed_weights, self.fixed_weights.new_zeros(1)])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the net's parameters afresh (``nn.Linear``'s initialisation, from torch's global
        generator, as constructing a Router does); the strategy and fixed weights stay."""
        self.net[0].reset_parameters()
        self.net[2].reset_parameters()

    def extra_repr(self) -> str:
        s = f"strategy={self.strategy!r}"
        return s + (f", topk={self.topk}" if self.strategy == "topk" else "")
