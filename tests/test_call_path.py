"""The call path: no device->host reads with ``check_inputs=False``, torch.compile without graph breaks,
the captured-call bookkeeping (:mod:`fdp.backends.captured`) and the ``torch.library`` ops.

On the CPU: the torch backend and the Triton backends (interpreter) are counted for
``aten._local_scalar_dense`` (every ``.item()`` / ``bool(tensor)`` of tensor data goes through
it); ``CapturedCall`` runs with its two CUDA steps (capture, replay) emulated by an object that
re-runs ``fn`` on the static buffers, so its caching, static buffers and copies are checked here.
The GPU tests at the end run in a fresh interpreter without ``TRITON_INTERPRET`` (compiled kernels).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdp
from helpers import KERNEL_SCHEDULERS, assert_matches_in_float32, make_mlp_policy
from fdp.backends.captured import CapturedCall

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_BACKENDS = ["torch", "triton", "triton-persistent", "torch-batched", "onnxruntime"]


class _Dispatched(TorchDispatchMode):
    """Counts the ops dispatched inside the block, by name, and records the calls of fdp's own ops."""

    def __init__(self):
        super().__init__()
        self.counts = {}
        self.fdp_calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        if name.startswith("fdp."):
            self.fdp_calls.append((func, args, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))

    def __getitem__(self, name):
        return self.counts.get(name, 0)


def _sampler(backend, schedule="ddpm_clip", check_inputs=False, steps=3, K=2):
    factory, eta = KERNEL_SCHEDULERS[schedule]
    policy = make_mlp_policy(K=K, dtype=torch.float32)
    return fdp.Sampler(policy, factory(), num_inference_steps=steps, eta=eta, backend=backend,
                       check_inputs=check_inputs)


# -- check_inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("schedule", ["ddpm_clip", "ddim"])
def test_no_host_reads_without_input_checks(backend, schedule, monkeypatch):
    s = _sampler(backend, schedule)
    B = 3
    cond = torch.randn(B, 5)
    x_T, noise = s.noise(B, torch.Generator().manual_seed(0))
    with _Dispatched() as d:
        out = s(cond, x_T=x_T, step_noise=noise)
    assert d["aten._local_scalar_dense"] == 0
    assert out.shape == (B, 4, 3) and torch.isfinite(out).all()
    # The same call with the checks on reads flags back: the count above can see them. (A CPU tensor's check
    # reads through numpy, invisible here; the torch path is the one a CUDA tensor's check takes.)
    monkeypatch.setattr(fdp._validation, "_NUMPY_FLOATS", ())
    s.check_inputs = True
    with _Dispatched() as d:
        assert torch.equal(s(cond, x_T=x_T, step_noise=noise), out)
    assert d["aten._local_scalar_dense"] > 0


def test_no_host_reads_when_the_sampler_draws_the_noise():
    s = _sampler("torch", "ddpm_clip")
    with _Dispatched() as d:
        s(torch.randn(2, 5))
    assert d["aten._local_scalar_dense"] == 0


def test_unchecked_nan_gives_nan_actions_checked_raises():
    s = _sampler("torch", "ddim")
    cond = torch.randn(2, 5)
    cond[1, 0] = float("nan")
    x_T = torch.randn(2, 4, 3)
    out = s(cond, x_T=x_T)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    s.check_inputs = True
    with pytest.raises(ValueError, match="global_cond.*finite"):
        s(cond, x_T=x_T)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_metadata_still_checked_without_input_checks(backend):
    s = _sampler(backend)
    with pytest.raises(ValueError, match="global_cond.*shape"):
        s(torch.randn(2, 4))
    with pytest.raises(TypeError, match="global_cond.*floating"):
        s(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="global_cond.*device"):
        s(torch.randn(2, 5, device="meta"))
    with pytest.raises(ValueError, match="x_T.*shape"):
        s(torch.randn(2, 5), x_T=torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="x_T.*device"):
        s(torch.randn(2, 5), x_T=torch.randn(2, 4, 3, device="meta"))
    with pytest.raises(ValueError, match="step_noise.*shape"):
        s(torch.randn(2, 5), x_T=torch.randn(2, 4, 3), step_noise=torch.randn(2, 2, 4, 3))
    with pytest.raises(TypeError, match="step_noise.*floating"):
        s(torch.randn(2, 5), x_T=torch.randn(2, 4, 3), step_noise=torch.ones(3, 2, 4, 3, dtype=torch.int32))


