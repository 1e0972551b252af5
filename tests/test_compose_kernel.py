"""The composition + scheduler-step kernel (``fdp_kernels.compose_step``) in the Triton interpreter.

``TRITON_INTERPRET=1`` is set by tests/conftest.py before anything imports the kernel. The
reference is :func:`fdp.schedulers.apply_step` on the router-weighted sum,
in float64, with its exact (float64) coefficients; every element must be within the worst-case float32
rounding bound of that step (:func:`fdp.tolerances.compose_step_bound`), which a dropped component, a
wrong coefficient or another step's row exceeds (test_bound_catches_wrong_steps). The interpreter does
no bounds checks, so every kernel output is written into a NaN-filled buffer
with canaries on both sides, and strided inputs are views into NaN-filled
buffers: a stray read or write, or an unwritten element, shows as NaN.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fdp  # noqa: E402
from fdp.backends import get_backend  # noqa: E402
from fdp.schedulers import apply_step  # noqa: E402
from fdp.tolerances import compose_step_bound  # noqa: E402
from fdp_kernels.compose_step import compose_step, compose_step_kernel  # noqa: E402
from helpers import assert_within_float32_bound, bound_ratio, step_bound, torch_loop_bound  # noqa: E402

NAN = float("nan")
PAD = 19
F64 = torch.float64

SCHEDULES = {
    "ddpm_clip": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True), 10, 0.0),
    "ddim_eta": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                           clip_sample=True), 6, 0.7),
    "ddpm_v_noclip": (lambda: fdp.DDPMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False,
                                                prediction_type="v_prediction"), 7, 0.0),
}


def test_runs_in_the_interpreter():
    assert type(compose_step_kernel).__name__ == "InterpretedFunction"


def poisoned_out(shape):
    """A NaN-filled output view with NaN canaries around it, and the buffer."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * PAD,), NAN)
    return buf[PAD:PAD + n].view(shape), buf


def canaries_intact(buf):
    return bool(torch.isnan(buf[:PAD]).all() and torch.isnan(buf[-PAD:]).all())


def strided_eps(K, B, S, dtype=torch.float32, seed=0):
    """``[K, B, *S]`` values in a NaN-filled larger buffer, laid out [B, K, C, R] as the fused U-Nets give."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(K, B, *S, generator=g, dtype=F64)
    if len(S) == 2:
        R, C = S
        buf = torch.full((B, K + 1, C, R + 2), NAN, dtype=dtype)
        view = buf[:, :K, :, :R].permute(1, 0, 3, 2)
    else:
        buf = torch.full((K, B, S[0] + 3), NAN, dtype=dtype)
        view = buf[..., :S[0]]
    view.copy_(vals)
    return view, view.to(F64)


def router_weights(B, K, dtype=torch.float32, seed=1, signed=False):
    """Softmax weights, or (``signed``) tanh weights as the "tanh" router gives: signed, rows not summing
    to 1, one weight of exactly 0 per row (left out, as a zero weight always is)."""
    g = torch.Generator().manual_seed(seed)
    if signed:
        w = torch.tanh(2 * torch.randn(B, K, generator=g, dtype=F64))
        w[torch.arange(B), torch.arange(B) % K] = 0.0
    else:
        w = torch.softmax(torch.randn(B, K, generator=g, dtype=F64), -1)
    buf = torch.full((B, K + 2), NAN, dtype=dtype)
    view = buf[:, 1:K + 1]
    view.copy_(w)
    return view, view.to(F64)


def reference(table, i, x, eps, w, noise):
    m = (w.T.reshape(*w.T.shape, *([1] * (x.ndim - 1))) * eps).sum(0)
    return apply_step(table, i, x, m, noise)


def assert_within_step_bound(out, ref, bound, what):
    r = bound_ratio(out, ref, bound)
    assert r <= 1, f"{what}: |out - ref| reaches {r:.3g} x the float32 rounding bound of the step"


def inpainting(T, B, S, per_step, seed=3):
    """``(known, known_mask)`` for the inpainting epilogue: a random mask (about half the entries, and
    never none), known values NaN wherever unmasked (they must never be read), one slice per step or one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, *S, generator=g) < 0.5
    mask.view(-1)[0] = True
    known = torch.randn(T if per_step else 1, B, *S, generator=g)
    known[:, ~mask] = NAN
    return (known if per_step else known[0]), mask


