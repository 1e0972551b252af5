"""The per-call terms (router weights, conditioning terms) folded into one launch.

- :func:`fdp.packing.reference_call_terms` on :class:`fdp.packing.PackedCond` against what the policy's own
  modules give (``packing.call_terms`` with ``policy.weights``), for every strategy and the router's NaN rules;
- the Triton kernel (:mod:`fdp_kernels.call_terms`, interpreted) against the same ground truth: fresh random
  inputs, NaN-poisoned outputs, odd sizes, batch 1;
- launches per call counted on the CPU by construction: each fused MLP backend's ``_sample`` with the kernel
  launches recorded (not run) and every aten op dispatched counted.

Error bounds: :func:`helpers.cond_truth_and_bounds` derives them from the sums' lengths.
"""

import os
import subprocess
import sys

import pytest
import torch

import fdp
from fdp import packing
from fdp._validation import inputs_already_checked
from fdp_kernels.abi import ROUTER_STRATEGIES
from helpers import assert_terms_within as assert_within, cond_policy as make_policy, cond_truth_and_bounds as \
    truth_and_bounds

U = 2.0 ** -24
NAN = float("nan")
STRATEGIES = list(ROUTER_STRATEGIES)


def kernel_terms(pc, c, counters=None):
    from fdp_kernels.call_terms import call_terms

    B = c.shape[0]
    out = torch.full((packing.call_terms_numel(B, pc.K, pc.L, pc.H),), NAN)  # poisoned
    call_terms(pc, c, out=out, counters=counters)
    return packing.split_call_terms(out, B, pc.K, pc.L, pc.H)


# -- the packed layout and its torch reference ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("conditional", [True, False])
def test_reference_is_the_policy(strategy, conditional):
    policy = make_policy(K=4, L=3, H=24, Dc=7, Hr=9, strategy=strategy, conditional=conditional)
    pc = packing.pack_cond(policy)
    assert pc.strategy == STRATEGIES.index(strategy) and pc.conditional == conditional
    c = torch.randn(6, 7, dtype=torch.float64)
    truth, bounds = truth_and_bounds(policy, c.float())
    got = packing.reference_call_terms(pc, c.float())
    assert_within(got, truth, bounds)
    if strategy == "tanh":
        assert (got.weights < 0).any() and ((got.weights.sum(1) - 1).abs() > 0.1).any()  # signed, unnormalised


def test_pack_layout():
    policy = make_policy(K=3, L=2, H=16, Dc=5, Hr=8)
    pc = packing.pack_cond(policy)
    assert pc.cond_w.shape == (5, 3 * 5 * 16) and pc.cond_b.shape == (3 * 5 * 16,)
    assert pc.router_w1.shape == (5, 8) and pc.router_w2.shape == (8, 3) and (pc.K, pc.L, pc.H) == (3, 2, 16)
    for t in (pc.router_w1, pc.router_b1, pc.router_w2, pc.router_b2, pc.fixed, pc.cond_w, pc.cond_b):
        assert t.dtype == torch.float32 and t.is_contiguous()
    # c_in block: component 1's V_in^T
    torch.testing.assert_close(pc.cond_w[:, 16:32], policy.components[1].cond_proj.weight[:16].t().float())
    buf = torch.arange(float(packing.call_terms_numel(2, 3, 2, 16)))
    t = packing.split_call_terms(buf, 2, 3, 2, 16)
    assert t.weights.shape == (2, 3) and t.c_in.shape == (2, 3, 16) and t.shift.shape == (2, 3, 2, 16)
    assert int(t.shift[-1, -1, -1, -1]) == buf.numel() - 1 and int(t.c_in[0, 0, 0]) == 6


