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
