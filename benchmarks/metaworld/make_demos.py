"""Generate MetaWorld v3 demonstrations with the scripted experts (only successful episodes kept).

    python benchmarks/metaworld/make_demos.py --n-demos 40 [--cache-dir DIR] [--tasks door-open-v3 ...]

Writes ``DIR/demos/<task>_n<N>_s<seed>.npz`` (obs, actions, episode lengths, the variations'
rand_vecs); an existing file is reused. Default tasks: the 6 multitask and the 4 adaptation tasks.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mw_common as mw  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-demos", type=int, default=40)
    ap.add_argument("--seed", type=int, default=mw.DEMO_SEED, help="first MT1 seed of the demo variations")
    ap.add_argument("--cache-dir", default=mw.DEFAULT_CACHE)
    ap.add_argument("--tasks", nargs="+", default=mw.ALL_TASKS)
    args = ap.parse_args(argv)
    t = mw.timer()
    demos = mw.get_demos(args.cache_dir, args.tasks, args.n_demos, args.seed)
    for name, d in demos.items():
        steps = sum(len(a) for a in d["actions"])
        print(f"{name:20s} {len(d['actions'])} demos ({d['tried']} tried), {steps} steps -> "
              f"{mw.demo_path(args.cache_dir, name, args.n_demos, args.seed)}")
    print(f"done in {t()} s")


if __name__ == "__main__":
    main()
