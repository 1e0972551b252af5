"""The roofline: what one denoising step must read and compute, and the floor that implies.

Per component family, one function computes from the model config alone

- ``weight_bytes``: the bytes of weights one step must read (every weight a
  step uses, once, for all K components), and
- ``flops``: the floating-point operations one step must do (2 per
  multiply-add of every matrix product and convolution, for the whole
  batch; elementwise work, norms and activations are not counted),

and :func:`floor_us` turns them into the shortest time a step can take on a
device, ``max(weight_bytes / copy_bandwidth, flops / matmul_rate)``, with
both rates measured once per run by :func:`measure_device` (a large
device-to-device copy and a large matmul in the case's dtype). The fraction
of the floor a path reaches is ``floor_us / its measured step time``.
A persistent kernel that keeps the weights on chip across steps can beat
the bandwidth floor (fraction above 1): the floor assumes weights stream
from device memory every step.

Formulas (B batch rows, K components; ``w`` bytes per matrix weight):

MLP (``D = horizon * action_dim``, width ``H``, ``L`` blocks). Only the
``x``-dependent chain runs per step; the timestep and feature terms are
computed once per call (docs/mlp_denoiser.md)::

    matrix weights  = K (D H + 2 L H^2 + H D)          (w_in, w_a, w_b, w_out)
    vector weights  = K (L H + D)                       (b_b, b_out; float32)
    weight_bytes    = matrix weights * w + vector weights * 4
    flops           = 2 B K (D H + 2 L H^2 + H D)

U-Net (``ConditionalUnet1D``; widths ``d_0..d_{n-1}``, kernel ``k``, horizon
``T_0``, level ``i`` at ``T_i = T_0 / 2^i``; embed size ``E``, conditioning
size ``C = E + global_cond_dim``). A residual block ``c_in -> c_out`` at length
``T`` with FiLM width ``f = 2 c_out`` (scale and bias) or ``c_out``::

    params = k c_in c_out + c_out + k c_out^2 + c_out + 4 c_out (2 GroupNorms)
             + C f + f (FiLM Linear) + [c_in c_out + c_out if c_in != c_out]
    flops  = 2 B (T (k c_in c_out + k c_out^2 + [c_in c_out]) + C f)

Down level ``i``: blocks ``(d_{i-1} or Da) -> d_i`` and ``d_i -> d_i`` at
``T_i``, then (not on the last level) a stride-2 conv, ``3 d_i^2 + d_i``
params, ``2 B (T_i / 2) 3 d_i^2`` flops. Middle: two ``d_{n-1}`` blocks at
``T_{n-1}``. Up level ``i = n-2..0``: blocks ``2 d_{i+1} -> d_i`` and ``d_i -> d_i``
at ``T_{i+1}``, then a transposed conv (kernel 4) ``4 d_i^2 + d_i`` params,
``2 B T_{i+1} 4 d_i^2`` flops. Head: a ``d_0 -> d_0`` conv block at ``T_0`` and a
1x1 conv to ``Da``. Timestep MLP ``E -> 4E -> E``: ``8 E^2 + 5E`` params and
``2 * 8 E^2`` flops once per step (it does not depend on the row). All U-Net
weights are read every step, in the case's dtype; the sum of the params
is exactly ``sum(p.numel() for p in ConditionalUnet1D(...).parameters())``
(tests check it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class StepCost:
    """What one denoising step of K components must do for a batch."""

    weight_bytes: int
    flops: int
    params: int  # weights per component (all of them, including those used once per call)


# -- one function per component family ------------------------------------------------------------------------


def mlp_step_cost(spec: dict, K: int, batch: int, dtype: str) -> StepCost:
    """Per-step bytes and FLOPs of K ``MLPDenoiser`` components (see the module docstring)."""
    D = spec["horizon"] * spec["action_dim"]
    H, L, E, Dc = spec["hidden_dim"], spec["num_blocks"], spec["time_embed_dim"], spec["cond_dim"]
    matrix = D * H + 2 * L * H * H + H * D
    vector = L * H + D
    weight_bytes = K * (matrix * DTYPE_BYTES[dtype] + vector * 4)
    flops = 2 * batch * K * matrix
    # All parameters of one MLPDenoiser (for the record and the parameter-count check).
    params = (E * H + H + H * H + H          # time_mlp
              + H * (L + 1) * H              # time_proj
              + D * H                        # inp
              + (Dc * (H + 2 * L * H) + H + 2 * L * H if Dc else H)  # cond_proj or in_bias
              + L * 2 * (H * H + H)          # blocks_a, blocks_b
              + H * D + D)                   # out
    return StepCost(weight_bytes=weight_bytes, flops=flops, params=params)


def _unet_res_block(c_in: int, c_out: int, k: int, C: int, scale: bool, T: int, batch: int) -> tuple[int, int]:
    f = 2 * c_out if scale else c_out
    params = k * c_in * c_out + c_out + k * c_out * c_out + c_out + 4 * c_out + C * f + f
    macs = T * (k * c_in * c_out + k * c_out * c_out)
    if c_in != c_out:
        params += c_in * c_out + c_out
        macs += T * c_in * c_out
    return params, 2 * batch * (macs + C * f)


def unet_step_cost(spec: dict, K: int, batch: int, dtype: str) -> StepCost:
    """Per-step bytes and FLOPs of K ``ConditionalUnet1D`` components (see the module docstring)."""
    dims, k = list(spec["down_dims"]), spec["kernel_size"]
    E = spec["diffusion_step_embed_dim"]
    C = E + spec["cond_dim"]
    scale = spec["cond_predict_scale"]
    Da, T0 = spec["action_dim"], spec["horizon"]
    n = len(dims)
    T = [T0 // 2 ** i for i in range(n)]
    params = 8 * E * E + 5 * E
    flops = 2 * 8 * E * E  # the timestep MLP, once per step

    def block(c_in, c_out, length):
        nonlocal params, flops
        p, f = _unet_res_block(c_in, c_out, k, C, scale, length, batch)
        params += p
        flops += f

    widths = [Da, *dims]
    for i in range(n):
        block(widths[i], dims[i], T[i])
        block(dims[i], dims[i], T[i])
        if i < n - 1:
            params += 3 * dims[i] ** 2 + dims[i]
            flops += 2 * batch * (T[i] // 2) * 3 * dims[i] ** 2
    block(dims[-1], dims[-1], T[-1])
    block(dims[-1], dims[-1], T[-1])
    for i in range(n - 2, -1, -1):
        block(2 * dims[i + 1], dims[i], T[i + 1])
        block(dims[i], dims[i], T[i + 1])
        params += 4 * dims[i] ** 2 + dims[i]
        flops += 2 * batch * T[i + 1] * 4 * dims[i] ** 2
    d0 = dims[0]
    params += k * d0 * d0 + d0 + 2 * d0 + d0 * Da + Da
    flops += 2 * batch * T0 * (k * d0 * d0 + d0 * Da)
    return StepCost(weight_bytes=K * params * DTYPE_BYTES[dtype], flops=K * flops, params=params)


STEP_COST = {"mlp": mlp_step_cost, "unet": unet_step_cost}


def step_cost(spec: dict, K: int, batch: int, dtype: str) -> StepCost:
    return STEP_COST[spec["family"]](spec, K, batch, dtype)


# -- the device ----------------------------------------------------------------------------------------------


@dataclass
class DevicePeaks:
    """Rates measured on the device: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""

    copy_bytes_per_s: float | None
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)  # by dtype name

    def as_json(self) -> dict:
        return {"copy_GBps": None if self.copy_bytes_per_s is None else self.copy_bytes_per_s / 1e9,
                "matmul_TFLOPS": {k: v / 1e12 for k, v in self.matmul_flops_per_s.items()}}


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_device(device: torch.device | str, dtypes=("fp32",)) -> DevicePeaks:
    """Copy bandwidth and matmul rate per dtype, measured with a large copy and a large matmul.

    CUDA: a 512 MiB copy and 8192^3 matmuls (fp32 at the current TF32
    setting); CPU: 64 MiB and 1024^3. Takes well under a second on a GPU.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    peaks = DevicePeaks(copy_bytes_per_s=None)
    try:
        n = (512 if cuda else 64) * 2 ** 20 // 4
        src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        sec = _median_seconds(lambda: dst.copy_(src), device, 10 if cuda else 5)
        peaks.copy_bytes_per_s = 2 * n * 4 / sec
        src = dst = None  # free them now (the timed lambda names them)
    except RuntimeError:  # out of memory or similar: the floor stays unknown
        pass
    from .cases import DTYPES

    for name in dtypes:
        m = 8192 if cuda else (1024 if name == "fp32" else 512)
        try:
            a = torch.randn(m, m, device=device, dtype=DTYPES[name])
            b = torch.randn(m, m, device=device, dtype=DTYPES[name])
            sec = _median_seconds(lambda: torch.mm(a, b), device, 5 if cuda else 3)
            peaks.matmul_flops_per_s[name] = 2 * m ** 3 / sec
            a = b = None
        except RuntimeError:
            pass
    return peaks


def floor_us(cost: StepCost, peaks: DevicePeaks, dtype: str) -> tuple[float | None, str | None]:
    """The per-step floor in microseconds and what binds it ("memory" or "compute"); None when unknown."""
    bw, rate = peaks.copy_bytes_per_s, peaks.matmul_flops_per_s.get(dtype)
    if not bw or not rate or not math.isfinite(bw) or not math.isfinite(rate):
        return None, None
    mem, comp = cost.weight_bytes / bw * 1e6, cost.flops / rate * 1e6
    return (mem, "memory") if mem >= comp else (comp, "compute")
