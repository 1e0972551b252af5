"""``fdp bench --host``: the host time of a sampling call with the device work stubbed out, on any machine.

What a control loop pays on the CPU around the kernels, per call, for each way of calling:

- ``call``: ``Sampler.__call__`` with its defaults (argument checks including the finiteness
  check, the policy watch over every packed tensor, the noise draw);
- ``call, check_inputs=False`` and ``call, check_inputs=False, watch_policy=False``;
- ``static call``: ``sampler.prepare(B)`` (:class:`fdp.StaticCall`), given a tensor (one copy
  into its buffer), and ``static call, in place``: the features written into ``call.global_cond``.

Stubbed: the backend's prepared ``run`` returns a preallocated result (a Sampler path), the
StaticCall's graph replay does nothing. Everything fdp itself does per call runs: its Python, the
torch operations it issues (the noise draw, the input copy; each would be one kernel launch on a
GPU, counted in ``torch_ops``), the watch. Not included: the driver's own cost of a graph launch on
a GPU (``cudaGraphLaunch``, a few microseconds) and everything on the device.

The Sampler is built for a backend that packs the weights (``torch-batched``, as every GPU
backend does), so the policy watch reads every packed tensor, as it does for a GPU backend. The
U-Net case has the paper's structure (the number of tensors the watch reads) at a small width.
Each measure: ``repeats`` medians of ``calls`` calls; median, min and max over the repeats.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdp

from ..static_call import StaticCall
from .paths import make_scheduler
from .report import environment, now, write_json

SCHEMA = "fdp-bench-host/1"


@dataclass
class HostOptions:
    calls: int = 2000
    repeats: int = 7
    batch: int = 1
    out: str | None = None


class _StubRun:
    """A prepared backend whose ``run`` returns a preallocated result: the device work, stubbed."""

    def __init__(self, prepared, out: torch.Tensor):
        self._prepared, self._out = prepared, out
        self.noise_per_step = getattr(prepared, "noise_per_step", False)

    def run(self, *args, **kwargs) -> torch.Tensor:
        return self._out


class _OpCounter(TorchDispatchMode):
    """Counts the torch operations a call issues (views and metadata-only operations left out)."""

    def __init__(self):
        super().__init__()
        self.ops, self.copies = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func in _METADATA_ONLY):
            self.ops += 1
            self.copies += func in _COPIES
        return func(*args, **(kwargs or {}))


_aten = torch.ops.aten
_METADATA_ONLY = {_aten.detach.default}
_COPIES = {_aten.copy_.default, _aten._to_copy.default}


def _policies(device) -> dict:
    torch.manual_seed(0)
    mlp = fdp.FactorizedPolicy(
        [fdp.MLPDenoiser(2, 16, global_cond_dim=64, hidden_dim=256, num_blocks=2) for _ in range(4)],
        fdp.Router(64, 4), 16, 2).to(device)
    # The paper's U-Net structure (down_dims of three levels, FiLM scale): the tensor count of a K=4
    # paper-size policy at a width that builds in a second.
    unet = fdp.FactorizedPolicy(
        [fdp.ConditionalUnet1D(2, global_cond_dim=64, diffusion_step_embed_dim=16, down_dims=(16, 32, 64),
                               kernel_size=5, n_groups=8, cond_predict_scale=True) for _ in range(4)],
        fdp.Router(64, 4), 16, 2).to(device)
    return {"mlp K=4 H=256": mlp, "unet K=4 (paper structure)": unet}


def _time(fn, calls: int, repeats: int) -> list[float]:
    for _ in range(min(calls, 200)):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return per_call


def _count(fn) -> tuple[int, int]:
    with _OpCounter() as counter:
        fn()
    return counter.ops, counter.copies


def _paths(policy, batch: int, device):
    sched = make_scheduler("ddim")
    cond = torch.randn(batch, policy.cond_dim, device=device)
    out = torch.zeros(batch, policy.horizon, policy.action_dim, device=device)

    def sampler(**kw):
        s = fdp.Sampler(policy, sched, num_inference_steps=10, backend="torch", **kw)
        # A packing backend's watch (every tensor), whatever backend runs here.
        s._watch = fdp._watch.PolicyWatch(policy, weights=True)
        s._prepared = _StubRun(s._prepared, out)
        return s

    s_default = sampler()
    s_nocheck = sampler(check_inputs=False)
    s_bare = sampler(check_inputs=False, watch_policy=False)
    static = StaticCall(sampler(), batch)
    static._replay = lambda: None  # the graph replay, stubbed
    static.out = out
    static.global_cond.copy_(cond)
    return {
        "call": lambda: s_default(cond),
        "call, check_inputs=False": lambda: s_nocheck(cond),
        "call, check_inputs=False, watch_policy=False": lambda: s_bare(cond),
        "static call": lambda: static(cond),
        "static call, in place": lambda: static(),
    }


def run_host(opts: HostOptions) -> dict:
    """Measure every path of every case; returns the results dict (schema ``fdp-bench-host/1``)."""
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = []
        for name, policy in _policies(device).items():
            tensors = sum(1 for _ in policy.parameters()) + sum(1 for _ in policy.buffers())
            paths = []
            for path, fn in _paths(policy, opts.batch, device).items():
                us = _time(fn, opts.calls, opts.repeats)
                ops, copies = _count(fn)
                paths.append({"path": path, "host_us": us, "median_us": statistics.median(us), "min_us": min(us),
                              "max_us": max(us), "torch_ops": ops, "copies": copies})
            cases.append({"case": name, "batch": opts.batch, "schedule": "ddim 10", "tensors": tensors,
                          "paths": paths})
    finally:
        torch.set_num_threads(threads)
    return {"schema": SCHEMA, "date": now().isoformat(timespec="seconds"),
            "command": "fdp bench --host", "calls": opts.calls, "repeats": opts.repeats,
            "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "torch_threads": 1},
            "environment": environment(device), "stubbed": "the backend's run / the static call's graph replay",
            "cases": cases}


def print_host(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for case in result["cases"]:
        table = Table(title=f"{case['case']}, batch {case['batch']}, {case['schedule']} ({case['tensors']} tensors): "
                            "host µs per call, device work stubbed")
        for col in ("path", "median µs", "min", "max", "torch ops", "copies"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for p in case["paths"]:
            table.add_row(p["path"], f"{p['median_us']:.1f}", f"{p['min_us']:.1f}", f"{p['max_us']:.1f}",
                          str(p["torch_ops"]), str(p["copies"]))
        console.print(table)


def run_and_report_host(opts: HostOptions) -> int:
    from pathlib import Path

    result = run_host(opts)
    print_host(result)
    if opts.out:
        path = write_json(result, Path(opts.out))
        print(f"results: {path}")
    return 0
