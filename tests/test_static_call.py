"""fdp.StaticCall (``sampler.prepare(batch_size)``): the fixed-shape call of a control loop.

Every result is compared with the Sampler's own call on the same packed policy and the same
noise, so "exactly equal" is the right bound: both run the same backend code on the same inputs.
The CUDA-graph branch runs here with its one CUDA step (the capture) emulated on the CPU.
"""

import pytest
import torch

import fdp
from fdp.backends.captured import CapturedCall
from fdp.static_call import StaticCall

from helpers import make_mlp_policy

CPU_BACKENDS = ["torch", "torch-batched"]


def _sampler(backend="torch", schedule="ddim", **kw):
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    sched = (fdp.DDIMScheduler(num_train_timesteps=50) if schedule == "ddim"
             else fdp.DDPMScheduler(num_train_timesteps=12))
    steps = 5 if schedule == "ddim" else 12
    return fdp.Sampler(policy, sched, num_inference_steps=steps, backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("schedule", ["ddim", "ddpm"])
def test_given_noise_gives_the_samplers_result(backend, schedule):
    s = _sampler(backend, schedule)
    B = 3
    call = s.prepare(B, draw_noise=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # new inputs each call, into the buffers and passed in
        cond = torch.randn(B, s.policy.cond_dim, generator=g)
        call.x_T.copy_(torch.randn(call.x_T.shape, generator=g))
        if call.step_noise is not None:
            call.step_noise.copy_(torch.randn(call.step_noise.shape, generator=g))
        want = s(cond, x_T=call.x_T.clone(), step_noise=None if call.step_noise is None else call.step_noise.clone())
        assert torch.equal(call(cond), want)
        assert torch.equal(call.global_cond, cond)
    assert (call.step_noise is None) == (schedule == "ddim")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_drawn_noise_is_the_default_generators_next_draw(backend):
    s = _sampler(backend, "ddpm")
    call = s.prepare(2)
    cond = torch.randn(2, s.policy.cond_dim)
    torch.manual_seed(5)
    got = call(cond).clone()
    torch.manual_seed(5)
    x_T = torch.empty_like(call.x_T).normal_()
    noise = torch.empty_like(call.step_noise).normal_()
    assert torch.equal(got, s(cond, x_T=x_T, step_noise=noise))
    assert not torch.equal(call(cond), got)  # the next call draws new noise


def test_buffers_written_in_place_and_out():
    s = _sampler()
    call = s.prepare(2, draw_noise=False)
    call.x_T.normal_()
    call.global_cond.copy_(torch.randn(2, s.policy.cond_dim))
    want = s(call.global_cond.clone(), x_T=call.x_T.clone())
    assert torch.equal(call(), want)
    out = torch.full_like(want, float("nan"))
    assert call(out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize("arg, value, error, match", [
    ("global_cond", torch.zeros(3, 5), ValueError, "`global_cond`"),          # batch 3, the call's is 2
    ("global_cond", torch.zeros(2, 4), ValueError, "`global_cond`"),
    ("global_cond", torch.zeros(2, 5, dtype=torch.float64), TypeError, "`global_cond`"),
    ("global_cond", [[0.0] * 5] * 2, TypeError, "`global_cond`"),
    ("out", torch.zeros(2, 4, 2), ValueError, "`out`"),
])
def test_metadata_is_checked_with_the_arguments_name(arg, value, error, match):
    call = _sampler().prepare(2)
    with pytest.raises(error, match=match):
        call(**{arg: value})


def test_check_inputs_is_opt_in():
    s = _sampler()
    bad = torch.randn(2, s.policy.cond_dim)
    bad[1, 0] = float("nan")
    assert torch.isnan(s.prepare(2)(bad)).any()  # not checked: NaN in, NaN out (documented)
    with pytest.raises(ValueError, match="`global_cond` must be finite"):
        s.prepare(2, check_inputs=True)(bad)
    given = s.prepare(2, check_inputs=True, draw_noise=False)  # then x_T is the caller's to check too
    given.x_T[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="`x_T` must be finite"):
        given(bad.nan_to_num())


def test_policy_changes_need_refresh_or_the_watch():
    s = _sampler("torch-batched")  # packs the weights: a change is invisible until repacked
    cond = torch.randn(2, s.policy.cond_dim)
    plain, watched = s.prepare(2, draw_noise=False), s.prepare(2, draw_noise=False, watch_policy=True)
    for c in (plain, watched):
        c.x_T.normal_(generator=torch.Generator().manual_seed(1))
    before = plain(cond).clone()
    with torch.no_grad():
        s.policy.components[0].out.bias.add_(1.0)
    fresh = fdp.Sampler(s.policy, s.scheduler, num_inference_steps=5, backend="torch-batched")(
        cond, x_T=plain.x_T.clone())
    assert not torch.equal(fresh, before)
    assert torch.equal(plain(cond), before)  # stale without refresh: the documented contract
    assert torch.equal(watched(cond), fresh)  # the watch repacked the sampler ...
    assert torch.equal(plain(cond), fresh)  # ... and the other call noticed the new pack for free
    with torch.no_grad():
        s.policy.components[1].out.bias.add_(1.0)
    assert plain.refresh() and not plain.refresh()
    assert torch.equal(plain(cond), s(cond, x_T=plain.x_T.clone()))


def test_inpainting_buffers_use_the_clean_rule():
    s = _sampler("torch-batched")
    call = s.prepare(2, draw_noise=False, inpaint=True)
    cond = torch.randn(2, s.policy.cond_dim)
    call.x_T.normal_()
    assert torch.equal(call(cond), s(cond, x_T=call.x_T.clone()))  # nothing masked yet
    call.known.copy_(torch.randn_like(call.known))
    call.known_mask[:, :2] = True
    want = s(cond, x_T=call.x_T.clone(), known=call.known.clone(), known_mask=call.known_mask.clone())
    got = call(cond)
    assert torch.equal(got, want) and torch.equal(got[:, :2], call.known[:, :2])


def test_inpainting_needs_a_backend_that_can():
    pytest.importorskip("onnxruntime")
    s = _sampler("onnxruntime")
    with pytest.raises(ValueError, match="`inpaint`"):
        s.prepare(1, inpaint=True)


@pytest.mark.parametrize("kw, match", [({"batch_size": 0}, "`batch_size`"), ({"draw_noise": "yes"}, "`draw_noise`"),
                                       ({"watch_policy": 1}, "`watch_policy`")])
def test_prepare_checks_its_arguments(kw, match):
    s = _sampler()
    kw = {"batch_size": 1, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        s.prepare(kw.pop("batch_size"), **kw)


# -- the graph branch, its capture emulated ---------------------------------------------------------------------

class _Graph:
    """Stands in for the CUDA graph: a replay runs the body again into the static output."""

    def __init__(self, body):
        self.body = body
        self.replays = 0
        with fdp.backends.captured.direct_calls():  # what a capture does to an inner CapturedCall
            self.output = body()

    def replay(self):
        self.replays += 1
        with fdp.backends.captured.direct_calls():
            self.output.copy_(self.body())


class _EmulatedStaticCall(StaticCall):
    def __init__(self, *a, **kw):
        self.captures = 0
        super().__init__(*a, **kw)

    def _build(self):
        self.graphed = True
        super()._build()

    def _capture(self):
        self.captures += 1
        with fdp.backends.captured.direct_calls():
            self._body()  # the warm-up
        graph = _Graph(self._body)
        return graph, graph.output


class _CountingCall(CapturedCall):
    """A backend's CapturedCall that would capture (enabled) and counts whether it ever did."""

    def __init__(self, fn):
        super().__init__(fn, "cpu")
        self.enabled = True
        self.captures = 0

    def _capture(self, static):
        self.captures += 1
        raise AssertionError("a StaticCall's capture must not capture the backend's call again")


def test_graph_branch_returns_its_static_output_and_rebuilds_after_a_repack():
    s = _sampler("triton")  # interpreted here: a prepared object with a CapturedCall
    inner = s._prepared._call = _CountingCall(s._prepared._call.fn)
    call = _EmulatedStaticCall(s, 2, draw_noise=False)
    cond = torch.randn(2, s.policy.cond_dim)
    call.x_T.normal_()
    first = call(cond)
    assert first is call.out and call.captures == 1 and inner.captures == 0
    with fdp.backends.captured.direct_calls():  # the Sampler's own call would capture: not what is tested here
        want = s(cond, x_T=call.x_T.clone())
    assert torch.equal(first, want)
    second = call(torch.randn(2, s.policy.cond_dim))
    assert second is first  # one static output, overwritten by each call
    s.repack()
    call(cond)
    assert call.captures == 2  # the Sampler's new pack, noticed by identity


# -- on a GPU: the captured graph itself, every fused MLP backend ------------------------------------------------
# `check_static_call` holds every check; the GPU tests run it in a fresh interpreter without TRITON_INTERPRET
# (compiled kernels, a real capture), and test_gpu_checks_run_on_the_cpu runs the same function here with the
# capture emulated, so that only the device (and the launch count, which needs CUDA) differs.

GPU_FAMILIES = {"triton": ["triton", "triton-persistent"], "cuda": ["cuda", "cuda-persistent"]}
STEPS = 6  # the GPU tests of test_call_path.py use this policy and schedule too (Triton's cache is shared)


def _gpu_sampler(backend, device):
    from helpers import KERNEL_SCHEDULERS

    factory, eta = KERNEL_SCHEDULERS["ddpm_clip"]  # every step but the last adds noise: step_noise is used
    policy = make_mlp_policy(K=3, dtype=torch.float32).to(device)
    return fdp.Sampler(policy, factory(), STEPS, eta=eta, backend=backend, dtype=torch.float32)


def assert_one_replay(call, cond=None):
    """On CUDA: a call is one graph launch. The bar is a graph of one kernel that draws noise exactly when the
    call does, replayed alone (torch's graph-safe RNG may launch its own seed and offset fills at each replay of a
    graph that draws: those are counted in both), plus one copy for a ``global_cond`` passed in."""
    from fdp.bench.timing import count_launches

    dev = call.sampler.device
    buf = torch.zeros(8, device=dev)
    one = (lambda: buf.normal_()) if call.draw_noise else (lambda: buf.add_(1.0))
    one()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one()
    launches, copies = count_launches(lambda i: graph.replay(), dev)
    assert launches >= 1
    assert count_launches(lambda i: call(), dev) == (launches, copies)
    if cond is not None:
        assert count_launches(lambda i: call(cond), dev) == (launches, copies + 1)


def check_static_call(backend, device, prepare=None, one_replay=None):
    """Every check of a StaticCall on ``device``: equal to the Sampler on the same explicit noise, drawn noise =
    the default generator's next draws, one graph (``one_replay(call, cond)``, CUDA only, and the backend's own
    CapturedCall keeps no graph of its own), ``refresh()`` after a weight change, the inpainting buffers; batch 1
    and an odd batch. ``prepare(sampler, B, **kw)`` builds the call (default ``sampler.prepare``). The results
    are compared exactly: the same backend code on the same inputs (as test_call_path's GPU replay test)."""
    prepare = prepare or (lambda s, B, **kw: s.prepare(B, **kw))
    dev = torch.device(device)
    s = _gpu_sampler(backend, dev)
    inner = getattr(s._prepared, "_call", None)
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *shape: torch.randn(shape, device=dev, generator=g)  # noqa: E731
    for B in (1, 5):
        what = f"{backend} B={B}"
        cond = rand(B, s.policy.cond_dim)
        # Explicit noise, passed in and written into the buffers in place.
        kept = None if inner is None else list(inner.signatures)
        call = prepare(s, B, draw_noise=False)
        if inner is not None:
            assert inner.signatures == kept, f"{what}: the backend's call captured a graph of its own"
        assert call.step_noise is not None and call.graphed  # a real or emulated capture
        for _ in range(2):
            call.x_T.copy_(rand(*call.x_T.shape))
            call.step_noise.copy_(rand(*call.step_noise.shape))
            want = s(cond, x_T=call.x_T.clone(), step_noise=call.step_noise.clone())
            assert torch.equal(call(cond), want), what
            cond = rand(B, s.policy.cond_dim)
        call.global_cond.copy_(cond)
        want = s(cond, x_T=call.x_T.clone(), step_noise=call.step_noise.clone())
        out = torch.full_like(want, float("nan"))
        assert call(out=out) is out and torch.equal(out, want), what
        if one_replay is not None:
            one_replay(call, cond)
        # Drawn noise: the default generator's next draws, x_T first.
        drawn = prepare(s, B)
        if one_replay is not None:
            one_replay(drawn, cond)
        torch.manual_seed(5)
        got = drawn(cond).clone()
        torch.manual_seed(5)
        x_T = torch.empty_like(drawn.x_T).normal_()
        noise = torch.empty_like(drawn.step_noise).normal_()
        assert torch.equal(drawn.x_T, x_T) and torch.equal(drawn.step_noise, noise), what
        assert torch.equal(got, s(cond, x_T=x_T, step_noise=noise)), what
        assert not torch.equal(drawn(cond), got), f"{what}: the next call drew the same noise"
        # Inpainting: nothing masked, then the first two horizon steps fixed.
        ip = prepare(s, B, draw_noise=False, inpaint=True)
        ip.x_T.copy_(rand(*ip.x_T.shape))
        ip.step_noise.copy_(rand(*ip.step_noise.shape))
        x_T, noise = ip.x_T.clone(), ip.step_noise.clone()
        assert torch.equal(ip(cond), s(cond, x_T=x_T, step_noise=noise)), what
        ip.known.copy_(rand(*ip.known.shape))
        ip.known_mask[:, :2] = True
        want = s(cond, x_T=x_T, step_noise=noise, known=ip.known.clone(), known_mask=ip.known_mask.clone())
        got = ip(cond)
        assert torch.equal(got, want) and torch.equal(got[:, :2], ip.known[:, :2]), what
        assert not torch.equal(got[:, 2:], ip.known[:, 2:])
        if one_replay is not None:
            one_replay(ip, cond)
    # refresh(): stale until called (no watch), then the new weights' result, one graph again.
    call = prepare(s, 5, draw_noise=False)
    call.x_T.copy_(rand(*call.x_T.shape))
    call.step_noise.copy_(rand(*call.step_noise.shape))
    x_T, noise = call.x_T.clone(), call.step_noise.clone()
    cond = rand(5, s.policy.cond_dim)
    before = call(cond).clone()
    with torch.no_grad():
        s.policy.components[0].out.bias.add_(0.5)
        s.policy.router.net[2].bias[1] += 1.0
    if backend in sum(GPU_FAMILIES.values(), []):  # packed router and components: stale until refreshed
        assert torch.equal(call(cond), before), f"{backend}: changed without refresh"
    assert call.refresh() and not call.refresh()
    fresh = fdp.Sampler(s.policy, s.scheduler, STEPS, eta=s.eta, backend=backend, dtype=torch.float32)
    want = fresh(cond, x_T=x_T, step_noise=noise)
    assert not torch.equal(want, before)
    assert torch.equal(call(cond), want), f"{backend}: refresh() did not give the new weights' result"
    if one_replay is not None:
        one_replay(call, cond)


def test_gpu_checks_run_on_the_cpu():
    """The GPU tests' checks, here with the capture emulated (graph replay = the body run again)."""
    check_static_call("torch-batched", "cpu", prepare=lambda s, B, **kw: _EmulatedStaticCall(s, B, **kw))


_GPU_SCRIPT = r"""
import sys, traceback
import torch
torch.backends.cuda.matmul.allow_tf32 = False
from fdp_kernels import mlp_step
assert type(mlp_step.mlp_step_kernel).__name__ == "JITFunction", "kernels must be compiled, not interpreted"
from test_static_call import assert_one_replay, check_static_call
failed = []
for backend in sys.argv[1:]:
    try:
        check_static_call(backend, "cuda", one_replay=assert_one_replay)
        print("OK", backend, flush=True)
    except Exception:
        traceback.print_exc()
        failed.append(backend)
sys.exit(f"failed: {failed}" if failed else 0)
"""


def _run_fresh(*backends):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), *sys.path])
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, *backends], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    assert r.stdout.count("OK ") == len(backends), r.stdout


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_static_call_triton():
    _run_fresh(*GPU_FAMILIES["triton"])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not fdp.extension_status()["available"], reason="needs the fdp._C extension")
def test_gpu_static_call_cuda():
    _run_fresh(*GPU_FAMILIES["cuda"])
