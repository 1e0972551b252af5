"""Inpainting (``Sampler(...)(cond, known=..., known_mask=...)``, :mod:`fdp.inpainting`) and chunk continuation.

The kernels' epilogue is tested on the kernel case tables (tests/test_fused_mlp.py, test_compose_kernel.py,
the CUDA emulation); here: the semantics against diffusion_policy's ``conditional_sample`` (its algorithm,
re-implemented from its description: the package is not on PyPI) and a float64 loop, the noised rule, the
argument checks, the reference serving a backend without support, and :func:`fdp.inpainting.continuation`.
"""

import copy
import logging

import pytest
import torch

import fdp
from fdp.backends import get_backend
from fdp.backends.torch_backend import TorchBackend
from fdp.inpainting import continuation
from fdp.schedulers import apply_step
from helpers import assert_matches_in_float32, make_mlp_policy

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
CONFIGS = [
    ("DDPM", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True), 12, 0.0),
    ("DDIM", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True), 8, 0.0),
    ("DDIM", dict(num_train_timesteps=100, beta_schedule="scaled_linear", timestep_spacing="trailing"), 6, 0.7),
]


def _mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.4
    mask[:, :2] = True  # the first actions of every row, as continuation fixes them
    return mask


def _dp_conditional_sample(model, sched, condition_data, condition_mask, cond, n, eta, generator):
    """diffusion_policy's DiffusionUnetLowdimPolicy.conditional_sample, from its description: trajectory drawn
    with the generator, then per timestep: trajectory[mask] = data[mask], model call, scheduler step (drawing
    its noise from the same generator); once more after the loop."""
    trajectory = torch.randn(condition_data.shape, generator=generator, dtype=condition_data.dtype)
    sched.set_timesteps(n)
    kwargs = {"eta": eta} if isinstance(sched, diffusers.DDIMScheduler) else {}
    with torch.no_grad():
        for t in sched.timesteps:
            trajectory[condition_mask] = condition_data[condition_mask]
            out = model(trajectory, t, global_cond=cond)
            trajectory = sched.step(out, t, trajectory, generator=generator, **kwargs).prev_sample
    trajectory[condition_mask] = condition_data[condition_mask]
    return trajectory


@pytest.mark.parametrize("kind,cfg,n,eta", CONFIGS)
def test_clean_rule_is_diffusion_policys_conditional_sample(kind, cfg, n, eta):
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    cond = torch.randn(4, 5)
    data = torch.randn(4, policy.horizon, policy.action_dim)
    mask = _mask(data.shape)
    ref = _dp_conditional_sample(policy, getattr(diffusers, f"{kind}Scheduler")(**cfg), data, mask, cond, n, eta,
                                 torch.Generator().manual_seed(3))
    sampler = fdp.Sampler(policy, getattr(fdp, f"{kind}Scheduler")(**cfg), num_inference_steps=n, eta=eta,
                          backend="torch")
    ours = sampler(cond, generator=torch.Generator().manual_seed(3), known=data, known_mask=mask)
    assert torch.equal(ours[mask], data[mask])
    # As tests/test_sampler.py's loop without a mask: diffusers' scheduler rounds in its own order, so both
    # float32 loops are held to the float64 loop on the same noise within its derived float32 bound
    # (helpers.assert_matches_in_float32), not to each other.
    x_T, noise = sampler.noise(4, torch.Generator().manual_seed(3))
    assert_matches_in_float32({"diffusion_policy's loop": ref, "fdp": ours}, sampler, cond, x_T, noise,
                              known=data, known_mask=mask)


def _float64_loop(policy, table, cond, x_T, noise, known, mask):
    """The rule written out in float64: replace before every model call and after the last step."""
    policy = policy.double()
    x = x_T.to(F64)
    w = policy.weights(cond.to(F64))
    with torch.no_grad():
        for i, t in enumerate(table.timesteps.tolist()):
            x = torch.where(mask, known.to(F64), x)
            eps = policy.compose(x, t, cond.to(F64), w)
            x = apply_step(table, i, x, eps, noise[i].to(F64) if noise is not None else None)
    return torch.where(mask, known.to(F64), x)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-persistent", "torch-batched", "onnxruntime"])
