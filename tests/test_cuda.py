"""The CUDA MLP kernels (``csrc/mlp_step.cu``, ``csrc/mlp_persistent.cu``) and the ``cuda`` /
``cuda-persistent`` backends.

On a CPU (CI): the extension exposes its entry points and reports CUDA failures as Python
exceptions, and the Python layer validates every tensor before a pointer is taken. On a GPU
(``-m gpu``): both kernels against the float64 eager reference (``backend="torch"`` on a
float64 policy whose matrices are rounded to the kernel's weight dtype) by relative error
``max|a - b| / max|b|``, outputs written into NaN-poisoned buffers, forced decompositions
(column ranks, component groups, tensor cores), CUDA-graph capture and replay, and a
non-default stream.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import types

import pytest
import torch

import fdp
from conftest import (KERNEL_COND_DIM, KERNEL_SCHEDULERS, KERNEL_TOL, kernel_policy, make_mlp_policy, replaced,
                      rounded_reference)
from fdp import packing
from fdp.backends import available_backends, get_backend, resolve_backend
from fdp.backends import cuda_backend as cb
from fdp_kernels import abi

NAN = float("nan")
COND_DIM = KERNEL_COND_DIM

SCHEDULERS = KERNEL_SCHEDULERS
TOL = KERNEL_TOL


def _ext_or_skip():
    st = fdp.extension_status()
    if not st["available"]:
        pytest.skip(f"fdp._C not built: {st['reason']}")
    from fdp._extension import extension
    return extension()


def _has_gpu():
    return torch.cuda.is_available() and fdp.extension_status()["available"]


gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA device and the fdp._C extension")


def _rel_err(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max())


    with torch.no_grad():
        for c in ref.components:
            mats = [c.inp.weight, c.out.weight] + [b.weight for b in c.blocks_a] + [b.weight for b in c.blocks_b]
            for w in mats:
                w.copy_(w.to(dtype).double())
    return ref


def _cpu_launch_args(K=3, H=24, L=2, horizon=4, action_dim=3, B=5, T=3, dtype=torch.float32):
    """Valid launch tensors on the CPU (for the validation layer only)."""
    pol = kernel_policy(K, H, L, horizon, action_dim, dtype=torch.float32)
    table = SCHEDULERS["ddpm_clip"][0]().step_table(T)
    cond = torch.randn(B, COND_DIM)
    D = horizon * action_dim
    return dict(packed=packing.pack_policy(pol, dtype), steps=packing.step_terms(pol, table.timesteps),
                call=packing.call_terms(pol, cond, pol.weights(cond)), coef=cb.kernel_coef(table), x=torch.randn(B, D),
                noise=torch.randn(T, B, D), out=torch.empty(B, D), clip_range=1.0)


# ------------------------------------------------------------------------------------------------------------
# CPU: the extension and its error reporting


def test_extension_exposes_the_kernels():
    st = fdp.extension_status()
    if not st["available"]:
        if shutil.which("nvcc") is not None:
            pytest.fail(f"nvcc is on PATH but fdp._C did not build: {st['reason']}")
        pytest.skip("no nvcc and no prebuilt fdp._C")
    ext = _ext_or_skip()
    for name in ("mlp_plan", "mlp_step_launch", "mlp_persistent_launch", "runtime_info"):
        assert callable(getattr(ext, name)), name


def test_cuda_failures_are_python_exceptions():
    ext = _ext_or_skip()
    if ext.runtime_info()["device_count"] > 0:
        pytest.skip("a CUDA device is visible")
    opts = ext.MlpOptions()
    dims = cb._named(ext.MlpDims, B=1, D=32, H=64, L=2, K=4, T=10)
    ptrs = cb._named(ext.MlpPointers, **{name: 1 for name in POINTER_NAMES})
    with pytest.raises(RuntimeError, match="fdp CUDA error"):
        ext.mlp_plan(0, 0, dims, opts)
    with pytest.raises(RuntimeError, match="fdp CUDA error"):
        ext.mlp_persistent_launch(0, ptrs, dims, True, 1.0, opts, 0)
    # Argument errors are found before CUDA is touched: ValueError.
    with pytest.raises(ValueError, match="steps"):
        ext.mlp_step_launch(0, ptrs, dims, True, 1.0, 5, 3, opts, 0)


POINTER_NAMES = ("w_in", "w_a", "w_b", "b_b", "w_out", "b_out", "t_in", "t_shift", "weights", "c_in", "scale",
                 "shift", "coef", "noise", "x_in", "x_out", "scratch", "counters")


def test_launch_structs_are_set_by_name():
    """The extension's launch structs take their fields by name: defaults as fdp.h, unknown names refused."""
    ext = _ext_or_skip()
    ptrs = ext.MlpPointers()
    assert [getattr(ptrs, name) for name in POINTER_NAMES] == [0] * len(POINTER_NAMES)
    with pytest.raises(AttributeError):
        ptrs.x = 1
    opts = cb._ext_options(ext, cb._options_tuple({"ranks": 2, "mma": True}))
    assert [getattr(opts, k) for k in cb._OPTION_KEYS] == [0, 2, 0, 1, 1]
    defaults = ext.MlpOptions()
    assert tuple(getattr(defaults, k) for k in cb._OPTION_KEYS) == cb._options_tuple(None)
    dims = cb._named(ext.MlpDims, B=3, D=5, H=7, L=2, K=4, T=9)
    assert (dims.B, dims.D, dims.H, dims.L, dims.K, dims.T) == (3, 5, 7, 2, 4, 9)


