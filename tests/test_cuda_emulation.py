"""The CUDA fused-MLP kernels' device code, run on the CPU through a host emulation.

CI has no GPU, so this is where the arithmetic and indexing of ``run_tile``
(csrc/mlp_tile.cuh) is checked on every run: tests/cuda_emulation/driver.cpp
compiles it for host threads (emu.h supplies barriers, warp shuffles, mma
fragments, mbarriers and st.async, cp.async; see tests/cuda_emulation/README.md) under
AddressSanitizer and UBSan, and each configuration's result is compared with the
float64 torch reference. Shared memory starts as 0xCD garbage and every output
(and the global-combine scratch) is poisoned with NaN first, so anything the
kernel forgets to compute or reads before writing shows up as an error.

Most configurations give the plan (tile rows, tensor cores, cluster ranks, component
groups) explicitly, to reach the paths a GPU run would only take on particular
hardware: clusters of up to 16 blocks, both combine modes, partly resident weights.
Others let the planner (``make_plan``) choose for an emulated H100, A100 or Jetson
Orin (tests/cuda_emulation/emu_runtime.h answers its device queries), and every
run launches through the production launcher (``launch_steps``/``launch_plan``),
whose launch configuration the emulated runtime checks and runs. The planner and
the launch configuration are also unit-tested on their own for those GPUs and an
RTX 4090 (``driver --query``: plans and recorded launches, nothing run).
"""
import copy
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fdp
from fdp import packing
from fdp.backends import get_backend
from fdp.backends import cuda_backend

from helpers import (KERNEL_PROBLEMS, KERNEL_SCHEDULERS, KERNEL_TOL, assert_signed_unnormalised, make_mlp_policy,
                     rel_err, rounded_reference, signed_tanh_routing)

HERE = Path(__file__).resolve().parent
EMU = HERE / "cuda_emulation"
CSRC = HERE.parent / "csrc"

STEP, PERSISTENT = 0, 1
WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NO_MMA = -1  # make_plan's "automatic" for the tensor-core option
CXX_TYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
SMEM_H100 = 232448  # opt-in shared memory per block on sm_90

SCHEDULERS = KERNEL_SCHEDULERS
# fp32 weights take the FMA path (only float32 rounding and summation order differ
# from float64); 16-bit weights take tensor cores with activations rounded to TF32.
TOL = KERNEL_TOL


# A problem: policy, scheduler and batch. Several launch plans run on each.
PROBLEMS = {
    "target": KERNEL_PROBLEMS["target"],
    # bfloat16 at batch 1: the FMA path with 16-bit weight loads, H = 256 (the planner splits columns on H100).
    "bf16_b1": dict(K=2, H=256, L=1, horizon=8, action_dim=2, B=1, sched="ddim_eta", strategy="soft", T=2,
                    dtype=torch.bfloat16),
    # float16 weights on the FMA path, two rows.
    "fp16_fma": dict(K=3, H=40, L=1, horizon=5, action_dim=3, B=2, sched="ddpm_clip", strategy="soft", T=3,
                     dtype=torch.float16),
    # Odd H and D, top-k routing, batch over two FMA tiles.
    "odd": dict(K=6, H=17, L=1, horizon=5, action_dim=3, B=11, sched="ddim_eta", strategy="topk", T=3,
                dtype=torch.float32),
    # Hard routing over a partial last tile: components nobody picked are skipped.
    "hard": dict(K=5, H=32, L=2, horizon=4, action_dim=3, B=9, sched="ddpm_clip", strategy="hard", T=3,
                 dtype=torch.float32),
    # Fixed mixture with one zero weight (skipped on every tile), deterministic DDIM.
    "fixed": dict(K=3, H=24, L=1, horizon=4, action_dim=3, B=3, sched="ddim", strategy="fixed", T=2,
                  dtype=torch.float32, zero_comp=1),
    "bf16": KERNEL_PROBLEMS["bf16"],
    "fp16": dict(K=3, H=40, L=1, horizon=5, action_dim=3, B=33, sched="ddim_eta", strategy="hard", T=2,
                 dtype=torch.float16),
    # bfloat16 FMA tiles of 4 and 8 rows (16-bit weights at 8 rows: 64 sums per vector, two per lane after
    # the reduce-scatter), a partial last tile, D = 15 (not whole vectors), H = 48 (6 units padded to 7).
    "bf16_fma": dict(K=2, H=48, L=1, horizon=5, action_dim=3, B=5, sched="ddpm_clip", strategy="soft", T=2,
                     dtype=torch.bfloat16),
    # Split over 4 ranks, the last rank owns no column of H (24 = 3 x 8) nor of D (3): it pushes tokens.
    "narrow": dict(K=2, H=24, L=1, horizon=1, action_dim=3, B=2, sched="ddim_eta", strategy="soft", T=3,
                   dtype=torch.float32),
    # tanh routing (the FDP authors'): signed weights, rows that do not sum to 1, component 1 at weight
    # exactly 0 on every row (logit 0) so it is skipped (helpers.signed_tanh_routing).
    "tanh": dict(K=3, H=24, L=1, horizon=4, action_dim=3, B=11, sched="ddpm_clip", strategy="tanh", T=2,
                 dtype=torch.float32, zero_comp=1),
    "tanh_bf16": dict(K=3, H=48, L=2, horizon=5, action_dim=3, B=5, sched="ddim_eta", strategy="tanh", T=3,
                      dtype=torch.bfloat16),
}
# Inpainting (fdp.inpainting): the same problems with the epilogue, one replacement for every step ("same") or
# one per step ("per_step"); unmasked known values are NaN, so reading one shows.
PROBLEMS["odd_inpaint"] = dict(PROBLEMS["odd"], inpaint="same")
PROBLEMS["narrow_inpaint"] = dict(PROBLEMS["narrow"], inpaint="per_step")
PROBLEMS["bf16_inpaint"] = dict(PROBLEMS["bf16"], inpaint="per_step")

