"""The fused-MLP kernels and their backends: ``triton`` / ``triton-persistent`` (fdp_kernels) and
``cuda`` / ``cuda-persistent`` (csrc/, the ``fdp._C`` extension), on one table of problems, one
tolerance table and one table of bad launch inputs (the CUDA device code also runs on the CPU, emulated:
tests/test_cuda_emulation.py, on the same schedules and tolerances).

Triton runs everywhere: the kernels run on the CPU through ``TRITON_INTERPRET=1`` (set by
tests/conftest.py before anything imports Triton), with outputs written into NaN-poisoned buffers with
NaN canaries around them (the interpreter does no bounds checks), so an unwritten element or a stray
write fails; sizes stay small, the interpreter is slow. CUDA on a CPU (CI): the extension exposes its
entry points and reports CUDA failures as Python exceptions, and the Python layer validates every tensor
before a pointer is taken. On a GPU (``-m gpu``): the CUDA kernels with outputs written into NaN-poisoned
buffers, forced decompositions (column ranks, component groups, tensor cores), CUDA-graph capture and
replay, a non-default stream; and the Triton kernels compiled natively, in a subprocess.

Everything is compared with the float64 eager reference (``backend="torch"`` on a float64 policy; for
CUDA with its matrices rounded to the kernel's weight dtype) for the same ``x_T`` and step noise, by
relative error ``max|a - b| / max|b|``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import types

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fdp  # noqa: E402
from helpers import (KERNEL_COND_DIM, KERNEL_PROBLEMS, KERNEL_SCHEDULERS, KERNEL_TOL,  # noqa: E402
                     assert_signed_unnormalised, assert_within_float32_bound, kernel_matmuls,
                     kernel_policy, make_mlp_policy, rel_err, replaced, rounded_reference, signed_tanh_routing,
                     round_to_tf32, tf32_kernel_bound, tf32_matmuls, torch_loop_bound)
from fdp import packing  # noqa: E402
from fdp.backends import available_backends, get_backend, resolve_backend  # noqa: E402
from fdp.backends import cuda_backend as cb  # noqa: E402
from fdp_kernels import abi, mlp_common  # noqa: E402
from fdp_kernels.mlp_persistent import mlp_persistent_kernel, mlp_sample  # noqa: E402
from fdp_kernels.mlp_step import mlp_step, mlp_step_kernel  # noqa: E402

NAN = float("nan")
PAD = 37  # canary floats on each side of every Triton kernel output
COND_DIM = KERNEL_COND_DIM

SCHEDULERS = KERNEL_SCHEDULERS
TOL = KERNEL_TOL
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _ext_or_skip():
    st = fdp.extension_status()
    if not st["available"]:
        pytest.skip(f"fdp._C not built: {st['reason']}")
    from fdp._extension import extension
    return extension()


def _has_gpu():
    return torch.cuda.is_available() and fdp.extension_status()["available"]


gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA device and the fdp._C extension")


# The two kernel families, each a per-step and a persistent backend; CUDA's kernels run only on a GPU.
BACKENDS = {"triton": ("triton", "triton-persistent"), "cuda": ("cuda", "cuda-persistent")}
FAMILY_MARKS = {"triton": (), "cuda": (pytest.mark.gpu, gpu)}


def _family(name):
    return name.split("-")[0]


def _families():
    return [pytest.param(f, marks=FAMILY_MARKS[f]) for f in BACKENDS]


# ------------------------------------------------------------------------------------------------------------
# one problem: its draws and reference, then each family's kernel inputs


class _Draws:
    """A float64 policy, a scheduler table, x_T, step noise and the float64 reference on the policy with its
    matrices rounded to ``ref_dtype`` (None: the policy as it is)."""

    def __init__(self, K, H, L, horizon, action_dim, B, sched, strategy, T, seed=0, ref_dtype=None, inpaint=None):
        self.policy = kernel_policy(K, H, L, horizon, action_dim, strategy, seed)
        factory, eta = SCHEDULERS[sched]
        self.table = factory().step_table(T, eta=eta)
        g = torch.Generator().manual_seed(seed + 1)
        self.B, self.D, self.shape, self.T = B, horizon * action_dim, (B, horizon, action_dim), T
        self.cond = torch.randn(B, COND_DIM, generator=g, dtype=torch.float64)
        self.x_T = torch.randn(self.shape, generator=g, dtype=torch.float64)
        # NaN in the slices of steps that add no noise (DDPM's t = 0): kernels must not read them into x.
        self.noise = torch.randn((T, *self.shape), generator=g, dtype=torch.float64)
        self.noise[~self.table.adds_noise] = NAN
        self.adds = bool(self.table.adds_noise.any())
        # Inpainting (fdp.inpainting): a random mask and known values, one set for every step ("same") or one per
        # step ("per_step"); NaN where unmasked, so a kernel that reads one there fails.
        self.known = self.known_mask = None
        if inpaint is not None:
            self.known_mask = torch.rand(self.shape, generator=g) < 0.5
            self.known_mask.view(-1)[0] = True
            self.known = torch.randn((T, *self.shape) if inpaint == "per_step" else self.shape, generator=g,
                                     dtype=torch.float64)
            self.known[..., ~self.known_mask] = NAN
        ref_policy = self.policy if ref_dtype is None else rounded_reference(self.policy, ref_dtype)
        self.ref = get_backend("torch").prepare(ref_policy, self.table).run(
            self.cond, self.x_T, self.noise if self.adds else None, self.known, self.known_mask)

    def kernel_known(self, device="cpu"):
        """``(known, known_mask)`` as the kernels take them: float32 ``[B, D]`` / ``[T, B, D]``, bool ``[B, D]``."""
        if self.known is None:
            return {}
        known = self.known.reshape(-1, self.B, self.D).squeeze(0) if self.known.ndim == 3 else \
            self.known.reshape(self.T, self.B, self.D)
        return dict(known=known.float().contiguous().to(device),
                    known_mask=self.known_mask.reshape(self.B, self.D).to(device))


def _poisoned(numel):
    """A NaN buffer with PAD canaries on both sides, and the view of its middle."""
    buf = torch.full((numel + 2 * PAD,), NAN)
    return buf, buf[PAD:PAD + numel]


def _assert_canaries(buf, what):
    assert torch.isnan(buf[:PAD]).all() and torch.isnan(buf[-PAD:]).all(), f"{what}: write outside the buffer"


COUNTER_CANARY = -7


def _assert_counters(buf, what):
    """The split kernel's arrival counters (between PAD canaries) are back to 0 after a launch."""
    assert (buf[:PAD] == COUNTER_CANARY).all() and (buf[-PAD:] == COUNTER_CANARY).all(), \
        f"{what}: write outside the counters"
    assert (buf[PAD:-PAD] == 0).all(), f"{what}: arrival counters not reset: {buf[PAD:-PAD].tolist()}"


class TritonCase(_Draws):
    """A problem's Triton kernel inputs (CPU, float32), poisoned outputs and canary checks."""

    def __init__(self, K, H, L, horizon, action_dim, B, sched, strategy, T, seed=0, inpaint=None):
        super().__init__(K, H, L, horizon, action_dim, B, sched, strategy, T, seed, inpaint=inpaint)
        self.steps = packing.step_terms(self.policy, self.table.timesteps)
        self.call = packing.call_terms(self.policy, self.cond, self.policy.weights(self.cond))
        tbl = self.table.to("cpu", torch.float32)
        self.coef, self.adds_noise = tbl.coef, tbl.adds_noise
        self.clip = tbl.clip_range if tbl.clip_sample else None

    def packed(self, dtype):
        return packing.pack_policy(self.policy, dtype)

    def kernel_noise(self):
        return self.noise.reshape(len(self.table), self.B, self.D).float().contiguous() if self.adds else None

    def workspace(self, packed, persistent=False, **tuning):
        """Poisoned scratch (None when the launch needs none) and, for a split launch, zero arrival counters
        between canaries: ``(scratch buffer, scratch, counters buffer, counters)``."""
        cfg = mlp_common.block_config(self.B, self.D, packed.H, tuning.get("block_b"), tuning.get("h_in_registers"),
                                      tuning.get("precision"), packed.dtype, tuning.get("num_warps"), K=packed.K,
                                      split=False if persistent else tuning.get("split"))
        need = mlp_common.scratch_numel(self.B, self.D, packed.K, cfg)
        sbuf, scratch = _poisoned(need) if need else (None, None)
        tiles = mlp_common.counters_numel(self.B, cfg)
        cbuf = torch.full((tiles + 2 * PAD,), COUNTER_CANARY, dtype=torch.int32)
        cbuf[PAD:PAD + tiles] = 0
        return sbuf, scratch, cbuf, (cbuf[PAD:PAD + tiles] if tiles else None)

    def run_steps(self, packed, **tuning):
        """The per-step kernel T times, each into a fresh poisoned buffer; a split launch leaves its counters 0."""
        x = self.x_T.reshape(self.B, self.D).float()
        noise = self.kernel_noise()
        sbuf, scratch, cbuf, counters = self.workspace(packed, **tuning)
        for i in range(len(self.table)):
            buf, out = _poisoned(self.B * self.D)
            res = mlp_step(packed, self.steps, self.call, self.coef, self.adds_noise, i, x, noise,
                           clip_range=self.clip, out=out.view(self.B, self.D), scratch=scratch, counters=counters,
                           **self.kernel_known(), **tuning)
            _assert_canaries(buf, f"mlp_step out (step {i})")
            assert res.data_ptr() == out.data_ptr()
            assert torch.isfinite(res).all(), f"step {i} left elements unwritten"
            _assert_counters(cbuf, f"mlp_step (step {i})")
            x = res
        if sbuf is not None:
            _assert_canaries(sbuf, "mlp_step scratch")
        return x.reshape(self.shape)

    def run_persistent(self, packed, **tuning):
        buf, out = _poisoned(self.B * self.D)
        sbuf, scratch, _, _ = self.workspace(packed, persistent=True, **tuning)
        res = mlp_sample(packed, self.steps, self.call, self.coef, self.adds_noise,
                         self.x_T.reshape(self.B, self.D).float(), self.kernel_noise(), clip_range=self.clip,
                         out=out.view(self.B, self.D), scratch=scratch, **self.kernel_known(), **tuning)
        _assert_canaries(buf, "mlp_sample out")
        if sbuf is not None:
            _assert_canaries(sbuf, "mlp_sample scratch")
        assert torch.isfinite(res).all(), "mlp_sample left elements unwritten"
        return res.reshape(self.shape)


