"""The unsaturated MetaWorld protocol: can it show whether factorization pays? (run_all.py's default)

    python benchmarks/metaworld/run_all.py            # the full protocol (hours on 2 cores: docs/metaworld.md)
    python benchmarks/metaworld/run_all.py --resume   # go on with an interrupted run (same --out)
    python benchmarks/metaworld/run_all.py --quick    # a tiny dry run of every stage (CI's smoke path)

The MT6 protocol (``run_all.py --protocol mt6``) saturates: three of its six tasks sit at
98.7-100 % in both arms, so at most three carry information. This one (issue 24):

- **tasks**: ``TASKS``, the MT10 of the FDP authors' later code, goal-observable state, **no task id**
  (the 10 task-id features of mw_common stay 0, so routing has to come from the state);
- **data**: ``n_demos`` (20) scripted-expert demos per task; **training**: ``steps`` (10k) at batch 256;
  observations min/max-normalised on the demos, actions by the action space's [-1, 1];
- **calibration gate**, before the arms: the monolithic policy, seed 0, lr ``lrs[0]``, must land in
  ``GATE`` (35-70 % mean success). Above it, the demos drop to ``fallback_demos`` (10) per task and
  the gate is measured again; the JSON records which count the arms use and both gate results. Below
  it the run goes on and says so (the issue names no remedy for that side);
- **arms**: the parameter-matched monolithic policy, factorized ``soft`` and factorized ``tanh``
  (``ARMS``), each at every lr of ``lrs`` (1e-3, 3e-3) on seed 0; each arm's lr is the one with the
  higher seed-0 success (both reported), and seeds 1.. run at that lr only (the calibration run is
  the monolithic arm's seed-0 run at ``lrs[0]``: same data, seed and lr);
- **evaluation**: ``episodes`` (30) unseen variations per task, episodes capped at ``max_steps`` (500,
  the step cap the scripted experts get in mw_common.run_expert);
- **metrics**: per factorized arm, the per-seed paired difference factorized - monolithic (points)
  with a 95 % t-interval, the failure-rate ratio (monolithic failure rate / factorized failure rate,
  > 1 when the factorized arm fails less), and the **mean-weight ablation** on the same checkpoints:
  every sample's router weights replaced by their mean over the evaluation set (the weights the
  router gave at every sampling call of the arm's own evaluation), its cost in points with a 95 %
  t-interval;
- **criteria** (``CRITERIA``): factorization pays for an arm when its paired difference is at least
  +5 points with the interval's lower bound above 0 **and** the mean-weight ablation costs at least
  5 points (the gain comes through routing).

With ``--adapt`` (off by default: it adds hours to the main run), each arm's checkpoints at its
chosen lr then learn the held-out tasks ``ADAPT_TASKS`` from their demos alone, ``adapt_steps``
steps, with each method of ``ADAPT_METHODS``: factorized ``new-logit`` (fdp's: a new component whose
router output starts where the outputs do not move, ``adapt("router+new")``) and ``copy-reset``
(the FDP authors': a copy of component 0 and a freshly drawn router, ``adapt("router+new")``);
monolithic ``full`` (everything fine-tuned) and ``last-layers`` (the trailing layers whose parameter
count is closest to what the factorized methods train: the same trainable budget). Recorded: new-task
success and forgetting (old-task mean success before - after), per seed and with 95 % t-intervals.

The JSON (default ``benchmarks/results/metaworld-<date>-unsaturated.json``) is rewritten after every
finished job, and records wall time per stage and in total (the budget is measured, not assumed).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mw_common as mw  # noqa: E402

TASKS = ["hammer-v3", "peg-insert-side-v3", "push-wall-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3",
         "shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3"]
# arm name -> router strategy (None: the monolithic K = 1 policy)
ARMS = {"monolithic": None, "factorized-soft": "soft", "factorized-tanh": "tanh"}
MONOLITHIC = "monolithic"
GATE = (0.35, 0.70)
# Held-out tasks for --adapt: outside MT10, scripted experts that succeed (the MT6 protocol's adaptation set).
ADAPT_TASKS = ["door-close-v3", "drawer-close-v3", "window-open-v3"]
ADAPT_METHODS = {True: ("new-logit", "copy-reset"), False: ("full", "last-layers")}
CRITERIA = {"min_gain_points": 5.0, "min_ablation_cost_points": 5.0}

# Two-sided 95 % quantiles of Student's t (0.975 quantile) for 1..30 degrees of freedom.
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


@dataclass
class Config:
    n_demos: int = 20
    fallback_demos: int = 10
    steps: int = 10_000
    batch_size: int = 256
    lrs: tuple = (1e-3, 3e-3)
    seeds: tuple = (0, 1, 2, 3, 4)
    K: int = 4
    hidden: int = 128
    num_blocks: int = 2
    ema_decay: float = 0.995
    episodes: int = 30
    max_steps: int = 500
    envs_per_task: int = 5
    tasks: tuple = tuple(TASKS)
    adapt_tasks: tuple = tuple(ADAPT_TASKS)
    adapt_steps: int = 2000
    cache_dir: str = mw.DEFAULT_CACHE
    progress: bool = False
    gate: tuple = GATE


# The smoke path: every stage, three tasks (most of a cold run is building MetaWorld's task variations).
QUICK = dict(n_demos=2, fallback_demos=1, steps=20, batch_size=32, seeds=(0, 1), K=2, hidden=16, episodes=1,
             max_steps=24, envs_per_task=1, tasks=("hammer-v3", "push-wall-v3", "coffee-push-v3"),
             adapt_tasks=("door-close-v3",), adapt_steps=10)


# -- statistics (no simulator) --------------------------------------------------------------------------

def t_interval(x) -> dict:
    """Mean of ``x`` with its two-sided 95 % Student-t interval (None bounds for fewer than 2 values)."""
    x = [float(v) for v in x]
    n = len(x)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = float(np.mean(x))
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "sd": None}
    if n - 1 > len(_T975):
        raise ValueError(f"t_interval: at most {len(_T975) + 1} values, got {n}")
    sd = float(np.std(x, ddof=1))
    half = _T975[n - 2] * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def failure_ratio(mono: float, fact: float) -> float | None:
    """Monolithic failure rate over factorized failure rate (> 1: the factorized arm fails less);
    None when the factorized arm never fails (the ratio is unbounded)."""
    f_fact = 1.0 - fact
    return None if f_fact <= 0 else (1.0 - mono) / f_fact


def gate_verdict(success: float, gate=GATE) -> str:
    """Where the calibration run landed: ``"in"``, ``"above"`` or ``"below"`` the gate."""
    lo, hi = gate
    return "above" if success > hi else "below" if success < lo else "in"


def pick_lr(seed0: dict) -> float:
    """The lr with the higher seed-0 mean success (ties: the smaller lr); ``seed0 = {lr: mean success}``."""
    return max(sorted(seed0), key=lambda lr: (seed0[lr], -lr))


def arm_metrics(mono_by_seed: dict, fact_by_seed: dict, ablated_by_seed: dict) -> dict:
    """Paired metrics of one factorized arm; each argument maps seed -> mean success (0..1)."""
    seeds = sorted(set(mono_by_seed) & set(fact_by_seed))
    diff = t_interval([100 * (fact_by_seed[s] - mono_by_seed[s]) for s in seeds])
    ab_seeds = sorted(set(fact_by_seed) & set(ablated_by_seed))
    cost = t_interval([100 * (fact_by_seed[s] - ablated_by_seed[s]) for s in ab_seeds])
    mono = float(np.mean([mono_by_seed[s] for s in seeds])) if seeds else None
    fact = float(np.mean([fact_by_seed[s] for s in seeds])) if seeds else None
    pays_gain = diff["low"] is not None and diff["mean"] >= CRITERIA["min_gain_points"] and diff["low"] > 0
    pays_routing = cost["mean"] is not None and cost["mean"] >= CRITERIA["min_ablation_cost_points"]
    return {"paired_seeds": seeds, "difference_points": diff,
            "failure_rate_ratio": None if mono is None else failure_ratio(mono, fact),
            "mean_weight_ablation_cost_points": cost, "gain_met": pays_gain, "through_routing_met": pays_routing,
            "factorization_pays": bool(pays_gain and pays_routing)}


def strategy_comparison(arms: dict) -> dict | None:
    """Paired ``tanh`` - ``soft`` over the seeds both factorized arms have (points, 95 % t-interval), and the
    strategy the data shows better: the one ahead when the interval excludes 0, else None (no difference shown).
    This is what the library's default strategy follows."""
    if "factorized-soft" not in arms or "factorized-tanh" not in arms:
        return None
    soft = {int(s): v for s, v in arms["factorized-soft"]["mean_success_by_seed"].items()}
    tanh = {int(s): v for s, v in arms["factorized-tanh"]["mean_success_by_seed"].items()}
    seeds = sorted(set(soft) & set(tanh))
    diff = t_interval([100 * (tanh[s] - soft[s]) for s in seeds])
    shown = None
    if diff["low"] is not None and diff["low"] > 0:
        shown = "tanh"
    elif diff["high"] is not None and diff["high"] < 0:
        shown = "soft"
    return {"paired_seeds": seeds, "tanh_minus_soft_points": diff, "better_strategy_shown": shown}