def test_kernel_coef_layout():
    table = SCHEDULERS["ddpm_clip"][0]().step_table(6)
    coef = cb.kernel_coef(table)
    assert coef.shape == (6, abi.CUDA_COEF_WIDTH) and coef.dtype == torch.float32 and coef.is_contiguous()
    torch.testing.assert_close(coef[:, :abi.NUM_COLS], table.coef.float(), rtol=0, atol=0)
    assert coef[:, abi.CUDA_COL_ADDS_NOISE].tolist() == table.adds_noise.float().tolist()
    assert not coef[:, abi.CUDA_COL_ADDS_NOISE + 1:].any()


# ------------------------------------------------------------------------------------------------------------
# CPU: validation before any pointer is passed


def test_valid_cpu_arguments_pass_validation():
    a = _cpu_launch_args()
    dims = cb.check_launch(**a, require_cuda=False)
    assert dims == dict(B=5, D=12, H=24, L=2, K=3, T=3)
    a16 = _cpu_launch_args(dtype=torch.bfloat16)
    assert cb.check_launch(**a16, require_cuda=False)["K"] == 3
    a["noise"], a["clip_range"] = None, None
    cb.check_launch(**a, require_cuda=False)
    a["out"] = a["x"]  # in place is allowed
    cb.check_launch(**a, require_cuda=False)


