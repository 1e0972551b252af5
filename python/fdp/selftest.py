"""``fdp selftest``: is every backend correct on this machine, and how fast? One command, no network.

Correctness: every available backend but the ``torch`` reference runs a grid of
policies (MLP and a small U-Net; K; batch; weight dtype; DDIM-10 and DDPM-100)
in child processes (:mod:`fdp.isolation`: one child per backend, a new one
after a case that hangs or kills it), and each output is compared here with
the torch reference (float32, TF32 off) by :func:`fdp.tolerances.rel_error`
against the bound ``backend="auto"`` uses (:func:`fdp.tolerances.tolerance`).
A case a backend cannot serve is ``unsupported`` (not a failure).

Timing (CUDA only): ``fdp bench`` in a child process, for the eager loop, the
CUDA-graph baseline and every backend that passed, on the MLP at K = 4,
batch 1, DDIM-10: kernel-only device time (the captured graph replayed
alone), whole-call device time and host time per call.

Output: one JSON (schema below) and a short summary; exit status 1 if any
backend failed or disagreed (or a timed path did), else 0. On a machine with
no CUDA the grid shrinks to what the CPU can check quickly, and only backends
that run here take part (the Triton kernels only under ``TRITON_INTERPRET=1``).

JSON schema (``"schema": "fdp-selftest/1"``)::

    {"schema", "complete": bool (false: a partial result, saved while running), "passed": bool | null,
     "date", "command", "device", "seconds",
     "environment": {... as fdp bench's results: device, driver, cuda, torch, triton, fdp, commit ...},
     "grid": {"components", "K", "batch", "dtypes", "schedules"},
     "backends": {name: "checked" | why not},
     "cases": [{"backend", "component", "K", "batch", "dtype", "scheduler", "steps",
                "status": "ok" | "disagrees" | "failed" | "unsupported" | "pending" (not reported yet),
                "rel_error", "tolerance", "reason", "seconds"}, ...],
     "summary": {backend: {status: count}},
     "timing": null | {"status": "ok" | "failed" | "skipped", "reason", "results": <fdp bench JSON>,
                       "rows": [{"backend", "dtype", "step_kernel_us", "step_gpu_us", "host_us", "status"}]}}
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import isolation, tolerances
from ._validation import InvalidArgument

SCHEMA = "fdp-selftest/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = {"ddim": 10, "ddpm": 100}
#: The grid on a CUDA device (the issue's), and the one a CPU checks in seconds.
CUDA_GRID = dict(components=("mlp", "unet-small"), K=(1, 4, 8), batch=(1, 7, 256), dtypes=tuple(DTYPES),
                 schedules=("ddim", "ddpm"))
QUICK_GRID = dict(components=("mlp", "unet-small"), K=(1, 4), batch=(1, 7), dtypes=tuple(DTYPES),
                  schedules=("ddim",))
CPU_GRID = dict(components=("mlp-tiny",), K=(1, 2), batch=(1, 7), dtypes=tuple(DTYPES), schedules=("ddim",))
#: A component small enough for the Triton interpreter (same family as bench's "mlp").
TINY_MLP = dict(family="mlp", horizon=4, action_dim=2, cond_dim=8, hidden_dim=32, num_blocks=2, time_embed_dim=16)
#: The timing case (the design's performance targets): MLP H = 256, K = 4, batch 1, DDIM-10.
TIMING_ARGS = ["--component", "mlp", "--K", "4", "--batch", "1", "--steps", "ddim", "--dtype", "fp32,bf16"]
TIMING_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Case:
    component: str
    K: int
    batch: int
    dtype: str
    scheduler: str

    @property
    def steps(self) -> int:
        return SCHEDULES[self.scheduler]


def _policy(component: str, K: int, device):
    from .bench import paths

    if component != "mlp-tiny":
        return paths.make_policy(component, K, device)
    import fdp

    s = TINY_MLP
    torch.manual_seed(0)
    comps = [fdp.MLPDenoiser(s["action_dim"], s["horizon"], global_cond_dim=s["cond_dim"], hidden_dim=s["hidden_dim"],
                             num_blocks=s["num_blocks"], time_embed_dim=s["time_embed_dim"]) for _ in range(K)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(s["cond_dim"], K), s["horizon"], s["action_dim"])
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy.to(device).eval().requires_grad_(False)


def _inputs(policy, table, batch: int, device):
    g = torch.Generator().manual_seed(batch)
    shape = (batch, policy.horizon, policy.action_dim)
    cond = torch.randn(batch, policy.cond_dim, generator=g)
    x_T = torch.randn(shape, generator=g)
    noise = torch.randn((len(table), *shape), generator=g) if bool(table.adds_noise.any()) else None
    return tuple(None if t is None else t.to(device) for t in (cond, x_T, noise))


def _reference(policy, table, inputs):
    from .backends import get_backend
    from .backends.selection import _exact_float32

    with _exact_float32(), torch.no_grad():
        return get_backend("torch").prepare(policy, table, torch.float32).run(*inputs).cpu()


def run(device=None, *, grid: dict | None = None, backends: list[str] | None = None, timing: bool = True,
        timeout_s: float | None = None, out_dir: Path | None = None, command=None, save=None) -> dict:
    """Run the self-test; returns the result dict (see the module docstring).

    ``save(result)``, if given, is called with the partial result (``"complete": false``) whenever a
    backend's child process ends, so that a run stopped early still leaves what it found.
    """
    import fdp
    from fdp.backends import _MODULES, available_backends, get_backend
    from fdp.bench.paths import make_scheduler
    from fdp.bench.report import environment

    t0 = time.monotonic()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if grid is None:
        grid = CUDA_GRID if device.type == "cuda" else CPU_GRID
    info = available_backends(device)
    names = [n for n in info if n != "torch"] if backends is None else list(backends)
    status = {}
    ref_priority = get_backend("torch").priority
    for n in names:
        if n not in info:
            raise InvalidArgument(f"`--backends`: unknown backend {n!r}; registered: {list(info)}")
        status[n] = "checked" if info[n].available else info[n].reason
        be = get_backend(n) if info[n].available else None
        if backends is None and be is not None and be.priority <= ref_priority:
            # E.g. the Triton kernels in the interpreter: minutes on a CPU, and auto never uses them here.
            status[n] = (f"ranked below the torch reference here ({be.priority_note or f'priority {be.priority}'}); "
                         "name it in --backends to check it anyway")
    checked = [n for n in names if status[n] == "checked"]

    cases = [Case(*c) for c in itertools.product(grid["components"], grid["K"], grid["batch"], grid["dtypes"],
                                                 grid["schedules"])]
    policies: dict[tuple, torch.nn.Module] = {}
    tables, inputs, refs = {}, {}, {}
    rows, jobs, job_cases = [], [], []
    for name in checked:
        be = get_backend(name)
        used: dict[tuple, int] = {}
        todo = []
        for c in cases:
            pkey = (c.component, c.K)
            if pkey not in policies:
                policies[pkey] = _policy(c.component, c.K, device)
            if c.scheduler not in tables:
                tables[c.scheduler] = make_scheduler(c.scheduler).step_table(c.steps)
            policy, table = policies[pkey], tables[c.scheduler]
            row = dict(backend=name, component=c.component, K=c.K, batch=c.batch, dtype=c.dtype,
                       scheduler=c.scheduler, steps=c.steps, status="unsupported", rel_error=None,
                       tolerance=tolerances.tolerance(DTYPES[c.dtype], torch.float32), reason="", seconds=None)
            rows.append(row)
            reason = be.unsupported_reason(policy, table, DTYPES[c.dtype])
            if reason:
                row["reason"] = reason
                continue
            row["status"] = "pending"  # until its child reports
            ikey = (c.component, c.K, c.batch, c.scheduler)
            if ikey not in inputs:
                inputs[ikey] = _inputs(policy, table, c.batch, device)
                refs[ikey] = _reference(policy, table, inputs[ikey])
            used.setdefault(pkey, len(used))
            todo.append((row, ikey, isolation.Case(used[pkey], table, DTYPES[c.dtype], [inputs[ikey]])))
        if todo:
            order = sorted(used, key=used.get)
            jobs.append(isolation.Job(name, _MODULES[name], device, [policies[k] for k in order],
                                      [t[2] for t in todo]))
            job_cases.append(todo)
    summary: dict = {}
    result = {
        "schema": SCHEMA, "complete": False, "passed": None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command if command is not None else sys.argv), "device": str(device), "seconds": None,
        "environment": environment(device), "fdp": fdp.__version__, "grid": {k: list(v) for k, v in grid.items()},
        "backends": status, "cases": rows, "summary": summary, "timing": None,
    }

    def progress(i, outcomes):
        _fill(job_cases[i], outcomes, refs)
        if save is not None:
            summary.update(_summary(rows, checked))
            result["seconds"] = time.monotonic() - t0
            save(result)

    for todo, outcomes in zip(job_cases, isolation.run_isolated(jobs, timeout_s=timeout_s, on_progress=progress)):
        _fill(todo, outcomes, refs)  # the cases left unrun after too many crashes
    summary.update(_summary(rows, checked))
    bad = [r for r in rows if r["status"] in ("failed", "disagrees")]
    passed_backends = [n for n in checked if not any(r["backend"] == n for r in bad)]
    if timing:
        result["timing"] = _timing(device, passed_backends, out_dir)
    timing_bad = result["timing"] is not None and result["timing"]["status"] == "failed"
    result["passed"] = not bad and not timing_bad
    result["complete"] = True
    result["seconds"] = time.monotonic() - t0
    return result


def _summary(rows: list, names: list) -> dict:
    return {n: dict(collections.Counter(r["status"] for r in rows if r["backend"] == n)) for n in names}


def _fill(todo: list, outcomes: list, refs: dict) -> None:
    """The rows of the cases a child reported: compared with the reference here."""
    for (row, ikey, _), out in zip(todo, outcomes):
        if row["status"] != "pending":
            continue
        row["seconds"] = out.total_s
        if out.setup_error or out.error:
            row["status"], row["reason"] = "failed", out.setup_error or out.error
            continue
        got = out.outputs[0]
        if tuple(got.shape) != tuple(refs[ikey].shape):
            row["status"], row["reason"] = "failed", f"returned shape {tuple(got.shape)}"
            continue
        row["rel_error"] = tolerances.rel_error(got, refs[ikey])
        ok = row["rel_error"] <= row["tolerance"]
        row["status"] = "ok" if ok else "disagrees"
        if not ok:
            row["reason"] = f"relative error {row['rel_error']:.2e} > {row['tolerance']:.0e}"


def _timing(device, backends: list[str], out_dir: Path | None) -> dict:
    """``fdp bench`` in a child process: eager, the CUDA-graph baseline and the backends that passed."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "timing needs a CUDA device", "results": None, "rows": []}
    import importlib.util

    if importlib.util.find_spec("rich") is None:  # fdp bench's table; an optional extra
        return {"status": "skipped", "reason": "fdp bench needs the bench extra (pip install 'fdp[bench]')",
                "results": None, "rows": []}
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fdp-selftest-"))
    out = folder / "selftest-bench.json"
    argv = [sys.executable, "-m", "fdp", "bench", "--backends", ",".join(["eager", "cuda-graph", *backends]),
            *TIMING_ARGS, "--device", str(device), "--repeats", "30", "--budget", "2", "--no-plots",
            "--no-progress", "--out", str(out)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMING_TIMEOUT_S,
                              env={**os.environ, isolation.ISOLATE_ENV: "0"})
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"fdp bench did not finish within {TIMING_TIMEOUT_S} s",
                "results": None, "rows": []}
    if not out.exists():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        return {"status": "failed", "reason": f"fdp bench exited with status {proc.returncode}: {tail}",
                "results": None, "rows": []}
    results = json.loads(out.read_text())
    rows = [{k: c.get(k) for k in ("backend", "dtype", "status", "step_kernel_us", "step_gpu_us", "host_us",
                                   "skipped")} for c in results["cases"]]
    bad = [r for r in rows if r["status"] in ("error", "FAILED")]
    return {"status": "failed" if bad or proc.returncode else "ok",
            "reason": "; ".join(f"{r['backend']} {r['dtype']}: {r['status']} {r['skipped'] or ''}" for r in bad),
            "results": results, "rows": rows, "file": str(out)}


