"""``backend="cuda"``: MLP components, one fused CUDA kernel launch per denoising step.

The kernel (``csrc/mlp_step.cu``, shared code in ``csrc/mlp_common.cuh``)
evaluates all K :class:`fdp.MLPDenoiser` components on a tile of rows, their
router-weighted sum and the scheduler update in one launch; float32, bfloat16
or float16 weights with float32 accumulation (tensor cores for 16-bit weights
on tiles of 16+ rows), clusters with distributed shared memory on sm_90 (at
small batch one cluster per row tile holds all K components and combines their
outputs in it). On sm_90 the launches after a call's first are programmatic
dependent launches: each can stage its weights while the previous step finishes.
A sampling call (the per-call terms launch, ``csrc/call_terms.cu``, and the T launches) is captured once per
batch size into a CUDA graph and replayed (:mod:`fdp.backends.captured`).

This module also holds what both CUDA backends share: validation of every
tensor before a pointer reaches the extension (:func:`check_launch`), the
kernel's coefficient table (:func:`kernel_coef`) and the raw launcher
(:func:`launch`). ``backend="cuda-persistent"`` (whole loop in one launch)
subclasses the backend here.
"""

from __future__ import annotations

import math

import torch

from fdp_kernels import abi

from .._extension import arch_unsupported_reason, extension, extension_status
from .._validation import check_flat_sample, check_kernel_arg as _check
from ..packing import (call_terms_numel, mlp_unsupported_reason, pack_cond, pack_policy, split_call_terms,
                       step_terms)
from ..ops import call_terms_cuda_call, mlp_cuda_call
from .base import Backend
from .captured import CapturedCall, CapturesCalls

__all__ = ["CudaBackend", "CudaPrepared", "check_launch", "check_cond_launch", "kernel_coef", "launch",
           "launch_call_terms", "plan",
           "KIND_STEP", "KIND_PERSISTENT"]

KIND_STEP = 0
KIND_PERSISTENT = 1
# The limits, the coefficient table and the weight-type codes are fdp_kernels.abi's (= csrc/abi.h).
_WTYPE = {dt: code for code, dt in enumerate(abi.WEIGHT_DTYPES)}
_OPTION_KEYS = ("block_rows", "ranks", "groups", "mma", "skip_unused")


# ------------------------------------------------------------------------------------------------------------
# Validation (runs on any device; `require_cuda=False` lets CPU tests exercise it)


