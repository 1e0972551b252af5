"""How ``backend="auto"`` picks a backend, and what ``Sampler(..., verify=True)`` checks.

Every backend that is available on the device and can serve the policy is a
candidate. A candidate is trusted only once it has run the actual policy on a
small batch with fixed noise and matched the ``torch`` reference within its
dtype's bound (:mod:`fdp.tolerances`); one that raises or disagrees is skipped
with a warning. On CUDA and on the CPU the verified candidates and ``torch`` are
then timed on the real call path (CUDA events on a GPU, wall-clock time on the
CPU; a warm-up, then a few calls within ``TIME_BUDGET_S``) and the fastest
wins. Elsewhere the order stays by priority: the highest verified candidate wins. Candidates ranked below ``torch`` (e.g. the
Triton kernels in the interpreter) are never tried.

The decision is cached on disk (``$FDP_CACHE_DIR``, default ``~/.cache/fdp``)
keyed by the device, driver and library versions, the policy's shape
signature, both dtypes, the scheduler table, the batch size and the set of
candidates, so that later processes skip the work. :class:`Selection` is the
record of what was tried and why the winner won (``sampler.selection``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import stat
import statistics
import tempfile
from pathlib import Path

import torch

from .. import isolation, tolerances
from .._validation import InvalidArgument, check_bool, check_int
from . import _MODULES, disabled_backends, get_backend

log = logging.getLogger("fdp")

#: The backend every other one is checked against.
REFERENCE = "torch"
#: Largest batch a candidate is verified on (the batch size asked for, if smaller).
VERIFY_BATCH = 4
#: Seconds of timed calls per new configuration on a timed device, shared among the timed backends.
TIME_BUDGET_S = 1.5
#: Untimed calls before timing (the first one compiles kernels or captures graphs).
WARMUP_CALLS = 1
#: Timed calls per backend at most, and at least.
MAX_TIMED_CALLS, MIN_TIMED_CALLS = 20, 1
#: Device types where candidates are timed (elsewhere the order is by priority). The CPU too: which of
#: torch, ONNX Runtime and the batched MLP is fastest depends on the policy's size, the batch and the threads.
_TIMED_DEVICES = ("cuda", "cpu")
#: Environment variable naming the cache folder.
CACHE_ENV = "FDP_CACHE_DIR"
#: Bumped whenever the cached record's meaning changes.
CACHE_FORMAT = 1
_REPORT = ("please report it in fdp's issue tracker with this message and the output of `fdp info` and "
           "`fdp tune` for this policy")


class VerificationError(RuntimeError):
    """A backend named explicitly with ``verify=True`` disagrees with the torch reference or fails to run."""


@dataclasses.dataclass
class Candidate:
    """One backend as ``auto`` saw it.

    ``status``: ``picked``, ``verified`` (correct but slower, or not needed),
    ``disagrees`` / ``failed`` (skipped: wrong result / raised),
    ``ranked below`` (not tried: lower priority than the winner or than ``torch``),
    ``unavailable`` / ``unsupported`` (cannot run here / cannot serve the policy),
    ``reference`` (``torch`` itself, exact by definition).
    """

    name: str
    priority: int
    status: str
    reason: str = ""
    rel_error: float | None = None
    tolerance: float | None = None
    time_ms: float | None = None


@dataclasses.dataclass
class Selection:
    """What ``Sampler`` resolved its backend from (``sampler.selection``)."""

    backend: str  # the winner
    requested: str  # "auto" or the name asked for
    device: str
    mode: str  # "timed" (fastest, on CUDA or the CPU), "priority" (highest verified), "explicit"
    why: str  # why the winner won, in words
    batch_size: int
    candidates: list[Candidate]
    cached: bool = False
    cache_file: str | None = None

    def skipped(self) -> dict[str, str]:
        """Every backend not picked, with why: ``{name: reason}``."""
        return {c.name: f"{c.status}: {c.reason}" if c.reason else c.status
                for c in self.candidates if c.name != self.backend}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        d = dict(d)
        d["candidates"] = [Candidate(**c) for c in d["candidates"]]
        return cls(**d)

    def __str__(self) -> str:
        head = (f"backend {self.backend!r} ({self.requested} on {self.device}, batch {self.batch_size}"
                f"{', from the cache ' + self.cache_file if self.cached else ''}): {self.why}")
        rows = [head, f"  {'backend':<18} {'priority':>8} {'status':<12} {'rel err':>9} {'tol':>7} {'ms/call':>9}  why"]
        for c in self.candidates:
            err = "" if c.rel_error is None else f"{c.rel_error:.1e}"
            tol = "" if c.tolerance is None else f"{c.tolerance:.0e}"
            ms = "" if c.time_ms is None else f"{c.time_ms:.3f}"
            rows.append(f"  {c.name:<18} {c.priority:>8} {c.status:<12} {err:>9} {tol:>7} {ms:>9}  {c.reason}")
        return "\n".join(rows)


def weight_dtype(name: str, policy_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The weight dtype backend ``name`` packs in: ``dtype`` if given, else the named backend's
    ``default_weight_dtype``; for ``auto`` the policy's (picking a backend never changes the precision)."""
    if dtype is not None:
        return dtype
    return policy_dtype if name == "auto" else get_backend(name).default_weight_dtype(policy_dtype)


