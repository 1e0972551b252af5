"""scripts/resource_report.py: its parsers and checks, and the report itself on what CI builds.

The parsers are tested on recorded cuobjdump output and, where nvcc exists, on a kernel forced to
spill (``-maxrregcount``) next to clean ones, with ptxas -v's own verdict as the oracle. The report
then runs on the built extension (every architecture the binary holds) and on the Triton kernels'
launches compiled for sm_90, and must find nothing over a limit.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "resource_report.py"
_spec = importlib.util.spec_from_file_location("resource_report", SCRIPT)
rr = importlib.util.module_from_spec(_spec)
sys.modules["resource_report"] = rr  # its dataclasses look their module up there
_spec.loader.exec_module(rr)

# `cuobjdump --dump-resource-usage` and `cuobjdump -sass` (abridged) of the kernels below, sm_90.
RECORDED_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z6spillsPfi:
  REG:16 STACK:264 SHARED:0 LOCAL:0 CONSTANT[0]:540 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z8withsmemPf:
  REG:10 STACK:0 SHARED:1152 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
RECORDED_SASS = """
	code for sm_90
		Function : _Z6spillsPfi
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*01c0*/                   STL [R1+0x4], R7 ;
        /*01d0*/                   STL.64 [R1+0x8], R8 ;
        /*0310*/                   LDL.LU R4, [R1+0x4] ;
        /*0320*/                   FFMA R5, R4, R4, R5 ;
		Function : _Z8withsmemPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0050*/                   LDS R3, [R2] ;
"""

SPILL_CU = r"""
// Dynamically indexed 64-float array under a 16-register cap: spills and local memory.
__global__ void spills(float* o, int n) {
  float a[64];
  for (int i = 0; i < 64; ++i) a[i] = o[i * blockDim.x + threadIdx.x];
  float s = 0;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < 64; ++i) s += a[i] * a[(i * 7 + j) & 63];
  o[threadIdx.x] = s;
}
__global__ void __launch_bounds__(256, 1) withsmem(float* o) {
  __shared__ float s[32];
  s[threadIdx.x & 31] = o[threadIdx.x];
  __syncthreads();
  o[threadIdx.x] = s[(threadIdx.x + 1) & 31];
}
"""


def test_parsers_on_recorded_output():
    usage = rr.parse_resource_usage(RECORDED_USAGE)
    assert usage["_Z6spillsPfi"]["REG"] == 16 and usage["_Z6spillsPfi"]["STACK"] == 264
    assert usage["_Z8withsmemPf"]["SHARED"] == 1152
    assert rr.count_local_memory(RECORDED_SASS) == {"_Z6spillsPfi": (1, 2), "_Z8withsmemPf": (0, 0)}


def _row(**kw):
    base = dict(source="cuda built", kernel="k", variant="-", arch=90, registers=128, threads=256, spill_loads=0,
                spill_stores=0, local_bytes=0, static_smem=16)
    return rr.check(rr.Row(**{**base, **kw}))


def test_checks_name_what_exceeds():
    assert _row().ok
    assert "local memory: 1 LDL / 2 STL" in _row(spill_loads=1, spill_stores=2, local_bytes=8).problems[0]
    # 255 registers are allocated as 256 per thread: 256 threads fit one SM's 64K registers, 257 do not.
    assert _row(registers=255).ok
    assert "registers: 255 x 288" in _row(registers=255, threads=288).problems[0]
    assert "threads per block not recorded" in _row(threads=None).problems[0]
    # CUDA kernels: the static part must leave room for the planner's dynamic shared memory.
    assert "static 232448 bytes leave no room under sm_90's" in _row(static_smem=227 * 1024).problems[0]
    # Triton: static + the dynamic size the kernel requests, against sm_86's 99 KB.
    assert _row(source="triton", arch=86, static_smem=0, dynamic_smem=99 * 1024).ok
    assert "static 16 + dynamic 101376 bytes > 101376 (sm_86" in _row(
        source="triton", arch=86, static_smem=16, dynamic_smem=99 * 1024).problems[0]


def test_limits_agree_with_the_emulated_devices():
    """The CPU emulation's device table (tests/cuda_emulation/emu_runtime.h) holds the same opt-in limits."""
    text = (ROOT / "tests" / "cuda_emulation" / "emu_runtime.h").read_text()
    devices = re.findall(r'\{"\w+", (\d+), (\d+), \d+, [^,]+, ([\d *]+), \d\}', text)
    assert devices, "no device rows found in emu_runtime.h"
    for major, minor, optin in devices:
        assert rr.SMEM_OPTIN[int(major) * 10 + int(minor)] == eval(optin), (major, minor)  # "227 * 1024"


def _tools_or_skip(*names):
    found = [rr.find_tool(n) for n in names]
    if not all(found):
        pytest.skip(f"needs {', '.join(names)} (CUDA toolkit or Triton's copy)")
    return found