# -- the mean-weight ablation ----------------------------------------------------------------------------

@torch.no_grad()
def constant_router(policy, mean_weights: torch.Tensor):
    """A copy of ``policy`` whose router gives ``mean_weights [K]`` for every observation, under its own
    strategy: the last layer's weight is zeroed and its bias set to the logits that give those weights
    (``soft``: log w, a softmax's inverse up to a constant; ``tanh``: atanh w). The router's output stays
    signed and unnormalised where the strategy's is, which ``"fixed"`` (non-negative, summing to 1)
    could not hold."""
    p = copy.deepcopy(policy)
    w = mean_weights.to(torch.float64)
    strategy = p.router.strategy
    if strategy == "soft":
        if not bool((w > 0).all()):
            raise ValueError(f"softmax mean weights must be positive, got {w.tolist()}")
        logits = w.log()
    elif strategy == "tanh":
        if not bool((w.abs() < 1).all()):
            raise ValueError(f"tanh mean weights must lie in (-1, 1), got {w.tolist()}")
        logits = torch.atanh(w)
    else:
        raise ValueError(f"constant_router serves the soft and tanh strategies, got {strategy!r}")
    last = p.router.net[2]
    last.weight.zero_()
    last.bias.copy_(logits.to(last.bias.dtype))
    return p