def run_case(schedule, K, B, S, dtype=torch.float32, all_noise=True, inpaint=None, signed=False):
    factory, n, eta = SCHEDULES[schedule]
    table = factory().step_table(n, eta=eta)
    dev = table.to("cpu")
    clip = table.clip_range if table.clip_sample else None
    eps, eps64 = strided_eps(K, B, S, dtype)
    w, w64 = router_weights(B, K, dtype, signed=signed)
    if signed and K > 1:
        assert (w64 < 0).any() and ((w64.sum(1) - 1).abs() > 1e-3).all()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, *S, generator=g)
    noise = torch.randn(n, B, *S, generator=g).to(dtype)
    # Steps that add no noise must ignore their slice, whatever it holds.
    noise[~table.adds_noise] = NAN
    known, mask = inpainting(n, B, S, per_step=inpaint == "per_step") if inpaint else (None, None)
    for i in range(n):
        out, buf = poisoned_out(x.shape)
        step_noise = noise if all_noise else noise[i].contiguous()
        res = compose_step(eps, w, dev.coef, dev.adds_noise, i, x, step_noise, clip_range=clip, out=out,
                           known=known, known_mask=mask)
        assert res is out and canaries_intact(buf)
        assert torch.isfinite(out).all(), (schedule, i)
        ref = reference(table, i, x.to(F64), eps64, w64, noise[i].to(F64))
        bound = step_bound(table, i, x, eps64, w64, noise[i])
        if inpaint:
            ref = torch.where(mask, (known if known.ndim == x.ndim else known[i]).to(F64), ref)
            bound = torch.where(mask, 0.0, bound)  # the known values are copied, not computed
        assert_within_step_bound(out, ref, bound, (schedule, K, B, i))
        x = out.clone()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("K", range(1, 9))
def test_matches_apply_step_of_the_weighted_sum(schedule, K):
    run_case(schedule, K, B=3 if K % 2 else 1, S=(5, 3) if K < 5 else (16, 2))


def _bugs(dev, w):
    """Plausible kernel bugs, as what the buggy kernel would be launched with: name -> (weights, coef, adds)."""
    dropped = w.clone()
    dropped[:, 1] = 0.0  # one component's weight lost
    swapped = dev.coef.clone()
    swapped[:, [3, 4]] = swapped[:, [4, 3]]  # c_x and c_m columns exchanged
    shifted = torch.roll(dev.coef, 1, 0)  # the previous step's row
    return {"dropped weight": (dropped, dev.coef, dev.adds_noise), "swapped columns": (w, swapped, dev.adds_noise),
            "other step's row": (w, shifted, dev.adds_noise),
            "noise skipped": (w, dev.coef, torch.zeros_like(dev.adds_noise))}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_bound_catches_wrong_steps(schedule):
    """The derived bound is tight enough to matter: the correct kernel is within it on every step (the ratio
    is printed), and each plausible bug exceeds it on every step whose launch it changes."""
    factory, n, eta = SCHEDULES[schedule]
    table = factory().step_table(n, eta=eta)
    dev = table.to("cpu")
    clip = table.clip_range if table.clip_sample else None
    K, B, S = 4, 5, (6, 3)
    eps, eps64 = strided_eps(K, B, S)
    w, w64 = router_weights(B, K)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, *S, generator=g)
    noise = torch.randn(B, *S, generator=g)
    worst = 0.0
    for i in range(n):
        ref = reference(table, i, x.to(F64), eps64, w64, noise.to(F64))
        bound = step_bound(table, i, x, eps64, w64, noise)
        ok = compose_step(eps, w, dev.coef, dev.adds_noise, i, x, noise, clip_range=clip)
        worst = max(worst, bound_ratio(ok, ref, bound))
        for bug, (wb, coef, adds) in _bugs(dev, w).items():
            if torch.equal(wb, w) and torch.equal(coef[i], dev.coef[i]) and (adds[i] == dev.adds_noise[i]
                                                                              or dev.coef[i, 5] == 0):
                continue  # this step's launch is the correct one (e.g. c_x = c_m = 0 on DDPM's last step)
            out = compose_step(eps, wb, coef, adds, i, x, noise, clip_range=clip)
            assert bound_ratio(out, ref, bound) > 1, f"{schedule} step {i}: {bug} passes the bound"
        x = ok
    print(f"{schedule}: correct kernel at {worst:.3f} of the bound")
    assert worst <= 1


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("K", [2, 5])
def test_signed_unnormalised_weights(schedule, K):
    """tanh routing: negative weights and rows that do not sum to 1 are composed as given."""
    run_case(schedule, K, B=7, S=(5, 3), signed=True)


@pytest.mark.parametrize("B,S", [(1, (1,)), (7, (13,)), (2, (8, 7)), (1, (16, 10))])
def test_odd_sizes_and_flat_samples(B, S):
    run_case("ddpm_clip", 3, B, S, all_noise=False)


