"""The ``fdp`` command line: ``fdp demo``, ``fdp info``, ``fdp bench``, ``fdp tune``."""

from __future__ import annotations

import argparse
import functools
import sys

from ._optional import MissingExtra


def _demo(args) -> int:
    from . import demo

    result = demo.run(out_dir=args.out, train_steps=args.train_steps, seed=args.seed, backend=args.backend,
                      progress=not args.no_progress, quick=args.quick)
    demo.print_report(result)
    return 0


def _info(args) -> int:
    import torch

    import fdp

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fdp {fdp.__version__}, torch {torch.__version__} "
          f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} build), triton {triton_version}")

    ext = fdp.extension_status()
    if ext["available"]:
        v = ext["runtime_version"]
        print(f"CUDA extension fdp._C: built (CUDA runtime {v // 1000}.{v % 1000 // 10})")
    else:
        print(f"CUDA extension fdp._C: not built: {ext['reason']}")

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n))
        print(f"CUDA device: present ({names})")
    else:
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "torch.cuda.is_available() is False")
        if ext["available"] and ext["device_count"] > 0:
            why += f"; fdp._C sees {ext['device_count']} device(s), so torch is the one that cannot use them"
        elif ext["available"] and ext.get("error"):
            driver = ext["driver_version"]
            why += (f"; the CUDA runtime says: {ext['error']} "
                    f"({'no NVIDIA driver' if driver == 0 else f'driver {driver // 1000}.{driver % 1000 // 10}'})")
        print(f"CUDA device: none ({why})")

    device = args.device or ("cuda" if n else "cpu")
    try:
        backends = fdp.available_backends(device)
    except ValueError as exc:
        print(f"fdp info: error: --device: {exc}", file=sys.stderr)
        return 2
    print(f"backends on {device}:")
    for name, info in backends.items():
        print(f"  {name:<18} {'available' if info.available else 'not available: ' + info.reason}")
    return 0


def _bench(args, argv=None) -> int:
    from .bench import Options, run_and_report

    opts = Options(quick=args.quick, backends=args.backends, batch=args.batch, K=args.K, component=args.component,
                   steps=args.steps, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                   budget_s=args.budget, input_sets=args.input_sets, device=args.device, out=args.out,
                   plots=not args.no_plots, progress=not args.no_progress, nvtx=args.nvtx, seed=args.seed,
                   threads=args.threads, wide=args.wide,
                   command=list(sys.argv) if argv is None else ["fdp", *argv])
    try:
        return run_and_report(opts)
    except ValueError as exc:  # a bad filter or option value (paths report their own errors in the results)
        print(f"fdp bench: error: {exc}", file=sys.stderr)
        return 2


def _tune(args) -> int:
    import json

    import torch

    import fdp
    from fdp._validation import FLOAT_DTYPE_NAMES
    from fdp.backends import VerificationError, select
    from fdp.bench.cases import SCHEDULES
    from fdp.bench.paths import make_policy, make_scheduler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.policy:
        policy = torch.load(args.policy, map_location=device, weights_only=False)
        if not isinstance(policy, fdp.FactorizedPolicy):
            print(f"fdp tune: error: --policy {args.policy} holds a {type(policy).__name__}, expected a "
                  "torch.save'd fdp.FactorizedPolicy", file=sys.stderr)
            return 2
    dtype = FLOAT_DTYPE_NAMES[args.dtype]
    table = make_scheduler(args.steps).step_table(SCHEDULES[args.steps])
    try:
        if not args.policy:
            policy = make_policy(args.component, args.K, device)
        _, _, sel = select(args.backend, policy, table, device, dtype, batch_size=args.batch,
                           verify=args.backend != "auto", use_cache=not args.refresh)
    except (ValueError, VerificationError) as exc:
        print(f"fdp tune: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(sel.to_dict(), indent=1) if args.json else sel)
    return 0


def _export_onnx(args) -> int:
    from . import export
    from .integrations import lerobot

    try:
        sampler = lerobot.load_pretrained(args.source, backend="torch", num_inference_steps=args.num_inference_steps,
                                          device="cpu")
        result = export.onnx(sampler, args.out, args.batch_size)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"fdp export onnx: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: inputs {', '.join(result.input_names)} (batch {result.batch_size}, "
          f"{result.num_steps} steps unrolled), output actions; onnxruntime matches the sampler to "
          f"{result.max_abs_error:.2g} (tolerance {result.tolerance:.2g})")
    return 0