class CudaCase(_Draws):
    """A problem's CUDA kernel inputs on the GPU (the reference's matrices rounded to the weight dtype)."""

    def __init__(self, K, H, L, horizon, action_dim, B, sched, strategy, T, dtype, seed=0, inpaint=None):
        super().__init__(K, H, L, horizon, action_dim, B, sched, strategy, T, seed, ref_dtype=dtype, inpaint=inpaint)
        dev = torch.device("cuda")
        pol32 = copy.deepcopy(self.policy).float().to(dev)
        self.pol32 = pol32
        tab = self.table.to(dev)
        self.packed = packing.pack_policy(pol32, dtype)
        self.steps = packing.step_terms(pol32, tab.timesteps)
        cond = self.cond.float().to(dev)
        self.call = packing.call_terms(pol32, cond, pol32.weights(cond))
        self.coef = cb.kernel_coef(tab)
        self.clip = float(self.table.clip_range) if self.table.clip_sample else None
        self.x = self.x_T.reshape(B, self.D).float().to(dev)
        self.knoise = self.noise.reshape(T, B, self.D).float().to(dev) if self.adds else None

    def run(self, kind, **options):
        out = torch.full((self.B, self.D), NAN, device="cuda")
        res = cb.launch(kind, self.packed, self.steps, self.call, self.coef, self.x, self.knoise, out, self.clip,
                        options=options, **self.kernel_known("cuda"))
        assert res is out
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "elements left unwritten (NaN poison survived)"
        return out.reshape(self.shape).cpu()


def _cpu_launch_args(K=3, H=24, L=2, horizon=4, action_dim=3, B=5, T=3, dtype=torch.float32):
    """Valid launch tensors on the CPU (for the validation layer only)."""
    pol = kernel_policy(K, H, L, horizon, action_dim, dtype=torch.float32)
    table = SCHEDULERS["ddpm_clip"][0]().step_table(T)
    cond = torch.randn(B, COND_DIM)
    D = horizon * action_dim
    return dict(packed=packing.pack_policy(pol, dtype), steps=packing.step_terms(pol, table.timesteps),
                call=packing.call_terms(pol, cond, pol.weights(cond)), coef=cb.kernel_coef(table), x=torch.randn(B, D),
                noise=torch.randn(T, B, D), out=torch.empty(B, D), clip_range=1.0)


# ------------------------------------------------------------------------------------------------------------
# both families' kernels against the float64 reference

TRITON, CUDA, BOTH = {"triton": {}}, {"cuda": {}}, {"triton": {}, "cuda": {}}


def _problem(name):
    """A problem the CUDA emulation runs too (helpers.KERNEL_PROBLEMS), as a row's first ten fields."""
    p = KERNEL_PROBLEMS[name]
    return tuple(p[k] for k in ("K", "H", "L", "horizon", "action_dim", "B", "sched", "strategy", "T", "dtype"))


# K, H, L, horizon, action_dim, B, scheduler, strategy, T, weight dtype, then per family the tuning the
# problem runs with (Triton launcher keywords, CUDA kernel options); a family not named does not run it.
KERNEL_CASES = [
    (*_problem("target"), CUDA),                                    # the target: K 4, H 256, batch 1
    (1, 16, 1, 2, 1, 1, "ddim_eta", "soft", 4, F32, BOTH),          # D = 2, one row
    (3, 24, 2, 5, 3, 5, "ddim", "soft", 4, F32, BOTH),              # H not a power of two, D = 15
    (4, 48, 2, 7, 16, 17, "ddim_eta", "hard", 3, F32, BOTH),        # D = 112, several tiles
    (8, 40, 1, 4, 3, 17, "ddpm_v", "topk", 2, F32, TRITON),         # K = 8, top-2 routing
    (8, 40, 1, 4, 3, 17, "ddpm_v", "topk", 3, F32, CUDA),
    (2, 100, 2, 10, 16, 5, "ddpm_clip", "fixed", 3, F32, TRITON),   # Triton's scratch path, D = 160
    (2, 100, 3, 10, 16, 5, "ddpm_clip", "fixed", 3, F32, CUDA),     # L = 3, D = 160
    (5, 32, 2, 3, 5, 17, "ddim_eta", "soft", 2, F32, {"triton": {"h_in_registers": False}}),  # forced scratch
    (2, 256, 1, 4, 2, 1, "ddim", "soft", 2, F32, TRITON),           # wide: H = 256, B = 1
    (6, 17, 1, 3, 5, 2, "ddim_eta", "soft", 3, F32, CUDA),          # odd H: unaligned rows
    (1, 300, 1, 2, 3, 1, "ddpm_clip", "hard", 2, F32, BOTH),        # H = 300 (Triton pads it to 320)
    (4, 256, 2, 16, 2, 1, "ddpm_clip", "soft", 6, BF16, CUDA),      # target shape, bf16
    # bf16, D = 15: Triton with H in registers forced, CUDA's FMA path on unaligned rows.
    (*_problem("bf16"), {"triton": {"h_in_registers": True}, "cuda": {}}),
    (5, 96, 2, 8, 4, 70, "ddim", "hard", 3, BF16, CUDA),            # tensor cores, several tiles
    (4, 64, 2, 4, 3, 16, "ddim_eta", "topk", 3, F16, CUDA),         # tensor cores, fp16
    (3, 40, 1, 5, 3, 33, "ddpm_clip", "soft", 3, F16, CUDA),        # tensor cores, odd D and H % 16 != 0
    (2, 72, 1, 4, 3, 300, "ddim_eta", "soft", 2, F32, CUDA),        # many tiles
    (3, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3, F16, {"triton": {"precision": "native"}}),  # (bf16: GPU only)
    (2, 72, 1, 4, 3, 5, "ddim_eta", "hard", 3, F32, {"triton": {"precision": "tf32x3", "num_warps": 4}}),
    (2, 80, 1, 4, 3, 17, "ddim_eta", "topk", 3, BF16, {"triton": {"precision": "ieee"}}),
    (3, 24, 2, 3, 5, 5, "ddpm_v", "hard", 3, F16, TRITON),
    (2, 64, 2, 4, 3, 33, "ddim", "soft", 2, F32, {"triton": {"block_b": 32, "precision": "tf32"}}),
    (1, 512, 1, 2, 2, 1, "ddim_eta", "soft", 1, BF16, TRITON),      # the widest H
    (2, 16, 1, 32, 16, 3, "ddpm_clip", "topk", 2, F32, TRITON),     # the largest D = 512
    # tanh routing (the FDP authors'): signed weights whose rows do not sum to 1 (helpers.signed_tanh_routing).
    (4, 48, 2, 7, 16, 17, "ddim_eta", "tanh", 3, F32, BOTH),        # several tiles
    (2, 40, 1, 4, 3, 1, "ddpm_v", "tanh", 2, F32, BOTH),            # batch 1
    (3, 24, 1, 5, 3, 5, "ddpm_clip", "tanh", 3, BF16, BOTH),        # bf16, clipping
    # Tensor cores, several tiles. K = 6: with K = 5 the alternating signs sum to about 0.6-0.8 and 13 of these 70
    # rows came within 0.1 of 1 (assert_signed_unnormalised refused the case); K = 6 rows stay 0.6 or more away.
    (6, 96, 2, 8, 4, 70, "ddim", "tanh", 3, BF16, CUDA),
    (3, 24, 2, 3, 5, 5, "ddim_eta", "tanh", 3, F32, {"triton": {"h_in_registers": False}}),  # forced scratch
    # Inpainting (the "inpaint" entry: one replacement for every step, or one per step): batch 1, D = 2; odd
    # D = 15; the split per-step kernel over a partial second tile; tensor cores.
    (1, 16, 1, 2, 1, 1, "ddpm_clip", "soft", 3, F32, {"triton": {"inpaint": "same"}, "cuda": {"inpaint": "same"}}),
    (3, 24, 2, 5, 3, 5, "ddim_eta", "soft", 4, F32, {"triton": {"inpaint": "per_step"},
                                                     "cuda": {"inpaint": "per_step"}}),
    (4, 48, 1, 7, 3, 17, "ddim", "hard", 2, F32, {"triton": {"inpaint": "per_step"}, "cuda": {"inpaint": "same"}}),
    (4, 64, 2, 4, 3, 16, "ddim_eta", "topk", 3, F16, {"cuda": {"inpaint": "per_step"}}),
]


@contextlib.contextmanager
def _tf32_dots_in_interpreter():
    """Triton's interpreter computes ``tl.dot(..., input_precision="tf32")`` in float32 (np.matmul, Triton 3.9);
    for the duration, its float32 dots in tf32 round both operands to tf32 (to nearest, helpers.round_to_tf32)
    first, as tensor cores take them, so that the kernels' tf32 path errs on the CPU as on a GPU. Skips where the
    interpreter's internals differ."""
    interp = pytest.importorskip("triton.runtime.interpreter")
    from triton._C.libtriton import ir

    builder, handle = getattr(interp, "InterpreterBuilder", None), getattr(interp, "TensorHandle", None)
    tf32 = getattr(getattr(ir, "INPUT_PRECISION", None), "TF32", None)
    if builder is None or handle is None or tf32 is None or not hasattr(builder, "create_dot"):
        pytest.skip("this Triton's interpreter has no create_dot to round tf32 operands in")
    plain, rounded = builder.create_dot, []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == tf32 and a.dtype == tl.float32 and b.dtype == tl.float32:
            def rnd(h):
                return handle(round_to_tf32(torch.from_numpy(h.data.copy())).float().numpy(), h.dtype)
            a, b = rnd(a), rnd(b)
            rounded.append(1)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    try:
        yield rounded
    finally:
        builder.create_dot = plain


def _case_id(case, tuning=()):
    K, H, L, h, a, B, s, r, T, dt = case[:10]
    return f"K{K}-H{H}-L{L}-D{h * a}-B{B}-{s}-{r}-{str(dt).split('.')[-1]}" + "".join(f"-{k}" for k in tuning)


@pytest.mark.parametrize("family,case,tuning", [
    pytest.param(family, case[:10], tuning, id=f"{family}-{_case_id(case, tuning)}", marks=FAMILY_MARKS[family])
    for case in KERNEL_CASES for family, tuning in case[10].items()])
def test_kernels_match_float64_reference(family, case, tuning):
    dtype = case[9]
    tol = TOL[dtype]
    tuning = dict(tuning)
    inpaint = tuning.pop("inpaint", None)
    if family == "triton":
        c = TritonCase(*case[:9], inpaint=inpaint)
        packed = c.packed(dtype)
        tf32 = tuning.get("precision") == "tf32" and dtype == torch.float32
        if tf32:
            # Matmul operands rounded to tf32: the bound derived for this loop on these inputs (helpers.
            # tf32_kernel_bound; test_tf32_bound_is_derived_and_tight), which the native GPU sweep uses too.
            _, bound = tf32_kernel_bound(c.policy, c.table, c.cond, c.x_T, c.noise if c.adds else None)
            tol = float(bound / c.ref.abs().max())
        with _tf32_dots_in_interpreter() if tf32 else contextlib.nullcontext() as rounded:
            step_out = c.run_steps(packed, **tuning)
            pers_out = c.run_persistent(packed, **tuning)
        assert not tf32 or rounded, "no tf32 dot was rounded: the case computed float32"
    else:
        c = CudaCase(*case, inpaint=inpaint)
        step_out = c.run(cb.KIND_STEP, **tuning)
        pers_out = c.run(cb.KIND_PERSISTENT, **tuning)
    if case[7] == "tanh":
        assert_signed_unnormalised(c.call.weights)
    e_step, e_pers = rel_err(step_out, c.ref), rel_err(pers_out, c.ref)
    print(f"[{family}-{_case_id(case, tuning)}] rel err: {BACKENDS[family][0]} {e_step:.2e}, "
          f"{BACKENDS[family][1]} {e_pers:.2e} (bound {tol:.2e})")
    assert e_step < tol and e_pers < tol
    if inpaint is not None:
        # The masked entries are the known values themselves (float32's rounding of them), on every backend.
        want = c.known if c.known.ndim == 3 else c.known[-1]
        for out in (step_out, pers_out):
            torch.testing.assert_close(out[c.known_mask], want[c.known_mask].float(), rtol=0, atol=0)
    if family == "triton":
        # The two Triton kernels do the same float32 arithmetic in the same order.
        torch.testing.assert_close(step_out, pers_out, rtol=0, atol=0)


