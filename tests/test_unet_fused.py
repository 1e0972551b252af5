"""``fdp.unet_fused.FusedUnets`` and ``backend="graph"``.

The fused network must compute what the K components compute one by one
(float64, to rounding); the graph backend's loop, run on the CPU without
graph capture, must give what ``backend="torch"`` gives for the same ``x_T``
and step noise. The CUDA tests run in a fresh interpreter: other test modules
set ``TRITON_INTERPRET=1`` for the whole process, which would put the compose
kernel in the interpreter.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fdp
from fdp.backends import available_backends, backend_names, get_backend, graph_backend
from fdp.backends.graph_backend import GraphPrepared, compose_step_torch
from helpers import assert_within_float32_bound, signed_tanh_routing, torch_loop_bound
from fdp.schedulers import apply_step
from fdp.unet_fused import FusedUnets, fusion_mismatch

F64 = torch.float64

# (name, kwargs shared by the K components, per-component overrides for component 1)
CONFIGS = {
    "2lvl_k3_g4_scale": (dict(input_dim=3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(16, 32),
                              kernel_size=3, n_groups=4, cond_predict_scale=True), {}),
    "3lvl_k5_g8_bias_local": (dict(input_dim=2, local_cond_dim=3, global_cond_dim=5, diffusion_step_embed_dim=8,
                                   down_dims=(8, 16, 32), kernel_size=5, n_groups=8, cond_predict_scale=False), {}),
    "3lvl_k3_g4_scale_local": (dict(input_dim=3, local_cond_dim=2, global_cond_dim=4, diffusion_step_embed_dim=6,
                                    down_dims=(8, 16, 32), kernel_size=3, n_groups=4, cond_predict_scale=True), {}),
    # Identity residuals on the shared input (input_dim == local_cond_dim == down_dims[0]).
    "identity_residual": (dict(input_dim=16, local_cond_dim=16, global_cond_dim=5, diffusion_step_embed_dim=8,
                               down_dims=(16, 32), kernel_size=5, n_groups=8, cond_predict_scale=False), {}),
    # Components differing off the trunk: FiLM scale, step-embedding size, and one ignoring global_cond.
    "mixed_cond": (dict(input_dim=3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(16, 32),
                        kernel_size=5, n_groups=4, cond_predict_scale=True),
                   dict(cond_predict_scale=False, diffusion_step_embed_dim=12, global_cond_dim=None)),
}


def make_unets(K, kwargs, override=None, dtype=F64, seed=0):
    torch.manual_seed(seed)
    comps = []
    for k in range(K):
        kw = dict(kwargs, **(override or {})) if k == 1 else kwargs
        comp = fdp.ConditionalUnet1D(**kw).to(dtype)
        # Non-trivial GroupNorm affine and biases, so a dropped or misplaced term shows.
        with torch.no_grad():
            for p in comp.parameters():
                p.add_(0.1 * torch.randn_like(p))
        comps.append(comp)
    return comps


@torch.no_grad()
def separate(comps, x, t, local_cond, global_cond):
    return torch.stack([c(x, t, local_cond=local_cond, global_cond=global_cond if c.global_cond_dim else None)
                        for c in comps])


def inputs(kwargs, B, T=8, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, kwargs["input_dim"], generator=g, dtype=dtype)
    gc = torch.randn(B, kwargs["global_cond_dim"], generator=g, dtype=dtype)
    lc = torch.randn(B, T, kwargs["local_cond_dim"], generator=g, dtype=dtype) if kwargs.get("local_cond_dim") \
        else None
    t = torch.randint(0, 100, (B,), generator=g)
    return x, t, lc, gc


# -- FusedUnets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("K,B", [(1, 1), (3, 5), (4, 1), (2, 3)])
def test_fused_matches_components(name, K, B):
    kwargs, override = CONFIGS[name]
    comps = make_unets(K, kwargs, override)
    fused = FusedUnets.from_components(comps)
    x, t, lc, gc = inputs(kwargs, B)
    out = fused(x, t, local_cond=lc, global_cond=gc)
    ref = separate(comps, x, t, lc, gc)
    assert out.shape == (K, B, 8, kwargs["input_dim"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_one_component_scalar_timestep_longer_horizon():
    kwargs, _ = CONFIGS["3lvl_k5_g8_bias_local"]
    comps = make_unets(1, kwargs)
    x, _, lc, gc = inputs(kwargs, 3, T=16)
    fused = FusedUnets.from_components(comps)
    torch.testing.assert_close(fused(x, 37, local_cond=lc, global_cond=gc), separate(comps, x, 37, lc, gc),
                               rtol=0, atol=1e-10)


def test_film_layout():
    """Block j's slice of the flat FiLM vector holds [scale (K*C) | bias (K*C)], component-major."""
    kwargs, _ = CONFIGS["2lvl_k3_g4_scale"]
    comps = make_unets(2, kwargs)
    fused = FusedUnets.from_components(comps)
    assert fused.cond_idx is None  # every component takes global_cond: call_terms is one matmul, no scatter
    t = torch.tensor([3, 50])
    gc = torch.randn(2, 5, dtype=F64)
    film = fused.film(t, gc)
    blk = fused.mid[1]
    C, o = blk.channels, blk.film_offset
    for k, comp in enumerate(comps):
        scale, bias = comp.mid_modules[1].film(comp.cond_embedding(t, gc))
        torch.testing.assert_close(film[:, o + k * C:o + (k + 1) * C], scale[..., 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(film[:, o + 2 * C + k * C:o + 2 * C + (k + 1) * C], bias[..., 0], rtol=0,
                                   atol=1e-12)
    # step part + call part is the whole: the step part alone is the FiLM at global_cond = 0.
    zero = torch.zeros_like(gc)
    torch.testing.assert_close(fused.step_terms(t), fused.film(t, zero), rtol=0, atol=1e-12)


def test_packing_leaves_components_untouched():
    kwargs, override = CONFIGS["mixed_cond"]
    comps = make_unets(3, kwargs, override)
    before = [{k: (v.clone(), v.data_ptr()) for k, v in c.state_dict().items()} for c in comps]
    fused = FusedUnets.from_components(comps, dtype=torch.float32)
    for comp, snap in zip(comps, before):
        sd = comp.state_dict()
        assert list(sd) == list(snap)
        for key, (value, ptr) in snap.items():
            assert sd[key].data_ptr() == ptr and torch.equal(sd[key], value), key
            assert sd[key].dtype == F64
    # The fused copy is independent: changing a component afterwards does not reach it.
    x, t, lc, gc = inputs(kwargs, 2, dtype=torch.float32)
    out = fused(x, t, global_cond=gc)
    with torch.no_grad():
        comps[0].final_conv[1].bias.add_(1.0)
    torch.testing.assert_close(fused(x, t, global_cond=gc), out, rtol=0, atol=0)


# The modules whose weights FusedUnets stores in its trunk dtype (the FiLM and timestep weights keep the
# components' dtype).
TRUNK_MODULES = (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.GroupNorm)


def bfloat16_trunk_bound(comps, x, t, global_cond, runs=4, coverage=4.0, seed=0):
    """``(x64, bound)``: the K float32 components' outputs in float64 with the trunk's weights and ``x`` rounded
    to bfloat16 as the bfloat16 trunk holds them, and a bound on how far the trunk's evaluation may be from it.

    A bfloat16 conv, GroupNorm or Mish accumulates in float32 on the CPU and rounds what it stores, once: Monte
    Carlo arithmetic (as helpers.float32_loop_bound) multiplies every value the trunk stores by ``1 + u d``, ``d``
    uniform in ``[-1, 1]``, ``u = 2^-8``: each leaf module's output (float32 FiLM and timestep layers
    included, conservatively), the FiLM's product and sum (blocks[0]'s output, blocks[1]'s input) and the
    residual sum (the block's output), plus float32 accumulation (fdp.tolerances.perturb_outputs at ``2^-24``).
    The bound is ``coverage`` times the largest deviation over ``runs`` (fdp.tolerances.finish_bound)."""
    from fdp import tolerances
    from fdp.unet import ConditionalResidualBlock1D

    u = torch.finfo(torch.bfloat16).eps / 2
    c64 = [copy.deepcopy(c).double() for c in comps]
    with torch.no_grad():
        for m in (m for c in c64 for m in c.modules() if isinstance(m, TRUNK_MODULES)):
            for p in m.parameters():
                p.copy_(p.bfloat16())
    run = lambda: separate(c64, x.bfloat16().double(), t, None, global_cond.double())  # noqa: E731
    x64 = run()
    gen = torch.Generator().manual_seed(seed)

    def rounded(v):
        return tolerances.perturbed(v, u, gen) if v.is_floating_point() else None

    hooks = tolerances.perturb_outputs(c64, torch.finfo(torch.float32).eps / 2, gen, extent=x.shape[1])
    for m in (m for c in c64 for m in c.modules()):
        if not list(m.children()) or isinstance(m, ConditionalResidualBlock1D):
            hooks.append(m.register_forward_hook(lambda mod, args, out: rounded(out)))
        if isinstance(m, ConditionalResidualBlock1D):
            hooks.append(m.blocks[0].register_forward_hook(lambda mod, args, out: rounded(out)))
            hooks.append(m.blocks[1].register_forward_pre_hook(lambda mod, args: (rounded(args[0]),)))
    try:
        spread = torch.zeros_like(x64)
        for _ in range(runs):
            spread = torch.maximum(spread, (run() - x64).abs())
    finally:
        for h in hooks:
            h.remove()
    return x64, tolerances.finish_bound(x64, spread, coverage)


def test_half_precision_trunk():
    kwargs, _ = CONFIGS["2lvl_k3_g4_scale"]
    comps = make_unets(2, kwargs, dtype=torch.float32)
    x, t, lc, gc = inputs(kwargs, 3, dtype=torch.float32)
    fused = FusedUnets.from_components(comps, dtype=torch.bfloat16)
    assert fused.head_out.weight.dtype == torch.bfloat16 and fused.cond_w.dtype == torch.float32
    out = fused(x.bfloat16(), t, global_cond=gc)
    assert out.dtype == torch.bfloat16
    x64, bound = bfloat16_trunk_bound(comps, x, t, gc)
    assert_within_float32_bound(out, x64, bound, "bfloat16 trunk")
    # A dropped bias (the head's last conv) is outside it.
    with torch.no_grad():
        fused.head_out.bias.zero_()
    with pytest.raises(AssertionError, match="exceeds the derived"):
        assert_within_float32_bound(fused(x.bfloat16(), t, global_cond=gc), x64, bound, "bfloat16 trunk, no bias")


@pytest.mark.parametrize("change,match", [
    (dict(down_dims=(16, 24)), "down_dims"),
    (dict(kernel_size=5), "kernel_size"),
    (dict(n_groups=8), "n_groups"),
    (dict(local_cond_dim=2), "local_cond_dim"),
    (dict(global_cond_dim=6), "global_cond_dim"),
])
def test_mismatched_trunks_are_refused(change, match):
    kwargs, _ = CONFIGS["2lvl_k3_g4_scale"]
    comps = make_unets(2, kwargs) + [fdp.ConditionalUnet1D(**dict(kwargs, **change)).double()]
    assert match in fusion_mismatch(comps)
    with pytest.raises(ValueError, match=match):
        FusedUnets.from_components(comps)


def test_bad_components_and_inputs():
    kwargs, _ = CONFIGS["2lvl_k3_g4_scale"]
    comps = make_unets(2, kwargs)
    with pytest.raises(ValueError, match="not a ConditionalUnet1D"):
        FusedUnets.from_components([comps[0], torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        FusedUnets.from_components([])
    with pytest.raises(ValueError, match="float32"):
        FusedUnets.from_components([comps[0], make_unets(1, kwargs, dtype=torch.float32)[0]])
    fused = FusedUnets.from_components(comps)
    x, t, _, gc = inputs(kwargs, 2)
    with pytest.raises(ValueError, match="global_cond"):
        fused(x, t)
    with pytest.raises(ValueError, match="`sample`"):
        fused(x[:, :5], t, global_cond=gc)
    with pytest.raises(TypeError, match="`sample`"):
        fused(x.float(), t, global_cond=gc)
    with pytest.raises(ValueError, match="local_cond"):
        fused(x, t, local_cond=x, global_cond=gc)


# -- backend="graph" on the CPU (no capture) ---------------------------------------------------------------------

SCHEDULES = {
    "ddpm_clip": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True), 12, 0.0),
    "ddim_eta0": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True), 8, 0.0),
    "ddim_eta_v": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear",
                                             clip_sample=False, prediction_type="v_prediction"), 8, 0.6),
}


