"""State that outlives one call: how it is created (:func:`state_mode`) and how much of it is kept (:class:`LRU`).

A sampler, a prepared backend or a scheduler keeps tensors across calls (packed weights, workspaces, CUDA-graph
static buffers, step tables). Whatever mode the *caller* is in when one is created, it must serve later calls
in any other mode:

- created inside ``torch.inference_mode()`` it would be an inference tensor, which a later normal-mode call
  may not update in place ("Inplace update to inference tensor outside InferenceMode") nor save for backward;
- created with grad enabled from parameters it would carry an autograd graph.

:func:`state_mode` is the one way such state is made: outside inference mode, without grad.

Caches keyed by values a user controls (a scheduler's ``eta``, a captured call's input signature) are
:class:`LRU` s with a documented bound, so that a loop over new values keeps a bounded amount of memory.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Generic, Hashable, Iterator, TypeVar

import torch

V = TypeVar("V")


@contextlib.contextmanager
def state_mode() -> Iterator[None]:
    """Create long-lived state here: normal tensors (not inference tensors), not recorded by autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class LRU(Generic[V]):
    """A mapping that keeps the ``maxsize`` most recently used entries (``get`` and ``put`` both count as use)."""

    def __init__(self, maxsize: int):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ValueError(f"`maxsize` must be a positive int, got {maxsize!r}")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> V:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        self._data.clear()

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data
