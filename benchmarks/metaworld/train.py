"""Train (and adapt) factorized and monolithic diffusion policies on MetaWorld demonstrations.

    python benchmarks/metaworld/train.py --variant factorized --seed 0 [--steps 3000 ...]
    python benchmarks/metaworld/train.py --variant monolithic --seed 0 --adapt [...]

One variant, one seed: multitask training on the 6 multitask tasks, optionally followed by
adaptation on the 4 new tasks (``--adapt``), with checkpoints under ``--cache-dir/ckpt``.
``run_all.py`` runs every variant and seed, evaluates them and writes the results JSON.

- factorized: ``fdp.FactorizedPolicy`` with K MLP components (hidden ``--hidden``) and a soft
  router; adaptation adds one component (same width), ``policy.adapt("router+new")``.
- monolithic: the same class with K = 1 and the hidden width that matches the factorized
  policy's parameter count; adaptation fine-tunes everything (``policy.adapt("full")``).

Both get the same steps, batch size, learning rate and schedule, data and EMA.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mw_common as mw  # noqa: E402


@dataclass
class Config:
    n_demos: int = 40
    K: int = 4
    hidden: int = 128
    num_blocks: int = 2
    steps: int = 4000
    adapt_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.995
    # Router logit of the component added for adaptation. fdp's default (-20) leaves the policy
    # unchanged when the component is added, but its gradients (~exp(-20)) then sit below AdamW's
    # eps (1e-8) and the new component never trains (measured: loss flat for 600 steps); -4 gives
    # it ~1% weight at the start, small enough to barely move the old outputs, large enough to train.
    new_logit: float = -4.0
    # Learning-rate multiplier of the router's parameters (an ablation; 1 = the same lr for everything).
    router_lr_mult: float = 1.0
    cache_dir: str = mw.DEFAULT_CACHE
    progress: bool = True


def build_policy(variant: str, cfg: Config):
    if variant == "factorized":
        return mw.make_policy(cfg.K, cfg.hidden, cfg.num_blocks)
    if variant == "monolithic":
        return mw.make_policy(1, mw.matched_hidden(cfg.K, cfg.hidden, cfg.num_blocks), cfg.num_blocks)
    raise ValueError(f"unknown variant {variant!r}")


class Data:
    """Demos, normalisers (fit on all 10 tasks' demos, fixed for training and adaptation) and datasets."""

    def __init__(self, cfg: Config, log=print):
        self.demos = mw.get_demos(cfg.cache_dir, mw.ALL_TASKS, cfg.n_demos, log=log)
        self.obs_norm, self.act_norm = mw.fit_normalizers(self.demos)
        self.mt = mw.build_dataset(self.demos, mw.MT_TASKS, self.obs_norm, self.act_norm)
        self.adapt = mw.build_dataset(self.demos, mw.ADAPT_TASKS, self.obs_norm, self.act_norm)
        self.demo_vecs = {name: d["rand_vecs"] for name, d in self.demos.items()}


def train_multitask(variant: str, seed: int, cfg: Config, data: Data):
    torch.manual_seed(seed)
    policy = build_policy(variant, cfg)
    cond, actions = data.mt
    params = list(policy.parameters())
    if cfg.router_lr_mult != 1.0:
        router = set(map(id, policy.router.parameters()))
        params = [{"params": [p for p in params if id(p) in router], "lr": cfg.lr * cfg.router_lr_mult},
                  {"params": [p for p in params if id(p) not in router]}]
    t = mw.timer()
    ema, curve = mw.train(policy, cond, actions, params, cfg.steps, cfg.batch_size, cfg.lr, seed,
                          desc=f"{variant} s{seed} multitask", ema_decay=cfg.ema_decay, progress=cfg.progress)
    return ema, {"train_s": t(), "loss_curve": curve, "params": mw.num_params(policy),
                 "hidden": policy.components[0].hidden_dim, "K": policy.num_components}


def adapt(variant: str, policy, seed: int, cfg: Config, data: Data):
    """Adapt a multitask policy to the 4 new tasks (a copy; ``policy`` is left as it is)."""
    import copy

    torch.manual_seed(10_000 + seed)
    policy = copy.deepcopy(policy)
    policy.requires_grad_(True)
    if variant == "factorized":
        policy.add_component(mw.make_component(cfg.hidden, cfg.num_blocks), initial_logit=cfg.new_logit)
        params = policy.adapt("router+new")
    else:
        params = policy.adapt("full")
    n_trainable = sum(p.numel() for p in params)
    cond, actions = data.adapt
    t = mw.timer()
    ema, curve = mw.train(policy, cond, actions, params, cfg.adapt_steps, cfg.batch_size, cfg.lr, 10_000 + seed,
                          desc=f"{variant} s{seed} adapt", ema_decay=cfg.ema_decay, progress=cfg.progress)
    return ema, {"train_s": t(), "loss_curve": curve, "params": mw.num_params(policy),
                 "trainable_params": n_trainable, "K": policy.num_components}


@torch.no_grad()
def routing(policy, data: Data) -> dict:
    """Mean router weights per task over that task's demo observations."""
    out = {}
    for name in mw.ALL_TASKS:
        cond, _ = mw.build_dataset(data.demos, [name], data.obs_norm, data.act_norm)
        out[name] = [round(float(w), 4) for w in policy.weights(cond).mean(0)]
    return out


def ckpt_path(cfg: Config, variant: str, seed: int, stage: str) -> str:
    return os.path.join(cfg.cache_dir, "ckpt", f"{variant}_s{seed}_{stage}.pt")


def save(policy, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(policy, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["factorized", "monolithic"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapt", action="store_true", help="also adapt to the 4 new tasks")
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
        adapted, ainfo = adapt(args.variant, policy, args.seed, cfg, data)
        print(f"adapted: params={ainfo['params']} trainable={ainfo['trainable_params']} in {ainfo['train_s']} s")
        save(adapted, ckpt_path(cfg, args.variant, args.seed, "adapted"))


if __name__ == "__main__":
    main()