# Problems of the native GPU script's tf32 sweep (_GPU_SCRIPT): scheduler, steps, eta, K, H, horizon, action_dim,
# strategy, batch (the GPU runs 1 and 300; the CPU, slower in float64, 1 and 17 at the widest H).
TF32_PROBLEMS = [
    ("ddpm_cos_clip", 10, 0.0, 4, 256, 16, 2, "soft", 1),
    ("ddim_cos", 8, 0.5, 4, 256, 16, 2, "soft", 17),
    ("ddpm_cos_clip", 10, 0.0, 3, 24, 5, 3, "topk", 300),
    ("ddim_cos", 8, 0.5, 2, 100, 7, 16, "hard", 1),
    ("ddpm_cos_clip", 10, 0.0, 2, 100, 7, 16, "hard", 300),
]
TF32_SCHEDULERS = {
    "ddpm_cos_clip": lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                               clip_sample=True),
    "ddim_cos": lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"),
}


def _tf32_bugs(policy, table, cond):
    """Plausible kernel bugs, each as what the torch loop computes instead: name -> (policy, table)."""
    dropped = copy.deepcopy(policy)  # the component with the largest weight on row 0 contributes nothing
    k = int(policy.weights(cond)[0].argmax())
    with torch.no_grad():
        dropped.components[k].out.weight.zero_()
        dropped.components[k].out.bias.zero_()
    skipped = table.coef.clone()  # the middle step leaves x as it is
    skipped[len(table) // 2] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=skipped.dtype)
    swapped = table.coef.clone()  # the c_x and c_m columns exchanged
    swapped[:, [3, 4]] = swapped[:, [4, 3]]
    retable = lambda coef: fdp.schedulers.StepTable(table.timesteps, coef, table.adds_noise,  # noqa: E731
                                                    table.clip_sample, table.clip_range)
    return {"dropped component": (dropped, table), "skipped step": (policy, retable(skipped)),
            "swapped columns": (policy, retable(swapped))}


@pytest.mark.parametrize("problem", TF32_PROBLEMS, ids=lambda p: "-".join(map(str, p)))
def test_tf32_bound_is_derived_and_tight(problem):
    """The tf32 bound of the native GPU sweep (helpers.tf32_kernel_bound) on the CPU: a tf32 evaluation of the
    loop, emulated in torch with both operands of every kernel matmul rounded to 10 mantissa bits (to nearest
    and toward zero), is within it; a dropped component, a skipped step or swapped coefficient columns, each
    under the same tf32 rounding, are not."""
    sched, n, eta, K, H, horizon, adim, strategy, B = problem
    table = TF32_SCHEDULERS[sched]().step_table(n, eta=eta)
    pol64 = make_mlp_policy(K=K, horizon=horizon, action_dim=adim, cond_dim=COND_DIM, hidden=H, blocks=2,
                            strategy=strategy, **({"topk": 2} if strategy == "topk" else {}))
    g = torch.Generator().manual_seed(B)
    cond = torch.randn(B, COND_DIM, generator=g, dtype=torch.float64)
    x_T = torch.randn(B, horizon, adim, generator=g, dtype=torch.float64)
    noise = torch.randn(n, B, horizon, adim, generator=g, dtype=torch.float64) if table.adds_noise.any() else None
    x64, bound = tf32_kernel_bound(pol64, table, cond, x_T, noise)

    def tf32_run(policy, tab, toward_zero=False):
        hooks = tf32_matmuls(kernel_matmuls(policy), toward_zero)
        try:
            return get_backend("torch").prepare(policy, tab).run(cond, x_T, noise)
        finally:
            for h in hooks:
                h.remove()

    ratios = {mode: float((tf32_run(pol64, table, mode == "toward zero") - x64).abs().max() / bound)
              for mode in ("to nearest", "toward zero")}
    print(f"bound {float(bound / x64.abs().max()):.2e} of max|x|; tf32 errors at {ratios} of it")
    assert max(ratios.values()) <= 1, ratios
    for bug, (policy, tab) in _tf32_bugs(pol64, table, cond).items():
        err = float((tf32_run(policy, tab) - x64).abs().max())
        assert err > bound, f"{bug}: {err:.3g} within the tf32 bound {float(bound):.3g}"


def _route_nothing_to_1(policy, strategy):
    """Component 1 gets weight exactly 0 on every row: fixed [0.6, 0, 0.4], or tanh with its logit row zeroed
    (the others signed, unnormalised)."""
    if strategy == "fixed":
        policy.router.set_strategy("fixed", fixed_weights=[0.6, 0.0, 0.4])
    else:
        signed_tanh_routing(policy, zero_comp=1)


@pytest.mark.parametrize("strategy", ["fixed", "tanh"])
@pytest.mark.parametrize("family", _families())
def test_skips_components_no_row_uses(family, strategy):
    """Weight 0 for every row of a tile: skipping the component changes nothing (a NaN component stays
    out either way: a zero weight leaves it out per row, as fdp.FactorizedPolicy.compose does); the
    result is bit-equal, skipped or not. Under tanh the other weights are signed and unnormalised: only a
    weight of exactly 0 is skipped."""
    if family == "cuda":
        c = CudaCase(3, 24, 1, 4, 3, 5, "ddim", strategy, 2, torch.float32)
        _route_nothing_to_1(c.pol32, strategy)
        cond = c.cond.float().cuda()
        c.call = packing.call_terms(c.pol32, cond, c.pol32.weights(cond))
        assert (c.call.weights[:, 1] == 0).all()
        if strategy == "tanh":
            assert_signed_unnormalised(c.call.weights)
        # Bit-equal per kind, each against its own launch before the component's weights were spoilt: the two
        # kinds may plan different component groups (on GPUs without clusters they do), and a group's
        # epilogue may contract w_k * y_k into an FMA where a global combine adds rounded partials.
        expect = {kind: c.run(kind) for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT)}
        for attr in ("w_in", "w_a", "w_b", "w_out"):
            getattr(c.packed, attr)[1] = NAN
        for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT):
            torch.testing.assert_close(c.run(kind), expect[kind], rtol=0, atol=0)
        # Evaluated without the skip, its NaN output stays out of every row too.
        torch.testing.assert_close(c.run(cb.KIND_PERSISTENT, skip_unused=0), expect[cb.KIND_PERSISTENT], rtol=0,
                                   atol=0)
        return
    c = TritonCase(3, 24, 1, 4, 3, 5, "ddim", strategy, 2)
    _route_nothing_to_1(c.policy, strategy)
    c.call = packing.call_terms(c.policy, c.cond, c.policy.weights(c.cond))
    assert (c.call.weights[:, 1] == 0).all()
    if strategy == "tanh":
        assert_signed_unnormalised(c.call.weights)
        # The components' weights are not what made the result: the skip-free float64 reference agrees.
        ref = get_backend("torch").prepare(c.policy, c.table).run(c.cond, c.x_T, None)
    packed = c.packed(torch.float32)
    expect = c.run_persistent(packed)
    if strategy == "tanh":
        assert rel_err(expect, ref) < TOL[torch.float32]
    for attr in ("w_in", "w_a", "w_b", "w_out"):
        getattr(packed, attr)[1] = NAN
    torch.testing.assert_close(c.run_steps(packed), expect, rtol=0, atol=0)
    torch.testing.assert_close(c.run_persistent(packed), expect, rtol=0, atol=0)
    # Without skipping, the NaN component is evaluated, and the zero weight still keeps it out of every row.
    out = mlp_sample(packed, c.steps, c.call, c.coef, c.adds_noise, c.x_T.reshape(c.B, c.D).float(), None,
                     clip_range=c.clip, skip_unused=False)
    torch.testing.assert_close(out, expect.reshape(out.shape), rtol=0, atol=0)


@pytest.mark.parametrize("family", _families())
def test_in_place_output(family):
    if family == "cuda":
        c = CudaCase(2, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3, torch.float32)
        # The decompositions sum in different orders, so they agree only to float32 rounding: each in-place
        # result is checked against the out-of-place run of the same launch (bit for bit: the same arithmetic,
        # and the cross-block combine sums the groups' partials in a fixed order, csrc/mlp_tile.cuh), and
        # within the float32 error growth derived for this loop (helpers.torch_loop_bound) of the float64 one.
        x64, bound = torch_loop_bound(c.policy, c.table, c.cond, c.x_T, c.noise if c.adds else None, c.known,
                                      c.known_mask)
        for kind, opts in ((cb.KIND_STEP, {}), (cb.KIND_STEP, {"groups": 2}), (cb.KIND_PERSISTENT, {})):
            expect = c.run(kind, **opts).reshape(c.B, c.D).cuda()
            x = c.x.clone()
            cb.launch(kind, c.packed, c.steps, c.call, c.coef, x, c.knoise, x, c.clip, options=opts)
            torch.cuda.synchronize()
            torch.testing.assert_close(x, expect, rtol=0, atol=0)
            assert_within_float32_bound(x.reshape(c.shape), x64, bound, f"in place, kind {kind} {opts}")
        return
    c = TritonCase(2, 24, 1, 4, 3, 17, "ddpm_clip", "soft", 3)
    packed = c.packed(torch.float32)
    expect = c.run_persistent(packed).reshape(c.B, c.D)
    x = c.x_T.reshape(c.B, c.D).float().clone()
    assert mlp_sample(packed, c.steps, c.call, c.coef, c.adds_noise, x, c.kernel_noise(), clip_range=c.clip,
                      out=x) is x
    torch.testing.assert_close(x, expect, rtol=0, atol=0)
    x = c.x_T.reshape(c.B, c.D).float().clone()
    for i in range(len(c.table)):
        mlp_step(packed, c.steps, c.call, c.coef, c.adds_noise, i, x, c.kernel_noise(), clip_range=c.clip, out=x)
        if i == len(c.table) - 2:
            short = x.clone()
    torch.testing.assert_close(x, expect, rtol=0, atol=0)
    # The float32 bound the CUDA case checks its decompositions with: the result is within it, and the same
    # loop one step short (a skipped step) is not.
    x64, bound = torch_loop_bound(c.policy, c.table, c.cond, c.x_T, c.noise if c.adds else None, c.known,
                                  c.known_mask)
    assert_within_float32_bound(x.reshape(c.shape), x64, bound, "in place")
    assert float((short.reshape(c.shape).double() - x64).abs().max()) > bound


# ------------------------------------------------------------------------------------------------------------
# the four backends through fdp.Sampler

