"""Bad input to the user-facing entry points: errors that name the argument and what was expected."""

import re
import warnings

import pytest
import torch

import fdp
from helpers import make_mlp_policy


def _unet_policy():
    torch.manual_seed(0)
    comps = [fdp.ConditionalUnet1D(3, global_cond_dim=5, down_dims=[8, 16], kernel_size=3, n_groups=4)
             for _ in range(2)]
    return fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 4, 3)


@pytest.mark.parametrize("make", [lambda: make_mlp_policy(dtype=torch.float32), _unet_policy], ids=["mlp", "unet"])
def test_loss_names_the_argument_with_the_wrong_dtype(make):
    policy = make()
    with pytest.raises(TypeError, match=r"^`actions` must have the policy's parameter dtype torch.float32, "
                                        r"got torch.float64"):
        policy.loss(torch.rand(2, 4, 3, dtype=torch.float64), torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"^`cond` must have the dtype of `actions` \(torch.float32\)"):
        policy.loss(torch.rand(2, 4, 3), torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^`cond` must have shape \[2, 5\]"):
        policy.loss(torch.rand(2, 4, 3), torch.randn(2, 6))


def test_loss_warns_once_about_actions_outside_the_clip_range():
    policy = make_mlp_policy(dtype=torch.float32)
    cond = torch.randn(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(torch.rand(2, 4, 3) * 2 - 1, cond)  # inside [-1, 1]: silent
    actions = torch.rand(2, 4, 3)
    actions[1, 2, 0] = 3.5
    with pytest.warns(UserWarning, match=re.escape("`actions` reach 3.5, outside the scheduler's clip range "
                                                   "[-1, 1]")):
        policy.loss(actions, cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(actions, cond)  # once per policy


def test_no_clip_range_no_warning():
    policy = make_mlp_policy(dtype=torch.float32)
    policy.noise_scheduler = fdp.DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(torch.full((2, 4, 3), 5.0), torch.randn(2, 5))


@pytest.mark.parametrize("device", ["banana", "cuda:x", 2.5])
def test_available_backends_names_a_bad_device(device):
    with pytest.raises(ValueError, match=r"^`device` must be a torch.device or a device string"):
        fdp.available_backends(device)


def test_router_help_teaches_every_strategy_and_argument():
    doc = fdp.Router.__doc__
    for strategy in fdp.router.STRATEGIES:
        assert f'``"{strategy}"``' in doc
    init = fdp.Router.__init__.__doc__
    for arg in ("cond_dim", "num_components", "hidden_dim", "strategy", "topk", "fixed_weights"):
        assert f"{arg}:" in init
