"""Timing a sampling call: warm-up out of the numbers, GPU time and host wall time per repeat.

Each repeat times one whole sampling call of a path, with the inputs of a
different pre-generated set (``idx = repeat % n_sets``) so that no cache
holds exactly the last call's data:

- **host wall time**: ``time.perf_counter()`` from before the call until its
  result is ready (on CUDA, until the end event has completed), i.e. the
  latency a control loop sees, Python and launch overhead included;
- **GPU time** (CUDA only): CUDA events recorded on the current stream right
  before and right after the call. The device is synchronised before every
  repeat, so a call never overlaps the previous one;
- **host time**: ``perf_counter()`` from before the call until the Python
  call returns, without waiting for the GPU: what the call costs the CPU
  (argument checks, Python, launches, copies; a call that synchronises
  inside waits for the GPU there, and that wait counts). On the CPU all of
  a call is host work: host time is the wall time.

:func:`count_launches` profiles one call (``torch.profiler``) and counts the
kernel and graph launches it makes on the host (and its memory copies).

Warm-up calls (compilation, CUDA-graph capture, cuDNN autotuning, allocator
growth) run first and are not recorded. A per-path time budget caps the
number of repeats of slow paths (never below ``min_repeats``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Measurement:
    call_wall_us: list[float]          # every repeat, microseconds
    call_gpu_us: list[float] | None    # every repeat (CUDA), else None
    warmup: int
    call_host_us: list[float] | None = None  # every repeat: until the call returned, GPU work not waited for

    @property
    def repeats(self) -> int:
        return len(self.call_wall_us)


def summarize(values: list[float] | None) -> dict | None:
    """Median, interquartile range, min and max of ``values`` (None for None or empty)."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(a, [25, 50, 75])
    return {"median": float(q50), "iqr": float(q75 - q25), "min": float(a.min()), "max": float(a.max())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[int], object], device: torch.device | str, *, n_sets: int, repeats: int, warmup: int,
            budget_s: float = math.inf, min_repeats: int = 3) -> Measurement:
    """Time ``fn(idx)`` (one sampling call on input set ``idx``) ``repeats`` times after ``warmup`` calls.

    Stops early once ``budget_s`` seconds of timed calls have passed and at
    least ``min_repeats`` (or ``repeats`` if fewer) were recorded.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for w in range(warmup):
        fn(w % n_sets)
    _sync(device)
    floor = min(min_repeats, repeats)
    wall: list[float] = []
    host: list[float] = []
    gpu: list[float] | None = [] if cuda else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)] if cuda else None
    spent = 0.0
    for r in range(repeats):
        idx = r % n_sets
        if cuda:
            start, end = events[r]
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            start.record()
            fn(idx)
            t_host = time.perf_counter()
            end.record()
            end.synchronize()
            t1 = time.perf_counter()
            gpu.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(idx)
            t1 = t_host = time.perf_counter()
        wall.append((t1 - t0) * 1e6)
        host.append((t_host - t0) * 1e6)
        spent += t1 - t0
        if spent > budget_s and r + 1 >= floor:
            break
    return Measurement(call_wall_us=wall, call_gpu_us=gpu, warmup=warmup, call_host_us=host)


# CUDA runtime / driver calls that start work on a stream: kernels (cudaLaunchKernel[ExC], cuLaunchKernel[Ex],
# cooperative launches) and graphs (cudaGraphLaunch, cuGraphLaunch); and copies / fills.
_LAUNCH = re.compile(r"^cu(da)?(Graph)?Launch")
_COPY = re.compile(r"^cu(da)?Mem(cpy|set)")


def count_launches(fn: Callable[[int], object], device: torch.device | str, idx: int = 0) -> tuple[int, int]:
    """``(launches, copies)`` that one call ``fn(idx)`` makes on the host, from ``torch.profiler``.

    Warm ``fn`` up first (compilation, graph capture). A replayed CUDA graph is one launch however
    many kernels it holds. CUDA only.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"counting kernel launches needs a CUDA device, got {device}")
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(idx)
        _sync(device)
    names = [e.name for e in prof.events()]
    return sum(bool(_LAUNCH.match(n)) for n in names), sum(bool(_COPY.match(n)) for n in names)
