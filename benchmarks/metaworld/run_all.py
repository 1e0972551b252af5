"""MetaWorld end to end: demos, multitask training, evaluation, adaptation, results JSON.

    python benchmarks/metaworld/run_all.py            # the documented run (docs/metaworld.md)
    python benchmarks/metaworld/run_all.py --quick    # a tiny dry run (minutes)

For every training seed: train the factorized (K=4) and the monolithic (K=1, same parameter
count) policy on the 6 multitask tasks, evaluate both, adapt both to the 4 new tasks
(factorized: a new component + router; monolithic: full fine-tuning), evaluate both on all 10.
The JSON (default ``benchmarks/results/metaworld-<date>.json``) is rewritten after every
evaluation, so an interrupted run leaves its partial results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mw_common as mw  # noqa: E402
import train as tr  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ("factorized", "monolithic")

SCALED_DOWN = [
    "components: fdp.MLPDenoiser (hidden {hidden}, {num_blocks} residual blocks, {comp_params} parameters each) "
    "instead of the paper's ConditionalUnet1D (256/512/1024, ~66M each): a 2-core CPU budget; MLPDenoiser is "
    "also the family fdp's fused kernels serve",
    "observations: MetaWorld's 39-d state (goal observable) instead of images with a vision encoder",
    "demonstrations: {n_demos} scripted-expert episodes per task instead of the paper's dataset",
    "training: {steps} steps at batch {batch_size} (multitask) and {adapt_steps} steps (adaptation), "
    "instead of hundreds of epochs",
    "sampling: DDIM 10 steps (the brief) instead of the paper's DDPM 100 inference steps",
    "evaluation: {episodes} episodes per task per seed, episodes capped at {max_steps} steps "
    "(MetaWorld's own limit is 500)",
    "seeds: {n_seeds} training seeds",
]


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("fdp", "torch", "numpy", "metaworld", "mujoco", "gymnasium"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def summarize(per_seed: dict, names) -> dict:
    """per_seed: {seed: {task: rate}} -> per-task mean/std over seeds, per-seed task means, overall."""
    seeds = sorted(per_seed)
    if not seeds:
        return {}
    per_task = {n: [per_seed[s][n] for s in seeds if n in per_seed[s]] for n in names}
    seed_means = [float(np.mean([per_seed[s][n] for n in names])) for s in seeds]
    return {
        "per_task_mean": {n: float(np.mean(v)) for n, v in per_task.items() if v},
        "per_task_std": {n: float(np.std(v)) for n, v in per_task.items() if v},
        "per_seed_mean": dict(zip(map(str, seeds), seed_means)),
        "mean": float(np.mean(seed_means)),
        "std_over_seeds": float(np.std(seed_means)),
        "seeds": seeds,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task per seed")
    ap.add_argument("--max-steps", type=int, default=200, help="episode cap in env steps")
    ap.add_argument("--envs-per-task", type=int, default=5, help="episodes of a task run side by side")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/metaworld-<date>.json)")
    ap.add_argument("--quick", action="store_true", help="tiny dry run: 5 demos, 30 steps, 2 episodes, 1 seed")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="policies to run")
    ap.add_argument("--no-adapt", action="store_true", help="skip the adaptation stage")
    ap.add_argument("--reuse-checkpoints", action="store_true",
                    help="load multitask checkpoints found in the cache instead of training them again")
    for f, v in asdict(tr.Config()).items():
        if f != "progress":
            ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_demos, args.steps, args.adapt_steps, args.episodes = 5, 30, 20, 2
        args.seeds, args.max_steps, args.envs_per_task = [0], 40, 2
    torch.set_num_threads(1)
    cfg = tr.Config(**{f: getattr(args, f) for f in asdict(tr.Config()) if f != "progress"},
                    progress=not args.no_progress)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"metaworld-{date}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    total = mw.timer()
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    res = {
        "factorized_mean_success": None,
        "monolithic_mean_success": None,
        "command": command,
        "date": date,
        "versions": versions(),
        "hardware": {"cpu_threads_used": 1, "cpu_count": os.cpu_count(), "device": "cpu"},
        "config": {**asdict(cfg), "seeds": args.seeds, "episodes": args.episodes, "max_steps": args.max_steps,
                   "envs_per_task": args.envs_per_task, "horizon": mw.HORIZON, "n_action_steps": mw.N_ACTION_STEPS,
                   "n_obs_steps": mw.N_OBS_STEPS, "cond_dim": mw.COND_DIM, "train_scheduler":
                   "DDPM 100 steps, squaredcos_cap_v2, clip_sample, epsilon", "sampler": "fdp.Sampler, DDIM 10 "
                   "steps, eta 0, backend torch", "demo_seed": mw.DEMO_SEED, "eval_seed": mw.EVAL_SEED,
                   "multitask_tasks": mw.MT_TASKS, "adaptation_tasks": mw.ADAPT_TASKS},
        "scaled_down": [s.format(n_seeds=len(args.seeds), comp_params=mw.num_params(mw.make_component(args.hidden,
                        args.num_blocks)), **vars(args)) for s in SCALED_DOWN],
        "params": {},
        "multitask": {v: {"per_seed": {}} for v in VARIANTS},
        "adaptation": {v: {"new_per_seed": {}, "old_per_seed": {}} for v in VARIANTS},
        "wall_time_s": {"demos": None, "per_seed": {}, "total": None},
        "loss_curves": {},
        "demos": {},
    }

    def write():
        for v in VARIANTS:
            mt = res["multitask"][v]
            mt.update(summarize({int(s): r for s, r in mt["per_seed"].items()}, mw.MT_TASKS))
            ad = res["adaptation"][v]
            new = summarize({int(s): r for s, r in ad["new_per_seed"].items()}, mw.ADAPT_TASKS)
            old = summarize({int(s): r for s, r in ad["old_per_seed"].items()}, mw.MT_TASKS)
            ad["new_tasks"], ad["old_tasks"] = new, old
            # forgetting: multitask success before adaptation minus success on the same tasks after
            both = [s for s in ad["old_per_seed"] if s in mt["per_seed"]]
            if both:
                drops = [np.mean([mt["per_seed"][s][n] for n in mw.MT_TASKS])
                         - np.mean([ad["old_per_seed"][s][n] for n in mw.MT_TASKS]) for s in both]
                ad["forgetting_mean"] = float(np.mean(drops))
                ad["forgetting_std_over_seeds"] = float(np.std(drops))
        res["factorized_mean_success"] = res["multitask"]["factorized"].get("mean")
        res["monolithic_mean_success"] = res["multitask"]["monolithic"].get("mean")
        f, m = res["factorized_mean_success"], res["monolithic_mean_success"]
        res["relative_improvement"] = (f - m) / m if f is not None and m else None
        res["wall_time_s"]["total"] = total()
        with open(out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(out + ".tmp", out)

    t = mw.timer()
    log(f"== demos ({cfg.n_demos} per task, cache {cfg.cache_dir})")
    data = tr.Data(cfg, log=log)
    res["wall_time_s"]["demos"] = t()
    res["demos"] = {n: {"episodes": len(d["actions"]), "tried": d["tried"],
                        "steps": int(sum(len(a) for a in d["actions"]))} for n, d in data.demos.items()}
    res["normalizer"] = {"obs": data.obs_norm.state(), "action": data.act_norm.state()}
    for v in VARIANTS:
        p = tr.build_policy(v, cfg)
        res["params"][v] = {"K": p.num_components, "hidden": p.components[0].hidden_dim,
                            "params": mw.num_params(p)}
        log(f"   {v}: K={p.num_components} x MLPDenoiser(hidden={p.components[0].hidden_dim}) "
            f"+ router: {mw.num_params(p)} parameters")
    write()

    ev = dict(n_episodes=args.episodes, max_steps=args.max_steps, envs_per_task=args.envs_per_task,
              obs_norm=data.obs_norm, act_norm=data.act_norm, exclude_vecs=data.demo_vecs,
              progress=cfg.progress)
    for seed in args.seeds:
        wt = res["wall_time_s"]["per_seed"].setdefault(str(seed), {})
        for v in args.variants:
            log(f"== seed {seed}: {v} multitask")
            ckpt = tr.ckpt_path(cfg, v, seed, "multitask")
            if args.reuse_checkpoints and os.path.exists(ckpt):
                policy = torch.load(ckpt, weights_only=False)
                info = {"train_s": f"reused {ckpt}", "loss_curve": None}
                log(f"   reusing {ckpt}")
            else:
                policy, info = tr.train_multitask(v, seed, cfg, data)
                tr.save(policy, ckpt)
            res["loss_curves"][f"{v}_s{seed}_multitask"] = info["loss_curve"]
            res.setdefault("router_weights", {})[f"{v}_s{seed}_multitask"] = tr.routing(policy, data)
            wt[f"{v}_train"] = info["train_s"]
            t = mw.timer()
            r = mw.evaluate(policy, mw.MT_TASKS, seed=seed, desc=f"{v} s{seed} eval", **ev)
            wt[f"{v}_eval"] = t()
            res["multitask"][v]["per_seed"][str(seed)] = {n: r[n]["success_rate"] for n in mw.MT_TASKS}
            res["multitask"][v].setdefault("episode_lengths", {})[str(seed)] = {n: r[n]["mean_length"] for n in r}
            log(f"   {v} s{seed}: " + ", ".join(f"{n}={r[n]['success_rate']:.2f}" for n in mw.MT_TASKS)
                + f" | mean {np.mean([r[n]['success_rate'] for n in mw.MT_TASKS]):.3f}")
            write()
            if args.no_adapt:
                continue

            log(f"== seed {seed}: {v} adaptation")
            adapted, ainfo = tr.adapt(v, policy, seed, cfg, data)
            tr.save(adapted, tr.ckpt_path(cfg, v, seed, "adapted"))
            res["loss_curves"][f"{v}_s{seed}_adapt"] = ainfo["loss_curve"]
            res.setdefault("router_weights", {})[f"{v}_s{seed}_adapted"] = tr.routing(adapted, data)
            res["params"][v]["after_adaptation"] = ainfo["params"]
            res["params"][v]["trainable_in_adaptation"] = ainfo["trainable_params"]
            wt[f"{v}_adapt_train"] = ainfo["train_s"]
            t = mw.timer()
            r = mw.evaluate(adapted, mw.ALL_TASKS, seed=seed, desc=f"{v} s{seed} adapted eval", **ev)
            wt[f"{v}_adapt_eval"] = t()
            res["adaptation"][v]["new_per_seed"][str(seed)] = {n: r[n]["success_rate"] for n in mw.ADAPT_TASKS}
            res["adaptation"][v]["old_per_seed"][str(seed)] = {n: r[n]["success_rate"] for n in mw.MT_TASKS}
            log(f"   {v} s{seed} adapted: " + ", ".join(f"{n}={r[n]['success_rate']:.2f}" for n in mw.ALL_TASKS))
            write()

    write()
    log(f"== done in {total()} s: factorized {res['factorized_mean_success']}, "
        f"monolithic {res['monolithic_mean_success']} -> {out}")


if __name__ == "__main__":
    main()
