"""fdp.Sampler as a careful user meets it: a policy that changes after packing, NaN, empty batches,
odd arguments, and the memory step noise takes — on every backend the CPU runs.

``graph`` runs on the CPU without capture (its availability check is patched: the
prepared object is the one CUDA uses, only the graph capture is off), the Triton
backends in the Triton interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdp
from helpers import KERNEL_SCHEDULERS, assert_within_float32_bound, make_mlp_policy, torch_loop_bound
from fdp.backends import get_backend

NAN = float("nan")
BACKENDS = ["torch", "triton", "triton-persistent", "graph", "torch-batched", "onnxruntime"]
TRITON = ("triton", "triton-persistent")
#: Backends that serve float32 but not float64 policies.
NO_FLOAT64 = TRITON + ("torch-batched", "onnxruntime")
UNET_KW = dict(input_dim=3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(8, 16), kernel_size=3,
               n_groups=4, cond_predict_scale=True)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "graph":
        monkeypatch.setattr(type(get_backend("graph")), "unavailable_reason", lambda self, device: None)
    return request.param


def new_component(backend):
    if backend == "graph":
        return fdp.ConditionalUnet1D(**UNET_KW)
    return fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16, num_blocks=2)


def make_policy(backend, K=3, dtype=torch.float32, strategy="soft", seed=0, **router_kw):
    if backend != "graph":
        return make_mlp_policy(K=K, dtype=dtype, strategy=strategy, seed=seed, **router_kw)
    torch.manual_seed(seed)
    comps = [new_component(backend) for _ in range(K)]
    router = fdp.Router(5, K, hidden_dim=8, strategy=strategy, **router_kw)
    policy = fdp.FactorizedPolicy(comps, router, 4, 3).to(dtype)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def make_sampler(policy, backend, sched="ddpm_clip", n=3, **kw):
    factory, eta = KERNEL_SCHEDULERS[sched]
    return fdp.Sampler(policy, factory(), num_inference_steps=n, eta=eta, backend=backend, **kw)


def cond(B=3, dtype=torch.float32):
    return torch.randn(B, 5, generator=torch.Generator().manual_seed(11), dtype=dtype)


def seed():
    return torch.Generator().manual_seed(5)


class OpLog(TorchDispatchMode):
    """Every aten op dispatched inside the block, with its outputs."""

    def __init__(self):
        super().__init__()
        self.ops, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        self.outputs += [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        return out


# ------------------------------------------------------------------------------------------------------------
# 1. A policy that changes after packing


def _train_step(policy, **adam):
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2, **adam)
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(4, policy.horizon, policy.action_dim, generator=g) * 2 - 1
    policy.loss(actions, torch.randn(4, policy.cond_dim, generator=g), generator=g).backward()
    opt.step()


def _scale(policy):
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1)


def _load_other(policy, backend):
    policy.load_state_dict(make_policy(backend, seed=1).state_dict())


def _swap_data(policy):
    for comp in policy.components:
        w = next(comp.parameters())
        w.data = w.data * 1.5  # new storage, version counter untouched


def _scale_conditioning(policy, backend):
    # The layers whose outputs the fused MLP backends compute once per call, from their own packed copy.
    with torch.no_grad():
        for comp in policy.components:
            for name, module in comp.named_modules():
                if name.endswith(("cond_proj", "cond_encoder")):
                    for p in module.parameters():
                        p.mul_(1.5)


MUTATIONS = {
    "in_place": lambda p, be: _scale(p),
    "router_only": lambda p, be: _scale(p.router),
    "conditioning_only": _scale_conditioning,
    "adam_foreach": lambda p, be: _train_step(p, foreach=True),
    "adam_fused": lambda p, be: _train_step(p, fused=True),  # fused optimizers bump no version counter
    "load_state_dict": _load_other,
    "data_swap": lambda p, be: _swap_data(p),
    "strategy": lambda p, be: p.router.set_strategy("topk", topk=2),
    "strategy_tanh": lambda p, be: p.router.set_strategy("tanh"),  # same tensors, signed weights now
    "add_component": lambda p, be: p.add_component(new_component(be), initial_logit=0.0),
    "add_component_copy": lambda p, be: p.add_component(source=1, reset_router=True),  # the authors' adaptation
}


@pytest.mark.parametrize("strategy,kw,change", [
    ("topk", {"topk": 2}, lambda r: r.set_strategy("topk", topk=1)),
    ("fixed", {"fixed_weights": [0.2, 0.3, 0.5]}, lambda r: r.set_strategy("fixed", fixed_weights=[0.6, 0.1, 0.3])),
])
def test_sampler_follows_router_settings_within_a_strategy(backend, strategy, kw, change):
    """The fused MLP backends pack the strategy's settings (top-k size, fixed weights) with the router."""
    policy = make_policy(backend, strategy=strategy, **kw)
    sampler = make_sampler(policy, backend)
    before = sampler(cond(), generator=seed())
    change(policy.router)
    out = sampler(cond(), generator=seed())
    assert not torch.equal(out, before), "the change changed nothing: the test proves nothing"
    torch.testing.assert_close(out, make_sampler(policy, backend)(cond(), generator=seed()), rtol=0, atol=0)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_sampler_follows_the_policy_after_packing(backend, mutation):
    policy = make_policy(backend)
    sampler = make_sampler(policy, backend)
    before = sampler(cond(), generator=seed())
    MUTATIONS[mutation](policy, backend)
    out = sampler(cond(), generator=seed())
    fresh = make_sampler(policy, backend)(cond(), generator=seed())
    assert not torch.equal(out, before), "the mutation changed nothing: the test proves nothing"
    torch.testing.assert_close(out, fresh, rtol=0, atol=0)