# Per family: weight dtype, H, scheduler, strategy, B.
SAMPLER_CASES = {
    "triton": [(F32, 40, "ddpm_clip", "topk", 1), (BF16, 24, "ddim_eta", "soft", 17), (F32, 24, "ddpm_v", "tanh", 5)],
    "cuda": [(F32, 40, "ddpm_clip", "topk", 1), (F32, 40, "ddim", "hard", 9), (F32, 40, "ddim_eta", "soft", 4),
             (BF16, 40, "ddim_eta", "soft", 17), (F16, 40, "ddpm_clip", "soft", 2), (F32, 40, "ddpm_clip", "tanh", 3),
             (BF16, 40, "ddim_eta", "tanh", 17)],
}


# The CPU backends without kernels of their own (PyTorch batched matmuls, ONNX Runtime on the exported loop),
# through the same test: per backend, weight dtype, H, scheduler, strategy, B. ONNX Runtime computes in the
# policy's dtype (float32 only).
CPU_SAMPLER_CASES = {
    "torch-batched": [(F32, 40, "ddpm_clip", "topk", 1), (F32, 17, "ddpm_v", "hard", 5),
                      (BF16, 24, "ddim_eta", "soft", 17), (F16, 24, "ddpm_clip", "soft", 2)],
    "onnxruntime": [(F32, 40, "ddpm_clip", "topk", 1), (F32, 17, "ddpm_v", "hard", 5),
                    (F32, 24, "ddim_eta", "soft", 17), (F32, 24, "ddim", "fixed", 3)],
}


@pytest.mark.parametrize("name,dtype,H,sched,strategy,B", [
    pytest.param(name, *case, marks=FAMILY_MARKS[family])
    for family, names in BACKENDS.items() for case in SAMPLER_CASES[family] for name in names] + [
    pytest.param(name, *case) for name, cases in CPU_SAMPLER_CASES.items() for case in cases])
def test_backends_match_torch(name, dtype, H, sched, strategy, B):
    pol64 = kernel_policy(3, H, 2, 4, 3, strategy)
    factory, eta = SCHEDULERS[sched]
    cond = torch.randn(B, COND_DIM, dtype=torch.float64)
    if _family(name) == "cuda":
        pol = copy.deepcopy(pol64).float().cuda()
        sampler = fdp.Sampler(pol, factory(), num_inference_steps=5, eta=eta, backend=name, dtype=dtype)
        assert sampler.backend == name
        gen = torch.Generator(device="cuda").manual_seed(3)
        x_T, step_noise = sampler.noise(B, gen)
        out = sampler(cond.float().cuda(), x_T=x_T, step_noise=step_noise)
        assert out.shape == (B, 4, 3) and out.dtype == torch.float32 and out.is_cuda
        ref = fdp.Sampler(rounded_reference(pol64, dtype), factory(), num_inference_steps=5, eta=eta,
                          backend="torch")(
            cond, x_T=x_T.double().cpu(), step_noise=None if step_noise is None else step_noise.double().cpu())
    else:
        pol = copy.deepcopy(pol64).float()
        sampler = fdp.Sampler(pol, factory(), num_inference_steps=4, eta=eta, backend=name, dtype=dtype)
        assert sampler.backend == name
        out = sampler(cond.float(), generator=torch.Generator().manual_seed(3))
        assert out.shape == (B, 4, 3) and out.dtype == torch.float32
        # The same draws (float32, as the generator gives them to the float32 sampler) for the float64 reference.
        x_T, step_noise = sampler.noise(B, torch.Generator().manual_seed(3))
        ref = fdp.Sampler(pol64, factory(), num_inference_steps=4, eta=eta, backend="torch")(
            cond, x_T=x_T.double(), step_noise=None if step_noise is None else step_noise.double())
    err = rel_err(out, ref)
    print(f"[{name} {dtype} {sched} {strategy} B{B}] rel err vs float64 torch: {err:.2e}")
    assert err < TOL[dtype]
    if _family(name) == "cuda" or dtype != torch.float32:
        return
    if name == "onnxruntime":
        with pytest.raises(ValueError, match="float32 policies.*float64"):
            fdp.Sampler(pol64, factory(), num_inference_steps=4, eta=eta, backend=name)
        return
    # A float64 policy packed in float32: same numbers, output in the caller's dtype.
    out64 = fdp.Sampler(pol64, factory(), num_inference_steps=4, eta=eta, backend=name, dtype=torch.float32)(
        cond, x_T=x_T.double(), step_noise=None if step_noise is None else step_noise.double())
    assert out64.dtype == torch.float64 and rel_err(out64, ref) < TOL[torch.float32]


@pytest.fixture(scope="module")
def launch_args():
    c = TritonCase(2, 24, 1, 4, 3, 5, "ddpm_clip", "soft", 3)
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


# ------------------------------------------------------------------------------------------------------------
# bad launch inputs: the Triton launchers (mlp_step, mlp_sample) and the CUDA launch check (check_launch)

# name, mutation of the launch arguments, exception, and per family the message it must match (a family not
# named has no such row). The Triton launchers' arguments: `launch_args`; CUDA's: _cpu_launch_args().
BAD_INPUTS = [
    ("x-dtype", lambda a: a.update(x=a["x"].double()), TypeError,
     {"triton": "`x` must have dtype", "cuda": "`x` must have dtype torch.float32"}),
    ("x-list", lambda a: a.update(x=a["x"].tolist()), TypeError,
     {"triton": "`x` must be a torch.Tensor", "cuda": "`x` must be a torch.Tensor"}),
    ("x-3d", lambda a: a.update(x=a["x"].reshape(5, 4, 3)), ValueError,
     {"triton": r"`x` must be \[B, D\]", "cuda": r"`x` must be \[B, D\]"}),
    ("x-cols", lambda a: a.update(x=a["x"][:, :-1].contiguous()), ValueError, {"triton": "`x` must have D = 12"}),
    ("x-D", lambda a: a.update(x=torch.randn(5, 11)), ValueError, {"cuda": "`x` must have shape"}),
    ("batch-0", lambda a: a.update(x=torch.empty(0, 12)), ValueError, {"cuda": "batch size must be >= 1"}),
    ("x-noncontig", lambda a: a.update(x=torch.randn(12, 5).t()), ValueError, {"cuda": "`x` must be contiguous"}),
    ("packed-type", lambda a: a.update(packed=object()), TypeError,
     {"triton": "`packed` must be an fdp.packing.PackedMLP", "cuda": "`packed` must be an fdp.packing object"}),
    ("call-type", lambda a: a.update(call=a["steps"]), TypeError,
     {"triton": "`call` must be an fdp.packing.CallTerms"}),
    ("w_a-bf16", lambda a: a.update(packed=replaced(a["packed"], w_a=a["packed"].w_a.bfloat16())), TypeError,
     {"triton": "`packed.w_a`"}),
    ("w_a-f16", lambda a: a.update(packed=replaced(a["packed"], w_a=a["packed"].w_a.half())), TypeError,
     {"cuda": "`packed.w_a` must have dtype"}),
    ("w_in-f64", lambda a: a.update(packed=replaced(a["packed"], w_in=a["packed"].w_in.double())), TypeError,
     {"triton": "`packed.w_in`", "cuda": "`packed.w_in` must have one of the dtypes"}),
    ("b_out-shape", lambda a: a.update(packed=replaced(a["packed"], b_out=a["packed"].b_out[:, :-1].contiguous())),
     ValueError, {"triton": "`packed.b_out` must have shape"}),
    ("w_out-shape", lambda a: a.update(packed=replaced(a["packed"], w_out=a["packed"].w_out[:, :-1].contiguous())),
     ValueError, {"cuda": "`packed.w_out` must have shape"}),
    ("b_b-dtype", lambda a: a.update(packed=replaced(a["packed"], b_b=a["packed"].b_b.double())), TypeError,
     {"cuda": "`packed.b_b`"}),
    ("weights-batch", lambda a: a.update(call=replaced(a["call"], weights=a["call"].weights[:4].contiguous())),
     ValueError, {"triton": "`call.weights` must have shape", "cuda": "`call.weights` must have shape"}),
    ("c_in-noncontig", lambda a: a.update(call=replaced(a["call"], c_in=_non_contiguous(a["call"].c_in))),
     ValueError, {"triton": "`call.c_in` must be contiguous"}),
    ("scale-noncontig", lambda a: a.update(call=replaced(a["call"], scale=torch.randn(5, 3, 24, 2).transpose(2, 3))),
     ValueError, {"cuda": "`call.scale` must be contiguous"}),
    ("scale-device", lambda a: a.update(call=replaced(a["call"], scale=a["call"].scale.to("meta"))), ValueError,
     {"triton": "`call.scale` must be on cpu"}),
    ("c_in-device", lambda a: a.update(call=replaced(a["call"], c_in=a["call"].c_in.to("meta"))), ValueError,
     {"cuda": "`call.c_in` must be on cpu"}),
    ("t_shift-T", lambda a: a.update(steps=replaced(a["steps"], t_shift=a["steps"].t_shift[:2].contiguous())),
     ValueError, {"triton": "`steps.t_shift`", "cuda": "`steps.t_shift` must have shape"}),
    ("coef-f64", lambda a: a.update(coef=a["coef"].double()), TypeError,
     {"triton": "`coef`", "cuda": "`coef` must have dtype"}),
    ("coef-cols", lambda a: a.update(coef=a["coef"][:, :5].contiguous()), ValueError,
     {"triton": "`coef` must have shape"}),
    ("coef-width", lambda a: a.update(coef=a["coef"][:, :6].contiguous()), ValueError,
     {"cuda": "`coef` must have shape"}),
    ("adds-dtype", lambda a: a.update(adds_noise=a["adds_noise"].float()), TypeError, {"triton": "`adds_noise`"}),
    ("noise-B", lambda a: a.update(noise=a["noise"][:, :4].contiguous()), ValueError,
     {"triton": "`noise` must have shape"}),
    ("noise-T", lambda a: a.update(noise=a["noise"][:2].contiguous()), ValueError,
     {"cuda": "`noise` must have shape"}),
    ("noise-bf16", lambda a: a.update(noise=a["noise"].bfloat16()), TypeError, {"cuda": "`noise` must have dtype"}),
    ("noise-and-seed", lambda a: a.update(seed=3), ValueError, {"triton": "not both"}),
    ("seed-negative", lambda a: a.update(noise=None, seed=-1), ValueError, {"triton": "`seed`"}),
    ("out-f64", lambda a: a.update(out=torch.empty(5, 12, dtype=torch.float64)), TypeError, {"triton": "`out`"}),
    ("out-f16", lambda a: a.update(out=a["out"].half()), TypeError, {"cuda": "`out` must have dtype"}),
    ("out-device", lambda a: a.update(out=a["out"].to("meta")), ValueError, {"cuda": "`out` must be on cpu"}),
    ("clip-negative", lambda a: a.update(clip_range=-1.0), ValueError,
     {"triton": "`clip_range`", "cuda": "`clip_range`"}),
    ("clip-nan", lambda a: a.update(clip_range=NAN), ValueError, {"cuda": "`clip_range`"}),
    ("clip-bool", lambda a: a.update(clip_range=True), ValueError, {"cuda": "`clip_range`"}),
    ("block_b", lambda a: a.update(block_b=8), ValueError, {"triton": "`block_b`"}),
    ("precision", lambda a: a.update(precision="tf16"), ValueError, {"triton": "`precision`"}),
    ("native-fp32", lambda a: a.update(precision="native"), ValueError, {"triton": "`precision`='native'"}),
    ("num_warps", lambda a: a.update(num_warps=3), ValueError, {"triton": "`num_warps`"}),
    ("regs-wide", lambda a: a.update(packed=replaced(a["packed"], **_widen(a["packed"]))), ValueError,
     {"triton": "hidden widths"}),
    ("scratch-small", lambda a: a.update(h_in_registers=False, scratch=torch.empty(10)), ValueError,
     {"triton": "`scratch`"}),
    # Inpainting (B = 5, D = 12, T = 3 in both families' arguments).
    ("known-alone", lambda a: a.update(known=torch.randn(5, 12)), ValueError,
     {"triton": "both `known` and `known_mask`", "cuda": "both `known` and `known_mask`"}),
    ("known-shape", lambda a: a.update(known=torch.randn(5, 11), known_mask=torch.ones(5, 12, dtype=torch.bool)),
     ValueError, {"triton": r"`known` must have shape \[5, 12\]", "cuda": r"`known` must have shape \[5, 12\]"}),
    ("known-T", lambda a: a.update(known=torch.randn(2, 5, 12), known_mask=torch.ones(5, 12, dtype=torch.bool)),
     ValueError, {"triton": "`known` must have shape", "cuda": "`known` must have shape"}),
    ("known-f64", lambda a: a.update(known=torch.randn(5, 12).double(), known_mask=torch.ones(5, 12, dtype=torch.bool)),
     TypeError, {"triton": "`known` must have dtype", "cuda": "`known` must have dtype"}),
    ("known_mask-float", lambda a: a.update(known=torch.randn(5, 12), known_mask=torch.ones(5, 12)), TypeError,
     {"triton": "`known_mask` must have one of the dtypes", "cuda": "`known_mask` must have one of the dtypes"}),
    ("known_mask-shape", lambda a: a.update(known=torch.randn(3, 5, 12), known_mask=torch.ones(5, 11, dtype=torch.bool)),
     ValueError, {"triton": "`known_mask` must have shape", "cuda": "`known_mask` must have shape"}),
]
LAUNCHERS = {"mlp_step": "triton", "mlp_sample": "triton", "check_launch": "cuda"}