class WeightRecorder:
    """Records the router weights of every call (every sampling call of an evaluation)."""

    def __init__(self, policy):
        self.rows = []
        self._h = policy.router.register_forward_hook(lambda m, args, out: self.rows.append(out.detach().cpu()))

    def close(self) -> torch.Tensor:
        self._h.remove()
        return torch.cat(self.rows) if self.rows else torch.empty(0)


# -- data, training, one job -----------------------------------------------------------------------------

# Actions are normalised by MetaWorld's action space, [-1, 1] per dimension (the scripted experts' actions are
# clipped to it), not by the demos' min/max: the held-out tasks of --adapt then fit the same map.
ACTION_RANGE = (-1.0, 1.0)


class Data:
    """The protocol's demos (``n_demos`` per task), the observation normaliser fit on them (actions: the
    action space's range), and the dataset without task id."""

    def __init__(self, cfg: Config, n_demos: int, log=print):
        self.n_demos = n_demos
        self.demos = mw.get_demos(cfg.cache_dir, list(cfg.tasks), n_demos, log=log)
        self.obs_norm, _ = mw.fit_normalizers(self.demos)
        self.act_norm = mw.Normalizer(np.full(mw.ACTION_DIM, ACTION_RANGE[0], np.float32),
                                      np.full(mw.ACTION_DIM, ACTION_RANGE[1], np.float32))
        self.vecs = {n: d["rand_vecs"] for n, d in self.demos.items()}
        self.cond, self.actions = mw.build_dataset(self.demos, list(cfg.tasks), self.obs_norm, self.act_norm,
                                                   task_id=False)


def build_policy(arm: str, cfg: Config):
    strategy = ARMS[arm]
    if strategy is None:
        return mw.make_policy(1, mw.matched_hidden(cfg.K, cfg.hidden, cfg.num_blocks), cfg.num_blocks)
    return mw.make_policy(cfg.K, cfg.hidden, cfg.num_blocks, strategy=strategy)


def _mean_success(r: dict) -> float:
    return float(np.mean([v["success_rate"] for v in r.values()]))


