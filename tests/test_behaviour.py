"""Behaviour a user relies on, each with a test that fails when it breaks (issue 28).

Each section names the module it holds to; scripts/mutation_check.py runs this file with the module's own
test file. Among what these tests kill: 12 plausible bugs that survived the module tests before (adapt not
unfreezing the router, freeze_components(frozen=False) not unfreezing, Router.add_output not growing
fixed_weights, the selection cache key or the policy watch forgetting strategy/topk, a LeRobot config field
not reaching the scheduler, Sampler(num_inference_steps=None) ignoring set_timesteps, export leaving the
policy in eval mode).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import fdp
from fdp._watch import PolicyWatch
from fdp.backends.selection import _cache_key, policy_signature
from fdp.policy import ADAPT_MODES, ADAPT_START_LOGIT
from fdp.router import NEW_COMPONENT_LOGIT
from helpers import make_mlp_policy

# -- policy.py: adaptation modes and freezing ------------------------------------------------------------------


def _policy_with_new_component():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    new = fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16, num_blocks=2)
    idx = policy.add_component(new)
    return policy, idx


def _trains(module):
    flags = {p.requires_grad for p in module.parameters()}
    assert len(flags) == 1, "a module is partly frozen"
    return flags.pop()


# What each mode trains: (router, old components, new component).
ADAPT_TRAINS = {"router": (True, False, False), "router+new": (True, False, True), "full": (True, True, True)}


def test_adapt_modes_are_the_documented_ones():
    assert set(ADAPT_MODES) == set(ADAPT_TRAINS)


@pytest.mark.parametrize("start_frozen", [True, False])
@pytest.mark.parametrize("mode", list(ADAPT_TRAINS))
def test_adapt_sets_exactly_what_trains(mode, start_frozen):
    policy, new = _policy_with_new_component()
    # Whatever trained before: everything frozen, or everything training.
    policy.requires_grad_(not start_frozen)
    params = policy.adapt(mode)
    router, old, new_trains = ADAPT_TRAINS[mode]
    assert _trains(policy.router) is router
    for i, comp in enumerate(policy.components):
        assert _trains(comp) is (new_trains if i == new else old), (mode, i)
    # The returned list is exactly the training parameters, each once.
    want = [p for p in policy.parameters() if p.requires_grad]
    assert len(params) == len(want) and {id(p) for p in params} == {id(p) for p in want}


@pytest.mark.parametrize("mode", list(ADAPT_TRAINS))
def test_adapt_lifts_a_new_components_logit_once(mode):
    policy, new = _policy_with_new_component()
    bias = policy.router.net[2].bias
    assert float(bias[new]) == NEW_COMPONENT_LOGIT
    old_bias = bias[:new].detach().clone()
    policy.adapt(mode)
    bias = policy.router.net[2].bias
    want = NEW_COMPONENT_LOGIT if mode == "router" else ADAPT_START_LOGIT
    assert float(bias[new]) == want
    assert torch.equal(bias[:new].detach(), old_bias)
    with torch.no_grad():
        bias[new] = 1.5  # trained meanwhile: a second adapt leaves it
    policy.adapt("full")
    assert float(policy.router.net[2].bias[new]) == (1.5 if mode != "router" else ADAPT_START_LOGIT)


def test_adapt_leaves_a_chosen_initial_logit():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    idx = policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16), initial_logit=-3.0)
    policy.adapt("router+new", start_logit=-1.0)
    assert float(policy.router.net[2].bias[idx]) == -3.0


def test_adapt_start_logit_is_used():
    policy, new = _policy_with_new_component()
    policy.adapt("router+new", start_logit=-2.5)
    assert float(policy.router.net[2].bias[new]) == -2.5


def test_freeze_components_freezes_and_unfreezes_exactly_the_given_ones():
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    policy.freeze_components([0, 2])
    assert [_trains(c) for c in policy.components] == [False, True, False]
    assert _trains(policy.router)  # the router is not a component
    policy.freeze_components([2], frozen=False)
    assert [_trains(c) for c in policy.components] == [False, True, True]
    policy.freeze_components([-3], frozen=False)  # negative indices count from the end
    assert [_trains(c) for c in policy.components] == [True, True, True]
    policy.freeze_components()
    assert [_trains(c) for c in policy.components] == [False, False, False]
    policy.freeze_components(frozen=False)
    assert [_trains(c) for c in policy.components] == [True, True, True]
    for bad in (3, -4, "0", 1.0):
        with pytest.raises(ValueError, match="indices"):
            policy.freeze_components([bad])


def test_default_noise_scheduler_is_the_documented_one():
    """The paper's DDPM: 100 steps, squaredcos_cap_v2, clipped, epsilon prediction (FactorizedPolicy's docs)."""
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    comps = list(policy.components)
    sched = fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 4, 3).noise_scheduler
    assert isinstance(sched, fdp.DDPMScheduler)
    cfg = sched.config
    assert (cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["clip_sample"], cfg["prediction_type"]) == (
        100, "squaredcos_cap_v2", True, "epsilon")
    assert torch.equal(sched.alphas_cumprod, fdp.DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").alphas_cumprod)


# -- router.py: growing and fixed weights ----------------------------------------------------------------------


def test_add_output_grows_fixed_weights_and_keeps_the_others():
    router = fdp.Router(5, 3, hidden_dim=8, strategy="fixed", fixed_weights=[0.2, 0.3, 0.5])
    cond = torch.randn(4, 5)
    before_logits = router.logits(cond).detach()
    router.add_output()
    assert router.num_components == 4
    assert router.fixed_weights.tolist() == pytest.approx([0.2, 0.3, 0.5, 0.0])
    w = router(cond)
    assert w.shape == (4, 4) and torch.allclose(w, torch.tensor([0.2, 0.3, 0.5, 0.0]).expand(4, 4))
    logits = router.logits(cond).detach()
    assert torch.equal(logits[:, :3], before_logits) and bool((logits[:, 3] == NEW_COMPONENT_LOGIT).all())
    router.add_output(initial_logit=-1.0)
    assert float(router.logits(cond)[0, 4]) == -1.0 and router.fixed_weights.shape == (5,)


def test_router_refuses_bad_topk_and_fixed_weights():
    for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="topk"):
            fdp.Router(5, 3, strategy="topk", topk=bad)
    with pytest.raises(ValueError, match="topk"):
        fdp.Router(5, 3, strategy="topk", topk=4)
    # Sums to 1 within float rounding of the user's numbers (1e-5), not beyond.
    fdp.Router(5, 2, strategy="fixed", fixed_weights=[0.5, 0.5 + 1e-6])
    with pytest.raises(ValueError, match="sum to 1"):
        fdp.Router(5, 2, strategy="fixed", fixed_weights=[0.5, 0.5 + 1.5e-5])
    with pytest.raises(ValueError, match="non-negative"):
        fdp.Router(5, 2, strategy="fixed", fixed_weights=[1.5, -0.5])


def test_add_output_keeps_trainability():
    router = fdp.Router(5, 2, hidden_dim=8)
    router.net[2].requires_grad_(False)
    router.add_output()
    assert not router.net[2].weight.requires_grad and not router.net[2].bias.requires_grad
    router = fdp.Router(5, 2, hidden_dim=8)
    router.add_output()
    assert router.net[2].weight.requires_grad and router.net[2].bias.requires_grad


# -- backends/selection.py: every field of the cache key ------------------------------------------------------


def _key(policy, table=None, device=torch.device("cpu"), dtype=torch.float32, batch_size=1, ranked=()):
    table = table if table is not None else fdp.DDIMScheduler(num_train_timesteps=50).step_table(5)
    return _cache_key(policy, table, device, dtype, batch_size, list(ranked))


def test_selection_cache_key_changes_with_every_input():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    base = _key(policy)
    assert _key(policy) == base  # deterministic
    sched = fdp.DDIMScheduler(num_train_timesteps=50)
    variants = {
        "strategy": lambda p: p.router.set_strategy("hard"),
        "topk": lambda p: p.router.set_strategy("soft", topk=1),
        "horizon": lambda p: setattr(p, "horizon", p.horizon + 1),
        "action_dim": lambda p: setattr(p, "action_dim", p.action_dim + 1),
        "module": lambda p: p.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16)),
        "shape": lambda p: setattr(p.router.net[0], "weight", torch.nn.Parameter(torch.zeros(9, 5))),
    }
    for name, change in variants.items():
        other = make_mlp_policy(K=2, dtype=torch.float32)
        change(other)
        assert _key(other)["policy"] != base["policy"], name
    assert _key(policy.double())["policy_dtype"] != base["policy_dtype"]
    policy.float()
    assert _key(policy, dtype=torch.bfloat16)["dtype"] != base["dtype"]
    assert _key(policy, batch_size=4)["batch_size"] != base["batch_size"]
    assert _key(policy, table=sched.step_table(6))["table"] != base["table"]
    assert _key(policy, table=sched.step_table(5, eta=0.5))["table"] != base["table"]
    clipped = fdp.DDIMScheduler(num_train_timesteps=50, clip_sample=False).step_table(5)
    assert _key(policy, table=clipped)["table"] != base["table"]
    be = fdp.backends.get_backend("torch")
    assert _key(policy, ranked=[be])["candidates"] != base["candidates"]


def test_selection_cache_key_changes_with_every_environment_field(monkeypatch):
    """Device name, driver, CUDA, torch, Triton and fdp versions, and the cache format: each is in the key."""
    import fdp.backends.selection as selection

    policy = make_mlp_policy(K=2, dtype=torch.float32)
    monkeypatch.setattr(selection, "_device_versions", lambda device: ("GPU A", "driver 1"))
    base = _key(policy)
    edits = {
        "device": lambda m: m.setattr(selection, "_device_versions", lambda device: ("GPU B", "driver 1")),
        "driver": lambda m: m.setattr(selection, "_device_versions", lambda device: ("GPU A", "driver 2")),
        "cuda": lambda m: m.setattr(torch.version, "cuda", "99.9"),
        "torch": lambda m: m.setattr(torch, "__version__", "0.0.1"),
        "triton": lambda m: m.setattr(selection, "_version", lambda dist: "0.0.1-" + dist),
        "fdp": lambda m: m.setattr(fdp, "__version__", "0.0.1"),
        "format": lambda m: m.setattr(selection, "CACHE_FORMAT", selection.CACHE_FORMAT + 1),
    }
    for field, edit in edits.items():
        with monkeypatch.context() as m:
            edit(m)
            assert _key(policy)[field] != base[field], field
        assert _key(policy) == base, field


def test_auto_on_the_cpu_samples_with_the_reference(tmp_path, monkeypatch):
    """backend='auto' with no other candidate here: the torch reference, ready to sample."""
    from fdp.backends import DISABLE_ENV
    from fdp.backends.selection import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(DISABLE_ENV, "onnxruntime,torch-batched")  # the CPU candidates besides the reference
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDIMScheduler(num_train_timesteps=20)
    s = fdp.Sampler(policy, sched, num_inference_steps=3)
    assert s.backend == "torch" and s.selection.backend == "torch" and s.selection.requested == "auto"
    cond, x_T = torch.randn(2, 5), torch.randn(2, 4, 3)
    ref = fdp.Sampler(policy, sched, num_inference_steps=3, backend="torch")
    assert torch.equal(s(cond, x_T=x_T), ref(cond, x_T=x_T))
    assert {c.name: c for c in s.selection.candidates}["torch"].status == "picked"


def test_policy_signature_routing_fields():
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    sig = policy_signature(policy)
    policy.router.set_strategy("topk", topk=2)
    top2 = policy_signature(policy)
    policy.router.set_strategy("topk", topk=3)
    assert len({json.dumps(s) for s in (sig, top2, policy_signature(policy))}) == 3


# -- _watch.py: every field of the policy watch ---------------------------------------------------------------


def test_policy_watch_sees_every_watched_change():
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    changes = {
        "strategy": lambda p: p.router.set_strategy("hard"),
        "topk": lambda p: p.router.set_strategy("soft", topk=1),
        "in-place weight": lambda p: p.components[0].out.bias.add_(1.0),
        "replaced parameter": lambda p: setattr(p.components[1].out, "bias", torch.nn.Parameter(torch.zeros(12))),
        "buffer": lambda p: p.router.fixed_weights.add_(0.0),
        "dtype": lambda p: p.double(),
        "deleted": lambda p: delattr(p.components[2].out, "bias"),
    }
    for name, change in changes.items():
        p = make_mlp_policy(K=3, dtype=torch.float32)
        watch = PolicyWatch(p)
        assert not watch.changed(), name
        with torch.no_grad():
            change(p)
        assert watch.changed(), name
        watch.reset()
        assert not watch.changed(), name
    watch = PolicyWatch(policy)
    policy.router.set_strategy("soft")  # the same strategy and topk: no change
    assert not watch.changed()


def test_policy_watch_sees_a_module_replaced_by_one_sharing_its_tensors():
    """The same parameters in a new module (e.g. a wrapper that computes something else) is a change for a
    backend that packed the policy (the torch backend, weights=False, calls the live modules anyway)."""

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    policy = make_mlp_policy(K=2, dtype=torch.float32)
    watch = PolicyWatch(policy)
    old = policy.components[0].out
    new = Doubled(old.in_features, old.out_features)
    new.weight, new.bias = old.weight, old.bias
    policy.components[0].out = new
    assert watch.changed()


def test_fused_optimizer_steps_count_for_the_weight_watch_only():
    """A fused optimizer step updates parameters without bumping versions: the full watch must see it; the
    torch backend's watch (weights=False, live weights) must not repack for it."""
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    full, live = PolicyWatch(policy), PolicyWatch(policy, weights=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, fused=True)
    policy.components[0].out.bias.sum().backward()
    opt.step()
    assert full.changed() and not live.changed()


