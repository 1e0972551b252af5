"""Isolated first use: a compiled kernel variant runs first in a separate process.

A backend that runs native code on a device (``Backend.native_code_on``: the
CUDA kernels, native Triton, the CUDA-graph backend) has, before it is trusted,
two failures a check *in* the user's process cannot survive: a hang (a wait
that never completes, so ``Sampler(...)`` never returns) and a device fault
(an illegal address or a device-side trap: CUDA errors of that kind are
sticky, so every later CUDA call of the process fails, the torch fallback
included). So before ``backend="auto"`` or ``verify=True`` runs such a backend
here, it runs in a child process: a fresh interpreter, as the ``spawn`` start
method starts (but through ``subprocess``, so that the caller's ``__main__``
module, a user's script, is not imported again), with its own CUDA context. The child
imports the backend by its registered module path, loads the policy (saved with
``torch.save`` into a private temporary folder), packs it, runs it on the
selection's inputs (the verification batch and the batch size asked for) and
then checks that its own process still computes (a CUDA synchronize and a
small exact computation). The parent compares the outputs with the torch
reference. A child that does not finish within ``FDP_ISOLATE_TIMEOUT`` seconds
after it started is killed; one that dies (a signal, a non-zero exit, a
sticky error) is reported with its error text.

``FDP_ISOLATE=0`` (or ``Sampler(isolate=False)``) turns this off for users
who accept the risk. The verdicts are cached by :mod:`fdp.backends.selection`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("fdp")

#: Environment variable: "0" turns isolated first use off (the ``isolate`` argument wins when given).
ISOLATE_ENV = "FDP_ISOLATE"
#: Environment variable: seconds a child may take from the moment it is ready (imports done, policy loaded)
#: until it reports; packing, compiling (native Triton compiles on first use) and running count.
TIMEOUT_ENV = "FDP_ISOLATE_TIMEOUT"
RUN_TIMEOUT_S = 300.0
#: Seconds a child may take to start (interpreter, torch, the CUDA context, loading the policy).
START_TIMEOUT_S = 180.0
#: Set in the child's environment; a child never isolates again.
CHILD_ENV = "FDP_ISOLATION_CHILD"
_POLL_S = 0.02
_TAIL = 1500  # characters of the child's stderr kept in a reason


def enabled(isolate: bool | None = None) -> bool:
    """Whether isolated first use is on: ``isolate`` if given, else ``$FDP_ISOLATE`` (default on)."""
    from ._validation import check_bool

    if isolate is not None:
        return check_bool("isolate", isolate)
    if os.environ.get(CHILD_ENV) == "1":
        return False
    value = os.environ.get(ISOLATE_ENV, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    log.warning("fdp: %s=%r is not one of 0/1/true/false; isolated first use stays on", ISOLATE_ENV, value)
    return True


def run_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return RUN_TIMEOUT_S
    try:
        seconds = float(value)
        if seconds > 0:
            return seconds
    except ValueError:
        pass
    log.warning("fdp: %s=%r is not a positive number of seconds; using %g", TIMEOUT_ENV, value, RUN_TIMEOUT_S)
    return RUN_TIMEOUT_S


@dataclasses.dataclass
class Case:
    """One configuration to run: ``policy`` indexes the job's policies; ``inputs`` is a list of
    ``(global_cond, x_T, step_noise)``, each run with one prepared object."""

    policy: int
    table: object
    dtype: torch.dtype
    inputs: list


@dataclasses.dataclass
class Job:
    """One backend to run in a child process on ``cases``, in order."""

    backend: str
    module: str  # the module defining ``BACKEND`` (the registry's entry)
    device: torch.device
    policies: list
    cases: list


@dataclasses.dataclass
class Outcome:
    """What a child reported for one case: ``outputs`` (one per input, on the CPU) when it ran, else ``error``."""

    backend: str
    outputs: list | None = None
    error: str | None = None  # why the candidate cannot be used (it hung, died, raised, broke its process)
    setup_error: str | None = None  # the child could not start or load its inputs: not the candidate's fault
    start_s: float | None = None  # from the child's start until it was ready
    total_s: float | None = None  # from the child's start until this case was reported


# ``python -m fdp.isolation`` would find the module already imported by the package; this does not.
_CHILD_MAIN = ("import sys, pathlib; from fdp.isolation import _child; "
               "sys.exit(_child(pathlib.Path(sys.argv[1]), int(sys.argv[2])))")

#: Children started by this process (tests read it to tell a cached verdict from a new check).
children_started = 0
#: After this many cases that hung or killed their child, a job's remaining cases are not run.
MAX_CRASHES = 3


def run_isolated(jobs: list[Job], timeout_s: float | None = None, on_progress=None) -> list[list[Outcome]]:
    """Run every job in a child process of its own; for each job, one :class:`Outcome` per case, in order.

    ``on_progress(i, outcomes)``, if given, is called whenever a child of job ``i`` ends, with the job's
    outcomes so far (for a caller that saves partial results).

    A case that hangs (no report within ``timeout_s`` of the previous one) or kills its child is
    reported as such and the job goes on in a new child from the next case. As many children run at
    once as there are CPU cores (each spends most of its start importing torch): a child's timer starts
    only when it is ready, and more children than cores would starve the ones already running.
    """
    timeout_s = run_timeout() if timeout_s is None else timeout_s
    width = max(1, os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="fdp-isolation-"))  # mode 0700: only this user reads the pickles
    try:
        results: list[list[Outcome]] = [[] for _ in jobs]
        for i, job in enumerate(jobs):
            folder = tmp / str(i)
            folder.mkdir()
            torch.save({"backend": job.backend, "module": job.module, "device": str(job.device),
                        "policies": job.policies,
                        "cases": [dict(policy=c.policy, table=c.table, dtype=c.dtype,
                                       inputs=[tuple(None if t is None else t.detach().cpu() for t in args)
                                               for args in c.inputs]) for c in job.cases]},
                       folder / "job.pt")
        pending = list(range(len(jobs)))
        crashes = [0] * len(jobs)
        while pending:
            batch, pending = pending[:width], pending[width:]
            running = [(i, _start(tmp / str(i), len(results[i]))) for i in batch]
            for i, (proc, started) in running:
                job = jobs[i]
                results[i] += _wait(job, tmp / str(i), proc, started, timeout_s, len(results[i]))
                last = results[i][-1] if results[i] else None
                if last is not None and last.setup_error:
                    results[i] += [dataclasses.replace(last) for _ in range(len(job.cases) - len(results[i]))]
                elif len(results[i]) < len(job.cases):
                    crashes[i] += 1
                    if crashes[i] >= MAX_CRASHES:
                        why = f"not run: {MAX_CRASHES} earlier cases of this backend hung or killed their process"
                        results[i] += [Outcome(job.backend, error=why)
                                       for _ in range(len(job.cases) - len(results[i]))]
                    else:
                        pending.append(i)
                if on_progress is not None:
                    on_progress(i, results[i])
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start(folder: Path, first: int):
    global children_started
    (folder / "ready").unlink(missing_ok=True)
    stderr = open(folder / f"stderr-{first}.txt", "wb")
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, str(folder), str(first)], env=_child_env(),
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    finally:
        stderr.close()
    children_started += 1
    return proc, time.monotonic()


def _child_env() -> dict:
    env = dict(os.environ)
    # The child imports what this process can: fdp itself, and a backend registered from anywhere on sys.path.
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env[CHILD_ENV] = "1"
    return env


def _wait(job: Job, folder: Path, proc: subprocess.Popen, started: float, timeout_s: float,
          first: int) -> list[Outcome]:
    """The outcomes of cases ``first``.. that the child reported, then of the one it hung or died in."""
    outs: list[Outcome] = []
    ready_at = last_at = None
    start_s = None

    def collect():
        nonlocal last_at
        while first + len(outs) < len(job.cases) and (folder / f"done-{first + len(outs)}.pt").exists():
            data = torch.load(folder / f"done-{first + len(outs)}.pt", weights_only=False)  # ours, private folder
            out = Outcome(job.backend, start_s=start_s, total_s=time.monotonic() - started)
            if data.get("error"):
                out.error = data["error"] + " (in a separate process)"
            else:
                out.outputs = data["outputs"]
            outs.append(out)
            last_at = time.monotonic()

    while True:
        rc = proc.poll()
        now = time.monotonic()
        if ready_at is None and (folder / "ready").exists():
            ready_at = last_at = now
            start_s = now - started
        if ready_at is not None:
            collect()
        if rc is not None:
            break
        if ready_at is None and now - started > START_TIMEOUT_S:
            _kill(proc)
            return [Outcome(job.backend, setup_error=f"the child process did not start within {START_TIMEOUT_S:g} s")]
        if ready_at is not None and now - last_at > timeout_s:
            _kill(proc)
            collect()
            if first + len(outs) < len(job.cases):
                outs.append(Outcome(job.backend, start_s=start_s, total_s=time.monotonic() - started, error=(
                    f"did not finish within {timeout_s:g} s in a separate process (a hang?); the process was "
                    f"killed ({TIMEOUT_ENV} sets the limit)")))
            return outs
        time.sleep(_POLL_S)
    if start_s is None and (folder / "ready").exists():
        start_s = time.monotonic() - started
    collect()
    if first + len(outs) >= len(job.cases):
        return outs
    setup = folder / "setup-error.txt"
    if setup.exists():
        return outs + [Outcome(job.backend, setup_error=setup.read_text())]
    if rc < 0:
        try:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            how = f"was killed by signal {-rc}"
    else:
        how = f"exited with status {rc}"
    tail = _tail(folder / f"stderr-{first}.txt")
    if start_s is None:
        return outs + [Outcome(job.backend, setup_error=f"the child process {how} before it was ready"
                               + (f": {tail}" if tail else ""))]
    return outs + [Outcome(job.backend, start_s=start_s, total_s=time.monotonic() - started,
                           error=f"its process {how} while running it" + (f": {tail}" if tail else ""))]


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a process stuck in the driver may take a while to go
        log.warning("fdp: isolation child %d did not exit after SIGKILL", proc.pid)


def _tail(path: Path) -> str:
    try:
        text = path.read_bytes()[-_TAIL:].decode(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(line for line in text.splitlines() if line.strip())


def probe(device: torch.device) -> None:
    """Raise if this process no longer computes correctly on ``device`` (e.g. after a sticky CUDA error)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    a = torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4)
    got = torch.nn.functional.linear(a, torch.ones(2, 4, device=device)).cpu()
    expected = torch.tensor([[6.0, 6.0], [22.0, 22.0], [38.0, 38.0]])
    if not torch.equal(got, expected):
        raise RuntimeError(f"a small exact computation gave {got.tolist()}, expected {expected.tolist()}")