BAD_INPUTS = [
    ("x-dtype", lambda a: a.update(x=a["x"].double()), TypeError, "`x` must have dtype torch.float32"),
    ("x-list", lambda a: a.update(x=a["x"].tolist()), TypeError, "`x` must be a torch.Tensor"),
    ("x-3d", lambda a: a.update(x=a["x"].reshape(5, 4, 3)), ValueError, r"`x` must be \[B, D\]"),
    ("x-D", lambda a: a.update(x=torch.randn(5, 11)), ValueError, "`x` must have shape"),
    ("batch-0", lambda a: a.update(x=torch.empty(0, 12)), ValueError, "batch size must be >= 1"),
    ("x-noncontig", lambda a: a.update(x=torch.randn(12, 5).t()), ValueError, "`x` must be contiguous"),
    ("w_a-dtype", lambda a: a.update(packed=replaced(a["packed"], w_a=a["packed"].w_a.half())), TypeError,
     "`packed.w_a` must have dtype"),
    ("w_out-shape", lambda a: a.update(packed=replaced(a["packed"], w_out=a["packed"].w_out[:, :-1].contiguous())),
     ValueError, "`packed.w_out` must have shape"),
    ("b_b-dtype", lambda a: a.update(packed=replaced(a["packed"], b_b=a["packed"].b_b.double())), TypeError,
     "`packed.b_b`"),
    ("w_in-f64", lambda a: a.update(packed=replaced(a["packed"], w_in=a["packed"].w_in.double())), TypeError,
     "`packed.w_in` must have one of the dtypes"),
    ("packed-type", lambda a: a.update(packed=object()), TypeError, "`packed` must be an fdp.packing object"),
    ("t_shift-shape", lambda a: a.update(steps=replaced(a["steps"], t_shift=a["steps"].t_shift[:2].contiguous())),
     ValueError, "`steps.t_shift` must have shape"),
    ("scale-noncontig", lambda a: a.update(call=replaced(a["call"], scale=torch.randn(5, 3, 24, 2).transpose(2, 3))),
     ValueError, "`call.scale` must be contiguous"),
    ("weights-batch", lambda a: a.update(call=replaced(a["call"], weights=a["call"].weights[:4].contiguous())),
     ValueError, "`call.weights` must have shape"),
    ("coef-width", lambda a: a.update(coef=a["coef"][:, :6].contiguous()), ValueError, "`coef` must have shape"),
    ("coef-f64", lambda a: a.update(coef=a["coef"].double()), TypeError, "`coef` must have dtype"),
    ("noise-shape", lambda a: a.update(noise=a["noise"][:2].contiguous()), ValueError, "`noise` must have shape"),
    ("noise-bf16", lambda a: a.update(noise=a["noise"].bfloat16()), TypeError, "`noise` must have dtype"),
    ("out-dtype", lambda a: a.update(out=a["out"].half()), TypeError, "`out` must have dtype"),
    ("out-device", lambda a: a.update(out=a["out"].to("meta")), ValueError, "`out` must be on cpu"),
    ("c_in-device", lambda a: a.update(call=replaced(a["call"], c_in=a["call"].c_in.to("meta"))), ValueError,
     "`call.c_in` must be on cpu"),
    ("clip-negative", lambda a: a.update(clip_range=-1.0), ValueError, "`clip_range`"),
    ("clip-nan", lambda a: a.update(clip_range=NAN), ValueError, "`clip_range`"),
    ("clip-bool", lambda a: a.update(clip_range=True), ValueError, "`clip_range`"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_validation_rejects_bad_inputs(name, mutate, exc, match):
    a = _cpu_launch_args()
    mutate(a)
    with pytest.raises(exc, match=match):
        cb.check_launch(**a, require_cuda=False)


def test_validation_limits():
    a = _cpu_launch_args(K=9, H=8, L=1, horizon=2, action_dim=1, B=1)
    with pytest.raises(ValueError, match="1..8 components"):
        cb.check_launch(**a, require_cuda=False)


def test_cpu_tensors_are_refused_before_any_pointer():
    a = _cpu_launch_args()
    with pytest.raises(ValueError, match="CUDA"):
        cb.check_launch(**a)
    # The public launcher validates first: no extension call happens for CPU tensors.
    with pytest.raises(ValueError, match="CUDA"):
        cb.launch(cb.KIND_STEP, **a)
    with pytest.raises(ValueError, match="KIND_STEP"):
        cb.launch(7, **a)


def test_kernel_options_are_checked():
    assert cb._options_tuple(None) == (0, 0, 0, -1, 1)
    assert cb._options_tuple({"ranks": 2, "mma": True}) == (0, 2, 0, 1, 1)
    with pytest.raises(ValueError, match="unknown kernel options"):
        cb._options_tuple({"warps": 4})
    with pytest.raises(TypeError, match="block_rows"):
        cb._options_tuple({"block_rows": 1.5})


class _FakeStream:
    def __init__(self, handle):
        self.cuda_stream = handle


def test_combine_buffers_are_allocated_on_the_kernels_stream(monkeypatch):
    """With an explicit `stream`, the global-combine scratch and counters are allocated and zeroed
    while that stream is current: the caching allocator ties memory to the stream it was allocated
    on, so memory freed after the launch is reused only by work ordered after the kernel."""
    current = {"stream": _FakeStream(111)}  # what torch would call the current stream
    allocated, launched = [], []

    @contextlib.contextmanager
    def stream_ctx(s):
        prev, current["stream"] = current["stream"], s
        try:
            yield
        finally:
            current["stream"] = prev

    def recording(fn):
        def alloc(*args, **kw):
            allocated.append(current["stream"].cuda_stream)
            return fn(*args, **kw)
        return alloc

    class FakeExt:
        MlpPointers = MlpDims = MlpOptions = types.SimpleNamespace

        def mlp_step_launch(self, *args):
            launched.append(args[-1])

        mlp_persistent_launch = mlp_step_launch

    monkeypatch.setattr(cb, "extension", FakeExt)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device=None: _FakeStream(handle))
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "zeros", recording(torch.zeros))
    a = _cpu_launch_args()
    dims = cb.check_launch(**a, require_cuda=False)
    info = {"global_combine": True, "groups": dims["K"], "tiles": 1}
    for stream, expect in ((222, 222), (None, 111)):
        allocated.clear()
        launched.clear()
        cb._raw_launch(cb.KIND_STEP, a["packed"], a["steps"], a["call"], a["coef"], a["x"], a["noise"], a["out"],
                       a["clip_range"], dims, cb._options_tuple(None), 0, dims["T"], stream, info)
        assert launched == [expect]
        assert allocated == [expect, expect], "scratch/counters allocated on another stream than the kernel's"


