"""Micro-benchmarks (pytest-benchmark): the pieces of a sampling call, one at a time.

Not part of the test suite (``pytest`` from the repository root collects
``tests/`` only). Run them explicitly::

    pytest benchmarks/ --benchmark-columns=min,median,iqr,ops
    FDP_BENCH_DEVICE=cpu pytest benchmarks/          # force the CPU
    pytest benchmarks/ --benchmark-json=/tmp/micro.json

The policy is the benchmark grid's MLP (K = 4, width 256, 2 blocks, horizon
16 x 2), batch 16 (``FDP_BENCH_BATCH``), DDIM 10 steps. On CUDA every timed
function synchronises the device before returning, so the numbers are
latencies, not launch times.
"""

from __future__ import annotations

import os

import pytest
import torch

import fdp
from fdp.bench import paths as P
from fdp.bench.cases import DTYPES, Config
from fdp.packing import call_terms, pack_policy
from fdp.schedulers import apply_step

DEVICE = torch.device(os.environ.get("FDP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
BATCH = int(os.environ.get("FDP_BENCH_BATCH", "16"))
K = 4


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _timed(fn):
    def run():
        out = fn()
        _sync()
        return out

    return run


@pytest.fixture(scope="module")
def ctx():
    cfg = Config("mlp", K, BATCH, "ddim", 10, "fp32")
    policy = P.make_policy("mlp", K, DEVICE)
    sched = P.make_scheduler("ddim")
    table = sched.step_table(cfg.steps)
    return P.Context(cfg, DEVICE, policy, sched, table, P.make_inputs(policy, table, BATCH, DEVICE), set())


@torch.no_grad()
def test_router(benchmark, ctx):
    cond = ctx.inputs[0].cond
    benchmark(_timed(lambda: ctx.policy.weights(cond)))


@torch.no_grad()
def test_call_terms(benchmark, ctx):
    """Router + every per-call feature term of the K components (what fused backends precompute)."""
    cond = ctx.inputs[0].cond
    benchmark(_timed(lambda: call_terms(ctx.policy, cond, ctx.policy.weights(cond))))


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pack(benchmark, ctx, dtype):
    benchmark(_timed(lambda: pack_policy(ctx.policy, DTYPES[dtype])))


@torch.no_grad()
def test_eager_step(benchmark, ctx):
    """One step of the eager loop: K component forwards, their weighted sum, the scheduler update."""
    inp = ctx.inputs[0]
    weights = ctx.policy.weights(inp.cond)
    t = int(ctx.table.timesteps[0])

    def step():
        eps = ctx.policy.compose(inp.x_T, t, inp.cond, weights)
        return apply_step(ctx.table, 0, inp.x_T, eps)

    benchmark(_timed(step))


@torch.no_grad()
def test_batched_step(benchmark, ctx):
    """One step of the batched path (stacked weights, one bmm per layer for all K)."""
    model = P.BatchedMLP(ctx.policy, ctx.table, torch.float32)
    inp = ctx.inputs[0]
    terms = model.prep(inp.cond)
    x = inp.x_T.reshape(BATCH, -1)
    benchmark(_timed(lambda: model.step(x, model.coef[0], model.t_in[0], model.t_shift[0], None, *terms)))


def _library_backends():
    return [n for n in fdp.backends.backend_names() if n != "torch"]


@torch.no_grad()
@pytest.mark.parametrize("name", _library_backends())
def test_fused_step(benchmark, ctx, name):
    """One whole sampling call of one step through a library backend (per-call terms included)."""
    info = fdp.available_backends(DEVICE)[name]
    if not info.available:
        pytest.skip(info.reason)
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET=1: the Triton interpreter's timings mean nothing")
    try:
        sampler = fdp.Sampler(ctx.policy, ctx.scheduler, num_inference_steps=1, backend=name)
    except ValueError as exc:
        pytest.skip(str(exc))
    inp = ctx.inputs[0]
    benchmark(_timed(lambda: sampler(inp.cond, x_T=inp.x_T)))


@torch.no_grad()
def test_eager_call(benchmark, ctx):
    """A whole 10-step DDIM call of the eager loop, for scale."""
    run = P.build("eager", ctx)
    benchmark(_timed(lambda: run(0)))


@torch.no_grad()
def test_batched_call(benchmark, ctx):
    """A whole 10-step DDIM call of the batched path, for scale."""
    run = P.build("batched", ctx)
    benchmark(_timed(lambda: run(0)))
