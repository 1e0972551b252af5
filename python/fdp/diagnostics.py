"""Routing diagnostics: does the router specialise, and do the components?

:func:`routing` measures, for observation features grouped by task (and,
optionally, the matching demonstration actions):

- how peaked each sample's weights are: the entropy of the components'
  shares ``|w_k| / sum_j |w_j|`` normalised by ``log K`` (1 = every
  component equally, 0 = one component) and the top share. For the
  strategies whose weights are a distribution (``soft``, ``hard``,
  ``topk``, ``fixed``) the shares are the weights themselves; under ``tanh``
  (signed, unnormalised weights) they say how the composition's magnitude
  is spread over the components, whatever the signs;
- the row sum ``sum_k w_k`` (1 for a distribution; under ``tanh``, the
  scale the composition gives a prediction the components agree on);
- each task's mean weights, their spread over its samples, and the
  component it leans on most (the largest mean share);
- with actions: the denoising error (MSE against the training target on one
  forward-process draw) of the composed prediction, of every component
  alone, of the composition with fixed uniform weights ``1/K``, of the
  composition with every sample's weights replaced by its task's mean
  weights (does per-sample routing matter?), and of predicting zero (the
  scale of the target).

The result is a plain dict of floats, lists and strings (``json.dump`` takes
it as is); :func:`format_routing` renders it as a text table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ._validation import InvalidArgument, InvalidArgumentType, check_tensor
from .policy import FactorizedPolicy, _weighted_sum

__all__ = ["routing", "format_routing"]


@torch.no_grad()
def routing(policy, obs_by_task: Mapping, actions_by_task: Mapping | None = None,
            generator: torch.Generator | None = None) -> dict:
    """Routing and per-component diagnostics of a :class:`fdp.FactorizedPolicy`.

    Args:
        policy: the policy (its router's current strategy gives the weights).
        obs_by_task: ``{task name: observation features [N, cond_dim]}``.
        actions_by_task: optional ``{task name: actions [N, horizon, action_dim]}``
            with the same names and ``N`` as ``obs_by_task`` (e.g. demonstrations,
            normalised as in training); enables the error columns.
        generator: draws the noise and timesteps of the error estimates (the
            same forward process as :meth:`fdp.FactorizedPolicy.loss`), one
            draw per sample, shared by every column so they compare like for like.

    Returns:
        ``{"num_components": K, "tasks": {name: {...}}, "overall": {...}}``. Per
        task (and over all samples in ``"overall"``): ``samples``,
        ``entropy`` (mean normalised entropy of the shares), ``top_weight``
        (mean largest share), ``weight_sum`` (mean row sum of the weights),
        ``mean_weights`` ``[K]``, ``weight_std`` ``[K]`` (spread over the
        samples), ``dominant`` (argmax of the mean shares) and, with actions,
        ``composed_mse``, ``component_mse`` ``[K]``, ``uniform_mse``,
        ``mean_weight_mse`` (each sample's weights replaced by its task's mean)
        and ``zero_mse``. A row of all-zero weights has shares 0 (entropy 0,
        top share 0).
    """
    if not isinstance(policy, FactorizedPolicy):
        raise InvalidArgumentType(f"`policy` must be an fdp.FactorizedPolicy, got {type(policy).__name__}")
    _check_groups(policy, obs_by_task, actions_by_task)
    K = policy.num_components
    was_training = policy.training
    policy.eval()
    try:
        per_task = {str(name): _task_stats(policy, obs_by_task[name],
                                           None if actions_by_task is None else actions_by_task[name], generator)
                    for name in obs_by_task}
    finally:
        policy.train(was_training)
    return {"num_components": K, "tasks": {n: _summary(s) for n, s in per_task.items()},
            "overall": _summary(_merge(list(per_task.values())))}


def format_routing(report: dict) -> str:
    """A text table of :func:`routing`'s result, one row per task and one for all."""
    K = report["num_components"]
    has_err = "composed_mse" in report["overall"]
    head = (f"{'task':<22}{'entropy':>8}{'top w':>7}{'sum w':>7}  "
            f"{'mean weights (k=0..' + str(K - 1) + ')':<{7 * K + 2}}dom")
    if has_err:
        head += f"{'mse':>9}{'uniform':>9}{'mean w':>9}{'zero':>8}  each component alone"
    lines = [head]
    rows = list(report["tasks"].items()) + [("(all)", report["overall"])]
    for name, r in rows:
        line = (f"{name:<22}{r['entropy']:>8.3f}{r['top_weight']:>7.3f}{r['weight_sum']:>7.3f}  "
                f"{' '.join(f'{w:+.3f}' for w in r['mean_weights']):<{7 * K + 2}}k={r['dominant']}")
        if has_err:
            line += (f"{r['composed_mse']:>9.4f}{r['uniform_mse']:>9.4f}{r['mean_weight_mse']:>9.4f}"
                     f"{r['zero_mse']:>8.4f}  "
                     + " ".join(f"{e:.4f}" for e in r["component_mse"]))
        lines.append(line)
    return "\n".join(lines)


# -- internals ---------------------------------------------------------------------------------------

def _check_groups(policy, obs_by_task, actions_by_task) -> None:
    if not isinstance(obs_by_task, Mapping) or not obs_by_task:
        raise InvalidArgumentType("`obs_by_task` must be a non-empty mapping {task name: features [N, cond_dim]}")
    if actions_by_task is not None:
        if not isinstance(actions_by_task, Mapping):
            raise InvalidArgumentType("`actions_by_task` must be None or a mapping "
                                      "{task name: actions [N, horizon, action_dim]}")
        if set(actions_by_task) != set(obs_by_task):
            raise InvalidArgument(f"`actions_by_task` must have the same task names as `obs_by_task`, got "
                                  f"{sorted(map(str, actions_by_task))} vs {sorted(map(str, obs_by_task))}")
    for name, obs in obs_by_task.items():
        d = check_tensor(f"obs_by_task[{name!r}]", obs, shape=("N", policy.cond_dim), dtype="floating")
        if d["N"] == 0:
            raise InvalidArgument(f"`obs_by_task[{name!r}]` must hold at least one sample")
        if actions_by_task is not None:
            check_tensor(f"actions_by_task[{name!r}]", actions_by_task[name],
                         shape=("N", policy.horizon, policy.action_dim), dtype="floating", dims=d)


def _task_stats(policy, obs, actions, generator) -> dict:
    """Per-sample quantities of one task, as tensors to be averaged."""
    w = policy.weights(obs)
    K = w.shape[1]
    # The shares are w itself for a distribution; the clamp gives an all-zero row shares 0, not NaN.
    share = w.abs() / w.abs().sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    # entr(0) = 0: components a hard or top-k router switches off add nothing.
    entropy = torch.special.entr(share).sum(1) / math.log(K) if K > 1 else torch.zeros_like(w[:, 0])
    out = {"weights": w, "share": share, "entropy": entropy, "top_weight": share.max(1).values,
           "weight_sum": w.sum(1)}
    if actions is not None:
        noisy, t, target = policy.noised(actions.to(w.device), generator)
        outputs = list(policy.component_outputs(noisy, t, obs, None))

        def err(pred):
            return ((pred - target) ** 2).flatten(1).mean(1)

        out.update(composed_mse=err(_weighted_sum(w, outputs)),
                   uniform_mse=err(_weighted_sum(torch.full_like(w, 1.0 / K), outputs)),
                mean_weight_mse=err(_weighted_sum(w.mean(0, keepdim=True).expand_as(w), outputs)),
                   zero_mse=err(torch.zeros_like(target)),
                   component_mse=torch.stack([err(o) for o in outputs], dim=1))
    return out


def _merge(stats: list) -> dict:
    return {key: torch.cat([s[key] for s in stats]) for key in stats[0]}


def _summary(s: dict) -> dict:
    mean_w = s["weights"].mean(0)
    out = {"samples": int(s["weights"].shape[0]), "entropy": float(s["entropy"].mean()),
           "top_weight": float(s["top_weight"].mean()), "weight_sum": float(s["weight_sum"].mean()),
           "mean_weights": [float(x) for x in mean_w],
           "weight_std": [float(x) for x in s["weights"].std(0, correction=0)],
           "dominant": int(s["share"].mean(0).argmax())}
    if "composed_mse" in s:
        out.update(composed_mse=float(s["composed_mse"].mean()), uniform_mse=float(s["uniform_mse"].mean()),
                   mean_weight_mse=float(s["mean_weight_mse"].mean()),
                   zero_mse=float(s["zero_mse"].mean()),
                   component_mse=[float(x) for x in s["component_mse"].mean(0)])
    return out
