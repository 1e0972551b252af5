"""``fdp.integrations.diffusion_policy.accelerate`` on a duck-typed stand-in of Chi et al.'s U-Net policies."""

import copy
import logging

import pytest
import torch
from torch import nn

import fdp
from fdp.integrations import diffusion_policy
from helpers import assert_within_float32_bound, float32_loop_bound

diffusers = pytest.importorskip("diffusers")

ACTION_DIM, OBS_DIM, HORIZON = 3, 4, 8


class _ForeignUnet(nn.Module):
    """A U-Net that is not an fdp.ConditionalUnet1D but has diffusion_policy's parameter names (fdp's)."""

    def __init__(self, input_dim, global_cond_dim, local_cond_dim=None, cond_predict_scale=True):
        super().__init__()
        torch.manual_seed(0)
        impl = fdp.ConditionalUnet1D(input_dim, local_cond_dim=local_cond_dim, global_cond_dim=global_cond_dim,
                                     diffusion_step_embed_dim=8, down_dims=(8, 16), n_groups=4,
                                     cond_predict_scale=cond_predict_scale)
        with torch.no_grad():
            for p in impl.parameters():
                p.add_(0.05 * torch.randn_like(p))
        for name, child in impl.named_children():
            self.add_module(name, child)
        self._impl = [impl]  # not a submodule: its parameters are this module's children's

    def forward(self, sample, timestep, local_cond=None, global_cond=None, **kwargs):
        return self._impl[0](sample, timestep, local_cond=local_cond, global_cond=global_cond)