# ------------------------------------------------------------------------------------------------------------
# CPU: the backends' refusals and auto


@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_backends_registered_and_unavailable_on_cpu(name):
    be = get_backend(name)
    assert be.name == name and be.priority == {"cuda": 40, "cuda-persistent": 50}[name]
    reason = be.unavailable_reason(torch.device("cpu"))
    assert reason and "CUDA device" in reason
    info = available_backends("cpu")[name]
    assert not info.available and "CUDA" in info.reason


@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_unsupported_models_are_refused_with_a_reason(name):
    be = get_backend(name)
    table = SCHEDULERS["ddim"][0]().step_table(3)
    pol = kernel_policy(3, 24, 2, 4, 3, dtype=torch.float32)
    assert be.unsupported_reason(pol, table, torch.float32) is None
    assert be.unsupported_reason(pol, table, torch.bfloat16) is None
    assert "float64" in be.unsupported_reason(pol, table, torch.float64)
    assert "at most 8 components" in be.unsupported_reason(kernel_policy(9, 8, 1, 2, 1, dtype=torch.float32), table,
                                                            torch.float32)
    unet = fdp.FactorizedPolicy([fdp.ConditionalUnet1D(3, global_cond_dim=COND_DIM, down_dims=(16, 32),
                                                       diffusion_step_embed_dim=16, n_groups=4)],
                                fdp.Router(COND_DIM, 1), 4, 3)
    assert "MLPDenoiser" in be.unsupported_reason(unet, table, torch.float32)
    with pytest.raises(ValueError, match="MLPDenoiser"):
        be.prepare(unet, table, torch.float32)


def test_auto_on_cpu_does_not_pick_cuda():
    pol = kernel_policy(2, 16, 1, 4, 3, dtype=torch.float32)
    table = SCHEDULERS["ddim"][0]().step_table(2)
    be = resolve_backend("auto", pol, table, "cpu", torch.float32)
    assert be.name not in ("cuda", "cuda-persistent")
    for name in ("cuda", "cuda-persistent"):
        assert "CUDA device" in resolve_backend.last_reasons[name]
        with pytest.raises(ValueError, match="CUDA device"):
            fdp.Sampler(pol, SCHEDULERS["ddim"][0](), num_inference_steps=2, backend=name)


# ------------------------------------------------------------------------------------------------------------
# GPU: both kernels against the float64 reference