def make_policy(K=3, name="mixed_cond", dtype=F64, horizon=8, strategy="soft"):
    kwargs, override = CONFIGS[name]
    comps = make_unets(K, kwargs, override, dtype=dtype)
    router = fdp.Router(kwargs["global_cond_dim"], K, hidden_dim=8, strategy=strategy)
    return fdp.FactorizedPolicy(comps, router, horizon, kwargs["input_dim"]).to(dtype)


def loop_inputs(policy, schedule, B, dtype=F64):
    """The step table of ``schedule`` and the loop's inputs ``(global_cond, x_T, step_noise)``."""
    factory, n, eta = SCHEDULES[schedule]
    table = factory().step_table(n, eta=eta)
    g = torch.Generator().manual_seed(3)
    gc = torch.randn(B, policy.cond_dim, generator=g, dtype=dtype)
    x_T = torch.randn(B, policy.horizon, policy.action_dim, generator=g, dtype=dtype)
    noise = torch.randn(n, B, policy.horizon, policy.action_dim, generator=g, dtype=dtype)
    return table, (gc, x_T, noise)


def run_both(policy, schedule, B, dtype=F64, **options):
    table, (gc, x_T, noise) = loop_inputs(policy, schedule, B, dtype)
    ref = get_backend("torch").prepare(policy, table, dtype).run(gc, x_T, noise)
    prepared = get_backend("graph").prepare(policy, table, dtype, capture=False, **options)
    return prepared, prepared.run(gc, x_T, noise), ref


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("B", [1, 3])
def test_graph_loop_matches_torch_backend(schedule, B):
    prepared, out, ref = run_both(make_policy(), schedule, B)
    assert prepared.compose == "torch" and not prepared.capture
    assert out.shape == ref.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("strategy", ["hard", "topk", "tanh"])
