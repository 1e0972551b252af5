"""Does the specialisation loss make routing specialise? The ``fdp demo`` task set, both losses.

    python benchmarks/specialisation_demo.py [--seeds 0 1] [--train-steps 2000]

Trains the demo's policy (4 tasks with two modes each, K = 4 MLP components, a soft router
reading the one-hot task id; python/fdp/demo.py) once with the paper's loss and once with
``component_weight``/``balance_weight`` per seed, then reports per run the routing diagnostics
(fdp.diagnostics.routing on fresh demonstrations: normalised weight entropy, top weight, each
task's dominant component, composed / uniform-weight / per-component denoising errors) and the
demo's own sample quality (fraction of samples on a mode, per task). Writes
benchmarks/results/specialisation-demo-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

from fdp import demo  # noqa: E402
from fdp.diagnostics import format_routing  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--component-weight", type=float, default=1.0)
    ap.add_argument("--balance-weight", type=float, default=0.1)
    ap.add_argument("--skip-paper", action="store_true", help="train only with the specialisation loss (a sweep)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"specialisation-demo-{date}.json")
    losses = {"paper": (0.0, 0.0), "specialisation": (args.component_weight, args.balance_weight)}
    if args.skip_paper:
        del losses["paper"]
    runs = []
    for seed in args.seeds:
        for name, (cw, bw) in losses.items():
            with tempfile.TemporaryDirectory() as tmp:
                r = demo.run(out_dir=tmp, train_steps=args.train_steps, seed=seed, backend="torch", progress=False,
                             component_weight=cw, balance_weight=bw)
            rt = r["routing"]
            runs.append({"loss": name, "component_weight": cw, "balance_weight": bw, "seed": seed,
                         "train_seconds": r["train_seconds"], "final_loss": r["final_loss"],
                         "on_mode": {t["task"]: t["on_mode"] for t in r["tasks"]},
                         "mode_split": {t["task"]: t["mode_split"] for t in r["tasks"]}, "routing": rt})
            o = rt["overall"]
            print(f"\n== {name} loss (component_weight={cw}, balance_weight={bw}), seed {seed}: "
                  f"{r['train_seconds']} s, on a mode " + ", ".join(f"{t['task']} {t['on_mode']:.0%}" for t in r["tasks"])
                  + f"\n   entropy {o['entropy']:.3f}, top weight {o['top_weight']:.3f}, dominant per task "
                  + str([rt['tasks'][t]['dominant'] for t in rt["tasks"]]), flush=True)
            print(format_routing(rt), flush=True)
    res = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
           "date": date, "torch": torch.__version__, "train_steps": args.train_steps, "runs": runs}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