def select(name: str, policy, table, device, dtype: torch.dtype | None, *, batch_size: int = 1, verify: bool = False,
           use_cache: bool = True, isolate: bool | None = None):
    """Resolve ``name`` (``"auto"`` or a registered backend) for this policy.

    ``dtype`` None: as :func:`weight_dtype` says. ``isolate`` None: ``$FDP_ISOLATE``
    (default on): a candidate that runs native code is checked first in a child
    process (:mod:`fdp.isolation`).

    Returns ``(backend, prepared, selection)``; ``prepared`` is the winner
    already packed when checking it required packing, else None.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    verify = check_bool("verify", verify)
    isolate = isolation.enabled(isolate)
    device = torch.device(device)
    dtype = weight_dtype(name, next(policy.parameters()).dtype, dtype)
    if name != "auto":
        return _explicit(name, policy, table, device, dtype, batch_size, verify, isolate)

    rows: dict[str, Candidate] = {}
    ranked = []
    disabled = disabled_backends()
    for n in _MODULES:
        if n in disabled:
            rows[n] = Candidate(n, 0, "unavailable", disabled[n])
            continue
        try:
            be = get_backend(n)
        except ImportError as exc:
            rows[n] = Candidate(n, 0, "unavailable", str(exc))
            continue
        reason = be.unavailable_reason(device)
        if reason:
            rows[n] = Candidate(n, be.priority, "unavailable", reason)
            continue
        reason = be.unsupported_reason(policy, table, dtype)
        if reason:
            rows[n] = Candidate(n, be.priority, "unsupported", reason)
            continue
        ranked.append(be)
    ranked.sort(key=lambda b: -b.priority)
    ref = get_backend(REFERENCE)
    rows[REFERENCE] = Candidate(REFERENCE, ref.priority, "reference", "the reference every backend is checked against")
    # The reference wins ties: a backend must rank above it to be worth checking.
    contenders = [b for b in ranked if b.priority > ref.priority]
    for b in ranked:
        if b.priority <= ref.priority and b is not ref:
            note = b.priority_note
            rows[b.name] = Candidate(b.name, b.priority, "ranked below",
                                     f"priority {b.priority} <= {ref.priority} of {REFERENCE!r}"
                                     + (f" ({note})" if note else ""))

    def record(winner, mode, why):
        order = [c.name for c in sorted(rows.values(), key=lambda c: -c.priority)]
        return Selection(winner, "auto", str(device), mode, why, batch_size, [rows[n] for n in order])

    if not contenders:
        rows[REFERENCE].status = "picked"
        return ref, None, record(REFERENCE, "priority", "no faster backend can serve this policy here")

    key = _cache_key(policy, table, device, dtype, batch_size, ranked)
    path = _cache_path("select", key)
    cached = _read_cache(path, key) if use_cache else None
    if cached is not None:
        for c in cached.candidates:
            if c.status in ("disagrees", "failed"):
                _warn(c, str(device), cached=True)
        return get_backend(cached.backend), None, cached

    ctx = _Verifier(policy, table, device, dtype, batch_size, isolate)
    timed = device.type in _TIMED_DEVICES
    prepared = {}
    ctx.check_isolated(contenders, use_cache)
    for be in contenders:
        row, prep = ctx.check(be)
        rows[be.name] = row
        if prep is None:
            _warn(row, str(device))
            continue
        if not timed:
            row.status = "picked"
            for later in contenders[contenders.index(be) + 1:]:
                rows[later.name] = Candidate(later.name, later.priority, "ranked below",
                                             f"priority {later.priority} < {be.priority} of {be.name!r}")
            rows[REFERENCE].status = "ranked below"
            rows[REFERENCE].reason = f"priority {ref.priority} < {be.priority} of {be.name!r}"
            sel = record(be.name, "priority", "the highest-priority backend that matches the torch reference")
            _write_cache(path, key, sel)
            return be, prep, sel
        prepared[be.name] = prep
    if timed and prepared:
        prepared[REFERENCE] = ref.prepare(policy, table, dtype)
        budget = TIME_BUDGET_S / len(prepared)
        for n, prep in list(prepared.items()):
            try:
                rows[n].time_ms = ctx.time(prep, budget)
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel that fails only at the larger batch
                if n == REFERENCE:
                    raise
                rows[n].status = "failed"
                rows[n].reason = f"raised {type(exc).__name__} at batch {batch_size}: {exc}"[:500]
                _warn(rows[n], str(device))
                del prepared[n]
        best = min(prepared, key=lambda n: rows[n].time_ms)
        for n in prepared:
            if n != best:
                rows[n].reason = (f"{rows[n].time_ms / rows[best].time_ms:.2f}x the time of {best!r}"
                                  + (f"; {rows[n].reason}" if rows[n].reason else ""))
        rows[best].status = "picked"
        sel = record(best, "timed", f"the fastest of {len(prepared)} verified backends, torch included "
                                    f"({rows[best].time_ms:.3f} ms per call at batch {batch_size})")
        _write_cache(path, key, sel)
        return get_backend(best), prepared[best], sel
    rows[REFERENCE].status = "picked"
    sel = record(REFERENCE, "priority", "every faster backend failed its check against the reference")
    _write_cache(path, key, sel)
    return ref, None, sel


def _explicit(name, policy, table, device, dtype, batch_size, verify, isolate):
    be = get_backend(name)
    reason = disabled_backends().get(name) or be.unavailable_reason(device) or be.unsupported_reason(policy, table,
                                                                                                     dtype)
    if reason:
        raise InvalidArgument(f"backend {name!r} cannot serve this policy on {device}: {reason}")
    row = Candidate(name, be.priority, "picked", "named explicitly")
    prep = None
    if verify and name != REFERENCE:
        row, prep = _Verifier(policy, table, device, dtype, batch_size, isolate).check(be)
        if prep is None:
            raise VerificationError(f"backend {name!r} {_describe(row, device)}; pick another backend or "
                                    f"backend='auto' (which skips it), and {_REPORT}")
        row.status, row.reason = "picked", "named explicitly; " + row.reason
    why = "named explicitly" + (", verified against the torch reference" if verify else "")
    return be, prep, Selection(name, name, str(device), "explicit", why, batch_size, [row])


class _Verifier:
    """Runs candidates on fixed inputs against the torch reference (computed once, on first need)."""

    def __init__(self, policy, table, device, dtype, batch_size, isolate=False):
        self.policy, self.table, self.device, self.dtype = policy, table, device, dtype
        self.batch_size = batch_size
        self.policy_dtype = next(policy.parameters()).dtype
        self.tol = tolerances.tolerance(dtype, self.policy_dtype)
        self._refs = {}
        self.inputs = self._draw(min(batch_size, VERIFY_BATCH), seed=0)
        self.isolate = isolate
        self.isolated: dict[str, Candidate] = {}  # verdicts of the checks in a child process, by backend

    @functools.cached_property
    def timing_inputs(self):
        return self._draw(self.batch_size, seed=1)

    def _draw(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        p = self.policy
        shape = (B, p.horizon, p.action_dim)
        cond = torch.randn(B, p.cond_dim, generator=g)
        x_T = torch.randn(shape, generator=g)
        noise = torch.randn((len(self.table), *shape), generator=g) if bool(self.table.adds_noise.any()) else None
        return tuple(None if t is None else t.to(self.device, self.policy_dtype) for t in (cond, x_T, noise))

    def reference(self, inputs=None):
        inputs = self.inputs if inputs is None else inputs
        if id(inputs) not in self._refs:
            rdt = tolerances.reference_dtype(self.policy_dtype)
            pol = self.policy if rdt == self.policy_dtype else copy.deepcopy(self.policy).to(rdt)
            prep = get_backend(REFERENCE).prepare(pol, self.table, rdt)
            with _exact_float32(), torch.no_grad():
                self._refs[id(inputs)] = prep.run(*(None if t is None else t.to(rdt) for t in inputs))
        return self._refs[id(inputs)]

    def check_isolated(self, bes, use_cache: bool = True) -> None:
        """Run each backend of ``bes`` that needs it in a child process first (all at once), or take the
        verdict an earlier process cached; ``check`` then skips the ones that failed there."""
        todo = [be for be in bes if self.isolate and be.name not in self.isolated and be.native_code_on(self.device)]
        if todo:
            _isolated_checks(self, todo, use_cache)

    def check(self, be):
        """``(row, prepared)``: prepared is None when the backend raised or disagrees."""
        self.check_isolated([be])
        first = self.isolated.get(be.name)
        if first is not None and first.status != "verified":
            return first, None
        row = Candidate(be.name, be.priority, "verified", tolerance=self.tol)
        try:
            prep = be.prepare(self.policy, self.table, self.dtype)
            with _exact_float32(), torch.no_grad():
                out = prep.run(*self.inputs)
            if tuple(out.shape) != tuple(self.inputs[1].shape):
                raise ValueError(f"returned shape {tuple(out.shape)}, expected {tuple(self.inputs[1].shape)}")
            row.rel_error = tolerances.rel_error(out, self.reference())
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate means: do not use it
            row.status, row.reason = "failed", f"raised {type(exc).__name__}: {exc}"[:500]
            return row, None
        if not row.rel_error <= self.tol:
            row.status = "disagrees"
            row.reason = f"relative error {row.rel_error:.1e} > {self.tol:.0e} against {REFERENCE!r}"
            return row, None
        row.reason = f"matches {REFERENCE!r} (relative error {row.rel_error:.1e} <= {self.tol:.0e})"
        if first is not None:
            row.reason += "; ran in a separate process first"
        return row, prep

    @torch.no_grad()
    def time(self, prep, budget_s: float) -> float:
        """Median milliseconds per call of ``prep.run`` at the batch size asked for (CUDA events on a GPU,
        wall-clock time elsewhere)."""
        from ..bench.timing import measure  # the benchmark's timing loop: warm-up, events, budget

        args = self.timing_inputs
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            m = measure(lambda _: prep.run(*args), self.device, n_sets=1, repeats=MAX_TIMED_CALLS,
                        warmup=WARMUP_CALLS, budget_s=budget_s, min_repeats=MIN_TIMED_CALLS)
        return statistics.median(m.call_gpu_us if cuda else m.call_wall_us) / 1e3


@contextlib.contextmanager
def _exact_float32():
    """TF32 off while checking: the bounds are about the kernels, not about TF32 matmuls in the reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _describe(row: Candidate, device) -> str:
    if row.status == "failed":
        return f"failed on this policy on {device}: {row.reason}"
    return (f"disagrees with the {REFERENCE!r} reference on this policy on {device}: relative error "
            f"{row.rel_error:.2e} > tolerance {row.tolerance:.0e}")


