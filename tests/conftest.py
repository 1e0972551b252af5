import os

import pytest
import torch

# In-process Triton tests run the kernels in the Triton interpreter, on CPU
# tensors, on every machine; native GPU runs happen in subprocesses started
# without this variable (see test_triton.py, test_unet_fused.py). The switch
# is read when Triton and the kernels are first imported, so it is set here,
# before any test module (or diffusers, which may import Triton) loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import fdp  # noqa: E402

# The suite's tensors are tiny: torch's intra-op threads only spin-wait for
# each other there (badly so on a loaded 2-core CI machine).
torch.set_num_threads(1)


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


@pytest.fixture
def mlp_policy():
    return make_mlp_policy()