@pytest.mark.parametrize("schedule,B,S,inpaint", [("ddpm_clip", 1, (5, 3), "same"), ("ddim_eta", 3, (7,), "per_step"),
                                                  ("ddpm_v_noclip", 2, (16, 2), "same"), ("ddpm_clip", 5, (3, 3), "per_step")])
def test_inpainting_epilogue(schedule, B, S, inpaint):
    run_case(schedule, 3, B, S, inpaint=inpaint)


def test_more_than_one_block():
    # 2 * 40 * 7 = 560 elements in blocks of 64: nine programs, the last one partial.
    factory, n, eta = SCHEDULES["ddim_eta"]
    table = factory().step_table(n, eta=eta)
    dev = table.to("cpu")
    eps, eps64 = strided_eps(4, 40, (7, 2))
    w, w64 = router_weights(40, 4)
    x = torch.randn(40, 7, 2)
    noise = torch.randn(40, 7, 2)
    out, buf = poisoned_out(x.shape)
    compose_step(eps, w, dev.coef, dev.adds_noise, 2, x, noise, clip_range=1.0, out=out, block=64)
    assert canaries_intact(buf) and torch.isfinite(out).all()
    assert_within_step_bound(out, reference(table, 2, x.to(F64), eps64, w64, noise.to(F64)),
                             step_bound(table, 2, x, eps64, w64, noise), "more than one block")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    # Half eps / weights / noise are loaded and widened; the reference sees the same rounded values.
    run_case("ddim_eta", 5, 3, (4, 3), dtype=dtype)


def test_in_place_and_no_noise():
    table = SCHEDULES["ddpm_clip"][0]().step_table(10)
    dev = table.to("cpu")
    eps, eps64 = strided_eps(2, 3, (4, 3))
    w, w64 = router_weights(3, 2)
    x = torch.randn(3, 4, 3)
    ref = reference(table, 9, x.to(F64), eps64, w64, None)  # the last DDPM step adds none
    bound = step_bound(table, 9, x, eps64, w64, None)
    assert compose_step(eps, w, dev.coef, dev.adds_noise, 9, x, None, clip_range=1.0, out=x) is x
    assert_within_step_bound(x, ref, bound, "in place")
    # A step that adds noise, given none: the deterministic part only (apply_step with noise=None).
    x = torch.randn(3, 4, 3)
    ref = reference(table, 0, x.to(F64), eps64, w64, None)
    bound = compose_step_bound(table.coef[0], x.to(F64), eps64, w64, None, table.clip_range)
    assert_within_step_bound(compose_step(eps, w, dev.coef, dev.adds_noise, 0, x, clip_range=1.0), ref, bound,
                             "no noise")


@pytest.mark.parametrize("per_step", [False, True])
def test_graph_backend_loop_with_the_kernel(per_step):
    """backend="graph" on the CPU with the kernel (interpreted) composing, against backend="torch",
    inpainting too (the torch composition of the graph backend included)."""
    torch.manual_seed(0)
    comps = [fdp.ConditionalUnet1D(3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(16, 32),
                                   kernel_size=3, n_groups=4, cond_predict_scale=True) for _ in range(3)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(5, 3), 8, 3)
    factory, n, eta = SCHEDULES["ddim_eta"]
    table = factory().step_table(n, eta=eta)
    # A non-contiguous x_T: the loop must hand the kernel a dense copy.
    gc, x_T, noise = torch.randn(2, 5), torch.randn(2, 3, 8).transpose(1, 2), torch.randn(n, 2, 8, 3)
    prepared = get_backend("graph").prepare(policy, table, capture=False, compose="triton")
    assert prepared.compose == "triton"
    known, mask = inpainting(n, 2, (8, 3), per_step)
    # The float32 loops against the float64 one, within the float32 error growth derived for this loop on
    # these inputs (helpers.torch_loop_bound: Monte Carlo arithmetic over all n steps), each of them.
    for inpaint in (False, True):
        ip = (known, mask) if inpaint else (None, None)
        x64, bound = torch_loop_bound(policy, table, gc, x_T, noise, *ip)
        ref = get_backend("torch").prepare(policy, table, torch.float32).run(gc, x_T, noise, *ip)
        assert_within_float32_bound(ref, x64, bound, f"torch backend, inpaint={inpaint}")
        for compose in ("triton", "torch") if inpaint else ("triton",):
            prep = prepared if compose == "triton" else get_backend("graph").prepare(policy, table, capture=False,
                                                                                     compose=compose)
            out = prep.run(gc, x_T, noise, *ip)
            assert_within_float32_bound(out, x64, bound, f"graph backend, compose={compose}, inpaint={inpaint}")
            if inpaint:
                assert torch.isfinite(out).all() and torch.equal(out[mask], ref[mask])


