"""The Triton MLP kernels and the ``triton`` / ``triton-persistent`` backends, in the Triton interpreter.

The kernels run on the CPU through ``TRITON_INTERPRET=1`` (set by
tests/conftest.py before anything imports Triton). Everything is compared with the float64 eager
reference (``backend="torch"`` on a float64 policy) for the same ``x_T`` and
step noise, by relative error ``max|a - b| / max|b|``. Kernel outputs are
written into NaN-poisoned buffers with NaN canaries around them (the
interpreter does no bounds checks), so an unwritten element or a stray write
fails. Sizes stay small: the interpreter is slow.
"""

import copy  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fdp  # noqa: E402
from conftest import (KERNEL_COND_DIM, KERNEL_SCHEDULERS, KERNEL_TOL, kernel_policy,  # noqa: E402
                      make_mlp_policy, replaced)
from fdp import packing  # noqa: E402
from fdp.backends import available_backends, get_backend, resolve_backend  # noqa: E402
from fdp_kernels import mlp_common  # noqa: E402
from fdp_kernels.mlp_persistent import mlp_persistent_kernel, mlp_sample  # noqa: E402
from fdp_kernels.mlp_step import mlp_step, mlp_step_kernel  # noqa: E402

NAN = float("nan")
PAD = 37  # canary floats on each side of every kernel output
COND_DIM = KERNEL_COND_DIM

SCHEDULERS = KERNEL_SCHEDULERS
TOL = KERNEL_TOL


