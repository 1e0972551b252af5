"""The CUDA fused-MLP kernels' device code, run on the CPU through a host emulation.

CI has no GPU, so this is where the arithmetic and indexing of ``run_tile``
(csrc/mlp_common.cuh) is checked on every run: tests/cuda_emulation/driver.cpp
compiles it for host threads (emu.h supplies barriers, warp shuffles, mma
fragments, DSMEM and cp.async; see tests/cuda_emulation/README.md) under
AddressSanitizer and UBSan, and each configuration's result is compared with the
float64 torch reference. Shared memory starts as 0xCD garbage and every output
(and the global-combine scratch) is poisoned with NaN first, so anything the
kernel forgets to compute or reads before writing shows up as an error.

The plan (tile rows, tensor cores, cluster ranks, component groups) is chosen
per configuration rather than by the device-dependent planner, to reach the
paths a GPU run would only take on particular hardware: clusters of up to 16
blocks, both combine modes, partly resident weights.
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

from conftest import KERNEL_SCHEDULERS, KERNEL_TOL, make_mlp_policy, rounded_reference

HERE = Path(__file__).resolve().parent
EMU = HERE / "cuda_emulation"
CSRC = HERE.parent / "csrc"

STEP, PERSISTENT = 0, 1
WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CXX_TYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
SMEM_H100 = 232448  # opt-in shared memory per block on sm_90

SCHEDULERS = KERNEL_SCHEDULERS
# fp32 weights take the FMA path (only float32 rounding and summation order differ
# from float64); 16-bit weights take tensor cores with activations rounded to TF32.
TOL = KERNEL_TOL


# A problem: policy, scheduler and batch. Several launch plans run on each.
PROBLEMS = {
    # The target shape: K=4, H=256, D=32 (horizon 16 x 2), one row.
    "target": dict(K=4, H=256, L=2, horizon=16, action_dim=2, B=1, sched="ddpm_clip", strategy="soft", T=2,
                   dtype=torch.float32),
    # Odd H and D, top-k routing, batch over two FMA tiles.
    "odd": dict(K=6, H=17, L=1, horizon=5, action_dim=3, B=11, sched="ddim_eta", strategy="topk", T=3,
                dtype=torch.float32),
    # Hard routing over a partial last tile: components nobody picked are skipped.
    "hard": dict(K=5, H=32, L=2, horizon=4, action_dim=3, B=9, sched="ddpm_clip", strategy="hard", T=3,
                 dtype=torch.float32),
    # Fixed mixture with one zero weight (skipped on every tile), deterministic DDIM.
    "fixed": dict(K=3, H=24, L=1, horizon=4, action_dim=3, B=3, sched="ddim", strategy="fixed", T=2,
                  dtype=torch.float32, zero_comp=1),
    "bf16": dict(K=3, H=48, L=2, horizon=5, action_dim=3, B=5, sched="ddpm_clip", strategy="soft", T=3,
                 dtype=torch.bfloat16),
    "fp16": dict(K=3, H=40, L=1, horizon=5, action_dim=3, B=33, sched="ddim_eta", strategy="hard", T=2,
                 dtype=torch.float16),
}

# (problem, kind, bt, mma, ranks, groups, groups per cluster, shared-memory limit).
# Cluster size S = ranks * gpc; groups > gpc means global combine (step kernel only).
CONFIGS = [
    ("target", PERSISTENT, 1, 0, 4, 4, 4, SMEM_H100),   # S=16: DSMEM pushes + local combine
    ("target", PERSISTENT, 1, 0, 2, 1, 1, 60000),       # S=2, most weights read from global
    ("odd", STEP, 8, 0, 1, 3, 1, SMEM_H100),            # global combine, 2 tiles (the last one partial)
    ("odd", STEP, 8, 0, 1, 2, 2, 52000),                # local combine in the step kernel, weights partly resident
    ("hard", STEP, 8, 0, 1, 1, 1, SMEM_H100),           # skip of unused components
    ("fixed", PERSISTENT, 1, 0, 1, 3, 3, SMEM_H100),    # one block per group, local combine; zero weight skipped
    ("bf16", PERSISTENT, 16, 1, 2, 3, 3, 18000),        # tensor cores, S=6, weights partly resident
    ("bf16", PERSISTENT, 16, 1, 1, 1, 1, 16000),        # tensor cores, weights from global only
    ("fp16", STEP, 16, 1, 2, 3, 1, SMEM_H100),          # tensor cores, global combine, 3 tiles, hard routing
]


def _variants():
    """run_tile instantiations the configurations need (each is compile time)."""
    out = []
    for name, kind, bt, mma, *_ in CONFIGS:
        v = f"X({CXX_TYPE[PROBLEMS[name]['dtype']]}, {bt}, {mma}, {kind})"
        if v not in out:
            out.append(v)
    return " ".join(out)


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
    exe = tmp_path_factory.mktemp("cuda_emulation") / "driver"
    base = [cxx, "-std=c++20", "-pthread", f"-I{EMU}", f"-I{CSRC}", f"-I{inc}", '-DFDP_HOST_EMULATION="emu.h"',
            f"-DFDP_EMU_VARIANTS={_variants()}", str(EMU / "driver.cpp"), "-o", str(exe)]
    # -O1 is ASan's recommended level. Sanitizers are most of the compile time (about 20 s of
    # ~25 s for the four variants on a 2-core machine) but catch out-of-bounds global and
    # shared-memory accesses, which the GPU would silently tolerate.
    sanitize = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"]
    t0 = time.perf_counter()
    r = subprocess.run(base + sanitize, capture_output=True, text=True)
    if r.returncode != 0 and "cannot find" in r.stderr and "san" in r.stderr:
        # A toolchain without the sanitizer runtimes: the arithmetic check still stands.
        warnings.warn("sanitizer runtimes missing: emulation driver built without ASan/UBSan")
        r = subprocess.run(base + ["-O1"], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling the emulation driver failed:\n{' '.join(base)}\n{r.stderr[-6000:]}"
    print(f"\ncuda emulation driver built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return exe


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
    make_sched, eta = SCHEDULERS[p["sched"]]
    table = make_sched().step_table(T, eta=eta)
    g = torch.Generator().manual_seed(1)
    D = p["horizon"] * p["action_dim"]
    cond = torch.randn(B, 5, generator=g, dtype=torch.float64)
    x_T = torch.randn(B, p["horizon"], p["action_dim"], generator=g, dtype=torch.float64)
    adds = bool(table.adds_noise.any())
    noise = torch.randn(T, B, p["horizon"], p["action_dim"], generator=g, dtype=torch.float64) if adds else None
    ref = get_backend("torch").prepare(rounded_reference(policy, dtype), table).run(cond, x_T, noise)

    p32 = copy.deepcopy(policy).float()
    packed = packing.pack_policy(p32, dtype)
    steps = packing.step_terms(p32, table.timesteps)
    call = packing.call_terms(p32, cond.float())
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


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "{}-{}-bt{}-mma{}-R{}-G{}-gpc{}-smem{}".format(
    c[0], "pers" if c[1] == PERSISTENT else "step", *c[2:]))
def test_emulated_kernel_matches_reference(driver, problems, cfg):
    name, kind, bt, mma, ranks, groups, gpc, smem = cfg
    d, ref, dims_args = problems(name)
    dtype = PROBLEMS[name]["dtype"]
    out_file = d / "out.bin"
    out_file.unlink(missing_ok=True)
    cmd = [str(driver), str(d), str(kind), str(WTYPE[dtype]), *map(str, dims_args),
           str(bt), str(mma), str(ranks), str(groups), str(gpc), str(smem), "1"]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # a barrier mismatch hangs
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    out = torch.from_numpy(np.fromfile(out_file, dtype=np.float32)).reshape(ref.shape)
    assert torch.isfinite(out).all(), f"non-finite output (unwritten elements stay NaN)\n{r.stderr}"
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    print(f"\n{r.stderr.strip()}  rel err {err:.2e}", file=sys.stderr)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}\n{r.stderr}"
