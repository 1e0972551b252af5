#!/usr/bin/env python
"""Registers, local memory (spills) and shared memory of every fdp kernel variant, per GPU architecture.

    python scripts/resource_report.py                       # the installed fdp._C + Triton, sm_80..sm_90
    python scripts/resource_report.py --markdown docs/resources.md --json resources.json

CUDA: the kernels are read from the built extension (``cuobjdump`` on ``fdp._C``: every
template instantiation, for every architecture it was built for). Architectures the
binary lacks are compiled here from csrc/*.cu (the build's glob) to cubins, with the
build's flags, one nvcc per file and architecture in parallel (``--cuda compile``
compiles all of them; ``--cuda binary`` reads only the binary).

Triton: the variants are the ones the backends launch. Each workload below samples with
a backend (or calls a launcher) on CPU tensors while ``JITFunction.run`` is replaced by a
recorder, so no kernel runs; each recorded launch goes through Triton's own argument
binder for the target (pointer alignment -> ``tt.divisibility``, ints equal to 1 ->
constants, as the JIT specializes them), is compiled with ``triton.compile`` for every
architecture and the cubin read like the CUDA ones. Every public ``@triton.jit`` kernel in
``fdp_kernels`` must be launched by some workload, else it is reported as unchecked.

Checks, per kernel and architecture (a row fails on any):
- no local-memory instructions (``LDL``/``STL`` in the SASS): register spills, and
  local arrays the compiler could not keep in registers, which cost the same trip to L1/L2;
- registers x threads per block (rounded up as the hardware allocates them, 8 per thread)
  within the 64 K-register file of one SM (the kernels run one block of 256 threads per SM);
- static + dynamic shared memory within the architecture's per-block opt-in limit. CUDA:
  the planner gives a launch at most the device's opt-in limit minus the kernel's static
  shared memory (csrc/mlp_host.cuh, ``prepare_fn``), so the check is that the static part
  leaves room; Triton: the static part plus the dynamic size the compiled kernel requests.

Exit status 1 when any row fails (each failure named on stderr), 2 when nothing could be checked.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KB = 1024
#: Most shared memory one block may use (``cudaDevAttrMaxSharedMemoryPerBlockOptin``): the SM's
#: shared-memory capacity less 1 KB the system reserves per block (docs/resources.md cites the sources).
SMEM_OPTIN = {80: 163 * KB, 86: 99 * KB, 87: 163 * KB, 89: 99 * KB, 90: 227 * KB}
ARCHS = tuple(SMEM_OPTIN)
#: 32-bit registers per SM on all of them; a warp's registers are allocated in units of 256 (8 per thread).
REGISTER_FILE = 64 * KB
REG_ALLOC_PER_THREAD = 8
#: sm_90 cubins place a kernel's static shared memory after the 1 KB the system reserves per block
#: (section ``.nv.shared.reserved.0``), and cuobjdump's SHARED counts from 0: that 1 KB is not the
#: kernel's and is outside the opt-in limit (tests/test_resources.py checks this against ptxas -v).
RESERVED_SMEM = 1 * KB

_LOCAL_INSTR = re.compile(r"\b(LDL|STL)(?:\.[A-Z0-9.]+)?\s")
# "Function : name" in -sass, "Function name:" in --dump-resource-usage
_FUNCTION = re.compile(r"^\s*Function\s*(?::\s*)?(\S+?):?\s*$")


# ------------------------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str | None:
    """``name`` (cuobjdump, nvcc) on PATH, in $CUDA_HOME/bin, or the copy Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs.append(Path("/usr/local/cuda/bin"))
    try:
        import triton.backends.nvidia as tn

        dirs.append(Path(tn.__file__).parent / "bin")
    except ImportError:
        pass
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def _run(cmd, cwd=None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r.stdout


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# ------------------------------------------------------------------------------------------------------------
# Reading cubins (cuobjdump output parsers: unit-tested on recorded output)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` of one cubin -> {function: {"REG": .., "SHARED": .., ...}}."""
    out, fn = {}, None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            out[fn] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            fn = None
    return out


def count_local_memory(sass: str) -> dict[str, tuple[int, int]]:
    """``cuobjdump -sass`` of one cubin -> {function: (LDL count, STL count)} (local-memory loads and stores)."""
    out, fn = {}, None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            fn = m.group(1)
            out[fn] = (0, 0)
            continue
        if fn:
            m = _LOCAL_INSTR.search(line)
            if m:
                ld, st = out[fn]
                out[fn] = (ld + 1, st) if m.group(1) == "LDL" else (ld, st + 1)
    return out


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF file (a cubin); NOBITS sections are empty."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    out = {}
    for name, kind, _, _, offset, size in headers:
        key = data[names + name: data.index(b"\0", names + name)].decode()
        out[key] = b"" if kind == 8 else data[offset: offset + size]  # 8: SHT_NOBITS
    return out


_EIFMT_SVAL = 0x04  # a record with a 16-bit size and that many bytes; the other formats carry 2 bytes
_EIATTR_THREADS = (0x05, 0x10)  # EIATTR_MAX_THREADS (__launch_bounds__), EIATTR_REQNTID (Triton's reqntid)


def launch_threads(nv_info: bytes) -> int | None:
    """Threads per block a kernel was compiled for, from its ``.nv.info.<function>`` section (None: not recorded)."""
    i, found = 0, None
    while i + 4 <= len(nv_info):
        fmt, attr = nv_info[i], nv_info[i + 1]
        size = struct.unpack_from("<H", nv_info, i + 2)[0] if fmt == _EIFMT_SVAL else 0
        if attr in _EIATTR_THREADS and size == 12:
            x, y, z = struct.unpack_from("<III", nv_info, i + 4)
            found = min(found or x * y * z, x * y * z)
        i += 4 + size
    return found


@dataclasses.dataclass
class KernelResources:
    function: str  # symbol name
    sm: int
    registers: int
    threads: int | None  # per block, from the binary (launch bounds); None: not recorded
    spill_loads: int  # LDL instructions
    spill_stores: int  # STL instructions
    local_bytes: int  # per thread: stack frame + local memory
    static_smem: int


def read_cubin(path, sm: int, cuobjdump: str) -> list[KernelResources]:
    """The kernels of one cubin compiled for ``sm``."""
    usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", str(path)]))
    sections = elf_sections(Path(path).read_bytes())
    reserved = any(name.startswith(".nv.shared.reserved.") for name in sections)
    rows = []
    for fn, u in usage.items():
        smem = u.get("SHARED", 0)
        if reserved:
            smem = max(0, smem - RESERVED_SMEM)
        local_bytes = u.get("STACK", 0) + u.get("LOCAL", 0)
        # Without a stack frame or local memory there is nothing for LDL/STL to address: the SASS (tens of
        # MB for the MLP kernels) is only read where there is some.
        ld, st = (count_local_memory(_run([cuobjdump, "-sass", "-fun", fn, str(path)])).get(fn, (0, 0))
                  if local_bytes else (0, 0))
        rows.append(KernelResources(fn, sm, u.get("REG", 0), launch_threads(sections.get(".nv.info." + fn, b"")),
                                    ld, st, local_bytes, smem))
    return rows


def read_binary(binary, outdir, cuobjdump: str) -> list[KernelResources]:
    """Every kernel of every cubin embedded in a host binary (``cuobjdump -xelf all`` names them FILE.sm_XX.cubin)."""
    _run([cuobjdump, "-xelf", "all", str(Path(binary).resolve())], cwd=outdir)
    out = []
    for cubin in sorted(Path(outdir).glob("*.cubin")):
        m = re.search(r"\.sm_(\d+)a?\.cubin$", cubin.name)
        if not m:
            raise RuntimeError(f"{binary}: cannot tell the architecture of the embedded {cubin.name}")
        out += read_cubin(cubin, int(m.group(1)), cuobjdump)
    return out


# ------------------------------------------------------------------------------------------------------------
# Rows and checks


@dataclasses.dataclass
class Row:
    source: str  # "cuda built" (read from the binary), "cuda nvcc" (compiled here) or "triton"
    kernel: str
    variant: str
    arch: int
    registers: int | None = None
    threads: int | None = None
    spill_loads: int | None = None
    spill_stores: int | None = None
    local_bytes: int | None = None
    static_smem: int | None = None
    dynamic_smem: int | None = None  # Triton: what the kernel requests; CUDA: None (the planner's, see above)
    smem_limit: int | None = None
    problems: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(row: Row) -> Row:
    """Fill ``row.problems`` from its numbers (a row that already has a problem, e.g. a failed compile, keeps it)."""
    if row.registers is None:
        return row
    limit = SMEM_OPTIN.get(row.arch)
    row.smem_limit = limit
    if row.spill_loads or row.spill_stores:
        row.problems.append(f"local memory: {row.spill_loads} LDL / {row.spill_stores} STL instructions "
                            f"({row.local_bytes} bytes per thread)")
    if row.threads is None:
        row.problems.append("threads per block not recorded in the binary (no __launch_bounds__)")
    else:
        regs = -(-row.registers // REG_ALLOC_PER_THREAD) * REG_ALLOC_PER_THREAD
        if regs * row.threads > REGISTER_FILE:
            row.problems.append(f"registers: {row.registers} x {row.threads} threads > {REGISTER_FILE}")
    if limit is None:
        row.problems.append(f"no shared-memory limit known for sm_{row.arch}")
    else:
        if row.dynamic_smem is None and row.static_smem >= limit:
            row.problems.append(f"shared memory: static {row.static_smem} bytes leave no room under sm_{row.arch}'s "
                                f"per-block limit of {limit}")
        elif row.dynamic_smem is not None and row.static_smem + row.dynamic_smem > limit:
            row.problems.append(f"shared memory: static {row.static_smem} + dynamic {row.dynamic_smem} bytes > "
                                f"{limit} (sm_{row.arch} per-block limit)")
    return row


def _split_cuda_name(demangled: str) -> tuple[str, str]:
    """``void fdp::mlp::mlp_step_kernel<float, 8, false>(fdp::mlp::Args, ...)`` -> (mlp_step_kernel, float,8,false)."""
    name = demangled.split("(")[0].removeprefix("void ").strip()
    base, _, args = name.partition("<")
    return base.split("::")[-1], args.rstrip(">").replace(" ", "")


def cuda_rows(resources: list[KernelResources], source: str) -> list[Row]:
    names = demangle(sorted({r.function for r in resources}))
    rows = []
    for r in resources:
        kernel, variant = _split_cuda_name(names[r.function])
        rows.append(check(Row(source, kernel, variant or "-", r.sm, r.registers, r.threads, r.spill_loads,
                              r.spill_stores, r.local_bytes, r.static_smem)))
    return rows


# ------------------------------------------------------------------------------------------------------------
# CUDA: the built binary, and cubins compiled here for the architectures it lacks


def installed_extension() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("fdp._C")
    except ImportError:
        return None
    return Path(spec.origin) if spec and spec.origin else None


def cuda_flags() -> list[str]:
    """The CUDA compile options of csrc/CMakeLists.txt's target, plus CMake's Release flags."""
    text = (ROOT / "csrc" / "CMakeLists.txt").read_text()
    m = re.search(r"\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    if not m:
        raise RuntimeError("csrc/CMakeLists.txt: no $<$<COMPILE_LANGUAGE:CUDA>:...> compile options found")
    return ["-O3", "-DNDEBUG", *m.group(1).split()]


def compile_cuda(archs, jobs: int, nvcc: str, cuobjdump: str, workdir: Path) -> list[Row]:
    """csrc/*.cu (the files CMake compiles) to one cubin per file and architecture, ``jobs`` nvcc at a time."""
    sources = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))
    flags = cuda_flags()

    def one(src, sm):
        out = workdir / f"{Path(src).stem}.sm_{sm}.cubin"
        _run([nvcc, "-cubin", f"-arch=sm_{sm}", *flags, "-o", str(out), src])
        return read_cubin(out, sm, cuobjdump)

    rows = []
    with cf.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(one, s, sm): (s, sm) for s in sources for sm in archs}
        for fut in cf.as_completed(futures):
            src, sm = futures[fut]
            try:
                rows += cuda_rows(fut.result(), "cuda nvcc")
            except RuntimeError as exc:
                rows.append(Row("cuda nvcc", Path(src).name, "-", sm, problems=[f"compile failed: {exc}"]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Triton: the launches the backends make, compiled for each architecture

#: What the Triton paths are sampled with: (backend or "compose", K, H, L, horizon, action_dim, batch,
#: weight dtype, scheduler, backend tuning). The target model (K=4, H=256, D=32) at batch 1 and 300, every
#: dtype and precision; a narrow model (hidden state in registers); the kernels' largest widths.
TRITON_WORKLOADS = [
    *[(b, 4, 256, 2, 16, 2, B, dt, s, tun)
      for b in ("triton", "triton-persistent")
      for B in (1, 300)
      for dt, tun in (("float32", {}), ("float32", {"precision": "tf32x3"}), ("bfloat16", {}),
                      ("bfloat16", {"precision": "native"}), ("float16", {"precision": "native"}))
      for s in ("ddpm", "ddim")],
    *[(b, 3, 24, 2, 5, 3, B, "bfloat16", "ddpm", {}) for b in ("triton", "triton-persistent") for B in (1, 17)],
    *[(b, 2, 512, 1, 32, 16, 1, "float32", "ddim", {}) for b in ("triton", "triton-persistent")],
    ("triton-persistent", 4, 256, 2, 16, 2, 1, "float32", "ddpm-seed", {}),
    *[("compose", K, 0, 0, 16, 2, B, dt, s, {}) for K in (1, 4) for B in (1, 300)
      for dt in ("float32", "bfloat16") for s in ("ddpm", "ddim")],
]


def _scheduler(kind):
    import fdp

    if kind.startswith("ddpm"):
        sched = fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    else:
        sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    return sched.step_table(10, eta=0.0)


def _run_workload(w) -> None:
    """One workload on CPU tensors (``JITFunction.run`` is a recorder while this runs)."""
    import torch

    import fdp

    backend, K, H, L, horizon, adim, B, dtype, sched, tuning = w
    dtype = getattr(torch, dtype)
    table = _scheduler(sched)
    T = len(table.timesteps)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(B, horizon, adim, generator=gen)
    noise = torch.randn(T, B, horizon, adim, generator=gen)
    if backend == "compose":
        from fdp_kernels.compose_step import compose_step

        tbl = table.to("cpu", torch.float32)
        eps = torch.randn(K, B, horizon, adim, generator=gen).to(dtype)
        weights = torch.softmax(torch.randn(B, K, generator=gen), -1)
        x = x_T.clone()
        compose_step(eps, weights, tbl.coef.contiguous(), tbl.adds_noise, 0, x,
                     noise if bool(table.adds_noise.any()) else None,
                     clip_range=float(tbl.clip_range) if tbl.clip_sample else None, out=x)
        return
    from fdp.backends import get_backend

    torch.manual_seed(0)
    comps = [fdp.MLPDenoiser(adim, horizon, global_cond_dim=5, hidden_dim=H, num_blocks=L) for _ in range(K)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(5, K), horizon, adim)
    prepared = type(get_backend(backend))(**tuning).prepare(policy, table, dtype)
    cond = torch.randn(B, 5, generator=gen)
    prepared.run(cond, x_T, noise, seed=5 if sched.endswith("-seed") else None)


def _jit_entry_kernels() -> dict:
    """name -> JITFunction for every public ``@triton.jit`` kernel in the fdp_kernels modules."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fdp_kernels

    out = {}
    for info in pkgutil.iter_modules(fdp_kernels.__path__):
        mod = importlib.import_module(f"fdp_kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and not name.startswith("_") and obj.fn.__module__ == mod.__name__:
                out[name] = obj
    return out


def record_triton_launches(workloads) -> tuple[list[tuple], list[tuple]]:
    """(kernel, args, kwargs) of every launch the workloads make (no kernel runs), and (workload, error)s."""
    from triton.runtime.jit import JITFunction

    launches, errors = [], []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    run = JITFunction.run
    JITFunction.run = record
    try:
        for w in workloads:
            try:
                _run_workload(w)
            except Exception as exc:  # a stale workload must not hide the others' results
                errors.append((w, f"{type(exc).__name__}: {exc}"))
    finally:
        JITFunction.run = run
    return launches, errors


def _specialize(kernel, args, kwargs, target):
    """Triton's own binder for ``target``: (signature, constexprs, attrs, options), as the JIT would compile."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    if hasattr(kernel, "_pack_args"):  # Triton 3.9
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        return signature, constexprs, attrs, options
    # Older Triton (the GPU image's 3.6) does the same inside JITFunction.run.
    from triton.runtime.jit import find_paths_if, get_iterable_path

    sigvals = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrvals = [x[1] for x in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, v: isinstance(v, str))}
    return signature, constexprs, attrs, backend.parse_options(kwargs)


def _variant_key(kernel, signature, constexprs, attrs, options) -> tuple:
    """Everything a compile depends on: per parameter its constant value or its type (+ hints), and the options."""
    names = [p.name for p in kernel.params]
    consts = {names[p[0]]: v for p, v in constexprs.items()}
    hints = {names[p[0]]: v for p, v in attrs.items() if v}
    params = tuple((n, repr(consts[n]) if n in consts else signature[n] + ("/16" if n in hints else ""))
                   for n in names)
    return kernel.fn.__name__, params, options.num_warps, options.num_stages


def _describe(variants: list[tuple]) -> dict[tuple, str]:
    """A short name per variant: the parameters and options that differ between the variants of one kernel
    (parameters with the same value are listed together: ``w_in,w_a=*bf16``; ``/16``: 16-byte aligned)."""
    out, by_kernel = {}, {}
    for key in variants:
        by_kernel.setdefault(key[0], []).append(key)
    for keys in by_kernel.values():
        fields = [{**dict(key[1]), "warps": str(key[2]), "stages": str(key[3])} for key in keys]
        varying = [f for f in fields[0] if len({d[f] for d in fields}) > 1]
        for key, d in zip(keys, fields):
            groups = {}
            for f in varying:
                groups.setdefault(d[f], []).append(f.removesuffix("_ptr"))
            out[key] = " ".join(f"{','.join(n)}={v}" for v, n in groups.items()) or "-"
    return out


def triton_rows(archs, jobs: int, cuobjdump: str, workdir: Path, workloads=TRITON_WORKLOADS) -> list[Row]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _jit_entry_kernels()
    launches, errors = record_triton_launches(workloads)
    rows = [Row("triton", "(workload)", f"{w[0]} K={w[1]} H={w[2]} B={w[6]} {w[7]} {w[8]} {w[9] or ''}".strip(), sm,
                problems=[f"workload failed: {err[:300]}"]) for w, err in errors for sm in archs]
    variants = {}  # key -> (kernel, args, kwargs)
    for kernel, args, kwargs in launches:
        sig, consts, attrs, opts = _specialize(kernel, args, kwargs, GPUTarget("cuda", archs[0], 32))
        variants.setdefault(_variant_key(kernel, sig, consts, attrs, opts), (kernel, args, kwargs))
    names = _describe(list(variants))
    launched = {k.fn.__name__ for k, _, _ in launches}
    for name in sorted(set(kernels) - launched):
        rows += [Row("triton", name, "-", sm, problems=["no workload launches it: add one to TRITON_WORKLOADS"])
                 for sm in archs]

    def one(key, sm):
        kernel, args, kwargs = variants[key]
        target = GPUTarget("cuda", sm, 32)
        row = Row("triton", key[0], names[key], sm)
        try:
            sig, consts, attrs, opts = _specialize(kernel, args, kwargs, target)
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=opts.__dict__)
        except Exception as exc:  # Triton reports unsupported features per architecture as exceptions
            row.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
            return row
        d = Path(tempfile.mkdtemp(dir=workdir))
        (d / "k.cubin").write_bytes(compiled.asm["cubin"])
        (res,) = [r for r in read_cubin(d / "k.cubin", sm, cuobjdump) if r.function == compiled.metadata.name]
        row.registers, row.threads = res.registers, res.threads or compiled.metadata.num_warps * 32
        row.spill_loads, row.spill_stores, row.local_bytes = res.spill_loads, res.spill_stores, res.local_bytes
        row.static_smem, row.dynamic_smem = res.static_smem, compiled.metadata.shared
        return check(row)

    with cf.ThreadPoolExecutor(jobs) as pool:
        rows += list(pool.map(lambda ks: one(*ks), [(k, sm) for k in variants for sm in archs]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Output


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in sorted(rows, key=lambda r: (r.source, r.kernel, r.variant, r.arch)):
        spills = "" if r.spill_loads is None else f"{r.spill_loads}/{r.spill_stores}"
        smem = "" if r.static_smem is None else (str(r.static_smem) if r.dynamic_smem is None
                                                  else f"{r.static_smem}+{r.dynamic_smem}")
        num = [("" if v is None else str(v)) for v in (r.registers, r.threads)]
        limit = "" if r.smem_limit is None else str(r.smem_limit)
        out.append([r.source, r.kernel, r.variant, f"sm_{r.arch}", *num, spills, smem, limit,
                    "ok" if r.ok else "FAIL: " + "; ".join(r.problems)])
    return out


HEADER = ["source", "kernel", "variant", "arch", "regs", "threads", "LDL/STL", "shared bytes (static+dynamic)",
          "limit", "ok"]


def print_table(rows: list[Row], file=sys.stdout) -> None:
    body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(HEADER)]
    for line in [HEADER, *body]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=file)