def test_kernels_run_in_the_interpreter():
    assert type(mlp_step_kernel).__name__ == "InterpretedFunction"
    assert type(mlp_persistent_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------------------------------
# helpers


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _poisoned(numel):
    """A NaN buffer with PAD canaries on both sides, and the view of its middle."""
    buf = torch.full((numel + 2 * PAD,), NAN)
    return buf, buf[PAD:PAD + numel]


def _assert_canaries(buf, what):
    assert torch.isnan(buf[:PAD]).all() and torch.isnan(buf[-PAD:]).all(), f"{what}: write outside the buffer"


class Case:
    """A float64 policy, a scheduler table, x_T, step noise, the float64 reference and the kernel inputs."""

    def __init__(self, K, H, L, horizon, action_dim, B, sched, strategy, T, seed=0):
        self.policy = kernel_policy(K, H, L, horizon, action_dim, strategy, seed)
        factory, eta = SCHEDULERS[sched]
        self.table = factory().step_table(T, eta=eta)
        g = torch.Generator().manual_seed(seed + 1)
        self.B, self.D, self.shape = B, horizon * action_dim, (B, horizon, action_dim)
        self.cond = torch.randn(B, COND_DIM, generator=g, dtype=torch.float64)
        self.x_T = torch.randn(self.shape, generator=g, dtype=torch.float64)
        # NaN in the slices of steps that add no noise (DDPM's t = 0): kernels must not read them into x.
        self.noise = torch.randn((T, *self.shape), generator=g, dtype=torch.float64)
        self.noise[~self.table.adds_noise] = NAN
        self.adds = bool(self.table.adds_noise.any())
        self.ref = get_backend("torch").prepare(self.policy, self.table).run(
            self.cond, self.x_T, self.noise if self.adds else None)
        self.steps = packing.step_terms(self.policy, self.table.timesteps)
        self.call = packing.call_terms(self.policy, self.cond, self.policy.weights(self.cond))
        tbl = self.table.to("cpu", torch.float32)
        self.coef, self.adds_noise = tbl.coef, tbl.adds_noise
        self.clip = tbl.clip_range if tbl.clip_sample else None

    def packed(self, dtype):
        return packing.pack_policy(self.policy, dtype)

    def kernel_noise(self):
        return self.noise.reshape(len(self.table), self.B, self.D).float().contiguous() if self.adds else None

    def scratch(self, packed, **tuning):
        cfg = mlp_common.block_config(self.B, self.D, packed.H, tuning.get("block_b"), tuning.get("h_in_registers"),
                                      tuning.get("precision"), packed.dtype, tuning.get("num_warps"))
        need = mlp_common.scratch_numel(self.B, cfg)
        return _poisoned(need) if need else (None, None)

    def run_steps(self, packed, **tuning):
        """The per-step kernel T times, each into a fresh poisoned buffer."""
        x = self.x_T.reshape(self.B, self.D).float()
        noise = self.kernel_noise()
        sbuf, scratch = self.scratch(packed, **tuning)
        for i in range(len(self.table)):
            buf, out = _poisoned(self.B * self.D)
            res = mlp_step(packed, self.steps, self.call, self.coef, self.adds_noise, i, x, noise,
                           clip_range=self.clip, out=out.view(self.B, self.D), scratch=scratch, **tuning)
            _assert_canaries(buf, f"mlp_step out (step {i})")
            assert res.data_ptr() == out.data_ptr()
            assert torch.isfinite(res).all(), f"step {i} left elements unwritten"
            x = res
        if sbuf is not None:
            _assert_canaries(sbuf, "mlp_step scratch")
        return x.reshape(self.shape)

    def run_persistent(self, packed, **tuning):
        buf, out = _poisoned(self.B * self.D)
        sbuf, scratch = self.scratch(packed, **tuning)
        res = mlp_sample(packed, self.steps, self.call, self.coef, self.adds_noise,
                         self.x_T.reshape(self.B, self.D).float(), self.kernel_noise(), clip_range=self.clip,
                         out=out.view(self.B, self.D), scratch=scratch, **tuning)
        _assert_canaries(buf, "mlp_sample out")
        if sbuf is not None:
            _assert_canaries(sbuf, "mlp_sample scratch")
        assert torch.isfinite(res).all(), "mlp_sample left elements unwritten"
        return res.reshape(self.shape)


# ------------------------------------------------------------------------------------------------------------
# both kernels against the float64 reference

# K, H, L, horizon, action_dim, B, scheduler, strategy, T, weight dtype, tuning
KERNEL_CASES = [
    (1, 16, 1, 2, 1, 1, "ddim_eta", "soft", 4, torch.float32, {}),           # D = 2, one row
    (3, 24, 2, 5, 3, 5, "ddim", "soft", 4, torch.float32, {}),               # H not a power of two, D = 15
    (4, 48, 2, 7, 16, 17, "ddim_eta", "hard", 3, torch.float32, {}),         # D = 112, two tiles
    (8, 40, 1, 4, 3, 17, "ddpm_v", "topk", 2, torch.float32, {}),            # K = 8, top-2 routing
    (2, 100, 2, 10, 16, 5, "ddpm_clip", "fixed", 3, torch.float32, {}),      # scratch path, D = 160
    (5, 32, 2, 3, 5, 17, "ddim_eta", "soft", 2, torch.float32, {"h_in_registers": False}),  # forced scratch
    (2, 256, 1, 4, 2, 1, "ddim", "soft", 2, torch.float32, {}),              # wide: H = 256, B = 1
    (1, 300, 1, 2, 3, 1, "ddpm_clip", "hard", 2, torch.float32, {}),         # H = 300 (pads to 320)
    (3, 48, 2, 5, 3, 5, "ddpm_clip", "soft", 3, torch.bfloat16, {"h_in_registers": True}),  # forced registers
    (3, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3, torch.float16, {"precision": "native"}),  # (bf16: GPU only)
    (2, 72, 1, 4, 3, 5, "ddim_eta", "hard", 3, torch.float32, {"precision": "tf32x3", "num_warps": 4}),
    (2, 80, 1, 4, 3, 17, "ddim_eta", "topk", 3, torch.bfloat16, {"precision": "ieee"}),
    (3, 24, 2, 3, 5, 5, "ddpm_v", "hard", 3, torch.float16, {}),
    (2, 64, 2, 4, 3, 33, "ddim", "soft", 2, torch.float32, {"block_b": 32, "precision": "tf32"}),
    (1, 512, 1, 2, 2, 1, "ddim_eta", "soft", 1, torch.bfloat16, {}),         # the widest H
    (2, 16, 1, 32, 16, 3, "ddpm_clip", "topk", 2, torch.float32, {}),        # the largest D = 512
]


def _case_id(c):
    K, H, L, h, a, B, s, r, T, dt, tune = c
    return f"K{K}-H{H}-L{L}-D{h * a}-B{B}-{s}-{r}-{str(dt).split('.')[-1]}" + "".join(f"-{k}" for k in tune)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
def test_kernels_match_float64_reference(case):
    K, H, L, horizon, action_dim, B, sched, strategy, T, dtype, tuning = case
    c = Case(K, H, L, horizon, action_dim, B, sched, strategy, T)
    packed = c.packed(dtype)
    tol = TOL[dtype]
    if tuning.get("precision") == "tf32" and dtype == torch.float32:
        tol = 2e-3  # what tf32 (activations and weights rounded to 10 bits) allows on a GPU
    step_out = c.run_steps(packed, **tuning)
    pers_out = c.run_persistent(packed, **tuning)
    e_step, e_pers = _rel_err(step_out, c.ref), _rel_err(pers_out, c.ref)
    print(f"[{_case_id(case)}] rel err: mlp_step {e_step:.2e}, mlp_sample {e_pers:.2e}")
    assert e_step < tol and e_pers < tol
    # The two kernels do the same float32 arithmetic in the same order.
    torch.testing.assert_close(step_out, pers_out, rtol=0, atol=0)


def test_skips_components_no_row_uses():
    """Weight 0 for every row of a tile: skipping the component changes nothing (a NaN component stays
    out either way: a zero weight leaves it out per row, as fdp.FactorizedPolicy.compose does)."""
    c = Case(3, 24, 1, 4, 3, 5, "ddim", "fixed", 2)
    c.policy.router.set_strategy("fixed", fixed_weights=[0.6, 0.0, 0.4])
    c.call = packing.call_terms(c.policy, c.cond, c.policy.weights(c.cond))
    packed = c.packed(torch.float32)
    expect = c.run_persistent(packed)
    for attr in ("w_in", "w_a", "w_b", "w_out"):
        getattr(packed, attr)[1] = NAN
    torch.testing.assert_close(c.run_steps(packed), expect, rtol=0, atol=0)
    torch.testing.assert_close(c.run_persistent(packed), expect, rtol=0, atol=0)
    # Without skipping, the NaN component is evaluated, and the zero weight still keeps it out of every row.
    out = mlp_sample(packed, c.steps, c.call, c.coef, c.adds_noise, c.x_T.reshape(c.B, c.D).float(), None,
                     clip_range=c.clip, skip_unused=False)
    torch.testing.assert_close(out, expect.reshape(out.shape), rtol=0, atol=0)


@pytest.mark.parametrize("sched,strategy", [("ddpm_clip", "soft"), ("ddim", "fixed")])
def test_nan_router_weight_gives_nan_in_its_row_only(sched, strategy):
    """As in torch, a NaN weight makes its row NaN, also when the tile's other rows give the component
    weight 0 (fixed [0.6, 0, 0.4]: component 1 is used by the NaN alone) and through clipping.
    The other rows are computed exactly as without the NaN."""
    c = Case(3, 24, 1, 4, 3, 5, sched, strategy, 2)
    if strategy == "fixed":
        c.policy.router.set_strategy("fixed", fixed_weights=[0.6, 0.0, 0.4])
        c.call = packing.call_terms(c.policy, c.cond, c.policy.weights(c.cond))
    packed = c.packed(torch.float32)
    clean_step, clean_pers = c.run_steps(packed), c.run_persistent(packed)
    bad = 3
    weights = c.call.weights.clone()
    weights[bad, 1] = NAN
    c.call = replaced(c.call, weights=weights)
    x_T, noise = c.x_T.reshape(c.B, c.D).float(), c.kernel_noise()
    x = x_T
    for i in range(len(c.table)):
        x = mlp_step(packed, c.steps, c.call, c.coef, c.adds_noise, i, x, noise, clip_range=c.clip)
    pers = mlp_sample(packed, c.steps, c.call, c.coef, c.adds_noise, x_T, noise, clip_range=c.clip)
    others = [r for r in range(c.B) if r != bad]
    for out, clean in ((x.reshape(c.shape), clean_step), (pers.reshape(c.shape), clean_pers)):
        assert torch.isnan(out[bad]).all()
        torch.testing.assert_close(out[others], clean[others], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["triton", "triton-persistent"])
@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim_eta"])
def test_backends_nan_router_logit_gives_nan_actions(name, sched):
    """A NaN router logit (here a NaN bias of the router's last layer: every row's weights are NaN)
    gives NaN actions, as on backend="torch"."""
    pol = kernel_policy(2, 16, 1, 4, 3).float()
    with torch.no_grad():
        pol.router.net[-1].bias[0] = NAN
    factory, eta = SCHEDULERS[sched]
    cond = torch.randn(3, COND_DIM)
    gen = torch.Generator().manual_seed(0)
    ref = fdp.Sampler(pol, factory(), num_inference_steps=2, eta=eta, backend="torch")(cond, generator=gen)
    assert torch.isnan(ref).all()
    gen = torch.Generator().manual_seed(0)
    out = fdp.Sampler(pol, factory(), num_inference_steps=2, eta=eta, backend=name)(cond, generator=gen)
    assert torch.isnan(out).all()


def test_scratch_offsets_are_64_bit():
    """Program pid's scratch starts at pid * 2 * BLOCK_B * H_STRIDE floats: past 2**31 (65536 programs
    of 32 rows at H = 512, about 2M rows) that offset must not wrap."""

    @triton.jit
    def probe(out_ptr, pid, BLOCK_B: tl.constexpr, H_STRIDE: tl.constexpr):
        tl.store(out_ptr, mlp_common._scratch_offset(pid, BLOCK_B, H_STRIDE))

    cfg = mlp_common.block_config(2_100_000, 32, 512)
    out = torch.zeros(1, dtype=torch.int64)
    pid = 2_100_000 // cfg["BLOCK_B"]
    probe[(1,)](out, pid, BLOCK_B=cfg["BLOCK_B"], H_STRIDE=cfg["H_STRIDE"])
    expect = pid * 2 * cfg["BLOCK_B"] * cfg["H_STRIDE"]
    assert expect >= 2**31 and int(out) == expect


def test_in_place_output():
    c = Case(2, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3)
    packed = c.packed(torch.float32)
    expect = c.run_persistent(packed).reshape(c.B, c.D)
    x = c.x_T.reshape(c.B, c.D).float().clone()
    assert mlp_sample(packed, c.steps, c.call, c.coef, c.adds_noise, x, c.kernel_noise(), clip_range=c.clip,
                      out=x) is x
    torch.testing.assert_close(x, expect, rtol=0, atol=0)
    x = c.x_T.reshape(c.B, c.D).float().clone()
    for i in range(len(c.table)):
        mlp_step(packed, c.steps, c.call, c.coef, c.adds_noise, i, x, c.kernel_noise(), clip_range=c.clip, out=x)
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# in-kernel noise (seed=)


def _noise_only_table(T):
    """x' = z at every step: the kernels' output is the generated noise itself."""
    coef = torch.zeros(T, 6)
    coef[:, 5] = 1.0
    return coef, torch.ones(T, dtype=torch.int8)


def test_seeded_noise_is_standard_normal_and_deterministic():
    c = Case(1, 16, 1, 8, 4, 40, "ddim", "soft", 2)  # 40 rows x 32 columns = 1280 draws per step
    packed = c.packed(torch.float32)
    coef, adds = _noise_only_table(2)
    x = c.x_T.reshape(c.B, c.D).float()
    z = mlp_sample(packed, c.steps, c.call, coef, adds, x, seed=1234)
    assert torch.isfinite(z).all()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / n ** 0.5
    assert abs(float(z.std()) - 1) < 0.08
    assert float((z.abs() > 3).float().mean()) < 0.01
    # Deterministic per seed, different across seeds.
    assert torch.equal(z, mlp_sample(packed, c.steps, c.call, coef, adds, x, seed=1234))
    assert not torch.equal(z, mlp_sample(packed, c.steps, c.call, coef, adds, x, seed=1235))
    # The per-step kernel draws the same numbers; the two steps draw independent ones.
    z0 = mlp_step(packed, c.steps, c.call, coef, adds, 0, x, seed=1234)
    z1 = mlp_step(packed, c.steps, c.call, coef, adds, 1, x, seed=1234)
    torch.testing.assert_close(z1, z, rtol=0, atol=0)
    corr = float(torch.corrcoef(torch.stack([z0.flatten(), z1.flatten()]))[0, 1])
    assert abs(corr) < 0.15
    # Rows do not repeat each other.
    assert float(torch.corrcoef(z1[:2].reshape(2, -1))[0, 1]) < 0.9


@pytest.mark.parametrize("name", ["triton", "triton-persistent"])
def test_backend_seeded_noise(name):
    c = Case(2, 24, 1, 4, 3, 5, "ddpm_clip", "soft", 4)
    pol = copy.deepcopy(c.policy).float()
    prepared = get_backend(name).prepare(pol, c.table, torch.float32)
    x_T, cond = c.x_T.float(), c.cond.float()
    no_noise = prepared.run(cond, x_T, None)
    a = prepared.run(cond, x_T, None, seed=7)
    assert torch.isfinite(a).all() and not torch.allclose(a, no_noise, atol=1e-3)
    assert torch.equal(a, prepared.run(cond, x_T, None, seed=7))
    assert not torch.equal(a, prepared.run(cond, x_T, None, seed=8))


# ------------------------------------------------------------------------------------------------------------
# the backends, through fdp.Sampler


@pytest.mark.parametrize("name", ["triton", "triton-persistent"])
@pytest.mark.parametrize("dtype,H,sched,strategy,B", [
    (torch.float32, 40, "ddpm_clip", "topk", 1),
    (torch.bfloat16, 24, "ddim_eta", "soft", 17),
])
def test_backends_match_torch(name, dtype, H, sched, strategy, B):
    pol64 = kernel_policy(3, H, 2, 4, 3, strategy)
    factory, eta = SCHEDULERS[sched]
    cond = torch.randn(B, COND_DIM, dtype=torch.float64)
    pol = copy.deepcopy(pol64).float()
    sampler = fdp.Sampler(pol, factory(), num_inference_steps=4, eta=eta, backend=name, dtype=dtype)
    assert sampler.backend == name
    out = sampler(cond.float(), generator=torch.Generator().manual_seed(3))
    assert out.shape == (B, 4, 3) and out.dtype == torch.float32
    # The same draws (float32, as the generator gives them to the float32 sampler) for the float64 reference.
    x_T, step_noise = sampler.noise(B, torch.Generator().manual_seed(3))
    ref = fdp.Sampler(pol64, factory(), num_inference_steps=4, eta=eta, backend="torch")(
        cond, x_T=x_T.double(), step_noise=None if step_noise is None else step_noise.double())
    err = _rel_err(out, ref)
    print(f"[{name} {dtype} {sched} {strategy} B{B}] rel err vs float64 torch: {err:.2e}")
    assert err < TOL[dtype]
    if dtype != torch.float32:
        return
    # A float64 policy packed in float32: same numbers, output in the caller's dtype.
    out64 = fdp.Sampler(pol64, factory(), num_inference_steps=4, eta=eta, backend=name, dtype=torch.float32)(
        cond, x_T=x_T.double(), step_noise=None if step_noise is None else step_noise.double())
    assert out64.dtype == torch.float64 and _rel_err(out64, ref) < TOL[torch.float32]


def test_auto_ranks_interpreted_kernels_below_torch(monkeypatch):
    pol = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    assert get_backend("triton").priority < get_backend("torch").priority
    # Able to serve, but emulated kernels are slower than eager torch: skipped for their rank, which auto says.
    sampler = fdp.Sampler(pol, sched, num_inference_steps=2)
    assert sampler.backend == "torch"
    for name in ("triton", "triton-persistent"):
        assert sampler.selection.skipped()[name].startswith("ranked below") and "TRITON_INTERPRET=1" in \
            sampler.selection.skipped()[name]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert get_backend("triton-persistent").priority == 30 and get_backend("triton").priority == 20


# ------------------------------------------------------------------------------------------------------------
# refusal: unavailable devices, unsupported models, bad launcher inputs


def test_unavailable_without_interpreter_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    for name in ("triton", "triton-persistent"):
        reason = get_backend(name).unavailable_reason(torch.device("cpu"))
        assert "CUDA device" in reason and "TRITON_INTERPRET=1" in reason
        info = available_backends("cpu")[name]
        assert not info.available and "TRITON_INTERPRET" in info.reason
    pol = make_mlp_policy(K=2, dtype=torch.float32)
    assert fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2).backend == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2, backend="triton")


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("triton", "triton-persistent"):
        assert "pip install triton" in get_backend(name).unavailable_reason(torch.device("cpu"))


