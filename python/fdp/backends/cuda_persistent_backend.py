"""``backend="cuda-persistent"``: MLP components, the whole sampling loop in one CUDA launch.

The kernel (``csrc/mlp_persistent.cu``) keeps the packed weights in shared
memory for all T steps where they fit (the rest streams from L2 each step).
Before it, one launch computes the call's router weights and conditioning
terms (``csrc/call_terms.cu``, shared with ``backend="cuda"``): two launches per call.
Named without a ``dtype``, the backend packs a float32 policy's weights in
bfloat16: at the target size (K=4, H=256) 16-bit weights are what stays
resident, while float32 weights stream a slice from L2 at every step (still
served when asked for: ``dtype=torch.float32``). ``backend="auto"`` keeps the
policy's dtype.
On sm_90 a row tile is one thread-block cluster of K component groups x R
column ranks that exchange activations through distributed shared memory;
older GPUs (sm_80/86/87/89) run one block per row tile. Packing, validation
and the launcher are shared with ``backend="cuda"`` (:mod:`.cuda_backend`).
"""

from __future__ import annotations

import torch

from .cuda_backend import KIND_PERSISTENT, CudaBackend


class CudaPersistentBackend(CudaBackend):
    name = "cuda-persistent"
    priority = 50
    kind = KIND_PERSISTENT

    def default_weight_dtype(self, policy_dtype):
        return policy_dtype if policy_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


BACKEND = CudaPersistentBackend()