@pytest.mark.parametrize("launcher,mutate,exc,match", [
    pytest.param(launcher, mutate, exc, matches[family], id=f"{launcher}-{name}")
    for launcher, family in LAUNCHERS.items() for name, mutate, exc, matches in BAD_INPUTS if family in matches])
def test_launchers_reject_bad_inputs(launch_args, launcher, mutate, exc, match):
    if launcher == "check_launch":
        a = _cpu_launch_args()
        mutate(a)
        known = [a.pop(k, None) for k in ("known", "known_mask")]
        with pytest.raises(exc, match=match):
            dims = cb.check_launch(**a, require_cuda=False)
            cb.check_known(*known, dict(dims, device=a["x"].device))
        return
    a = dict(launch_args)
    mutate(a)
    args = [a.pop(k) for k in ("packed", "steps", "call", "coef", "adds_noise")]
    x, noise = a.pop("x"), a.pop("noise")
    with pytest.raises(exc, match=match):
        if launcher == "mlp_step":
            mlp_step(*args, 0, x, noise, **a)
        else:
            mlp_sample(*args, x, noise, **a)


# ------------------------------------------------------------------------------------------------------------
# Triton only: the interpreter, NaN routing, 64-bit scratch offsets, in-kernel noise, auto ranking,
# refusals, native compilation


def test_kernels_run_in_the_interpreter():
    assert type(mlp_step_kernel).__name__ == "InterpretedFunction"
    assert type(mlp_persistent_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("sched,strategy", [("ddpm_clip", "soft"), ("ddim", "fixed"), ("ddpm_clip", "tanh")])
def test_nan_router_weight_gives_nan_in_its_row_only(sched, strategy):
    """As in torch, a NaN weight makes its row NaN, also when the tile's other rows give the component
    weight 0 (fixed [0.6, 0, 0.4], or tanh with component 1's logit 0 and signed weights elsewhere:
    component 1 is used by the NaN alone) and through clipping. The other rows are computed exactly as
    without the NaN."""
    c = TritonCase(3, 24, 1, 4, 3, 5, sched, strategy, 2)
    if strategy in ("fixed", "tanh"):
        _route_nothing_to_1(c.policy, strategy)
        c.call = packing.call_terms(c.policy, c.cond, c.policy.weights(c.cond))
        assert (c.call.weights[:, 1] == 0).all()
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


@pytest.mark.parametrize("name", ["triton", "triton-persistent", "torch-batched", "onnxruntime"])
@pytest.mark.parametrize("sched,strategy", [("ddpm_clip", "soft"), ("ddim_eta", "soft"), ("ddim_eta", "tanh")])
def test_backends_nan_router_logit_gives_nan_actions(name, sched, strategy):
    """A NaN router logit (here a NaN bias of the router's last layer: every row's weights are NaN)
    gives NaN actions, as on backend="torch"."""
    pol = kernel_policy(2, 16, 1, 4, 3, strategy).float()
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


# ------------------------------------------------------------------------------------------------------------
# Triton: the per-step kernel with its components split over programs (grid [tiles, K], last arrival combines)

# K, H, L, horizon, action_dim, B, scheduler, strategy, T, weight dtype, tuning
SPLIT_CASES = [
    (4, 24, 2, 4, 3, 1, "ddim_eta", "soft", 3, F32, {}),                       # batch 1
    (5, 17, 1, 3, 5, 3, "ddpm_clip", "topk", 3, F32, {}),                      # K = 5, odd H and D, top-2
    (1, 40, 2, 4, 3, 13, "ddim", "soft", 2, F32, {}),                          # K = 1, H = 40: scratch path
    (3, 20, 1, 5, 3, 13, "ddpm_v", "hard", 3, F32, {}),                        # hard routing: components skipped
    (3, 24, 1, 4, 3, 21, "ddim_eta", "hard", 2, F32, {"skip_unused": False}),  # two tiles, zero weights evaluated
    (2, 48, 1, 7, 3, 3, "ddpm_clip", "soft", 2, BF16, {"h_in_registers": False}),
    (3, 20, 1, 5, 3, 7, "ddim_eta", "tanh", 2, F32, {}),                       # signed, unnormalised weights
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[_case_id(c, c[10]) for c in SPLIT_CASES])
def test_split_and_unsplit_steps_match_reference_bit_equal(case):
    """Split and unsplit per-step kernels against the float64 reference (NaN-poisoned outputs and scratch,
    canaries, counters 0 after every launch: TritonCase.run_steps), bit-equal to each other and run to run."""
    c = TritonCase(*case[:9])
    packed = c.packed(case[9])
    split = c.run_steps(packed, split=True, **case[10])
    unsplit = c.run_steps(packed, split=False, **case[10])
    e_split, e_unsplit = rel_err(split, c.ref), rel_err(unsplit, c.ref)
    print(f"[split {_case_id(case, case[10])}] rel err: split {e_split:.2e}, unsplit {e_unsplit:.2e}")
    assert e_split < TOL[case[9]] and e_unsplit < TOL[case[9]]
    torch.testing.assert_close(split, unsplit, rtol=0, atol=0)
    torch.testing.assert_close(c.run_steps(packed, split=True, **case[10]), split, rtol=0, atol=0)


def _interpreter_builder():
    interp = sys.modules.get("triton.runtime.interpreter")
    builder = getattr(interp, "interpreter_builder", None)
    if builder is None or not hasattr(builder, "set_grid_idx"):
        pytest.skip("this Triton's interpreter has no interpreter_builder.set_grid_idx to reorder programs")
    return builder


@pytest.mark.parametrize("order", ["reversed", "rotated"])
def test_split_result_does_not_depend_on_arrival_order(monkeypatch, order):
    """The interpreter runs a tile's K programs in k order, so component K-1 arrives last and combines. Run
    them in another order (another component combines, after reading partials written before and after its
    own): the result is bit-equal."""
    c = TritonCase(4, 24, 1, 4, 3, 19, "ddpm_clip", "soft", 2)  # two tiles
    packed = c.packed(torch.float32)
    expect = c.run_steps(packed, split=True)
    builder = _interpreter_builder()
    set_idx = builder.set_grid_idx
    ran = []

    def reordered(x, y, z):
        n = builder.grid_dim[1]
        y = n - 1 - y if order == "reversed" else (y + 1) % n
        ran.append((x, y))
        set_idx(x, y, z)

    monkeypatch.setattr(builder, "set_grid_idx", reordered)
    out = c.run_steps(packed, split=True)
    assert ran[:4] == ([(0, 3), (0, 2), (0, 1), (0, 0)] if order == "reversed" else [(0, 1), (0, 2), (0, 3), (0, 0)])
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["fixed", "tanh"])
@pytest.mark.parametrize("skip_unused", [True, False])
def test_split_zero_and_nan_weights(skip_unused, strategy):
    """The NaN rule of docs/design.md on the split path: a component with weight exactly 0 stays out of a row
    whatever it outputs (here NaN weights: skipped or evaluated), a NaN weight gives NaN in its row only."""
    c = TritonCase(3, 24, 1, 4, 3, 5, "ddim", strategy, 2)
    _route_nothing_to_1(c.policy, strategy)
    c.call = packing.call_terms(c.policy, c.cond, c.policy.weights(c.cond))
    packed = c.packed(torch.float32)
    expect = c.run_steps(packed, split=False)
    for attr in ("w_in", "w_a", "w_b", "w_out"):
        getattr(packed, attr)[1] = NAN
    torch.testing.assert_close(c.run_steps(packed, split=True, skip_unused=skip_unused), expect, rtol=0, atol=0)
    # Row 3 gives the NaN component a NaN weight: that row only is NaN (through the scheduler's update).
    packed = c.packed(torch.float32)
    weights = c.call.weights.clone()
    weights[3, 1] = NAN
    c.call = replaced(c.call, weights=weights)
    x = c.x_T.reshape(c.B, c.D).float()
    counters = torch.zeros(1, dtype=torch.int32)
    for i in range(len(c.table)):
        x = mlp_step(packed, c.steps, c.call, c.coef, c.adds_noise, i, x, c.kernel_noise(), clip_range=c.clip,
                     counters=counters, split=True, skip_unused=skip_unused)
        assert int(counters) == 0
    x = x.reshape(c.shape)
    assert torch.isnan(x[3]).all()
    others = [0, 1, 2, 4]
    torch.testing.assert_close(x[others], expect[others], rtol=0, atol=0)