def markdown(rows: list[Row], command: str, notes: list[str]) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fails = [r for r in rows if not r.ok]
    lines = ["<!-- generated by scripts/resource_report.py: edit the script, not this table -->",
             "", f"Generated {date} by `{command}`.", "",
             f"{len(rows)} rows, {len(fails)} failing.", *[f"- {n}" for n in notes], "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in table_rows(rows)]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, generated: str) -> None:
    """Replace the generated part of ``path`` (from its marker line on), keeping the hand-written text above it."""
    marker = "<!-- generated by scripts/resource_report.py"
    head = ""
    if path.exists():
        text = path.read_text()
        head = text[: text.index(marker)] if marker in text else text + "\n"
    path.write_text(head + generated)


# ------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)),
                    help="compute capabilities to check, comma-separated (default: %(default)s)")
    ap.add_argument("--extension", type=Path, help="the built fdp._C (default: the one `import fdp` finds)")
    ap.add_argument("--cuda", choices=("auto", "binary", "compile", "none"), default="auto",
                    help="auto: read the binary, compile the architectures it lacks; binary: only read it; "
                         "compile: compile every architecture here; none: skip CUDA")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the table into this markdown file (e.g. docs/resources.md)")
    a = ap.parse_args(argv)
    archs = [int(s) for s in a.archs.split(",") if s.strip()]
    unknown = [sm for sm in archs if sm not in SMEM_OPTIN]
    if unknown:
        ap.error(f"--archs: no shared-memory limit known for {unknown}; known: {list(SMEM_OPTIN)}")
    if "TRITON_INTERPRET" in os.environ:
        os.environ.pop("TRITON_INTERPRET")
        if "fdp_kernels.mlp_step" in sys.modules:
            raise RuntimeError("fdp_kernels was imported with TRITON_INTERPRET set: run this in its own process")
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print("resource_report: no cuobjdump (CUDA toolkit or Triton's copy) found", file=sys.stderr)
        return 2
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="fdp-resources-") as tmp:
        tmp = Path(tmp)
        if a.cuda != "none":
            have = set()
            if a.cuda in ("auto", "binary"):
                ext = a.extension or installed_extension()
                if ext is None or not ext.exists():
                    notes.append("CUDA: no built fdp._C found")
                else:
                    (tmp / "ext").mkdir()
                    res = [r for r in read_binary(ext, tmp / "ext", cuobjdump) if r.sm in archs]
                    have = {r.sm for r in res}
                    rows += cuda_rows(res, "cuda built")
                    notes.append(f"`cuda built`: read from {ext.name} (sm_{', sm_'.join(map(str, sorted(have)))})")
            todo = [sm for sm in archs if sm not in have] if a.cuda != "binary" else []
            if todo:
                nvcc = find_tool("nvcc")
                if nvcc is None:
                    notes.append(f"CUDA: no nvcc, sm_{', sm_'.join(map(str, todo))} not checked")
                    rows += [Row("cuda nvcc", "*", "-", sm, problems=["not checked: no nvcc"]) for sm in todo]
                else:
                    (tmp / "nvcc").mkdir()
                    print(f"resource_report: compiling csrc/*.cu for sm_{', sm_'.join(map(str, todo))} "
                          "(about 2 CPU-minutes per architecture)", file=sys.stderr, flush=True)
                    rows += compile_cuda(todo, a.jobs, nvcc, cuobjdump, tmp / "nvcc")
                    notes.append(f"`cuda nvcc`: csrc/*.cu compiled here with `{' '.join(cuda_flags())}`")
        if not a.no_triton:
            import triton

            (tmp / "triton").mkdir()
            rows += triton_rows(archs, a.jobs, cuobjdump, tmp / "triton")
            notes.append(f"Triton {triton.__version__}: {len(TRITON_WORKLOADS)} workloads; shared = static + the "
                         "dynamic size the compiled kernel requests")
    notes.append("CUDA shared = static only: the planner sizes dynamic shared memory to at most the "
                 "limit minus it")
    if not rows:
        print("resource_report: nothing to check", file=sys.stderr)
        return 2
    print_table(rows)
    if a.json:
        a.json.write_text(json.dumps([{**dataclasses.asdict(r), "ok": r.ok} for r in rows], indent=1))
    if a.markdown:
        command = "python scripts/resource_report.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
        write_markdown(a.markdown, markdown(rows, command.strip(), notes))
    fails = [r for r in rows if not r.ok]
    for r in fails:
        print(f"FAIL {r.source} {r.kernel} [{r.variant}] sm_{r.arch}: {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