def _tensor_attr(obj, owner, attr):
    t = getattr(obj, attr, None)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{owner}` must be an fdp.packing object with a tensor `{attr}`, got {type(obj).__name__}")
    return t


def check_static(packed, steps, coef, device, *, require_cuda: bool = True) -> dict:
    """Validate the per-pack tensors (weights, step terms, coefficient table); returns ``dict(D, H, L, K, T)``."""
    device = torch.device(device)
    if require_cuda and device.type != "cuda":
        raise ValueError(f"the CUDA kernels need CUDA tensors, got tensors on {device}")
    w_in = _tensor_attr(packed, "packed", "w_in")
    if w_in.ndim != 3:
        raise ValueError(f"`packed.w_in` must be [K, D, H], got {list(w_in.shape)}")
    K, D, H = w_in.shape
    w_a = _tensor_attr(packed, "packed", "w_a")
    if w_a.ndim != 4:
        raise ValueError(f"`packed.w_a` must be [K, L, H, H], got {list(w_a.shape)}")
    L = w_a.shape[1]
    wdt = w_in.dtype
    if wdt not in abi.WEIGHT_DTYPES:
        raise TypeError(f"`packed.w_in` must have one of the dtypes {list(abi.WEIGHT_DTYPES)}, got {wdt}")
    f32 = torch.float32
    _check("packed.w_in", w_in, (K, D, H), wdt, device)
    _check("packed.w_a", w_a, (K, L, H, H), wdt, device)
    _check("packed.w_b", _tensor_attr(packed, "packed", "w_b"), (K, L, H, H), wdt, device)
    _check("packed.b_b", _tensor_attr(packed, "packed", "b_b"), (K, L, H), f32, device)
    _check("packed.w_out", _tensor_attr(packed, "packed", "w_out"), (K, H, D), wdt, device)
    _check("packed.b_out", _tensor_attr(packed, "packed", "b_out"), (K, D), f32, device)
    t_in = _tensor_attr(steps, "steps", "t_in")
    if t_in.ndim != 3:
        raise ValueError(f"`steps.t_in` must be [T, K, H], got {list(t_in.shape)}")
    T = t_in.shape[0]
    _check("steps.t_in", t_in, (T, K, H), f32, device)
    _check("steps.t_shift", _tensor_attr(steps, "steps", "t_shift"), (T, K, L, H), f32, device)
    _check("coef", coef, (T, abi.CUDA_COEF_WIDTH), f32, device)
    if not 1 <= K <= abi.CUDA_MAX_K:
        raise ValueError(f"the fused CUDA kernels serve 1..{abi.CUDA_MAX_K} components, got K = {K}")
    if not 1 <= L <= abi.CUDA_MAX_L:
        raise ValueError(f"the fused CUDA kernels serve 1..{abi.CUDA_MAX_L} residual blocks, got L = {L}")
    if not 1 <= H <= abi.CUDA_MAX_H:
        raise ValueError(f"the fused CUDA kernels serve hidden widths 1..{abi.CUDA_MAX_H}, got H = {H}")
    if not 1 <= D <= abi.CUDA_MAX_D:
        raise ValueError(f"the fused CUDA kernels serve D = horizon * action_dim in 1..{abi.CUDA_MAX_D}, got D = {D}")
    if T < 1:
        raise ValueError("`steps` must hold at least one step")
    return dict(D=D, H=H, L=L, K=K, T=T)


def check_call(call, x, noise, out, dims: dict, *, require_cuda: bool = True) -> int:
    """Validate the per-call tensors against ``dims`` (from :func:`check_static`); returns B."""
    check_flat_sample(x)
    device = x.device
    if require_cuda and device.type != "cuda":
        raise ValueError(f"`x` must be a CUDA tensor, got one on {device}")
    B = x.shape[0]
    D, H, L, K, T = (dims[k] for k in ("D", "H", "L", "K", "T"))
    if B < 1:
        raise ValueError("batch size must be >= 1, got a sample with 0 rows")
    f32 = torch.float32
    _check("x", x, (B, D), f32, device)
    _check("call.weights", _tensor_attr(call, "call", "weights"), (B, K), f32, device)
    _check("call.c_in", _tensor_attr(call, "call", "c_in"), (B, K, H), f32, device)
    _check("call.scale", _tensor_attr(call, "call", "scale"), (B, K, L, H), f32, device)
    _check("call.shift", _tensor_attr(call, "call", "shift"), (B, K, L, H), f32, device)
    if noise is not None:
        _check("noise", noise, (T, B, D), f32, device)
    _check("out", out, (B, D), f32, device)
    if B * K * L * H >= 2**31 or T * B * D >= 2**31:
        raise ValueError(f"the CUDA kernels index with 32-bit sizes: B * K * L * H = {B * K * L * H} and "
                         f"T * B * D = {T * B * D} must be < 2**31")
    return B


def check_known(known, known_mask, dims: dict) -> int:
    """Validate the inpainting tensors against ``dims``: both None, or float32 ``known`` ``[B, D]`` /
    ``[T, B, D]`` and bool or uint8 ``known_mask`` ``[B, D]``, contiguous, on x's device. Returns the
    kernels' ``known_steps``: 0 for ``[B, D]`` (one replacement for every step), else T."""
    if (known is None) != (known_mask is None):
        raise ValueError("inpainting needs both `known` and `known_mask`, or neither")
    if known is None:
        return 0
    B, D, T, dev = dims["B"], dims["D"], dims["T"], dims["device"]
    shape = tuple(known.shape) if isinstance(known, torch.Tensor) else None
    _check("known", known, shape if shape in ((B, D), (T, B, D)) else (B, D), torch.float32, dev)
    _check("known_mask", known_mask, (B, D), (torch.bool, torch.uint8), dev)
    return T if known.ndim == 3 else 0


def check_launch(packed, steps, call, coef, x, noise, out, clip_range, *, require_cuda: bool = True) -> dict:
    """Validate every tensor of a launch before any pointer is taken; returns ``dict(B, D, H, L, K, T)``.

    ``packed`` / ``steps`` / ``call`` are :class:`fdp.packing.PackedMLP` / ``StepTerms`` /
    ``CallTerms``; ``coef`` is :func:`kernel_coef`'s ``[T, 8]`` table; ``x`` the float32
    ``[B, D]`` start sample, ``noise`` ``[T, B, D]`` float32 or None, ``out`` ``[B, D]``
    float32 (may be ``x``). ``clip_range`` is None (no clipping) or a non-negative number.
    ``require_cuda=False`` skips only the "is a CUDA tensor" checks (for CPU tests).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    dims = check_static(packed, steps, coef, x.device, require_cuda=require_cuda)
    dims["B"] = check_call(call, x, noise, out, dims, require_cuda=require_cuda)
    if clip_range is not None:
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not (
                math.isfinite(clip_range) and clip_range >= 0):
            raise ValueError(f"`clip_range` must be None (no clipping) or a finite non-negative number, "
                             f"got {clip_range!r}")
    return dims


def check_cond_launch(pc, global_cond, out, *, require_cuda: bool = True) -> dict:
    """Validate a per-call terms launch (:class:`fdp.packing.PackedCond`, float32 ``global_cond [B, Dc]``, the
    ``out`` buffer) before any pointer is taken; returns the extension's ``CallDims`` fields."""
    if not isinstance(global_cond, torch.Tensor):
        raise TypeError(f"`global_cond` must be a torch.Tensor, got {type(global_cond).__name__}")
    device = global_cond.device
    if require_cuda and device.type != "cuda":
        raise ValueError(f"`global_cond` must be a CUDA tensor, got one on {device}")
    K, L, H, Dc = pc.K, pc.L, pc.H, pc.router_w1.shape[0]
    if global_cond.ndim != 2 or global_cond.shape[0] < 1:
        raise ValueError(f"`global_cond` must be [B >= 1, {Dc}], got {list(global_cond.shape)}")
    B = global_cond.shape[0]
    if not 1 <= K <= abi.CUDA_MAX_K:
        raise ValueError(f"the CUDA kernels serve 1..{abi.CUDA_MAX_K} components, got K = {K}")
    if not 0 <= pc.strategy < len(abi.ROUTER_STRATEGIES):
        raise ValueError(f"`strategy` must index fdp_kernels.abi.ROUTER_STRATEGIES, got {pc.strategy!r}")
    if pc.strategy == abi.STRATEGY_TOPK and not 1 <= pc.topk <= K:
        raise ValueError(f"`topk` must be in 1..{K}, got {pc.topk}")
    f32 = torch.float32
    Hr, N = pc.router_w1.shape[1], K * (1 + 2 * L) * H
    Dk = pc.cond_w.shape[0]
    _check("global_cond", global_cond, (B, Dc), f32, device)
    _check("router_w1", pc.router_w1, (Dc, Hr), f32, device)
    _check("router_b1", pc.router_b1, (Hr,), f32, device)
    _check("router_w2", pc.router_w2, (Hr, K), f32, device)
    _check("router_b2", pc.router_b2, (K,), f32, device)
    _check("fixed", pc.fixed, (K,), f32, device)
    _check("cond_w", pc.cond_w, (Dc if Dk else 0, N), f32, device)
    _check("cond_b", pc.cond_b, (N,), f32, device)
    _check("out", out, (call_terms_numel(B, K, L, H),), f32, device)
    if -(-N // 256) + 1 >= 2**31 or -(-B // 8) >= 65536:
        raise ValueError(f"the per-call kernel's grid cannot cover B = {B} rows of {N} terms")
    return dict(B=B, Dc=Dc, Dk=Dk, Hr=Hr, K=K, L=L, H=H, strategy=pc.strategy, topk=pc.topk)


def launch_call_terms(pc, global_cond, out, stream=None) -> torch.Tensor:
    """The per-call terms (``csrc/call_terms.cu``) into ``out`` on ``stream`` (default: the current one)."""
    dims = check_cond_launch(pc, global_cond, out)
    ext = extension()
    tensors = dict(global_cond=global_cond, router_w1=pc.router_w1, router_b1=pc.router_b1, router_w2=pc.router_w2,
                   router_b2=pc.router_b2, fixed=pc.fixed, cond_w=pc.cond_w if pc.cond_w.numel() else pc.cond_b,
                   cond_b=pc.cond_b, out=out)
    ptrs = _named(ext.CallPointers, **{name: t.data_ptr() for name, t in tensors.items()})
    if stream is None:
        stream = torch.cuda.current_stream(global_cond.device).cuda_stream
    with _on_device(global_cond.device):
        ext.call_terms_launch(ptrs, _named(ext.CallDims, **dims), int(stream))
    return out


def kernel_coef(table) -> torch.Tensor:
    """The CUDA kernels' ``[T, CUDA_COEF_WIDTH]`` float32 coefficient table on the table's device
    (:mod:`fdp_kernels.abi`): the scheduler's columns, ``adds_noise`` as 0/1, zero padding."""
    T = table.coef.shape[0]
    coef = torch.zeros((T, abi.CUDA_COEF_WIDTH), dtype=torch.float32, device=table.coef.device)
    coef[:, :abi.NUM_COLS] = table.coef
    coef[:, abi.CUDA_COL_ADDS_NOISE] = table.adds_noise.to(coef.device)
    return coef


def _options_tuple(options) -> tuple:
    options = dict(options or {})
    unknown = set(options) - set(_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)}; expected some of {list(_OPTION_KEYS)}")
    vals = []
    for key, default in zip(_OPTION_KEYS, (0, 0, 0, -1, 1)):
        v = options.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, int):
            raise TypeError(f"kernel option `{key}` must be an int, got {v!r}")
        vals.append(v)
    return tuple(vals)


def _named(cls, **fields):
    """An extension struct (``MlpPointers``, ``MlpDims``, ``MlpOptions``) with ``fields`` set by name."""
    obj = cls()
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def _ext_options(ext, options: tuple):
    return _named(ext.MlpOptions, **dict(zip(_OPTION_KEYS, options)))


def plan(kind: int, dtype: torch.dtype, B: int, D: int, H: int, L: int, K: int, T: int = 1, options=None,
         device=None) -> dict:
    """The extension's launch plan (tile rows, tensor cores, ranks, groups, shared memory) for a shape."""
    ext = extension()
    dev = torch.device(device) if device is not None else None
    with _on_device(dev):
        return dict(ext.mlp_plan(int(kind), _WTYPE[dtype], _named(ext.MlpDims, B=B, D=D, H=H, L=L, K=K, T=T),
                                 _ext_options(ext, _options_tuple(options))))


class _on_device:
    """Make ``device`` current for the extension's runtime calls (no-op when it already is)."""

    def __init__(self, device):
        self.ctx = None
        if device is not None and device.type == "cuda" and device.index is not None \
                and device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(device)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _raw_launch(kind, packed, steps, call, coef, x, noise, out, clip_range, dims, options, step_begin, step_end,
                stream, plan_info, known=None, known_mask=None):
    """Pointers + sizes + stream into the extension; inputs already validated."""
    ext = extension()
    B, D = dims["B"], dims["D"]
    kernel_stream = (torch.cuda.current_stream(x.device) if stream is None
                     else torch.cuda.ExternalStream(int(stream), device=x.device))
    scratch = counters = None
    if plan_info["global_combine"]:
        # Partials of the component groups and per-tile arrival counters (the kernel re-zeroes them).
        # Allocated and zeroed on the kernel's stream: the caching allocator hands this memory out
        # again only to work ordered after the kernel, and the zeroing runs before it.
        with torch.cuda.stream(kernel_stream):
            scratch = torch.empty((plan_info["groups"], B, D), dtype=torch.float32, device=x.device)
            counters = torch.zeros((plan_info["tiles"],), dtype=torch.int32, device=x.device)
    tensors = dict(w_in=packed.w_in, w_a=packed.w_a, w_b=packed.w_b, b_b=packed.b_b, w_out=packed.w_out,
                   b_out=packed.b_out, t_in=steps.t_in, t_shift=steps.t_shift, weights=call.weights, c_in=call.c_in,
                   scale=call.scale, shift=call.shift, coef=coef, noise=noise, x_in=x, x_out=out, scratch=scratch,
                   counters=counters)
    if known is not None:  # named only when used: an extension built before inpainting still serves the rest
        tensors.update(known=known, known_mask=known_mask)
    ptrs = _named(ext.MlpPointers, **{name: 0 if t is None else t.data_ptr() for name, t in tensors.items()})
    sizes = _named(ext.MlpDims, **dims)
    opts = _ext_options(ext, options)
    stream = kernel_stream.cuda_stream
    wtype = _WTYPE[packed.w_in.dtype]
    clip = clip_range is not None
    cr = float(clip_range) if clip else 0.0
    with _on_device(x.device):
        if kind == KIND_STEP:
            ext.mlp_step_launch(wtype, ptrs, sizes, clip, cr, step_begin, step_end, opts, int(stream))
        else:
            ext.mlp_persistent_launch(wtype, ptrs, sizes, clip, cr, opts, int(stream))
    return out


def launch(kind: int, packed, steps, call, coef, x, noise, out, clip_range, *, options=None, step_begin: int = 0,
           step_end: int | None = None, stream=None, known=None, known_mask=None) -> torch.Tensor:
    """Run the fused kernel ``kind`` (KIND_STEP: one launch per step in [step_begin, step_end);
    KIND_PERSISTENT: all steps in one launch) on validated tensors; returns ``out``.

    ``stream`` is a raw ``cudaStream_t`` integer (default: the current torch stream of ``x``'s device);
    the inputs must be ready on it (the caller orders it after the work that produced them).
    ``options`` may set ``block_rows``, ``ranks``, ``groups``, ``mma`` and ``skip_unused`` (tuning, tests).
    ``known`` / ``known_mask`` (both or neither; :func:`check_known`) inpaint after every step.
    """
    if kind not in (KIND_STEP, KIND_PERSISTENT):
        raise ValueError(f"`kind` must be KIND_STEP (0) or KIND_PERSISTENT (1), got {kind!r}")
    dims = check_launch(packed, steps, call, coef, x, noise, out, clip_range)
    known_steps = check_known(known, known_mask, dict(dims, device=x.device))
    T = dims["T"]
    if step_end is None:
        step_end = T
    if kind == KIND_PERSISTENT and (step_begin, step_end) != (0, T):
        raise ValueError("the persistent kernel runs all T steps: `step_begin`/`step_end` must be 0/T")
    if not 0 <= step_begin <= step_end <= T:
        raise ValueError(f"`step_begin`/`step_end` must satisfy 0 <= begin <= end <= T = {T}, "
                         f"got {step_begin}/{step_end}")
    opts = _options_tuple(options)
    info = plan(kind, packed.w_in.dtype, dims["B"], dims["D"], dims["H"], dims["L"], dims["K"], T, options,
                device=x.device)
    if not info["ok"]:
        raise ValueError(f"the CUDA kernel cannot serve this model: {info['reason']}")
    if known is not None:
        dims = dict(dims, known_steps=known_steps)
    return _raw_launch(kind, packed, steps, call, coef, x, noise, out, clip_range, dims, opts, step_begin, step_end,
                       stream, info, known, known_mask)


# ------------------------------------------------------------------------------------------------------------
# The backend


class CudaPrepared(CapturesCalls):
    """A policy packed once for the CUDA kernels; ``run`` is one sampling call."""

    kind = KIND_STEP

    def __init__(self, policy, table, dtype, kind, options=None):
        param = next(policy.parameters())
        self.device = param.device
        self.policy = policy
        self.kind = kind
        self.options = dict(options or {})
        self.packed = pack_policy(policy, dtype)
        self.cond = pack_cond(policy)
        dev_table = table.to(self.device)
        self.steps = step_terms(policy, dev_table.timesteps)
        self.coef = kernel_coef(dev_table)
        self.clip_range = float(table.clip_range) if table.clip_sample else None
        self.adds_noise = bool(table.adds_noise.any())
        self.dims = check_static(self.packed, self.steps, self.coef, self.device)
        self.horizon, self.action_dim = policy.horizon, policy.action_dim
        self._call = CapturedCall(self._sample, self.device)

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        if not self.adds_noise:
            step_noise = None  # the kernel ignores it: no copy into a static buffer
        return self._call(global_cond, x_T, step_noise, known, known_mask)

    def _sample(self, global_cond, x_T, step_noise, known=None, known_mask=None):
        """The whole call: the per-call terms launch, then the kernel launch(es). Capturable (on CUDA, replayed per
        batch size)."""
        B = x_T.shape[0]
        D, T = self.dims["D"], self.dims["T"]
        cond = self.cond
        buf = torch.empty(call_terms_numel(B, cond.K, cond.L, cond.H), device=self.device, dtype=torch.float32)
        c = global_cond if global_cond.dtype == torch.float32 else global_cond.to(torch.float32)
        call_terms_cuda_call(cond, c.contiguous(), buf)
        call = split_call_terms(buf, B, cond.K, cond.L, cond.H)
        x = x_T.reshape(B, D)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        noise = None
        if step_noise is not None and self.adds_noise:
            noise = step_noise.reshape(T, B, D)
            if noise.dtype != torch.float32 or not noise.is_contiguous():
                noise = noise.to(torch.float32).contiguous()
        if known_mask is not None:
            known = known.reshape(*known.shape[:-3], B, D).to(torch.float32).contiguous()
            known_mask = known_mask.reshape(B, D).contiguous().view(torch.uint8)
        # Through the torch.library op, so torch.compile and torch.export see the launch.
        out = mlp_cuda_call(self.kind, self.packed, self.steps, call, self.coef, x, noise, self.clip_range,
                            _options_tuple(self.options), known, known_mask)
        out = out.view(B, self.horizon, self.action_dim)
        return out if x_T.dtype == torch.float32 else out.to(x_T.dtype)


class CudaBackend(Backend):
    name = "cuda"
    priority = 40
    supports_inpainting = True
    kind = KIND_STEP
    runs_native_code = True

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != "cuda":
            return f"backend {self.name!r} needs a CUDA device, got {device}"
        status = extension_status()
        if not status["available"]:
            return status["reason"]
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"backend {self.name!r} needs compute capability 8.0 or newer (cp.async, bfloat16), "
                    f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
        return arch_unsupported_reason((major, minor), status)

    def unsupported_reason(self, policy, table, dtype):
        reason = mlp_unsupported_reason(policy)
        if reason:
            return reason
        comp = policy.components[0]
        if dtype is None:
            dtype = comp.out.weight.dtype
        if dtype not in abi.WEIGHT_DTYPES:
            return f"the CUDA kernels take float32, bfloat16 or float16 weights, got {dtype}"
        K, L, H = len(policy.components), comp.num_blocks, comp.hidden_dim
        D = comp.horizon * comp.input_dim
        if K > abi.CUDA_MAX_K:
            return f"the CUDA kernels serve at most {abi.CUDA_MAX_K} components, this policy has {K}"
        if L > abi.CUDA_MAX_L:
            return f"the CUDA kernels serve at most {abi.CUDA_MAX_L} residual blocks, got {L}"
        if H > abi.CUDA_MAX_H:
            return f"the CUDA kernels serve hidden widths up to {abi.CUDA_MAX_H}, got {H}"
        if D > abi.CUDA_MAX_D:
            return f"the CUDA kernels serve D = horizon * action_dim up to {abi.CUDA_MAX_D}, got {D}"
        if table.clip_sample and not math.isfinite(float(table.clip_range)):
            return f"clip_range must be finite, got {table.clip_range}"
        try:
            param = next(policy.parameters())
        except StopIteration:
            return "the policy has no parameters"
        device = param.device
        if device.type == "cuda" and extension_status()["available"]:
            # Shared memory is the one limit that depends on the device: ask the planner
            # (which also finds a build without code for this GPU's architecture).
            try:
                info = plan(self.kind, dtype, 1, D, H, L, K, len(table), device=device)
            except (RuntimeError, ValueError) as exc:
                return str(exc)
            if not info["ok"]:
                return info["reason"]
        return None

    def prepare(self, policy, table, dtype=None, options=None):
        reason = self.unsupported_reason(policy, table, dtype)
        if reason:
            raise ValueError(f"backend {self.name!r} cannot serve this policy: {reason}")
        return CudaPrepared(policy, table, dtype, self.kind, options)


BACKEND = CudaBackend()
