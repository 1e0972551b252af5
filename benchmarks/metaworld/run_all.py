"""MetaWorld end to end: two protocols, results JSON.

    python benchmarks/metaworld/run_all.py [--quick]                  # the unsaturated protocol (protocol.py)
    python benchmarks/metaworld/run_all.py --protocol mt6 [--quick]   # the MT6 protocol (below)

The default is the unsaturated protocol of ``protocol.py`` (MT10 tasks without task id, a calibration
gate, monolithic / factorized soft / factorized tanh over 5 paired seeds, the mean-weight ablation):
``python benchmarks/metaworld/protocol.py --help`` lists its options, which run_all.py passes on.

The MT6 protocol (``--protocol mt6``; docs/metaworld.md, hours on 2 cores; ``--quick``: a tiny dry run
of every stage, minutes): for every training seed and variant (train.py: factorized with the paper's loss, factorized with
the specialisation loss, the parameter-matched monolithic policy, and without the task id):
train on the 6 multitask tasks, evaluate, and for factorized variants also evaluate with the
router's weights fixed to 1/K (does routing matter?) and record fdp.diagnostics.routing on the
demos; then adapt to the 4 new tasks with every adaptation method (train.ADAPT_METHODS) and
evaluate on all 10 (new-task success, forgetting). One job per (seed, variant) runs in its own
process, ``--jobs`` at a time (one torch thread each). The JSON (default
``benchmarks/results/metaworld-<date>-spec.json``) is rewritten after every finished job, so an
interrupted run keeps its partial results. Its ``factorized_mean_success`` is the best factorized
variant with the task id (``best_factorized_variant``), ``monolithic_mean_success`` the monolithic one.
"""

from __future__ import annotations

import argparse
import copy
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
DEFAULT_VARIANTS = ["factorized", "factorized-spec", "monolithic", "factorized-spec-notid", "monolithic-notid"]
DEFAULT_ADAPT_VARIANTS = ["factorized", "factorized-spec", "monolithic"]
MONOLITHIC = "monolithic"
# The bar for "factorization pays": factorized >= 1.10 x monolithic, the uniform-weight
# ablation >= 10 points below, and less forgetting than the monolithic fine-tune.
TARGET_RATIO = 1.10
TARGET_UNIFORM_DROP = 0.10

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

    import subprocess

    out = {"python": platform.python_version(), "platform": platform.platform()}
    # The run imports fdp from wherever it is on the path (an installed copy can be stale): record
    # which file and which commit of this checkout it was.
    import fdp

    out["fdp_file"] = os.path.relpath(fdp.__file__, REPO) if fdp.__file__.startswith(REPO) else fdp.__file__
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
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


