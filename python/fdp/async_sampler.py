"""Sampling ahead: :class:`AsyncSampler` computes the next action chunk while the robot executes the current one.

A control loop at a fixed rate cannot wait for a sampling call: it submits the
newest observation and keeps executing the chunk it has, and picks up the new
chunk when it is done::

    with fdp.AsyncSampler(sampler) as ahead:
        ahead.submit(obs_features)
        while running:
            chunk = ahead.latest()            # never waits for the sampler
            if chunk is not None and chunk.seq != used:
                used, start = chunk.seq, chunk.age   # chunk.age: seconds since its observation
                ...
            ahead.submit(obs_features)         # replaces a request not yet started

One worker thread runs the calls, one at a time, on its own CUDA stream (on a
CUDA device); the caller's thread only takes a lock for O(1) bookkeeping.
What bounds the caller's wait is therefore that critical section plus, while
the worker runs Python (the sampler's host code), one hand-off of Python's GIL:
about ``sys.getswitchinterval()`` (5 ms by default), since the worker's
PyTorch calls release the GIL while they compute. Submitting never waits for
the sampler, whatever it costs. The first call of each batch size captures a CUDA
graph on the worker's thread; the capture is thread-local, so the caller's own
allocations and work on its streams meanwhile are unaffected (a device-wide
``torch.cuda.synchronize()`` from the caller may still break it).

Safe to use from one control thread, with a policy that is not trained at the
same time (the worker calls the sampler, and so reads the policy, while the
caller goes on), and with a sampler nobody else calls meanwhile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import torch

from ._validation import check_int

__all__ = ["AsyncSampler", "Chunk"]


@dataclass(frozen=True)
class Chunk:
    """A finished sampling call: ``actions`` ``[B, horizon, action_dim]``, for the observation submitted at
    ``submitted_at`` (``time.monotonic()``), done at ``finished_at``; ``seq`` counts submissions from 0."""

    actions: torch.Tensor
    seq: int
    submitted_at: float
    finished_at: float

    @property
    def age(self) -> float:
        """Seconds since the observation this chunk answers was submitted (how stale its first action is)."""
        return time.monotonic() - self.submitted_at

    @property
    def latency(self) -> float:
        """Seconds from submission to the finished chunk."""
        return self.finished_at - self.submitted_at


class _Request:
    __slots__ = ("args", "kwargs", "seq", "submitted_at", "future", "ready")

    def __init__(self, args, kwargs, seq, submitted_at, ready):
        self.args, self.kwargs, self.seq, self.submitted_at, self.ready = args, kwargs, seq, submitted_at, ready
        self.future = concurrent.futures.Future()


class AsyncSampler:
    """Runs ``sampler`` calls on a worker thread; :meth:`submit` and :meth:`latest` never wait for a call.

    Args:
        sampler: an :class:`fdp.Sampler` (or any callable ``sampler(global_cond, **kwargs) -> actions``;
            its ``device`` attribute, if any, picks the CUDA stream's device).
        max_pending: how many submitted calls may wait for the worker (the queue's bound, >= 1). When it
            is full, :meth:`submit` drops the oldest waiting request (its future is cancelled): in control,
            the newest observation is the one worth answering.
    """

    def __init__(self, sampler, max_pending: int = 1):
        if not callable(sampler):
            raise TypeError(f"`sampler` must be callable (an fdp.Sampler), got {type(sampler).__name__}")
        self.sampler = sampler
        self.max_pending = check_int("max_pending", max_pending, min_value=1)
        self.device = torch.device(getattr(sampler, "device", "cpu"))
        self._cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._lock = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()
        self._latest: Chunk | None = None
        self._error: BaseException | None = None
        self._seq = 0
        self._busy = False
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="fdp-async-sampler", daemon=True)
        self._worker.start()

    # -- the caller's side ------------------------------------------------------------------------------------

    def submit(self, global_cond: torch.Tensor, *args, **kwargs) -> concurrent.futures.Future:
        """Queue a call ``sampler(global_cond, *args, **kwargs)``; returns its future (a :class:`Chunk`).

        Tensor arguments are copied now (asynchronously on CUDA, ordered after the caller's stream), so
        the caller may reuse its buffers at once. Raises the error of a failed earlier call, once.
        """
        self._raise_error()
        args = (global_cond, *args)
        ready = None
        if self._cuda:
            args = tuple(self._snapshot(a) for a in args)
            kwargs = {k: self._snapshot(v) for k, v in kwargs.items()}
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        else:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with self._lock:
            if self._closed:
                raise RuntimeError("this AsyncSampler is closed")
            request = _Request(args, kwargs, self._seq, time.monotonic(), ready)
            self._seq += 1
            if len(self._pending) >= self.max_pending:
                self._pending.popleft().future.cancel()
            self._pending.append(request)
            self._lock.notify_all()
        return request.future

    def latest(self) -> Chunk | None:
        """The newest finished chunk (None before the first), without waiting. Raises the error of a failed
        call, once, at the first call after it failed."""
        self._raise_error()
        with self._lock:
            chunk = self._latest
        if chunk is not None and self._cuda:
            # Made on the worker's stream; the caller's stream reads it now (the worker waited for it to finish).
            chunk.actions.record_stream(torch.cuda.current_stream(self.device))
        return chunk

    def wait(self, newer_than: int = -1, timeout: float | None = None) -> Chunk | None:
        """Block until a chunk with ``seq > newer_than`` is finished (or ``timeout`` seconds pass: None).

        For start-up (the first chunk) and tests; a control loop uses :meth:`latest`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._error is None and (self._latest is None or self._latest.seq <= newer_than):
                if self._closed and not self._pending and not self._busy:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._lock.wait(left)
        return self.latest()

    @property
    def pending(self) -> int:
        """Submitted calls not yet started."""
        with self._lock:
            return len(self._pending)

    def close(self, wait: bool = True) -> None:
        """Stop: cancel the waiting requests, let the running call finish (``wait``: join the worker)."""
        with self._lock:
            self._closed = True
            while self._pending:
                self._pending.popleft().future.cancel()
            self._lock.notify_all()
        if wait and threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> "AsyncSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"an fdp.AsyncSampler call failed: {error!r}") from error

    def _snapshot(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        copy = value.clone()
        if copy.device.type == "cuda":
            copy.record_stream(self.stream)  # the worker's stream reads it
        return copy

    # -- the worker ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return  # closed, nothing left
                request = self._pending.popleft()
                if not request.future.set_running_or_notify_cancel():
                    continue
                self._busy = True
            try:
                actions = self._call(request)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's next call
                with self._lock:
                    self._error, self._busy = exc, False
                    self._lock.notify_all()
                request.future.set_exception(exc)
                continue
            chunk = Chunk(actions, request.seq, request.submitted_at, time.monotonic())
            with self._lock:
                if self._latest is None or chunk.seq > self._latest.seq:
                    self._latest = chunk
                self._busy = False
                self._lock.notify_all()
            request.future.set_result(chunk)

    def _call(self, request: _Request) -> torch.Tensor:
        if not self._cuda:
            return self.sampler(*request.args, **request.kwargs)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(request.ready)
            actions = self.sampler(*request.args, **request.kwargs)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # the worker waits for the GPU, the caller never does
        return actions
