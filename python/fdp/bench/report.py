"""What a run leaves behind: the results JSON, the terminal table and the plots.

JSON (other tools read it; the key names are fixed)::

    {"device", "device_type", "driver", "cuda", "torch", "triton", "fdp", "commit", "command", "date",
     "grid", "repeats", "warmup", "input_sets", "peaks": {"copy_GBps", "matmul_TFLOPS": {dtype: ...}},
     "tf32": {"matmul", "cudnn"}, "tolerance": {dtype: ...}, "backends": {name: "available" | reason},
     "skipped_axes": [...],
     "cases": [{"component", "K", "batch", "steps", "scheduler", "dtype", "config", "backend", "kind",
                "status", "skipped", "step_gpu_us", "call_wall_us", "raw_step_gpu_us", "raw_call_wall_us",
                "host_us", "launches_per_call", "kernel_gpu_us", "step_kernel_us", "floor_us",
                "fraction_of_floor", ...extras}, ...]}

See benchmarks/README.md for every field.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .._optional import require

#: Keys every case entry has (tests and readers rely on them).
CASE_KEYS = ("component", "K", "batch", "steps", "scheduler", "dtype", "config", "backend", "step_gpu_us",
             "call_wall_us", "raw_step_gpu_us", "raw_call_wall_us", "floor_us", "fraction_of_floor", "host_us",
             "launches_per_call", "kernel_gpu_us", "step_kernel_us")
#: Keys the top level has.
TOP_KEYS = ("device", "driver", "cuda", "torch", "triton", "commit", "command", "date", "cases")


# -- environment ----------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model or platform.processor() or platform.machine()}".strip()


def driver_version(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def git_commit() -> str | None:
    """HEAD of the repository the fdp package comes from (or of the working directory if it is fdp's), else None."""
    import fdp

    here = Path(fdp.__file__).resolve().parent
    candidates = [here]
    cwd = Path.cwd()
    if (cwd / "python" / "fdp").is_dir():
        candidates.append(cwd)
    for c in candidates:
        try:
            out = subprocess.run(["git", "-C", str(c), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    return None


def environment(device: torch.device) -> dict:
    import fdp

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "driver": driver_version(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "fdp": fdp.__version__,
        "commit": git_commit(),
        "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                 "cudnn": bool(torch.backends.cudnn.allow_tf32)},
    }


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).astimezone()


def default_out(device_label: str, when: _dt.datetime) -> Path:
    """Where a run's JSON goes without ``--out``: ``fdp-bench/`` in the current directory."""
    return Path("fdp-bench") / f"{slugify(device_label)}-{when.strftime('%Y-%m-%d-%H%M%S')}.json"


# -- JSON -----------------------------------------------------------------------------------------------------


def _clean(obj):
    """JSON-safe: NaN/Inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(result), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


# -- terminal table -------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".1f", none: str = "—") -> str:
    if v is None:
        return none
    return format(v, spec)


def _fmt_time(us) -> str:
    if us is None:
        return "—"
    if us >= 1e5:
        return f"{us / 1e3:,.0f} ms"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs"


def _fmt_rate(x) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_speed(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}×"


def print_table(result: dict, console=None, wide: bool = False) -> None:
    """The terminal table: compact (fits 100 columns: one title row per case, then a row per path) or,
    with ``wide``, every column; the JSON has every field either way."""
    require("rich", "bench", "fdp bench's table")
    from rich.console import Console

    console = console or Console()
    if wide:
        _print_wide(result, console)
    else:
        _print_compact(result, console)
    _print_notes(result, console, wide)


def _case_label(c) -> str:
    return f"{c['config']['name']} K={c['K']} B={c['batch']} {c['scheduler']}{c['steps']} {c['dtype']}"


_STATUS = {"ok": "[green]ok[/]", "FAILED": "[bold red]FAILED[/]", "error": "[red]error[/]"}


def _print_compact(result: dict, console) -> None:
    from rich import box
    from rich.table import Table

    cases = result["cases"]
    gpu = any(c["step_gpu_us"] is not None for c in cases)
    table = Table(title=f"fdp bench — {result['device']} (torch {result['torch']})", box=box.SIMPLE_HEAD,
                  header_style="bold", pad_edge=False)
    table.add_column("case / path", no_wrap=True)
    if gpu:
        table.add_column("step GPU", justify="right", no_wrap=True)
    table.add_column("call wall (IQR)", justify="right", no_wrap=True)
    table.add_column("vs eager", justify="right", no_wrap=True)
    table.add_column("rel err", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    width = len(table.columns)
    previous = None
    for c in cases:
        if c["status"] == "skipped":
            continue
        label = _case_label(c)
        if label != previous:
            table.add_row(f"[bold]{label}[/]", *[""] * (width - 1), end_section=False)
            previous = label
        row = [f"  {c['backend']}"]
        if gpu:
            row.append(_fmt_time(c["step_gpu_us"]))
        iqr = c.get("call_wall_us_iqr")
        row += [f"{_fmt_time(c['call_wall_us'])} ({_fmt_time(iqr)})" if c["call_wall_us"] is not None else "—",
                _fmt_speed(c.get("speedup_vs_eager")), _fmt(c.get("rel_err"), ".1e"), _STATUS[c["status"]]]
        table.add_row(*row)
    console.print(table)


def _print_wide(result: dict, console) -> None:
    from rich.table import Table

    cases = result["cases"]
    gpu = any(c["step_gpu_us"] is not None for c in cases)
    table = Table(title=f"fdp bench — {result['device']} (torch {result['torch']})", show_lines=False,
                  header_style="bold")
    for col, just in (("component", "left"), ("K", "right"), ("B", "right"), ("sched", "left"),
                      ("dtype", "left"), ("backend", "left")):
        table.add_column(col, justify=just, no_wrap=True)
    if gpu:
        table.add_column("step GPU", justify="right", no_wrap=True)
    table.add_column("step wall", justify="right", no_wrap=True)
    table.add_column("call wall (IQR)", justify="right", no_wrap=True)
    table.add_column("host/call", justify="right", no_wrap=True)
    if gpu:
        table.add_column("launches", justify="right", no_wrap=True)
    table.add_column("chunks/s", justify="right", no_wrap=True)
    table.add_column("vs eager", justify="right", no_wrap=True)
    table.add_column("vs best native", justify="right", no_wrap=True)
    table.add_column("floor", justify="right", no_wrap=True)
    table.add_column("% floor", justify="right", no_wrap=True)
    table.add_column("rel err", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    previous = None
    for c in cases:
        if c["status"] == "skipped":
            continue
        group = (c["config"]["name"], c["K"], c["batch"], c["scheduler"], c["dtype"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        status = _STATUS[c["status"]]
        row = [c["config"]["name"], str(c["K"]), str(c["batch"]), f"{c['scheduler']}{c['steps']}", c["dtype"],
               c["backend"]]
        if gpu:
            row.append(_fmt_time(c["step_gpu_us"]))
        iqr = c.get("call_wall_us_iqr")
        row += [
            _fmt_time(c.get("step_wall_us")),
            f"{_fmt_time(c['call_wall_us'])} ({_fmt_time(iqr)})" if c["call_wall_us"] is not None else "—",
            _fmt_time(c.get("host_us")),
        ]
        if gpu:
            row.append(_fmt(c.get("launches_per_call"), "d"))
        row += [
            _fmt_rate(c.get("chunks_per_s")),
            _fmt_speed(c.get("speedup_vs_eager")),
            _fmt_speed(c.get("speedup_vs_best_native")),
            _fmt_time(c["floor_us"]),
            _fmt(None if c["fraction_of_floor"] is None else 100 * c["fraction_of_floor"], ".3g"),
            _fmt(c.get("rel_err"), ".1e"),
            status,
        ]
        table.add_row(*row)
    console.print(table)


def _print_notes(result: dict, console, wide: bool) -> None:
    cases = result["cases"]
    gpu = any(c["step_gpu_us"] is not None for c in cases)
    skipped: dict[tuple, int] = {}
    for c in cases:
        if c["status"] in ("skipped", "error"):
            key = (c["backend"], c["status"], c["skipped"])
            skipped[key] = skipped.get(key, 0) + 1
    peaks = result.get("peaks") or {}
    rates = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in (peaks.get("matmul_TFLOPS") or {}).items())
    bw = peaks.get("copy_GBps")
    console.print(f"device: copy {_fmt(bw, '.1f')} GB/s, matmul {rates or '—'}; floor = max(weight bytes / copy "
                  "bandwidth, FLOPs / matmul rate) per step; speedups on "
                  + ("GPU time" if gpu else "wall time") + " per step.")
    if not wide:
        console.print("[dim]call wall: median per sampling call (interquartile range); every column (floor, host "
                      "time, chunks/s, launches) with --wide, every field in the JSON.[/]")
    if skipped:
        console.print("[dim]not timed:[/]")
        for (backend, status, reason), n in sorted(skipped.items(), key=lambda kv: (kv[0][0], str(kv[0][2]))):
            console.print(f"[dim]  {backend} ({n} case{'s' if n > 1 else ''}, {status}): {reason}[/]")
    for s in result.get("skipped_axes") or []:
        console.print(f"[dim]  {s}[/]")


# -- plots ----------------------------------------------------------------------------------------------------


def _primary(c) -> float | None:
    return c["step_gpu_us"] if c["step_gpu_us"] is not None else c.get("step_wall_us")


def _label_log_axis(axis, suffix: str = "") -> None:
    """Ticks at 1, 2, 3, 5 times each power of ten, labelled: a log axis within one decade
    (a 3-7x speedup) otherwise shows a single label."""
    import matplotlib.ticker

    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def write_plots(result: dict, json_path: Path) -> list[Path]:
    """Latency vs batch per backend, and speedup bars, one pair of PNGs per (component, schedule, dtype)."""
    require("matplotlib", "bench", "fdp bench's plots (or pass --no-plots)")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    cases = [c for c in result["cases"] if c["status"] in ("ok", "FAILED") and _primary(c) is not None]
    gpu = any(c["step_gpu_us"] is not None for c in cases)
    unit = "GPU time per step (µs)" if gpu else "wall time per step (µs)"
    groups: dict[tuple, list] = {}
    for c in cases:
        groups.setdefault((c["config"]["name"], c["scheduler"], c["steps"], c["dtype"]), []).append(c)
    written = []
    for (name, sched, steps, dtype), cs in groups.items():
        tag = f"{name}-{sched}{steps}-{dtype}"
        backends = list(dict.fromkeys(c["backend"] for c in cs))
        ks = sorted({c["K"] for c in cs})
        fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False, sharey=True)
        for ax, K in zip(axes[0], ks):
            for b in backends:
                pts = sorted((c["batch"], _primary(c)) for c in cs if c["K"] == K and c["backend"] == b)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batches = sorted({c["batch"] for c in cs})
            ax.set_xticks(batches)
            ax.set_xticklabels([str(b) for b in batches])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            _label_log_axis(ax.yaxis)
            ax.set_title(f"K = {K}")
            ax.set_xlabel("batch")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(unit)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{name}, {sched} {steps} steps, {dtype} — {result['device']}", fontsize=10)
        fig.tight_layout()
        p = Path(f"{stem}-latency-{tag}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

        points = sorted({(c["K"], c["batch"]) for c in cs})
        bars = [b for b in backends if b != "eager"]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(points) * max(1, len(bars)) * 0.35 + 2), 3.8))
        width = 0.8 / max(1, len(bars))
        for j, b in enumerate(bars):
            xs, ys = [], []
            for i, pt in enumerate(points):
                v = next((c.get("speedup_vs_eager") for c in cs if (c["K"], c["batch"]) == pt and c["backend"] == b),
                         None)
                if v:
                    xs.append(i + (j - (len(bars) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, label=b)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([f"K{k}\nB{b}" for k, b in points], fontsize=7)
        ax.set_yscale("log")
        _label_log_axis(ax.yaxis, "×")
        ax.set_ylabel("speedup vs eager (×)")
        ax.set_title(f"{name}, {sched} {steps} steps, {dtype} — {result['device']}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if bars:
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = Path(f"{stem}-speedup-{tag}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
