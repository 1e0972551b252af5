import copy

import pytest
import torch

import fdp
from helpers import assert_within_float32_bound, float32_loop_bound, make_mlp_policy

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    ("DDPM", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True), 100, 0.0),
    ("DDPM", dict(num_train_timesteps=100, beta_schedule="linear", variance_type="fixed_small_log",
                  prediction_type="v_prediction"), 17, 0.0),
    ("DDIM", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True), 10, 0.0),
    ("DDIM", dict(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=True,
                  timestep_spacing="trailing"), 8, 0.7),
]


def _diffusers_loop(policy, sched, cond, n, eta, generator):
    """The loop as diffusion-policy codebases write it."""
    shape = (cond.shape[0], policy.horizon, policy.action_dim)
    traj = torch.randn(shape, generator=generator, dtype=cond.dtype)
    sched.set_timesteps(n)
    kwargs = {"eta": eta} if isinstance(sched, diffusers.DDIMScheduler) else {}
    with torch.no_grad():
        for t in sched.timesteps:
            eps = policy(traj, t, global_cond=cond)
            traj = sched.step(eps, t, traj, generator=generator, **kwargs).prev_sample
    return traj


@pytest.mark.parametrize("kind,cfg,n,eta", CONFIGS)
def test_same_seed_same_actions_as_diffusers(kind, cfg, n, eta):
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    cond = torch.randn(5, 5)
    ref = _diffusers_loop(policy, getattr(diffusers, f"{kind}Scheduler")(**cfg), cond, n, eta,
                          torch.Generator().manual_seed(7))
    ours = fdp.sample(policy, cond, getattr(fdp, f"{kind}Scheduler")(**cfg), num_inference_steps=n, eta=eta,
                      generator=torch.Generator().manual_seed(7), backend="torch")
    assert ours.shape == (5, 4, 3)
    # Both float32 loops within the float32 error of this computation of the float64 loop on the same noise.
    sched = getattr(fdp, f"{kind}Scheduler")(**cfg)
    x_T, noise = fdp.Sampler(policy, sched, num_inference_steps=n, eta=eta, backend="torch").noise(
        5, torch.Generator().manual_seed(7))
    p64 = copy.deepcopy(policy).double()
    s64 = fdp.Sampler(p64, sched, num_inference_steps=n, eta=eta, backend="torch")
    x64, bound = float32_loop_bound(
        lambda: s64(cond.double(), x_T=x_T.double(), step_noise=None if noise is None else noise.double()), [p64])
    assert_within_float32_bound(ref, x64, bound, "diffusers")
    assert_within_float32_bound(ours, x64, bound, "fdp")


def test_explicit_noise_equals_generator_draws():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    sampler = fdp.Sampler(policy, sched, num_inference_steps=12, backend="torch")
    cond = torch.randn(3, 5)
    x_T, step_noise = sampler.noise(3, torch.Generator().manual_seed(1))
    assert step_noise.shape == (12, 3, 4, 3)
    assert torch.all(step_noise[-1] == 0)  # DDPM's last step (t = 0) adds none
    a = sampler(cond, generator=torch.Generator().manual_seed(1))
    b = sampler(cond, x_T=x_T, step_noise=step_noise)
    assert torch.equal(a, b)


def test_router_runs_once_per_call():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    calls = []
    policy.router.register_forward_hook(lambda *a: calls.append(1))
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=6, backend="torch")
    sampler(torch.randn(2, 5))
    assert len(calls) == 1


@pytest.mark.parametrize("B", [1, 7])
def test_batch_sizes(B):
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    out = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=4)(torch.randn(B, 5))
    assert out.shape == (B, 4, 3) and torch.isfinite(out).all()


def test_bad_inputs():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sampler = fdp.Sampler(policy, fdp.DDPMScheduler(num_train_timesteps=100), num_inference_steps=5, backend="torch")
    with pytest.raises(ValueError, match="global_cond"):
        sampler(torch.randn(2, 4))
    with pytest.raises(ValueError, match="global_cond"):
        sampler(torch.randn(2, 5, 1))
    bad = torch.randn(2, 5)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="global_cond"):
        sampler(bad)
    with pytest.raises(ValueError, match="x_T"):
        sampler(torch.randn(2, 5), x_T=torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="step_noise"):
        sampler(torch.randn(2, 5), x_T=torch.randn(2, 4, 3), step_noise=torch.randn(4, 2, 4, 3))
    with pytest.raises(TypeError, match="generator"):
        sampler(torch.randn(2, 5), generator=3)
    with pytest.raises(ValueError, match="backend"):
        fdp.Sampler(policy, fdp.DDPMScheduler(), backend="warp-drive")
    with pytest.raises(TypeError, match="scheduler"):
        fdp.Sampler(policy, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="num_inference_steps"):
        fdp.Sampler(policy, fdp.DDPMScheduler(), num_inference_steps=0)


def test_available_backends_explains_itself():
    info = fdp.available_backends("cpu")
    assert info["torch"].available
    for name, i in info.items():
        assert i.available or i.reason, name


def test_eager_loop_checks_features_once(monkeypatch):
    # Each finiteness check is a device sync on CUDA: the sampler checks the
    # features once per call, not once per component and step.
    from fdp import _validation

    policy = make_mlp_policy(K=3, dtype=torch.float32)
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=5, backend="torch")
    seen = []
    real = _validation.torch.isfinite
    monkeypatch.setattr(_validation.torch, "isfinite", lambda t: (seen.append(t.shape), real(t))[1])
    sampler(torch.randn(2, 5))
    assert len(seen) <= 3, seen  # sampler, router; never per step


def test_features_in_another_float_dtype_are_cast():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=3, backend="torch")
    c = torch.randn(2, 5, dtype=torch.float64)
    a = sampler(c, generator=torch.Generator().manual_seed(0))
    b = sampler(c.float(), generator=torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_auto_logs_what_it_picked_and_a_named_backend_does_not(caplog, tmp_path, monkeypatch):
    import logging

    from fdp.backends.selection import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDIMScheduler(num_train_timesteps=20)
    with caplog.at_level(logging.INFO, logger="fdp"):
        fdp.Sampler(policy, sched, num_inference_steps=3, backend="torch")
    assert "backend 'auto' picked" not in caplog.text
    with caplog.at_level(logging.INFO, logger="fdp"):
        s = fdp.Sampler(policy, sched, num_inference_steps=3)
    assert f"backend 'auto' picked {s.backend!r}" in caplog.text