class Case:
    """A float64 policy, its schedule, x_T, step noise (NaN where no step adds noise) and the reference."""

    def __init__(self, K, H, L, horizon, action_dim, B, sched, strategy, T, dtype, seed=0):
        self.policy = kernel_policy(K, H, L, horizon, action_dim, strategy, seed)
        factory, eta = SCHEDULERS[sched]
        self.table = factory().step_table(T, eta=eta)
        g = torch.Generator().manual_seed(seed + 1)
        self.B, self.D, self.shape, self.T = B, horizon * action_dim, (B, horizon, action_dim), T
        self.cond = torch.randn(B, COND_DIM, generator=g, dtype=torch.float64)
        self.x_T = torch.randn(self.shape, generator=g, dtype=torch.float64)
        self.noise = torch.randn((T, *self.shape), generator=g, dtype=torch.float64)
        self.noise[~self.table.adds_noise] = NAN  # kernels must not read these into x
        self.adds = bool(self.table.adds_noise.any())
        self.ref = get_backend("torch").prepare(rounded_reference(self.policy, dtype), self.table).run(
            self.cond, self.x_T, self.noise if self.adds else None)
        dev = torch.device("cuda")
        pol32 = copy.deepcopy(self.policy).float().to(dev)
        self.pol32 = pol32
        tab = self.table.to(dev)
        self.packed = packing.pack_policy(pol32, dtype)
        self.steps = packing.step_terms(pol32, tab.timesteps)
        cond = self.cond.float().to(dev)
        self.call = packing.call_terms(pol32, cond, pol32.weights(cond))
        self.coef = cb.kernel_coef(tab)
        self.clip = float(self.table.clip_range) if self.table.clip_sample else None
        self.x = self.x_T.reshape(B, self.D).float().to(dev)
        self.knoise = self.noise.reshape(T, B, self.D).float().to(dev) if self.adds else None

    def run(self, kind, **options):
        out = torch.full((self.B, self.D), NAN, device="cuda")
        res = cb.launch(kind, self.packed, self.steps, self.call, self.coef, self.x, self.knoise, out, self.clip,
                        options=options)
        assert res is out
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "elements left unwritten (NaN poison survived)"
        return out.reshape(self.shape).cpu()


# K, H, L, horizon, action_dim, B, scheduler, strategy, T, weight dtype
KERNEL_CASES = [
    (4, 256, 2, 16, 2, 1, "ddpm_clip", "soft", 10, torch.float32),   # the target: K 4, H 256, batch 1
    (1, 16, 1, 2, 1, 1, "ddim_eta", "soft", 4, torch.float32),       # D = 2, one row
    (3, 24, 2, 5, 3, 5, "ddim", "soft", 4, torch.float32),           # H not a power of two, D = 15
    (4, 48, 2, 7, 16, 17, "ddim_eta", "hard", 3, torch.float32),     # D = 112, several tiles
    (8, 40, 1, 4, 3, 17, "ddpm_v", "topk", 3, torch.float32),        # K = 8, top-2 routing
    (2, 100, 3, 10, 16, 5, "ddpm_clip", "fixed", 3, torch.float32),  # L = 3, D = 160
    (6, 17, 1, 3, 5, 2, "ddim_eta", "soft", 3, torch.float32),       # odd H: unaligned rows
    (1, 300, 1, 2, 3, 1, "ddpm_clip", "hard", 2, torch.float32),     # H = 300
    (4, 256, 2, 16, 2, 1, "ddpm_clip", "soft", 6, torch.bfloat16),   # target shape, bf16
    (3, 48, 2, 5, 3, 5, "ddpm_clip", "soft", 3, torch.bfloat16),     # FMA, bf16, D = 15 (unaligned rows)
    (5, 96, 2, 8, 4, 70, "ddim", "hard", 3, torch.bfloat16),         # tensor cores, several tiles
    (4, 64, 2, 4, 3, 16, "ddim_eta", "topk", 3, torch.float16),      # tensor cores, fp16
    (3, 40, 1, 5, 3, 33, "ddpm_clip", "soft", 3, torch.float16),     # tensor cores, odd D and H % 16 != 0
    (2, 72, 1, 4, 3, 300, "ddim_eta", "soft", 2, torch.float32),     # many tiles
]