def main(argv=None) -> int:
    from . import demo

    parser = argparse.ArgumentParser(prog="fdp", description="Fast sampling for factorized diffusion policies.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small factorized policy on a 2-D multitask set, sample, plot",
                       description="Train K = 4 MLP components and a soft router on four 2-D tasks with two "
                                   "modes each (on the CPU), sample with DDIM through fdp.Sampler, print how the "
                                   "samples cover each task's modes and the router's weights, and plot them.")
    p.add_argument("--out", default="fdp-demo", help="folder for samples.png and report.json (default: fdp-demo)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps (AdamW, batch 256); more cover the modes better "
                        f"(default: {demo.TRAIN_STEPS}, or {demo.QUICK_TRAIN_STEPS} with --quick)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the training data and the sampling noise (default: 0)")
    p.add_argument("--backend", default="auto",
                   help="sampling backend: auto (the fastest that runs here) or a name from `fdp info` "
                        "(default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds (few steps, few samples): checks the setup, not the result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("info", help="versions, whether the CUDA extension was built, CUDA devices, "
                                    "and which backends run here (and why not the others)")
    p.add_argument("--device", default=None, help="device the backends are checked for (default: cuda if present)")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="time every sampler path side by side (eager, batched, compile, CUDA graph, "
                                     "fused backends), with roofline, plots and a JSON results file")
    p.add_argument("--quick", action="store_true",
                   help="smallest cases only: MLP, K 2,4, batch 1,16, DDIM 10, fp32; eager + batched + library backends")
    p.add_argument("--backends", default=None,
                   help="comma-separated paths: eager, batched, compile-reduce-overhead, compile-max-autotune, "
                        "cuda-graph, registry names (triton, ...), or the groups native, compile, fused")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (full grid: 1,16,256,1024)")
    p.add_argument("--K", default=None, help="comma-separated component counts (full grid: 1,2,4,8)")
    p.add_argument("--component", default=None, help="comma-separated: mlp, unet, unet-small, unet-paper (CUDA only)")
    p.add_argument("--steps", default=None, help="comma-separated schedules: ddim (10 steps), ddpm (100), or 10,100")
    p.add_argument("--dtype", default=None, help="comma-separated: fp32, bf16")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per path and case (default 20 quick, 50 full)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per path and case before stopping early, at least 3 repeats "
                        "(default 3 quick, 10 full)")
    p.add_argument("--input-sets", type=int, default=4, help="pre-generated input sets timed calls rotate among")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="results JSON (default: fdp-bench/<device>-<date>.json in the current directory); "
                        "plots go beside it")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wide", action="store_true",
                   help="the full table (about 200 columns: floor, host time, chunks/s, launches); default: compact")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (as FDP_NVTX=1) for an Nsight trace")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: torch's; 1 for --quick on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=functools.partial(_bench, argv=argv))

    p = sub.add_parser("tune", help="which backend backend='auto' picks for a policy here, and why: each backend "
                                    "checked against torch, timed on CUDA, the decision cached")
    p.add_argument("--policy", default=None,
                   help="a torch.save'd fdp.FactorizedPolicy (default: a random one of --component and --K)")
    p.add_argument("--component", default="mlp", choices=["mlp", "unet-small", "unet-paper"],
                   help="the component configuration of fdp bench (default: mlp, K components of width 256)")
    p.add_argument("--K", type=int, default=4, help="components, without --policy (default 4)")
    p.add_argument("--steps", default="ddim", choices=["ddim", "ddpm"],
                   help="schedule: ddim (10 steps) or ddpm (100), as in fdp bench (default ddim)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    p.add_argument("--batch", type=int, default=1, help="the batch size to time at (default 1)")
    p.add_argument("--backend", default="auto", help="auto, or a backend name to verify against torch (default auto)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--refresh", action="store_true", help="ignore the cached decision: check and time again")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=_tune)

    p = sub.add_parser("export", help="write a policy's sampling loop to a file for other runtimes")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="a LeRobot diffusion policy folder as one ONNX graph: the whole loop "
                                        "unrolled, noise as inputs, checked in onnxruntime")
    p.add_argument("source", help="LeRobot policy folder (config.json + model.safetensors)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--batch-size", type=int, default=1, help="the graph's fixed batch size (default 1)")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps to unroll (default: the policy config's)")
    p.set_defaults(func=_export_onnx)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MissingExtra as exc:
        print(f"fdp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