def test_split_rule():
    """One rule (mlp_common.block_config): split while there are fewer tiles than multiprocessors and more than
    one component; off CUDA the rule assumes HOST_MULTIPROCESSORS."""
    sms = mlp_common.HOST_MULTIPROCESSORS
    cfg = lambda B, K, **kw: mlp_common.block_config(B, 32, 256, K=K, **kw)  # noqa: E731
    assert cfg(1, 4)["SPLIT"] and cfg(16 * (sms - 1), 4, block_b=16)["SPLIT"]
    assert not cfg(16 * sms, 4, block_b=16)["SPLIT"] and not cfg(1, 1)["SPLIT"]
    assert cfg(1, 1, split=True)["SPLIT"] and not cfg(1, 4, split=False)["SPLIT"]
    with pytest.raises(ValueError, match="`split`"):
        cfg(1, 4, split=1)
    # The grid and the scratch follow: [tiles, K] programs, each with its hidden-state scratch, then [K, B, D].
    c = cfg(20, 4)
    assert mlp_common.grid(20, 4, c["BLOCK_B"], c["SPLIT"]) == (2, 4)
    assert mlp_common.scratch_numel(20, 32, 4, c) == 8 * 2 * 16 * 256 + 4 * 20 * 32
    assert mlp_common.counters_numel(20, c) == 2


def test_register_bound_rule(monkeypatch):
    """block_config's maxnreg: one program's share of the 64K-register file (at most 255 per thread), none at
    D_PAD = 512 or on ROCm."""
    cfg = mlp_common.block_config
    assert cfg(1, 32, 256)["maxnreg"] == 255 and cfg(1, 32, 256, num_warps=4)["maxnreg"] == 255
    assert cfg(1, 32, 256, num_warps=16)["maxnreg"] == 128
    assert cfg(1, 256, 256)["maxnreg"] == 255 and cfg(1, 257, 256)["maxnreg"] is None
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert cfg(1, 32, 256)["maxnreg"] is None


def test_mlp_step_checks_counters(launch_args):
    a = launch_args
    args = [a[k] for k in ("packed", "steps", "call", "coef", "adds_noise")]
    for bad in (torch.zeros(1), torch.zeros(0, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32).t()):
        with pytest.raises(ValueError, match="`counters` must be a contiguous torch.int32 tensor"):
            mlp_step(*args, 0, a["x"], a["noise"], counters=bad, split=True)


@pytest.mark.parametrize("B", [1, 20])
def test_backend_split_counters_reused_and_zero(monkeypatch, B):
    """backend="triton" at small batch: one workspace per prepared object, reused across calls, counters back to
    0 after each; while a CUDA graph is captured (emulated), a workspace of the call's own instead. The result
    equals the unsplit backend's bit for bit."""
    c = TritonCase(3, 24, 1, 4, 3, B, "ddpm_clip", "soft", 3)
    pol = copy.deepcopy(c.policy).float()
    prepared = get_backend("triton").prepare(pol, c.table, torch.float32)
    x_T, cond, noise = c.x_T.float(), c.cond.float(), c.noise.float()
    first = prepared.run(cond, x_T, noise)
    scratch, counters = prepared._scratch, prepared._counters
    assert counters is not None and counters.numel() == -(-B // 16) and (counters == 0).all()
    assert torch.equal(prepared.run(cond, x_T, noise), first)
    assert prepared._scratch is scratch and prepared._counters is counters and (counters == 0).all()
    import fdp.backends.triton_backend as tb

    monkeypatch.setattr(tb, "capturing", lambda device: True)
    counters.fill_(5)  # a captured call must not read (or reset) the cached counters
    assert torch.equal(prepared.run(cond, x_T, noise), first)
    assert prepared._counters is counters and (counters == 5).all()
    monkeypatch.undo()
    unsplit = type(get_backend("triton"))(split=False).prepare(pol, c.table, torch.float32)
    assert torch.equal(unsplit.run(cond, x_T, noise), first) and unsplit._counters is None
    assert rel_err(first, c.ref) < TOL[torch.float32]
    with pytest.raises(TypeError, match="`split` tunes backend 'triton'"):
        type(get_backend("triton-persistent"))(split=False)


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


# ------------------------------------------------------------------------------------------------------------
# Triton: in-kernel noise (seed=)


def _noise_only_table(T):
    """x' = z at every step: the kernels' output is the generated noise itself."""
    coef = torch.zeros(T, 6)
    coef[:, 5] = 1.0
    return coef, torch.ones(T, dtype=torch.int8)


def test_seeded_noise_is_standard_normal_and_deterministic():
    c = TritonCase(1, 16, 1, 8, 4, 40, "ddim", "soft", 2)  # 40 rows x 32 columns = 1280 draws per step
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
    torch.testing.assert_close(mlp_step(packed, c.steps, c.call, coef, adds, 1, x, seed=1234, split=True), z1,
                               rtol=0, atol=0)
    corr = float(torch.corrcoef(torch.stack([z0.flatten(), z1.flatten()]))[0, 1])
    assert abs(corr) < 0.15
    # Rows do not repeat each other.
    assert float(torch.corrcoef(z1[:2].reshape(2, -1))[0, 1]) < 0.9


def test_seeded_noise_cosine():
    """The Box-Muller cosine of the in-kernel noise, cos(2 pi u) by quadrant, against float64 over [0, 1):
    random u, a fine grid and the quadrant boundaries."""

    @triton.jit
    def probe(u_ptr, out_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, mlp_common._cos_2pi(tl.load(u_ptr + i, mask=i < N, other=0.0)), mask=i < N)

    u = torch.cat([torch.rand(20000, generator=torch.Generator().manual_seed(0)), torch.arange(4096) / 4096,
                   torch.tensor([0.125, 0.375, 0.625, 0.875, 1 - 2**-24])])
    out = torch.full_like(u, float("nan"))
    probe[(triton.cdiv(u.numel(), 4096),)](u, out, u.numel(), BLOCK=4096)
    err = (out.double() - torch.cos(2 * torch.pi * u.double())).abs().max()
    assert err < 2e-7, float(err)  # float32 rounding of values up to 1: 6e-8 per operation


@pytest.mark.parametrize("name", ["triton", "triton-persistent"])
def test_backend_seeded_noise(name):
    c = TritonCase(2, 24, 1, 4, 3, 5, "ddpm_clip", "soft", 4)
    pol = copy.deepcopy(c.policy).float()
    prepared = get_backend(name).prepare(pol, c.table, torch.float32)
    x_T, cond = c.x_T.float(), c.cond.float()
    no_noise = prepared.run(cond, x_T, None)
    a = prepared.run(cond, x_T, None, seed=7)
    assert torch.isfinite(a).all() and not torch.allclose(a, no_noise, atol=1e-3)
    assert torch.equal(a, prepared.run(cond, x_T, None, seed=7))
    assert not torch.equal(a, prepared.run(cond, x_T, None, seed=8))


def test_auto_ranks_interpreted_kernels_below_torch(monkeypatch):
    pol = make_mlp_policy(K=2, dtype=torch.float32)
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    assert get_backend("triton").priority < get_backend("torch").priority
    # Able to serve, but emulated kernels are slower than eager torch: skipped for their rank, which auto says.
    sampler = fdp.Sampler(pol, sched, num_inference_steps=2)
    assert sampler.backend not in ("triton", "triton-persistent")
    for name in ("triton", "triton-persistent"):
        assert sampler.selection.skipped()[name].startswith("ranked below") and "TRITON_INTERPRET=1" in \
            sampler.selection.skipped()[name]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert get_backend("triton-persistent").priority == 30 and get_backend("triton").priority == 20


def test_unavailable_without_interpreter_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    for name in ("triton", "triton-persistent"):
        reason = get_backend(name).unavailable_reason(torch.device("cpu"))
        assert "CUDA device" in reason and "TRITON_INTERPRET=1" in reason
        info = available_backends("cpu")[name]
        assert not info.available and "TRITON_INTERPRET" in info.reason
    pol = make_mlp_policy(K=2, dtype=torch.float32)
    assert fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2).backend not in \
        ("triton", "triton-persistent")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2, backend="triton")


def test_interpreted_kernels_refuse_cuda_and_compiled_ones_refuse_the_cpu(monkeypatch):
    """The interpreter copies CUDA tensors to the host at each launch, which the CUDA graph capture of every call
    refuses: interpreted kernels are unavailable on CUDA (here, where they are imported interpreted), as the
    graph backend's compose kernel; and one compiled kernel module of the three a call launches (the per-call
    terms kernel included) makes the CPU unavailable."""
    import fdp_kernels.call_terms  # noqa: F401 - imported (interpreted), as a sampling call would

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("triton", "triton-persistent"):
        reason = get_backend(name).unavailable_reason(torch.device("cuda"))
        assert reason is not None and "fdp_kernels.call_terms" in reason and "TRITON_INTERPRET=1" in reason, reason
        assert get_backend(name).unavailable_reason(torch.device("cpu")) is None
    # A module not imported yet follows TRITON_INTERPRET: with it unset, it would compile (for CUDA).
    monkeypatch.delitem(sys.modules, "fdp_kernels.call_terms")
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = get_backend("triton").unavailable_reason(torch.device("cuda"))
    assert reason is not None and "fdp_kernels.mlp_step" in reason, reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled = types.SimpleNamespace(call_terms_kernel=object())  # not the interpreter's function
    monkeypatch.setitem(sys.modules, "fdp_kernels.call_terms", compiled)
    reason = get_backend("triton").unavailable_reason(torch.device("cpu"))
    assert reason is not None and "fdp_kernels.call_terms was imported before TRITON_INTERPRET=1" in reason, reason


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
def test_triton_unsupported_models_are_refused_with_a_reason(make, dtype, match):
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
        assert sampler.backend not in ("triton", "triton-persistent")
        for name in ("triton", "triton-persistent"):
            assert match in sampler.selection.skipped()[name]


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
# Triton: native compilation (no GPU needed) and native runs (GPU only), in subprocesses without TRITON_INTERPRET