def summarize(result: dict) -> str:
    """The short human summary printed at the end."""
    lines = [f"fdp selftest on {result['environment'].get('device')} ({result['device']}), "
             f"torch {result['environment'].get('torch')}, fdp {result['fdp']}: "
             f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s"]
    for name, why in result["backends"].items():
        if why != "checked":
            lines.append(f"  {name:<18} not checked: {why}")
            continue
        counts = result["summary"].get(name, {})
        text = ", ".join(f"{counts[s]} {s}" for s in ("ok", "disagrees", "failed", "unsupported") if counts.get(s))
        lines.append(f"  {name:<18} {text or 'no case'}")
        for r in [r for r in result["cases"] if r["backend"] == name and r["status"] in ("failed", "disagrees")][:3]:
            lines.append(f"    {r['status']}: {r['component']} K={r['K']} batch={r['batch']} {r['dtype']} "
                         f"{r['scheduler']}-{r['steps']}: {r['reason'][:200]}")
    if not any(w == "checked" for w in result["backends"].values()):
        lines.append("  no backend besides the torch reference runs here: nothing to compare")
    t = result["timing"]
    if t is not None:
        lines.append(f"timing ({' '.join(TIMING_ARGS)}): {t['status']}" + (f": {t['reason']}" if t["reason"] else ""))
        if t["rows"]:
            lines.append(f"  {'path':<18} {'dtype':<5} {'kernel us/step':>14} {'device us/step':>14} "
                         f"{'host us/call':>12}  status")
            for r in t["rows"]:
                def f(v):
                    return "-" if v is None else f"{v:.2f}"
                lines.append(f"  {r['backend']:<18} {r['dtype']:<5} {f(r['step_kernel_us']):>14} "
                             f"{f(r['step_gpu_us']):>14} {f(r['host_us']):>12}  {r['status']}")
    return "\n".join(lines)
