"""Helpers the tests share: the kernel tests' schedules, tolerances and policies, the error measure.

A plain module (tests/conftest.py holds only pytest's setup): the test modules import it, and so do the
native-GPU scripts they run in subprocesses with this folder on PYTHONPATH.
"""
import copy

import torch

import fdp
from fdp.tolerances import REL_TOL


# Feature size of the kernel tests' policies.
KERNEL_COND_DIM = 5

# Relative-error bounds for fused kernels against the float64 reference, by weight dtype: the
# library's table, which backend="auto" checks candidates with too.
KERNEL_TOL = REL_TOL

# Problems that both the CUDA kernels on a GPU (tests/test_fused_mlp.py) and their host emulation
# (tests/test_cuda_emulation.py) run: policy shape, schedule, batch and weight dtype.
KERNEL_PROBLEMS = {
    # The target shape: K=4, H=256, D=32 (horizon 16 x 2), one row, ten steps.
    "target": dict(K=4, H=256, L=2, horizon=16, action_dim=2, B=1, sched="ddpm_clip", strategy="soft", T=10,
                   dtype=torch.float32),
    # bf16 weights on the FMA path, D = 15 (unaligned rows).
    "bf16": dict(K=3, H=48, L=2, horizon=5, action_dim=3, B=5, sched="ddpm_clip", strategy="soft", T=3,
                 dtype=torch.bfloat16),
}

# Schedules every fused-kernel test draws from: name -> (scheduler factory, eta).
KERNEL_SCHEDULERS = {
    # DDPM with clipping: every step but the last adds noise.
    "ddpm_clip": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True), 0.0),
    # Deterministic DDIM (eta 0): no noise input at all.
    "ddim": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                       clip_sample=True), 0.0),
    # Stochastic DDIM, no clipping.
    "ddim_eta": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear",
                                           clip_sample=False, timestep_spacing="trailing"), 0.7),
    # v-prediction with the log variance.
    "ddpm_v": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="linear",
                                         variance_type="fixed_small_log", prediction_type="v_prediction",
                                         clip_sample=False), 0.0),
}


def make_mlp_policy(K=3, horizon=4, action_dim=3, cond_dim=5, hidden=16, blocks=2, dtype=torch.float64,
                    strategy="soft", seed=0, **router_kw):
    """A small random MLP policy (float64 by default: the ground truth for kernels)."""
    torch.manual_seed(seed)
    comps = [fdp.MLPDenoiser(action_dim, horizon, global_cond_dim=cond_dim, hidden_dim=hidden, num_blocks=blocks)
             for _ in range(K)]
    router = fdp.Router(cond_dim, K, hidden_dim=8, strategy=strategy, **router_kw)
    policy = fdp.FactorizedPolicy(comps, router, horizon, action_dim).to(dtype)
    # Non-trivial FiLM and biases, so a kernel that drops a term fails.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def signed_tanh_routing(policy, zero_comp=None):
    """Give a ``"tanh"`` router the weights the FDP authors' trained routers settle at: magnitudes up to
    about 0.9, alternating signs (logit biases 0.4 .. 1.4, the first component positive), so rows neither
    sum to 1 nor stay non-negative (with two or more components in use). ``zero_comp``: that component's
    logit row is zeroed, so its weight is exactly 0 on every row (tanh(0) = 0), the case fused kernels
    skip."""
    K = policy.num_components
    live = [k for k in range(K) if k != zero_comp]  # the signs alternate over the components in use
    with torch.no_grad():
        last = policy.router.net[2]
        signs = torch.ones(K, dtype=last.bias.dtype)
        signs[live[1::2]] = -1
        last.bias.copy_(torch.linspace(0.4, 1.4, K, dtype=last.bias.dtype) * signs)
        if zero_comp is not None:
            last.weight[zero_comp] = 0
            last.bias[zero_comp] = 0
    return policy


def assert_signed_unnormalised(weights):
    """The routing weights of a tanh kernel case hold what the case is for: a negative weight and rows
    that do not sum to 1 (so a kernel that clamps, skips ``w <= 0`` or renormalises fails it)."""
    assert (weights < 0).any(), "no negative weight: the case does not test signed routing"
    assert ((weights.sum(-1) - 1).abs() > 0.1).all(), "a row sums to ~1: the case does not test unnormalised routing"


def kernel_policy(K, H, L, horizon, action_dim, strategy="soft", seed=0, dtype=torch.float64):
    """A random MLP policy for kernel tests, with routing parameters that suit ``strategy``."""
    kw = {}
    if strategy == "topk":
        kw["topk"] = min(2, K)
    if strategy == "fixed":
        w = torch.rand(K, generator=torch.Generator().manual_seed(seed)) + 0.1
        kw["fixed_weights"] = (w / w.sum()).tolist()
    policy = make_mlp_policy(K=K, horizon=horizon, action_dim=action_dim, cond_dim=KERNEL_COND_DIM, hidden=H,
                             blocks=L, strategy=strategy, seed=seed, dtype=dtype, **kw)
    return signed_tanh_routing(policy) if strategy == "tanh" else policy


def rounded_reference(policy, dtype):
    """The float64 ground truth for a pack in ``dtype``: weight matrices rounded to
    ``dtype`` (the kernels compute with exactly those values), everything else float64."""
    ref = copy.deepcopy(policy).double()
    if dtype != torch.float32:
        with torch.no_grad():
            for c in ref.components:
                for w in [c.inp.weight, c.out.weight] + [b.weight for b in c.blocks_a] + [b.weight for b in c.blocks_b]:
                    w.copy_(w.to(dtype).double())
    return ref


def rel_err(a, b):
    """The fused-kernel tests' error measure, ``max|a - b| / max|b|`` in float64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def replaced(obj, **kw):
    """A shallow copy of ``obj`` with attributes replaced (bad-input tests on packed objects)."""
    new = copy.copy(obj)
    for k, v in kw.items():
        setattr(new, k, v)
    return new