_COMPILE_SCRIPT = r'''
import importlib.util, os, sys, tempfile
from pathlib import Path
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton.backends.nvidia  # noqa: F401
except Exception as exc:
    print("SKIP: no Triton NVIDIA compiler here:", exc)
    sys.exit(0)
# The resource report's machinery: record the launches a backend makes, bind them with Triton's own binder
# (as the JIT specializes them), compile for sm_90 and read the cubin.
spec = importlib.util.spec_from_file_location("resource_report", sys.argv[1])
rr = importlib.util.module_from_spec(spec)
sys.modules["resource_report"] = rr
spec.loader.exec_module(rr)
cuobjdump = rr.find_tool("cuobjdump")
if cuobjdump is None:
    print("SKIP: no cuobjdump")
    sys.exit(0)

TARGET = (4, 256, 2, 16, 2, 1)  # K, H, L, horizon, action_dim, batch: the shape the defaults were chosen on
# (the report's workload: backend, K, H, L, horizon, action_dim, batch, dtype, scheduler, tuning), must not spill
VARIANTS = [
    *[(("triton", *TARGET, dt, "ddpm", {"split": split}), True) for split in (True, False)
      for dt in ("float32", "bfloat16")],
    *[(("triton-persistent", *TARGET, dt, "ddpm", {}), True) for dt in ("float32", "bfloat16")],
    (("triton", 3, 24, 2, 5, 3, 5, "bfloat16", "ddpm-seed", {}), True),
    (("triton", 2, 100, 1, 16, 7, 300, "float16", "ddim", {"precision": "native", "block_b": 32}), True),
    (("triton-persistent", 1, 16, 1, 1, 2, 17, "float32", "ddpm-seed", {}), True),
    # Non-default tunings: they must compile; they may spill.
    (("triton-persistent", 1, 512, 1, 32, 16, 1, "float32", "ddpm", {"precision": "tf32x3"}), False),
    (("triton-persistent", 2, 48, 2, 4, 3, 3, "bfloat16", "ddim", {"h_in_registers": True, "precision": "native"}),
     False),
]
spilled, failed = [], []
with tempfile.TemporaryDirectory() as tmp:
    for w, no_spills in VARIANTS:
        rows = [r for r in rr.triton_rows([90], 1, cuobjdump, Path(tmp), workloads=[w])
                if not any("no workload launches it" in p for p in r.problems)]
        for r in rows:
            print(f"OK {w}: {r.kernel} regs={r.registers} LDL/STL={r.spill_loads}/{r.spill_stores} "
                  f"shared={r.dynamic_smem} {r.problems}", flush=True)
            if any("failed" in p for p in r.problems):
                failed.append((w, r.problems))
            elif no_spills and (r.spill_loads or r.spill_stores):
                spilled.append((w, r.kernel))
if failed or spilled:
    print("FAILED:", failed, "SPILLS in variants whose defaults claim none:", spilled)
    sys.exit(1)
'''


def _run_script(script, timeout, *args):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_compile_for_sm90():
    """Triton's real front end and ptxas on the kernels (the interpreter misses e.g. loop-carried type changes),
    on the launches the backends make for each workload, bound as the JIT binds them (scripts/resource_report.py's
    recorder and Triton's own binder); prints each variant's registers, local-memory instructions and shared
    memory, and fails where one does not compile or a default configuration that must not spill does."""
    report = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "resource_report.py")
    r = _run_script(_COMPILE_SCRIPT, 900, report)
    print(r.stdout)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, f"compilation failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    # Two kernel variants per workload: the per-call terms and the step (or loop) kernel.
    assert r.stdout.count("OK ") == 22 and r.stdout.count("call_terms_kernel") == 11, r.stdout


