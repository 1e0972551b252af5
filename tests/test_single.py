"""``fdp.Sampler.for_unet``: one denoiser (K = 1), no router work, every U-Net backend."""

import copy

import pytest
import torch

import fdp
from fdp.backends.graph_backend import GraphPrepared
from helpers import assert_matches_in_float32, assert_within_float32_bound, float32_loop_bound

diffusers = pytest.importorskip("diffusers")

HORIZON, ACTION_DIM, COND_DIM = 8, 3, 5


def _unet(seed=0, **kw):
    torch.manual_seed(seed)
    unet = fdp.ConditionalUnet1D(ACTION_DIM, global_cond_dim=COND_DIM, diffusion_step_embed_dim=8,
                                 down_dims=(8, 16), n_groups=4, **kw)
    with torch.no_grad():  # GroupNorm biases start at 0: make every layer count
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def _diffusers_loop(unet, scheduler, steps, global_cond, generator):
    """What a diffusers-style loop over the same U-Net returns with ``generator``."""
    x = torch.randn((global_cond.shape[0], HORIZON, ACTION_DIM), generator=generator)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, global_cond=global_cond), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("kind, steps, film", [("ddpm", 6, True), ("ddim", 4, False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_for_unet_matches_a_diffusers_loop(kind, steps, film, batch):
    unet = _unet(cond_predict_scale=film)
    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind]
    ref_sched = cls(num_train_timesteps=30, beta_schedule="squaredcos_cap_v2")
    sampler = fdp.Sampler.for_unet(unet, fdp.DDPMScheduler.from_config(ref_sched.config) if kind == "ddpm"
                                   else fdp.DDIMScheduler.from_config(ref_sched.config),
                                   HORIZON, ACTION_DIM, num_inference_steps=steps, backend="torch")
    cond = torch.randn(batch, COND_DIM)
    expected = _diffusers_loop(unet, ref_sched, steps, cond, torch.Generator().manual_seed(7))
    got = sampler(cond, generator=torch.Generator().manual_seed(7))
    # Both float32 loops within the float32 error of this computation of the float64 loop on the same noise.
    x_T, noise = sampler.noise(batch, torch.Generator().manual_seed(7))
    unet64 = copy.deepcopy(unet).double()
    s64 = fdp.Sampler.for_unet(unet64, sampler.scheduler, HORIZON, ACTION_DIM, num_inference_steps=steps,
                               backend="torch")
    x64, bound = float32_loop_bound(
        lambda: s64(cond.double(), x_T=x_T.double(), step_noise=None if noise is None else noise.double()),
        [unet64], extent=HORIZON)
    assert_within_float32_bound(expected, x64, bound, "diffusers loop")
    assert_within_float32_bound(got, x64, bound, "fdp")


def test_for_unet_runs_no_router_work_and_draws_no_global_randomness():
    unet = _unet()
    torch.manual_seed(3)
    before = torch.randn(4)
    torch.manual_seed(3)
    sampler = fdp.Sampler.for_unet(unet, fdp.DDIMScheduler(num_train_timesteps=30), HORIZON, ACTION_DIM,
                                   num_inference_steps=3)
    assert torch.equal(torch.randn(4), before)  # building consumed nothing from the global RNG
    calls = []
    sampler.policy.router.net.register_forward_hook(lambda *a: calls.append(1))
    cond = torch.randn(2, COND_DIM)
    sampler(cond)
    assert calls == []
    assert torch.equal(sampler.policy.weights(cond), torch.ones(2, 1))


def test_for_unet_uses_the_unets_parameters_live():
    unet = _unet()
    sampler = fdp.Sampler.for_unet(unet, fdp.DDIMScheduler(num_train_timesteps=30), HORIZON, ACTION_DIM,
                                   num_inference_steps=3, backend="torch")
    cond, x_T = torch.randn(2, COND_DIM), torch.randn(2, HORIZON, ACTION_DIM)
    first = sampler(cond, x_T=x_T)
    with torch.no_grad():
        unet.final_conv[1].bias.add_(0.5)
    assert sampler.policy.components[0] is unet
    assert not torch.allclose(sampler(cond, x_T=x_T), first)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_graph_backend_serves_a_single_unet(kind):
    """The graph backend's prepared loop (CPU: no capture, torch composition) on a K = 1 policy."""
    unet = _unet(cond_predict_scale=True)
    sched = (fdp.DDPMScheduler if kind == "ddpm" else fdp.DDIMScheduler)(num_train_timesteps=30)
    sampler = fdp.Sampler.for_unet(unet, sched, HORIZON, ACTION_DIM, num_inference_steps=5, backend="torch")
    assert fdp.backends.get_backend("graph").unsupported_reason(sampler.policy, sampler.table, None) is None
    graph = GraphPrepared(sampler.policy, sampler.table, capture=False, compose="torch")
    cond = torch.randn(3, COND_DIM)
    x_T, step_noise = sampler.noise(3, torch.Generator().manual_seed(1))
    # The fused trunk sums in another order than the U-Net: both float32 loops are held to the float64 loop
    # within its derived float32 bound (helpers.float32_loop_bound), not to each other.
    assert_matches_in_float32({"graph": graph.run(cond, x_T, step_noise)}, sampler, cond, x_T, step_noise)


def test_for_unet_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="global_cond_dim"):
        fdp.Sampler.for_unet(fdp.ConditionalUnet1D(ACTION_DIM, down_dims=(8,)), fdp.DDIMScheduler(), HORIZON,
                             ACTION_DIM)
    with pytest.raises(TypeError, match="`unet`"):
        fdp.Sampler.for_unet("unet", fdp.DDIMScheduler(), HORIZON, ACTION_DIM)
    with pytest.raises(ValueError, match="input_dim"):
        fdp.Sampler.for_unet(_unet(), fdp.DDIMScheduler(), HORIZON, ACTION_DIM + 1)
