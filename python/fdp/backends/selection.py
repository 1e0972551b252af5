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
import statistics
from pathlib import Path

import torch

from .. import tolerances
from .._validation import check_bool, check_int
from . import _MODULES, get_backend

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
           use_cache: bool = True):
    """Resolve ``name`` (``"auto"`` or a registered backend) for this policy.

    ``dtype`` None: as :func:`weight_dtype` says.

    Returns ``(backend, prepared, selection)``; ``prepared`` is the winner
    already packed when checking it required packing, else None.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    verify = check_bool("verify", verify)
    device = torch.device(device)
    dtype = weight_dtype(name, next(policy.parameters()).dtype, dtype)
    if name != "auto":
        return _explicit(name, policy, table, device, dtype, batch_size, verify)

    rows: dict[str, Candidate] = {}
    ranked = []
    for n in _MODULES:
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
    path = _cache_dir() / f"select-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    cached = _read_cache(path, key) if use_cache else None
    if cached is not None:
        for c in cached.candidates:
            if c.status in ("disagrees", "failed"):
                _warn(c, str(device), cached=True)
        return get_backend(cached.backend), None, cached

    ctx = _Verifier(policy, table, device, dtype, batch_size)
    timed = device.type in _TIMED_DEVICES
    prepared = {}
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


def _explicit(name, policy, table, device, dtype, batch_size, verify):
    be = get_backend(name)
    reason = be.unavailable_reason(device) or be.unsupported_reason(policy, table, dtype)
    if reason:
        raise ValueError(f"backend {name!r} cannot serve this policy on {device}: {reason}")
    row = Candidate(name, be.priority, "picked", "named explicitly")
    prep = None
    if verify and name != REFERENCE:
        row, prep = _Verifier(policy, table, device, dtype, batch_size).check(be)
        if prep is None:
            raise VerificationError(f"backend {name!r} {_describe(row, device)}; pick another backend or "
                                    f"backend='auto' (which skips it), and {_REPORT}")
        row.status, row.reason = "picked", "named explicitly; " + row.reason
    why = "named explicitly" + (", verified against the torch reference" if verify else "")
    return be, prep, Selection(name, name, str(device), "explicit", why, batch_size, [row])


class _Verifier:
    """Runs candidates on fixed inputs against the torch reference (computed once, on first need)."""

    def __init__(self, policy, table, device, dtype, batch_size):
        self.policy, self.table, self.device, self.dtype = policy, table, device, dtype
        self.batch_size = batch_size
        self.policy_dtype = next(policy.parameters()).dtype
        self.tol = tolerances.tolerance(dtype, self.policy_dtype)
        self._ref = None
        self.inputs = self._draw(min(batch_size, VERIFY_BATCH), seed=0)

    def _draw(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        p = self.policy
        shape = (B, p.horizon, p.action_dim)
        cond = torch.randn(B, p.cond_dim, generator=g)
        x_T = torch.randn(shape, generator=g)
        noise = torch.randn((len(self.table), *shape), generator=g) if bool(self.table.adds_noise.any()) else None
        return tuple(None if t is None else t.to(self.device, self.policy_dtype) for t in (cond, x_T, noise))

    def reference(self):
        if self._ref is None:
            rdt = tolerances.reference_dtype(self.policy_dtype)
            pol = self.policy if rdt == self.policy_dtype else copy.deepcopy(self.policy).to(rdt)
            prep = get_backend(REFERENCE).prepare(pol, self.table, rdt)
            with _exact_float32(), torch.no_grad():
                self._ref = prep.run(*(None if t is None else t.to(rdt) for t in self.inputs))
        return self._ref

    def check(self, be):
        """``(row, prepared)``: prepared is None when the backend raised or disagrees."""
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
        return row, prep

    @torch.no_grad()
    def time(self, prep, budget_s: float) -> float:
        """Median milliseconds per call of ``prep.run`` at the batch size asked for (CUDA events on a GPU,
        wall-clock time elsewhere)."""
        from ..bench.timing import measure  # the benchmark's timing loop: warm-up, events, budget

        args = self._draw(self.batch_size, seed=1)
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


def _read_cache(path: Path, key: dict) -> Selection | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        sel = Selection.from_dict(data["selection"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if path.exists():
            log.debug("fdp: ignoring unreadable backend cache %s (%s)", path, exc)
        return None
    sel.cached, sel.cache_file = True, str(path)
    return sel


def _write_cache(path: Path, key: dict, sel: Selection) -> None:
    sel.cache_file = str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "selection": sel.to_dict()}, indent=1))
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError as exc:
        sel.cache_file = None
        log.warning("fdp: could not write the backend cache %s (%s); set %s to a writable folder",
                    path, exc, CACHE_ENV)