def run_job(job: dict) -> dict:
    """Train one (arm, lr, seed), evaluate it and, for a factorized arm, its mean-weight ablation."""
    torch.set_num_threads(1)
    cfg, arm, lr, seed = job["cfg"], job["arm"], job["lr"], job["seed"]
    data = Data(cfg, job["n_demos"], log=lambda *a: None)
    torch.manual_seed(seed)
    policy = build_policy(arm, cfg)
    out = {"arm": arm, "lr": lr, "seed": seed, "n_demos": job["n_demos"], "params": mw.num_params(policy),
           "wall_s": {}}
    t = mw.timer()
    ema, curve = mw.train(policy, data.cond, data.actions, policy.parameters(), cfg.steps, cfg.batch_size, lr, seed,
                          desc=f"{arm} lr{lr:g} s{seed}", ema_decay=cfg.ema_decay, progress=cfg.progress)
    out["wall_s"]["train"], out["loss_curve"] = t(), curve
    os.makedirs(os.path.dirname(ckpt_path(cfg, arm, lr, seed, job["n_demos"])), exist_ok=True)
    torch.save(ema, ckpt_path(cfg, arm, lr, seed, job["n_demos"]))
    ev = dict(n_episodes=cfg.episodes, max_steps=cfg.max_steps, envs_per_task=cfg.envs_per_task,
              obs_norm=data.obs_norm, act_norm=data.act_norm, exclude_vecs=data.vecs, progress=cfg.progress,
              task_id=False, seed=seed)
    t = mw.timer()
    rec = WeightRecorder(ema) if ARMS[arm] else None
    r = mw.evaluate(ema, list(cfg.tasks), desc=f"{arm} s{seed} eval", **ev)
    out["wall_s"]["eval"] = t()
    out["success"] = {n: r[n]["success_rate"] for n in cfg.tasks}
    out["episode_lengths"] = {n: r[n]["mean_length"] for n in cfg.tasks}
    out["mean_success"] = _mean_success(r)
    if rec is not None:
        w = rec.close()
        wbar = w.double().mean(0)
        out["eval_weights"] = {"samples": int(w.shape[0]), "mean": wbar.tolist(),
                               "std": w.double().std(0, correction=0).tolist(),
                               "row_sum_mean": float(w.double().sum(1).mean())}
        t = mw.timer()
        r = mw.evaluate(constant_router(ema, wbar), list(cfg.tasks), desc=f"{arm} s{seed} mean-weight", **ev)
        out["wall_s"]["ablation_eval"] = t()
        out["ablated_success"] = {n: r[n]["success_rate"] for n in cfg.tasks}
        out["ablated_mean_success"] = _mean_success(r)
        import fdp.diagnostics

        n_max = 200  # evenly spaced demo samples per task
        obs, acts = {}, {}
        for task in cfg.tasks:
            c, a = mw.build_dataset({task: data.demos[task]}, [task], data.obs_norm, data.act_norm, task_id=False)
            idx = torch.linspace(0, len(c) - 1, min(n_max, len(c))).long()
            obs[task], acts[task] = c[idx], a[idx]
        out["diagnostics"] = fdp.diagnostics.routing(ema, obs, acts, generator=torch.Generator().manual_seed(seed))
    return out


# -- adaptation (--adapt) ----------------------------------------------------------------------------------

def ckpt_path(cfg: Config, arm: str, lr: float, seed: int, n_demos: int) -> str:
    return os.path.join(cfg.cache_dir, "ckpt", f"unsat-{arm}-lr{lr:g}-s{seed}-{n_demos}demos-{cfg.steps}steps-"
                        f"K{cfg.K}h{cfg.hidden}b{cfg.num_blocks}.pt")


def trailing_layers(component, budget: int) -> tuple[list, int]:
    """The component's last layers, from the output back (``out``, then each residual block's second
    and first linear), whose parameter count is closest to ``budget``; returns (modules, count)."""
    order = [component.out]
    for a, b in zip(reversed(component.blocks_a), reversed(component.blocks_b)):
        order += [b, a]
    best, total, taken = ([], 0), 0, []
    for m in order:
        taken.append(m)
        total += mw.num_params(m)
        if abs(total - budget) < abs(best[1] - budget) or not best[0]:
            best = (list(taken), total)
    return best


def factorized_budget(cfg: Config) -> int:
    """What a factorized arm's adaptation trains: one new component and the grown router."""
    p = build_policy("factorized-soft", cfg)
    p.add_component(mw.make_component(cfg.hidden, cfg.num_blocks))
    return sum(q.numel() for q in p.adapt("router+new"))


