"""Export a sampler's whole loop to ONNX: ``fdp.export.onnx`` and ``fdp export onnx``.

The graph is the eager torch sampler (``backend="torch"``) with the loop
unrolled for the sampler's fixed schedule: the router once, then T steps of
the denoisers and the scheduler update, every coefficient a constant. Its
inputs are ``global_cond [B, Dc]``, ``x_T [B, Ta, Da]`` and, when a step adds
noise (DDPM, DDIM with eta > 0), ``step_noise [T, B, Ta, Da]`` (slots of
steps that add none are ignored), all in the policy's dtype, with a fixed
batch size B; the output is ``actions [B, Ta, Da]``. The caller draws the
noise, so the file has no random operators (the way in for TensorRT).

The export is checked: onnxruntime (CPU) runs the file on random inputs and
must return what the sampler returns for them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._optional import MissingExtra
from ._validation import InvalidArgument, InvalidArgumentType, MissingFile, check_bool, check_int, check_optional_int
from .backends.torch_backend import TorchPrepared
from .sampler import Sampler
from .tolerances import loop_rounding_bound

__all__ = ["onnx", "OnnxExport", "write_unrolled", "input_names"]


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`onnx` wrote and how well onnxruntime reproduced the sampler."""

    path: Path
    input_names: tuple[str, ...]
    batch_size: int
    num_steps: int
    max_abs_error: float  # onnxruntime against the sampler's loop in float64, on random inputs
    tolerance: float  # the derived rounding bound of that loop in the sampler's dtype (loop_rounding_bound)


class _Unrolled(nn.Module):
    def __init__(self, policy, table):
        super().__init__()
        self.policy = policy
        self._loop = TorchPrepared(policy, table, None)

    def forward(self, global_cond, x_T, step_noise=None):
        return self._loop.run(global_cond, x_T, step_noise)


def input_names(table) -> tuple[str, ...]:
    """The graph's inputs for a schedule: ``step_noise`` only when a step adds noise."""
    return ("global_cond", "x_T", "step_noise") if bool(table.adds_noise.any()) else ("global_cond", "x_T")


def write_unrolled(policy, table, inputs: tuple, path, *, opset: int | None = None, dynamo: bool = False) -> None:
    """Trace the torch sampling loop of ``policy`` over ``table`` on example ``inputs`` (in
    :func:`input_names` order) into the ONNX file ``path``: the graph behind :func:`onnx` and the
    ``onnxruntime`` backend."""
    # Every module's own mode, restored as it was (a caller may keep, e.g., one component in train mode).
    modes = [(m, m.training) for m in policy.modules()]
    policy.eval()
    try:
        with warnings.catch_warnings():
            # The tracer warns where Python reads shapes and timesteps: constants of this fixed-size,
            # fixed-schedule graph by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False is chosen on purpose (see onnx()); torch's notes that it is the legacy exporter
            # are not for the user of this function.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            torch.onnx.export(_Unrolled(policy, table).eval(), inputs, str(path),
                              input_names=list(input_names(table)), output_names=["actions"], opset_version=opset,
                              dynamo=dynamo,
                              **({"external_data": False} if dynamo else {}))
    finally:
        for m, training in modes:
            m.training = training


def _require(dynamo: bool):
    try:
        import onnx  # noqa: F401  (torch's exporters write through it)
        import onnxruntime

        if dynamo:
            import onnxscript  # noqa: F401  (torch.export's ONNX translation)
    except ImportError as exc:
        raise MissingExtra(f"fdp.export.onnx needs onnx, onnxruntime and, with dynamo=True, onnxscript ({exc}): "
                          "pip install '.[onnx]' in fdp's clone") from exc
    return onnxruntime


def onnx(sampler: Sampler, path, batch_size: int = 1, *, opset: int | None = None, dynamo: bool = False,
         seed: int = 0) -> OnnxExport:
    """Write ``sampler``'s sampling loop for batches of ``batch_size`` to the ONNX file ``path``, then check it.

    Whatever backend ``sampler`` uses, the file holds the torch path (the same
    function). ``dynamo=False`` traces with torch's TorchScript exporter
    (deprecated by PyTorch since 2.9, still present): for an unrolled loop it
    builds the same graph about 3x faster than ``dynamo=True`` (torch.export,
    needs onnxscript), measured on the CPU with a small U-Net and 8 steps.
    Raises ValueError if onnxruntime's actions on random inputs (seeded by
    ``seed``) differ from the sampler's loop run in float64 by more than the
    rounding bound of that loop in the sampler's dtype, derived from the
    computation (:func:`fdp.tolerances.loop_rounding_bound`).
    """
    if not isinstance(sampler, Sampler):
        raise InvalidArgumentType(f"`sampler` must be an fdp.Sampler, got {type(sampler).__name__}")
    batch_size = check_int("batch_size", batch_size, min_value=1)
    opset = check_optional_int("opset", opset, min_value=1)
    dynamo = check_bool("dynamo", dynamo)
    seed = check_int("seed", seed)
    if not isinstance(path, (str, Path)):
        raise InvalidArgumentType(f"`path` must be a str or a pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    # Checked before the (long) export, not when the file is written.
    if path.is_dir():
        raise InvalidArgument(f"`path` must be a file to write, but {path} is a folder")
    if not path.parent.is_dir():
        raise MissingFile(f"`path`: the folder {path.parent} of {path} does not exist")
    if sampler.dtype != sampler.sample_dtype:
        raise InvalidArgument(f"`sampler` runs {sampler.dtype} weights, but the exported graph computes in the "
                              f"policy's {sampler.sample_dtype}: export a sampler built without `dtype`")
    ort = _require(dynamo)
    policy = sampler.policy
    dtype, device = sampler.sample_dtype, sampler.device
    shape = (batch_size, policy.horizon, policy.action_dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = {"global_cond": torch.randn(batch_size, policy.cond_dim, generator=gen, dtype=dtype),
              "x_T": torch.randn(shape, generator=gen, dtype=dtype)}
    if bool(sampler.table.adds_noise.any()):
        inputs["step_noise"] = torch.randn((sampler.num_steps, *shape), generator=gen, dtype=dtype)
    on_device = tuple(t.to(device) for t in inputs.values())

    write_unrolled(policy, sampler.table, on_device, path, opset=opset, dynamo=dynamo)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: constant folding notes on Mish are not for the user
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["actions"], {k: v.numpy() for k, v in inputs.items()})[0])
    # onnxruntime rounds in other orders than torch (and than any other CPU): it is held to the sampler's loop
    # in float64 on the same inputs, within the error growth of this loop in `dtype` over its T steps at
    # these magnitudes, measured by Monte Carlo arithmetic (tolerances.loop_rounding_bound: 5 float64 calls).
    cond, x_T, *noise = on_device
    x64, bound = loop_rounding_bound(policy, sampler.table, cond, x_T, noise[0] if noise else None, dtype)
    err = float((got.double() - x64.cpu()).abs().max())
    tol = float(bound)
    if not err <= tol:  # NaN fails too
        raise ValueError(f"the exported graph disagrees with the sampler's loop: max |difference| from its float64 "
                         f"run {err:.3g} > {tol:.3g}, the derived {dtype} rounding bound ({path})")
    return OnnxExport(path, tuple(inputs), batch_size, sampler.num_steps, err, tol)