def test_check_inputs_must_be_a_bool():
    with pytest.raises(TypeError, match="check_inputs"):
        fdp.Sampler(make_mlp_policy(K=2, dtype=torch.float32), fdp.DDIMScheduler(), 3, check_inputs="no")


# -- torch.compile ----------------------------------------------------------------------------------------------


# Inductor once (tens of seconds on the CPU); dynamo alone for the checked call.
@pytest.mark.parametrize("check_inputs,compiler", [(False, "inductor"), (True, "eager")])
def test_compile_fullgraph_matches_eager(check_inputs, compiler):
    from torch._dynamo.utils import counters

    s = _sampler("torch", "ddpm_clip", check_inputs=check_inputs)
    B = 2
    cond = torch.randn(B, 5)
    x_T, noise = s.noise(B, torch.Generator().manual_seed(3))

    def act(c, x, n):
        return s(c, x_T=x, step_noise=n)

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(act, fullgraph=True, backend=compiler)
        got = compiled(cond, x_T, noise)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
        if compiler == "eager":
            # dynamo's eager backend runs the traced aten ops themselves, in order: bit-identical by construction.
            assert torch.equal(got, act(cond, x_T, noise))
        else:
            # Inductor fuses and reorders float32 arithmetic: compiled and eager are both held to the float64
            # loop within the derived float32 bound (helpers.float32_loop_bound), not to each other.
            assert_matches_in_float32({"inductor": got}, s, cond, x_T, noise)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "triton-persistent"])
def test_triton_backends_trace_fullgraph(backend):
    """Dynamo through the launchers to the registered ops (interpreted kernels: dynamo only, no Inductor)."""
    from torch._dynamo.utils import counters

    s = _sampler(backend)
    cond = torch.randn(2, 5)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    try:
        got = torch.compile(lambda c, x, n: s(c, x_T=x, step_noise=n), fullgraph=True, backend="eager")(
            cond, x_T, noise)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    # Had the graph lost the launches (the op), it would return x_T.
    assert torch.equal(got, s(cond, x_T=x_T, step_noise=noise)) and not torch.equal(got, x_T)


def test_graph_backend_loop_traces_fullgraph():
    from torch._dynamo.utils import counters

    from fdp.backends import get_backend
    from test_unet_fused import make_policy

    policy = make_policy(K=2, dtype=torch.float32)
    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]
    prepared = get_backend("graph").prepare(policy, factory().step_table(3, eta=eta), capture=False,
                                            compose="torch")
    B = 2
    args = (torch.randn(B, policy.cond_dim), torch.randn(B, policy.horizon, policy.action_dim),
            torch.randn(3, B, policy.horizon, policy.action_dim))
    torch._dynamo.reset()
    counters.clear()
    try:
        got = torch.compile(prepared.run, fullgraph=True, backend="eager")(*args)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, prepared.run(*args))


