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
