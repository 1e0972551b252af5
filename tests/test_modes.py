"""State a sampler keeps serves callers in any autograd mode (issue 28, "mode independence").

Every backend runs the same call sequence on one Sampler: inference_mode -> normal -> no_grad ->
inference_mode, with a new batch size at each call (so workspaces grow and, on CUDA, new graphs are
captured in each mode), and each result must be what the torch backend gives for the same noise. The
Sampler itself is built inside ``inference_mode`` too, so that packing happens in that mode. On the CPU
that is ``torch``, ``triton`` and ``triton-persistent`` (interpreted), the graph backend's prepared loop,
and a CUDA-graph captured call emulated on the CPU; with a GPU, every backend available there.
"""
import contextlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fdp
from fdp._state import state_mode
from fdp.backends.captured import CapturedCall
from fdp.backends.graph_backend import GraphPrepared
from fdp.tolerances import rel_error, tolerance
from helpers import make_mlp_policy
from test_call_path import _Emulated as _EmulatedCapture  # CapturedCall, its CUDA steps emulated

MODES = {
    "inference_mode": torch.inference_mode,
    "normal": contextlib.nullcontext,
    "no_grad": torch.no_grad,
}
# Batch sizes change, and each comes back in another mode: a buffer or graph made for a batch size in one
# mode is reused (updated in place) in the next.
SEQUENCE = [("inference_mode", 2), ("normal", 2), ("no_grad", 3), ("inference_mode", 1), ("normal", 3),
            ("no_grad", 1), ("inference_mode", 4), ("normal", 4), ("inference_mode", 2)]


def _scheduler():
    return fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def _mlp_policy():
    return make_mlp_policy(K=2, horizon=4, action_dim=3, cond_dim=5, hidden=16, dtype=torch.float32)


def _unet_policy():
    torch.manual_seed(0)
    comps = [fdp.ConditionalUnet1D(2, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(8, 16), n_groups=4)
             for _ in range(2)]
    return fdp.FactorizedPolicy(comps, fdp.Router(5, 2, hidden_dim=8), horizon=4, action_dim=2)


def _run_sequence(call, reference, cond_dim, shape):
    """``call(cond, x_T, noise)`` through SEQUENCE, each result against ``reference`` on the same inputs."""
    gen = torch.Generator().manual_seed(0)
    for mode, B in SEQUENCE:
        cond = torch.randn(B, cond_dim, generator=gen)
        x_T = torch.randn(B, *shape, generator=gen)
        noise = torch.randn(3, B, *shape, generator=gen)
        with MODES[mode]():
            out = call(cond, x_T, noise)
        want = reference(cond, x_T, noise)
        assert out.shape == (B, *shape)
        assert rel_error(out, want) <= tolerance(torch.float32, torch.float32), (mode, B)


def _sampler_call(s):
    return lambda cond, x_T, noise: s(cond, x_T=x_T, step_noise=noise)


def _reference(policy):
    ref = fdp.Sampler(policy, _scheduler(), num_inference_steps=3, backend="torch")
    return _sampler_call(ref)


def _cpu_cases():
    cases = ["torch", "triton", "triton-persistent", "triton-captured", "graph", "graph-captured", "torch-batched"]
    return cases + (["onnxruntime"] if importlib.util.find_spec("onnxruntime") else [])


def _build(case):
    """(call, reference, cond_dim, sample shape) for one CPU case; the Sampler is built in inference mode."""
    if case.startswith("graph"):
        policy = _unet_policy()
        table = _scheduler().step_table(3)
        with torch.inference_mode():
            prepared = GraphPrepared(policy, table, None, capture=False)
        if case == "graph-captured":
            prepared._call = _EmulatedCapture(prepared._call.fn)
        return (lambda c, x, n: prepared.run(c, x, n)), _reference(policy), 5, (4, 2)
    policy = _mlp_policy()
    backend = case.removesuffix("-captured")
    with torch.inference_mode():
        s = fdp.Sampler(policy, _scheduler(), num_inference_steps=3, backend=backend)
    if case.endswith("-captured"):
        s._prepared._call = _EmulatedCapture(s._prepared._call.fn)
    return _sampler_call(s), _reference(policy), 5, (4, 3)


@pytest.mark.parametrize("case", _cpu_cases())
def test_call_sequence_across_modes_cpu(case):
    call, reference, cond_dim, shape = _build(case)
    _run_sequence(call, reference, cond_dim, shape)


