"""Markdown tables from a MetaWorld results JSON (what docs/metaworld.md shows).

    python benchmarks/metaworld/report.py benchmarks/results/metaworld-<date>.json

Reads every layout: the first run's (factorized vs monolithic), the MT6 protocol's per-variant one
(``"schema": 2``: variants, uniform-weight ablation, routing diagnostics, adaptation methods) and the
unsaturated protocol's (``"protocol": "unsaturated"``, protocol.py; ``--plot PNG`` also draws the
per-task success of each arm).
"""

from __future__ import annotations

import json
import sys


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def cell(summary, name):
    m, s = summary.get("per_task_mean", {}).get(name), summary.get("per_task_std", {}).get(name)
    return "–" if m is None else f"{pct(m)} ± {pct(s)}"


def tables(r: dict) -> str:
    mt_tasks = r["config"]["multitask_tasks"]
    ad_tasks = r["config"]["adaptation_tasks"]
    F, M = r["multitask"]["factorized"], r["multitask"]["monolithic"]
    seeds = F.get("seeds", [])
    lines = [f"Success rate (%), mean ± std over {len(seeds)} training seeds ({', '.join(map(str, seeds))}), "
             f"{r['config']['episodes']} unseen variations per task per seed.", "",
             "**Multitask** (6 tasks)", "",
             "| task | factorized (K=4) | monolithic (K=1) |", "|---|---|---|"]
    for n in mt_tasks:
        lines.append(f"| {n} | {cell(F, n)} | {cell(M, n)} |")
    lines.append(f"| **mean** | **{pct(F.get('mean'))} ± {pct(F.get('std_over_seeds'))}** | "
                 f"**{pct(M.get('mean'))} ± {pct(M.get('std_over_seeds'))}** |")
    ri = r.get("relative_improvement")
    lines += ["", f"Relative improvement of factorized over monolithic: "
              f"{'–' if ri is None else f'{100 * ri:+.1f} %'}", ""]
    AF, AM = r["adaptation"]["factorized"], r["adaptation"]["monolithic"]
    lines += ["**Adaptation** (4 new tasks; factorized: + 1 component, router + new trained; monolithic: "
              "full fine-tuning; same data and steps)", "",
              "| task | factorized | monolithic |", "|---|---|---|"]
    for n in ad_tasks:
        lines.append(f"| {n} (new) | {cell(AF.get('new_tasks', {}), n)} | {cell(AM.get('new_tasks', {}), n)} |")
    nf, nm = AF.get("new_tasks", {}), AM.get("new_tasks", {})
    lines.append(f"| **new-task mean** | **{pct(nf.get('mean'))} ± {pct(nf.get('std_over_seeds'))}** | "
                 f"**{pct(nm.get('mean'))} ± {pct(nm.get('std_over_seeds'))}** |")
    of, om = AF.get("old_tasks", {}), AM.get("old_tasks", {})
    for n in mt_tasks:
        lines.append(f"| {n} (old, after) | {cell(of, n)} | {cell(om, n)} |")
    lines.append(f"| **old-task mean after** | **{pct(of.get('mean'))} ± {pct(of.get('std_over_seeds'))}** | "
                 f"**{pct(om.get('mean'))} ± {pct(om.get('std_over_seeds'))}** |")
    lines.append(f"| **forgetting** (old-task mean before − after, points) | "
                 f"{pct(AF.get('forgetting_mean'))} ± {pct(AF.get('forgetting_std_over_seeds'))} | "
                 f"{pct(AM.get('forgetting_mean'))} ± {pct(AM.get('forgetting_std_over_seeds'))} |")
    lines += ["", "**Wall time** (s, 1 thread)", "", "| stage | " + " | ".join(f"seed {s}" for s in
                                                                             r["wall_time_s"]["per_seed"]) + " |",
              "|---|" + "---|" * len(r["wall_time_s"]["per_seed"])]
    keys = []
    for d in r["wall_time_s"]["per_seed"].values():
        keys += [k for k in d if k not in keys]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(d.get(k, "–")) for d in r["wall_time_s"]["per_seed"].values()) + " |")
    lines.append(f"\nDemos: {r['wall_time_s']['demos']} s; total: {r['wall_time_s']['total']} s "
                 f"({r['wall_time_s']['total'] / 60:.1f} min).")
    p = r["params"]
    lines.append(f"\nParameters: factorized {p['factorized']['params']} (K={p['factorized']['K']} × hidden "
                 f"{p['factorized']['hidden']}), monolithic {p['monolithic']['params']} (hidden "
                 f"{p['monolithic']['hidden']}).")
    return "\n".join(lines)