@pytest.mark.parametrize("strategy", ["soft", "fixed"])
@pytest.mark.parametrize("conditional", [True, False])
def test_pack_is_a_copy_of_a_float32_policy(strategy, conditional):
    """A float32 policy's packed tensors are copies, not its parameters or buffers: the per-call terms carry no
    autograd history (the ops have no backward), and a change to the policy reaches a sampler only through a
    new pack (:mod:`fdp._watch`), never half of one."""
    # Hr = 1 makes router_w1.t() contiguous, so the old `.to(f32).contiguous()` aliased it too.
    policy = make_policy(K=3, Hr=1, strategy=strategy, conditional=conditional).float()
    pc = packing.pack_cond(policy)
    own = {t.untyped_storage().data_ptr() for t in [*policy.parameters(), *policy.buffers()]}
    fields = ("router_w1", "router_b1", "router_w2", "router_b2", "fixed", "cond_w", "cond_b")
    for name in fields:
        t = getattr(pc, name)
        assert not t.requires_grad, name
        assert t.numel() == 0 or t.untyped_storage().data_ptr() not in own, f"{name} shares the policy's storage"
    before = {name: getattr(pc, name).clone() for name in fields}
    with torch.no_grad():
        for p in [*policy.parameters(), *policy.buffers()]:
            if p.is_floating_point():
                p.add_(1.0)
    for name in fields:
        assert torch.equal(getattr(pc, name), before[name]), name
    got = packing.reference_call_terms(pc, torch.randn(3, 5))
    assert not any(t.requires_grad for t in vars(got).values())


def _tied(policy, logits):
    """Make every row's logits exactly ``logits`` (the last layer reads nothing, its bias is the logits)."""
    with torch.no_grad():
        policy.router.net[2].weight.zero_()
        policy.router.net[2].bias.copy_(torch.tensor(logits, dtype=torch.float64))