def _case_id(c):
    K, H, L, h, a, B, s, r, T, dt = c
    return f"K{K}-H{H}-L{L}-D{h * a}-B{B}-{s}-{r}-{str(dt).split('.')[-1]}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
def test_kernels_match_float64_reference(case):
    K, H, L, horizon, action_dim, B, sched, strategy, T, dtype = case
    c = Case(K, H, L, horizon, action_dim, B, sched, strategy, T, dtype)
    step = c.run(cb.KIND_STEP)
    pers = c.run(cb.KIND_PERSISTENT)
    e_step, e_pers = _rel_err(step, c.ref), _rel_err(pers, c.ref)
    print(f"[{_case_id(case)}] rel err: cuda {e_step:.2e}, cuda-persistent {e_pers:.2e}")
    assert e_step < TOL[dtype] and e_pers < TOL[dtype]


def _forced_configs(dtype, K, B):
    """Decompositions to force (besides auto), for both kernels, on this device."""
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    step = [{}, {"groups": 1}, {"groups": K}, {"block_rows": 1}, {"skip_unused": 0}]
    pers = [{}, {"groups": 1}, {"block_rows": 1}, {"skip_unused": 0}]
    if K > 2:
        step.append({"groups": 2})  # K % groups != 0: some blocks hold a dummy slot
    if sm90:
        step += [{"ranks": 2}, {"ranks": 4, "groups": K}, {"ranks": 3, "groups": 1}, {"ranks": 16, "groups": 1}]
        pers += [{"ranks": 1, "groups": K}, {"ranks": 2}]
        if K <= 5:
            pers.append({"ranks": 3})
    if dtype != torch.float32:
        step += [{"mma": 1, "block_rows": 16}, {"mma": 1, "block_rows": 64}, {"mma": 0, "block_rows": 8}]
        pers += [{"mma": 1, "block_rows": 32}, {"mma": 0}]
        if sm90:
            step.append({"mma": 1, "block_rows": 16, "ranks": 2})
            pers.append({"mma": 1, "block_rows": 16, "ranks": 2})
    return step, pers


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", [
    (3, 48, 2, 5, 3, 7, "ddpm_clip", "soft", 3, torch.float32),
    (4, 40, 1, 4, 3, 37, "ddim_eta", "hard", 3, torch.bfloat16),
    (2, 128, 2, 16, 2, 1, "ddim", "topk", 3, torch.float16),
], ids=_case_id)
def test_forced_decompositions_agree(case):
    """Every decomposition computes the same numbers (within its dtype's tolerance)."""
    K, H, L, horizon, action_dim, B, sched, strategy, T, dtype = case
    c = Case(K, H, L, horizon, action_dim, B, sched, strategy, T, dtype)
    step_cfgs, pers_cfgs = _forced_configs(dtype, K, B)
    failures = []
    for kind, cfgs in ((cb.KIND_STEP, step_cfgs), (cb.KIND_PERSISTENT, pers_cfgs)):
        for opts in cfgs:
            try:
                out = c.run(kind, **opts)
            except ValueError as exc:  # a forced shape this device cannot schedule
                print(f"kind {kind} {opts}: refused: {exc}")
                continue
            err = _rel_err(out, c.ref)
            print(f"kind {kind} {opts}: rel err {err:.2e}")
            if not err < TOL[dtype]:
                failures.append(f"kind {kind} {opts}: {err:.2e}")
    assert not failures, failures


