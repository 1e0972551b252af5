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
class Job:
    """One backend to run in a child: ``inputs`` is a list of ``(global_cond, x_T, step_noise)``."""

    backend: str
    module: str  # the module defining ``BACKEND`` (the registry's entry)
    policy: torch.nn.Module
    table: object
    dtype: torch.dtype
    device: torch.device
    inputs: list


@dataclasses.dataclass
class Outcome:
    """What a child reported: ``outputs`` (one per input, on the CPU) when it ran, else ``error``."""

    backend: str
    outputs: list | None = None
    error: str | None = None  # why the candidate cannot be used (it hung, died, raised, broke its process)
    setup_error: str | None = None  # the child could not start or load its inputs: not the candidate's fault
    start_s: float | None = None  # from the start until the child was ready
    total_s: float | None = None


# ``python -m fdp.isolation`` would find the module already imported by the package; this does not.
_CHILD_MAIN = "import sys, pathlib; from fdp.isolation import _child; sys.exit(_child(pathlib.Path(sys.argv[1])))"

#: Children started by this process (tests read it to tell a cached verdict from a new check).
children_started = 0


def run_isolated(jobs: list[Job], timeout_s: float | None = None) -> list[Outcome]:
    """Run every job in its own child process, one :class:`Outcome` per job, in order.

    As many children run at once as there are CPU cores (each spends most of its start importing torch):
    a child's timer starts only when it is ready, and more children than cores would starve the ones
    already running.
    """
    timeout_s = run_timeout() if timeout_s is None else timeout_s
    width = max(1, os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="fdp-isolation-"))  # mode 0700: only this user reads the pickles
    try:
        outcomes = []
        for first in range(0, len(jobs), width):
            running = [_start(job, tmp / str(first + i)) for i, job in enumerate(jobs[first:first + width])]
            outcomes += [_wait(job, folder, proc, started, timeout_s) for job, folder, proc, started in running]
        return outcomes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start(job: Job, folder: Path):
    global children_started
    folder.mkdir()
    torch.save({"backend": job.backend, "module": job.module, "policy": job.policy, "table": job.table,
                "dtype": job.dtype, "device": str(job.device),
                "inputs": [tuple(None if t is None else t.detach().cpu() for t in args) for args in job.inputs]},
               folder / "job.pt")
    stderr = open(folder / "stderr.txt", "wb")
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, str(folder)], env=_child_env(),
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    finally:
        stderr.close()
    children_started += 1
    return job, folder, proc, time.monotonic()


def _child_env() -> dict:
    env = dict(os.environ)
    # The child imports what this process can: fdp itself, and a backend registered from anywhere on sys.path.
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env[CHILD_ENV] = "1"
    return env


def _wait(job: Job, folder: Path, proc: subprocess.Popen, started: float, timeout_s: float) -> Outcome:
    out = Outcome(job.backend)
    ready_at = None
    while True:
        rc = proc.poll()
        now = time.monotonic()
        if ready_at is None and (folder / "ready").exists():
            ready_at = now
            out.start_s = now - started
        if rc is not None:
            break
        if ready_at is None and now - started > START_TIMEOUT_S:
            _kill(proc)
            out.setup_error = f"the child process did not start within {START_TIMEOUT_S:g} s"
            return out
        if ready_at is not None and now - ready_at > timeout_s:
            _kill(proc)
            out.error = (f"did not finish within {timeout_s:g} s in a separate process (a hang?); the process was "
                         f"killed ({TIMEOUT_ENV} sets the limit)")
            out.total_s = time.monotonic() - started
            return out
        time.sleep(_POLL_S)
    out.total_s = time.monotonic() - started
    if out.start_s is None and (folder / "ready").exists():
        out.start_s = out.total_s
    tail = _tail(folder / "stderr.txt")
    result = folder / "result.pt"
    if rc == 0 and result.exists():
        data = torch.load(result, weights_only=False)  # written by our child into our private folder
        if data.get("setup_error"):
            out.setup_error = data["setup_error"]
        elif data.get("error"):
            out.error = data["error"] + " (in a separate process)"
        else:
            out.outputs = data["outputs"]
        return out
    if rc < 0:
        try:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            how = f"was killed by signal {-rc}"
    else:
        how = f"exited with status {rc}"
    if ready_at is None and not (folder / "ready").exists():
        out.setup_error = f"the child process {how} before it was ready" + (f": {tail}" if tail else "")
    else:
        out.error = f"its process {how} while running it" + (f": {tail}" if tail else "")
    return out


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


def _child(folder: Path) -> int:
    """The child's side: load the job, mark ready, run it, report (exceptions become a reported error)."""
    import importlib

    def report(**data):
        tmp = folder / "result.tmp"
        torch.save(data, tmp)
        os.replace(tmp, folder / "result.pt")

    try:
        job = torch.load(folder / "job.pt", weights_only=False)
        from . import backends

        backends.register_backend(job["backend"], job["module"])
        be = importlib.import_module(job["module"]).BACKEND
        device = torch.device(job["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.init()
        policy = job["policy"]
        # As in the in-process check: the bounds are about the kernels, not about TF32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        report(setup_error=f"could not load its inputs: {type(exc).__name__}: {exc}"[:_TAIL])
        return 0
    (folder / "ready").touch()
    stage = "packing"
    try:
        prep = be.prepare(policy, job["table"], job["dtype"])
        outputs = []
        for args in job["inputs"]:
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
            error = (f"left its process unusable (a sticky error?): it {error}, and a later computation raised "
                     f"{type(after).__name__}: {after}")
        report(error=error[:_TAIL])
        return 0
    try:
        probe(device)
    except Exception as exc:  # noqa: BLE001
        report(error=(f"ran, but left its process unusable (a sticky error?): a later computation raised "
                      f"{type(exc).__name__}: {exc}")[:_TAIL])
        return 0
    report(outputs=outputs)
    return 0