@pytest.mark.parametrize("B", [1, 3])
def test_backends_match_a_float64_loop(backend, B):
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sampler = fdp.Sampler(policy, sched, num_inference_steps=5, backend=backend)
    cond = torch.randn(B, 5)
    x_T, noise = sampler.noise(B, torch.Generator().manual_seed(2))
    known = torch.randn(x_T.shape)
    mask = _mask(x_T.shape, seed=B)
    known[~mask] = float("nan")  # never read
    ours = sampler(cond, x_T=x_T, step_noise=noise, known=known, known_mask=mask)
    ref = _float64_loop(copy.deepcopy(policy), sampler.table, cond, x_T, noise, known, mask)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[mask], known[mask])
    # float32 over 5 steps of an O(1) map: the kernels' float32 tolerance.
    err = float((ours.to(F64) - ref).abs().max() / ref.abs().max())
    assert err < fdp.tolerances.REL_TOL[torch.float32], err


def test_noised_rule_feeds_the_model_known_values_at_each_steps_level():
    """RePaint's rule: before step i's model call the masked entries hold sqrt(ab_t) known + sqrt(1 - ab_t) n_i,
    with n drawn after all other noise from the generator; the result holds the clean values."""
    policy = make_mlp_policy(K=2, dtype=torch.float64)
    sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    sampler = fdp.Sampler(policy, sched, num_inference_steps=4, eta=0.5, backend="torch")
    cond = torch.randn(2, 5, dtype=F64)
    shape = (2, policy.horizon, policy.action_dim)
    known = torch.randn(shape, dtype=F64)
    mask = _mask(shape)
    seen = []
    hook = policy.components[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        out = sampler(cond, generator=torch.Generator().manual_seed(5), known=known, known_mask=mask,
                      inpaint="noised")
    finally:
        hook.remove()
    assert torch.equal(out[mask], known[mask])
    g = torch.Generator().manual_seed(5)
    sampler.noise(2, g, dtype=F64)  # x_T and the step noise come first
    n = torch.randn((4, *shape), generator=g, dtype=F64)
    ab = sched.alphas_cumprod.to(F64)[sampler.table.timesteps]
    assert len(seen) == 4
    for i in range(4):
        want = ab[i].sqrt() * known + (1 - ab[i]).sqrt() * n[i]
        torch.testing.assert_close(seen[i][mask], want[mask], rtol=1e-12, atol=1e-12)


def test_noised_rule_same_numbers_on_every_backend():
    """The noised rule draws all noise up front, so the torch backend (which otherwise draws step by step)
    consumes the generator in the fused backends' order."""
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    cond, shape = torch.randn(2, 5), (2, policy.horizon, policy.action_dim)
    known, mask = torch.randn(shape), _mask(shape)
    outs = [fdp.Sampler(policy, sched, num_inference_steps=4, backend=b)(
        cond, generator=torch.Generator().manual_seed(9), known=known, known_mask=mask, inpaint="noised")
        for b in ("torch", "triton")]
    err = float((outs[0] - outs[1]).abs().max() / outs[0].abs().max())
    assert err < fdp.tolerances.REL_TOL[torch.float32], err


def _sampler(**kw):
    return fdp.Sampler(make_mlp_policy(K=2, dtype=torch.float32), fdp.DDIMScheduler(num_train_timesteps=50),
                       num_inference_steps=3, backend="torch", **kw)


@pytest.mark.parametrize("change,exc,match", [
    (dict(known_mask=None), ValueError, "both `known` and `known_mask`"),
    (dict(known=None), ValueError, "both `known` and `known_mask`"),
    (dict(known=torch.randn(2, 4, 2)), ValueError, r"`known` must have shape \[2, 4, 3\]"),
    (dict(known_mask=torch.ones(2, 4, 3)), TypeError, "`known_mask` must have dtype torch.bool"),
    (dict(known=torch.ones(2, 4, 3, dtype=torch.long)), TypeError, "`known`"),
    (dict(inpaint="repaint"), ValueError, "`inpaint` must be one of"),
    (dict(known=torch.full((2, 4, 3), float("nan"))), ValueError, "`known`"),
])
def test_bad_inpainting_arguments_raise(change, exc, match):
    args = dict(known=torch.randn(2, 4, 3), known_mask=torch.ones(2, 4, 3, dtype=torch.bool), inpaint="clean")
    args.update(change)
    with pytest.raises(exc, match=match):
        _sampler()(torch.randn(2, 5), **args)


def test_nan_where_unmasked_is_never_read():
    known = torch.full((2, 4, 3), float("nan"))
    mask = torch.zeros(2, 4, 3, dtype=torch.bool)
    mask[:, 0] = True
    known[mask] = 0.25
    out = _sampler()(torch.randn(2, 5), known=known, known_mask=mask)
    assert torch.isfinite(out).all() and (out[mask] == 0.25).all()


def test_a_backend_without_inpainting_has_its_inpainting_calls_run_by_the_reference(caplog):
    class NoInpainting(TorchBackend):
        name = "no-inpainting"
        supports_inpainting = False

        def prepare(self, policy, table, dtype=None):
            inner = super().prepare(policy, table, dtype)

            class Prepared:  # what such a backend's run takes: no known/known_mask
                noise_per_step = False

                def run(self, global_cond, x_T, step_noise):
                    return inner.run(global_cond, x_T, step_noise)

            return Prepared()

    assert get_backend("torch").supports_inpainting and not fdp.backends.Backend.supports_inpainting
    assert get_backend("torch-batched").supports_inpainting and not get_backend("onnxruntime").supports_inpainting
    s, ref = _sampler(), _sampler()
    s._pack(NoInpainting())
    s.backend = "no-inpainting"
    cond = torch.randn(2, 5)
    x_T = torch.randn(2, 4, 3)
    known, mask = torch.randn(2, 4, 3), torch.rand(2, 4, 3) < 0.5
    torch.testing.assert_close(s(cond, x_T=x_T), ref(cond, x_T=x_T), rtol=0, atol=0)  # serves as before
    with caplog.at_level(logging.WARNING, logger="fdp"):
        for _ in range(2):
            out = s(cond, x_T=x_T, known=known, known_mask=mask)
            torch.testing.assert_close(out, ref(cond, x_T=x_T, known=known, known_mask=mask), rtol=0, atol=0)
    assert torch.equal(out[mask], known[mask])
    warnings = [r.getMessage() for r in caplog.records if "cannot inpaint" in r.getMessage()]
    assert len(warnings) == 1 and "'no-inpainting'" in warnings[0]  # named, once


# -- continuation ----------------------------------------------------------------------------------------------


def test_continuation_shifts_the_previous_chunk_and_masks_the_overlap():
    prev = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    known, mask = continuation(prev, executed=2, overlap=3)
    assert known.shape == mask.shape == prev.shape and mask.dtype == torch.bool
    assert torch.equal(known[:, :4], prev[:, 2:]) and (known[:, 4:] == 0).all()
    assert mask[:, :3].all() and not mask[:, 3:].any()
    k1, m1 = continuation(prev[0], 6, 0)  # everything executed: nothing to continue
    assert k1.shape == (6, 2) and not m1.any()


def test_continued_chunk_starts_with_the_committed_actions():
    s = _sampler()
    cond = torch.randn(1, 5)
    prev = s(cond, generator=torch.Generator().manual_seed(0))
    known, mask = continuation(prev, executed=1, overlap=2)
    nxt = s(cond, generator=torch.Generator().manual_seed(1), known=known, known_mask=mask)
    assert torch.equal(nxt[:, :2], prev[:, 1:3])


@pytest.mark.parametrize("args,exc,match", [
    ((torch.zeros(3), 0, 0), ValueError, "`previous` must be a chunk"),
    ((torch.zeros(4, 2, dtype=torch.long), 0, 0), TypeError, "`previous`"),
    ((torch.zeros(4, 2), 5, 0), ValueError, "`executed` must be <="),
    ((torch.zeros(4, 2), -1, 0), ValueError, "`executed`"),
    ((torch.zeros(4, 2), 2, 3), ValueError, "`overlap` must be <= Ta - executed = 2"),
    ((torch.zeros(4, 2), 1.0, 0), TypeError, "`executed`"),
])
def test_continuation_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        continuation(*args)