# (problem, kind, bt, mma, ranks, groups, groups per cluster, shared-memory limit).
# Cluster size S = ranks * gpc; groups > gpc means global combine (step kernel only).
CONFIGS = [
    ("target", PERSISTENT, 1, 0, 2, 1, 1, 60000),       # S=2, most weights read from global
    ("odd", STEP, 8, 0, 1, 3, 1, SMEM_H100),            # global combine, 2 tiles (the last one partial)
    ("odd", STEP, 8, 0, 1, 2, 2, 26000),                # local combine in the step kernel, weights partly resident
    ("hard", STEP, 8, 0, 1, 1, 1, SMEM_H100),           # skip of unused components
    ("fixed", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),    # one block per group, local combine; zero weight skipped
    ("bf16", PERSISTENT, 16, 1, 2, 3, 3, 18000),        # tensor cores, S=6, weights partly resident
    ("bf16", PERSISTENT, 16, 1, 1, 1, 1, 16000),        # tensor cores, weights from global only
    ("fp16", STEP, 16, 1, 2, 3, 1, SMEM_H100),          # tensor cores, global combine, 3 tiles, hard routing
    ("narrow", PERSISTENT, 1, 0, 4, 2, 2, SMEM_H100),   # S=8, a rank without columns, 2 tiles
    ("narrow", STEP, 8, 0, 4, 1, 1, SMEM_H100),         # both components in one team (hs/us swap roles), S=4
    ("bf16_fma", STEP, 8, 0, 1, 1, 1, SMEM_H100),       # bf16 FMA, 8 rows (two sums per lane), partial tile
    ("bf16_fma", PERSISTENT, 4, 0, 2, 1, 1, SMEM_H100), # bf16 FMA, 4 rows, two tiles, S=2
    ("tanh", STEP, 8, 0, 1, 3, 1, SMEM_H100),           # signed weights, global combine, 2 tiles, one skipped
    ("tanh", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),     # signed weights, local combine
    ("tanh_bf16", PERSISTENT, 16, 1, 2, 3, 3, 18000),   # signed weights, tensor cores, S=6
    # The inpainting epilogue on each update site: the global combine, the in-cluster combine of both kernels.
    ("odd_inpaint", STEP, 8, 0, 1, 3, 1, SMEM_H100),
    ("odd_inpaint", STEP, 8, 0, 1, 2, 2, 26000),
    ("narrow_inpaint", PERSISTENT, 1, 0, 4, 2, 2, SMEM_H100),
    ("bf16_inpaint", PERSISTENT, 16, 1, 2, 3, 3, 18000),
]


# (problem, kind, emulated GPU, the plan make_plan must choose there). Each runs with that plan.
PLANNED = [
    # The planner's H100 choice for the target: one cluster of K x 4 ranks (the explicit S=16 plan).
    ("target", PERSISTENT, "h100", dict(bt=1, mma=0, ranks=4, groups=4, gpc=4)),
    # The per-step kernel on the target: the same 16-block cluster, combining in it (no global scratch);
    # launches 2..10 are programmatic, so the emulation hides x from them until their wait.
    ("target", STEP, "h100", dict(bt=1, mma=0, ranks=4, groups=4, gpc=4)),
    # Batch 1, bf16, per-step kernel on H100: FMA, one 16-block cluster of 2 components x 8 ranks.
    ("bf16_b1", STEP, "h100", dict(bt=1, mma=0, ranks=8, groups=2, gpc=2)),
    # fp16 FMA on Orin: the persistent kernel without clusters, one block per tile.
    ("fp16_fma", PERSISTENT, "orin", dict(bt=2, mma=0, ranks=1, groups=1, gpc=1)),
]


def _variants() -> list[str]:
    """run_tile instantiations the configurations need (each is compile time)."""
    need = [(name, kind, bt, mma) for name, kind, bt, mma, *_ in CONFIGS]
    need += [(name, kind, plan["bt"], plan["mma"]) for name, kind, _, plan in PLANNED]
    out = []
    for name, kind, bt, mma in need:
        v = f"X({CXX_TYPE[PROBLEMS[name]['dtype']]}, {bt}, {mma}, {kind})"
        if v not in out:
            out.append(v)
    return out


def _cuda_include():
    """A directory with cuda_runtime.h / cuda_bf16.h / cuda_fp16.h: the CUDA toolkit, or the
    copy that ships inside the Triton wheel (a dependency on Linux), so no toolkit is needed."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    try:
        import triton
        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    except Exception:
        pass
    for c in cands:
        if all((c / h).is_file() for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h")):
            return c
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++)")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (CUDA toolkit or the triton wheel)")
    out = tmp_path_factory.mktemp("cuda_emulation")
    # -O1 is ASan's recommended level. Sanitizers are most of the compile time but catch
    # out-of-bounds global and shared-memory accesses, which the GPU would silently tolerate.
    sanitize = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"]
    t0 = time.perf_counter()
    exe, err = _build(cxx, inc, out, sanitize)
    if exe is None and "cannot find" in err and "san" in err:
        # A toolchain without the sanitizer runtimes: the arithmetic check still stands.
        warnings.warn("sanitizer runtimes missing: emulation driver built without ASan/UBSan")
        exe, err = _build(cxx, inc, out, ["-O1"])
    assert exe is not None, f"compiling the emulation driver failed:\n{err[-6000:]}"
    print(f"\ncuda emulation driver built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return exe


def _build(cxx, inc, out: Path, flags):
    """Compile driver.cpp and the kernel variants (spread over one variants.cpp object per CPU, built
    in parallel: each variant is seconds of compile time) and link them; returns (exe or None, log)."""
    variants = _variants()
    jobs = max(1, min(len(variants), os.cpu_count() or 1))
    units = [("driver", "driver.cpp", variants)]
    units += [(f"variants{i}", "variants.cpp", variants[i::jobs]) for i in range(jobs)]
    common = [cxx, "-std=c++20", "-pthread", f"-I{EMU}", f"-I{CSRC}", f"-I{inc}", '-DFDP_HOST_EMULATION="emu.h"']
    procs = [subprocess.Popen(common + flags + [f"-DFDP_EMU_VARIANTS={' '.join(vs)}", "-c", str(EMU / src), "-o",
                                                str(out / f"{name}.o")], stderr=subprocess.PIPE, text=True)
             for name, src, vs in units]
    logs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        return None, "\n".join(logs)
    exe = out / "driver"
    r = subprocess.run([cxx, "-pthread", *flags, *(str(out / f"{name}.o") for name, _, _ in units), "-o", str(exe)],
                       capture_output=True, text=True)
    return (exe if r.returncode == 0 else None), r.stderr


def _write(d: Path, name: str, t: torch.Tensor):
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)  # numpy has no bfloat16: write the raw bits
    t.numpy().tofile(d / f"{name}.bin")


def _problem(name, d: Path):
    """Write the problem's packed inputs to `d`; return (float64 reference, driver dims)."""
    p = dict(PROBLEMS[name])
    K, T, B, dtype = p["K"], p["T"], p["B"], p["dtype"]
    kw = {}
    if p["strategy"] == "topk":
        kw["topk"] = 2
    if p["strategy"] == "fixed":
        w = torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.1
        w[p["zero_comp"]] = 0
        kw["fixed_weights"] = (w / w.sum()).tolist()
    policy = make_mlp_policy(K=K, horizon=p["horizon"], action_dim=p["action_dim"], cond_dim=5, hidden=p["H"],
                             blocks=p["L"], strategy=p["strategy"], seed=0, **kw)
    if p["strategy"] == "tanh":
        signed_tanh_routing(policy, p.get("zero_comp"))
    make_sched, eta = SCHEDULERS[p["sched"]]
    table = make_sched().step_table(T, eta=eta)
    g = torch.Generator().manual_seed(1)
    D = p["horizon"] * p["action_dim"]
    cond = torch.randn(B, 5, generator=g, dtype=torch.float64)
    x_T = torch.randn(B, p["horizon"], p["action_dim"], generator=g, dtype=torch.float64)
    adds = bool(table.adds_noise.any())
    noise = torch.randn(T, B, p["horizon"], p["action_dim"], generator=g, dtype=torch.float64) if adds else None
    known = mask = None
    if p.get("inpaint"):
        mask = torch.rand(x_T.shape, generator=g) < 0.5
        known = torch.randn((T, *x_T.shape) if p["inpaint"] == "per_step" else x_T.shape, generator=g,
                            dtype=torch.float64)
        known[..., ~mask] = float("nan")
    ref = get_backend("torch").prepare(rounded_reference(policy, dtype), table).run(cond, x_T, noise, known, mask)

    p32 = copy.deepcopy(policy).float()
    packed = packing.pack_policy(p32, dtype)
    steps = packing.step_terms(p32, table.timesteps)
    call = packing.call_terms(p32, cond.float(), p32.weights(cond.float()))
    if p["strategy"] == "tanh":
        assert_signed_unnormalised(call.weights)
        if "zero_comp" in p:
            assert (call.weights[:, p["zero_comp"]] == 0).all()
    coef = cuda_backend.kernel_coef(table)
    x = x_T.reshape(B, D).float().contiguous()
    noise32 = noise.reshape(T, B, D).float().contiguous() if adds else None
    clip_range = float(table.clip_range) if table.clip_sample else None
    # The same validation the CUDA backend applies before taking pointers: the files
    # below have exactly the layout a real launch passes.
    dims = cuda_backend.check_launch(packed, steps, call, coef, x, noise32, torch.empty_like(x), clip_range,
                                     require_cuda=False)
    assert packed.dtype == dtype
    for n in ("w_in", "w_a", "w_b", "b_b", "w_out", "b_out"):
        _write(d, n, getattr(packed, n))
    _write(d, "t_in", steps.t_in)
    _write(d, "t_shift", steps.t_shift)
    for n in ("weights", "c_in", "scale", "shift"):
        _write(d, n, getattr(call, n))
    _write(d, "coef", coef)
    if noise32 is not None:
        _write(d, "noise", noise32)
    _write(d, "x", x)
    if known is not None:
        _write(d, "known", known.reshape(-1, B, D).squeeze(0).float())
        _write(d, "known_mask", mask.reshape(B, D).to(torch.uint8))
    args = [dims[k] for k in ("B", "D", "H", "L", "K", "T")]
    args += [int(clip_range is not None), clip_range or 0.0]
    return ref.reshape(B, D), args


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"emu_{name}")
            cache[name] = (d, *_problem(name, d))
        return cache[name]

    return get


