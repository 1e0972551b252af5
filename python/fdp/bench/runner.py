"""One benchmark run: every path on every case of the grid, in one process.

For each configuration of the grid: build one random policy (float32; for
bf16 cases its weights are rounded to bf16 first, so that every path sees
the same effective weights), pre-generate the input sets, compute the eager
float32 reference on set 0, then for each path: build it, check its result
on set 0 against the reference (relative L2 error; beyond the dtype's
tolerance the case is marked FAILED and left out of "best native"), time it
(:func:`fdp.bench.timing.measure`; on CUDA also count one call's kernel launches,
:func:`fdp.bench.timing.count_launches`) and attach the roofline numbers. Ratios
to the eager loop and to the best PyTorch-native path are filled in once
all paths of the configuration are done.
"""

from __future__ import annotations

import gc
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fdp
from fdp._optional import require
from fdp._validation import InvalidArgument, check_device_usable, check_output_path
from fdp.profiling import enable_nvtx, nvtx_range

from . import paths as P
from .cases import NATIVE_PATHS, Config, build_grid, expand_backends
from .paths import STATIC_SUFFIX
from .report import environment, now, default_out, print_table, write_json, write_plots
from .roofline import floor_us, measure_device, step_cost
from .timing import count_launches, measure, summarize

#: Relative L2 error against the eager float32 result above which a path is FAILED. fp32 leaves room for
#: TF32 convolutions (cuDNN's default) and reordered sums over 100 steps; bf16 for bf16 activations.
TOLERANCE = {"fp32": 5e-3, "bf16": 5e-2}


@dataclass
class Options:
    quick: bool = False
    backends: str | None = None
    batch: str | None = None
    K: str | None = None
    component: str | None = None
    steps: str | None = None
    dtype: str | None = None
    repeats: int | None = None       # default: 20 quick, 50 full
    warmup: int = 3
    budget_s: float | None = None    # timed seconds per path and case; default: 3 quick, 10 full
    input_sets: int = 4
    device: str | None = None
    out: str | None = None
    plots: bool = True
    progress: bool = True
    nvtx: bool = False
    seed: int = 0
    threads: int | None = None       # CPU intra-op threads; default: torch's, or 1 for --quick on a CPU
    wide: bool = False               # the full terminal table (about 200 columns) instead of the compact one
    command: list = field(default_factory=lambda: list(sys.argv))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().float().reshape(ref.shape)
    num = float(torch.linalg.vector_norm(out - ref))
    den = float(torch.linalg.vector_norm(ref))
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def _entry(cfg: Config, name: str, cost, floor, bound) -> dict:
    spec = dict(cfg.spec)
    spec.pop("family", None)
    spec["params_per_component"] = cost.params
    return {
        "component": cfg.family, "K": cfg.K, "batch": cfg.batch, "steps": cfg.steps, "scheduler": cfg.scheduler,
        "dtype": cfg.dtype, "config": spec, "backend": name,
        "kind": "native" if name in NATIVE_PATHS else "library",
        "status": "skipped", "skipped": None,
        "step_gpu_us": None, "call_wall_us": None, "raw_step_gpu_us": None, "raw_call_wall_us": [],
        "step_wall_us": None, "step_gpu_us_iqr": None, "step_gpu_us_min": None,
        "kernel_gpu_us": None, "step_kernel_us": None,
        "call_wall_us_iqr": None, "call_wall_us_min": None, "call_gpu_us": None,
        "host_us": None, "launches_per_call": None, "copies_per_call": None,
        "repeats": 0, "warmup": 0,
        "chunks_per_s": None, "chunks_per_s_gpu": None,
        "weight_bytes_per_step": cost.weight_bytes, "flops_per_step": cost.flops,
        "floor_us": floor, "floor_bound": bound, "fraction_of_floor": None,
        "speedup_vs_eager": None, "speedup_vs_best_native": None, "best_native": None,
        "rel_err": None, "tolerance": TOLERANCE[cfg.dtype],
    }


