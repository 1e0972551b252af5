"""``fdp.AsyncSampler``: sampling ahead on a worker thread, on the CPU with slow fake samplers.

The caller's bound (fdp/async_sampler.py): an O(1) critical section plus one hand-off of the GIL while the
worker runs Python, about ``sys.getswitchinterval()`` (5 ms). The tests hold the worker inside a sampler that
runs pure Python (holding the GIL between switch intervals) for ``SLOW`` seconds, or that blocks until
released, and require every caller call to return within ``BOUND``: 40x the switch interval, yet a fraction
of what waiting for the sampler would cost, so a caller that waited fails whatever the machine's speed.
"""

import sys
import threading
import time

import pytest
import torch

import fdp
from helpers import make_mlp_policy

SLOW = 1.0
BOUND = 0.2
assert BOUND >= 40 * sys.getswitchinterval() and BOUND <= SLOW / 5


class BusySampler:
    """Holds the GIL (pure Python) for ``SLOW`` seconds per call, then returns ``2 * cond``."""

    def __call__(self, cond, scale=1.0):
        end = time.monotonic() + SLOW
        n = 0
        while time.monotonic() < end:
            n += 1
        return 2 * cond * scale


class GatedSampler:
    """Blocks each call until ``release()``; raises for a condition holding NaN."""

    def __init__(self):
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.calls = []

    def __call__(self, cond):
        self.calls.append(cond.clone())
        self.started.release()
        assert self.gate.acquire(timeout=30), "never released"
        if torch.isnan(cond).any():
            raise ValueError("NaN observation")
        return cond + 1

    def release(self, n=1):
        for _ in range(n):
            self.gate.release()


def _timed(fn, *args):
    t = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t


def test_the_caller_never_waits_for_a_slow_sampler():
    with fdp.AsyncSampler(BusySampler()) as ahead:
        waits, seen = [], set()
        obs = torch.zeros(1, 3)
        end = time.monotonic() + 2.5 * SLOW  # two calls finish, a third runs
        while time.monotonic() < end:
            _, dt = _timed(ahead.submit, obs)
            waits.append(dt)
            chunk, dt = _timed(ahead.latest)
            waits.append(dt)
            if chunk is not None:
                seen.add(chunk.seq)
            obs = obs + 1
            time.sleep(0.01)  # a 100 Hz control loop
        assert max(waits) < BOUND, f"the caller waited {max(waits):.3f} s"
        assert len(seen) >= 2  # chunks did arrive meanwhile
        chunk = ahead.latest()
        assert torch.equal(chunk.actions, 2 * torch.full((1, 3), float(chunk.seq)))
        assert 0 <= chunk.latency <= chunk.age and chunk.latency >= SLOW


def test_bounded_queue_keeps_the_newest_request():
    fake = GatedSampler()
    ahead = fdp.AsyncSampler(fake, max_pending=2)
    first = ahead.submit(torch.zeros(1))
    assert fake.started.acquire(timeout=10)  # the worker runs the first call and blocks in it
    futures = [ahead.submit(torch.full((1,), float(i))) for i in range(1, 6)]
    assert ahead.pending == 2
    assert [f.cancelled() for f in futures] == [True, True, True, False, False]
    fake.release(3)
    assert first.result(timeout=10).actions.item() == 1
    assert [f.result(timeout=10).actions.item() for f in futures[3:]] == [5, 6]
    assert [c.item() for c in fake.calls] == [0, 4, 5]
    assert ahead.latest().seq == 5
    ahead.close()


def test_inputs_are_copied_at_submit():
    fake = GatedSampler()
    with fdp.AsyncSampler(fake) as ahead:
        obs = torch.zeros(1)
        fut = ahead.submit(obs)
        obs.fill_(7)  # the caller reuses its buffer at once
        fake.release()
        assert fut.result(timeout=10).actions.item() == 1


def test_errors_surface_on_the_callers_next_call_once():
    fake = GatedSampler()
    ahead = fdp.AsyncSampler(fake)
    bad = ahead.submit(torch.tensor([float("nan")]))
    fake.release()
    with pytest.raises(ValueError, match="NaN observation"):
        bad.result(timeout=10)
    with pytest.raises(RuntimeError, match="AsyncSampler call failed") as info:
        ahead.latest()
    assert isinstance(info.value.__cause__, ValueError)
    assert ahead.latest() is None  # raised once; the worker goes on
    good = ahead.submit(torch.zeros(1))
    fake.release()
    assert good.result(timeout=10).actions.item() == 1
    ahead.close()


def test_close_cancels_waiting_requests_and_joins_the_worker():
    fake = GatedSampler()
    ahead = fdp.AsyncSampler(fake, max_pending=3)
    running = ahead.submit(torch.zeros(1))
    assert fake.started.acquire(timeout=10)
    waiting = [ahead.submit(torch.ones(1)) for _ in range(3)]
    threading.Timer(0.2, fake.release).start()  # the running call finishes while close waits
    ahead.close()
    assert not ahead._worker.is_alive()
    assert all(f.cancelled() for f in waiting)
    assert running.result(timeout=1).actions.item() == 1  # the running call was let finish
    with pytest.raises(RuntimeError, match="closed"):
        ahead.submit(torch.zeros(1))