def _run(driver, d: Path, kind, dtype, dims_args, plan_args, **env):
    """Run the driver on the inputs in `d` with extra environment variables; returns the process."""
    cmd = [str(driver), str(d), str(kind), str(WTYPE[dtype]), *map(str, dims_args), *map(str, plan_args), "1"]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1", **env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # a barrier mismatch hangs
    r.cmd = " ".join(cmd)
    return r


def _launch(driver, d: Path, kind, dtype, dims_args, plan_args, **env):
    """Run the driver on the inputs in `d`; returns (its output [B, D], its stderr)."""
    out_file = d / "out.bin"
    out_file.unlink(missing_ok=True)
    r = _run(driver, d, kind, dtype, dims_args, plan_args, **env)
    assert r.returncode == 0, f"{r.cmd}\n{r.stderr[-6000:]}"
    B, D = dims_args[0], dims_args[1]
    return torch.from_numpy(np.fromfile(out_file, dtype=np.float32)).reshape(B, D), r.stderr


def _run_driver(driver, problems, name, kind, plan_args, **env):
    """Run problem `name` with kernel `kind` and the driver's plan arguments; returns the driver's stderr."""
    d, ref, dims_args = problems(name)
    dtype = PROBLEMS[name]["dtype"]
    out, stderr = _launch(driver, d, kind, dtype, dims_args, plan_args, **env)
    assert torch.isfinite(out).all(), f"non-finite output (unwritten elements stay NaN)\n{stderr}"
    err = rel_err(out, ref)
    print(f"\n{stderr.strip()}  rel err {err:.2e}", file=sys.stderr)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}\n{stderr}"
    return stderr


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "{}-{}-bt{}-mma{}-R{}-G{}-gpc{}-smem{}".format(
    c[0], "pers" if c[1] == PERSISTENT else "step", *c[2:]))
def test_emulated_kernel_matches_reference(driver, problems, cfg):
    name, kind, *plan = cfg
    _run_driver(driver, problems, name, kind, plan)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] == "narrow"], ids=["pers-2teams", "step-2comp"])
def test_late_receiver_does_not_break_the_exchanges(driver, problems, cfg):
    """The cluster's last block arrives on every mbarrier 2 s late (FDP_EMU_LAG_US), so the other blocks
    run ahead of it as far as the protocol lets them, and a store that lands in a phase it was not
    meant for aborts the run. The result still matches the reference. Two protocols this rejects (both
    abort here with "a producer ran ahead of its receiver"): h always in hs, one mbarrier per buffer
    (a component's last exchange and the next one's first both write hs), and one set of partial slots
    for all steps (a block of another team pushes step s + 1 while the late block is still in s)."""
    name, kind, *plan = cfg
    _run_driver(driver, problems, name, kind, plan, FDP_EMU_LAG_US="2000000")


# The target at batch 1 split into 4 groups of one component (1 and 2 column ranks): a global combine of four
# partials that are all nonzero (soft routing), so a sum whose order followed the arrivals would change bits
# (with top-k, hard or one weight 0, two partials or fewer are nonzero and any order gives the same sum).
@pytest.mark.parametrize("cfg", [("target", STEP, 1, 0, 1, 4, 1, SMEM_H100),
                                 ("target", STEP, 1, 0, 2, 4, 1, SMEM_H100)], ids=["R1", "R2"])
