"""Routing diagnostics: does the router specialise, and do the components?

:func:`routing` measures, for observation features grouped by task (and,
optionally, the matching demonstration actions):

- how peaked each sample's weights are: the entropy of ``w`` normalised by
  ``log K`` (1 = uniform, 0 = one component) and the top weight;
- each task's mean weights, their spread over its samples, and the
  component it leans on most;
- with actions: the denoising error (MSE against the training target on one
  forward-process draw) of the composed prediction, of every component
  alone, of the composition with fixed uniform weights ``1/K`` (does the
  router matter?), and of predicting zero (the scale of the target).

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
        ``entropy`` (mean normalised entropy), ``top_weight`` (mean largest
        weight), ``mean_weights`` ``[K]``, ``weight_std`` ``[K]`` (spread over
        the samples), ``dominant`` (argmax of the mean
        weights) and, with actions, ``composed_mse``, ``component_mse`` ``[K]``,
        ``uniform_mse`` and ``zero_mse``.
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
    head = f"{'task':<22}{'entropy':>8}{'top w':>7}  {'mean weights (k=0..' + str(K - 1) + ')':<{6 * K + 2}}dom"
    if has_err:
        head += f"{'mse':>9}{'uniform':>9}{'zero':>8}  each component alone"
    lines = [head]
    rows = list(report["tasks"].items()) + [("(all)", report["overall"])]
    for name, r in rows:
        line = (f"{name:<22}{r['entropy']:>8.3f}{r['top_weight']:>7.3f}  "
                f"{' '.join(f'{w:.3f}' for w in r['mean_weights']):<{6 * K + 2}}k={r['dominant']}")
        if has_err:
            line += (f"{r['composed_mse']:>9.4f}{r['uniform_mse']:>9.4f}{r['zero_mse']:>8.4f}  "
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
    # entr(0) = 0: components a hard or top-k router switches off add nothing.
    entropy = torch.special.entr(w).sum(1) / math.log(K) if K > 1 else torch.zeros_like(w[:, 0])
    out = {"weights": w, "entropy": entropy, "top_weight": w.max(1).values}
    if actions is not None:
        noisy, t, target = policy.noised(actions.to(w.device), generator)
        outputs = list(policy.component_outputs(noisy, t, obs, None))

        def err(pred):
            return ((pred - target) ** 2).flatten(1).mean(1)

        out.update(composed_mse=err(_weighted_sum(w, outputs)),
                   uniform_mse=err(_weighted_sum(torch.full_like(w, 1.0 / K), outputs)),
                   zero_mse=err(torch.zeros_like(target)),
                   component_mse=torch.stack([err(o) for o in outputs], dim=1))
    return out


def _merge(stats: list) -> dict:
    return {key: torch.cat([s[key] for s in stats]) for key in stats[0]}


def _summary(s: dict) -> dict:
    mean_w = s["weights"].mean(0)
    out = {"samples": int(s["weights"].shape[0]), "entropy": float(s["entropy"].mean()),
           "top_weight": float(s["top_weight"].mean()), "mean_weights": [float(x) for x in mean_w],
           "weight_std": [float(x) for x in s["weights"].std(0, correction=0)], "dominant": int(mean_w.argmax())}
    if "composed_mse" in s:
        out.update(composed_mse=float(s["composed_mse"].mean()), uniform_mse=float(s["uniform_mse"].mean()),
                   zero_mse=float(s["zero_mse"].mean()),
                   component_mse=[float(x) for x in s["component_mse"].mean(0)])
    return out
