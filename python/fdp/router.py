"""The router: per-observation weights over the K components.

``logits = net(c)`` with ``net = Linear(Dc, H) -> ReLU -> Linear(H, K)``, then

- ``soft``  (the paper's default): ``w = softmax(logits)``;
- ``hard``:  one-hot of ``argmax(logits)`` (ties go to the lowest index);
- ``topk``:  softmax over the ``topk`` largest logits, 0 elsewhere;
- ``fixed``: user-given weights ``fixed_weights`` ([K], non-negative, summing
  to 1), the same for every observation — for composing separately trained
  policies. ``net`` is kept so state dicts have one shape whatever the strategy.

A row whose logits hold NaN or +Inf gets NaN weights under ``soft``, ``hard``
and ``topk`` alike (softmax does so by itself; an argmax or top-k would
otherwise turn a NaN into a confident choice), so a broken router shows as
NaN actions on every backend rather than as finite ones.

The router runs once per sampling call, never per denoising step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_finite, check_tensor

STRATEGIES = ("soft", "hard", "topk", "fixed")

# Logit given to a freshly added component (see Router.add_output): small
# enough that its weight, about exp(-20) of the others', leaves every
# composed output unchanged to float32 rounding. Training cannot start from
# there (gradients that small fall under Adam's epsilon): FactorizedPolicy.adapt
# lifts it first.
NEW_COMPONENT_LOGIT = -20.0


def _nan_where_softmax_is(w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # NaN < inf is False too: rows with a NaN or +Inf logit, where softmax gives NaN.
    bad = ~(logits < float("inf")).all(dim=-1, keepdim=True)
    return w.masked_fill(bad, float("nan"))


class Router(nn.Module):
    """Weights ``[B, K]`` over K components from observation features ``[B, Dc]``.

    A two-layer MLP gives one logit per component,
    ``logits = Linear(H, K)(ReLU(Linear(Dc, H)(c)))``, and the strategy turns
    the logits into weights (every row non-negative, summing to 1):

    - ``"soft"`` (default, the paper's): ``softmax(logits)``; every component
      contributes, and the weights train with the components.
    - ``"hard"``: all weight on the largest logit (ties: the lowest index),
      one component per observation.
    - ``"topk"``: softmax over the ``topk`` largest logits, 0 elsewhere.
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
            strategy: ``"soft"``, ``"hard"``, ``"topk"`` or ``"fixed"`` (see the class docstring).
            topk: how many components ``"topk"`` keeps per observation (1 <= topk <= K);
                ignored by the other strategies, kept for a later :meth:`set_strategy`.
            fixed_weights: ``[K]`` non-negative weights summing to 1; required for ``"fixed"``.
        """
        super().__init__()
        if not isinstance(cond_dim, int) or cond_dim < 1:
            raise ValueError(f"`cond_dim` must be a positive int, got {cond_dim!r}")
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"`num_components` must be a positive int, got {num_components!r}")
        hidden_dim = cond_dim if hidden_dim is None else hidden_dim
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"`hidden_dim` must be None or a positive int, got {hidden_dim!r}")
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
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
        K = self.num_components
        if topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk:
                raise ValueError(f"`topk` must be a positive int, got {topk!r}")
            self.topk = topk
        if strategy == "topk" and self.topk > K:
            raise ValueError(f"`topk` must be <= num_components ({K}), got {self.topk}")
        if fixed_weights is not None:
            w = torch.as_tensor(fixed_weights, dtype=self.fixed_weights.dtype).to(self.fixed_weights.device)
            if w.shape != (K,):
                raise ValueError(f"`fixed_weights` must have shape [{K}], got {list(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-5:
                raise ValueError(f"`fixed_weights` must be finite, non-negative and sum to 1, got {w.tolist()}")
            self.fixed_weights.copy_(w)
        elif strategy == "fixed" and self.strategy != "fixed":
            raise ValueError("strategy 'fixed' needs `fixed_weights` ([K], non-negative, summing to 1)")
        self.strategy = strategy

    def _check_cond(self, cond: torch.Tensor) -> None:
        check_tensor("cond", cond, shape=(None, self.cond_dim), dtype="floating",
                     device=self.net[0].weight.device)
        check_finite("cond", cond)

    def logits(self, cond: torch.Tensor) -> torch.Tensor:
        self._check_cond(cond)
        return self.net(cond.to(self.net[0].weight.dtype))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[B, K]``; each row is non-negative and sums to 1."""
        if self.strategy == "fixed":
            # The weights do not depend on the observation, so the net is not evaluated
            # (a single-denoiser sampler does no router work per call).
            self._check_cond(cond)
            return self.fixed_weights.to(self.net[0].weight.dtype).expand(cond.shape[0], -1).clone()
        logits = self.logits(cond)
        if self.strategy == "soft":
            return torch.softmax(logits, dim=-1)
        if self.strategy == "hard":
            w = F.one_hot(logits.argmax(dim=-1), self.num_components).to(logits.dtype)
            return _nan_where_softmax_is(w, logits)
        top, idx = logits.topk(self.topk, dim=-1)  # "topk"
        w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        return _nan_where_softmax_is(w, logits)

    @torch.no_grad()
    def add_output(self, initial_logit: float = NEW_COMPONENT_LOGIT) -> None:
        """Grow one output for a new component; existing outputs are unchanged.

        The new logit starts as the constant ``initial_logit`` (zero weights),
        so right after adding, the soft weights of the old components change by
        a factor ``1 / (1 + exp(initial_logit - logsumexp(old)))``, which rounds
        to 1 in float32 for the default. Fixed weights get a 0 for the new one.
        """
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

    def extra_repr(self) -> str:
        s = f"strategy={self.strategy!r}"
        return s + (f", topk={self.topk}" if self.strategy == "topk" else "")