def test_policy_watch_without_weights_ignores_updates_but_not_structure():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    watch = PolicyWatch(policy, weights=False)
    with torch.no_grad():
        policy.components[0].out.bias.add_(1.0)
    assert not watch.changed()
    policy.double()
    assert watch.changed()


# -- sampler.py: steps from the scheduler ---------------------------------------------------------------------


def test_sampler_steps_none_follows_set_timesteps():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDIMScheduler(num_train_timesteps=40)
    assert fdp.Sampler(policy, sched, num_inference_steps=None, backend="torch").num_steps == 40
    sched.set_timesteps(7)
    s = fdp.Sampler(policy, sched, num_inference_steps=None, backend="torch")
    assert s.num_steps == 7 and s.table.timesteps.tolist() == sched.timesteps.tolist()
    assert fdp.Sampler(policy, sched, num_inference_steps=3, backend="torch").num_steps == 3


def test_sampler_noise_is_drawn_in_the_policys_dtype():
    policy = make_mlp_policy(K=2, dtype=torch.float64)
    s = fdp.Sampler(policy, fdp.DDPMScheduler(num_train_timesteps=20), num_inference_steps=3, backend="torch")
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    assert x_T.dtype == noise.dtype == torch.float64
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0), dtype=torch.float32)
    assert x_T.dtype == noise.dtype == torch.float32


