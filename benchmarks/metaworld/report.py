"""Markdown tables from a MetaWorld results JSON (what docs/metaworld.md shows).

    python benchmarks/metaworld/report.py benchmarks/results/metaworld-<date>.json
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


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(tables(json.load(fh)))