@pytest.mark.gpu
@gpu
def test_deterministic_and_fp32_paths_agree_exactly():
    c = Case(3, 48, 2, 5, 3, 6, "ddpm_clip", "soft", 4, torch.float32)
    one_block = dict(groups=1, ranks=1, block_rows=8)
    a = c.run(cb.KIND_STEP, **one_block)
    assert torch.equal(a, c.run(cb.KIND_STEP, **one_block))
    b = c.run(cb.KIND_PERSISTENT, **one_block)
    assert torch.equal(b, c.run(cb.KIND_PERSISTENT, **one_block))
    # Same tile, same order of operations: per-step and persistent agree bit for bit.
    assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_skips_components_no_row_uses():
    """A component with weight 0 on every row: NaN weights in it leave the result bit-equal, skipped or not."""
    c = Case(3, 24, 1, 4, 3, 5, "ddim", "fixed", 2, torch.float32)
    c.pol32.router.set_strategy("fixed", fixed_weights=[0.6, 0.0, 0.4])
    cond = c.cond.float().cuda()
    c.call = packing.call_terms(c.pol32, cond, c.pol32.weights(cond))
    expect = c.run(cb.KIND_PERSISTENT)
    for attr in ("w_in", "w_a", "w_b", "w_out"):
        getattr(c.packed, attr)[1] = NAN
    for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT):
        torch.testing.assert_close(c.run(kind), expect, rtol=0, atol=0)
    # Evaluated without the skip, its NaN output stays out of every row too (a zero weight leaves it out per row).
    torch.testing.assert_close(c.run(cb.KIND_PERSISTENT, skip_unused=0), expect, rtol=0, atol=0)


@pytest.mark.gpu
@gpu
def test_in_place_output():
    c = Case(2, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3, torch.float32)
    expect = c.run(cb.KIND_PERSISTENT).reshape(c.B, c.D).cuda()
    for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT):
        for opts in ({}, {"groups": 2}):
            x = c.x.clone()
            cb.launch(kind, c.packed, c.steps, c.call, c.coef, x, c.knoise, x, c.clip,
                      options=opts if kind == cb.KIND_STEP else {})
            torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_plan_reports_a_schedulable_launch():
    for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT):
        info = cb.plan(kind, torch.float32, 1, 32, 256, 2, 4, 10)
        assert info["ok"], info["reason"]
        assert info["smem_bytes"] >= info["fixed_bytes"] and info["resident_bytes"] <= info["weight_bytes"]
        print(kind, info)
    if torch.cuda.get_device_capability()[0] >= 9:
        info = cb.plan(cb.KIND_PERSISTENT, torch.bfloat16, 1, 32, 256, 2, 4, 10)
        assert info["cluster_size"] > 1 and info["resident_bytes"] == info["weight_bytes"]


# ------------------------------------------------------------------------------------------------------------
# GPU: the backends through fdp.Sampler, graphs and streams


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
@pytest.mark.parametrize("dtype,sched,strategy,B", [
    (torch.float32, "ddpm_clip", "topk", 1),
    (torch.float32, "ddim", "hard", 9),
    (torch.float32, "ddim_eta", "soft", 4),
    (torch.bfloat16, "ddim_eta", "soft", 17),
    (torch.float16, "ddpm_clip", "soft", 2),
])
def test_backends_match_torch(name, dtype, sched, strategy, B):
    pol64 = kernel_policy(3, 40, 2, 4, 3, strategy)
    factory, eta = SCHEDULERS[sched]
    cond = torch.randn(B, COND_DIM, dtype=torch.float64)
    pol = copy.deepcopy(pol64).float().cuda()
    sampler = fdp.Sampler(pol, factory(), num_inference_steps=5, eta=eta, backend=name, dtype=dtype)
    assert sampler.backend == name
    gen = torch.Generator(device="cuda").manual_seed(3)
    x_T, step_noise = sampler.noise(B, gen)
    out = sampler(cond.float().cuda(), x_T=x_T, step_noise=step_noise)
    assert out.shape == (B, 4, 3) and out.dtype == torch.float32 and out.is_cuda
    ref = fdp.Sampler(rounded_reference(pol64, dtype), factory(), num_inference_steps=5, eta=eta, backend="torch")(
        cond, x_T=x_T.double().cpu(), step_noise=None if step_noise is None else step_noise.double().cpu())
    err = _rel_err(out, ref)
    print(f"[{name} {dtype} {sched} {strategy} B{B}] rel err vs float64 torch: {err:.2e}")
    assert err < TOL[dtype]