class _Act(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def forward(self, cond, x_T, noise):
        return self.sampler(cond, x_T=x_T, step_noise=noise)


@pytest.mark.parametrize("backend,op", [("torch", None), ("triton-persistent", "fdp.mlp_launch.default")])
def test_export_keeps_the_registered_op_and_matches_eager(backend, op):
    s = _sampler(backend)
    cond = torch.randn(2, 5)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    ep = torch.export.export(_Act(s), (cond, x_T, noise))
    targets = {str(n.target) for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function"}
    if op is not None:
        assert op in targets, sorted(targets)
    assert torch.equal(ep.module()(cond, x_T, noise), s(cond, x_T=x_T, step_noise=noise))


# -- CapturedCall on the CPU, its CUDA steps emulated ------------------------------------------------------------


class _Graph:
    """Stands in for a captured CUDA graph: a replay runs ``fn`` on the static buffers into the static output."""

    def __init__(self, fn, static):
        self.fn, self.static = fn, static
        self.output = fn(*static)

    def replay(self):
        self.output.copy_(self.fn(*self.static))


class _Emulated(CapturedCall):
    def __init__(self, fn):
        super().__init__(fn, "cpu")
        self.enabled = True
        self.captures = 0

    def replays(self):
        return not torch.compiler.is_compiling()

    def _capture(self, static):
        self.captures += 1
        graph = _Graph(self.fn, static)
        return graph, graph.output

    def _replay(self, graph):
        graph.replay()


def _affine(cond, x, noise):
    out = x * cond.sum(-1)[:, None, None]
    return out if noise is None else out + noise.sum(0)


def test_captured_call_captures_once_per_signature_and_follows_new_inputs():
    call = _Emulated(_affine)
    for B in (2, 5, 2, 5, 2):
        args = (torch.randn(B, 3), torch.randn(B, 4, 2), torch.randn(6, B, 4, 2))
        assert torch.equal(call(*args), _affine(*args))
    assert call.captures == 2
    assert set(call.signatures) == {CapturedCall.signature(a) for a in (
        (torch.empty(2, 3), torch.empty(2, 4, 2), torch.empty(6, 2, 4, 2)),
        (torch.empty(5, 3), torch.empty(5, 4, 2), torch.empty(6, 5, 4, 2)))}
    # Without noise, or in another dtype: another graph.
    args = (torch.randn(2, 3), torch.randn(2, 4, 2), None)
    assert torch.equal(call(*args), _affine(*args))
    args = (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, 2, dtype=torch.float64), None)
    assert torch.equal(call(*args), _affine(*args))
    assert call.captures == 4


def test_captured_call_returns_a_copy_and_reads_non_contiguous_inputs():
    call = _Emulated(_affine)
    a = (torch.randn(3, 2), torch.randn(3, 4, 2), None)
    first = call(*a)
    kept = first.clone()
    first.fill_(7.0)  # the caller's tensor is not the static output
    b = (torch.randn(2, 3).t(), torch.randn(3, 2, 4).transpose(1, 2), None)
    assert not b[0].is_contiguous()
    assert torch.equal(call(*b), _affine(*b))
    assert torch.equal(call(*a), kept)
    assert call.captures == 1


def test_captured_call_invalidate_captures_again():
    call = _Emulated(_affine)
    args = (torch.randn(2, 3), torch.randn(2, 4, 2), None)
    call(*args)
    call.invalidate()
    assert call.signatures == []
    assert torch.equal(call(*args), _affine(*args)) and call.captures == 2


def test_captured_call_is_traced_through_by_compile():
    from torch._dynamo.utils import counters

    call = _Emulated(_affine)
    args = (torch.randn(2, 3), torch.randn(2, 4, 2), torch.randn(6, 2, 4, 2))
    torch._dynamo.reset()
    counters.clear()
    try:
        got = torch.compile(lambda *a: call(*a), fullgraph=True, backend="eager")(*args)
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, _affine(*args)) and call.captures == 0


def test_captured_call_off_cuda_calls_fn():
    seen = []
    call = CapturedCall(lambda x: seen.append(x) or x + 1, "cpu")
    assert not call.enabled and not call.replays()
    assert torch.equal(call(torch.zeros(2)), torch.ones(2)) and len(seen) == 1 and call.signatures == []
    with pytest.raises(ValueError, match="CUDA"):
        CapturedCall(lambda x: x, "cpu", enabled=True)
    with pytest.raises(ValueError, match="warmup"):
        CapturedCall(lambda x: x, "cpu", warmup=0)


@pytest.mark.parametrize("backend", ["triton", "triton-persistent"])
def test_prepared_objects_route_calls_through_their_captured_call(backend):
    s = _sampler(backend)
    prepared = s._prepared
    calls = []
    inner = prepared._call.fn
    prepared._call.fn = lambda *a: calls.append(a) or inner(*a)
    cond = torch.randn(2, 5)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    s(cond, x_T=x_T, step_noise=noise)
    assert len(calls) == 1
    assert prepared._call.signatures == []  # nothing captured on the CPU