def _unet_policy():
    comps = [fdp.ConditionalUnet1D(3, global_cond_dim=COND_DIM, diffusion_step_embed_dim=8, down_dims=(8, 16),
                                   kernel_size=3, n_groups=4) for _ in range(2)]
    return fdp.FactorizedPolicy(comps, fdp.Router(COND_DIM, 2), 4, 3)


def _mixed_policy():
    comps = [fdp.MLPDenoiser(3, 4, global_cond_dim=COND_DIM, hidden_dim=h) for h in (16, 32)]
    return fdp.FactorizedPolicy(comps, fdp.Router(COND_DIM, 2), 4, 3)


@pytest.mark.parametrize("make,dtype,match", [
    (_unet_policy, None, "MLPDenoiser"),
    (_mixed_policy, None, "same"),
    (lambda: make_mlp_policy(K=9, dtype=torch.float32), None, "at most 8"),
    (lambda: make_mlp_policy(K=2, hidden=8, dtype=torch.float32), None, "hidden width"),
    (lambda: make_mlp_policy(K=2, hidden=520, blocks=1, dtype=torch.float32), None, "hidden width"),
    (lambda: make_mlp_policy(K=2, horizon=64, action_dim=9, dtype=torch.float32), None, "D = horizon"),
    (lambda: make_mlp_policy(K=2, dtype=torch.float64), None, "dtype"),
    (lambda: make_mlp_policy(K=2, dtype=torch.float32), torch.float64, "dtype"),
], ids=["unet", "mixed-widths", "K9", "H8", "H520", "D576", "float64", "float64-dtype"])
def test_unsupported_models_are_refused_with_a_reason(make, dtype, match):
    pol = make()
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    table = sched.step_table(2)
    for name in ("triton", "triton-persistent"):
        be = get_backend(name)
        assert be.unavailable_reason(torch.device("cpu")) is None
        reason = be.unsupported_reason(pol, table, dtype or next(pol.parameters()).dtype)
        assert reason and match in reason, reason
        with pytest.raises(ValueError, match=match):
            be.prepare(pol, table, dtype)
        with pytest.raises(ValueError, match=name):
            resolve_backend(name, pol, table, "cpu", dtype or next(pol.parameters()).dtype)
    if dtype is None:
        sampler = fdp.Sampler(pol, sched, num_inference_steps=2)
        assert sampler.backend == "torch"
        for name in ("triton", "triton-persistent"):
            assert match in sampler.selection.skipped()[name]