@pytest.mark.parametrize("strategy,logits,expected", [
    ("hard", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 1, 0, 0, 0]),
    ("hard", [3.0] * 5, [1, 0, 0, 0, 0]),
    ("topk", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 0.5, 0.5, 0, 0]),
    ("topk", [3.0] * 5, [0.5, 0.5, 0, 0, 0]),
    ("topk", [2.0, 1.0, 1.0, 1.0, 1.0], None),  # one clear winner, four tied for the second place
])
def test_ties_go_to_the_lowest_index(strategy, logits, expected):
    policy = make_policy(K=5, strategy=strategy)
    _tied(policy, logits)
    c = torch.randn(3, 5, dtype=torch.float64)
    if expected is None:
        e = torch.exp(torch.tensor([2.0, 1.0]) - 2.0)
        expected = [float(e[0] / e.sum()), float(e[1] / e.sum()), 0, 0, 0]
    expected = torch.tensor(expected, dtype=torch.float32).expand(3, 5)
    pc = packing.pack_cond(policy)
    for w in (policy.weights(c).float(), packing.reference_call_terms(pc, c.float()).weights,
              kernel_terms(pc, c.float()).weights):
        torch.testing.assert_close(w, expected, rtol=2 * U, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("conditional", [True, False])
def test_nan_feature_row(strategy, conditional):
    """A NaN row of the features gives what the policy gives: NaN weights on that row (the router's NaN rules;
    ``fixed``: the fixed weights), NaN terms where the components read the features (else their constants),
    the other rows untouched."""
    policy = make_policy(K=3, strategy=strategy, conditional=conditional)
    pc = packing.pack_cond(policy)
    c = torch.randn(4, 5, dtype=torch.float64)
    c[2] = NAN
    with inputs_already_checked():  # as a Sampler with check_inputs=False runs the router
        policy_terms = packing.call_terms(policy, c, policy.weights(c))
    ok = [0, 1, 3]
    truth, bounds = truth_and_bounds(policy, c[ok].float())
    for got in (packing.reference_call_terms(pc, c.float()), kernel_terms(pc, c.float())):
        for f in ("weights", "c_in", "scale", "shift"):
            g, p = getattr(got, f)[2], getattr(policy_terms, f)[2]
            assert torch.equal(torch.isnan(g), torch.isnan(p)), f
            if f == "weights":
                assert torch.isnan(g).all() == (strategy != "fixed")
            else:
                assert torch.isnan(g).all() == conditional
        assert_within(packing.CallTerms(*(getattr(got, f)[ok] for f in ("weights", "c_in", "scale", "shift"))),
                      truth, bounds)


@pytest.mark.parametrize("strategy", ["soft", "tanh", "hard", "topk"])
@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")])
def test_non_finite_logit(strategy, bad):
    """A non-finite logit on every row: NaN rows where the router gives them (NaN or +Inf; tanh: -Inf too),
    else -Inf is a component never chosen (weight 0)."""
    policy = make_policy(K=4, strategy=strategy)
    with torch.no_grad():
        policy.router.net[2].weight[1].zero_()
        policy.router.net[2].bias[1] = bad
    c = torch.randn(3, 5, dtype=torch.float64)
    want = policy.weights(c).float()
    pc = packing.pack_cond(policy)
    nan_rows = not (bad == -float("inf")) or strategy == "tanh"
    assert torch.isnan(want).all() == nan_rows
    for terms in (packing.reference_call_terms(pc, c.float()), kernel_terms(pc, c.float())):
        w = terms.weights
        assert torch.equal(torch.isnan(w), torch.isnan(want))
        if not nan_rows:
            assert (w[:, 1] == 0).all()
            assert_within(terms, *truth_and_bounds(policy, c.float()))


# -- the Triton kernel --------------------------------------------------------------------------------------------

# K, L, H, Dc, Hr, B: odd sizes, several column tiles, Dc / Hr over one chunk (32), two row tiles, batch 1.
KERNEL_CASES = [
    (3, 1, 17, 5, 7, 1),
    (5, 3, 19, 37, 45, 17),
    (1, 2, 16, 33, 1, 3),
    (8, 1, 24, 3, 33, 5),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "K{}L{}H{}Dc{}Hr{}B{}".format(*c))
def test_kernel_matches_the_policy(strategy, case):
    K, L, H, Dc, Hr, B = case
    if strategy == "topk" and K == 1:
        pytest.skip("top-k of one component is hard routing")
    policy = make_policy(K=K, L=L, H=H, Dc=Dc, Hr=Hr, strategy=strategy, seed=K + L)
    pc = packing.pack_cond(policy)
    c = torch.randn(B, Dc)
    counters = torch.full((3,), 7, dtype=torch.int32)
    got = kernel_terms(pc, c, counters)
    truth, bounds = truth_and_bounds(policy, c)
    assert_within(got, truth, bounds)
    assert (counters == 0).all()


def test_kernel_unconditional_components_and_other_feature_layouts():
    policy = make_policy(K=3, L=2, H=16, Dc=6, Hr=8, conditional=False)
    pc = packing.pack_cond(policy)
    c = torch.randn(4, 12)[:, ::2]  # strided rows and columns
    truth, bounds = truth_and_bounds(policy, c)
    assert_within(kernel_terms(pc, c), truth, bounds)
    policy = make_policy(K=3, L=2, H=16, Dc=6, Hr=8)
    c16 = torch.randn(4, 6).bfloat16()  # read in its dtype, computed in float32
    truth, bounds = truth_and_bounds(policy, c16.float())
    assert_within(kernel_terms(packing.pack_cond(policy), c16), truth, bounds)


def test_kernel_rejects_bad_arguments():
    from fdp_kernels.call_terms import call_terms

    pc = packing.pack_cond(make_policy(K=3, Dc=5))
    with pytest.raises(ValueError, match="`global_cond` must be \\[B >= 1, 5\\]"):
        call_terms(pc, torch.randn(2, 6))
    with pytest.raises(TypeError, match="`global_cond` must be a floating tensor"):
        call_terms(pc, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="`out` must have shape"):
        call_terms(pc, torch.randn(2, 5), out=torch.empty(3))
    with pytest.raises(ValueError, match="`counters` must be"):
        call_terms(pc, torch.randn(2, 5), counters=torch.zeros(2))


# -- launches per call, by construction ------------------------------------------------------------------------


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


#: What a call may dispatch besides its launches, none of it device work: ``empty`` (the outputs: the call's terms
#: buffer and x_0, and while a graph is captured its own scratch and counters, which the per-call launch zeroes),
#: ``view`` (x_T and the noise flattened, x_0 shaped back, the terms' four tensors), ``slice`` and
#: ``split_with_sizes`` (the terms buffer split, the cached counters cut to the batch's tiles).
ALLOWED_OPS = {"aten.empty", "aten.view", "aten.slice", "aten.split_with_sizes"}


def _record_launches(monkeypatch):
    from fdp_kernels.call_terms import call_terms_kernel

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)

    monkeypatch.setattr(type(call_terms_kernel), "run", record)  # JITFunction, or the interpreter's twin
    return launches


@pytest.mark.parametrize("name,B", [("triton", 1), ("triton", 20), ("triton-persistent", 1),
                                    ("triton-persistent", 20)])