def test_dtype_change_after_packing(backend):
    # Followed where the backend serves the new dtype (the weight dtype follows the policy's unless given) ...
    policy = make_policy(backend)
    sampler = make_sampler(policy, backend)
    sampler(cond())
    policy.double()
    if backend in NO_FLOAT64:
        # ... else a clear error that says why, on this call and the next.
        for _ in range(2):
            with pytest.raises(ValueError, match=f"backend '{backend}' cannot serve it now.*float64"):
                sampler(cond(dtype=torch.float64))
        return
    out = sampler(cond(dtype=torch.float64), generator=seed())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, make_sampler(policy, backend)(cond(dtype=torch.float64), generator=seed()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", TRITON)
def test_given_weight_dtype_stays_when_the_policy_changes_dtype(name):
    policy = make_policy(name)
    sampler = make_sampler(policy, name, dtype="float32")
    sampler(cond())
    policy.double()
    out = sampler(cond(dtype=torch.float64), generator=seed())
    assert sampler.dtype == torch.float32 and out.dtype == torch.float64
    torch.testing.assert_close(out, make_sampler(policy, name, dtype=torch.float32)(cond(dtype=torch.float64),
                                                                                     generator=seed()), rtol=0, atol=0)


@pytest.mark.parametrize("name", TRITON)
def test_a_policy_the_backend_cannot_serve_any_more_is_refused(name):
    policy = make_policy(name, K=8)
    sampler = make_sampler(policy, name)
    policy.add_component(new_component(name))
    for _ in range(2):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot serve it now.*at most 8 components"):
            sampler(cond())


def test_writes_through_data_need_repack(backend):
    policy = make_policy(backend)
    sampler = make_sampler(policy, backend)
    sampler(cond())
    with torch.no_grad():
        for p in policy.parameters():
            p.data.mul_(1.1)  # bypasses the version counter: documented, repack() is the way
    sampler.repack()
    torch.testing.assert_close(sampler(cond(), generator=seed()),
                               make_sampler(policy, backend)(cond(), generator=seed()), rtol=0, atol=0)


def test_freshness_check_reads_nothing_and_repacks_only_on_change():
    policy = make_policy("triton")
    sampler = make_sampler(policy, "triton")
    prepared = sampler._prepared
    torch.nn.Linear(3, 3)  # unrelated registrations elsewhere in the process
    with OpLog() as log:
        sampler._ensure_fresh()
    assert log.ops == []  # not one tensor op, so no device read
    sampler(cond())
    assert sampler._prepared is prepared
    _scale(policy)
    sampler(cond())
    assert sampler._prepared is not prepared


def test_watch_policy_false_never_checks_and_repack_still_updates():
    policy = make_policy("triton")
    sampler = make_sampler(policy, "triton", watch_policy=False)
    sampler(cond())
    prepared = sampler._prepared
    _scale(policy)
    assert sampler._watch.changed()  # the change is there to see; the sampler does not look
    fresh = make_sampler(policy, "triton")(cond(), generator=seed())
    assert not torch.equal(sampler(cond(), generator=seed()), fresh)  # still the packed (old) weights
    assert sampler._prepared is prepared
    sampler.repack()
    torch.testing.assert_close(sampler(cond(), generator=seed()), fresh, rtol=0, atol=0)
    with pytest.raises(TypeError, match="watch_policy"):
        make_sampler(policy, "triton", watch_policy="no")


def test_torch_backend_reads_live_weights_and_repacks_only_for_dtype_device_or_structure():
    # The torch backend packs no copy: a weight update or a new component needs no repack (its watch
    # reads one parameter, whatever the model's size), a new dtype does (the call's sample dtype follows).
    policy = make_policy("torch")
    sampler = make_sampler(policy, "torch")
    prepared = sampler._prepared
    assert len(sampler._watch._names) == 1
    _train_step(policy, fused=True)
    _scale(policy)
    out = sampler(cond(), generator=seed())
    assert sampler._prepared is prepared
    torch.testing.assert_close(out, make_sampler(policy, "torch")(cond(), generator=seed()), rtol=0, atol=0)
    policy.double()
    assert sampler(cond(dtype=torch.float64)).dtype == torch.float64 and sampler._prepared is not prepared
    policy.add_component(new_component("torch").double(), initial_logit=0.0)
    torch.testing.assert_close(sampler(cond(dtype=torch.float64), generator=seed()),
                               make_sampler(policy, "torch")(cond(dtype=torch.float64), generator=seed()),
                               rtol=0, atol=0)


def test_policy_watch_sees_what_bypasses_the_hooks():
    from fdp._watch import PolicyWatch

    policy = make_policy("torch")
    watch = PolicyWatch(policy)
    assert not watch.changed()
    out = policy.components[0].out
    out._parameters["weight"] = torch.nn.Parameter(out.weight.detach().clone())  # no registration hook runs
    assert watch.changed()
    watch.reset()
    del out._parameters["bias"]
    assert watch.changed()


def test_policy_watch_with_inference_tensors():
    from fdp._watch import PolicyWatch

    with torch.inference_mode():
        policy = make_policy("torch")
    watch = PolicyWatch(policy)
    assert not watch.changed()
    policy.components[0].out.weight.data = torch.zeros(12, 16)
    assert watch.changed()


# ------------------------------------------------------------------------------------------------------------
# 2. NaN


@pytest.mark.parametrize("strategy", ["soft", "hard", "topk"])
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_router_weights_give_nan_actions(name, strategy, monkeypatch):
    if name == "graph":
        monkeypatch.setattr(type(get_backend("graph")), "unavailable_reason", lambda self, device: None)
    policy = make_policy(name, strategy=strategy, topk=2)
    with torch.no_grad():
        policy.router.net[2].bias[1] = NAN
    out = make_sampler(policy, name)(cond(), generator=seed())
    assert torch.isnan(out).all()


@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim_eta"])  # a NaN through the clamp, and unclipped
def test_nan_component_output_gives_nan_actions(backend, sched):
    policy = make_policy(backend)
    with torch.no_grad():
        next(policy.components[1].parameters()).fill_(NAN)
    out = make_sampler(policy, backend, sched=sched)(cond(), generator=seed())
    assert torch.isnan(out).all()


def test_component_with_zero_weight_is_left_out(backend):
    policy = make_policy(backend, strategy="fixed", fixed_weights=[0.6, 0.0, 0.4])
    expect = make_sampler(policy, backend)(cond(), generator=seed())
    with torch.no_grad():
        for p in policy.components[1].parameters():
            p.fill_(NAN)
    out = make_sampler(policy, backend)(cond(), generator=seed())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def _rows_split_by_hard_routing(name):
    policy = make_policy(name, strategy="hard")
    with torch.no_grad():
        policy.router.net[2].weight.mul_(30)
        for p in policy.components[1].parameters():
            p.fill_(NAN)
    pool = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    picks = policy.weights(pool)[:, 1] != 0
    on, off = torch.nonzero(picks).flatten()[:3], torch.nonzero(~picks).flatten()[:3]
    assert len(on) and len(off), "the routing must split the batch"
    c = pool[torch.stack([off, on], dim=1).flatten()] if len(on) == len(off) else pool[torch.cat([off, on])]
    return policy, c, policy.weights(c)[:, 1] != 0


@pytest.mark.parametrize("name", BACKENDS)
def test_rows_that_do_not_use_a_nan_component_stay_finite(name, monkeypatch):
    # Rows of one kernel tile routed to different components: a zero weight must leave a component out
    # per row, not only when no row of the tile uses it.
    if name == "graph":
        monkeypatch.setattr(type(get_backend("graph")), "unavailable_reason", lambda self, device: None)
    policy, c, uses_nan = _rows_split_by_hard_routing(name)
    out = make_sampler(policy, name)(c, generator=seed())
    assert torch.isnan(out[uses_nan]).all() and torch.isfinite(out[~uses_nan]).all()


@pytest.mark.parametrize("compose", ["torch", "triton"])
def test_graph_composition_leaves_zero_weight_components_out(compose):
    # The compose kernel is what backend="graph" runs on CUDA; here in the Triton interpreter.
    policy = make_policy("graph", strategy="fixed", fixed_weights=[0.6, 0.0, 0.4])
    table = KERNEL_SCHEDULERS["ddim"][0]().step_table(3)
    x_T = torch.randn(3, 4, 3, generator=seed())
    expect = get_backend("torch").prepare(policy, table).run(cond(), x_T, None)
    # The fused trunk and the compose step sum in other orders than the torch loop: both float32 results are
    # held to the float64 loop (before the NaNs) within its derived float32 bound (helpers.torch_loop_bound).
    x64, bound = torch_loop_bound(policy, table, cond(), x_T)
    assert_within_float32_bound(expect, x64, bound, "torch backend")
    with torch.no_grad():
        for p in policy.components[1].parameters():
            p.fill_(NAN)
    prepared = get_backend("graph").prepare(policy, table, capture=False, compose=compose)
    assert prepared.compose == compose
    assert_within_float32_bound(prepared.run(cond(), x_T, None), x64, bound, f"graph backend, compose={compose}")


def test_policy_forward_leaves_zero_weight_components_out():
    policy = make_policy("torch", strategy="fixed", fixed_weights=[0.6, 0.0, 0.4])
    x, c = torch.randn(3, 4, 3), cond()
    expect = policy(x, 7, global_cond=c)
    with torch.no_grad():
        for p in policy.components[1].parameters():
            p.fill_(NAN)
    torch.testing.assert_close(policy(x, 7, global_cond=c), expect, rtol=0, atol=0)
    w = torch.tensor([[0.5, NAN, 0.5]] * 3)
    assert torch.isnan(policy(x, 7, global_cond=c, weights=w)).all()


def test_nan_step_noise_is_refused(backend):
    policy = make_policy(backend)
    sampler = make_sampler(policy, backend, sched="ddpm_clip", n=4)
    x_T, noise = sampler.noise(2, seed())
    bad = noise.clone()
    bad[1, 0, 2, 1] = NAN
    with pytest.raises(ValueError, match="step_noise.*finite"):
        sampler(cond(2), x_T=x_T, step_noise=bad)
    # DDPM's last step (t = 0) adds no noise and ignores its slice, whatever it holds.
    ignored = noise.clone()
    ignored[-1] = NAN
    torch.testing.assert_close(sampler(cond(2), x_T=x_T, step_noise=ignored), sampler(cond(2), x_T=x_T,
                                                                                         step_noise=noise))


# ------------------------------------------------------------------------------------------------------------
# 3. Empty batches


def test_empty_batch_gives_empty_actions(backend):
    policy = make_policy(backend)
    for sched in ("ddpm_clip", "ddim"):
        sampler = make_sampler(policy, backend, sched=sched)
        for kw in ({}, {"generator": seed()}, {"x_T": torch.empty(0, 4, 3)}):
            out = sampler(cond(0), **kw)
            assert out.shape == (0, 4, 3) and out.dtype == torch.float32, kw
    sampler = make_sampler(policy, backend, sched="ddpm_clip")
    out = sampler(cond(0), x_T=torch.empty(0, 4, 3), step_noise=torch.empty(sampler.num_steps, 0, 4, 3))
    assert out.shape == (0, 4, 3)


def test_policy_with_an_empty_batch():
    policy = make_policy("torch")
    eps = policy(torch.empty(0, 4, 3), 5, global_cond=cond(0))
    assert eps.shape == (0, 4, 3)
    with pytest.raises(ValueError, match="actions"):
        policy.loss(torch.empty(0, 4, 3), cond(0))


# ------------------------------------------------------------------------------------------------------------
# 4. Arguments


@pytest.mark.parametrize("eta", [1.5, -0.5])
def test_sampler_refuses_eta_outside_unit_interval(eta):
    with pytest.raises(ValueError, match="eta"):
        fdp.Sampler(make_policy("torch"), fdp.DDIMScheduler(num_train_timesteps=100), 5, eta=eta)
    with pytest.raises(TypeError, match="eta"):  # a wrong type: TypeError, as every check of _validation
        fdp.Sampler(make_policy("torch"), fdp.DDIMScheduler(num_train_timesteps=100), 5, eta="0.5")


@pytest.mark.parametrize("given,expect", [
    ("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
    ("fp16", torch.float16), ("half", torch.float16), ("torch.float16", torch.float16),
    (torch.bfloat16, torch.bfloat16),
])
def test_sampler_dtype_names(given, expect):
    sampler = make_sampler(make_policy("triton"), "triton", dtype=given)
    assert sampler.dtype == expect
    assert sampler._prepared.packed.dtype == expect
    assert sampler(cond()).dtype == torch.float32


@pytest.mark.parametrize("given,exc", [(torch.int32, TypeError), (torch.bool, TypeError), ("int8", ValueError),
                                       ("f32x", ValueError), (32, TypeError)])
def test_sampler_refuses_non_floating_dtypes(given, exc):
    with pytest.raises(exc, match="`dtype`"):
        make_sampler(make_policy("torch"), "torch", dtype=given)


def test_num_inference_steps_takes_numpy_integers():
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    sampler = fdp.Sampler(make_policy("torch"), sched, num_inference_steps=np.int64(5))
    assert sampler.num_steps == 5 and type(sampler.num_inference_steps) is int
    with pytest.raises(TypeError, match="num_inference_steps"):
        fdp.Sampler(make_policy("torch"), sched, num_inference_steps=5.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        fdp.Sampler(make_policy("torch"), sched, num_inference_steps=np.int32(0))


# ------------------------------------------------------------------------------------------------------------
# 5. Step noise memory


@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim_eta"])
def test_torch_backend_draws_step_noise_step_by_step(sched):
    policy = make_policy("torch")
    n, B = 100, 64
    sampler = make_sampler(policy, "torch", sched=sched, n=n)
    whole = n * B * policy.horizon * policy.action_dim
    with OpLog() as log:
        out = sampler(cond(B), generator=seed())
    # The model's own largest tensors hold a few rows' activations, far less than all steps' noise.
    biggest = max(t.numel() for t in log.outputs)
    assert biggest * 4 < whole, f"a tensor of {biggest} elements: the step noise of all {n} steps was drawn at once"
    # The same numbers as the materialised draws (and so as the diffusers loop, tests/test_sampler.py).
    x_T, step_noise = sampler.noise(B, seed())
    assert torch.equal(out, sampler(cond(B), x_T=x_T, step_noise=step_noise))


@pytest.mark.parametrize("name", TRITON)
def test_fused_backends_draw_the_same_noise_up_front(name):
    sampler = make_sampler(make_policy(name), name, sched="ddim_eta", n=3)
    x_T, step_noise = sampler.noise(3, seed())
    assert torch.equal(sampler(cond(), generator=seed()), sampler(cond(), x_T=x_T, step_noise=step_noise))


def test_step_noise_is_drawn_in_step_order():
    from fdp.sampler import _StepNoise

    source = _StepNoise((True, False, True), (2, 3), torch.Generator().manual_seed(0), torch.device("cpu"),
                        torch.float32)
    assert source[0].shape == (2, 3)
    with pytest.raises(IndexError, match="step order"):
        source[2]
    assert source[1] is None and source[2].shape == (2, 3)


def test_explicit_step_noise_in_another_float_dtype_is_cast():
    policy = make_policy("torch")
    sampler = make_sampler(policy, "torch", sched="ddim_eta", n=4)
    x_T, noise = sampler.noise(2, seed())
    a = sampler(cond(2), x_T=x_T, step_noise=noise)
    assert torch.equal(a, sampler(cond(2), x_T=x_T, step_noise=noise.double()))
    assert torch.equal(a, sampler(cond(2), generator=seed()))