def _fill_timing(e: dict, m, steps: int, batch: int) -> None:
    wall = summarize(m.call_wall_us)
    e["raw_call_wall_us"] = list(m.call_wall_us)
    e["call_wall_us"] = wall["median"]
    e["call_wall_us_iqr"] = wall["iqr"]
    e["call_wall_us_min"] = wall["min"]
    e["step_wall_us"] = wall["median"] / steps
    e["host_us"] = summarize(m.call_host_us)["median"]
    e["chunks_per_s"] = batch * 1e6 / wall["median"]
    if m.call_gpu_us is not None:
        raw = [t / steps for t in m.call_gpu_us]
        g = summarize(raw)
        e["raw_step_gpu_us"] = raw
        e["step_gpu_us"] = g["median"]
        e["step_gpu_us_iqr"] = g["iqr"]
        e["step_gpu_us_min"] = g["min"]
        e["call_gpu_us"] = g["median"] * steps
        e["chunks_per_s_gpu"] = batch * 1e6 / e["call_gpu_us"]
    e["repeats"] = m.repeats
    e["warmup"] = m.warmup
    primary = e["step_gpu_us"] if e["step_gpu_us"] is not None else e["step_wall_us"]
    if e["floor_us"] is not None and primary:
        e["fraction_of_floor"] = e["floor_us"] / primary


def _time_kernels(e: dict, fn, device, repeats: int, budget: float, steps: int) -> None:
    """Kernel-only device time: the path's captured graph replayed alone (CUDA events), where it has one."""
    make = getattr(fn, "kernel_only", None)
    replay = make() if make is not None else None
    if replay is None:
        return
    m = measure(replay, device, n_sets=1, repeats=repeats, warmup=1, budget_s=budget)
    e["kernel_gpu_us"] = summarize(m.call_gpu_us)["median"]
    e["step_kernel_us"] = e["kernel_gpu_us"] / steps


def _primary(e: dict) -> float | None:
    return e["step_gpu_us"] if e["step_gpu_us"] is not None else e["step_wall_us"]