def _warn(row: Candidate, device: str, cached: bool = False) -> None:
    log.warning("fdp: backend 'auto' skips %r, which %s%s; %s", row.name, _describe(row, device),
                " (cached result of an earlier check)" if cached else "", _REPORT)


# -- isolated first use (fdp.isolation) ----------------------------------------------------------------------


def _isolated_checks(ctx: _Verifier, bes: list, use_cache: bool) -> None:
    """Fill ``ctx.isolated`` for ``bes``: a cached verdict, else one from a child process per backend."""
    pending = []
    for be in bes:
        key = dict(_cache_key(ctx.policy, ctx.table, ctx.device, ctx.dtype, ctx.batch_size, [be]), kind="isolated")
        path = _cache_path("isolated", key)
        data = _read_record(path, key) if use_cache else None
        row = _candidate_from(data.get("verdict"), path) if data is not None else None
        if row is not None and row.name == be.name:
            if row.status != "verified":
                row.reason += f" (cached verdict of an earlier process; delete {path} to check again)"
            ctx.isolated[be.name] = row
        else:
            pending.append((be, key, path))
    if not pending:
        return
    inputs = [ctx.inputs]
    if ctx.batch_size > ctx.inputs[1].shape[0]:
        inputs.append(ctx.timing_inputs)  # the batch size asked for runs other launch shapes
    case = isolation.Case(0, ctx.table, ctx.dtype, inputs)
    jobs = [isolation.Job(be.name, _MODULES[be.name], ctx.device, [ctx.policy], [case]) for be, _, _ in pending]
    log.info("fdp: running %s for the first time on %s, each in a separate process (%s=0 skips this)",
             ", ".join(repr(be.name) for be, _, _ in pending), ctx.device, isolation.ISOLATE_ENV)
    for (be, key, path), (out,) in zip(pending, isolation.run_isolated(jobs)):
        row = Candidate(be.name, be.priority, "verified", tolerance=ctx.tol)
        ctx.isolated[be.name] = row
        if out.setup_error:
            # Not the candidate's fault, so not cached; but it stays unproven, hence unused.
            row.status = "failed"
            row.reason = (f"could not be checked in a separate process ({out.setup_error}); "
                          f"{isolation.ISOLATE_ENV}=0 checks it in this process instead")[:500]
            continue
        if out.error:
            row.status, row.reason = "failed", out.error[:500]
        else:
            _compare_isolated(ctx, row, out.outputs, inputs)
        _write_record(path, {"key": key, "verdict": dataclasses.asdict(row)})