def _job(job: dict) -> dict:
    """One (variant, seed): train (or reuse), evaluate, uniform ablation, diagnostics, adaptations."""
    torch.set_num_threads(1)
    cfg, v, seed, log = job["cfg"], job["variant"], job["seed"], print
    spec = tr.variant(v)
    data = tr.Data(cfg, log=lambda *a: None)
    ev = dict(n_episodes=job["episodes"], max_steps=job["max_steps"], envs_per_task=job["envs_per_task"],
              obs_norm=data.obs_norm, act_norm=data.act_norm, exclude_vecs=data.demo_vecs, progress=cfg.progress,
              task_id=spec.task_id)
    out = {"variant": v, "seed": seed, "wall": {}, "curves": {}, "diagnostics": {}, "adaptation": {}}

    def evaluate(policy, names, desc):
        t = mw.timer()
        r = mw.evaluate(policy, names, seed=seed, desc=desc, **ev)
        out["wall"][desc.split(" ", 2)[-1].replace(" ", "_") + "_eval"] = t()
        return r

    ckpt = tr.ckpt_path(cfg, v, seed, "multitask")
    if job["reuse"] and os.path.exists(ckpt):
        policy = torch.load(ckpt, weights_only=False)
        out["wall"]["train"], out["curves"]["multitask"] = f"reused {ckpt}", None
    else:
        policy, info = tr.train_multitask(v, seed, cfg, data)
        tr.save(policy, ckpt)
        out["wall"]["train"], out["curves"]["multitask"] = info["train_s"], info["loss_curve"]
    out["params"] = {"K": policy.num_components, "hidden": policy.components[0].hidden_dim,
                     "params": mw.num_params(policy)}
    r = evaluate(policy, mw.MT_TASKS, f"{v} s{seed} multitask")
    out["multitask"] = {n: r[n]["success_rate"] for n in mw.MT_TASKS}
    out["episode_lengths"] = {n: r[n]["mean_length"] for n in mw.MT_TASKS}
    log(f"   {v} s{seed}: " + ", ".join(f"{n}={r[n]['success_rate']:.2f}" for n in mw.MT_TASKS)
        + f" | mean {np.mean(list(out['multitask'].values())):.3f}", flush=True)
    if spec.factorized:
        out["diagnostics"]["multitask"] = tr.diagnostics(policy, v, data, mw.MT_TASKS, seed=seed)
        uniform = copy.deepcopy(policy)
        uniform.router.set_strategy("fixed", fixed_weights=[1.0 / uniform.num_components] * uniform.num_components)
        r = evaluate(uniform, mw.MT_TASKS, f"{v} s{seed} uniform")
        out["uniform"] = {n: r[n]["success_rate"] for n in mw.MT_TASKS}
        log(f"   {v} s{seed} weights fixed to 1/K: mean {np.mean(list(out['uniform'].values())):.3f}", flush=True)
    for method in job["adapt_methods"]:
        adapted, ainfo = tr.adapt(v, policy, seed, cfg, data, method)
        tr.save(adapted, tr.ckpt_path(cfg, v, seed, f"adapted-{method}"))
        out["wall"][f"adapt_{method}_train"], out["curves"][f"adapt_{method}"] = ainfo["train_s"], ainfo["loss_curve"]
        r = evaluate(adapted, mw.ALL_TASKS, f"{v} s{seed} adapt {method}")
        out["adaptation"][method] = {"new": {n: r[n]["success_rate"] for n in mw.ADAPT_TASKS},
                                     "old": {n: r[n]["success_rate"] for n in mw.MT_TASKS},
                                     "params": ainfo["params"], "trainable_params": ainfo["trainable_params"]}
        if spec.factorized:
            out["diagnostics"][f"adapted_{method}"] = tr.diagnostics(adapted, v, data, mw.ALL_TASKS, seed=seed)
        log(f"   {v} s{seed} adapted ({method}): new " + ", ".join(f"{n}={r[n]['success_rate']:.2f}"
            for n in mw.ADAPT_TASKS) + f"; old mean {np.mean([r[n]['success_rate'] for n in mw.MT_TASKS]):.3f}",
            flush=True)
    return out


def _mean(x):
    return None if not x else float(np.mean(x))


PROTOCOLS = ("unsaturated", "mt6")