@pytest.fixture(scope="module")
def launch_args():
    c = Case(2, 24, 1, 4, 3, 5, "ddpm_clip", "soft", 3)
    return dict(packed=c.packed(torch.float32), steps=c.steps, call=c.call, coef=c.coef,
                adds_noise=c.adds_noise, x=c.x_T.reshape(c.B, c.D).float(), noise=c.kernel_noise())


def _widen(p):
    """Tensors of a pack with H = 8 (below the kernels' minimum)."""
    K, D, _ = p.w_in.shape
    L = p.w_a.shape[1]
    return dict(w_in=torch.zeros(K, D, 8), w_a=torch.zeros(K, L, 8, 8), w_b=torch.zeros(K, L, 8, 8),
                b_b=torch.zeros(K, L, 8), w_out=torch.zeros(K, 8, D))


def _non_contiguous(t):
    """The same values and shape, laid out with the first two dimensions swapped."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


BAD_INPUTS = [
    ("x-dtype", lambda a: a.update(x=a["x"].double()), TypeError, "`x` must have dtype"),
    ("x-cols", lambda a: a.update(x=a["x"][:, :-1].contiguous()), ValueError, "`x` must have D = 12"),
    ("x-3d", lambda a: a.update(x=a["x"].reshape(5, 4, 3)), ValueError, r"`x` must be \[B, D\]"),
    ("x-list", lambda a: a.update(x=a["x"].tolist()), TypeError, "`x` must be a torch.Tensor"),
    ("packed-type", lambda a: a.update(packed=object()), TypeError, "`packed` must be an fdp.packing.PackedMLP"),
    ("call-type", lambda a: a.update(call=a["steps"]), TypeError, "`call` must be an fdp.packing.CallTerms"),
    ("w_a-dtype", lambda a: a.update(packed=replaced(a["packed"], w_a=a["packed"].w_a.bfloat16())), TypeError,
     "`packed.w_a`"),
    ("w_in-dtype", lambda a: a.update(packed=replaced(a["packed"], w_in=a["packed"].w_in.double())), TypeError,
     "`packed.w_in`"),
    ("b_out-shape", lambda a: a.update(packed=replaced(a["packed"], b_out=a["packed"].b_out[:, :-1].contiguous())),
     ValueError, "`packed.b_out` must have shape"),
    ("weights-B", lambda a: a.update(call=replaced(a["call"], weights=a["call"].weights[:4].contiguous())),
     ValueError, "`call.weights` must have shape"),
    ("c_in-noncontig", lambda a: a.update(call=replaced(a["call"], c_in=_non_contiguous(a["call"].c_in))),
     ValueError, "`call.c_in` must be contiguous"),
    ("scale-device", lambda a: a.update(call=replaced(a["call"], scale=a["call"].scale.to("meta"))), ValueError,
     "`call.scale` must be on cpu"),
    ("t_shift-T", lambda a: a.update(steps=replaced(a["steps"], t_shift=a["steps"].t_shift[:2].contiguous())),
     ValueError, "`steps.t_shift`"),
    ("coef-dtype", lambda a: a.update(coef=a["coef"].double()), TypeError, "`coef`"),
    ("coef-cols", lambda a: a.update(coef=a["coef"][:, :5].contiguous()), ValueError, "`coef` must have shape"),
    ("adds-dtype", lambda a: a.update(adds_noise=a["adds_noise"].float()), TypeError, "`adds_noise`"),
    ("noise-shape", lambda a: a.update(noise=a["noise"][:, :4].contiguous()), ValueError, "`noise` must have shape"),
    ("noise-and-seed", lambda a: a.update(seed=3), ValueError, "not both"),
    ("seed-negative", lambda a: a.update(noise=None, seed=-1), ValueError, "`seed`"),
    ("out-dtype", lambda a: a.update(out=torch.empty(5, 12, dtype=torch.float64)), TypeError, "`out`"),
    ("clip-negative", lambda a: a.update(clip_range=-1.0), ValueError, "`clip_range`"),
    ("block_b", lambda a: a.update(block_b=8), ValueError, "`block_b`"),
    ("precision", lambda a: a.update(precision="tf16"), ValueError, "`precision`"),
    ("native-fp32", lambda a: a.update(precision="native"), ValueError, "`precision`='native'"),
    ("num_warps", lambda a: a.update(num_warps=3), ValueError, "`num_warps`"),
    ("regs-wide", lambda a: a.update(packed=replaced(a["packed"], **_widen(a["packed"]))), ValueError, "hidden widths"),
    ("scratch-small", lambda a: a.update(h_in_registers=False, scratch=torch.empty(10)), ValueError, "`scratch`"),
]


@pytest.mark.parametrize("launcher", ["mlp_step", "mlp_sample"])
@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_launchers_reject_bad_inputs(launch_args, launcher, name, mutate, exc, match):
    a = dict(launch_args)
    mutate(a)
    args = [a.pop(k) for k in ("packed", "steps", "call", "coef", "adds_noise")]
    x, noise = a.pop("x"), a.pop("noise")
    with pytest.raises(exc, match=match):
        if launcher == "mlp_step":
            mlp_step(*args, 0, x, noise, **a)
        else:
            mlp_sample(*args, x, noise, **a)


@pytest.mark.parametrize("launcher", ["mlp_step", "mlp_sample"])
def test_launchers_refuse_batch_zero(launch_args, launcher):
    a = launch_args
    x = torch.empty(0, a["x"].shape[1])
    args = [a[k] for k in ("packed", "steps", "call", "coef", "adds_noise")]
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        if launcher == "mlp_step":
            mlp_step(*args, 0, x, None)
        else:
            mlp_sample(*args, x, None)


@pytest.mark.parametrize("step", [-1, 3, 1.0, True])
def test_mlp_step_rejects_bad_step(launch_args, step):
    a = launch_args
    with pytest.raises(ValueError, match="`step`"):
        mlp_step(a["packed"], a["steps"], a["call"], a["coef"], a["adds_noise"], step, a["x"], a["noise"])


# ------------------------------------------------------------------------------------------------------------
# Native compilation (no GPU needed) and native runs (GPU only), in subprocesses without TRITON_INTERPRET

_COMPILE_SCRIPT = r'''
import os, sys, time
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch
try:
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    import triton.backends.nvidia  # noqa: F401
except Exception as exc:
    print("SKIP: no Triton NVIDIA compiler here:", exc)
    sys.exit(0)
from fdp_kernels.mlp_common import NOISE_NONE, NOISE_SEED, NOISE_TENSOR, block_config
from fdp_kernels.mlp_persistent import mlp_persistent_kernel
from fdp_kernels.mlp_step import mlp_step_kernel

TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WEIGHTS = ("w_in_ptr", "w_a_ptr", "w_b_ptr", "w_out_ptr")


def signature(kernel, wdt):
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + (TY[wdt] if p.name in WEIGHTS else "i8" if p.name == "adds_ptr" else "fp32")
        else:
            sig[p.name] = "fp32" if p.name == "clip_range" else "i32"
    return sig


f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
VARIANTS = [  # kernel, B, D, H, weight dtype, tuning, clip, noise
    (mlp_step_kernel, 1, 32, 256, f32, {}, True, NOISE_TENSOR),
    (mlp_step_kernel, 5, 15, 24, bf16, {}, False, NOISE_SEED),
    (mlp_step_kernel, 300, 112, 100, f16, {"precision": "native", "block_b": 32}, True, NOISE_NONE),
    (mlp_persistent_kernel, 1, 32, 256, bf16, {}, True, NOISE_TENSOR),
    (mlp_persistent_kernel, 17, 2, 16, f32, {}, False, NOISE_SEED),
    (mlp_persistent_kernel, 1, 512, 512, f32, {"precision": "tf32x3"}, True, NOISE_TENSOR),
    (mlp_persistent_kernel, 3, 12, 48, bf16, {"h_in_registers": True, "precision": "native"}, False, NOISE_NONE),
]
for kernel, B, D, H, wdt, tuning, clip, noise in VARIANTS:
    cfg = block_config(B, D, H, weight_dtype=wdt, **tuning)
    num_warps = cfg.pop("num_warps")
    cfg.update(SKIP_UNUSED=True, CLIP=clip, NOISE_MODE=noise)
    try:
        src = ASTSource(kernel, signature(kernel, wdt), constexprs=cfg)
    except (TypeError, KeyError) as exc:  # another Triton's ASTSource API
        print("SKIP: ASTSource API differs:", exc)
        sys.exit(0)
    t = time.time()
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    print(f"OK {kernel.__name__} B={B} D={D} H={H} {wdt} {cfg['PRECISION']} {time.time() - t:.1f}s", flush=True)
'''


def _run_script(script, timeout):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


def test_kernels_compile_for_sm90():
    """Triton's real front end and ptxas on the kernels (the interpreter misses e.g. loop-carried type changes)."""
    r = _run_script(_COMPILE_SCRIPT, timeout=600)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, f"compilation failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.count("OK ") == 7, r.stdout