@pytest.mark.gpu
@gpu
def test_auto_verifies_both_kernels_and_picks_the_fastest_on_gpu():
    pol = make_mlp_policy(K=2, dtype=torch.float32).cuda()
    s = fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2)
    rows = {c.name: c for c in s.selection.candidates}
    assert s.selection.mode == "timed"
    for name in ("cuda", "cuda-persistent"):
        assert rows[name].rel_error <= rows[name].tolerance and rows[name].time_ms > 0, rows[name]
    assert s.backend == min((c for c in rows.values() if c.time_ms is not None), key=lambda c: c.time_ms).name
    assert get_backend("cuda-persistent").priority > get_backend("cuda").priority > get_backend(
        "triton-persistent").priority


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_cuda_graph_capture_and_replay(name):
    pol = kernel_policy(4, 64, 2, 8, 2, "soft", dtype=torch.float32).cuda()
    sampler = fdp.Sampler(pol, SCHEDULERS["ddpm_clip"][0](), num_inference_steps=6, backend=name)
    B = 3
    cond = torch.randn(B, COND_DIM, device="cuda")
    x_T, noise = sampler.noise(B, torch.Generator(device="cuda").manual_seed(0))
    eager = sampler(cond, x_T=x_T, step_noise=noise).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (plans, caches) off the capture
        for _ in range(2):
            sampler(cond, x_T=x_T, step_noise=noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sampler(cond, x_T=x_T, step_noise=noise)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # New inputs copied into the static buffers: the replay follows them.
    cond.copy_(torch.randn_like(cond))
    x_T.copy_(torch.randn_like(x_T))
    expect = sampler(cond, x_T=x_T, step_noise=noise).clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expect)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_non_default_stream(name):
    pol = kernel_policy(3, 48, 2, 4, 3, "soft", dtype=torch.float32).cuda()
    sampler = fdp.Sampler(pol, SCHEDULERS["ddim_eta"][0](), num_inference_steps=4, eta=0.7, backend=name)
    B = 5
    cond = torch.randn(B, COND_DIM, device="cuda")
    x_T, noise = sampler.noise(B, torch.Generator(device="cuda").manual_seed(1))
    expect = sampler(cond, x_T=x_T, step_noise=noise)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Queue work ahead on this stream: the kernels must wait for it, on this stream.
        torch.cuda._sleep(50_000_000)
        x2 = x_T * 1.0
        out = sampler(cond, x_T=x2, step_noise=noise)
    stream.synchronize()
    assert torch.equal(out, expect)


@pytest.mark.gpu
@gpu
def test_explicit_stream_keeps_combine_buffers_until_the_kernel_ran():
    """A launch on a busy non-current stream with a global-combine plan: allocations on the current
    stream right after it must not receive (and overwrite) the kernel's scratch or counters."""
    c = Case(3, 24, 1, 4, 3, 1, "ddpm_clip", "soft", 3, torch.float32)
    info = cb.plan(cb.KIND_STEP, torch.float32, 1, c.D, 24, 1, 3, 3, {"groups": 3})
    assert info["ok"] and info["global_combine"], info
    expect = c.run(cb.KIND_STEP, groups=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = torch.full((c.B, c.D), NAN, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernel starts well after the allocations below
    cb.launch(cb.KIND_STEP, c.packed, c.steps, c.call, c.coef, c.x, c.knoise, out, c.clip,
              options={"groups": 3}, stream=side.cuda_stream)
    # Same sizes as the scratch [groups, B, D] float32 and the counters [tiles] int32: the allocator
    # would hand out the launch's blocks here if they belonged to the current stream.
    junk = [torch.full((3, c.B, c.D), NAN, device="cuda"), torch.full((info["tiles"],), 7, dtype=torch.int32,
                                                                       device="cuda")]
    side.synchronize()
    torch.cuda.synchronize()
    del junk
    torch.testing.assert_close(out.reshape(c.shape).cpu(), expect, rtol=0, atol=0)