def prepare_adaptation(policy, method: str, cfg: Config) -> list:
    """Grow or unfreeze ``policy`` (a copy: changed in place) as ``method`` says; returns what trains."""
    policy.requires_grad_(True)
    if method == "new-logit":
        policy.add_component(mw.make_component(cfg.hidden, cfg.num_blocks))
        return policy.adapt("router+new")
    if method == "copy-reset":
        policy.add_component(source=0, reset_router=True)
        return policy.adapt("router+new")
    if method == "full":
        return policy.adapt("full")
    if method == "last-layers":
        policy.requires_grad_(False)
        modules, _ = trailing_layers(policy.components[0], factorized_budget(cfg))
        for m in modules:
            m.requires_grad_(True)
        return [q for q in policy.parameters() if q.requires_grad]
    raise ValueError(f"unknown adaptation method {method!r}")


def run_adapt_job(job: dict) -> dict:
    """Adapt one (arm, seed) checkpoint with each of its methods; evaluate new and old tasks."""
    torch.set_num_threads(1)
    cfg, arm, lr, seed = job["cfg"], job["arm"], job["lr"], job["seed"]
    data = Data(cfg, job["n_demos"], log=lambda *a: None)
    new = mw.get_demos(cfg.cache_dir, list(cfg.adapt_tasks), job["n_demos"], log=lambda *a: None)
    cond, actions = mw.build_dataset(new, list(cfg.adapt_tasks), data.obs_norm, data.act_norm, task_id=False)
    trained = torch.load(ckpt_path(cfg, arm, lr, seed, job["n_demos"]), weights_only=False)
    out = {"arm": arm, "lr": lr, "seed": seed, "methods": {}}
    names = list(cfg.tasks) + list(cfg.adapt_tasks)
    for method in ADAPT_METHODS[ARMS[arm] is not None]:
        torch.manual_seed(10_000 + seed)
        policy = copy.deepcopy(trained)
        params = prepare_adaptation(policy, method, cfg)
        t = mw.timer()
        ema, curve = mw.train(policy, cond, actions, params, cfg.adapt_steps, cfg.batch_size, lr, 10_000 + seed,
                              desc=f"{arm} s{seed} adapt {method}", ema_decay=cfg.ema_decay, progress=cfg.progress)
        train_s = t()
        t = mw.timer()
        r = mw.evaluate(ema, names, n_episodes=cfg.episodes, max_steps=cfg.max_steps, envs_per_task=cfg.envs_per_task,
                        obs_norm=data.obs_norm, act_norm=data.act_norm,
                        exclude_vecs={**data.vecs, **{n: d["rand_vecs"] for n, d in new.items()}},
                        progress=cfg.progress, task_id=False, seed=seed, desc=f"{arm} s{seed} adapted {method}")
        out["methods"][method] = {
            "new": {n: r[n]["success_rate"] for n in cfg.adapt_tasks},
            "old": {n: r[n]["success_rate"] for n in cfg.tasks},
            "trainable_params": sum(q.numel() for q in params), "params": mw.num_params(policy),
            "wall_s": {"train": train_s, "eval": t()}, "loss_curve": curve}
    return out


def summarize_adaptation(res: dict, cfg: Config) -> None:
    """New-task success and forgetting per arm and method, over the seeds done (points, 95 % t-intervals)."""
    summary = {}
    for key, r in res.get("adaptation_runs", {}).items():
        arm, seed = r["arm"], r["seed"]
        before = res["runs"][_key(arm, r["lr"], seed)]["mean_success"]
        for method, m in r["methods"].items():
            d = summary.setdefault(arm, {}).setdefault(method, {"new_by_seed": {}, "forgetting_by_seed": {},
                                                                "trainable_params": m["trainable_params"]})
            d["new_by_seed"][str(seed)] = float(np.mean(list(m["new"].values())))
            d["forgetting_by_seed"][str(seed)] = 100 * (before - float(np.mean(list(m["old"].values()))))
    for arm, methods in summary.items():
        for d in methods.values():
            d["new_points"] = t_interval([100 * v for v in d["new_by_seed"].values()])
            d["forgetting_points"] = t_interval(list(d["forgetting_by_seed"].values()))
    res["adaptation"] = summary


# -- the run ---------------------------------------------------------------------------------------------