def _fill_ratios(entries: list[dict]) -> None:
    timed = [e for e in entries if e["status"] in ("ok", "FAILED") and _primary(e)]
    eager = next((e for e in timed if e["backend"] == "eager" and e["status"] == "ok"), None)
    natives = [e for e in timed if e["kind"] == "native" and e["status"] == "ok"]
    best = min(natives, key=_primary, default=None)
    for e in timed:
        if eager is not None:
            e["speedup_vs_eager"] = _primary(eager) / _primary(e)
        if best is not None:
            e["speedup_vs_best_native"] = _primary(best) / _primary(e)
            e["best_native"] = best["backend"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class _PolicyCache:
    """The last policy built: consecutive configurations differ only in batch or schedule."""

    def __init__(self):
        self.key = None
        self.policy = None

    def get(self, cfg: Config, device, seed: int):
        key = (cfg.component, cfg.K, cfg.dtype, str(device), seed)
        if key != self.key:
            self.policy = None
            gc.collect()
            policy = P.make_policy(cfg.component, cfg.K, device, seed=seed)
            if cfg.dtype != "fp32":
                policy = policy.to(cfg.torch_dtype).to(torch.float32)
            self.key, self.policy = key, policy
        return self.policy


def run(opts: Options):
    """Run the benchmark; returns ``(result dict, json path, png paths)``."""
    # Missing extras fail here, before minutes of timing, not at the report.
    require("rich", "bench", "fdp bench")
    if opts.plots:
        require("matplotlib", "bench", "fdp bench's plots (or pass --no-plots)")
    # So do bad options: before the benchmark runs, not when its results are written.
    if opts.out:
        check_output_path("--out", opts.out)
    device = check_device_usable("--device", opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = opts.threads
    if threads is None and opts.quick and device.type == "cpu":
        # The quick cases are too small to gain from intra-op threads, and on a shared machine a thread
        # that has to wait for a busy core turns a 10 us matmul into milliseconds.
        threads = 1
    if threads is not None and threads < 1:
        raise InvalidArgument(f"`--threads` must be a positive int, got {threads}")
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(opts, device)
    finally:
        torch.set_num_threads(saved)


def _run(opts: Options, device: torch.device):
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if opts.nvtx:
        enable_nvtx(True)
    grid = build_grid(opts.quick, components=opts.component, K=opts.K, batch=opts.batch, steps=opts.steps,
                      dtype=opts.dtype, backends=opts.backends, device=device)
    backends = [n for n in fdp.backends.backend_names() if n != "torch"]
    # Each backend, then each backend's static call (sampler.prepare: one graph replay per call on CUDA).
    library = backends + [f"{n}{STATIC_SUFFIX}" for n in backends]
    names, explicit = expand_backends(grid.backends, library)
    availability = fdp.available_backends(device)
    repeats = opts.repeats or (20 if opts.quick else 50)
    budget = opts.budget_s if opts.budget_s is not None else (3.0 if opts.quick else 10.0)
    if repeats < 1 or opts.warmup < 0 or opts.input_sets < 1:
        raise InvalidArgument("`--repeats` and `--input-sets` must be >= 1 and `--warmup` >= 0")

    when = now()
    env = environment(device)
    peaks = measure_device(device, grid.dtype)
    result = {
        **env,
        "command": list(opts.command),
        "date": when.isoformat(timespec="seconds"),
        "grid": "quick" if opts.quick else "full",
        "repeats": repeats, "warmup": opts.warmup, "input_sets": opts.input_sets, "budget_s": budget,
        "cpu_threads": torch.get_num_threads(),
        "peaks": peaks.as_json(),
        "tolerance": dict(TOLERANCE),
        "backends": {n: ("available" if i.available else i.reason) for n, i in availability.items()},
        "skipped_axes": list(grid.skipped),
        "cases": [],
    }
    configs = grid.configs()
    cache = _PolicyCache()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err_console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, disable=not opts.progress, transient=True)
    with progress:
        task = progress.add_task("fdp bench", total=len(configs) * len(names))
        for cfg in configs:
            entries = _run_config(cfg, names, explicit, device, peaks, repeats, budget, opts, cache, progress, task)
            _fill_ratios(entries)
            result["cases"] += entries
    cache.policy = None

    out = Path(opts.out) if opts.out else default_out(env["device"], when)
    write_json(result, out)
    pngs = write_plots(result, out) if opts.plots else []
    return result, out, pngs


def _run_config(cfg, names, explicit, device, peaks, repeats, budget, opts, cache, progress, task) -> list[dict]:
    spec = cfg.spec
    cost = step_cost(spec, cfg.K, cfg.batch, cfg.dtype)
    floor, bound = floor_us(cost, peaks, cfg.dtype)
    entries = []
    ctx = None
    try:
        policy = cache.get(cfg, device, opts.seed)
        scheduler = P.make_scheduler(cfg.scheduler)
        table = scheduler.step_table(cfg.steps)
        inputs = P.make_inputs(policy, table, cfg.batch, device, n_sets=opts.input_sets, seed=opts.seed + 1)
        ctx = P.Context(cfg, device, policy, scheduler, table, inputs, explicit)
        ref = P.reference(ctx)
        setup_error = None
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory building a large case: report, go on
        setup_error = _first_line(exc)
    used_compile = False
    for name in names:
        progress.update(task, description=f"{cfg.label()} [bold]{name}[/]")
        e = _entry(cfg, name, cost, floor, bound)
        entries.append(e)
        if setup_error is not None:
            e["status"], e["skipped"] = "error", f"setting up the case: {setup_error}"
            progress.advance(task)
            continue
        used_compile |= name.startswith("compile")
        fn = None
        try:
            with nvtx_range(f"bench {cfg.label()} {name}"):
                fn = P.build(name, ctx)
                with torch.no_grad():
                    out = fn(0)
                    err = rel_err(out, ref)
                e["rel_err"] = err
                e["status"] = "ok" if err <= TOLERANCE[cfg.dtype] else "FAILED"
                m = measure(fn, device, n_sets=len(ctx.inputs), repeats=repeats, warmup=opts.warmup,
                            budget_s=budget)
                if device.type == "cuda":
                    e["launches_per_call"], e["copies_per_call"] = count_launches(fn, device)
                    _time_kernels(e, fn, device, repeats, budget, cfg.steps)
            _fill_timing(e, m, cfg.steps, cfg.batch)
        except P.Skip as s:
            e["status"], e["skipped"] = "skipped", str(s)
        except Exception as exc:  # noqa: BLE001 - one path failing must not end the run
            e["status"], e["skipped"] = "error", _first_line(exc)
        finally:
            fn = None
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize(device)
                except RuntimeError:
                    pass
        progress.advance(task)
    ctx = None
    if used_compile:
        torch._dynamo.reset()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return entries


def run_and_report(opts: Options) -> int:
    """Run, print the table and where the files went; the exit status (1 if any path FAILED or raised)."""
    result, out, pngs = run(opts)  # first: it checks that rich is installed
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 200 if opts.wide else 100))
    print_table(result, console, wide=opts.wide)
    console.print(f"results: {out}")
    for p in pngs:
        console.print(f"plot:    {p}")
    failed = [c for c in result["cases"] if c["status"] == "FAILED"]
    errors = [c for c in result["cases"] if c["status"] == "error"]
    if failed:
        console.print(f"[bold red]{len(failed)} path(s) disagree with the eager result beyond their dtype's "
                      "tolerance (status FAILED)[/]")
    if errors:
        console.print(f"[bold red]{len(errors)} path(s) raised (status error): "
                      + "; ".join(f"{c['backend']}: {c['skipped']}" for c in errors[:5]) + "[/]")
    return 1 if failed or errors else 0
