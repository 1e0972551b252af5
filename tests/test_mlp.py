import math

import pytest
import torch

import fdp
from helpers import make_mlp_policy


def _manual_forward(m: fdp.MLPDenoiser, sample, t, cond):
    """The math of docs/mlp_denoiser.md, written out without the step/sample split."""
    B = sample.shape[0]
    x = sample.reshape(B, -1)
    half = m.time_embed_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    arg = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) * freqs
    emb = torch.cat([arg.sin(), arg.cos()], -1).to(sample.dtype)
    e = m.time_mlp[3](torch.nn.functional.silu(m.time_mlp[1](emb)))
    H, L = m.hidden_dim, m.num_blocks
    tp = m.time_proj(e).reshape(-1, L + 1, H)
    cp = m.cond_proj(cond)
    h = x @ m.inp.weight.T + tp[:, 0] + cp[:, :H]
    for l in range(L):
        gamma = cp[:, H + l * H: H + (l + 1) * H]
        beta = cp[:, H + L * H + l * H: H + L * H + (l + 1) * H]
        y = (h @ m.blocks_a[l].weight.T + m.blocks_a[l].bias) * (1 + gamma) + beta + tp[:, l + 1]
        h = h + torch.nn.functional.silu(y) @ m.blocks_b[l].weight.T + m.blocks_b[l].bias
    return (h @ m.out.weight.T + m.out.bias).reshape(sample.shape)


@pytest.mark.parametrize("B", [1, 5])
def test_forward_matches_written_math(B):
    torch.manual_seed(0)
    m = fdp.MLPDenoiser(3, 4, global_cond_dim=6, hidden_dim=16, num_blocks=3).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, 4, 3, dtype=torch.float64)
    c = torch.randn(B, 6, dtype=torch.float64)
    for t in (0, 37, torch.tensor(99), torch.arange(B) * 7):
        torch.testing.assert_close(m(x, t, global_cond=c), _manual_forward(m, x, t, c), rtol=1e-12, atol=1e-12)


def test_step_and_sample_terms_separate_the_conditioning():
    policy = make_mlp_policy(K=1)
    m = policy.components[0]
    ts = torch.tensor([90, 50, 10])
    c = torch.randn(2, 5, dtype=torch.float64)
    steps = m.step_terms(ts)
    terms = m.sample_terms(c, 2)
    assert steps.t_in.shape == (3, 16) and steps.t_shift.shape == (3, 2, 16)
    assert terms.scale.shape == (2, 2, 16)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    for i, t in enumerate(ts.tolist()):
        eps = m.forward_terms(x.reshape(2, -1), steps.t_in[i], steps.t_shift[i], terms.c_in, terms.scale, terms.shift)
        torch.testing.assert_close(eps.reshape(x.shape), m(x, t, global_cond=c), rtol=1e-12, atol=1e-12)


def test_unconditional():
    m = fdp.MLPDenoiser(2, 8, hidden_dim=16)
    out = m(torch.randn(3, 8, 2), 5)
    assert out.shape == (3, 8, 2)
    with pytest.raises(ValueError, match="global_cond"):
        m(torch.randn(3, 8, 2), 5, global_cond=torch.randn(3, 4))


def test_bad_inputs():
    m = fdp.MLPDenoiser(2, 8, global_cond_dim=4, hidden_dim=16)
    with pytest.raises(ValueError, match="sample"):
        m(torch.randn(3, 7, 2), 5, global_cond=torch.randn(3, 4))
    with pytest.raises(ValueError, match="global_cond"):
        m(torch.randn(3, 8, 2), 5, global_cond=torch.randn(3, 5))
    with pytest.raises(ValueError, match="global_cond"):
        m(torch.randn(3, 8, 2), 5)
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="global_cond"):
        m(torch.randn(3, 8, 2), 5, global_cond=bad)
    with pytest.raises(ValueError, match="timestep"):
        m(torch.randn(3, 8, 2), torch.zeros(2), global_cond=torch.randn(3, 4))
    with pytest.raises(TypeError, match="sample"):
        m(torch.zeros(3, 8, 2, dtype=torch.long), 5, global_cond=torch.randn(3, 4))
    with pytest.raises((ValueError, TypeError), match="hidden_dim"):
        fdp.MLPDenoiser(2, 8, hidden_dim=0)