def _resumable(out: str, res: dict) -> dict | None:
    """The results already in ``out`` when they were made with this configuration (None: no file)."""
    if not os.path.exists(out):
        return None
    with open(out) as fh:
        previous = json.load(fh)
    ignore = ("n_demos_used", "adapt")
    mine = {k: v for k, v in json.loads(json.dumps(res["config"])).items() if k not in ignore}
    theirs = {k: v for k, v in previous.get("config", {}).items() if k not in ignore}
    if previous.get("protocol") != res["protocol"] or mine != theirs or "n_demos_used" not in previous["config"]:
        raise SystemExit(f"--resume: {out} holds results of another configuration (or no finished gate); "
                         "choose another --out")
    return previous


def _key(arm, lr, seed):
    return f"{arm}|lr{lr:g}|s{seed}"


def summarize(res: dict, cfg: Config) -> None:
    """Fill ``res``'s arms, chosen lrs, metrics and criteria from its finished runs."""
    runs = res["runs"]
    s0 = cfg.seeds[0]
    chosen = {}
    for arm in ARMS:
        seed0 = {lr: runs[_key(arm, lr, s0)]["mean_success"] for lr in cfg.lrs if _key(arm, lr, s0) in runs}
        res["seed0_by_lr"][arm] = {f"{lr:g}": v for lr, v in seed0.items()}
        if len(seed0) == len(cfg.lrs):
            chosen[arm] = pick_lr(seed0)
    res["chosen_lr"] = {a: lr for a, lr in chosen.items()}
    arms = {}
    for arm, lr in chosen.items():
        by_seed = {s: runs[_key(arm, lr, s)] for s in cfg.seeds if _key(arm, lr, s) in runs}
        per_task = {n: [r["success"][n] for r in by_seed.values()] for n in cfg.tasks}
        arms[arm] = {"lr": lr, "seeds": sorted(by_seed),
                     "mean_success_by_seed": {str(s): r["mean_success"] for s, r in by_seed.items()},
                     "mean_success": t_interval([r["mean_success"] for r in by_seed.values()]),
                     "per_task_mean": {n: float(np.mean(v)) for n, v in per_task.items() if v},
                     "per_task_std": {n: float(np.std(v)) for n, v in per_task.items() if v}}
        if ARMS[arm]:
            arms[arm]["ablated_mean_success_by_seed"] = {str(s): r["ablated_mean_success"] for s, r in by_seed.items()}
            arms[arm]["ablated_per_task_mean"] = {n: float(np.mean([r["ablated_success"][n] for r in by_seed.values()]))
                                                  for n in cfg.tasks} if by_seed else {}
    res["arms"] = arms
    mono = arms.get(MONOLITHIC)
    res["metrics"] = {}
    if mono is not None:
        mono_by_seed = {int(s): v for s, v in mono["mean_success_by_seed"].items()}
        for arm, a in arms.items():
            if ARMS[arm]:
                fact = {int(s): v for s, v in a["mean_success_by_seed"].items()}
                ablated = {int(s): v for s, v in a["ablated_mean_success_by_seed"].items()}
                res["metrics"][arm] = arm_metrics(mono_by_seed, fact, ablated)
    res["strategies"] = strategy_comparison(arms)
    paying = [a for a, m in res["metrics"].items() if m["factorization_pays"]]
    complete = mono is not None and all(len(a["seeds"]) == len(cfg.seeds) for a in arms.values()) \
        and len(arms) == len(ARMS)
    res["criteria"] = {**CRITERIA, "complete": complete, "arms_where_factorization_pays": paying,
                       "factorization_pays": bool(paying) if complete else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny dry run of every stage (CI's smoke path): "
                    + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process and one torch thread each "
                    "(default 2: both cores of the reference machine)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default benchmarks/results/metaworld-<date>-unsaturated[-quick].json)")
    ap.add_argument("--cache-dir", default=mw.DEFAULT_CACHE)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--tasks", nargs="+", default=None, help="a subset of the protocol's tasks (smoke runs)")
    ap.add_argument("--plot", default=None, help="also write the per-task success plot (PNG) here")
    ap.add_argument("--adapt", action="store_true", help="then adapt each arm to the held-out tasks with each "
                    "method of ADAPT_METHODS (off by default: it adds hours; --resume adds it to a finished run)")
    ap.add_argument("--adapt-seeds", type=int, nargs="+", default=None,
                    help="with --adapt: adapt only these seeds' checkpoints (default: every seed)")
    ap.add_argument("--resume", action="store_true",
                    help="keep what the results JSON (--out) already holds for this configuration (the gate, every "
                         "finished run and adaptation) and run only the rest, e.g. --adapt after a finished run")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    kw = dict(QUICK) if args.quick else {}
    if args.seeds:
        kw["seeds"] = tuple(args.seeds)
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(TASKS))
        if unknown:
            ap.error(f"--tasks: not tasks of the protocol: {unknown}")
        kw["tasks"] = tuple(args.tasks)
    cfg = Config(cache_dir=args.cache_dir, progress=not args.no_progress and args.jobs == 1, **kw)
    if len(cfg.seeds) < 2:
        ap.error("--seeds: the paired t-interval needs at least 2 seeds")
    torch.set_num_threads(1)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(repo, "benchmarks", "results",
                                   f"metaworld-{date}-unsaturated{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    total = mw.timer()
    import run_all  # versions(): the same record as the MT6 protocol's

    res = {"protocol": "unsaturated", "schema": 1, "quick": args.quick, "date": date,
           "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], repo)] + sys.argv[1:]),
           "versions": run_all.versions(),
           "hardware": {"cpu_count": os.cpu_count(), "parallel_jobs": args.jobs, "cpu_threads_per_job": 1,
                        "device": "cpu"},
           "config": {**{k: v for k, v in asdict(cfg).items() if k != "progress"},
                      "task_id": False, "observations": "goal-observable state, 2 stacked (t-1, t)",
                      "sampler": "fdp.Sampler, DDIM 10 steps, eta 0, backend torch",
                      "train_scheduler": "DDPM 100 steps, squaredcos_cap_v2, clip_sample, epsilon",
                      "horizon": mw.HORIZON, "n_action_steps": mw.N_ACTION_STEPS, "arms": ARMS},
           "gate": {}, "params": {}, "seed0_by_lr": {}, "chosen_lr": {}, "runs": {}, "arms": {}, "metrics": {},
           "criteria": {}, "wall_time_s": {"demos": {}, "runs": {}, "total": None}}

    def write():
        summarize(res, cfg)
        summarize_adaptation(res, cfg)
        res["wall_time_s"]["total"] = total()
        with open(out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(out + ".tmp", out)

    def record(r):
        k = _key(r["arm"], r["lr"], r["seed"])
        res["runs"][k] = r
        res["wall_time_s"]["runs"][k] = r["wall_s"]
        log(f"   {k}: mean success {r['mean_success']:.3f}"
            + (f", mean-weight ablation {r['ablated_mean_success']:.3f}" if "ablated_mean_success" in r else ""))
        write()

    for arm in ARMS:
        p = build_policy(arm, cfg)
        res["params"][arm] = {"K": p.num_components, "hidden": p.components[0].hidden_dim, "params": mw.num_params(p)}

    previous = _resumable(out, res) if args.resume else None
    if previous is not None:
        for key in ("gate", "normalizer", "runs", "seed0_by_lr", "chosen_lr", "adaptation_runs"):
            if key in previous:
                res[key] = previous[key]
        res["config"]["n_demos_used"] = n_demos = previous["config"]["n_demos_used"]
        for key in ("demos", "runs", "adaptation"):
            if key in previous["wall_time_s"]:
                res["wall_time_s"][key] = previous["wall_time_s"][key]
        # Every earlier sitting's time (a run resumed twice keeps both).
        res["wall_time_s"]["before_resume"] = sum(previous["wall_time_s"].get(k) or 0 for k in ("total", "before_resume"))
        log(f"== resuming {out}: {len(res['runs'])} runs and {len(res.get('adaptation_runs', {}))} adaptations kept")
    # Calibration gate: the monolithic arm's seed-0 run at lrs[0].
    for attempt in (() if previous is not None else (cfg.n_demos, cfg.fallback_demos)):
        n_demos = attempt
        t = mw.timer()
        log(f"== demos: {n_demos} per task ({len(cfg.tasks)} tasks)")
        d = Data(cfg, n_demos, log=log)
        res["normalizer"] = {"obs": d.obs_norm.state(), "action": d.act_norm.state()}
        res["wall_time_s"]["demos"][str(n_demos)] = t()
        log(f"== calibration gate: {MONOLITHIC}, seed {cfg.seeds[0]}, lr {cfg.lrs[0]:g}, {n_demos} demos per task")
        r = run_job({"cfg": cfg, "arm": MONOLITHIC, "lr": cfg.lrs[0], "seed": cfg.seeds[0], "n_demos": n_demos})
        verdict = gate_verdict(r["mean_success"], cfg.gate)
        res["gate"][str(n_demos)] = {"mean_success": r["mean_success"], "verdict": verdict}
        log(f"   gate at {n_demos} demos: {r['mean_success']:.3f} ({verdict} {cfg.gate})")
        if verdict != "above" or attempt == cfg.fallback_demos:
            break
    if previous is None:
        res["gate"].update(range=list(cfg.gate), demos_used=n_demos, passed=verdict == "in", note={
            "in": "the arms run on this demo count",
            "below": "below the gate: the arms run anyway, the results are read with that in mind",
            "above": "above the gate even with the fallback demo count: the arms run anyway"}[verdict])
        res["config"]["n_demos_used"] = n_demos
        record(r)

    def jobs_for(pairs):
        return [{"cfg": cfg, "arm": a, "lr": lr, "seed": s, "n_demos": n_demos} for a, lr, s in pairs]

    def run_all_jobs(jobs, fn=run_job, done=record):
        if args.jobs == 1 or len(jobs) <= 1:  # a resumed stage may have nothing left
            for j in jobs:
                done(fn(j))
            return
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs)), maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(fn, jobs):
                done(r)

    def record_adaptation(r):
        res.setdefault("adaptation_runs", {})[_key(r["arm"], r["lr"], r["seed"])] = r
        res["wall_time_s"].setdefault("adaptation", {})[_key(r["arm"], r["lr"], r["seed"])] = {
            m: v["wall_s"] for m, v in r["methods"].items()}
        log(f"   adapted {_key(r['arm'], r['lr'], r['seed'])}: " + ", ".join(
            f"{m} new {np.mean(list(v['new'].values())):.3f} old {np.mean(list(v['old'].values())):.3f}"
            for m, v in r["methods"].items()))
        write()

    s0 = cfg.seeds[0]
    log("== seed 0: every arm at every lr")
    run_all_jobs(jobs_for([(a, lr, s0) for a in ARMS for lr in cfg.lrs if _key(a, lr, s0) not in res["runs"]]))
    summarize(res, cfg)
    log("== chosen lr per arm (seed 0): " + ", ".join(f"{a} {lr:g}" for a, lr in res["chosen_lr"].items()))
    run_all_jobs(jobs_for([(a, res["chosen_lr"][a], s) for s in cfg.seeds[1:] for a in ARMS
                           if _key(a, res["chosen_lr"][a], s) not in res["runs"]]))
    write()
    if args.adapt:
        log(f"== adaptation to {', '.join(cfg.adapt_tasks)}")
        res["config"]["adapt"] = {"tasks": list(cfg.adapt_tasks), "steps": cfg.adapt_steps,
                                  "methods": {a: list(ADAPT_METHODS[ARMS[a] is not None]) for a in ARMS},
                                  "factorized_trainable_budget": factorized_budget(cfg)}
        Data(cfg, n_demos, log=log)
        mw.get_demos(cfg.cache_dir, list(cfg.adapt_tasks), n_demos, log=log)
        seeds = [s for s in cfg.seeds if args.adapt_seeds is None or s in args.adapt_seeds]
        res["config"]["adapt"]["seeds"] = seeds
        done = res.get("adaptation_runs", {})
        run_all_jobs(jobs_for([(a, res["chosen_lr"][a], s) for s in seeds for a in ARMS
                               if _key(a, res["chosen_lr"][a], s) not in done]), run_adapt_job, record_adaptation)
    if args.plot:
        import report

        report.plot_unsaturated(res, args.plot)
    for arm, m in res["metrics"].items():
        d = m["difference_points"]
        c = m["mean_weight_ablation_cost_points"]
        log(f"== {arm} - {MONOLITHIC}: {d['mean']:+.1f} points [{d['low']:+.1f}, {d['high']:+.1f}], "
            f"mean-weight ablation costs {c['mean']:+.1f} points -> pays: {m['factorization_pays']}")
    log(f"== done in {total()} s -> {out}")
    return res


if __name__ == "__main__":
    main()