def _compare_isolated(ctx: _Verifier, row: Candidate, outputs: list, inputs: list) -> None:
    errors = []
    for out, args in zip(outputs, inputs):
        if tuple(out.shape) != tuple(args[1].shape):
            row.status = "failed"
            row.reason = f"returned shape {tuple(out.shape)}, expected {tuple(args[1].shape)} (in a separate process)"
            return
        errors.append(tolerances.rel_error(out, ctx.reference(args).cpu()))
    row.rel_error = max(errors)
    if not row.rel_error <= ctx.tol:
        row.status = "disagrees"
        row.reason = (f"relative error {row.rel_error:.1e} > {ctx.tol:.0e} against {REFERENCE!r} "
                      "(in a separate process)")
    else:
        row.reason = f"matches {REFERENCE!r} in a separate process (relative error {row.rel_error:.1e})"


# -- the cache -------------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fdp"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def policy_signature(policy) -> list:
    """What the decision depends on in the policy: module types, tensor shapes and dtypes, routing."""
    modules = [f"{n}:{type(m).__name__}" for n, m in policy.named_modules()]
    tensors = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in policy.state_dict().items()]
    router = policy.router
    routing = [getattr(router, "strategy", None), getattr(router, "topk", None)]
    return [policy.horizon, policy.action_dim, routing, modules, tensors]