_GPU_SCRIPT = r'''
import copy, sys
import torch
import fdp
from fdp.backends import get_backend
from fdp.backends.triton_backend import TritonBackend
from fdp.backends.triton_persistent_backend import TritonPersistentBackend
from fdp.tolerances import REL_TOL
from helpers import make_mlp_policy, rounded_reference, tf32_kernel_bound
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
            # The float64 reference with the weight matrices a pack computes with (rounded to its dtype), so the
            # library's bounds for that dtype apply (fdp.tolerances.REL_TOL: accumulation and activations).
            refs = {dt: get_backend("torch").prepare(rounded_reference(pol64, dt), table).run(
                cond, x_T.double(), None if noise is None else noise.double())
                for dt in (torch.float32, torch.bfloat16, torch.float16)}
            # tf32 matmuls: the bound derived for this loop on these inputs (helpers.tf32_kernel_bound, checked on
            # the CPU by test_tf32_bound_is_derived_and_tight), as a relative error.
            _, tf32_bound = tf32_kernel_bound(pol64, table, cond, x_T.double(),
                                              None if noise is None else noise.double())
            tf32_tol = float(tf32_bound / refs[torch.float32].abs().max())
            for cls in (TritonBackend, TritonPersistentBackend):
                for dtype, tuning, tol in ((torch.float32, {}, REL_TOL[torch.float32]),
                                           (torch.float32, {"precision": "tf32x3"}, REL_TOL[torch.float32]),
                                           (torch.float32, {"precision": "tf32"}, tf32_tol),
                                           (torch.bfloat16, {}, REL_TOL[torch.bfloat16]),
                                           (torch.bfloat16, {"precision": "native"}, REL_TOL[torch.bfloat16]),
                                           (torch.float16, {"precision": "native"}, REL_TOL[torch.float16])):
                    prepared = cls(**tuning).prepare(pol, table, dtype)
                    out = prepared.run(cond.float(), x_T, noise)
                    ref = refs[dtype]
                    err = float((out.double() - ref).abs().max() / ref.abs().max())
                    tag = f"{cls.name} {type(sched).__name__} K{K} H{H} D{horizon * adim} B{B} {dtype} {tuning}"
                    print(f"{tag}: rel err {err:.2e}", flush=True)
                    if not err < tol:
                        failures.append(f"{tag}: {err:.2e} >= {tol:.2e}")
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


# ------------------------------------------------------------------------------------------------------------
# CUDA only, on the CPU: the extension, its error reporting and launch structs, validation before any
# pointer is passed, the backends' refusals and auto


def test_extension_exposes_the_kernels():
    st = fdp.extension_status()
    if not st["available"]:
        if shutil.which("nvcc") is not None:
            pytest.fail(f"nvcc is on PATH but fdp._C did not build: {st['reason']}")
        pytest.skip("no nvcc and no prebuilt fdp._C")
    ext = _ext_or_skip()
    for name in ("mlp_plan", "mlp_step_launch", "mlp_persistent_launch", "runtime_info"):
        assert callable(getattr(ext, name)), name


def test_cuda_failures_are_python_exceptions():
    ext = _ext_or_skip()
    if ext.runtime_info()["device_count"] > 0:
        pytest.skip("a CUDA device is visible")
    opts = ext.MlpOptions()
    dims = cb._named(ext.MlpDims, B=1, D=32, H=64, L=2, K=4, T=10)
    ptrs = cb._named(ext.MlpPointers, **{name: 1 for name in POINTER_NAMES})
    with pytest.raises(RuntimeError, match="fdp CUDA error"):
        ext.mlp_plan(0, 0, dims, opts)
    with pytest.raises(RuntimeError, match="fdp CUDA error"):
        ext.mlp_persistent_launch(0, ptrs, dims, True, 1.0, opts, 0)
    # Argument errors are found before CUDA is touched: ValueError.
    with pytest.raises(ValueError, match="steps"):
        ext.mlp_step_launch(0, ptrs, dims, True, 1.0, 5, 3, opts, 0)


POINTER_NAMES = ("w_in", "w_a", "w_b", "b_b", "w_out", "b_out", "t_in", "t_shift", "weights", "c_in", "scale",
                 "shift", "coef", "noise", "x_in", "x_out", "scratch", "counters")


def test_launch_structs_are_set_by_name():
    """The extension's launch structs take their fields by name: defaults as fdp.h, unknown names refused."""
    ext = _ext_or_skip()
    ptrs = ext.MlpPointers()
    assert [getattr(ptrs, name) for name in POINTER_NAMES] == [0] * len(POINTER_NAMES)
    with pytest.raises(AttributeError):
        ptrs.x = 1
    opts = cb._ext_options(ext, cb._options_tuple({"ranks": 2, "mma": True}))
    assert [getattr(opts, k) for k in cb._OPTION_KEYS] == [0, 2, 0, 1, 1]
    defaults = ext.MlpOptions()
    assert tuple(getattr(defaults, k) for k in cb._OPTION_KEYS) == cb._options_tuple(None)
    dims = cb._named(ext.MlpDims, B=3, D=5, H=7, L=2, K=4, T=9)
    assert (dims.B, dims.D, dims.H, dims.L, dims.K, dims.T) == (3, 5, 7, 2, 4, 9)


def test_kernel_coef_layout():
    table = SCHEDULERS["ddpm_clip"][0]().step_table(6)
    coef = cb.kernel_coef(table)
    assert coef.shape == (6, abi.CUDA_COEF_WIDTH) and coef.dtype == torch.float32 and coef.is_contiguous()
    torch.testing.assert_close(coef[:, :abi.NUM_COLS], table.coef.float(), rtol=0, atol=0)
    assert coef[:, abi.CUDA_COL_ADDS_NOISE].tolist() == table.adds_noise.float().tolist()
    assert not coef[:, abi.CUDA_COL_ADDS_NOISE + 1:].any()


def test_valid_cpu_arguments_pass_validation():
    a = _cpu_launch_args()
    dims = cb.check_launch(**a, require_cuda=False)
    assert dims == dict(B=5, D=12, H=24, L=2, K=3, T=3)
    a16 = _cpu_launch_args(dtype=torch.bfloat16)
    assert cb.check_launch(**a16, require_cuda=False)["K"] == 3
    a["noise"], a["clip_range"] = None, None
    cb.check_launch(**a, require_cuda=False)
    a["out"] = a["x"]  # in place is allowed
    cb.check_launch(**a, require_cuda=False)


def test_validation_limits():
    a = _cpu_launch_args(K=9, H=8, L=1, horizon=2, action_dim=1, B=1)
    with pytest.raises(ValueError, match="1..8 components"):
        cb.check_launch(**a, require_cuda=False)


def test_cpu_tensors_are_refused_before_any_pointer():
    a = _cpu_launch_args()
    with pytest.raises(ValueError, match="CUDA"):
        cb.check_launch(**a)
    # The public launcher validates first: no extension call happens for CPU tensors.
    with pytest.raises(ValueError, match="CUDA"):
        cb.launch(cb.KIND_STEP, **a)
    with pytest.raises(ValueError, match="KIND_STEP"):
        cb.launch(7, **a)


def test_kernel_options_are_checked():
    assert cb._options_tuple(None) == (0, 0, 0, -1, 1)
    assert cb._options_tuple({"ranks": 2, "mma": True}) == (0, 2, 0, 1, 1)
    with pytest.raises(ValueError, match="unknown kernel options"):
        cb._options_tuple({"warps": 4})
    with pytest.raises(TypeError, match="block_rows"):
        cb._options_tuple({"block_rows": 1.5})


class _FakeStream:
    def __init__(self, handle):
        self.cuda_stream = handle


def test_combine_buffers_are_allocated_on_the_kernels_stream(monkeypatch):
    """With an explicit `stream`, the global-combine scratch and counters are allocated and zeroed
    while that stream is current: the caching allocator ties memory to the stream it was allocated
    on, so memory freed after the launch is reused only by work ordered after the kernel."""
    current = {"stream": _FakeStream(111)}  # what torch would call the current stream
    allocated, launched = [], []

    @contextlib.contextmanager
    def stream_ctx(s):
        prev, current["stream"] = current["stream"], s
        try:
            yield
        finally:
            current["stream"] = prev

    def recording(fn):
        def alloc(*args, **kw):
            allocated.append(current["stream"].cuda_stream)
            return fn(*args, **kw)
        return alloc

    class FakeExt:
        MlpPointers = MlpDims = MlpOptions = types.SimpleNamespace

        def mlp_step_launch(self, *args):
            launched.append(args[-1])

        mlp_persistent_launch = mlp_step_launch

    monkeypatch.setattr(cb, "extension", FakeExt)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device=None: _FakeStream(handle))
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "zeros", recording(torch.zeros))
    a = _cpu_launch_args()
    dims = cb.check_launch(**a, require_cuda=False)
    info = {"global_combine": True, "groups": dims["K"], "tiles": 1}
    for stream, expect in ((222, 222), (None, 111)):
        allocated.clear()
        launched.clear()
        cb._raw_launch(cb.KIND_STEP, a["packed"], a["steps"], a["call"], a["coef"], a["x"], a["noise"], a["out"],
                       a["clip_range"], dims, cb._options_tuple(None), 0, dims["T"], stream, info)
        assert launched == [expect]
        assert allocated == [expect, expect], "scratch/counters allocated on another stream than the kernel's"


@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_backends_registered_and_unavailable_on_cpu(name):
    be = get_backend(name)
    assert be.name == name and be.priority == {"cuda": 40, "cuda-persistent": 50}[name]
    reason = be.unavailable_reason(torch.device("cpu"))
    assert reason and "CUDA device" in reason
    info = available_backends("cpu")[name]
    assert not info.available and "CUDA" in info.reason


@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_cuda_unsupported_models_are_refused_with_a_reason(name):
    be = get_backend(name)
    table = SCHEDULERS["ddim"][0]().step_table(3)
    pol = kernel_policy(3, 24, 2, 4, 3, dtype=torch.float32)
    assert be.unsupported_reason(pol, table, torch.float32) is None
    assert be.unsupported_reason(pol, table, torch.bfloat16) is None
    assert "float64" in be.unsupported_reason(pol, table, torch.float64)
    assert "at most 8 components" in be.unsupported_reason(kernel_policy(9, 8, 1, 2, 1, dtype=torch.float32), table,
                                                            torch.float32)
    unet = fdp.FactorizedPolicy([fdp.ConditionalUnet1D(3, global_cond_dim=COND_DIM, down_dims=(16, 32),
                                                       diffusion_step_embed_dim=16, n_groups=4)],
                                fdp.Router(COND_DIM, 1), 4, 3)
    assert "MLPDenoiser" in be.unsupported_reason(unet, table, torch.float32)
    with pytest.raises(ValueError, match="MLPDenoiser"):
        be.prepare(unet, table, torch.float32)


def test_auto_on_cpu_does_not_pick_cuda():
    pol = kernel_policy(2, 16, 1, 4, 3, dtype=torch.float32)
    table = SCHEDULERS["ddim"][0]().step_table(2)
    be = resolve_backend("auto", pol, table, "cpu", torch.float32)
    assert be.name not in ("cuda", "cuda-persistent")
    for name in ("cuda", "cuda-persistent"):
        assert "CUDA device" in resolve_backend.last_reasons[name]
        with pytest.raises(ValueError, match="CUDA device"):
            fdp.Sampler(pol, SCHEDULERS["ddim"][0](), num_inference_steps=2, backend=name)


# ------------------------------------------------------------------------------------------------------------
# CUDA only, on a GPU: forced decompositions, determinism, the planner, auto, graphs and streams


def _forced_configs(dtype, K, B):
    """Decompositions to force (besides auto), for both kernels, on this device."""
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    step = [{}, {"groups": 1}, {"groups": K}, {"block_rows": 1}, {"skip_unused": 0}]
    pers = [{}, {"groups": 1}, {"block_rows": 1}, {"skip_unused": 0}]
    if K > 2:
        step.append({"groups": 2})  # K % groups != 0: some blocks hold a dummy slot
    if sm90:
        step += [{"ranks": 2}, {"ranks": 4, "groups": K}, {"ranks": 3, "groups": 1}, {"ranks": 16, "groups": 1}]
        pers += [{"ranks": 1, "groups": K}, {"ranks": 2}]
        if K <= 5:
            pers.append({"ranks": 3})
    if dtype != torch.float32:
        step += [{"mma": 1, "block_rows": 16}, {"mma": 1, "block_rows": 64}, {"mma": 0, "block_rows": 8}]
        pers += [{"mma": 1, "block_rows": 32}, {"mma": 0}]
        if sm90:
            step.append({"mma": 1, "block_rows": 16, "ranks": 2})
            pers.append({"mma": 1, "block_rows": 16, "ranks": 2})
    return step, pers


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", [
    (3, 48, 2, 5, 3, 7, "ddpm_clip", "soft", 3, torch.float32),
    (4, 40, 1, 4, 3, 37, "ddim_eta", "hard", 3, torch.bfloat16),
    (2, 128, 2, 16, 2, 1, "ddim", "topk", 3, torch.float16),
], ids=_case_id)
def test_forced_decompositions_agree(case):
    """Every decomposition computes the same numbers (within its dtype's tolerance)."""
    K, H, L, horizon, action_dim, B, sched, strategy, T, dtype = case
    c = CudaCase(K, H, L, horizon, action_dim, B, sched, strategy, T, dtype)
    step_cfgs, pers_cfgs = _forced_configs(dtype, K, B)
    failures = []
    for kind, cfgs in ((cb.KIND_STEP, step_cfgs), (cb.KIND_PERSISTENT, pers_cfgs)):
        for opts in cfgs:
            try:
                out = c.run(kind, **opts)
            except ValueError as exc:  # a forced shape this device cannot schedule
                print(f"kind {kind} {opts}: refused: {exc}")
                continue
            err = rel_err(out, c.ref)
            print(f"kind {kind} {opts}: rel err {err:.2e}")
            if not err < TOL[dtype]:
                failures.append(f"kind {kind} {opts}: {err:.2e}")
    assert not failures, failures


@pytest.mark.gpu
@gpu
def test_deterministic_and_fp32_paths_agree_exactly():
    c = CudaCase(3, 48, 2, 5, 3, 6, "ddpm_clip", "soft", 4, torch.float32)
    one_block = dict(groups=1, ranks=1, block_rows=8)
    a = c.run(cb.KIND_STEP, **one_block)
    assert torch.equal(a, c.run(cb.KIND_STEP, **one_block))
    b = c.run(cb.KIND_PERSISTENT, **one_block)
    assert torch.equal(b, c.run(cb.KIND_PERSISTENT, **one_block))
    # Same tile, same order of operations: per-step and persistent agree bit for bit.
    assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_plan_reports_a_schedulable_launch():
    for kind in (cb.KIND_STEP, cb.KIND_PERSISTENT):
        info = cb.plan(kind, torch.float32, 1, 32, 256, 2, 4, 10)
        assert info["ok"], info["reason"]
        assert info["smem_bytes"] >= info["fixed_bytes"] and info["resident_bytes"] <= info["weight_bytes"]
        print(kind, info)
    if torch.cuda.get_device_capability()[0] >= 9:
        info = cb.plan(cb.KIND_PERSISTENT, torch.bfloat16, 1, 32, 256, 2, 4, 10)
        assert info["cluster_size"] > 1 and info["resident_bytes"] == info["weight_bytes"]


@pytest.mark.gpu
@gpu
def test_auto_verifies_both_kernels_and_picks_the_fastest_on_gpu():
    pol = make_mlp_policy(K=2, dtype=torch.float32).cuda()
    s = fdp.Sampler(pol, fdp.DDIMScheduler(num_train_timesteps=100), num_inference_steps=2)
    rows = {c.name: c for c in s.selection.candidates}
    assert s.selection.mode == "timed"
    for name in ("cuda", "cuda-persistent"):
        assert rows[name].rel_error <= rows[name].tolerance and rows[name].time_ms > 0, rows[name]
    assert s.backend == min((c for c in rows.values() if c.time_ms is not None), key=lambda c: c.time_ms).name
    assert get_backend("cuda-persistent").priority > get_backend("cuda").priority > get_backend(
        "triton-persistent").priority


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_cuda_graph_capture_and_replay(name):
    pol = kernel_policy(4, 64, 2, 8, 2, "soft", dtype=torch.float32).cuda()
    sampler = fdp.Sampler(pol, SCHEDULERS["ddpm_clip"][0](), num_inference_steps=6, backend=name)
    B = 3
    cond = torch.randn(B, COND_DIM, device="cuda")
    x_T, noise = sampler.noise(B, torch.Generator(device="cuda").manual_seed(0))
    eager = sampler(cond, x_T=x_T, step_noise=noise).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (plans, caches) off the capture
        for _ in range(2):
            sampler(cond, x_T=x_T, step_noise=noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sampler(cond, x_T=x_T, step_noise=noise)
    graph.replay()
    torch.cuda.synchronize()
    # Bit for bit: a replay runs the eager call's kernels with the same plan, and nothing in them depends on
    # the order blocks run in: a global combine's atomic counter only elects the block that applies the
    # update, which sums the groups' partials in group order; a cluster's combine reads fixed slots
    # (csrc/mlp_tile.cuh); the FMA path's warp reductions have a fixed order (csrc/mlp_device.cuh).
    assert torch.equal(static_out, eager)
    # New inputs copied into the static buffers: the replay follows them.
    cond.copy_(torch.randn_like(cond))
    x_T.copy_(torch.randn_like(x_T))
    expect = sampler(cond, x_T=x_T, step_noise=noise).clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expect)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["cuda", "cuda-persistent"])
def test_non_default_stream(name):
    pol = kernel_policy(3, 48, 2, 4, 3, "soft", dtype=torch.float32).cuda()
    sampler = fdp.Sampler(pol, SCHEDULERS["ddim_eta"][0](), num_inference_steps=4, eta=0.7, backend=name)
    B = 5
    cond = torch.randn(B, COND_DIM, device="cuda")
    x_T, noise = sampler.noise(B, torch.Generator(device="cuda").manual_seed(1))
    expect = sampler(cond, x_T=x_T, step_noise=noise)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Queue work ahead on this stream: the kernels must wait for it, on this stream.
        torch.cuda._sleep(50_000_000)
        x2 = x_T * 1.0
        out = sampler(cond, x_T=x2, step_noise=noise)
    stream.synchronize()
    assert torch.equal(out, expect)  # the same plan on another stream: bit for bit (test_cuda_graph_capture_...)


@pytest.mark.gpu
@gpu
def test_explicit_stream_keeps_combine_buffers_until_the_kernel_ran():
    """A launch on a busy non-current stream with a global-combine plan: allocations on the current
    stream right after it must not receive (and overwrite) the kernel's scratch or counters."""
    c = CudaCase(3, 24, 1, 4, 3, 1, "ddpm_clip", "soft", 3, torch.float32)
    info = cb.plan(cb.KIND_STEP, torch.float32, 1, c.D, 24, 1, 3, 3, {"groups": 3})
    assert info["ok"] and info["global_combine"], info
    expect = c.run(cb.KIND_STEP, groups=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = torch.full((c.B, c.D), NAN, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernel starts well after the allocations below
    cb.launch(cb.KIND_STEP, c.packed, c.steps, c.call, c.coef, c.x, c.knoise, out, c.clip,
              options={"groups": 3}, stream=side.cuda_stream)
    # Same sizes as the scratch [groups, B, D] float32 and the counters [tiles] int32: the allocator
    # would hand out the launch's blocks here if they belonged to the current stream.
    junk = [torch.full((3, c.B, c.D), NAN, device="cuda"), torch.full((info["tiles"],), 7, dtype=torch.int32,
                                                                       device="cuda")]
    side.synchronize()
    torch.cuda.synchronize()
    del junk
    torch.testing.assert_close(out.reshape(c.shape).cpu(), expect, rtol=0, atol=0)