def test_sampler_invalidate_drops_the_captured_graphs():
    s = _sampler("triton")
    emulated = _Emulated(s._prepared._call.fn)
    s._prepared._call = emulated
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    cond = torch.randn(2, 5)
    first = s(cond, x_T=x_T, step_noise=noise)
    assert emulated.signatures and emulated.captures == 1
    s.invalidate()
    assert emulated.signatures == []
    assert torch.equal(s(cond, x_T=x_T, step_noise=noise), first) and emulated.captures == 2
    _sampler("torch").invalidate()  # nothing captured: a no-op


def test_captured_call_takes_the_inpainting_tensors_as_static_inputs():
    """known / known_mask are copied into the graph's static buffers like x_T: a replay follows new values, and
    the two replacement layouts ([B, Ta, Da] for every step, [T, B, Ta, Da] per step) are two signatures."""
    s = _sampler("triton-persistent")
    emulated = _Emulated(s._prepared._call.fn)
    s._prepared._call = emulated
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    cond = torch.randn(2, 5)
    mask = torch.zeros(x_T.shape, dtype=torch.bool)
    mask[:, :2] = True
    for value in (0.5, -0.25):
        known = torch.full(x_T.shape, value)
        out = s(cond, x_T=x_T, step_noise=noise, known=known, known_mask=mask)
        assert torch.equal(out[mask], known[mask]) and torch.isfinite(out).all()
    assert emulated.captures == 1
    mask2 = mask.clone()
    mask2[0] = False
    out = s(cond, x_T=x_T, step_noise=noise, known=known, known_mask=mask2)
    assert torch.equal(out[mask2], known[mask2]) and not torch.equal(out[0, :2], known[0, :2])
    assert emulated.captures == 1  # a new mask is a new value, not a new signature
    s(cond, known=known, known_mask=mask, inpaint="noised", generator=torch.Generator().manual_seed(1))
    assert emulated.captures == 2
    s(cond, x_T=x_T, step_noise=noise)
    assert emulated.captures == 3


# -- torch.library ops -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,launches", [("triton", 3), ("triton-persistent", 1)])
def test_triton_backends_launch_through_the_registered_op(backend, launches):
    s = _sampler(backend, steps=3)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    with _Dispatched() as d:
        s(torch.randn(2, 5), x_T=x_T, step_noise=noise)
    assert d["fdp.mlp_launch"] == launches and d["fdp.call_terms_launch"] == 1


# AOT dispatch (the fourth opcheck test) functionalizes the op's body, which an interpreted kernel cannot run.
_OPCHECK_CPU = ("test_schema", "test_faketensor", "test_autograd_registration")


# 40: the scratch path; triton at batch 3 splits the components (scratch for their outputs, counters).
@pytest.mark.parametrize("backend,hidden", [("triton", 16), ("triton-persistent", 16), ("triton-persistent", 40)])
def test_mlp_launch_op_passes_opcheck(backend, hidden):
    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]
    s = fdp.Sampler(make_mlp_policy(K=2, hidden=hidden, dtype=torch.float32), factory(), num_inference_steps=2,
                    backend=backend, check_inputs=False)
    x_T, noise = s.noise(3, torch.Generator().manual_seed(0))
    with _Dispatched() as d:
        s(torch.randn(3, 5), x_T=x_T, step_noise=noise)
    (func, args, kwargs), = [call for call in d.fdp_calls[:2] if str(call[0]) == "fdp.mlp_launch.default"]
    assert (args[18] is None) == (backend == "triton-persistent" and hidden == 16)  # scratch
    assert (args[19] is None) == (backend == "triton-persistent")  # counters
    torch.library.opcheck(func, args, kwargs, test_utils=_OPCHECK_CPU)