@functools.lru_cache(maxsize=None)
def _device_versions(device: torch.device) -> tuple:
    """(device name, driver version): read once per process (the driver through nvidia-smi)."""
    from ..bench.report import device_name, driver_version

    return device_name(device), driver_version(device)


def _cache_key(policy, table, device, dtype, batch_size, ranked) -> dict:
    import fdp

    name, driver = _device_versions(device)

    table_text = json.dumps([table.timesteps.tolist(), table.coef.tolist(), table.adds_noise.tolist(),
                             bool(table.clip_sample), float(table.clip_range)])
    return {
        "format": CACHE_FORMAT,
        "device": name,
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fdp": fdp.__version__,
        "policy": hashlib.sha256(json.dumps(policy_signature(policy)).encode()).hexdigest(),
        "policy_dtype": str(next(policy.parameters()).dtype),
        "dtype": str(dtype),
        "table": hashlib.sha256(table_text.encode()).hexdigest(),
        "batch_size": batch_size,
        "candidates": [[b.name, _MODULES[b.name], b.priority] for b in ranked],
    }


def _cache_path(kind: str, key: dict) -> Path:
    return _cache_dir() / f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"


#: Largest cache file read (a record is a few KiB): anything bigger is not ours.
MAX_CACHE_BYTES = 1 << 20
_STATUSES = ("picked", "verified", "disagrees", "failed", "ranked below", "unavailable", "unsupported", "reference")
_OPTIONAL_FLOAT = (float, int, type(None))