_GPU_SCRIPT = r'''
import copy, sys
import torch
import fdp
from fdp.backends import get_backend
from fdp.backends.triton_backend import TritonBackend
from fdp.backends.triton_persistent_backend import TritonPersistentBackend
from conftest import make_mlp_policy
import fdp_kernels.mlp_step
assert type(fdp_kernels.mlp_step.mlp_step_kernel).__name__ != "InterpretedFunction", "kernels interpreted"

dev = torch.device("cuda")
failures = []
for sched, n, eta in ((fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                         clip_sample=True), 10, 0.0),
                      (fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"), 8, 0.5)):
    table = sched.step_table(n, eta=eta)
    for K, H, horizon, adim, strategy in ((4, 256, 16, 2, "soft"), (3, 24, 5, 3, "topk"), (2, 100, 7, 16, "hard")):
        kw = {"topk": 2} if strategy == "topk" else {}
        pol64 = make_mlp_policy(K=K, horizon=horizon, action_dim=adim, cond_dim=5, hidden=H, blocks=2,
                                strategy=strategy, **kw).to(dev)
        pol = copy.deepcopy(pol64).float()
        for B in (1, 300):
            cond = torch.randn(B, 5, device=dev, dtype=torch.float64)
            x_T = torch.randn(B, horizon, adim, device=dev)
            noise = torch.randn(n, B, horizon, adim, device=dev) if bool(table.adds_noise.any()) else None
            ref = get_backend("torch").prepare(pol64, table).run(cond, x_T.double(),
                                                                  None if noise is None else noise.double())
            for cls in (TritonBackend, TritonPersistentBackend):
                for dtype, tuning, tol in ((torch.float32, {}, 1e-4), (torch.float32, {"precision": "tf32x3"}, 1e-4),
                                           (torch.float32, {"precision": "tf32"}, 1e-2),
                                           (torch.bfloat16, {}, 2e-2), (torch.bfloat16, {"precision": "native"}, 2e-2),
                                           (torch.float16, {"precision": "native"}, 2e-2)):
                    prepared = cls(**tuning).prepare(pol, table, dtype)
                    out = prepared.run(cond.float(), x_T, noise)
                    err = float((out.double() - ref).abs().max() / ref.abs().max())
                    tag = f"{cls.name} {type(sched).__name__} K{K} H{H} D{horizon * adim} B{B} {dtype} {tuning}"
                    print(f"{tag}: rel err {err:.2e}", flush=True)
                    if not err < tol:
                        failures.append(f"{tag}: {err:.2e} >= {tol}")
                if noise is not None:
                    a = prepared.run(cond.float(), x_T, None, seed=5)
                    if not (torch.isfinite(a).all() and torch.equal(a, prepared.run(cond.float(), x_T, None, seed=5))):
                        failures.append(f"{cls.name}: seeded noise not finite or not deterministic")
torch.cuda.synchronize()
print("FAILURES:", failures)
sys.exit(1 if failures else 0)
'''


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_kernels_on_gpu():
    """Both backends compiled for the GPU (not interpreted) against the float64 reference."""
    r = _run_script(_GPU_SCRIPT, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-8000:]}\n{r.stderr[-6000:]}"