@pytest.mark.parametrize("backend", ["triton", "triton-persistent"])
def test_call_terms_launch_op_passes_opcheck(backend):
    s = _sampler(backend, K=3)
    x_T, noise = s.noise(3, torch.Generator().manual_seed(0))
    with _Dispatched() as d:
        s(torch.randn(3, 5), x_T=x_T, step_noise=noise)
    func, args, kwargs = d.fdp_calls[0]
    assert str(func) == "fdp.call_terms_launch.default"
    assert (args[9] is None) == (backend == "triton-persistent")  # the split step kernel's counters
    torch.library.opcheck(func, args, kwargs, test_utils=_OPCHECK_CPU)


def test_compose_launch_op_passes_opcheck():
    from fdp_kernels.compose_step import compose_step

    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]
    table = factory().step_table(4, eta=eta).to("cpu")
    K, B = 3, 5
    x = torch.randn(B, 4, 3)
    with _Dispatched() as d:
        compose_step(torch.randn(K, B, 4, 3), torch.rand(B, K), table.coef, table.adds_noise, 1, x,
                     torch.randn(4, B, 4, 3), clip_range=1.0, out=x)
    func, args, kwargs = d.fdp_calls[0]
    assert str(func) == "fdp.compose_launch.default"
    torch.library.opcheck(func, args, kwargs, test_utils=_OPCHECK_CPU)


def _cuda_op_args(B=3, D=12, H=16, L=2, K=2, T=5, device="cpu"):
    z = lambda *shape: torch.zeros(shape, device=device)  # noqa: E731
    return [z(B, D), z(K, D, H), z(K, L, H, H), z(K, L, H, H), z(K, L, H), z(K, H, D), z(K, D), z(T, K, H),
            z(T, K, L, H), z(B, K), z(B, K, H), z(B, K, L, H), z(B, K, L, H), z(T, 8)]


def test_cuda_op_fake_kernel_gives_the_shape_and_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import fdp.ops  # noqa: F401 - registers fdp::mlp_cuda

    args = _cuda_op_args()
    with FakeTensorMode() as mode:
        out = torch.ops.fdp.mlp_cuda(1, *[mode.from_tensor(a) for a in args], None, 1.0, [0, 0, 0, -1, 1])
    assert out.shape == (3, 12) and out.dtype == torch.float32
    gm = make_fx(lambda *a: torch.ops.fdp.mlp_cuda(0, *a, None, None, [0, 0, 0, -1, 1]), tracing_mode="fake")(*args)
    assert "fdp.mlp_cuda" in gm.code
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="`x` must be"):
        torch.ops.fdp.mlp_cuda(1, mode.from_tensor(torch.zeros(3, 11)), *[mode.from_tensor(a) for a in args[1:]],
                               None, 1.0, [0, 0, 0, -1, 1])


def test_cuda_op_refuses_cpu_tensors_clearly():
    import fdp.ops  # noqa: F401

    with pytest.raises(ValueError, match="CUDA tensors"):
        torch.ops.fdp.mlp_cuda(1, *_cuda_op_args(), None, 1.0, [0, 0, 0, -1, 1])


# -- on a GPU (fresh interpreter, compiled kernels) -------------------------------------------------------------


