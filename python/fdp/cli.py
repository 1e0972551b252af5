"""The ``fdp`` command line: ``fdp demo``, ``fdp info``."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from . import demo

    result = demo.run(out_dir=args.out, train_steps=args.train_steps, seed=args.seed, backend=args.backend,
                      progress=not args.no_progress)
    demo.print_report(result)
    return 0


def _info(args) -> int:
    import torch

    import fdp

    print(f"fdp {fdp.__version__}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    ext = fdp.extension_status()
    print("CUDA extension:", "available " + str({k: v for k, v in ext.items() if k not in ('available', 'reason')})
          if ext["available"] else f"unavailable: {ext['reason']}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"backends on {device}:")
    for name, info in fdp.available_backends(device).items():
        print(f"  {name:<18} {'yes' if info.available else 'no: ' + info.reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fdp", description="Fast sampling for factorized diffusion policies.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small factorized policy on a 2-D multitask set, sample, plot")
    p.add_argument("--out", default="fdp-demo", help="output folder for the plot and report (default: fdp-demo)")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("info", help="versions, the CUDA extension and which backends run here")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