@pytest.mark.parametrize("check_inputs", [True, False])
def test_sampler_checks_step_noise_of_the_steps_that_add_noise(check_inputs):
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    s = fdp.Sampler(policy, fdp.DDPMScheduler(num_train_timesteps=20), num_inference_steps=3, backend="torch",
                    check_inputs=check_inputs)
    cond = torch.randn(2, 5)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(0))
    last = noise.clone()
    last[-1] = float("nan")  # DDPM's last step adds no noise: its slice is ignored
    assert torch.isfinite(s(cond, x_T=x_T, step_noise=last)).all()
    first = noise.clone()
    first[0, 1, 2, 0] = float("nan")
    if check_inputs:
        with pytest.raises(ValueError, match="step_noise"):
            s(cond, x_T=x_T, step_noise=first)
    else:
        assert torch.isnan(s(cond, x_T=x_T, step_noise=first)).any()


# -- integrations/lerobot.py: every field fdp reads from LeRobot's config.json --------------------------------

LEROBOT = Path(__file__).parent / "data" / "lerobot"


def _lerobot_with(tmp_path, name, **fields):
    dst = tmp_path / name
    shutil.copytree(LEROBOT / name, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    from fdp.integrations import lerobot

    return lerobot.load_pretrained(dst, device="cpu", backend="torch")


# field -> (new value, what the sampler must show); the fixture's values differ from every new value.
LEROBOT_SCHEDULER_FIELDS = {
    "num_train_timesteps": 60,
    "beta_start": 0.0002,
    "beta_end": 0.03,
    "beta_schedule": "linear",
    "clip_sample": False,
    "clip_sample_range": 2.0,
    "prediction_type": "epsilon",
}


@pytest.mark.parametrize("field", list(LEROBOT_SCHEDULER_FIELDS))
def test_lerobot_scheduler_fields_reach_the_scheduler(tmp_path, field):
    pytest.importorskip("safetensors")
    value = LEROBOT_SCHEDULER_FIELDS[field]
    base = json.loads((LEROBOT / "ddim_film_3stage" / "config.json").read_text())
    assert base[field] != value
    sampler = _lerobot_with(tmp_path, "ddim_film_3stage", **{field: value})
    assert sampler.scheduler.config[field] == value
    # ... and the coefficients the sampler runs (num_train_timesteps, betas, prediction type, clipping).
    ref = fdp.DDIMScheduler(**{k: (value if k == field else base[k]) for k in LEROBOT_SCHEDULER_FIELDS})
    want = ref.step_table(base["num_inference_steps"])
    assert torch.equal(sampler.table.coef, want.coef) and sampler.table.clip_sample == want.clip_sample
    assert sampler.table.clip_range == want.clip_range


def test_lerobot_structure_fields_reach_the_sampler(tmp_path):
    pytest.importorskip("safetensors")
    s = _lerobot_with(tmp_path / "a", "ddim_film_3stage", horizon=8, num_inference_steps=3, n_groups=8)
    assert s.policy.horizon == 8 and s.num_steps == 3 and s.policy.components[0].n_groups == 8
    s = _lerobot_with(tmp_path / "b", "ddim_film_3stage", num_inference_steps=None)
    assert s.num_steps == 100  # null: the training steps
    s = _lerobot_with(tmp_path / "c", "ddim_film_3stage", noise_scheduler_type="DDPM")
    assert isinstance(s.scheduler, fdp.DDPMScheduler)


# -- export.py: the caller's train/eval mode is restored --------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_export_restores_the_policys_mode(tmp_path, training):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fdp import export

    policy = make_mlp_policy(K=2, dtype=torch.float32)
    policy.train(training)
    policy.components[1].train(not training)  # a mixed state comes back as it was
    modes = [m.training for m in policy.modules()]
    seen = []
    policy.router.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=20), num_inference_steps=2, backend="torch")
    export.onnx(sampler, tmp_path / "p.onnx")
    assert [m.training for m in policy.modules()] == modes
    assert seen and not seen[0]  # traced in eval mode