def _run_fresh(body: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    res = subprocess.run([sys.executable, "-c", _GPU_PRELUDE + textwrap.dedent(body)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


_GPU_PRELUDE = """
import os, torch, fdp
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from helpers import KERNEL_SCHEDULERS, assert_matches_in_float32, make_mlp_policy
from fdp.bench.timing import count_launches
from fdp.tolerances import tolerance
F32_TOL = tolerance(torch.float32, torch.float32)  # what backend="auto" verifies every backend against torch with
from fdp_kernels import compose_step, mlp_step
assert type(mlp_step.mlp_step_kernel).__name__ == "JITFunction", "kernels must be compiled, not interpreted"
assert type(compose_step.compose_step_kernel).__name__ == "JITFunction"

MLP = ["triton", "triton-persistent", "cuda", "cuda-persistent"]

def samplers(check_inputs=False):
    "(name, sampler, torch reference) for every CUDA backend: MLP policies, and a U-Net one for graph."
    from test_unet_fused import make_policy
    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]
    mlp = make_mlp_policy(K=3, dtype=torch.float32).cuda()
    unet = make_policy(K=2, dtype=torch.float32).cuda()
    for name in MLP + ["graph"]:
        pol = unet if name == "graph" else mlp
        yield (name, fdp.Sampler(pol, factory(), 6, eta=eta, backend=name, dtype=torch.float32,
                                 check_inputs=check_inputs),
               fdp.Sampler(pol, factory(), 6, eta=eta, backend="torch"))

def inputs(s, B, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_T, noise = s.noise(B, g)
    return torch.randn(B, s.policy.cond_dim, device="cuda", generator=g), x_T, noise

def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
"""


@pytest.mark.gpu
@needs_cuda
def test_gpu_one_graph_launch_per_call():
    _run_fresh("""
    for name, s, ref in samplers():
        for B in (1, 5):
            c, x, n = inputs(s, B)
            s(c, x_T=x, step_noise=n)  # capture
            launches, _ = count_launches(lambda i: s(c, x_T=x, step_noise=n), torch.device("cuda"))
            assert launches <= 2, (name, B, launches)
            assert rel(s(c, x_T=x, step_noise=n), ref(c, x_T=x, step_noise=n)) < F32_TOL, name
        assert len(s._prepared._call.signatures) == 2, name
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_user_capture_and_replay_match_eager():
    _run_fresh("""
    for name, s, ref in samplers():
        c, x, n = inputs(s, 3)
        eager = s(c, x_T=x, step_noise=n)  # warm-up (and the sampler's own capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = s(c, x_T=x, step_noise=n)
        graph.replay()
        torch.cuda.synchronize()
        # The same kernels on the same inputs replay bit-identically; cuDNN (graph's U-Nets) may pick other
        # algorithms under capture, so there the replay and the sampler's call are both held to the float64
        # loop within the derived float32 bound (helpers.float32_loop_bound).
        def same(got, c, x, n):
            if name == "graph":
                assert_matches_in_float32({"replay": got.clone()}, s, c, x, n)
            else:
                assert torch.equal(got, s(c, x_T=x, step_noise=n)), name
        same(static, c, x, n)
        c2, x2, n2 = inputs(s, 3, seed=1)
        c.copy_(c2); x.copy_(x2); n.copy_(n2)
        graph.replay()
        torch.cuda.synchronize()
        assert not torch.equal(static, eager), name
        same(static, c2, x2, n2)
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_capture_leaves_other_threads_free():
    """fdp captures thread-locally (captured.capture_graph, which every CUDA backend's CapturedCall and StaticCall
    use): while it captures, e.g. an AsyncSampler's worker capturing a new batch size, another thread may allocate
    (a cudaMalloc: a new segment is counted), work and synchronise on its own stream, and read back on the legacy
    stream (which does not wait for fdp's non-blocking capture stream), without an error there and without
    breaking the capture. torch's default mode ("global") fails such calls in every thread. A device-wide
    synchronisation is not among them: CUDA may invalidate a capture on it whatever the mode."""
    _run_fresh("""
    import threading
    from fdp.backends.captured import capture_graph
    dev = torch.device("cuda")
    x = torch.randn(1001, device=dev)
    done, failed = [], []

    def other_thread():
        step = "start"
        try:
            stream = torch.cuda.Stream(dev)
            segments = torch.cuda.memory_stats(dev).get("segment.all.allocated", 0)
            step = "cudaMalloc"
            with torch.cuda.stream(stream):
                # Larger than anything this fresh process has cached: the allocator calls cudaMalloc.
                y = torch.empty((257 << 20) + 3, dtype=torch.uint8, device=dev)
                step = "work on its own stream"
                y.fill_(7)
            step = "synchronise its own stream"
            stream.synchronize()
            step = "read back"
            done.append((torch.cuda.memory_stats(dev)["segment.all.allocated"] > segments, int(y[-1].item())))
        except Exception as exc:  # reported below, with the step that failed
            failed.append((step, repr(exc)))

    def fn():
        out = x * 2 + 1
        if torch.cuda.is_current_stream_capturing():
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        return out

    graph, out = capture_graph(fn, dev)
    assert not failed and done == [(True, 7)], (failed, done)
    x.copy_(torch.randn(1001, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2 + 1)
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_static_call_is_one_replay_of_the_samplers_call():
    """fdp.StaticCall (sampler.prepare) on CUDA for the `graph` backend's U-Net: one graph (captured.capture_graph)
    replayed per call, nothing else launched or copied, following what is written into its buffers. The fused MLP
    backends' static calls are checked by test_static_call.py's GPU tests (check_static_call)."""
    _run_fresh("""
    for name, s, ref in samplers():
        if name != "graph":
            continue
        for B in (1, 5):
            call = s.prepare(B, draw_noise=False)
            assert call.graphed, name
            for seed in (0, 1):  # new values in the same buffers: the replay follows them
                c, x, n = inputs(s, B, seed)
                call.global_cond.copy_(c)
                call.x_T.copy_(x)
                if call.step_noise is not None:
                    call.step_noise.copy_(n)
                # cuDNN may pick other algorithms under capture (see the test above): held to the float64 loop
                assert_matches_in_float32({"static call": call().clone()}, s, c, x, n)
            launches, copies = count_launches(lambda i: call(), torch.device("cuda"))
            assert (launches, copies) == (1, 0), (name, B, launches, copies)
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_backends_compile_fullgraph():
    _run_fresh("""
    from torch._dynamo.utils import counters
    for name, s, ref in samplers():
        c, x, n = inputs(s, 4)
        torch._dynamo.reset(); counters.clear()
        got = torch.compile(lambda c, x, n: s(c, x_T=x, step_noise=n), fullgraph=True)(c, x, n)
        assert not counters["graph_break"], (name, dict(counters["graph_break"]))
        assert rel(got, s(c, x_T=x, step_noise=n)) < F32_TOL, name
    import fdp.ops, fdp_kernels.ops
    from fdp.packing import call_terms_numel, reference_call_terms
    mlp = next(s for name, s, _ in samplers() if name == "cuda")
    p = mlp._prepared
    c, x, n = inputs(mlp, 3)
    # The CUDA backends' two ops with the arguments a sampling call gives them: the per-call terms (from the
    # packed router and conditioning), then the sampling kernel. No argument requires grad (the ops have no
    # backward: opcheck's AOT test would try one).
    pc = p.cond
    torch.library.opcheck(torch.ops.fdp.call_terms_cuda.default,
                          (c, torch.empty(call_terms_numel(3, pc.K, pc.L, pc.H), device="cuda"), pc.router_w1,
                           pc.router_b1, pc.router_w2, pc.router_b2, pc.fixed, pc.cond_w, pc.cond_b, pc.K, pc.L,
                           pc.H, pc.strategy, pc.topk))
    args = (1, x.reshape(3, -1).contiguous(), p.packed.w_in, p.packed.w_a, p.packed.w_b, p.packed.b_b,
            p.packed.w_out, p.packed.b_out, p.steps.t_in, p.steps.t_shift,
            *vars(reference_call_terms(pc, c)).values(), p.coef,
            n.reshape(n.shape[0], 3, -1).contiguous(), p.clip_range, [0, 0, 0, -1, 1])
    assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    torch.library.opcheck(torch.ops.fdp.mlp_cuda.default, args)
    # The Triton ops, with the arguments a sampling call gives them (all four opcheck tests on a GPU).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        calls = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).startswith("fdp."):
                self.calls.setdefault(str(func), (func, args, dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    for name, s, _ in samplers():
        if name in ("triton", "graph"):
            s._prepared._call.enabled = False  # launch directly, where the mode sees the ops
            c, x, n = inputs(s, 3)
            with Record():
                s(c, x_T=x, step_noise=n)
    # triton: the per-call terms, then its step kernel; graph (U-Net): the compose-and-step kernel.
    assert set(Record.calls) == {"fdp.call_terms_launch.default", "fdp.mlp_launch.default",
                                 "fdp.compose_launch.default"}, Record.calls
    for func, args, kwargs in Record.calls.values():
        # Separate copies: the loops pass `out=x`, an aliasing the op check's functionalization need not take.
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(func, args, kwargs)
    """)
