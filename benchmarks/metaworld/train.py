"""Train (and adapt) factorized and monolithic diffusion policies on MetaWorld demonstrations.

    python benchmarks/metaworld/train.py --variant factorized --seed 0 [--steps 3000 ...]
    python benchmarks/metaworld/train.py --variant monolithic --seed 0 --adapt [...]

One variant, one seed: multitask training on the 6 multitask tasks, optionally followed by
adaptation on the 4 new tasks (``--adapt``), with checkpoints under ``--cache-dir/ckpt``.
``run_all.py`` runs every variant and seed, evaluates them and writes the results JSON.

Variants (``VARIANTS``; append ``-notid`` to any for observations without the task id):

- factorized: ``fdp.FactorizedPolicy`` with K MLP components (hidden ``--hidden``) and a soft
  router, the paper's loss; adaptation adds one component (same width), ``policy.adapt("router+new")``.
- factorized-spec: the same, trained with the specialisation terms of ``policy.loss``
  (``--component-weight``, ``--balance-weight``).
- factorized-spec-topk: factorized-spec with renormalised top-``--topk`` routing in training and
  sampling.
- monolithic: the same class with K = 1 and the hidden width that matches the factorized
  policy's parameter count; adaptation fine-tunes everything (``policy.adapt("full")``).

All get the same steps, batch size, learning rate and schedule, data and EMA.

Adaptation methods (``ADAPT_METHODS``): ``new-logit`` (the new component's router logit starts
at ``--new-logit``), ``mean-row`` (the new router row starts at the mean of the old rows, so the
new component starts with an average logit), each optionally ``+replay`` (``--replay-fraction``
of every batch drawn from the multitask tasks' demos); the monolithic policy has ``full`` and
``full+replay``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mw_common as mw  # noqa: E402


BASE_VARIANTS = {
    # name: (K > 1, specialisation loss, router strategy)
    "factorized": (True, False, "soft"),
    "factorized-spec": (True, True, "soft"),
    "factorized-spec-topk": (True, True, "topk"),
    "monolithic": (False, False, "soft"),
}
NO_TASK_ID = "-notid"
VARIANTS = tuple(BASE_VARIANTS) + tuple(v + NO_TASK_ID for v in BASE_VARIANTS)
ADAPT_METHODS = {True: ("new-logit", "mean-row", "new-logit+replay", "mean-row+replay"),
                 False: ("full", "full+replay")}


@dataclass(frozen=True)
class Variant:
    name: str
    factorized: bool
    specialise: bool
    strategy: str
    task_id: bool


def variant(name: str) -> Variant:
    base = name[:-len(NO_TASK_ID)] if name.endswith(NO_TASK_ID) else name
    if base not in BASE_VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {VARIANTS}")
    return Variant(name, *BASE_VARIANTS[base], task_id=base == name)


@dataclass
class Config:
    n_demos: int = 40
    K: int = 4
    hidden: int = 128
    num_blocks: int = 2
    steps: int = 20000
    adapt_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.995
    # Router logit of the component added for adaptation. fdp's default (-20) leaves the policy
    # unchanged when the component is added, but its gradients (~exp(-20)) then sit below AdamW's
    # eps (1e-8) and the new component never trains (measured: loss flat for 600 steps); -4 gives
    # it ~1% weight at the start, small enough to barely move the old outputs, large enough to train.
    new_logit: float = -4.0
    # Weights of the specialisation terms of policy.loss for the "-spec" variants (the values of the
    # probe that made routing specialise on MT6), and the top-k of the "-topk" variant.
    component_weight: float = 1.0
    balance_weight: float = 0.1
    # The balance term in adaptation: on a batch of new-task data alone it would push weight onto
    # the frozen old components, so it is off there by default (the component term stays).
    adapt_balance_weight: float = 0.0
    topk: int = 2
    # Share of every adaptation batch drawn from the multitask demos in the "+replay" methods.
    replay_fraction: float = 0.1
    # Learning-rate multiplier of the router's parameters (an ablation; 1 = the same lr for everything).
    router_lr_mult: float = 1.0
    cache_dir: str = mw.DEFAULT_CACHE
    progress: bool = True


def build_policy(name: str, cfg: Config):
    v = variant(name)
    if v.factorized:
        return mw.make_policy(cfg.K, cfg.hidden, cfg.num_blocks, strategy=v.strategy, topk=cfg.topk)
    return mw.make_policy(1, mw.matched_hidden(cfg.K, cfg.hidden, cfg.num_blocks), cfg.num_blocks)


def loss_kwargs(name: str, cfg: Config, adaptation: bool = False) -> dict:
    if not variant(name).specialise:
        return {}
    return {"component_weight": cfg.component_weight,
            "balance_weight": cfg.adapt_balance_weight if adaptation else cfg.balance_weight}


class Data:
    """Demos, normalisers (fit on all 10 tasks' demos, fixed for training and adaptation) and datasets."""

    def __init__(self, cfg: Config, log=print):
        self.demos = mw.get_demos(cfg.cache_dir, mw.ALL_TASKS, cfg.n_demos, log=log)
        self.obs_norm, self.act_norm = mw.fit_normalizers(self.demos)
        self.demo_vecs = {name: d["rand_vecs"] for name, d in self.demos.items()}
        self._sets = {}

    def dataset(self, names, task_id: bool = True):
        """(cond, actions) of the demos of ``names``, built once per (names, task_id)."""
        key = (tuple(names), task_id)
        if key not in self._sets:
            self._sets[key] = mw.build_dataset(self.demos, names, self.obs_norm, self.act_norm, task_id)
        return self._sets[key]


def train_multitask(name: str, seed: int, cfg: Config, data: Data):
    torch.manual_seed(seed)
    policy = build_policy(name, cfg)
    cond, actions = data.dataset(mw.MT_TASKS, variant(name).task_id)
    params = list(policy.parameters())
    if cfg.router_lr_mult != 1.0:
        router = set(map(id, policy.router.parameters()))
        params = [{"params": [p for p in params if id(p) in router], "lr": cfg.lr * cfg.router_lr_mult},
                  {"params": [p for p in params if id(p) not in router]}]
    t = mw.timer()
    ema, curve = mw.train(policy, cond, actions, params, cfg.steps, cfg.batch_size, cfg.lr, seed,
                          desc=f"{name} s{seed} multitask", ema_decay=cfg.ema_decay, progress=cfg.progress,
                          loss_kwargs=loss_kwargs(name, cfg))
    return ema, {"train_s": t(), "loss_curve": curve, "params": mw.num_params(policy),
                 "hidden": policy.components[0].hidden_dim, "K": policy.num_components}


def adapt(name: str, policy, seed: int, cfg: Config, data: Data, method: str | None = None):
    """Adapt a multitask policy to the 4 new tasks (a copy; ``policy`` is left as it is).

    ``method``: one of ``ADAPT_METHODS`` for the variant (default: the first, the earlier benchmark's).
    """
    import copy

    v = variant(name)
    method = ADAPT_METHODS[v.factorized][0] if method is None else method
    if method not in ADAPT_METHODS[v.factorized]:
        raise ValueError(f"{name}: adaptation method must be one of {ADAPT_METHODS[v.factorized]}, got {method!r}")
    torch.manual_seed(10_000 + seed)
    policy = copy.deepcopy(policy)
    params = prepare_adaptation(policy, v, cfg, method)
    n_trainable = sum(p.numel() for p in params)
    cond, actions = data.dataset(mw.ADAPT_TASKS, v.task_id)
    replay = (*data.dataset(mw.MT_TASKS, v.task_id), cfg.replay_fraction) if method.endswith("+replay") else None
    t = mw.timer()
    ema, curve = mw.train(policy, cond, actions, params, cfg.adapt_steps, cfg.batch_size, cfg.lr, 10_000 + seed,
                          desc=f"{name} s{seed} adapt {method}", ema_decay=cfg.ema_decay, progress=cfg.progress,
                          loss_kwargs=loss_kwargs(name, cfg, adaptation=True), replay=replay)
    return ema, {"train_s": t(), "loss_curve": curve, "params": mw.num_params(policy),
                 "trainable_params": n_trainable, "K": policy.num_components}


def prepare_adaptation(policy, v: Variant, cfg: Config, method: str):
    """Grow a factorized policy by one component, started as ``method`` says; return what trains."""
    policy.requires_grad_(True)
    if not v.factorized:
        return policy.adapt("full")
    policy.add_component(mw.make_component(cfg.hidden, cfg.num_blocks), initial_logit=cfg.new_logit)
    if method.startswith("mean-row"):
        out = policy.router.net[2]
        with torch.no_grad():
            out.weight[-1] = out.weight[:-1].mean(0)
            out.bias[-1] = out.bias[:-1].mean()
    return policy.adapt("router+new")


def diagnostics(policy, name: str, data: Data, names, max_per_task: int = 1000, seed: int = 0) -> dict:
    """``fdp.diagnostics.routing`` on (at most ``max_per_task``, evenly spaced) demo samples of each task."""
    import fdp.diagnostics

    obs, acts = {}, {}
    for task in names:
        cond, actions = data.dataset([task], variant(name).task_id)
        idx = torch.linspace(0, len(cond) - 1, min(max_per_task, len(cond))).long()
        obs[task], acts[task] = cond[idx], actions[idx]
    return fdp.diagnostics.routing(policy, obs, acts, generator=torch.Generator().manual_seed(seed))


def ckpt_path(cfg: Config, name: str, seed: int, stage: str) -> str:
    return os.path.join(cfg.cache_dir, "ckpt", f"{name}_s{seed}_{stage}.pt")


def save(policy, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(policy, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapt", action="store_true", help="also adapt to the 4 new tasks")
    ap.add_argument("--adapt-method", default=None, help=f"one of {ADAPT_METHODS} (default: the first)")
    for f, v in asdict(Config()).items():
        if f != "progress":
            ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(**{f: getattr(args, f) for f in asdict(Config()) if f != "progress"})
    data = Data(cfg)
    policy, info = train_multitask(args.variant, args.seed, cfg, data)
    print(f"{args.variant}: K={info['K']} hidden={info['hidden']} params={info['params']} "
          f"trained in {info['train_s']} s")
    save(policy, ckpt_path(cfg, args.variant, args.seed, "multitask"))
    if args.adapt:
        method = args.adapt_method or ADAPT_METHODS[variant(args.variant).factorized][0]
        adapted, ainfo = adapt(args.variant, policy, args.seed, cfg, data, method)
        print(f"adapted: params={ainfo['params']} trainable={ainfo['trainable_params']} in {ainfo['train_s']} s")
        save(adapted, ckpt_path(cfg, args.variant, args.seed, f"adapted-{method}"))


if __name__ == "__main__":
    main()