def _sequence_on(backend, device="cuda"):
    """The call sequence for ``backend`` on ``device``; returns why the backend cannot run there, else None."""
    info = fdp.available_backends(device)[backend]
    if not info.available:
        return info.reason
    policy = (_unet_policy() if backend == "graph" else _mlp_policy()).to(device)
    with torch.inference_mode():
        s = fdp.Sampler(policy, _scheduler(), num_inference_steps=3, backend=backend, dtype=torch.float32)
    ref = fdp.Sampler(policy, _scheduler(), num_inference_steps=3, backend="torch")
    shape = (policy.horizon, policy.action_dim)

    def on(sampler):
        return lambda c, x, n: sampler(c.to(device), x_T=x.to(device), step_noise=n.to(device)).cpu()

    _run_sequence(on(s), on(ref), policy.cond_dim, shape)
    return None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "graph", "triton", "triton-persistent", "cuda", "cuda-persistent"])
def test_call_sequence_across_modes_gpu(backend):
    """In a fresh interpreter without TRITON_INTERPRET: the Triton and graph backends refuse interpreted kernels on
    CUDA (the interpreter's host copies cannot be captured), so this process's kernels would not do."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    code = f"import test_modes\nwhy = test_modes._sequence_on({backend!r})\nprint('UNAVAILABLE:', why)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    why = res.stdout.rsplit("UNAVAILABLE: ", 1)[1].strip()
    if why != "None":
        pytest.skip(why)


def test_state_made_in_inference_mode_is_a_normal_tensor():
    """The rule itself: state_mode makes normal, grad-free tensors even inside inference_mode."""
    w = torch.randn(3, requires_grad=True)
    with torch.inference_mode():
        with state_mode():
            t = w * 2
    assert not t.is_inference() and not t.requires_grad
    t.zero_()  # an in-place update outside inference mode: what a workspace gets


def test_scheduler_caches_serve_training_after_inference_mode():
    """A table or alphas_cumprod copy cached inside inference_mode, then used by a training step with grad."""
    s = _scheduler()
    s.set_timesteps(5)
    with torch.inference_mode():
        s.step(torch.randn(2, 3), int(s.timesteps[0]), torch.randn(2, 3), generator=torch.Generator().manual_seed(0))
        s.add_noise(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([3, 7]))
    x = torch.randn(2, 3, requires_grad=True)
    noisy = s.add_noise(x, torch.randn(2, 3), torch.tensor([3, 7]))
    prev = s.step(noisy, int(s.timesteps[0]), noisy, generator=torch.Generator().manual_seed(0)).prev_sample
    prev.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- bounded caches (issue 28): every cache keyed by values a caller controls keeps at most its documented size --


def test_ddim_step_tables_are_bounded_for_new_etas():
    from fdp.schedulers import STEP_CACHE_SIZE

    s = fdp.DDIMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    t = int(s.timesteps[0])
    for i in range(2000):
        s.step(m, t, x, eta=i / 2000, noise=torch.zeros(2, 3))
        assert len(s._step_cache) <= STEP_CACHE_SIZE
    assert len(s._step_cache) == STEP_CACHE_SIZE
    # Least recently used goes first: the newest etas are kept, and a hit is the same table again.
    kept = s._step_cache.keys()
    assert kept == [(i / 2000, False) for i in range(2000 - STEP_CACHE_SIZE, 2000)]
    table = s._cached_table(1999 / 2000, False)
    assert s._cached_table(1999 / 2000, False) is table
    # A cached table computes what a fresh one does.
    fresh = fdp.DDIMScheduler(num_train_timesteps=100)
    fresh.set_timesteps(10)
    assert torch.equal(s.step(m, t, x, eta=0.3, noise=x).prev_sample, fresh.step(m, t, x, eta=0.3, noise=x).prev_sample)


def test_captured_graphs_are_bounded_per_signature():
    from fdp.backends.captured import MAX_GRAPHS

    fn = lambda c, x, n: x * c.sum(-1)[:, None, None]  # noqa: E731
    call = _EmulatedCapture(fn)
    for B in range(1, 3 * MAX_GRAPHS):
        args = (torch.randn(B, 3), torch.randn(B, 4, 2), None)
        assert torch.equal(call(*args), fn(*args))
        assert len(call.signatures) <= MAX_GRAPHS
    # The most recent batch sizes keep their graphs, oldest first.
    assert [sig[0][0][0] for sig in call.signatures] == list(range(2 * MAX_GRAPHS, 3 * MAX_GRAPHS))
    small = CapturedCall(fn, "cpu", max_graphs=2)
    assert small._entries.maxsize == 2
    with pytest.raises(ValueError, match="max_graphs"):
        CapturedCall(fn, "cpu", max_graphs=0)


def test_lru_keeps_the_most_recently_used():
    from fdp._state import LRU

    lru = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recent
    lru.put("c", 3)
    assert lru.keys() == ["a", "c"] and "b" not in lru and lru.get("b") is None
    with pytest.raises(ValueError, match="maxsize"):
        LRU(0)