# -- bad inputs -------------------------------------------------------------------------------------------------


@pytest.fixture
def good():
    dev = SCHEDULES["ddpm_clip"][0]().step_table(10).to("cpu")
    return dict(eps=torch.randn(2, 3, 4, 5), weights=torch.full((3, 2), 0.5), coef=dev.coef,
                adds_noise=dev.adds_noise, step=1, x=torch.randn(3, 4, 5), noise=torch.randn(10, 3, 4, 5))


def call(good, **change):
    args = dict(good, **change)
    pos = [args.pop(k) for k in ("eps", "weights", "coef", "adds_noise", "step", "x")]
    return compose_step(*pos, **args)


@pytest.mark.parametrize("change,exc,match", [
    (dict(eps=[1.0]), TypeError, "`eps` must be a torch.Tensor"),
    (dict(eps=torch.randn(2, 3, 4, 5, dtype=F64)), TypeError, "`eps` must have dtype"),
    (dict(eps=torch.randn(2, 3, 4, 6)), ValueError, r"`eps` must have shape \[K, 3, 4, 5\]"),
    (dict(eps=torch.randn(0, 3, 4, 5), weights=torch.zeros(3, 0)), ValueError, "K >= 1"),
    (dict(weights=torch.randn(3, 3)), ValueError, r"`weights` must have shape \[3, 2\]"),
    (dict(weights=torch.randn(3, 2).long()), TypeError, "`weights` must have dtype"),
    (dict(coef=torch.randn(10, 5)), ValueError, r"`coef` must have shape \[T, 6\]"),
    (dict(coef=torch.randn(10, 6, dtype=F64)), TypeError, "`coef` must have dtype"),
    (dict(adds_noise=torch.ones(9, dtype=torch.bool)), ValueError, r"`adds_noise` must have shape \[10\]"),
    (dict(adds_noise=torch.ones(10)), TypeError, "`adds_noise` must have dtype"),
    (dict(step=10), ValueError, r"`step` must be in \[0, 10\)"),
    (dict(step=-1), ValueError, "`step`"),
    (dict(step=1.0), TypeError, "`step` must be an int"),
    (dict(step=True), TypeError, "`step` must be an int"),
    (dict(x=torch.randn(3, 5, 4).transpose(1, 2)), ValueError, "`x` must be contiguous"),
    (dict(x=torch.randn(3, 4, 5).half()), TypeError, "`x` must have dtype"),
    (dict(x=torch.randn(3)), ValueError, "`x` must be"),
    (dict(noise=torch.randn(9, 3, 4, 5)), ValueError, "`noise` must have shape"),
    (dict(noise=torch.randn(10, 3, 5, 4).transpose(2, 3)), ValueError, "`noise` must be contiguous"),
    (dict(noise=torch.randn(10, 3, 4, 5, dtype=F64)), TypeError, "`noise` must have dtype"),
    (dict(out=torch.randn(3, 20)), ValueError, "`out` must have shape"),
    (dict(out=torch.randn(3, 4, 5, dtype=F64)), TypeError, "`out` must have dtype"),
    (dict(clip_range=0.0), ValueError, "`clip_range`"),
    (dict(clip_range=float("inf")), ValueError, "`clip_range`"),
    (dict(clip_range="1"), TypeError, "`clip_range`"),
    (dict(weights=torch.full((3, 2), 0.5, device="meta")), ValueError, "`weights` must be on `x`'s device"),
    (dict(block=100), ValueError, "`block`"),
    (dict(known=torch.randn(3, 4, 5)), ValueError, "both `known` and `known_mask`"),
    (dict(known=torch.randn(3, 4, 5), known_mask=torch.ones(3, 4, 4, dtype=torch.bool)), ValueError,
     r"`known_mask` must have shape \[3, 4, 5\]"),
    (dict(known=torch.randn(9, 3, 4, 5), known_mask=torch.ones(3, 4, 5, dtype=torch.bool)), ValueError,
     "`known` must have shape"),
    (dict(known=torch.randn(3, 4, 5, dtype=F64), known_mask=torch.ones(3, 4, 5, dtype=torch.bool)), TypeError,
     "`known` must have dtype"),
    (dict(known=torch.randn(3, 4, 5), known_mask=torch.ones(3, 4, 5)), TypeError, "`known_mask` must have dtype"),
])
def test_bad_inputs_raise(good, change, exc, match):
    with pytest.raises(exc, match=match):
        call(good, **change)


def test_good_inputs_pass(good):
    assert torch.isfinite(call(good, clip_range=1.0)).all()