def main(argv=None):
    """Run the protocol ``--protocol`` names (default: the unsaturated one) with the other arguments."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--protocol", choices=PROTOCOLS, default=PROTOCOLS[0])
    args, rest = ap.parse_known_args(argv)
    if args.protocol == "mt6":
        return main_mt6(rest)
    import protocol

    return protocol.main(rest)


def main_mt6(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes (unseen variations) per task per seed")
    ap.add_argument("--max-steps", type=int, default=200, help="episode cap in env steps")
    ap.add_argument("--envs-per-task", type=int, default=5, help="episodes of a task run side by side")
    ap.add_argument("--jobs", type=int, default=2, help="(seed, variant) jobs run in parallel, one process and "
                    "one torch thread each (default 2: both cores of the reference machine)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/metaworld-<date>-spec.json)")
    ap.add_argument("--quick", action="store_true", help="tiny dry run of every stage: 5 demos, 30 steps, 2 episodes, "
                    "1 seed")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--variants", nargs="+", choices=tr.VARIANTS, default=DEFAULT_VARIANTS, help="policies to run")
    ap.add_argument("--adapt-variants", nargs="*", choices=tr.VARIANTS, default=DEFAULT_ADAPT_VARIANTS,
                    help="the variants also adapted to the new tasks, with every method of train.ADAPT_METHODS "
                    "(none: skip adaptation)")
    all_methods = list(dict.fromkeys(m for ms in tr.ADAPT_METHODS.values() for m in ms))
    ap.add_argument("--adapt-methods", nargs="+", choices=all_methods, default=all_methods,
                    help="adaptation methods to run (each variant runs those of its kind)")
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
                    progress=not args.no_progress and args.jobs == 1)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(REPO, "benchmarks", "results",
                                   f"metaworld-{date}-spec{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    total = mw.timer()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    variants = list(dict.fromkeys(args.variants))
    adapt_variants = [v for v in dict.fromkeys(args.adapt_variants) if v in variants]
    methods = {v: [m for m in tr.ADAPT_METHODS[tr.variant(v).factorized] if m in args.adapt_methods]
               for v in adapt_variants}

    res = {
        "factorized_mean_success": None,
        "monolithic_mean_success": None,
        "best_factorized_variant": None,
        "schema": 2,
        "command": command,
        "date": date,
        "versions": versions(),
        "hardware": {"cpu_threads_per_job": 1, "parallel_jobs": args.jobs, "cpu_count": os.cpu_count(),
                     "device": "cpu"},
        "config": {**asdict(cfg), "seeds": args.seeds, "episodes": args.episodes, "max_steps": args.max_steps,
                   "envs_per_task": args.envs_per_task, "horizon": mw.HORIZON, "n_action_steps": mw.N_ACTION_STEPS,
                   "n_obs_steps": mw.N_OBS_STEPS, "cond_dim": mw.COND_DIM, "train_scheduler":
                   "DDPM 100 steps, squaredcos_cap_v2, clip_sample, epsilon", "sampler": "fdp.Sampler, DDIM 10 "
                   "steps, eta 0, backend torch", "demo_seed": mw.DEMO_SEED, "eval_seed": mw.EVAL_SEED,
                   "multitask_tasks": mw.MT_TASKS, "adaptation_tasks": mw.ADAPT_TASKS,
                   "variants": variants, "adapt_variants": adapt_variants,
                   "adapt_methods": methods},
        "variants": {v: {**asdict(tr.variant(v)), "loss": tr.loss_kwargs(v, cfg) or "paper (composed MSE)",
                         "adaptation_loss": tr.loss_kwargs(v, cfg, adaptation=True) or "paper (composed MSE)"}
                     for v in variants},
        "scaled_down": [s.format(n_seeds=len(args.seeds), comp_params=mw.num_params(mw.make_component(args.hidden,
                        args.num_blocks)), **vars(args)) for s in SCALED_DOWN],
        "criteria": {},
        "per_variant": {},
        "params": {},
        "multitask": {v: {"per_seed": {}} for v in variants},
        "uniform_weights": {v: {"per_seed": {}} for v in variants if tr.variant(v).factorized},
        "adaptation": {v: {m: {"new_per_seed": {}, "old_per_seed": {}} for m in ms} for v, ms in methods.items()},
        "diagnostics": {},
        "wall_time_s": {"demos": None, "per_seed": {}, "total": None},
        "loss_curves": {},
        "demos": {},
    }

    def write():
        for v in variants:
            mt = res["multitask"][v]
            mt.update(summarize({int(s): r for s, r in mt["per_seed"].items()}, mw.MT_TASKS))
            if v in res["uniform_weights"]:
                uw = res["uniform_weights"][v]
                uw.update(summarize({int(s): r for s, r in uw["per_seed"].items()}, mw.MT_TASKS))
            for m, ad in res["adaptation"].get(v, {}).items():
                ad["new_tasks"] = summarize({int(s): r for s, r in ad["new_per_seed"].items()}, mw.ADAPT_TASKS)
                ad["old_tasks"] = summarize({int(s): r for s, r in ad["old_per_seed"].items()}, mw.MT_TASKS)
                # forgetting: multitask success before adaptation minus success on the same tasks after
                both = [s for s in ad["old_per_seed"] if s in mt["per_seed"]]
                drops = [np.mean([mt["per_seed"][s][n] for n in mw.MT_TASKS])
                         - np.mean([ad["old_per_seed"][s][n] for n in mw.MT_TASKS]) for s in both]
                ad["forgetting_mean"] = _mean(drops)
                ad["forgetting_std_over_seeds"] = float(np.std(drops)) if drops else None
            res["per_variant"][v] = per_variant(res, v)
        with_id = [v for v in variants if tr.variant(v).factorized and tr.variant(v).task_id
                   and res["multitask"][v].get("mean") is not None]
        best = max(with_id, key=lambda v: res["multitask"][v]["mean"], default=None)
        res["best_factorized_variant"] = best
        res["factorized_mean_success"] = None if best is None else res["multitask"][best]["mean"]
        res["monolithic_mean_success"] = res["multitask"].get(MONOLITHIC, {}).get("mean")
        f, m = res["factorized_mean_success"], res["monolithic_mean_success"]
        res["relative_improvement"] = (f - m) / m if f is not None and m else None
        res["criteria"] = criteria(res, best)
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
    for v in variants:
        p = tr.build_policy(v, cfg)
        res["params"][v] = {"K": p.num_components, "hidden": p.components[0].hidden_dim, "params": mw.num_params(p)}
        log(f"   {v}: K={p.num_components} x MLPDenoiser(hidden={p.components[0].hidden_dim}) "
            f"+ router ({p.router.strategy}): {mw.num_params(p)} parameters")
    write()

    jobs = [{"cfg": cfg, "variant": v, "seed": seed, "episodes": args.episodes, "max_steps": args.max_steps,
             "envs_per_task": args.envs_per_task, "reuse": args.reuse_checkpoints,
             "adapt_methods": methods.get(v, [])}
            for seed in args.seeds for v in variants]
    log(f"== {len(jobs)} jobs (seed x variant), {args.jobs} at a time")
    if args.jobs == 1:
        results = map(_job, jobs)
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1)
        results = pool.imap_unordered(_job, jobs)
    for r in results:
        v, s = r["variant"], str(r["seed"])
        res["multitask"][v]["per_seed"][s] = r["multitask"]
        res["multitask"][v].setdefault("episode_lengths", {})[s] = r["episode_lengths"]
        if "uniform" in r:
            res["uniform_weights"][v]["per_seed"][s] = r["uniform"]
        for m, a in r["adaptation"].items():
            res["adaptation"][v][m]["new_per_seed"][s] = a["new"]
            res["adaptation"][v][m]["old_per_seed"][s] = a["old"]
            res["params"][v]["after_adaptation"] = a["params"]
            res["params"][v][f"trainable_in_adaptation_{m}"] = a["trainable_params"]
        if r["diagnostics"]:
            res["diagnostics"].setdefault(v, {})[s] = r["diagnostics"]
        for k, c in r["curves"].items():
            res["loss_curves"][f"{v}_s{s}_{k}"] = c
        res["wall_time_s"]["per_seed"].setdefault(s, {}).update({f"{v}_{k}": w for k, w in r["wall"].items()})
        log(f"== done: {v} seed {s}")
        write()
    if args.jobs != 1:
        pool.close()
        pool.join()
    write()
    log(f"== done in {total()} s: best factorized ({res['best_factorized_variant']}) "
        f"{res['factorized_mean_success']}, monolithic {res['monolithic_mean_success']} -> {out}")


def per_variant(res: dict, v: str) -> dict:
    """One row of the per-variant table: success, uniform ablation, routing diagnostics, adaptation."""
    mt = res["multitask"][v]
    row = {"multitask_mean": mt.get("mean"), "multitask_std_over_seeds": mt.get("std_over_seeds"),
           "seeds": mt.get("seeds", [])}
    uw = res["uniform_weights"].get(v)
    if uw is not None:
        row["uniform_weights_mean"] = uw.get("mean")
        both = [s for s in uw["per_seed"] if s in mt["per_seed"]]
        row["uniform_drop_points"] = _mean([100 * (np.mean(list(mt["per_seed"][s].values()))
                                                  - np.mean(list(uw["per_seed"][s].values()))) for s in both])
        diags = [d["multitask"]["overall"] for d in res["diagnostics"].get(v, {}).values()]
        for key in ("entropy", "top_weight", "composed_mse", "uniform_mse"):
            row[key] = _mean([d[key] for d in diags])
        row["component_mse_range"] = ([min(min(d["component_mse"]) for d in diags),
                                       max(max(d["component_mse"]) for d in diags)] if diags else None)
    row["adaptation"] = {m: {"new_mean": ad.get("new_tasks", {}).get("mean"),
                             "old_mean_after": ad.get("old_tasks", {}).get("mean"),
                             "forgetting": ad.get("forgetting_mean")} for m, ad in res["adaptation"].get(v, {}).items()}
    return row


def criteria(res: dict, best: str | None) -> dict:
    """The issue's three conditions for the best factorized variant, measured (None where not run)."""
    f, m = res["factorized_mean_success"], res["monolithic_mean_success"]
    row = res["per_variant"].get(best, {}) if best else {}
    drop = row.get("uniform_drop_points")
    forget = {k: a["forgetting"] for k, a in row.get("adaptation", {}).items() if a["forgetting"] is not None}
    mono = res["per_variant"].get(MONOLITHIC, {}).get("adaptation", {}).get("full", {}).get("forgetting")
    best_method = min(forget, key=forget.get, default=None)
    return {
        "ratio": None if f is None or not m else f / m, "target_ratio": TARGET_RATIO,
        "ratio_met": None if f is None or not m else f / m >= TARGET_RATIO,
        "uniform_drop_points": drop, "target_uniform_drop_points": 100 * TARGET_UNIFORM_DROP,
        "uniform_drop_met": None if drop is None else drop >= 100 * TARGET_UNIFORM_DROP,
        "least_forgetting_method": best_method,
        "forgetting_points": None if best_method is None else 100 * forget[best_method],
        "monolithic_full_forgetting_points": None if mono is None else 100 * mono,
        "forgetting_met": None if best_method is None or mono is None else forget[best_method] < mono,
    }


if __name__ == "__main__":
    main()