def test_graph_loop_other_routers(strategy):
    policy = make_policy(K=3, name="2lvl_k3_g4_scale", strategy=strategy)
    if strategy == "tanh":
        signed_tanh_routing(policy)
        w = policy.weights(torch.randn(3, policy.cond_dim, dtype=F64))
        assert (w < 0).any() and ((w.sum(1) - 1).abs() > 0.1).all()
    _, out, ref = run_both(policy, "ddpm_clip", 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def _skip_step(eps, weights, table, step, x, noise=None):
    return x if step == 3 else compose_step_torch(eps, weights, table, step, x, noise)


def _drop_component(eps, weights, table, step, x, noise=None):
    return compose_step_torch(eps, weights * torch.tensor([1.0, 0.0]), table, step, x, noise)


@pytest.mark.parametrize("bug", [None, _skip_step, _drop_component],
                         ids=["correct", "skipped_step", "dropped_component"])
def test_graph_loop_float32(bug, monkeypatch):
    """``bug``: a composition that skips a step or drops a component, which the bound must catch."""
    policy = make_policy(K=2, name="2lvl_k3_g4_scale", dtype=torch.float32)
    if bug is not None:
        monkeypatch.setattr(graph_backend, "compose_step_torch", bug)
    _, out, ref = run_both(policy, "ddim_eta_v", 5, dtype=torch.float32)
    # The fused trunk sums in another order than the components: both float32 loops are held to the float64
    # loop on the same inputs within its derived float32 bound (helpers.torch_loop_bound), not to each other.
    table, loop_in = loop_inputs(policy, "ddim_eta_v", 5, dtype=torch.float32)
    x64, bound = torch_loop_bound(policy, table, *loop_in)
    assert_within_float32_bound(ref, x64, bound, "torch backend")
    if bug is None:
        assert_within_float32_bound(out, x64, bound, "graph backend")
    else:
        with pytest.raises(AssertionError, match="exceeds the derived float32 bound"):
            assert_within_float32_bound(out, x64, bound, "graph backend")


def test_compose_step_torch_is_apply_step_of_the_weighted_sum():
    table = SCHEDULES["ddpm_clip"][0]().step_table(12)
    eps = torch.randn(3, 2, 4, 5, dtype=F64)
    w = torch.softmax(torch.randn(2, 3, dtype=F64), -1)
    x, z = torch.randn(2, 4, 5, dtype=F64), torch.randn(2, 4, 5, dtype=F64)
    m = (w.T[:, :, None, None] * eps).sum(0)
    torch.testing.assert_close(compose_step_torch(eps, w, table, 4, x, z), apply_step(table, 4, x, m, z))


# -- registry ---------------------------------------------------------------------------------------------------


def test_registry_and_cpu_availability():
    assert "graph" in backend_names()
    be = get_backend("graph")
    assert be.priority == 10
    info = available_backends("cpu")["graph"]
    assert not info.available and "CUDA" in info.reason
    policy = make_policy(dtype=torch.float32)
    sched = SCHEDULES["ddpm_clip"][0]()
    assert fdp.Sampler(policy, sched, num_inference_steps=4, backend="auto").backend != "graph"
    with pytest.raises(ValueError, match="graph.*CUDA"):
        fdp.Sampler(policy, sched, num_inference_steps=4, backend="graph")
    with pytest.raises(ValueError, match="CUDA"):
        GraphPrepared(policy, sched.step_table(4), capture=True)


def test_unsupported_policies_say_why():
    from helpers import make_mlp_policy

    be = get_backend("graph")
    table = SCHEDULES["ddpm_clip"][0]().step_table(4)
    assert "MLPDenoiser" in be.unsupported_reason(make_mlp_policy(), table, None)
    local = make_policy(name="3lvl_k5_g8_bias_local")
    assert "local_cond" in be.unsupported_reason(local, table, None)
    assert be.unsupported_reason(make_policy(), table, None) is None
    with pytest.raises(ValueError, match="local_cond"):
        be.prepare(local, table)
    # A horizon the U-Nets cannot halve is refused when the policy is built, before any backend sees it.
    with pytest.raises(ValueError, match=r"`horizon` \(7\) must be divisible by 2 for component 0"):
        make_policy(horizon=7, name="2lvl_k3_g4_scale")


# -- CUDA --------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run_fresh(body: str) -> None:
    """Run the GPU prelude and ``body`` in a new interpreter without TRITON_INTERPRET (kernels compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    code = _GPU_PRELUDE + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


_GPU_PRELUDE = """
import torch, fdp
# cuDNN convolutions default to TF32 on Ampere and later; the comparisons below are about float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
from test_unet_fused import make_policy, SCHEDULES
from fdp.backends import get_backend
from fdp.tolerances import tolerance
F32_TOL = tolerance(torch.float32, torch.float32)  # what backend="auto" verifies the graph backend against torch with

def inputs(policy, n, B, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, policy.horizon, policy.action_dim)
    return (torch.randn(B, policy.cond_dim, generator=g, device="cuda"), torch.randn(shape, generator=g, device="cuda"),
            torch.randn((n, *shape), generator=g, device="cuda"))

def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
"""


@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_backend_matches_torch_and_replays():
    _run_fresh("""
    policy = make_policy(K=4, dtype=torch.float32).cuda()
    for name, (factory, n, eta) in SCHEDULES.items():
        sched = factory()
        ref = fdp.Sampler(policy, sched, n, eta=eta, backend="torch")
        fast = fdp.Sampler(policy, sched, n, eta=eta, backend="graph")
        assert fast._prepared.capture and fast._prepared.compose == "triton", fast._prepared.compose
        for B in (1, 7, 1, 7):   # two batch sizes, each captured once and replayed
            gc, x_T, noise = inputs(policy, n, B, seed=B)
            a = fast(gc, x_T=x_T, step_noise=noise)
            b = ref(gc, x_T=x_T, step_noise=noise)
            assert rel(a, b) < F32_TOL, (name, B, rel(a, b))
        assert len(fast._prepared._call.signatures) == 2
        # New inputs into the same captured graph.
        gc, x_T, noise = inputs(policy, n, 7, seed=99)
        assert rel(fast(gc, x_T=x_T, step_noise=noise), ref(gc, x_T=x_T, step_noise=noise)) < F32_TOL
    assert fdp.Sampler(policy, SCHEDULES["ddpm_clip"][0](), 4, backend="auto").backend == "graph"
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_backend_half_weights():
    _run_fresh("""
    policy = make_policy(K=3, name="2lvl_k3_g4_scale", dtype=torch.float32).cuda()
    factory, n, eta = SCHEDULES["ddim_eta0"]
    ref = fdp.Sampler(policy, factory(), n, eta=eta, backend="torch")
    gc, x_T, noise = inputs(policy, n, 5)
    b = ref(gc, x_T=x_T, step_noise=noise)
    for dtype in (torch.bfloat16, torch.float16):
        fast = fdp.Sampler(policy, factory(), n, eta=eta, backend="graph", dtype=dtype)
        a = fast(gc, x_T=x_T, step_noise=noise)
        assert a.dtype == torch.float32 and rel(a, b) < tolerance(dtype, torch.float32), (dtype, rel(a, b))
    """)


@pytest.mark.gpu
@needs_cuda
def test_gpu_compose_kernel_matches_reference():
    _run_fresh("""
    from fdp_kernels.compose_step import compose_step
    from fdp.backends.graph_backend import compose_step_torch
    from helpers import bound_ratio, step_bound
    d = lambda t: t.double()
    for name, (factory, n, eta) in SCHEDULES.items():
        table = factory().step_table(n, eta=eta)
        dev = table.to("cuda")
        clip = table.clip_range if table.clip_sample else None
        for K, B in ((1, 1), (4, 33), (8, 300)):
            eps = torch.randn(B, K, 2, 16, device="cuda").permute(1, 0, 3, 2)   # strided [K, B, 16, 2]
            w = torch.softmax(torch.randn(B, K, device="cuda"), -1)
            x = torch.randn(B, 16, 2, device="cuda")
            noise = torch.randn(n, B, 16, 2, device="cuda")
            for i in range(n):
                out = compose_step(eps, w, dev.coef, dev.adds_noise, i, x, noise, clip_range=clip)
                # Against the step in float64 with the exact coefficients, elementwise, within the worst-case
                # float32 rounding of this step on these inputs (tests/test_compose_kernel.py checks the bound
                # on the interpreter and that wrong launches exceed it).
                ref = compose_step_torch(d(eps), d(w), table, i, d(x), d(noise[i]))
                ratio = bound_ratio(out, ref, step_bound(table, i, x, eps, w, noise[i]))
                assert ratio <= 1, (name, K, B, i, ratio)
                x = out
    """)