def test_global_combine_is_independent_of_arrival_order(driver, problems, cfg):
    """The clusters of each launch run last to first (FDP_EMU_REVERSE_CLUSTERS), so that under a global
    combine another block of each tile arrives last and applies the update: the result is the same bit
    for bit, since that block sums the groups' partials in group order whichever it is (the atomic
    counter only elects it). The GPU tests that compare graph replays, streams and launches bit for
    bit rely on this. Checked to fail when the last block sums from its own group on (12 of 32
    elements differed)."""
    name, kind, *plan = cfg
    d, ref, dims_args = problems(name)
    dtype = PROBLEMS[name]["dtype"]
    fwd, _ = _launch(driver, d, kind, dtype, dims_args, plan)
    rev, _ = _launch(driver, d, kind, dtype, dims_args, plan, FDP_EMU_REVERSE_CLUSTERS="1")
    assert torch.isfinite(fwd).all() and rel_err(fwd, ref) < TOL[dtype]
    assert torch.equal(fwd, rev)


@pytest.mark.parametrize("cfg", [("narrow", PERSISTENT, 1, 0, 4, 2, 2, SMEM_H100),  # S=8, a rank without columns
                                 ("target", PERSISTENT, 1, 0, 2, 1, 1, 60000)],    # S=2, 256 hidden columns
                         ids=["narrow", "target"])
def test_late_warp_does_not_break_the_exchanges(driver, problems, cfg):
    """In the cluster's last block, warp 0 resumes 50 ms after each mbarrier wait
    (FDP_EMU_WARP_LAG_US), so the block's other warps run ahead of it as far as the team exchanges
    let them. The exchanges have no block barrier: every thread arrives on the mbarrier and every warp
    waits itself, so a phase must not complete without the late warp's arrival. A protocol where
    thread 0 alone arrives and the warps wait without a block barrier fails here: the others read
    the late warp's columns before it stores them and overwrite the buffer it still reads."""
    name, kind, *plan = cfg
    _run_driver(driver, problems, name, kind, plan, FDP_EMU_WARP_LAG_US="50000")


@pytest.mark.parametrize("skew", [4, -4])
@pytest.mark.parametrize("cfg", [("target", PERSISTENT, 1, 0, 2, 1, 1, 60000),  # team and combine exchanges
                                 ("fixed", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100)],  # the combine's only
                         ids=["team", "combine"])
def test_wrong_expected_byte_count_is_caught(driver, problems, cfg, skew):
    """The emulated mbarriers check the kernel's transaction accounting: with every arrive.expect_tx
    off by one 4-byte word, a phase either never completes (the wait gives up and names the barrier)
    or completes a store early and that store then lands in the next phase; either way the run aborts.
    The same configurations pass with the kernel's own counts (test_emulated_kernel_matches_reference)."""
    name, kind, *plan = cfg
    d, _, dims_args = problems(name)
    r = _run(driver, d, kind, PROBLEMS[name]["dtype"], dims_args, plan, FDP_EMU_TX_SKEW=str(skew),
             FDP_EMU_HANG_S="10")
    assert r.returncode != 0, f"{r.cmd}\n{r.stderr[-3000:]}"
    assert "emu: mbarrier (block rank" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("cfg", [("fixed", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),
                                 ("fixed", STEP, 8, 0, 1, 3, 1, SMEM_H100),
                                 ("tanh", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),
                                 ("tanh", STEP, 8, 0, 1, 3, 1, SMEM_H100)],
                         ids=["pers-bt1-local", "step-bt8-global", "tanh-pers-bt1-local", "tanh-step-bt8-global"])
def test_nan_router_weight_gives_nan_in_its_row_only(driver, problems, tmp_path, cfg):
    """A NaN router weight makes its row NaN, as in torch, also for a component every other row gives
    weight 0 ("fixed" and "tanh" route nothing to component 1: the NaN alone makes it used; "tanh"'s
    other weights are signed and unnormalised); the other rows are unaffected."""
    name, kind, *plan = cfg
    src, ref, dims_args = problems(name)
    for f in src.glob("*.bin"):
        shutil.copy(f, tmp_path / f.name)
    weights = torch.from_numpy(np.fromfile(src / "weights.bin", dtype=np.float32)).reshape(ref.shape[0], -1)
    assert (weights[:, 1] == 0).all()
    bad = 1
    weights[bad, 1] = float("nan")
    _write(tmp_path, "weights", weights)
    out, _ = _launch(driver, tmp_path, kind, torch.float32, dims_args, plan)
    assert torch.isnan(out[bad]).all(), out[bad]
    others = [i for i in range(ref.shape[0]) if i != bad]
    err = rel_err(out[others], ref[others])
    assert err < TOL[torch.float32], err


@pytest.mark.parametrize("cfg", [("fixed", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),
                                 ("fixed", STEP, 8, 0, 1, 3, 1, SMEM_H100),
                                 ("tanh", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),
                                 ("tanh", STEP, 8, 0, 1, 3, 1, SMEM_H100)],
                         ids=["pers-bt1-local", "step-bt8-global", "tanh-pers-bt1-local", "tanh-step-bt8-global"])
def test_nan_component_output_reaches_only_rows_that_use_it(driver, problems, tmp_path, cfg):
    """Component 1 outputs NaN and one row of the tile gives it a weight: that row is NaN, and every
    other row, whose weight for it is 0, leaves it out (as fdp.FactorizedPolicy.compose does) and
    stays equal to the reference, though the tile as a whole runs the component."""
    name, kind, *plan = cfg
    src, ref, dims_args = problems(name)
    for f in src.glob("*.bin"):
        shutil.copy(f, tmp_path / f.name)
    K = dims_args[4]
    b_out = torch.from_numpy(np.fromfile(src / "b_out.bin", dtype=np.float32)).reshape(K, -1)
    b_out[1] = float("nan")
    _write(tmp_path, "b_out", b_out)
    weights = torch.from_numpy(np.fromfile(src / "weights.bin", dtype=np.float32)).reshape(ref.shape[0], -1)
    assert (weights[:, 1] == 0).all()
    bad = 1
    weights[bad, 1] = -0.25 if PROBLEMS[name]["strategy"] == "tanh" else 0.25
    _write(tmp_path, "weights", weights)
    out, _ = _launch(driver, tmp_path, kind, torch.float32, dims_args, plan)
    assert torch.isnan(out[bad]).all(), out[bad]
    others = [i for i in range(ref.shape[0]) if i != bad]
    assert torch.isfinite(out[others]).all()
    err = rel_err(out[others], ref[others])
    assert err < TOL[torch.float32], err


@pytest.mark.parametrize("cfg", PLANNED, ids=lambda c: "{}-{}-{}".format(
    c[0], "pers" if c[1] == PERSISTENT else "step", c[2]))