def _candidate_from(d, path: Path) -> Candidate | None:
    """A :class:`Candidate` from its stored dict, or None (with a warning naming ``path``) if it is not one."""
    try:
        row = Candidate(**d)
        ok = (isinstance(row.name, str) and type(row.priority) is int and row.status in _STATUSES
              and isinstance(row.reason, str) and all(isinstance(getattr(row, f), _OPTIONAL_FLOAT)
                                                      for f in ("rel_error", "tolerance", "time_ms")))
    except TypeError as exc:
        ok, why = False, str(exc)
    else:
        why = f"a field has the wrong type: {d}"
    if not ok:
        log.warning("fdp: ignoring the backend cache %s: it does not hold a backend's record (%s); checking again",
                    path, why[:300])
        return None
    return row


def _selection_from(d, path: Path) -> Selection | None:
    """A :class:`Selection` from its stored dict, or None (with a warning naming ``path``) if it is not a valid
    one for this registry: then the caller selects again and overwrites the file."""
    fields = {f.name: f.type for f in dataclasses.fields(Selection)}
    texts = ("backend", "requested", "device", "mode", "why")
    if (not isinstance(d, dict) or set(d) != set(fields) or not all(isinstance(d[f], str) for f in texts)
            or type(d["batch_size"]) is not int or not isinstance(d["candidates"], list)
            or not all(isinstance(c, dict) for c in d["candidates"])):
        log.warning("fdp: ignoring the backend cache %s: it is not a selection record of this fdp version; "
                    "selecting again", path)
        return None
    candidates = [_candidate_from(c, path) for c in d["candidates"]]
    if any(c is None for c in candidates):
        return None
    if d["backend"] not in _MODULES or d["backend"] not in [c.name for c in candidates]:
        log.warning("fdp: ignoring the backend cache %s: it names backend %r, which is not registered here; "
                    "selecting again", path, d["backend"])
        return None
    return Selection(**{**d, "candidates": candidates, "cached": False, "cache_file": None})


def _read_record(path: Path, key: dict) -> dict | None:
    """The record stored at ``path`` if it was stored under ``key``, else None.

    Only a regular file of at most ``MAX_CACHE_BYTES`` is read, never through a symlink; it is opened
    non-blocking, so that a FIFO planted at the path cannot stall the caller.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink; EACCES; ...
        log.warning("fdp: ignoring the backend cache %s: cannot open it as a regular file (%s)", path, exc)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("fdp: ignoring the backend cache %s: it is not a regular file", path)
            return None
        if st.st_size > MAX_CACHE_BYTES:
            log.warning("fdp: ignoring the backend cache %s: %d bytes, more than a record's %d at most", path,
                        st.st_size, MAX_CACHE_BYTES)
            return None
        raw = os.read(fd, MAX_CACHE_BYTES + 1)
    except OSError as exc:
        log.warning("fdp: ignoring the backend cache %s: cannot read it (%s)", path, exc)
        return None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError as exc:  # a torn or foreign file: overwritten by the next decision
        log.warning("fdp: ignoring the backend cache %s: not JSON (%s); checking again", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("fdp: ignoring the backend cache %s: it holds a JSON %s, not a record; checking again", path,
                    type(data).__name__)
        return None
    if data.get("key") != key:  # another configuration (or fdp version) hashed to this name
        return None
    return data


def _read_cache(path: Path, key: dict) -> Selection | None:
    data = _read_record(path, key)
    if data is None:
        return None
    sel = _selection_from(data.get("selection"), path)
    if sel is not None:
        sel.cached, sel.cache_file = True, str(path)
    return sel


def _write_cache(path: Path, key: dict, sel: Selection) -> None:
    sel.cache_file = str(path) if _write_record(path, {"key": key, "selection": sel.to_dict()}) else None


def _write_record(path: Path, data: dict) -> bool:
    """Write ``data`` to ``path`` atomically: a temporary file created exclusively (O_EXCL, so never through a
    planted symlink) under an unpredictable name in the same folder, then renamed over ``path`` (which
    replaces a symlink there instead of following it)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        log.warning("fdp: could not write the backend cache %s (%s); set %s to a writable folder",
                    path, exc, CACHE_ENV)
        return False
    return True