@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim"])
@pytest.mark.parametrize("capturing", [False, True])
def test_triton_launches_per_call(monkeypatch, name, B, sched, capturing):
    """``_sample``, the function a CUDA graph captures: the per-call launch and T step launches (triton) or one
    loop launch (triton-persistent), and no other device work."""
    from helpers import KERNEL_SCHEDULERS

    import fdp.backends.triton_backend as tb
    from fdp.backends import get_backend

    T = 3
    factory, eta = KERNEL_SCHEDULERS[sched]
    policy = make_policy(K=3, strategy="topk").float()
    prepared = get_backend(name).prepare(policy, factory().step_table(T, eta=eta), torch.float32)
    cond, x_T = torch.randn(B, 5), torch.randn(B, 4, 3)
    noise = torch.randn(T, B, 4, 3) if prepared.adds_any else None
    launches = _record_launches(monkeypatch)
    prepared._sample(cond, x_T, noise)  # grows the workspace
    if capturing:  # a graph's own workspace, allocated inside the captured call
        monkeypatch.setattr(tb, "capturing", lambda device: True)
    launches.clear()
    with _Ops() as ops:
        prepared._sample(cond, x_T, noise)
    want = ["call_terms_kernel"] + (["mlp_step_kernel"] * T if name == "triton" else ["mlp_persistent_kernel"])
    assert launches == want
    assert len(launches) == (T + 1 if name == "triton" else 2)
    ops_launched = [n for n in ops.names if n.startswith("fdp.")]
    assert ops_launched == ["fdp.call_terms_launch"] + ["fdp.mlp_launch"] * (T if name == "triton" else 1)
    others = {n for n in ops.names if not n.startswith("fdp.")}
    assert others <= ALLOWED_OPS, others - ALLOWED_OPS


@pytest.mark.parametrize("kind", ["step", "persistent"])
@pytest.mark.parametrize("B", [1, 20])
@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim"])
def test_cuda_launches_per_call(monkeypatch, kind, B, sched):
    """The CUDA backends' ``_sample`` on the CPU, the extension's launches recorded at the launchers the two ops
    call (after their validation, run here without the CUDA-device check): the per-call launch, then the step
    kernel for steps [0, T) (one launch per step: ``launch_steps``, which the emulation's launch tests count) or
    the persistent kernel once; no other device work."""
    import functools

    from helpers import KERNEL_SCHEDULERS

    from fdp.backends import cuda_backend as cb

    monkeypatch.setattr(cb, "check_static", functools.partial(cb.check_static, require_cuda=False))
    launches = []

    def mlp_launch(kind_, packed, steps, call, coef, x, noise, out, clip_range, *, options=None, step_begin=0,
                   step_end=None, stream=None, known=None, known_mask=None):
        cb.check_launch(packed, steps, call, coef, x, noise, out, clip_range, require_cuda=False)
        T = steps.t_in.shape[0]
        launches.extend(["step"] * T if kind_ == cb.KIND_STEP else ["persistent"])
        return out

    def call_launch(pc, global_cond, out, stream=None):
        cb.check_cond_launch(pc, global_cond, out, require_cuda=False)
        launches.append("call_terms")
        return out

    monkeypatch.setattr(cb, "launch", mlp_launch)
    monkeypatch.setattr(cb, "launch_call_terms", call_launch)
    T = 3
    factory, eta = KERNEL_SCHEDULERS[sched]
    policy = make_policy(K=3, strategy="topk").float()
    prepared = cb.CudaPrepared(policy, factory().step_table(T, eta=eta), torch.float32,
                               cb.KIND_STEP if kind == "step" else cb.KIND_PERSISTENT)
    cond, x_T = torch.randn(B, 5), torch.randn(B, 4, 3)
    noise = torch.randn(T, B, 4, 3) if prepared.adds_noise else None
    with _Ops() as ops:
        out = prepared._sample(cond, x_T, noise)
    assert out.shape == x_T.shape
    assert launches == ["call_terms"] + (["step"] * T if kind == "step" else ["persistent"])
    assert [n for n in ops.names if n.startswith("fdp.")] == ["fdp.call_terms_cuda", "fdp.mlp_cuda"]
    others = {n for n in ops.names if not n.startswith("fdp.")}
    assert others <= ALLOWED_OPS, others - ALLOWED_OPS