def _child(folder: Path, first: int = 0) -> int:
    """The child's side: load the job, mark ready, run cases ``first``.. in order, report each one (an
    exception is a reported error); stop after a case that left the process unusable."""
    import importlib

    try:
        job = torch.load(folder / "job.pt", weights_only=False)
        from . import backends

        backends.register_backend(job["backend"], job["module"])
        be = importlib.import_module(job["module"]).BACKEND
        device = torch.device(job["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.init()
        # As in the in-process check: the bounds are about the kernels, not about TF32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        (folder / "setup-error.txt").write_text(f"could not load its inputs: {type(exc).__name__}: {exc}"[:_TAIL])
        return 0
    (folder / "ready").touch()
    for i in range(first, len(job["cases"])):
        case = job["cases"][i]
        data, usable = _run_case(be, job["policies"][case["policy"]], case, device)
        tmp = folder / f"done-{i}.tmp"
        torch.save(data, tmp)
        os.replace(tmp, folder / f"done-{i}.pt")
        if not usable:
            return 3
    return 0


def _run_case(be, policy, case, device):
    """``(report, whether the process is still usable)``."""
    stage = "packing"
    try:
        prep = be.prepare(policy, case["table"], case["dtype"])
        outputs = []
        for args in case["inputs"]:
            stage = f"running at batch {args[1].shape[0]}"
            with torch.no_grad():
                out = prep.run(*(None if t is None else t.to(device) for t in args))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            outputs.append(out.detach().cpu())
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        error = f"raised {type(exc).__name__} while {stage}: {exc}"
        try:
            probe(device)
        except Exception as after:  # noqa: BLE001
            return {"error": (f"left its process unusable (a sticky error?): it {error}, and a later computation "
                              f"raised {type(after).__name__}: {after}")[:_TAIL]}, False
        return {"error": error[:_TAIL]}, True
    try:
        probe(device)
    except Exception as exc:  # noqa: BLE001
        return {"error": (f"ran, but left its process unusable (a sticky error?): a later computation raised "
                          f"{type(exc).__name__}: {exc}")[:_TAIL]}, False
    return {"outputs": outputs}, True