@pytest.mark.parametrize("sm", [80, 90])
def test_a_spilling_kernel_is_flagged(tmp_path, sm):
    """Compiled here: LDL/STL found exactly where ptxas reports spills; static shared memory and launch bounds
    read as ptxas -v reports them (on sm_90 without the 1 KB the system reserves)."""
    nvcc, cuobjdump = _tools_or_skip("nvcc", "cuobjdump")
    (tmp_path / "t.cu").write_text(SPILL_CU)
    cubin = tmp_path / "t.cubin"
    r = subprocess.run([nvcc, "-cubin", f"-arch=sm_{sm}", "-O3", "-maxrregcount=16", "-Xptxas", "-v", "-o",
                        str(cubin), str(tmp_path / "t.cu")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptxas = {}
    for fn, body in re.findall(r"Function properties for (\w+)\n(.*?)(?=ptxas info\s+: Compil|\Z)", r.stderr, re.S):
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        smem = re.search(r"(\d+) bytes smem", body)
        ptxas[fn] = (int(spill.group(1)) + int(spill.group(2)), int(smem.group(1)) if smem else 0)
    rows = {k.function: k for k in rr.read_cubin(cubin, sm, cuobjdump)}
    assert set(rows) == set(ptxas) == {"_Z6spillsPfi", "_Z8withsmemPf"}
    spills, clean = rows["_Z6spillsPfi"], rows["_Z8withsmemPf"]
    assert ptxas["_Z6spillsPfi"][0] > 0 and spills.spill_loads > 0 and spills.spill_stores > 0
    assert ptxas["_Z8withsmemPf"][0] == 0 and (clean.spill_loads, clean.spill_stores) == (0, 0)
    assert clean.static_smem == ptxas["_Z8withsmemPf"][1] == 128
    assert (clean.threads, spills.threads) == (256, None)
    row = rr.cuda_rows([spills], "cuda nvcc")[0]
    assert not row.ok and row.kernel == "spills" and any("local memory" in p for p in row.problems)


def _report(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_built_extension_within_limits():
    """Every CUDA kernel instantiation in the built fdp._C, for every architecture it was built for."""
    _tools_or_skip("cuobjdump")
    import fdp

    st = fdp.extension_status()
    if not st["available"]:
        if shutil.which("nvcc") is not None:
            pytest.fail(f"nvcc is on PATH but fdp._C did not build: {st['reason']}")
        pytest.skip("no nvcc and no prebuilt fdp._C")
    ext = importlib.util.find_spec("fdp._C").origin
    r = _report("--cuda", "binary", "--no-triton", "--extension", ext, timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    kernels = {line.split()[2] for line in r.stdout.splitlines() if line.startswith("cuda built")}
    assert {"mlp_step_kernel", "mlp_persistent_kernel"} <= kernels, r.stdout


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory):
    """The report on every launch the Triton backends make for the script's workloads, compiled for sm_90
    (its rows, as the script's --json writes them, in ``.rows``)."""
    _tools_or_skip("cuobjdump")
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("triton-report") / "rows.json"
    r = _report("--cuda", "none", "--archs", "90", "--json", str(out), timeout=900)
    r.rows = json.loads(out.read_text()) if out.exists() else []
    return r


def test_triton_report_covers_every_kernel(triton_report):
    r = triton_report
    for failure in ("no workload launches it", "workload failed", "compile failed"):
        assert failure not in r.stderr, r.stderr
    kernels = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("triton ")}
    assert {"mlp_step_kernel", "mlp_persistent_kernel", "compose_step_kernel"} <= kernels, r.stdout


# The one known failure of the present Triton kernels (docs/resources.md says why): local memory in the
# persistent kernel with float32 weights at H = D = 512 (register pressure, 255 registers). Every other
# row must be within limits, and this test fails once that one is fixed too, so the exception cannot
# outlive the spill.
KNOWN_TRITON_FAILURE = ("mlp_persistent_kernel", ("=*fp32", "H_STRIDE=512", "PRECISION='ieee'"))


def test_triton_kernels_within_limits_but_the_known_one(triton_report):
    rows = triton_report.rows
    assert rows, f"{triton_report.stdout}\n{triton_report.stderr}"
    failing = [r for r in rows if not r["ok"]]
    kernel, marks = KNOWN_TRITON_FAILURE
    known = [r for r in failing if r["kernel"] == kernel and all(m in r["variant"] for m in marks)]
    others = [(r["kernel"], r["variant"], r["problems"]) for r in failing if r not in known]
    assert not others, f"Triton kernels beyond their limits on sm_90: {others}"
    assert len(known) == 1, (f"the known failure {KNOWN_TRITON_FAILURE} is gone (fixed, or renamed): "
                             f"remove it here and from docs/resources.md; failing rows: {failing}")
    assert all("local memory" in p for p in known[0]["problems"]), known[0]
    assert triton_report.returncode == 1  # the script itself still reports that row
