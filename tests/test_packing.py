import pytest
import torch

import fdp
from helpers import assert_within_float32_bound, float32_loop_bound, make_mlp_policy
from fdp import packing


@pytest.mark.parametrize("B,strategy", [(1, "soft"), (5, "topk"), (3, "hard")])
def test_reference_eps_is_the_policy(B, strategy):
    policy = _float32_values(make_mlp_policy(K=3, strategy=strategy))
    ts = torch.tensor([80, 41, 3])
    packed = packing.pack_policy(policy)
    steps = packing.step_terms(policy, ts)
    c = torch.randn(B, 5, dtype=torch.float64).float().double()
    call = packing.call_terms(policy, c, policy.weights(c))
    x = torch.randn(B, 4, 3, dtype=torch.float64).float().double()
    for i, t in enumerate(ts.tolist()):
        eps = packing.reference_eps(packed, steps.t_in[i], steps.t_shift[i], call, x.reshape(B, -1).float())
        _assert_is_the_policy(eps.reshape(x.shape), policy, x, t, c)


def _float32_values(policy):
    """``policy`` (float64) with its parameters rounded to float32 values: packing them in float32 is then
    exact, and the float32 path differs from the float64 policy by its arithmetic alone."""
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(p.float().double())
    return policy


def _assert_is_the_policy(eps, policy, x, t, c):
    """The packed float32 ``eps`` within the derived float32 bound (helpers.float32_loop_bound) of the
    float64 policy's prediction on the same (float32) values."""
    with torch.no_grad():
        x64, bound = float32_loop_bound(lambda: policy(x, t, global_cond=c), [policy])
    assert_within_float32_bound(eps, x64, bound, f"packed eps at t={t}")


def test_layout_shapes_and_dtypes():
    policy = make_mlp_policy(K=2, horizon=4, action_dim=3, hidden=16, blocks=3)
    p = packing.pack_policy(policy, torch.bfloat16)
    assert (p.K, p.D, p.H, p.L) == (2, 12, 16, 3)
    assert p.w_in.shape == (2, 12, 16) and p.w_a.shape == (2, 3, 16, 16) and p.w_out.shape == (2, 16, 12)
    assert p.w_in.dtype == torch.bfloat16 and p.b_b.dtype == torch.float32 and p.b_out.dtype == torch.float32
    assert all(t.is_contiguous() for t in (p.w_in, p.w_a, p.w_b, p.b_b, p.w_out, p.b_out))
    # input-major: w_in[k] is W_in^T
    assert torch.equal(p.w_in[1], policy.components[1].inp.weight.t().to(torch.bfloat16))


def test_unconditional_components_pack():
    torch.manual_seed(0)
    comps = [fdp.MLPDenoiser(2, 4, hidden_dim=16) for _ in range(2)]
    policy = _float32_values(fdp.FactorizedPolicy(comps, fdp.Router(3, 2), 4, 2).double())
    c = torch.randn(2, 3, dtype=torch.float64).float().double()
    call = packing.call_terms(policy, c, policy.weights(c))
    steps = packing.step_terms(policy, torch.tensor([7]))
    x = torch.randn(2, 4, 2, dtype=torch.float64).float().double()
    eps = packing.reference_eps(packing.pack_policy(policy), steps.t_in[0], steps.t_shift[0], call,
                                x.reshape(2, -1).float())
    _assert_is_the_policy(eps.reshape(x.shape), policy, x, 7, c)


def test_refuses_what_it_cannot_pack():
    comps = [fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16),
             fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=32)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 4, 3)
    assert "same" in packing.mlp_unsupported_reason(policy)
    with pytest.raises(ValueError, match="policy"):
        packing.pack_policy(policy)
    unet = fdp.ConditionalUnet1D(3, global_cond_dim=5, down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4)
    policy = fdp.FactorizedPolicy([unet], fdp.Router(5, 1), 4, 3)
    assert "MLPDenoiser" in packing.mlp_unsupported_reason(policy)
    with pytest.raises(TypeError, match="dtype"):
        packing.pack_policy(make_mlp_policy(K=1), torch.int8)