class _StandInPolicy:
    """DiffusionUnetLowdimPolicy / DiffusionUnetHybridImagePolicy as far as sampling goes: the same
    conditional_sample signature and loop (inpainting each step), diffusers' scheduler."""

    def __init__(self, scheduler="ddpm", num_inference_steps=6, **unet_kw):
        self.model = _ForeignUnet(ACTION_DIM, OBS_DIM, **unet_kw)
        cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[scheduler]
        self.noise_scheduler = cls(num_train_timesteps=40, beta_schedule="squaredcos_cap_v2", clip_sample=True)
        self.num_inference_steps = num_inference_steps

    @torch.no_grad()
    def conditional_sample(self, condition_data, condition_mask, local_cond=None, global_cond=None,
                           generator=None, **kwargs):
        trajectory = torch.randn(size=condition_data.shape, dtype=condition_data.dtype,
                                 device=condition_data.device, generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            trajectory[condition_mask] = condition_data[condition_mask]
            out = self.model(trajectory, t, local_cond=local_cond, global_cond=global_cond)
            trajectory = self.noise_scheduler.step(out, t, trajectory, generator=generator, **kwargs).prev_sample
        trajectory[condition_mask] = condition_data[condition_mask]
        return trajectory


def _inputs(batch=3, horizon=HORIZON):
    data = torch.zeros(batch, horizon, ACTION_DIM)
    return data, torch.zeros_like(data, dtype=torch.bool), torch.randn(batch, OBS_DIM)


def _seeded(fn, seed=21):
    torch.manual_seed(seed)
    return fn()


def _loop_in_float64(sampler, data, mask, cond, generator=None, seed=21):
    """The original loop's call in float64 (``sampler``'s loop on a float64 copy of its policy, inpainting
    included) with the original's draws in its order (the trajectory, then diffusers' step noise, from
    ``generator`` or else the global RNG at ``seed``), and the derived float32 bound around it
    (helpers.float32_loop_bound)."""
    torch.manual_seed(seed)
    x_T = torch.randn(size=data.shape, dtype=data.dtype, generator=generator)
    step_noise = sampler._drawn_step_noise(data.shape, generator, data.dtype, per_step=False)
    p64 = copy.deepcopy(sampler.policy).double()
    s64 = fdp.Sampler(p64, sampler.scheduler, num_inference_steps=sampler.num_steps, eta=sampler.eta,
                      backend="torch")
    d = lambda t: None if t is None else t.double()  # noqa: E731
    known = dict(known=data.double(), known_mask=mask) if bool(mask.any()) else {}
    return float32_loop_bound(lambda: s64(cond.double(), x_T=d(x_T), step_noise=d(step_noise), **known), [p64],
                              extent=p64.horizon)


def _assert_both_within(got, expected, x64, bound, what):
    """fdp's float32 trajectory and the original loop's both within the derived float32 bound of the float64
    loop (two float32 implementations differ by rounding, which depends on the CPU: never held to each other)."""
    assert_within_float32_bound(expected, x64, bound, f"{what}: original loop")
    assert_within_float32_bound(got, x64, bound, f"{what}: accelerated")


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@pytest.mark.parametrize("batch", [1, 3])
def test_accelerate_matches_the_original_loop(scheduler, batch):
    policy = _StandInPolicy(scheduler)
    data, mask, cond = _inputs(batch)
    original = policy.conditional_sample
    ref_global = _seeded(lambda: original(data, mask, global_cond=cond))
    ref_gen = original(data, mask, global_cond=cond, generator=torch.Generator().manual_seed(4))
    with diffusion_policy.accelerate(policy) as handle:
        assert handle.sampler is None  # the horizon is known at the first call
        got = _seeded(lambda: policy.conditional_sample(data, mask, global_cond=cond))
        _assert_both_within(got, ref_global, *_loop_in_float64(handle.sampler, data, mask, cond), "global RNG")
        got = policy.conditional_sample(data, mask, global_cond=cond, generator=torch.Generator().manual_seed(4))
        _assert_both_within(got, ref_gen, *_loop_in_float64(handle.sampler, data, mask, cond,
                                                            generator=torch.Generator().manual_seed(4)), "generator")
        sampler = handle.sampler
        assert sampler.policy.horizon == HORIZON and sampler.selection.requested == "auto"
        # the U-Net's parameters are shared, not copied
        assert {id(p) for p in sampler.policy.components[0].parameters()} == {id(p) for p in policy.model.parameters()}
    assert "conditional_sample" not in vars(policy)
    assert policy.conditional_sample == original


def test_accelerate_follows_horizon_weights_and_steps():
    policy = _StandInPolicy("ddim", num_inference_steps=4)
    handle = diffusion_policy.accelerate(policy)
    data, mask, cond = _inputs(2, horizon=4)  # pred_action_steps_only: a shorter trajectory
    got = _seeded(lambda: policy.conditional_sample(data, mask, global_cond=cond))
    assert handle.sampler.policy.horizon == 4
    _assert_both_within(got, _seeded(lambda: handle.original(data, mask, global_cond=cond)),
                        *_loop_in_float64(handle.sampler, data, mask, cond), "horizon 4")
    data, mask, cond = _inputs(2)
    before = _seeded(lambda: policy.conditional_sample(data, mask, global_cond=cond))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(1.1)  # in place, as an optimizer or EMA update
    after = _seeded(lambda: policy.conditional_sample(data, mask, global_cond=cond))
    assert not torch.allclose(after, before, atol=1e-3)
    _assert_both_within(after, _seeded(lambda: handle.original(data, mask, global_cond=cond)),
                        *_loop_in_float64(handle.sampler, data, mask, cond), "weights updated in place")
    policy.num_inference_steps = 2
    policy.conditional_sample(data, mask, global_cond=cond)
    assert handle.sampler.num_steps == 2
    handle.restore()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@pytest.mark.parametrize("batch", [1, 3])
def test_inpainting_is_served_with_the_originals_rule(scheduler, batch):
    """A condition_mask that selects entries (continuing a chunk: the first actions; a random pattern) is
    inpainted by fdp, not by the original: same draws, same rule, same numbers."""
    policy = _StandInPolicy(scheduler)
    data, mask, cond = _inputs(batch)
    g = torch.Generator().manual_seed(8)
    data = torch.randn(data.shape, generator=g)
    mask[:, :3] = True
    mask |= torch.rand(mask.shape, generator=g) < 0.2
    original = policy.conditional_sample
    ref = original(data, mask, global_cond=cond, generator=torch.Generator().manual_seed(4))
    with diffusion_policy.accelerate(policy) as handle:
        got = policy.conditional_sample(data, mask, global_cond=cond, generator=torch.Generator().manual_seed(4))
        assert handle.sampler is not None  # fdp sampled
    assert torch.equal(got[mask], data[mask])
    _assert_both_within(got, ref, *_loop_in_float64(handle.sampler, data, mask, cond,
                                                    generator=torch.Generator().manual_seed(4)), "inpainting")


@pytest.mark.parametrize("case", ["local_cond", "step_kwargs", "no_global_cond"])
def test_fallbacks_run_the_original_and_log_once(case, caplog, monkeypatch):
    unet_kw = {"local_cond_dim": 2} if case == "local_cond" else {}
    policy = _StandInPolicy("ddim", **unet_kw)
    data, mask, cond = _inputs(2)
    kwargs = {"global_cond": cond}
    if case == "local_cond":
        kwargs["local_cond"] = torch.randn(2, HORIZON, 2)
    elif case == "step_kwargs":
        kwargs["eta"] = 0.5
    else:
        kwargs["global_cond"] = None
        policy = _StandInPolicy("ddim")
        policy.model = _ForeignUnet(ACTION_DIM, None)
    expected = _seeded(lambda: policy.conditional_sample(data, mask, **kwargs))
    handle = diffusion_policy.accelerate(policy)
    with caplog.at_level(logging.WARNING, logger="fdp"):
        for _ in range(2):
            # the original loop itself, run again on the same draws: bit-identical by construction
            torch.testing.assert_close(_seeded(lambda: policy.conditional_sample(data, mask, **kwargs)), expected,
                                       rtol=0, atol=0)
    notes = [r.getMessage() for r in caplog.records if "original sampler" in r.getMessage()]
    assert len(notes) == 1, notes
    if case != "inpainting_unsupported":  # there the sampler was built, then found unable to inpaint
        assert handle.sampler is None  # fdp never sampled
    handle.restore()


def test_accelerate_rejects_what_it_cannot_serve():
    with pytest.raises(TypeError, match="noise_scheduler"):
        diffusion_policy.accelerate(type("P", (), {"conditional_sample": lambda self: 0, "model": nn.Linear(1, 1),
                                                   "num_inference_steps": 1})())
    policy = _StandInPolicy()
    policy.noise_scheduler = diffusers.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        diffusion_policy.accelerate(policy)
    policy = _StandInPolicy()
    policy.model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        diffusion_policy.accelerate(policy)


@pytest.mark.parametrize("kw,match", [(dict(backend="nonsense"), r"^`backend` must be 'auto' or one of"),
                                      (dict(num_inference_steps=0), r"^`num_inference_steps` must be None or a "
                                                                    r"positive int, got 0")])
def test_accelerate_checks_its_arguments_before_patching(kw, match):
    from fdp._validation import UserError

    policy = _StandInPolicy()
    original = policy.conditional_sample
    with pytest.raises(UserError, match=match):
        diffusion_policy.accelerate(policy, **kw)
    assert policy.conditional_sample == original  # nothing patched


def test_accelerate_checks_the_schedulers_config_strictly():
    # diffusers keeps what it is given: a string where a bool belongs reaches fdp, which refuses it by name.
    policy = _StandInPolicy()
    policy.noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, clip_sample="false")
    with pytest.raises(TypeError, match=r"^the policy's noise scheduler \(DDPMScheduler\) config: `clip_sample` "
                                        r"must be a bool, got 'false' \(str\)"):
        diffusion_policy.accelerate(policy)
