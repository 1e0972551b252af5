"""One sampling call as one CUDA graph launch: :class:`CapturedCall`, shared by every CUDA backend.

A backend writes its whole call (router, per-call terms, all T steps) as one
function of tensors, ``fn(global_cond, x_T, step_noise) -> x_0``, that is
*capturable*: it reads no tensor back to the host, takes every per-call
value from its tensor arguments and does not modify them.
:class:`CapturedCall` wraps it:

- the first call with a new input signature (the shape and dtype of every
  argument, or None) runs ``fn`` eagerly on a side stream (Triton compiles,
  cuBLAS / cuDNN set up, the caching allocator grows there, not during
  capture), then captures one ``fn`` call on static input buffers into a
  ``torch.cuda.CUDAGraph`` with its own memory pool;
- every call copies its inputs into that signature's static buffers, replays
  the graph and returns a copy of the static output (the next replay
  overwrites it). On the host that is a few copies and one graph launch; no
  synchronisation.

What a graph freezes: the addresses of every tensor ``fn`` reads besides its
arguments (the packed weights, step terms and, for the MLP backends, the packed
router and conditioning projections: copies made at packing, which
:class:`fdp.Sampler` makes again when any parameter, buffer, the strategy or
the top-k size changes, so in-place updates of the modules reach a replay
through the repack; the ``graph`` backend still reads the router's parameters
directly) and every host value (Python ints and floats, the router's
strategy). :meth:`CapturedCall.invalidate` drops the graphs; the next call per
signature captures again. A prepared object that packs again builds a new
``CapturedCall`` (its graphs go with the old one).

``fn`` runs directly, not replayed, off CUDA (``enabled=False``), while
``torch.compile`` traces the call (dynamo sees ``fn``'s operations), inside
:func:`direct_calls` and while
the current stream is being captured by the user's own ``torch.cuda.graph``
(``fn``'s kernels then go into the user's graph; warm up with one call before
capturing, as for any CUDA graph).

Memory: each captured signature keeps its static buffers, its graph and its
pool for the life of the ``CapturedCall`` (or until :meth:`invalidate`), for at
most ``max_graphs`` signatures (default :data:`MAX_GRAPHS`): a call with yet
another signature drops the least recently used one's graph (an LRU), so a
caller whose batch size keeps changing holds bounded memory.

Mode: the static buffers and graphs are made under :func:`fdp._state.state_mode`
(outside ``inference_mode``, without grad) whatever mode the caller is in, so a
graph captured in one mode replays in any other.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

import torch

from .._state import LRU, state_mode

__all__ = ["CapturedCall", "CapturesCalls", "capture_graph", "capturing", "direct_calls"]

Signature = tuple

#: Default bound on the signatures (graphs) one CapturedCall keeps.
MAX_GRAPHS = 8


_direct = threading.local()


@contextlib.contextmanager
def direct_calls() -> Iterator[None]:
    """Inside, on this thread, every CapturedCall calls its function directly: no capture, no replay.

    For a caller that warms a call up before capturing it into a graph of its own
    (:class:`fdp.StaticCall`): the warm-up then leaves no graph of its own behind.
    """
    before = getattr(_direct, "on", False)
    _direct.on = True
    try:
        yield
    finally:
        _direct.on = before


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Entry:
    """One captured signature: the graph, its static input buffers and its static output."""

    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs: list[Optional[torch.Tensor]], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class CapturedCall:
    """``fn(*inputs)`` replayed from a CUDA graph captured once per input signature.

    Args:
        fn: a capturable function of tensors (or None) returning one tensor (see the module docstring).
        device: where ``fn`` runs.
        enabled: capture and replay (default: when ``device`` is a CUDA device); with False ``fn``
            is called directly.
        warmup: eager calls of ``fn`` on a side stream before each capture.
        max_graphs: how many signatures keep their graph (least recently used dropped first).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], device, *, enabled: bool | None = None, warmup: int = 1,
                 max_graphs: int = MAX_GRAPHS):
        self.fn = fn
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda" if enabled is None else bool(enabled)
        if self.enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, got {self.device}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be a positive int, got {warmup!r}")
        self.warmup = warmup
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"`max_graphs` must be a positive int, got {max_graphs!r}")
        self._entries: LRU[_Entry] = LRU(max_graphs)

    @staticmethod
    def signature(inputs) -> Signature:
        """What a captured graph is specific to: each argument's shape and dtype, or None."""
        return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs)

    @property
    def signatures(self) -> list[Signature]:
        """The signatures whose graph is kept, least recently used first."""
        return self._entries.keys()

    def replay_alone(self):
        """A function replaying the most recently used graph and nothing else (no input copies, no output
        copy): the kernels' own device time, for the benchmark. None when no graph is kept."""
        keys = self._entries.keys()
        if not keys or not self.replays():
            return None
        graph = self._entries.get(keys[-1]).graph
        return lambda: self._replay(graph)

    def invalidate(self) -> None:
        """Drop every captured graph; the next call per signature captures again.

        For changes a graph cannot see: parameters replaced (not updated in place), a new
        router strategy, re-packed weights.
        """
        self._entries.clear()

    def replays(self) -> bool:
        """Whether a call made now would replay a graph (rather than call ``fn`` directly)."""
        if not self.enabled or torch.compiler.is_compiling() or getattr(_direct, "on", False):
            return False
        return not capturing(self.device)

    def __call__(self, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.replays():
            return self.fn(*inputs)
        key = self.signature(inputs)
        entry = self._entries.get(key)
        if entry is None:
            with state_mode():  # buffers a later call in another mode updates in place
                static = [None if t is None else t.clone(memory_format=torch.contiguous_format) for t in inputs]
                graph, output = self._capture(static)
            entry = self._entries.put(key, _Entry(graph, static, output))
        for buf, t in zip(entry.inputs, inputs):
            if buf is not None:
                buf.copy_(t)
        self._replay(entry.graph)
        return entry.output.clone()

    # The two steps that need CUDA (tests emulate them on the CPU).

    def _replay(self, graph) -> None:
        with torch.cuda.device(self.device):  # a graph replays on the current stream of its own device
            graph.replay()

    def _capture(self, static: list[Optional[torch.Tensor]]):
        """Warm up on a side stream, then capture ``fn(*static)``; returns ``(graph, static output)``."""
        graph, output = capture_graph(lambda: self.fn(*static), self.device, self.warmup)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"a captured call must return one tensor, got {type(output).__name__}")
        return graph, output