_COMPILE_SCRIPT = r'''
import importlib.util, os, sys, tempfile
from pathlib import Path
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:
    import triton.backends.nvidia  # noqa: F401
except Exception as exc:
    print("SKIP: no Triton NVIDIA compiler here:", exc)
    sys.exit(0)
spec = importlib.util.spec_from_file_location("resource_report", sys.argv[1])
rr = importlib.util.module_from_spec(spec); sys.modules["resource_report"] = rr; spec.loader.exec_module(rr)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
import fdp
from fdp import packing
from fdp_kernels.call_terms import call_terms
launches = []
orig = JITFunction.run
JITFunction.run = lambda self, *a, grid, warmup, **k: launches.append((self, a, k))
for strategy in fdp.router.STRATEGIES:  # the target shape, K = 4, H = 256
    for conditional in (True, False):
        comps = [fdp.MLPDenoiser(2, 16, global_cond_dim=5 if conditional else 0, hidden_dim=256) for _ in range(4)]
        kw = {"fixed_weights": [0.25] * 4} if strategy == "fixed" else {}
        pol = fdp.FactorizedPolicy(comps, fdp.Router(5, 4, strategy=strategy, **kw), 16, 2)
        call_terms(packing.pack_cond(pol), torch.randn(3, 5), counters=torch.zeros(2, dtype=torch.int32))
JITFunction.run = orig
cuobjdump = rr.find_tool("cuobjdump")
if cuobjdump is None:
    print("SKIP: no cuobjdump")
    sys.exit(0)
target = GPUTarget("cuda", 90, 32)
with tempfile.TemporaryDirectory() as tmp:
    for i, (kernel, args, kwargs) in enumerate(launches):
        sig, consts, attrs, opts = rr._specialize(kernel, args, kwargs, target)
        compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=opts.__dict__)
        p = Path(tmp) / f"k{i}.cubin"; p.write_bytes(compiled.asm["cubin"])
        (res,) = [r for r in rr.read_cubin(p, 90, cuobjdump) if r.function == compiled.metadata.name]
        print("OK", fdp.router.STRATEGIES[i // 2], "conditional" if i % 2 == 0 else "unconditional", "regs",
              res.registers, "LDL/STL", res.spill_loads, res.spill_stores, "smem", compiled.metadata.shared, flush=True)
        if res.spill_loads or res.spill_stores:
            sys.exit(f"{compiled.metadata.name} spills")
'''


