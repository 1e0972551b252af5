"""The ``fdp`` command line: ``fdp demo``, ``fdp info``, ``fdp bench``, ``fdp tune``, ``fdp selftest``,
``fdp export``.

A mistake in what was passed (an option, a file) is one line on stderr,
``fdp <command>: error: ...``, and exit status 2; each command checks its
options and files before it starts work. Anything else is a bug in fdp: its
traceback, a line asking to report it, and exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

from ._optional import MissingExtra
from ._validation import InvalidArgument, UserError

_BUG = ("this is a bug in fdp, not in what you passed: please report it in fdp's issue tracker with the traceback "
        "above, the command line and the output of `fdp info`")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (argparse prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _demo(args) -> int:
    from . import demo
    from ._validation import check_output_path

    check_output_path("--out", args.out, folder=True)
    result = demo.run(out_dir=args.out, train_steps=args.train_steps, seed=args.seed, backend=args.backend,
                      progress=not args.no_progress, quick=args.quick)
    demo.print_report(result)
    return 0


def _info(args) -> int:
    import torch

    import fdp
    from fdp._extension import describe_archs
    from fdp._validation import check_device

    if args.device is not None:
        check_device("device", args.device)  # before anything is printed

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
        archs = describe_archs(ext)
        print(f"CUDA extension fdp._C: built (CUDA runtime {v // 1000}.{v % 1000 // 10})"
              + (f" for {archs}" if archs else ""))
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
    backends = fdp.available_backends(device)  # a bad --device: a UserError, one line
    from .backends import DISABLE_ENV, disabled_backends
    from .isolation import ISOLATE_ENV, enabled

    value = os.environ.get(DISABLE_ENV, "").strip()
    removed = ", ".join(disabled_backends()) or "nothing"
    print(f"kill switch {DISABLE_ENV}: " + (f"{value!r} (removes {removed})" if value else "not set"))
    print(f"isolated first use ({ISOLATE_ENV}): {'on' if enabled() else 'off'}")
    print(f"backends on {device}:")
    for name, info in backends.items():
        print(f"  {name:<18} {'available' if info.available else 'not available: ' + info.reason}")
    return 0


def _bench(args, argv=None) -> int:
    if args.host:
        from .bench.host import HostOptions, run_and_report_host

        batch = str(args.batch or 1)
        if not batch.isdigit() or int(batch) < 1:
            raise InvalidArgument(f"`--batch`: --host times one batch size (a positive int), got {args.batch!r}")
        return run_and_report_host(HostOptions(calls=args.calls, batch=int(batch), out=args.out))
    from .bench import Options, run_and_report

    opts = Options(quick=args.quick, backends=args.backends, batch=args.batch, K=args.K, component=args.component,
                   steps=args.steps, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                   budget_s=args.budget, input_sets=args.input_sets, device=args.device, out=args.out,
                   plots=not args.no_plots, progress=not args.no_progress, nvtx=args.nvtx, seed=args.seed,
                   threads=args.threads, wide=args.wide,
                   command=list(sys.argv) if argv is None else ["fdp", *argv])
    return run_and_report(opts)  # options are checked before the benchmark runs; a path's failure is a result


def _tune(args) -> int:
    import json

    import torch

    from fdp._validation import FLOAT_DTYPE_NAMES, check_device_usable
    from fdp.backends import VerificationError, get_backend, select
    from fdp.bench.cases import SCHEDULES
    from fdp.bench.paths import make_policy, make_scheduler

    device = check_device_usable("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend != "auto":
        get_backend(args.backend)
    if args.policy:
        policy = load_policy(args.policy, device, trust_pickle=args.trust_pickle)
    else:
        policy = make_policy(args.component, args.K, device)
    dtype = FLOAT_DTYPE_NAMES[args.dtype]
    table = make_scheduler(args.steps).step_table(SCHEDULES[args.steps])
    try:
        _, _, sel = select(args.backend, policy, table, device, dtype, batch_size=args.batch,
                           verify=args.backend != "auto", use_cache=not args.refresh)
    except VerificationError as exc:  # a finding about the backend, not a usage error
        print(f"fdp tune: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(sel.to_dict(), indent=1) if args.json else sel)
    return 0


def _selftest(args) -> int:
    import json
    from pathlib import Path

    from . import selftest

    grid = None
    if args.quick:
        grid = selftest.QUICK_GRID
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    from ._validation import check_device_usable, check_output_path

    out = check_output_path("--out", Path(args.out))  # --timeout: checked by argparse
    if args.device is not None:
        check_device_usable("--device", args.device)

    def save(result):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)

    # An unknown --backends name is a UserError (one line, exit 2); any other exception is a bug.
    result = selftest.run(args.device, grid=grid, backends=backends, timing=not args.no_timing,
                          timeout_s=args.timeout, out_dir=out.parent, command=["fdp", *sys.argv[1:]], save=save)
    save(result)
    print(selftest.summarize(result))
    print(f"results: {out}")
    if not result["passed"]:
        print("Please open an issue in fdp's tracker with this summary and the results file attached "
              f"({out}), and the output of `fdp info`.")
    return 0 if result["passed"] else 1


def _safe_globals() -> list:
    """What a torch.save'd fdp.FactorizedPolicy is made of: fdp's and torch.nn's modules, fdp's schedulers.

    ``torch.load(weights_only=True)`` builds only these classes (without running their ``__init__``)
    and tensors; a pickle that names anything else (a function to call, say) is refused."""
    import torch
    from torch import nn

    from . import _state, mlp, policy, router, schedulers, unet

    allowed = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, nn.Module)]
    for module in (mlp, policy, router, unet):
        allowed += [c for c in vars(module).values()
                    if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == module.__name__]
    # A scheduler keeps its recent step tables (an LRU of StepTables) in its state.
    allowed += [schedulers.DDPMScheduler, schedulers.DDIMScheduler, schedulers.SchedulerConfig, schedulers.StepTable,
                _state.LRU, torch.Size]
    return allowed


def load_policy(path, device, *, trust_pickle: bool = False):
    """The :class:`fdp.FactorizedPolicy` that ``torch.save`` wrote to ``path``, on ``device``.

    By default the file is read with ``torch.load(weights_only=True)``: tensors and fdp's and torch's module
    classes only, so that it cannot run code. ``trust_pickle=True`` unpickles it fully, which runs any code
    the file holds: only for files you trust (e.g. a policy holding a component class of your own).
    """
    import pickle
    import zipfile
    from pathlib import Path

    import torch

    import fdp
    from fdp._validation import InvalidFile, MissingFile

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"`--policy` {path} does not exist (or is not a file); expected a torch.save'd "
                          "fdp.FactorizedPolicy")
    try:
        if trust_pickle:
            policy = torch.load(path, map_location=device, weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                policy = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise InvalidFile(f"`--policy` {path} cannot be unpickled: {str(exc).splitlines()[0]}") from None
        # torch names what it refused on a line of its own ("Unsupported global: ...", "... unsupported GLOBAL ...")
        why = next((line.strip() for line in str(exc).splitlines() if "global" in line.lower()),
                   "it names a Python object to build")
        raise InvalidFile(f"`--policy` {path} holds more than fdp's modules and tensors "
                          f"({why}); pass --trust-pickle to unpickle it anyway, which runs any code "
                          "the file holds: only for a file you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        # torch.load's errors for a truncated or foreign file
        raise InvalidFile(f"`--policy` {path} is not a readable torch.save file (truncated or another "
                          f"format?): {_first_line(exc)}") from None
    if not isinstance(policy, fdp.FactorizedPolicy):
        raise InvalidFile(f"`--policy` {path} holds a {type(policy).__name__}, expected a torch.save'd "
                          "fdp.FactorizedPolicy")
    return policy


def _first_line(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message (torch's go on with advice for its own developers)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def _export_onnx(args) -> int:
    from . import export
    from .integrations import lerobot

    from ._validation import check_output_path

    check_output_path("out", args.out)
    sampler = lerobot.load_pretrained(args.source, backend="torch", num_inference_steps=args.num_inference_steps,
                                      device="cpu")
    result = export.onnx(sampler, args.out, args.batch_size)
    print(f"wrote {result.path}: inputs {', '.join(result.input_names)} (batch {result.batch_size}, "
          f"{result.num_steps} steps unrolled), output actions; onnxruntime matches the sampler's loop run in float64 to "
          f"{result.max_abs_error:.2g} (derived rounding bound {result.tolerance:.2g})")
    return 0


def main(argv=None) -> int:
    from . import demo

    parser = _Parser(prog="fdp", description="Fast sampling for factorized diffusion policies.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small factorized policy on a 2-D multitask set, sample, plot",
                       description="Train K = 4 MLP components and a soft router on four 2-D tasks with two "
                                   "modes each (on the CPU), sample with DDIM through fdp.Sampler, print how the "
                                   "samples cover each task's modes and the router's weights, and plot them.")
    p.add_argument("--out", default="fdp-demo", help="folder for samples.png and report.json (default: fdp-demo)")
    p.add_argument("--train-steps", type=_positive_int, default=None,
                   help="training steps (AdamW, batch 256); more cover the modes better "
                        f"(default: {demo.TRAIN_STEPS}, or {demo.QUICK_TRAIN_STEPS} with --quick)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
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
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed calls per path and case (default 20 quick, 50 full)")
    p.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--budget", type=_positive_float, default=None,
                   help="seconds of timed calls per path and case before stopping early, at least 3 repeats "
                        "(default 3 quick, 10 full)")
    p.add_argument("--input-sets", type=_positive_int, default=4,
                   help="pre-generated input sets timed calls rotate among")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="results JSON (default: fdp-bench/<device>-<date>.json in the current directory); "
                        "plots go beside it")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wide", action="store_true",
                   help="the full table (about 200 columns: floor, host time, chunks/s, launches); default: compact")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (as FDP_NVTX=1) for an Nsight trace")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU intra-op threads (default: torch's; 1 for --quick on a CPU)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--host", action="store_true",
                   help="host time per call only, device work stubbed (runs on a CPU): the default call, without "
                        "checks, without the watch, and the static call (sampler.prepare); --batch (one size) and "
                        "--out apply")
    p.add_argument("--calls", type=_positive_int, default=2000, help="--host: calls per timed repeat (default 2000)")
    p.set_defaults(func=functools.partial(_bench, argv=argv))

    p = sub.add_parser("tune", help="which backend backend='auto' picks for a policy here, and why: each backend "
                                    "checked against torch, timed on CUDA, the decision cached")
    p.add_argument("--policy", default=None,
                   help="a torch.save'd fdp.FactorizedPolicy (default: a random one of --component and --K), read "
                        "as weights only: tensors and fdp's and torch's module classes")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle --policy fully: this RUNS ANY CODE THE FILE HOLDS; only for a file you trust "
                        "(e.g. a policy with a component class of your own)")
    p.add_argument("--component", default="mlp", choices=["mlp", "unet-small", "unet-paper"],
                   help="the component configuration of fdp bench (default: mlp, K components of width 256)")
    p.add_argument("--K", type=_positive_int, default=4, help="components, without --policy (default 4)")
    p.add_argument("--steps", default="ddim", choices=["ddim", "ddpm"],
                   help="schedule: ddim (10 steps) or ddpm (100), as in fdp bench (default ddim)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    p.add_argument("--batch", type=_positive_int, default=1, help="the batch size to time at (default 1)")
    p.add_argument("--backend", default="auto", help="auto, or a backend name to verify against torch (default auto)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--refresh", action="store_true", help="ignore the cached decision: check and time again")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=_tune)

    p = sub.add_parser("selftest", help="check every backend against the torch reference in separate processes, "
                                        "and time them side by side on CUDA: what to attach to a bug report",
                       description="Correctness of every available backend on a grid of policies (MLP and a small "
                                   "U-Net, K, batch, fp32/bf16/fp16, DDIM-10 and DDPM-100), each backend in its own "
                                   "child process; on CUDA also the timing of eager, the CUDA-graph baseline and "
                                   "each backend that passed (kernel-only, whole-call device time, host time). "
                                   "Writes one JSON; exit status 1 if any backend failed or disagreed.")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (K 1,4; batch 1,7; DDIM-10 only)")
    p.add_argument("--backends", default=None, help="comma-separated backends to check (default: every one "
                                                    "available here but the torch reference)")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--timeout", type=_positive_float, default=None,
                   help="seconds a case may run in its child before it counts as hung (default: FDP_ISOLATE_TIMEOUT "
                        "or 300)")
    p.add_argument("--out", default="fdp-selftest.json", help="results JSON (default: fdp-selftest.json)")
    p.set_defaults(func=_selftest)

    p = sub.add_parser("export", help="write a policy's sampling loop to a file for other runtimes")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="a LeRobot diffusion policy folder as one ONNX graph: the whole loop "
                                        "unrolled, noise as inputs, checked in onnxruntime")
    p.add_argument("source", help="LeRobot policy folder (config.json + model.safetensors)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="the graph's fixed batch size (default 1)")
    p.add_argument("--num-inference-steps", type=_positive_int, default=None,
                   help="denoising steps to unroll (default: the policy config's)")
    p.set_defaults(func=_export_onnx)

    args = parser.parse_args(argv)
    prog = " ".join(["fdp", args.command] + ([args.format] if args.command == "export" else []))
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - sorted below: the user's mistake, or a bug
        if isinstance(exc, (UserError, MissingExtra)):
            print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.filename is not None:
            # The file system refused (a full disk, a permission): about a file, not about fdp.
            print(f"{prog}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"{prog}: internal error: {_BUG}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