def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int = 1):
    """``fn()`` run ``warmup`` times on a side stream (Triton compiles, libraries initialise, the allocator
    grows there, not during capture; inside :func:`direct_calls`, so an inner CapturedCall keeps no graph of its
    own), then captured once into a CUDA graph; returns ``(graph, fn's output)``. Other threads may allocate and
    work on their own streams meanwhile (the capture is thread-local), though not synchronise the whole device.
    Needs CUDA."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side), direct_calls():
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # On the warm-up stream: torch.cuda.graph's default capture stream lives on whichever device
        # was current when it was first made. An inner CapturedCall sees the capturing stream and runs
        # its function into this graph. "thread_local": only this thread's unsafe calls (cudaMalloc, a
        # synchronisation) break the capture. torch's default, "global", also makes every other thread's
        # fail meanwhile: the control loop beside an AsyncSampler whose worker captures a new batch size,
        # a user's other threads. torch.compile's CUDA graphs capture the same way. A device-wide
        # synchronisation from another thread can still invalidate it (CUDA's rule, whatever the mode).
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            output = fn()
    return graph, output


class CapturesCalls:
    """For prepared objects whose sampling call is ``self._call``, a :class:`CapturedCall`."""

    _call: CapturedCall

    def invalidate(self) -> None:
        """Drop the captured graphs (the next call per batch size captures again)."""
        self._call.invalidate()