def test_wait_for_a_chunk_and_a_real_sampler():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=50), num_inference_steps=3, backend="torch")
    cond = torch.randn(2, 5)
    x_T = torch.randn(2, 4, 3)
    with fdp.AsyncSampler(sampler) as ahead:
        assert ahead.wait(timeout=0.01) is None
        ahead.submit(cond, x_T=x_T)
        chunk = ahead.wait(timeout=60)
        assert chunk.seq == 0 and torch.equal(chunk.actions, sampler(cond, x_T=x_T))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (1.5, TypeError)])
def test_bad_arguments(bad, exc):
    with pytest.raises(exc, match="max_pending"):
        fdp.AsyncSampler(lambda c: c, max_pending=bad)
    with pytest.raises(TypeError, match="sampler"):
        fdp.AsyncSampler(object())


# -- on a GPU: the worker's own CUDA stream --------------------------------------------------------------------------
# `check_async_sampler` holds every check; the GPU test runs it on CUDA with the fused `cuda` backend (its own
# kernels: the worker's result is bit-equal to a direct call), test_gpu_checks_run_on_the_cpu here on the CPU, where
# the stream checks do not apply (no streams) and the rest is the same code.


class _StreamRecorder:
    """The sampler, recording the current CUDA stream of each call."""

    def __init__(self, sampler):
        self.sampler, self.device, self.streams = sampler, sampler.device, []

    def __call__(self, *args, **kwargs):
        if self.device.type == "cuda":
            self.streams.append(torch.cuda.current_stream(self.device))
        return self.sampler(*args, **kwargs)


def _spin(device, seconds):
    """Keep the current stream busy for about ``seconds`` (a spinning kernel, its clock measured first)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 1_000_000 / (start.elapsed_time(end) / 1e3)
    torch.cuda._sleep(int(seconds * cycles_per_s))


def check_async_sampler(backend, device):
    """On ``device``: every chunk equals a direct call of the sampler on the same inputs (batch 1 and an odd batch;
    the first call of each batch size, the backend's graph capture included, runs on the worker's thread); on CUDA
    the calls run on the AsyncSampler's own stream, after the caller's work enqueued before ``submit`` (inputs still
    being written by the caller's stream when submitted, and overwritten right after: the snapshot is what counts),
    and not after work the caller enqueues after ``submit``."""
    from helpers import KERNEL_SCHEDULERS

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]
    s = fdp.Sampler(make_mlp_policy(K=3, dtype=torch.float32).to(dev), factory(), 6, eta=eta, backend=backend,
                    dtype=torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)

    def inputs(B):
        x_T, noise = s.noise(B, g)
        return torch.randn(B, s.policy.cond_dim, device=dev, generator=g), x_T, noise

    rec = _StreamRecorder(s)
    with fdp.AsyncSampler(rec) as ahead:
        assert (ahead.stream is not None) == cuda
        for B in (1, 5):
            c, x, n = inputs(B)
            chunk = ahead.submit(c, x_T=x, step_noise=n).result(timeout=300)
            assert torch.equal(chunk.actions, s(c, x_T=x, step_noise=n)), B
        if cuda:
            assert len(rec.streams) == 2 and all(st == ahead.stream for st in rec.streams)
            assert ahead.stream != torch.cuda.current_stream(dev) and ahead.stream != torch.cuda.default_stream(dev)
        # Inputs the caller's stream is still writing when submitted, and overwrites right after.
        c, x, n = inputs(5)
        want = s(c, x_T=x, step_noise=n)
        cond = torch.zeros_like(c)
        if cuda:
            _spin(dev, 0.2)
        cond.copy_(c)
        fut = ahead.submit(cond, x_T=x, step_noise=n)
        cond.fill_(float("nan"))
        assert torch.equal(fut.result(timeout=60).actions, want)
        # Work the caller enqueues after submit does not hold the call back.
        c, x, n = inputs(5)
        want = s(c, x_T=x, step_noise=n)
        fut = ahead.submit(c, x_T=x, step_noise=n)
        if cuda:
            _spin(dev, 1.0)
        chunk = fut.result(timeout=60)
        if cuda:
            assert not torch.cuda.current_stream(dev).query(), "the worker's call waited for the caller's later work"
        latest = ahead.latest()  # read on the caller's stream
        assert latest.seq == chunk.seq == 3 and torch.equal(latest.actions, want)
    if cuda:
        torch.cuda.synchronize(dev)


def test_gpu_checks_run_on_the_cpu():
    check_async_sampler("torch", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not fdp.extension_status()["available"], reason="needs the fdp._C extension")
def test_gpu_async_sampler_on_its_own_stream():
    check_async_sampler("cuda", "cuda")