def test_triton_kernel_compiles_for_sm90_for_every_strategy():
    """Triton's real front end and ptxas on the per-call kernel (the interpreter misses what only compiling
    finds), each strategy with and without conditioned components, at the target shape; no spills.
    (tests/test_fused_mlp.py::test_kernels_compile_for_sm90 compiles it as the backends launch it, soft only.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # this process's fdp and helpers
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, os.path.join(root, "scripts", "resource_report.py")],
                       capture_output=True, text=True, timeout=900, env=env, cwd=root)
    print(r.stdout)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.count("OK ") == 10, r.stdout


def test_cuda_launch_structs_match_the_python_side(monkeypatch):
    """``fdp._C.CallPointers`` / ``CallDims`` (fdp.h) have exactly the fields ``launch_call_terms`` sets by name, all
    0 by default, and refuse others; the launcher passes them the validated pointers and sizes."""
    st = fdp.extension_status()
    if not st["available"]:
        pytest.skip(f"fdp._C not built: {st['reason']}")
    from fdp._extension import extension
    from fdp.backends import cuda_backend as cb

    ext = extension()
    if not hasattr(ext, "CallPointers"):
        pytest.fail("the built fdp._C predates csrc/call_terms.cu: rebuild the extension")
    pc = packing.pack_cond(make_policy(K=3, Dc=5, strategy="topk").float())
    c, out = torch.randn(2, 5), torch.empty(packing.call_terms_numel(2, 3, 2, 16))
    dims = cb.check_cond_launch(pc, c, out, require_cuda=False)
    names = ["global_cond", "router_w1", "router_b1", "router_w2", "router_b2", "fixed", "cond_w", "cond_b", "out"]
    ptrs = ext.CallPointers()
    assert [getattr(ptrs, n) for n in names] == [0] * len(names)
    d = ext.CallDims()
    assert [getattr(d, n) for n in dims] == [0] * len(dims)
    with pytest.raises(AttributeError):
        ptrs.x = 1
    with pytest.raises(AttributeError):
        d.D = 1
    seen = {}
    monkeypatch.setattr(cb, "extension", lambda: type("Ext", (), dict(
        CallPointers=ext.CallPointers, CallDims=ext.CallDims,
        call_terms_launch=staticmethod(lambda p, dd, s: seen.update(p=p, d=dd, s=s))))())
    monkeypatch.setattr(cb, "check_cond_launch", lambda *a, **k: dims)
    cb.launch_call_terms(pc, c, out, stream=7)
    assert seen["p"].out == out.data_ptr() and seen["p"].router_w2 == pc.router_w2.data_ptr() and seen["s"] == 7
    assert (seen["d"].B, seen["d"].Dc, seen["d"].K, seen["d"].L, seen["d"].H, seen["d"].strategy, seen["d"].topk) \
        == (2, 5, 3, 2, 16, 3, 2)


# -- on a GPU: the compiled Triton kernel and the CUDA kernel -------------------------------------------------------
# `check_call_terms_kernel` holds every check for a kernel given as a function; the GPU tests run it on CUDA tensors
# (the Triton kernel compiled, in a fresh interpreter without TRITON_INTERPRET), test_gpu_checks_run_on_the_cpu runs
# it here on CPU tensors with the interpreted Triton kernel, so that only the device differs.

# K, L, H, Dc, Hr, B: batch 1 with odd sizes; odd sizes with Dc and Hr over one chunk (Triton: 32) and over the CUDA
# kernel's 256 hidden units per pass, rows over two tiles of both kernels (Triton 16, CUDA 8), columns over several.
# (K, L, H, Dc, Hr, B, conditional), as the CUDA emulation's cases: odd sizes, columns over several blocks of 256,
# Hr over 256, rows over two tiles of 8, batch 1, K = 8 and K = 1, and unconditional components.
GPU_CASES = [(3, 1, 17, 5, 7, 1, True), (5, 3, 19, 37, 301, 19, True), (8, 2, 24, 3, 9, 9, True),
             (1, 1, 16, 6, 5, 2, True), (3, 2, 16, 6, 8, 4, False)]
TIES = [("hard", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 1, 0, 0, 0]), ("hard", [3.0] * 5, [1, 0, 0, 0, 0]),
        ("topk", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 0.5, 0.5, 0, 0]), ("topk", [3.0] * 5, [0.5, 0.5, 0, 0, 0])]


def triton_kernel(pc, c, out):
    """The Triton launch as the backends make it, zeroing arrival counters in the same launch."""
    from fdp_kernels.call_terms import call_terms

    counters = torch.full((5,), 7, dtype=torch.int32, device=c.device)
    call_terms(pc, c, out=out, counters=counters)
    assert (counters == 0).all(), "the per-call launch did not zero the counters"


def cuda_kernel(pc, c, out):
    """The CUDA launch through its torch.library op, as the CUDA backends call it (float32 contiguous features)."""
    from fdp.ops import call_terms_cuda_call

    call_terms_cuda_call(pc, c.float().contiguous(), out)


def _on(pc, device):
    import dataclasses

    return dataclasses.replace(pc, **{f.name: getattr(pc, f.name).to(device) for f in dataclasses.fields(pc)
                                      if isinstance(getattr(pc, f.name), torch.Tensor)})


def _device_terms(kernel, policy, c, device):
    """(kernel's terms, packing.reference_call_terms's), both computed on ``device`` from float32 ``c``, on the CPU."""
    pc = _on(packing.pack_cond(policy), device)
    cd = c.to(device)
    B = c.shape[0]
    out = torch.full((packing.call_terms_numel(B, pc.K, pc.L, pc.H),), NAN, device=device)  # poisoned
    kernel(pc, cd, out)
    got = packing.split_call_terms(out.cpu(), B, pc.K, pc.L, pc.H)
    ref = packing.reference_call_terms(pc, cd)
    return got, packing.CallTerms(*(getattr(ref, f).cpu() for f in ("weights", "c_in", "scale", "shift")))


def check_call_terms_kernel(kernel, device):
    """Every check of a per-call terms kernel ``kernel(pc, c, out)`` on ``device``: against the float64 truth within
    the derived float32 bounds (helpers.cond_truth_and_bounds), as packing.reference_call_terms on the same device is,
    for every strategy; NaN feature rows and non-finite logits give the reference's NaN pattern; ties go to the
    lowest index."""
    g = torch.Generator().manual_seed(0)
    for strategy in STRATEGIES:
        for K, L, H, Dc, Hr, B, conditional in GPU_CASES:
            if strategy == "topk" and K == 1:
                continue  # top-k of one component is hard routing
            what = f"{strategy} K{K} L{L} H{H} Dc{Dc} Hr{Hr} B{B} conditional={conditional}"
            policy = make_policy(K=K, L=L, H=H, Dc=Dc, Hr=Hr, strategy=strategy, seed=K + L, conditional=conditional)
            c = torch.randn(B, Dc, generator=g)
            truth, bounds = truth_and_bounds(policy, c)
            got, ref = _device_terms(kernel, policy, c, device)
            try:
                assert_within(ref, truth, bounds)
                assert_within(got, truth, bounds)
            except AssertionError as e:
                raise AssertionError(f"{what}: {e}") from None
        # A NaN feature row: the reference's NaN pattern there, the other rows within the bounds.
        for conditional in (True, False):
            policy = make_policy(K=3, strategy=strategy, conditional=conditional)
            c = torch.randn(5, 5, generator=g)
            c[2] = NAN
            got, ref = _device_terms(kernel, policy, c, device)
            for f in ("weights", "c_in", "scale", "shift"):
                assert torch.equal(torch.isnan(getattr(got, f)), torch.isnan(getattr(ref, f))), (strategy, f)
            assert torch.isnan(got.weights[2]).all() == (strategy != "fixed")
            assert torch.isnan(got.c_in[2]).all() == conditional
            ok = [0, 1, 3, 4]
            truth, bounds = truth_and_bounds(policy, c[ok])
            assert_within(packing.CallTerms(*(getattr(got, f)[ok] for f in ("weights", "c_in", "scale", "shift"))),
                          truth, bounds)
        if strategy == "fixed":
            continue
        # A non-finite logit on every row (the router's NaN rules).
        for bad in (NAN, float("inf"), -float("inf")):
            policy = make_policy(K=4, strategy=strategy)
            with torch.no_grad():
                policy.router.net[2].weight[1].zero_()
                policy.router.net[2].bias[1] = bad
            c = torch.randn(3, 5, generator=g)
            got, ref = _device_terms(kernel, policy, c, device)
            assert torch.equal(torch.isnan(got.weights), torch.isnan(ref.weights)), (strategy, bad)
            nan_rows = not (bad == -float("inf")) or strategy == "tanh"
            assert torch.isnan(got.weights).all() == nan_rows, (strategy, bad)
            if not nan_rows:
                assert (got.weights[:, 1] == 0).all()
                truth, bounds = truth_and_bounds(policy, c)
                assert_within(ref, truth, bounds)
                assert_within(got, truth, bounds)
    for strategy, logits, expected in TIES:
        policy = make_policy(K=5, strategy=strategy)
        _tied(policy, logits)
        got, ref = _device_terms(kernel, policy, torch.randn(3, 5, generator=g), device)
        expected = torch.tensor(expected, dtype=torch.float32).expand(3, 5)
        for w in (got.weights, ref.weights):
            torch.testing.assert_close(w, expected, rtol=2 * U, atol=0)


def test_gpu_checks_run_on_the_cpu():
    """The GPU tests' checks, here on CPU tensors with the interpreted Triton kernel."""
    check_call_terms_kernel(triton_kernel, "cpu")


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

_GPU_SCRIPT = r"""
import torch
from fdp_kernels import call_terms
assert type(call_terms.call_terms_kernel).__name__ == "JITFunction", "the kernel must be compiled, not interpreted"
from test_call_terms import check_call_terms_kernel, triton_kernel
check_call_terms_kernel(triton_kernel, "cuda")
torch.cuda.synchronize()
print("OK")
"""


@pytest.mark.gpu
@_needs_cuda
def test_gpu_triton_call_terms_kernel():
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-4000:] + r.stderr[-8000:]


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.skipif(not fdp.extension_status()["available"], reason="needs the fdp._C extension")
def test_gpu_cuda_call_terms_kernel():
    check_call_terms_kernel(cuda_kernel, "cuda")
    torch.cuda.synchronize()
