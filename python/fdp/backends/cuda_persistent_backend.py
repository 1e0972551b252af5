"""``backend="cuda-persistent"``: MLP components, the whole sampling loop in one CUDA launch.

The kernel (``csrc/mlp_persistent.cu``) keeps the packed weights in shared
memory for all T steps where they fit (the rest streams from L2 each step).
On sm_90 a row tile is one thread-block cluster of K component groups x R
column ranks that exchange activations through distributed shared memory;
older GPUs (sm_80/86/87/89) run one block per row tile. Packing, validation
and the launcher are shared with ``backend="cuda"`` (:mod:`.cuda_backend`).
"""

from __future__ import annotations

from .cuda_backend import KIND_PERSISTENT, CudaBackend


class CudaPersistentBackend(CudaBackend):
    name = "cuda-persistent"
    priority = 50
    kind = KIND_PERSISTENT


BACKEND = CudaPersistentBackend()