def test_planned_launch_matches_reference(driver, problems, cfg):
    """make_plan chooses for the emulated GPU; the launch goes through launch_steps / launch_plan."""
    name, kind, device, expect = cfg
    stderr = _run_driver(driver, problems, name, kind, ["plan", device])
    chosen = _fields(stderr.split(f"plan ({device}): ", 1)[1].splitlines()[0])
    assert {k: chosen[k] for k in expect} == expect, chosen
    T = PROBLEMS[name]["T"]
    pdl = T - 1 if kind == STEP and device == "h100" else 0  # per-step launches after the first, on sm_90
    assert f"programmatic launches: {pdl} of {1 if kind == PERSISTENT else T}" in stderr, stderr


# ------------------------------------------------------------------------------------------------------------
# The planner and the launch configuration for real GPUs (emulated device queries; nothing runs)

GPUS = ("h100", "a100", "rtx4090", "orin")  # emulated in emu_runtime.h


def _fields(text):
    return {k: int(v) for k, v in (f.split("=") for f in text.split() if "=" in f and "," not in f)}


def _query(driver, lines, **env):
    """Run `driver --query` (with extra environment variables `env`); returns one (status, rest) per input line."""
    r = subprocess.run([str(driver), "--query"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0", **env))
    assert r.returncode == 0, r.stderr[-4000:]
    out = [tuple(line.split(" ", 1)) for line in r.stdout.splitlines()]
    assert len(out) == len(lines), r.stdout
    return out


@pytest.fixture(scope="module")
def gpus(driver):
    """The emulated GPUs' limits: SMs, shared memory per SM and per block (opt-in), clusters, static smem."""
    return {g: _fields(rest) for g, (_, rest) in zip(GPUS, _query(driver, [f"device {g}" for g in GPUS]))}


def _plan_cmd(gpu, kind, dtype, B, D, H, L, K, T=10, bt=0, ranks=0, groups=0, mma=NO_MMA):
    return f"plan {gpu} {kind} {WTYPE[dtype]} {B} {D} {H} {L} {K} {T} {bt} {ranks} {groups} {mma}"


# (kind, weight dtype, B, D, H, L, K): the target at batch 1 and 256, bf16 on tensor cores, wide and small models.
PLAN_SHAPES = [
    (kind, dtype, B, D, H, L, K)
    for kind in (STEP, PERSISTENT)
    for dtype, B, D, H, L, K in [
        (torch.float32, 1, 32, 256, 2, 4), (torch.float32, 256, 32, 256, 2, 4),
        (torch.bfloat16, 1, 32, 256, 2, 4), (torch.bfloat16, 64, 32, 256, 2, 4),
        (torch.float16, 1000, 112, 128, 3, 8), (torch.float32, 3, 15, 1024, 1, 2),
        (torch.bfloat16, 17, 7, 24, 1, 3),
    ]
]


def test_plans_fit_each_gpus_limits(driver, gpus):
    """Every plan stays within the GPU's per-block shared memory, covers the batch with its tiles,
    keeps its resident weights within the total, and uses clusters only on H100 (sm_90)."""
    lines, keys = [], []
    for gpu in GPUS:
        for kind, dtype, B, D, H, L, K in PLAN_SHAPES:
            lines.append(_plan_cmd(gpu, kind, dtype, B, D, H, L, K))
            keys.append((gpu, kind, dtype, B, D, H, L, K))
    for (gpu, kind, dtype, B, D, H, L, K), (status, rest) in zip(keys, _query(driver, lines)):
        assert status == "ok", (gpu, kind, dtype, B, D, H, L, K, rest)
        p = _fields(rest)
        assert p["smem"] + p["static"] <= gpus[gpu]["optin"] and p["fixed"] <= p["smem"], (gpu, p)
        assert p["resident"] <= p["weights"] and p["smem"] == p["fixed"] + p["resident"], (gpu, p)
        assert p["tiles"] == -(-B // p["bt"]), (gpu, p)
        assert p["mma"] == int(dtype != torch.float32 and B >= 16), (gpu, dtype, B, p)
        assert p["groups"] % p["gpc"] == 0 and 1 <= p["groups"] <= K, p
        cluster = p["ranks"] * p["gpc"]
        assert cluster <= (16 if gpus[gpu]["cluster"] else 1), (gpu, p)
        if kind == PERSISTENT:
            assert p["gpc"] == p["groups"], p  # the persistent kernel combines inside the cluster
        print(gpu, "pers" if kind else "step", str(dtype).split(".")[-1], B, D, H, L, K, "->", rest)


def test_target_plans_per_gpu(driver):
    """Batch 1 of the target (K=4, H=256, D=32): on H100 both kernels run one 16-block cluster holding
    all four components, 4 column ranks each (the per-step kernel combines in it, no global scratch);
    the GPUs without clusters run one block per component (per-step, global combine) or one block
    for all (persistent)."""
    cmds = {(gpu, kind, dt): _plan_cmd(gpu, kind, dt, 1, 32, 256, 2, 4)
            for gpu in GPUS for kind in (STEP, PERSISTENT) for dt in (torch.float32, torch.bfloat16)}
    got = {key: _fields(rest) for key, (status, rest) in zip(cmds, _query(driver, list(cmds.values())))}
    f32, bf16 = torch.float32, torch.bfloat16
    for dt in (f32, bf16):
        assert {k: got["h100", STEP, dt][k] for k in ("bt", "ranks", "groups", "gpc")} == dict(bt=1, ranks=4, groups=4,
                                                                                               gpc=4)
        assert {k: got["h100", PERSISTENT, dt][k] for k in ("ranks", "groups", "gpc")} == dict(ranks=4, groups=4,
                                                                                               gpc=4)
        for gpu in ("a100", "rtx4090", "orin"):
            assert {k: got[gpu, STEP, dt][k] for k in ("bt", "ranks", "groups", "gpc")} == dict(bt=1, ranks=1, groups=4,
                                                                                                gpc=1)
            assert {k: got[gpu, PERSISTENT, dt][k] for k in ("bt", "ranks", "groups")} == dict(bt=1, ranks=1, groups=1)
    # The fp32 target weights (1.1 MB per component) never fit one block: what is resident depends on the GPU.
    # In bf16 (cuda-persistent's default dtype) the H100 cluster holds all of them for all T steps.
    assert got["h100", PERSISTENT, f32]["resident"] < got["h100", PERSISTENT, f32]["weights"]
    assert got["h100", PERSISTENT, bf16]["resident"] == got["h100", PERSISTENT, bf16]["weights"] > 0


def test_fma_slices_read_without_bank_conflicts(driver):
    """mm_fma's lanes read one 16-byte unit each, of the same column vector, from consecutive rows of a
    resident slice; a quarter warp (8 lanes, 8 consecutive rows from a multiple of 8) reads in one
    shared-memory wavefront only if its units fall in 8 different groups of 4 banks (a 128-byte line
    holds 8 units). slice_geom's layout (rows of U units, unit u of row r at fma_unit(u, r)) must give
    that for every width, without padding a row by more than one unit."""
    cases = [(wtype, cols) for wtype in (0, 1, 2) for cols in range(1, 300)]
    for (wtype, cols), (status, rest) in zip(cases, _query(driver, [f"slice {w} {c}" for w, c in cases])):
        assert status == "ok", rest
        f = dict(kv.split("=") for kv in rest.split())
        U, elems = int(f["units"]), 16 // (4 if wtype == 0 else 2)
        assert int(f["stride"]) == U * elems and -(-cols // elems) <= U <= -(-cols // elems) + 1, (wtype, cols, f)
        pos = [[int(u) for u in row.split(",")] for row in f["rows"].split(";")]
        assert all(sorted(row) == list(range(U)) for row in pos), (wtype, cols, f)  # a permutation of the row
        for u in range(U):
            groups = {(r * U + pos[r][u]) % 8 for r in range(8)}
            assert len(groups) == 8, (wtype, cols, u, f)


def test_step_plan_splits_components_only_while_tiles_fit_the_sms(driver, gpus):
    """The per-step kernel gives every component its own blocks while the row tiles alone leave SMs
    idle: 50 tiles of 8 rows split on A100 (108 SMs) and RTX 4090 (128), not on Orin (16)."""
    lines = [_plan_cmd(gpu, STEP, torch.float32, 400, 12, 64, 1, 4) for gpu in GPUS]
    got = {gpu: _fields(rest) for gpu, (_, rest) in zip(GPUS, _query(driver, lines))}
    assert all(p["tiles"] == 50 and p["bt"] == 8 for p in got.values()), got
    assert gpus["orin"]["sms"] < 50 < min(gpus["a100"]["sms"], gpus["rtx4090"]["sms"])
    assert got["a100"]["groups"] == got["rtx4090"]["groups"] == 4 and got["orin"]["groups"] == 1, got


def test_plan_refuses_activations_beyond_shared_memory(driver, gpus):
    """A model whose activations alone need more shared memory than the GPU's per-block opt-in is
    refused with the limit in the reason. One block of D = 1024, H = 2048 (one component, one row)
    needs about 108 KB before any weight: over the RTX 4090's 99 KB, within A100's / Orin's 163 KB;
    at D = 4096, H = 3072 only H100 serves it, by splitting the columns over a cluster."""
    shapes = [(1024, 2048), (4096, 3072)]
    lines = [_plan_cmd(gpu, PERSISTENT, torch.float32, 1, D, H, 1, 1, bt=1) for D, H in shapes for gpu in GPUS]
    got = dict(zip([(D, gpu) for D, _ in shapes for gpu in GPUS], _query(driver, lines)))
    for (D, gpu), (status, rest) in got.items():
        fits = gpu == "h100" or (D == 1024 and gpu != "rtx4090")
        if fits:
            assert status == "ok", (D, gpu, rest)
            if gpu != "h100":
                assert _fields(rest)["fixed"] > gpus["rtx4090"]["optin"], (D, gpu, rest)
        else:
            assert status == "refused" and f"more than the {gpus[gpu]['optin']} this device allows" in rest, (
                D, gpu, rest)
    assert _fields(got[4096, "h100"][1])["ranks"] > 1


def test_launch_configuration(driver, gpus):
    """launch_plan's grid, block, shared memory and cluster shape, as the emulated runtime receives them;
    it accepts them only if the CUDA runtime would (no cluster on a GPU without clusters, none over 8
    blocks without the non-portable opt-in, no more shared memory than the function's opt-in)."""
    cases = [  # (gpu, kind, dtype, B, T, step_begin, step_end)
        ("h100", STEP, torch.float32, 1, 10, 3, 4),
        ("h100", PERSISTENT, torch.float32, 1, 10, 0, 10),
        ("h100", STEP, torch.bfloat16, 200, 10, 9, 10),
        ("a100", STEP, torch.float32, 1, 10, 0, 1),
        ("orin", PERSISTENT, torch.bfloat16, 300, 10, 0, 10),
    ]
    lines = [f"launch {g} {k} {WTYPE[dt]} {B} 32 256 2 4 {T} {s0} {s1}" for g, k, dt, B, T, s0, s1 in cases]
    for (gpu, kind, dtype, B, T, s0, s1), (status, rest) in zip(cases, _query(driver, lines)):
        assert status == "ok", (gpu, kind, rest)
        p = _fields(rest)
        grid = tuple(int(v) for v in rest.split("grid=")[1].split()[0].split(","))
        steps = tuple(int(v) for v in rest.split("steps=")[1].split()[0].split(","))
        S = p["ranks"] * p["gpc"]
        assert grid == (S * p["tiles"], p["groups"] // p["gpc"]), (gpu, grid, p)
        assert p["cluster"] == S and p["block"] == 256 and steps == (s0, s1), (gpu, p)
        assert p["smem"] + p["static"] <= gpus[gpu]["optin"]
        print(gpu, "pers" if kind else "step", B, "->", rest)


def test_step_kernel_refuses_more_than_one_step_per_launch(driver):
    """Only the first step's coefficients are staged in the per-step kernel: launch_plan refuses a
    launch of it over several steps (the persistent kernel takes any range)."""
    lines = [f"launch h100 {STEP} 0 1 32 256 2 4 10 0 2", f"launch a100 {STEP} 0 5 12 24 1 3 10 4 4",
             f"launch h100 {PERSISTENT} 0 1 32 256 2 4 10 0 10"]
    (s1, r1), (s2, r2), (s3, r3) = _query(driver, lines)
    assert s1 == "error" and "exactly one step per launch" in r1 and "[0, 2)" in r1, r1
    assert s2 == "error" and "[4, 4)" in r2, r2
    assert s3 == "ok", r3


def test_step_plan_combines_in_one_cluster_when_it_pays(driver):
    """On H100 the per-step planner puts all K groups of a tile in one cluster of K x R blocks (combine
    over DSMEM) unless those blocks, with fewer ranks each, would stream over 128 KB more weights from
    L2 per launch than the global-combine plan (its estimated cost). K=4, H=256: R=4, one 16-block
    cluster in fp32 and bf16. K=8: R=2 in bf16 (each block streams the 64 KB of weights that do not fit
    its shared memory); in fp32 R=2 would stream 384 KB, so it keeps the global combine with 16 ranks
    per component (every slice resident). An explicit `groups` keeps the global combine."""
    f32, bf16 = torch.float32, torch.bfloat16
    cases = {  # name: (plan command, expected (ranks, groups, gpc))
        "k4_f32": (_plan_cmd("h100", STEP, f32, 1, 32, 256, 2, 4), (4, 4, 4)),
        "k4_bf16": (_plan_cmd("h100", STEP, bf16, 1, 32, 256, 2, 4), (4, 4, 4)),
        "k8_bf16": (_plan_cmd("h100", STEP, bf16, 1, 32, 256, 2, 8), (2, 8, 8)),
        "k8_f32": (_plan_cmd("h100", STEP, f32, 1, 32, 256, 2, 8), (16, 8, 1)),
        "k8_f32_r2": (_plan_cmd("h100", STEP, f32, 1, 32, 256, 2, 8, ranks=2), (2, 8, 8)),
        "k4_groups": (_plan_cmd("h100", STEP, f32, 1, 32, 256, 2, 4, groups=4), (16, 4, 1)),
    }
    got = {}
    for name, (status, rest) in zip(cases, _query(driver, [c for c, _ in cases.values()])):
        assert status == "ok", (name, rest)
        got[name] = _fields(rest)
        assert (got[name]["ranks"], got[name]["groups"], got[name]["gpc"]) == cases[name][1], (name, rest)
    streamed = {name: p["weights"] - p["resident"] for name, p in got.items()}
    assert streamed["k4_bf16"] == 0 and streamed["k4_f32"] <= 128 * 1024, streamed
    assert 0 < streamed["k8_bf16"] <= 128 * 1024, streamed
    assert streamed["k8_f32"] == 0 and streamed["k8_f32_r2"] > 128 * 1024, streamed
    assert got["k4_f32"]["ranks"] * got["k4_f32"]["gpc"] == 16


def test_persistent_plan_keeps_the_cluster_at_a_smaller_tile(driver):
    """Every block of an in-cluster combine holds the partials of all G groups of its tile ([2, G, bt, D]
    floats), so at large tiles the cluster holding all K components may not fit a block, or leaves little
    room for weights. On H100 the persistent planner then takes a smaller tile that keeps the cluster
    (another tile size only if its step is estimated shorter and its blocks read no more weight bytes
    from L2 in all) before one block per tile, which streams all K components' weights at every step.
    K=8, D=112, H=128, L=3, fp16, B=1000: 64-row tiles held a 16-block cluster with 89856 bytes of each
    block's weights resident before the partials grew; at 64 (and 32) rows the cluster no longer fits,
    and the one-block plan keeps none of its 2.1 MB resident. 16-row tiles keep the cluster (87808 bytes
    resident). K=4, D=64, H=512, L=2, bf16, B=1024: 32-row tiles keep the 16-block cluster with 17408 bytes
    resident (41984 before the partials grew); 16-row tiles would keep 41984 but need twice the blocks,
    which read more weight bytes from L2 in all, so 32 rows stay."""
    f16, bf16 = torch.float16, torch.bfloat16
    cmds = {
        "k8": _plan_cmd("h100", PERSISTENT, f16, 1000, 112, 128, 3, 8),
        "k8_bt64": _plan_cmd("h100", PERSISTENT, f16, 1000, 112, 128, 3, 8, bt=64),
        "k4": _plan_cmd("h100", PERSISTENT, bf16, 1024, 64, 512, 2, 4),
        "k4_bt16": _plan_cmd("h100", PERSISTENT, bf16, 1024, 64, 512, 2, 4, bt=16),
        "target": _plan_cmd("h100", PERSISTENT, bf16, 1, 32, 256, 2, 4),
    }
    got = {}
    for name, (status, rest) in zip(cmds, _query(driver, list(cmds.values()))):
        assert status == "ok", (name, rest)
        got[name] = _fields(rest)
    shape = {name: (p["bt"], p["ranks"], p["groups"], p["gpc"]) for name, p in got.items()}
    assert shape["k8"] == (16, 2, 8, 8) and (got["k8"]["resident"], got["k8"]["weights"]) == (87808, 143104), got["k8"]
    # The plan make_plan chose before it tried smaller tiles: one block per 64-row tile, no weight resident.
    assert shape["k8_bt64"] == (64, 1, 1, 1) and got["k8_bt64"]["resident"] == 0, got["k8_bt64"]
    assert got["k8_bt64"]["weights"] == 2160640, got["k8_bt64"]
    assert shape["k4"] == (32, 4, 4, 4) and (got["k4"]["resident"], got["k4"]["weights"]) == (17408, 599040), got["k4"]
    assert shape["k4_bt16"] == (16, 4, 4, 4) and got["k4_bt16"]["resident"] == 41984, got["k4_bt16"]

    def l2_bytes_per_step(p):
        return p["tiles"] * p["ranks"] * p["gpc"] * (p["weights"] - p["resident"])

    assert l2_bytes_per_step(got["k4"]) < l2_bytes_per_step(got["k4_bt16"])
    # The target at batch 1 stays one 16-block cluster of all four components.
    assert shape["target"] == (1, 4, 4, 4) and got["target"]["tiles"] == 1, got["target"]


def test_step_launches_after_the_first_are_programmatic_on_sm90_only(driver):
    """launch_steps (what mlp_step_launch calls) launches every per-step launch after the first with
    programmatic stream serialization on H100; the first stays plain, since the kernels before it in
    the stream wrote what its prologue reads. GPUs below sm_90 never get the attribute (the emulated
    runtime refuses it there), and the persistent kernel is one plain launch."""
    cases = [  # (gpu, kind, dtype, B, step_begin, step_end)
        ("h100", STEP, torch.float32, 1, 0, 10),
        ("h100", STEP, torch.bfloat16, 200, 3, 7),
        ("h100", STEP, torch.float32, 1, 9, 10),
        ("a100", STEP, torch.float32, 1, 0, 10),
        ("rtx4090", STEP, torch.bfloat16, 1, 0, 10),
        ("orin", STEP, torch.float32, 300, 0, 10),
        ("h100", PERSISTENT, torch.float32, 1, 0, 10),
    ]
    lines = [f"steps {g} {k} {WTYPE[dt]} {B} 32 256 2 4 10 {s0} {s1}" for g, k, dt, B, s0, s1 in cases]
    for (gpu, kind, _, _, s0, s1), (status, rest) in zip(cases, _query(driver, lines)):
        assert status == "ok", (gpu, kind, rest)
        fields = dict(f.split("=", 1) for f in rest.split())
        steps = [tuple(map(int, s.split(","))) for s in fields["steps"].split(";")]
        pdl = [int(v) for v in fields["programmatic"].split(",")]
        if kind == PERSISTENT:
            assert steps == [(s0, s1)] and pdl == [0], rest
            continue
        assert steps == [(s, s + 1) for s in range(s0, s1)], rest
        assert pdl == [0] + [int(gpu == "h100")] * (s1 - s0 - 1), (gpu, rest)


def test_programmatic_launches_can_be_turned_off(driver):
    """FDP_CUDA_PDL=0 (for a runtime that cannot capture programmatic launches into a graph) makes every
    per-step launch a plain one on H100; the same query without it has programmatic launches."""
    line = f"steps h100 {STEP} {WTYPE[torch.float32]} 1 32 256 2 4 10 0 10"
    for env, expect in [({}, [0] + [1] * 9), ({"FDP_CUDA_PDL": "0"}, [0] * 10)]:
        ((status, rest),) = _query(driver, [line], **env)
        assert status == "ok", rest
        fields = dict(f.split("=", 1) for f in rest.split())
        assert [int(v) for v in fields["programmatic"].split(",")] == expect, (env, rest)


# -- the per-call terms kernel (csrc/call_terms.cuh) -----------------------------------------------------------------
# Its block body runs on the host thread by thread between the block's synchronisations
# (tests/cuda_emulation/call_terms_driver.cpp), against the same float64 truth and float32 bounds as the Triton
# kernel (helpers.cond_truth_and_bounds).


@pytest.fixture(scope="module")
def call_terms_driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++)")
    exe = tmp_path_factory.mktemp("call_terms_emulation") / "call_terms_driver"
    sanitize = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"]
    cmd = [cxx, "-std=c++20", f"-I{CSRC}", str(EMU / "call_terms_driver.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd[:1] + sanitize + cmd[1:], capture_output=True, text=True)
    if r.returncode and "cannot find" in r.stderr and "san" in r.stderr:
        warnings.warn("sanitizer runtimes missing: call-terms driver built without ASan/UBSan")
        r = subprocess.run(cmd[:1] + ["-O1"] + cmd[1:], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling the call-terms driver failed:\n{r.stderr[-6000:]}"
    return exe


def _emulated_call_terms(exe, pc, c, d: Path):
    d.mkdir(parents=True, exist_ok=True)
    B = c.shape[0]
    for name, t in (("c", c), ("w1", pc.router_w1), ("b1", pc.router_b1), ("w2", pc.router_w2),
                    ("b2", pc.router_b2), ("fixed", pc.fixed), ("cw", pc.cond_w), ("cb", pc.cond_b)):
        _write(d, name, t.float())
    (d / "dims.txt").write_text(f"{B} {pc.Dc} {pc.cond_w.shape[0]} {pc.Hr} {pc.K} {pc.L} {pc.H} {pc.strategy} "
                                f"{pc.topk}\n")
    r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = torch.from_numpy(np.fromfile(d / "out.bin", dtype=np.float32))
    assert out.numel() == packing.call_terms_numel(B, pc.K, pc.L, pc.H)
    return packing.split_call_terms(out, B, pc.K, pc.L, pc.H)


# K, L, H, Dc, Hr, B: odd sizes, columns over several blocks of 256, Hr over 256 (threads with two hidden units),
# rows over two tiles of 8, batch 1.
CALL_CASES = [(3, 1, 17, 5, 7, 1), (5, 3, 19, 37, 301, 11), (8, 2, 24, 3, 9, 9), (1, 1, 16, 6, 5, 2)]


@pytest.mark.parametrize("strategy", ["soft", "tanh", "hard", "topk", "fixed"])
@pytest.mark.parametrize("case", CALL_CASES, ids=lambda c: "K{}L{}H{}Dc{}Hr{}B{}".format(*c))
def test_emulated_call_terms_match_the_policy(call_terms_driver, tmp_path, strategy, case):
    from helpers import assert_terms_within, cond_policy, cond_truth_and_bounds

    K, L, H, Dc, Hr, B = case
    if strategy == "topk" and K == 1:
        pytest.skip("top-k of one component is hard routing")
    policy = cond_policy(K=K, L=L, H=H, Dc=Dc, Hr=Hr, strategy=strategy, seed=K + L)
    pc = packing.pack_cond(policy)
    c = torch.randn(B, Dc)
    truth, bounds = cond_truth_and_bounds(policy, c)
    assert_terms_within(_emulated_call_terms(call_terms_driver, pc, c, tmp_path), truth, bounds)


@pytest.mark.parametrize("strategy", ["soft", "tanh", "hard", "topk", "fixed"])
@pytest.mark.parametrize("conditional", [True, False])
def test_emulated_call_terms_nan_rules(call_terms_driver, tmp_path, strategy, conditional):
    """A NaN feature row and non-finite logits give what the policy gives (fdp.router's NaN rules)."""
    from fdp._validation import inputs_already_checked
    from helpers import cond_policy

    policy = cond_policy(K=4, strategy=strategy, conditional=conditional)
    c = torch.randn(4, 5, dtype=torch.float64)
    c[2] = float("nan")
    with inputs_already_checked():
        want = packing.call_terms(policy, c, policy.weights(c))
    got = _emulated_call_terms(call_terms_driver, packing.pack_cond(policy), c.float(), tmp_path / "row")
    for f in ("weights", "c_in", "scale", "shift"):
        assert torch.equal(torch.isnan(getattr(got, f)), torch.isnan(getattr(want, f))), f
    assert torch.isnan(got.weights[2]).all() == (strategy != "fixed")
    assert torch.isnan(got.c_in[2]).all() == conditional
    if strategy == "fixed":
        return
    for i, bad in enumerate((float("nan"), float("inf"), -float("inf"))):
        with torch.no_grad():
            policy.router.net[2].weight[1].zero_()
            policy.router.net[2].bias[1] = bad
        c = torch.randn(3, 5, dtype=torch.float64)
        want = policy.weights(c).float()
        got = _emulated_call_terms(call_terms_driver, packing.pack_cond(policy), c.float(), tmp_path / f"logit{i}")
        assert torch.equal(torch.isnan(got.weights), torch.isnan(want))
        if not torch.isnan(want).any():
            assert (got.weights[:, 1] == 0).all()
            torch.testing.assert_close(got.weights, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("strategy,logits,expected", [("hard", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 1, 0, 0, 0]),
                                                      ("topk", [3.0] * 5, [0.5, 0.5, 0, 0, 0])])
def test_emulated_call_terms_ties_go_to_the_lowest_index(call_terms_driver, tmp_path, strategy, logits, expected):
    from helpers import cond_policy

    policy = cond_policy(K=5, strategy=strategy)
    with torch.no_grad():
        policy.router.net[2].weight.zero_()
        policy.router.net[2].bias.copy_(torch.tensor(logits, dtype=torch.float64))
    got = _emulated_call_terms(call_terms_driver, packing.pack_cond(policy), torch.randn(3, 5), tmp_path)
    assert torch.equal(got.weights, torch.tensor(expected, dtype=torch.float32).expand(3, 5))