def pm(summary):
    return f"{pct(summary.get('mean'))} ± {pct(summary.get('std_over_seeds'))}"


def num(x, fmt=".3f"):
    return "–" if x is None else format(x, fmt)


def tables_v2(r: dict) -> str:
    from fdp.diagnostics import format_routing

    cfg = r["config"]
    mt_tasks, variants = cfg["multitask_tasks"], cfg["variants"]
    seeds = cfg["seeds"]
    lines = [f"Success rate (%), mean ± std over the training seeds done (planned: {', '.join(map(str, seeds))}), "
             f"{cfg['episodes']} unseen variations per task per seed; {cfg['steps']} training steps, "
             f"{cfg['adapt_steps']} adaptation steps.", "",
             "**Multitask** (6 tasks)", "",
             "| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    MT = r["multitask"]
    for n in mt_tasks:
        lines.append(f"| {n} | " + " | ".join(cell(MT[v], n) for v in variants) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{pm(MT[v])}**" for v in variants) + " |")
    uw = r["uniform_weights"]
    lines.append("| weights fixed to 1/K | " + " | ".join(pm(uw[v]) if v in uw else "–" for v in variants) + " |")
    lines.append("| seeds done | " + " | ".join(str(len(MT[v].get("seeds", []))) for v in variants) + " |")
    c = r["criteria"]
    ratio = "–" if c.get("ratio") is None else f"{c['ratio']:.3f}"
    lines += ["", f"Best factorized variant (with task id): {r['best_factorized_variant']}; factorized / monolithic "
              f"= {ratio} (target ≥ {c.get('target_ratio')}); uniform-weight ablation "
              f"{num(c.get('uniform_drop_points'), '.1f')} points below (target ≥ "
              f"{num(c.get('target_uniform_drop_points'), '.0f')}); least forgetting "
              f"{num(c.get('forgetting_points'), '.1f')} points ({c.get('least_forgetting_method')}) vs the "
              f"monolithic fine-tune's {num(c.get('monolithic_full_forgetting_points'), '.1f')}.", ""]
    lines += ["**Routing** (fdp.diagnostics.routing on up to 1000 demo samples per task, mean over seeds: "
              "normalised weight entropy, top weight, denoising MSE of the composition, of the 1/K "
              "composition, and the range of each component's own MSE)", "",
              "| variant | entropy | top weight | MSE | MSE, weights 1/K | components alone |", "|---|---|---|---|---|---|"]
    for v in variants:
        row = r["per_variant"].get(v, {})
        if "entropy" in row:
            rng = row.get("component_mse_range")
            lines.append(f"| {v} | {num(row['entropy'])} | {num(row['top_weight'])} | {num(row['composed_mse'], '.4f')} "
                         f"| {num(row['uniform_mse'], '.4f')} | "
                         f"{'–' if rng is None else f'{rng[0]:.3f}–{rng[1]:.3f}'} |")
    lines += ["", "**Adaptation** (4 new tasks, then all 10 evaluated; forgetting = old-task mean before − after)", "",
              "| variant | method | new-task mean | old-task mean after | forgetting (points) |", "|---|---|---|---|---|"]
    for v, methods in r["adaptation"].items():
        for m, ad in methods.items():
            f = ad.get("forgetting_mean")
            lines.append(f"| {v} | {m} | {pm(ad.get('new_tasks', {}))} | {pm(ad.get('old_tasks', {}))} | "
                         f"{pct(f)} ± {pct(ad.get('forgetting_std_over_seeds'))} |")
    lines += ["", f"Demos: {r['wall_time_s']['demos']} s; total: {r['wall_time_s']['total']} s "
              f"({r['wall_time_s']['total'] / 60:.1f} min) with {r['hardware']['parallel_jobs']} parallel jobs."]
    for v, per_seed in r["diagnostics"].items():
        for s, d in per_seed.items():
            lines += ["", f"Routing diagnostics, {v}, seed {s}, after multitask training:", "", "```",
                      format_routing(d["multitask"]), "```"]
    return "\n".join(lines)


def _interval(d, fmt="+.1f"):
    if not d or d.get("mean") is None:
        return "–"
    if d.get("low") is None:
        return format(d["mean"], fmt)
    return f"{format(d['mean'], fmt)} [{format(d['low'], fmt)}, {format(d['high'], fmt)}]"


def seeds_done(r: dict) -> str:
    """"seeds 0, 1, ..." when every arm has every seed at its chosen lr, else each arm's seeds so far."""
    done = {a: sorted(run["seed"] for run in r["runs"].values()
                      if run["arm"] == a and run["lr"] == r["chosen_lr"].get(a)) for a in r["arms"]}
    if all(d == list(r["config"]["seeds"]) for d in done.values()):
        return "seeds " + ", ".join(map(str, r["config"]["seeds"]))
    return "the seeds done so far: " + "; ".join(f"{a} {', '.join(map(str, d)) or 'none'}" for a, d in done.items())


def tables_unsaturated(r: dict) -> str:
    """The unsaturated protocol's tables: gate, lr choice, per-task success, paired metrics, criteria."""
    cfg, arms = r["config"], r["arms"]
    names = list(arms)
    g = r["gate"]
    lines = [f"Tasks: {len(cfg['tasks'])} ({', '.join(t.removesuffix('-v3') for t in cfg['tasks'])}), no task id; "
             f"{cfg.get('n_demos_used')} demos per task, {cfg['steps']} steps at batch {cfg['batch_size']}; "
             f"{cfg['episodes']} unseen variations per task, episodes capped at {cfg['max_steps']} steps.", "",
             "**Calibration gate** (monolithic, seed 0, lr "
             f"{cfg['lrs'][0]:g}; range {100 * g['range'][0]:.0f}–{100 * g['range'][1]:.0f} %): "
             + "; ".join(f"{k} demos: {pct(v['mean_success'])} % ({v['verdict']})"
                         for k, v in g.items() if isinstance(v, dict) and "verdict" in v)
             + f". Arms run on {g.get('demos_used')} demos per task: {g.get('note')}.", "",
             "**Learning rate** (seed-0 mean success, %; the higher is kept)", "",
             "| arm | " + " | ".join(f"lr {lr:g}" for lr in cfg["lrs"]) + " | chosen |",
             "|---|" + "---|" * (len(cfg["lrs"]) + 1)]
    for a, by_lr in r["seed0_by_lr"].items():
        lines.append(f"| {a} | " + " | ".join(pct(by_lr.get(f"{lr:g}")) for lr in cfg["lrs"])
                     + f" | {num(r['chosen_lr'].get(a), 'g')} |")
    lines += ["", f"**Success rate** (%, mean ± std over {seeds_done(r)})", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n in cfg["tasks"]:
        lines.append(f"| {n} | " + " | ".join(cell(arms[a], n) for a in names) + " |")
    def in_pct(d):
        return {k: None if d.get(k) is None else 100 * d[k] for k in ("mean", "low", "high")}

    def mean_of(by_seed):
        return sum(by_seed.values()) / len(by_seed) if by_seed else None

    lines.append("| **mean** [95 % t-interval] | "
                 + " | ".join(f"**{_interval(in_pct(arms[a]['mean_success']), '.1f')}**" for a in names) + " |")
    lines.append("| mean-weight ablation | "
                 + " | ".join(pct(mean_of(arms[a].get("ablated_mean_success_by_seed"))) for a in names) + " |")
    lines += ["", "**Paired over seeds** (points; 95 % t-interval)", "",
              "| arm | factorized − monolithic | failure-rate ratio (mono / fact) | mean-weight ablation cost | "
              "gain ≥ 5, low > 0 | ablation ≥ 5 | pays |", "|---|---|---|---|---|---|---|"]
    for a, m in r["metrics"].items():
        lines.append(f"| {a} | {_interval(m['difference_points'])} | {num(m['failure_rate_ratio'], '.2f')} | "
                     f"{_interval(m['mean_weight_ablation_cost_points'])} | {m['gain_met']} | "
                     f"{m['through_routing_met']} | **{m['factorization_pays']}** |")
    st = r.get("strategies")
    if st:
        lines += ["", f"**Strategies, paired** (seeds {', '.join(map(str, st['paired_seeds']))}): tanh − soft "
                  f"{_interval(st['tanh_minus_soft_points'])} points; better strategy shown: "
                  f"**{st['better_strategy_shown'] or 'neither (the interval holds 0)'}**."]
    if r.get("adaptation"):
        ad = r["config"].get("adapt", {})
        lines += ["", f"**Adaptation** to {', '.join(ad.get('tasks', []))} ({ad.get('steps')} steps on their demos "
                  "alone; new-task success %, forgetting = old-task mean before − after, points; 95 % t-intervals)",
                  "", "| arm | method | trainable parameters | new tasks | forgetting |", "|---|---|---|---|---|"]
        for a, methods in r["adaptation"].items():
            for m, d in methods.items():
                lines.append(f"| {a} | {m} | {d['trainable_params']} | {_interval(d['new_points'], '.1f')} | "
                             f"{_interval(d['forgetting_points'], '.1f')} |")
    c = r["criteria"]
    before = r["wall_time_s"].get("before_resume") or 0
    wall = r["wall_time_s"]["total"] + before
    lines += ["", f"Factorization pays (some factorized arm meets both criteria): **{c.get('factorization_pays')}**"
              + ("" if c.get("complete") else " (the run is incomplete)") + ".", "",
              f"Wall time: {wall:.0f} s ({wall / 60:.1f} min)"
              + (f" (resumed: {before:.0f} s before, {r['wall_time_s']['total']:.0f} s in the last sitting)"
                 if before else "")
              + f" with {r['hardware']['parallel_jobs']} parallel jobs on {r['hardware']['cpu_count']} CPUs."]
    return "\n".join(lines)


def plot_unsaturated(r: dict, path: str) -> None:
    """Grouped bars: each arm's per-task success (mean over seeds, std as error bars), and its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, tasks = r["arms"], r["config"]["tasks"]
    labels = [t.removesuffix("-v3") for t in tasks] + ["mean"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels), 3.6))
    width = 0.8 / max(1, len(arms))
    for i, (a, d) in enumerate(arms.items()):
        m = [100 * d["per_task_mean"].get(t, float("nan")) for t in tasks] + [100 * d["mean_success"]["mean"]]
        e = [100 * d["per_task_std"].get(t, 0.0) for t in tasks] + [100 * (d["mean_success"].get("sd") or 0.0)]
        x = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(x, m, width, yerr=e, capsize=2, label=f"{a} (lr {d['lr']:g})")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"MetaWorld, no task id: per-task success over {seeds_done(r)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        res = json.load(fh)
    if res.get("protocol") == "unsaturated":
        print(tables_unsaturated(res))
        if "--plot" in sys.argv:
            plot_unsaturated(res, sys.argv[sys.argv.index("--plot") + 1])
    else:
        print(tables_v2(res) if res.get("schema") == 2 else tables(res))
