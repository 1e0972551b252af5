"""Property-based tests: random policies, schedules and routers, sampled two ways that must agree.

- ``backend="torch"`` against the loop diffusion-policy codebases write with
  diffusers' own schedulers, in float64, same generator: same actions.
- The Triton backends (in the Triton interpreter here) against the float64
  ``torch`` backend on the same noise, within the weight dtype's tolerance.

Bounded for CI: few examples, derandomized (the same examples on every run,
so a failure reproduces), no example database written.
"""

from __future__ import annotations

import pytest
import torch

import fdp
from helpers import KERNEL_SCHEDULERS, KERNEL_TOL, kernel_policy, make_mlp_policy, rounded_reference

hypothesis = pytest.importorskip("hypothesis")
diffusers = pytest.importorskip("diffusers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F64 = torch.float64


def bounded(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def router_setups(draw, K):
    strategy = draw(st.sampled_from(["soft", "tanh", "hard", "topk", "fixed"]))
    kw = {}
    if strategy == "topk":
        kw["topk"] = draw(st.integers(1, K))
    if strategy == "fixed":
        w = torch.tensor(draw(st.lists(st.floats(0.05, 1.0), min_size=K, max_size=K)), dtype=F64)
        kw["fixed_weights"] = (w / w.sum()).tolist()
    return strategy, kw


@st.composite
def schedules(draw):
    """(kind, constructor kwargs shared by fdp and diffusers, num_inference_steps, eta)."""
    kind = draw(st.sampled_from(["DDPM", "DDIM"]))
    T = draw(st.sampled_from([20, 50, 100]))
    kw = dict(num_train_timesteps=T,
              beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
              prediction_type=draw(st.sampled_from(["epsilon", "sample", "v_prediction"])),
              clip_sample=draw(st.booleans()),
              timestep_spacing=draw(st.sampled_from(["leading", "trailing", "linspace"])))
    n = draw(st.integers(1, 12))
    eta = 0.0
    if kind == "DDPM":
        kw["variance_type"] = draw(st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large"]))
    else:
        kw["set_alpha_to_one"] = draw(st.booleans())
        eta = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return kind, kw, n, eta


@st.composite
def policies(draw, dtype=F64):
    K = draw(st.integers(1, 4))
    strategy, router_kw = draw(router_setups(K))
    shape = dict(K=K, horizon=draw(st.integers(1, 5)), action_dim=draw(st.integers(1, 4)),
                 cond_dim=draw(st.integers(1, 6)), hidden=draw(st.sampled_from([4, 8, 16, 24])),
                 blocks=draw(st.integers(1, 2)))
    return make_mlp_policy(**shape, dtype=dtype, strategy=strategy, seed=draw(st.integers(0, 2**16)), **router_kw)


def diffusers_loop(policy, scheduler, cond, n, eta, generator):
    """The sampling loop as diffusion-policy codebases write it, with diffusers' scheduler."""
    traj = torch.randn((cond.shape[0], policy.horizon, policy.action_dim), generator=generator, dtype=cond.dtype)
    scheduler.set_timesteps(n)
    kwargs = {"eta": eta} if isinstance(scheduler, diffusers.DDIMScheduler) else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            traj = scheduler.step(policy(traj, t, global_cond=cond), t, traj, generator=generator,
                                  **kwargs).prev_sample
    return traj


@bounded(50)
@given(policy=policies(), schedule=schedules(), B=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_torch_backend_is_the_diffusers_loop(policy, schedule, B, seed):
    kind, kw, n, eta = schedule
    cond = torch.randn(B, policy.cond_dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref = diffusers_loop(policy, getattr(diffusers, f"{kind}Scheduler")(**kw), cond, n, eta,
                         torch.Generator().manual_seed(seed + 1))
    out = fdp.Sampler(policy, getattr(fdp, f"{kind}Scheduler")(**kw), num_inference_steps=n, eta=eta,
                      backend="torch")(cond, generator=torch.Generator().manual_seed(seed + 1))
    assert out.shape == ref.shape == (B, policy.horizon, policy.action_dim) and out.dtype == F64
    # The step table holds diffusers' own float32 scalars: float64 loops agree to rounding.
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@bounded(10)
@given(K=st.integers(1, 4), H=st.sampled_from([16, 24, 40]), L=st.integers(1, 2), horizon=st.integers(1, 4),
       action_dim=st.integers(1, 4), B=st.sampled_from([1, 2, 5, 17]),
       strategy=st.sampled_from(["soft", "tanh", "hard", "topk", "fixed"]),
       sched=st.sampled_from(list(KERNEL_SCHEDULERS)),
       name=st.sampled_from(["triton", "triton-persistent"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_triton_backends_match_torch(K, H, L, horizon, action_dim, B, strategy, sched, name, dtype, seed):
    pol64 = kernel_policy(K, H, L, horizon, action_dim, strategy, seed=seed)
    factory, eta = KERNEL_SCHEDULERS[sched]
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, pol64.cond_dim, generator=g, dtype=F64)
    sampler = fdp.Sampler(pol64, factory(), num_inference_steps=3, eta=eta, backend=name, dtype=dtype)
    x_T, step_noise = sampler.noise(B, g)
    out = sampler(cond, x_T=x_T, step_noise=step_noise)
    # The float64 truth for weights stored in `dtype`.
    ref = fdp.Sampler(rounded_reference(pol64, dtype), factory(), num_inference_steps=3, eta=eta, backend="torch")(
        cond, x_T=x_T, step_noise=step_noise)
    err = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err < KERNEL_TOL[dtype], f"relative error {err:.2e}"
