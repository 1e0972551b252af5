"""``backend="onnxruntime"``: the sampler's unrolled loop run by ONNX Runtime on the CPU.

Serves any float32 policy on the CPU that :func:`fdp.export.write_unrolled` can
trace (the ``torch`` loop with every step and coefficient fixed: the file
``fdp export onnx`` writes). ``prepare`` hashes the policy (structure, weight
values, schedule); each batch size seen by ``run`` is one input signature, and
its graph is exported once and kept on disk beside the backend-selection cache
(``$FDP_CACHE_DIR/onnx/<hash>-b<B>.onnx``), so that a later process with the
same policy loads it instead of tracing again. The first call at a new batch
size pays the export (seconds for a U-Net) unless the file is there. The file is
written through an exclusively created temporary file (never through a symlink)
and renamed into place; the folder keeps the :data:`MAX_FILES` most recently used
graphs, and a prepared policy at most :data:`MAX_SIGNATURES` live sessions.

Each signature gets one ``InferenceSession`` (CPU execution provider, all graph
optimisations, ``intra_op_num_threads`` = ``torch.get_num_threads()`` when it
is built) and an I/O binding to preallocated input and output tensors: a call
copies its inputs in, runs, and returns a copy of the output. The graph is a
copy of the weights: :class:`fdp.Sampler` prepares again when the policy
changes (a new hash, a new file). Noise follows the noise contract: the graph
takes the whole ``[T, B, Ta, Da]`` step noise (drawn up front by the sampler)
and reads only the slices of steps that add noise. A zero router weight leaves
its component out of the row and NaN propagates exactly as in ``torch``: the
graph is that loop (``torch.where`` on the weight), router included.

Refused (``unsupported_reason``): weight dtypes other than the policy's (the
graph computes in the policy's dtype, there is nothing to repack) and policies
that are not float32 (ONNX Runtime's CPU kernels are float32 for the operators
the components use).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from .._state import LRU, state_mode
from .base import Backend

log = logging.getLogger("fdp")

#: Bumped when what a cached graph file means changes (the export, its inputs).
FILE_FORMAT = 1
#: At most this many graph files stay in ``$FDP_CACHE_DIR/onnx`` (the least recently used go first): every new
#: weight value and batch size writes one, and a policy evaluated during training changes at every step.
MAX_FILES = 16
#: At most this many batch sizes keep a live session per prepared policy (the least recently used is dropped).
MAX_SIGNATURES = 8


def _import_error() -> str | None:
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"needs onnx and onnxruntime ({exc}): pip install '.[onnx]' in fdp's clone, or pip install onnxruntime onnx"
    return None


def _policy_hash(policy, table) -> str:
    """Structure, weight values and schedule: what the exported graph bakes in."""
    import fdp

    from .selection import policy_signature

    h = hashlib.sha256()
    meta = [FILE_FORMAT, fdp.__version__, torch.__version__, policy_signature(policy),
            table.timesteps.tolist(), table.coef.tolist(), table.adds_noise.tolist(), bool(table.clip_sample),
            float(table.clip_range), policy.training]
    h.update(json.dumps(meta, default=str).encode())
    for name, t in policy.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class _Signature:
    """One batch size: its session, the binding and the preallocated buffers it reads and writes."""

    def __init__(self, session, names, shapes, dtype):
        self.session = session
        self.inputs = {n: torch.empty(s, dtype=dtype) for n, s in zip(names, shapes)}
        self.out = torch.empty(shapes[1], dtype=dtype)
        self.binding = session.io_binding()
        np_dtype = {torch.float32: "float32"}[dtype]
        for n, t in self.inputs.items():
            self.binding.bind_input(n, "cpu", 0, np_dtype, list(t.shape), t.data_ptr())
        self.binding.bind_output("actions", "cpu", 0, np_dtype, list(self.out.shape), self.out.data_ptr())

    def run(self, values):
        for t, v in zip(self.inputs.values(), values):
            t.copy_(v)
        self.session.run_with_iobinding(self.binding)
        return self.out.clone()


class OnnxRuntimePrepared:
    noise_per_step = False  # the graph reads all steps' noise from one input

    def __init__(self, policy, table):
        from .. import export

        self.policy, self.table = policy, table
        self.dtype = next(policy.parameters()).dtype
        self.names = export.input_names(table)
        self.hash = _policy_hash(policy, table)
        self._signatures: LRU[_Signature] = LRU(MAX_SIGNATURES)

    def _path(self, B: int) -> Path:
        from .selection import _cache_dir

        return _cache_dir() / "onnx" / f"{self.hash}-b{B}.onnx"

    def _signature(self, B: int, example) -> _Signature:
        sig = self._signatures.get(B)
        if sig is not None:
            return sig
        import onnxruntime as ort

        path = self._path(B)
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last to be pruned
        else:
            self._export(path, example)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: constant-folding notes are not for the user
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shapes = [tuple(t.shape) for t in example]
        with state_mode():  # the bound buffers serve later calls in any autograd mode (fdp._state)
            return self._signatures.put(B, _Signature(session, self.names, shapes, self.dtype))

    def _export(self, path: Path, example) -> None:
        """Trace the loop into ``path``: through a temporary file created exclusively under an unpredictable name
        in the cache folder (never through a planted symlink), renamed into place, then the folder pruned."""
        from torch.utils._python_dispatch import _disable_current_modes

        from .. import export

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        os.close(fd)
        log.info("fdp: exporting the sampling loop to ONNX for batch %d (%s)", example[1].shape[0], path)
        try:
            # The tracer records the policy's own ops: a dispatch mode the caller runs the call under
            # (a profiler, an op counter) must not see them or wrap their results.
            with _disable_current_modes():
                export.write_unrolled(self.policy, self.table, tuple(t.detach().clone() for t in example), tmp)
            os.replace(tmp, path)  # atomic: a concurrent process never loads half a file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _prune(path.parent, keep=path)

    @torch.no_grad()
    def run(self, global_cond, x_T, step_noise):
        values = (global_cond, x_T) if len(self.names) == 2 else (global_cond, x_T, step_noise)
        return self._signature(x_T.shape[0], values).run(values)


def _prune(folder: Path, keep: Path) -> None:
    """Remove the least recently used graph files beyond :data:`MAX_FILES` (never ``keep``, just written)."""
    try:
        files = [(f.stat().st_mtime, f) for f in folder.glob("*.onnx") if f.is_file() and f != keep]
    except OSError:
        return
    files.sort()
    for _, f in files[:max(0, len(files) + 1 - MAX_FILES)]:
        with contextlib.suppress(OSError):
            f.unlink()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    priority = 10

    def unavailable_reason(self, device):
        reason = _import_error()
        if reason:
            return reason
        if torch.device(device).type != "cpu":
            return f"runs on the CPU (ONNX Runtime's CPU execution provider), got {device}"
        return None

    def unsupported_reason(self, policy, table, dtype):
        pdt = next(policy.parameters()).dtype
        if pdt != torch.float32:
            return f"serves float32 policies (ONNX Runtime's CPU kernels), this one is {pdt}"
        if dtype is not None and dtype != pdt:
            return f"computes in the policy's dtype {pdt} (the exported loop), got weight dtype {dtype}"
        return None

    def prepare(self, policy, table, dtype=None):
        reason = self.unavailable_reason(next(policy.parameters()).device) or \
            self.unsupported_reason(policy, table, dtype)
        if reason:
            raise ValueError(f"backend {self.name!r} cannot serve this policy: {reason}")
        return OnnxRuntimePrepared(policy, table)


BACKEND = OnnxRuntimeBackend()
