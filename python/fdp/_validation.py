"""Small argument checks shared by the library's modules.

Every public entry point of ``fdp`` validates its inputs up front and raises
an exception that names the offending argument and says what was expected,
rather than letting a shape or dtype mismatch surface later as an opaque
kernel error (or, worse, as silently wrong numbers). The helpers here keep
those messages uniform, e.g.::

    `global_cond` must have shape [B, 32] (B=4), got [4, 31]

Conventions: a wrong Python type or tensor dtype raises ``TypeError``; a wrong
value, shape, device or non-finite content raises ``ValueError``; a missing
file ``FileNotFoundError``. The checks raise the subclasses below, all marked
:class:`UserError`, so that a caller (the ``fdp`` command line) can tell a
mistake in what was passed from a bug in fdp, which may raise a plain
``ValueError`` too; ``except ValueError`` still catches them.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import numpy as np
import torch

# The fused kernels' launchers check their tensors themselves (fdp_kernels stays free of fdp imports);
# the backends use the same checks.
from fdp_kernels.checks import check_flat_sample, check_kernel_arg

__all__ = [
    "UserError",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidFile",
    "MissingFile",
    "format_shape",
    "check_int",
    "check_optional_int",
    "check_bool",
    "check_float_dtype",
    "check_number",
    "check_choice",
    "check_tensor",
    "check_device",
    "check_device_usable",
    "read_json_object",
    "about_file",
    "check_output_path",
    "check_finite",
    "inputs_already_checked",
    "check_kernel_arg",
    "check_flat_sample",
]

class UserError(Exception):
    """Marks an error in what the caller passed (an argument, a file, a config field), never a bug in fdp.

    Every instance is also a ``ValueError``, ``TypeError`` or ``FileNotFoundError``
    (the subclasses below), and its message names the argument or the file and
    what was expected. The ``fdp`` command line prints these as one line and
    exits with status 2; anything else is reported as a bug.
    """


class InvalidArgument(UserError, ValueError):
    """A value outside what the argument (or config field) accepts."""


class InvalidArgumentType(UserError, TypeError):
    """An argument (or config field) of the wrong type."""


class InvalidFile(UserError, ValueError):
    """A file that exists but cannot be used: truncated, not the format, or holding the wrong content."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the caller named does not exist."""


#: One entry of an expected shape: an exact size, ``None`` (any size), or a
#: symbolic name such as ``"B"`` (any size, but equal wherever the name recurs
#: and to its value in ``dims`` when bound there).
DimSpec = Union[int, str, None]

_DTYPE_KINDS = ("floating", "integer", "real")


def format_shape(shape: Iterable[DimSpec]) -> str:
    """Render a concrete or symbolic shape as ``[4, 31]`` / ``[B, 32]`` (``None`` shows as ``*``)."""
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def check_int(name: str, value, *, min_value: int | None = None, odd: bool = False) -> int:
    """Check that ``value`` is an integer (``bool`` rejected) and return it as ``int``.

    Args:
        name: the argument's name, used in the message.
        value: the value to check; any :class:`numbers.Integral` (e.g. a numpy int) is accepted.
        min_value: inclusive lower bound, if any (``min_value=1`` means "positive").
        odd: also require an odd value.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is below ``min_value`` or not odd when ``odd`` is set.
    """
    what = _int_description(min_value, odd)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentType(f"`{name}` must be {what}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (min_value is not None and value < min_value) or (odd and value % 2 == 0):
        raise InvalidArgument(f"`{name}` must be {what}, got {value}")
    return value


def check_optional_int(name: str, value, *, min_value: int | None = None) -> int | None:
    """Like :func:`check_int`, but ``None`` is accepted and returned unchanged."""
    if value is None:
        return None
    try:
        return check_int(name, value, min_value=min_value)
    except (TypeError, ValueError) as e:
        # Same exception type, with "None or" in the expectation.
        raise type(e)(str(e).replace(" must be ", " must be None or ", 1)) from None


def check_bool(name: str, value) -> bool:
    """Check that ``value`` is a ``bool`` (or numpy bool) and return it as ``bool``.

    Integers are rejected on purpose: ``flag=2`` is more likely a misplaced
    positional argument than a deliberate truth value.
    """
    is_numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or is_numpy_bool):
        raise InvalidArgumentType(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Check that ``value`` is a finite real number (``bool`` and strings rejected) within the bounds; return it as
    ``float``.

    ``low`` / ``high`` are inclusive unless ``low_open`` / ``high_open``: ``low=0, high=1, low_open=True,
    high_open=True`` means the open interval (0, 1), shown so in the message.
    """
    what = _number_description(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(f"`{name}` must be {what}, got {value!r} ({type(value).__name__})")
    x = float(value)
    ok = math.isfinite(x)
    ok = ok and (low is None or (x > low if low_open else x >= low))
    ok = ok and (high is None or (x < high if high_open else x <= high))
    if not ok:
        raise InvalidArgument(f"`{name}` must be {what}, got {value!r}")
    return x


def check_choice(name: str, value, choices: Sequence):
    """Check that ``value`` is one of ``choices`` (compared with ``==``, type included) and return it."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InvalidArgument(f"`{name}` must be one of {list(choices)}, got {value!r}")
    return value


#: Names accepted for floating dtypes (besides torch.dtype objects), as users and configs spell them.
FLOAT_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def check_float_dtype(name: str, value) -> torch.dtype | None:
    """Check that ``value`` is None, a floating ``torch.dtype`` or one of :data:`FLOAT_DTYPE_NAMES`
    (``"torch."`` prefix allowed); returns the ``torch.dtype`` (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in FLOAT_DTYPE_NAMES:
            raise InvalidArgument(f"`{name}` must be a floating torch.dtype or one of {list(FLOAT_DTYPE_NAMES)}, "
                                  f"got {value!r}")
        return FLOAT_DTYPE_NAMES[key]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidArgumentType(f"`{name}` must be a floating torch.dtype (e.g. torch.bfloat16) or its name, "
                                  f"got {value!r} ({type(value).__name__})")
    return value


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    shape: Sequence[DimSpec] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    dims: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Check that ``t`` is a tensor of the expected rank, shape, dtype and device.

    Checks run in the order type, dtype, rank/shape, device, so the first
    message describes the most basic problem.

    Args:
        name: the argument's name, used in messages.
        t: the value to check.
        ndim: required number of dimensions (implied by ``shape`` when that is given).
        shape: expected shape; each entry is an ``int`` (exact size), ``None``
            (any size) or a ``str`` symbol (any size, consistent across the
            shape and with ``dims``).
        dtype: a ``torch.dtype`` for an exact match, or one of ``"floating"``,
            ``"integer"`` (not bool) or ``"real"`` (floating or integer).
        device: required device; a device given without an index (``"cuda"``)
            matches any index of that type.
        dims: values already bound to symbols, e.g. ``{"B": 4}``; they are
            shown in messages as ``[B, 32] (B=4)``.

    Returns:
        The symbol bindings: ``dims`` plus the sizes of the symbols first seen
        in ``shape``, so that later checks can reuse them::

            d = check_tensor("sample", x, shape=("B", "T", 7))          # {"B": 4, "T": 16}
            check_tensor("local_cond", c, shape=("B", "T", 3), dims=d)

    Raises:
        TypeError: ``t`` is not a tensor, or has the wrong dtype.
        ValueError: wrong rank, shape or device.
    """
    bound = dict(dims or {})
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentType(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")

    if dtype is not None:
        _check_dtype(name, t, dtype)

    if shape is not None:
        shape = tuple(shape)
        if ndim is not None and ndim != len(shape):
            raise ValueError(f"check_tensor: ndim={ndim} contradicts shape={format_shape(shape)}")
        actual = list(t.shape)
        ok = len(actual) == len(shape)
        new: dict[str, int] = {}
        if ok:
            for want, got in zip(shape, actual):
                if want is None:
                    continue
                if isinstance(want, str):
                    ref = bound.get(want, new.get(want))
                    if ref is None:
                        new[want] = got
                    elif ref != got:
                        ok = False
                elif want != got:
                    ok = False
        if not ok:
            symbols = [d for d in dict.fromkeys(shape) if isinstance(d, str) and d in bound]
            known = f" ({', '.join(f'{s}={bound[s]}' for s in symbols)})" if symbols else ""
            raise InvalidArgument(f"`{name}` must have shape {format_shape(shape)}{known}, got {format_shape(actual)}")
        bound.update(new)
    elif ndim is not None and t.ndim != ndim:
        raise InvalidArgument(f"`{name}` must be a {ndim}-D tensor, got {t.ndim}-D with shape {format_shape(t.shape)}")

    if device is not None and not _same_device(t.device, torch.device(device)):
        raise InvalidArgument(f"`{name}` must be on device {torch.device(device)}, got {t.device}")
    return bound


def check_device(name: str, device) -> torch.device:
    """``device`` (a ``torch.device`` or a string such as ``"cuda:0"``) as a ``torch.device``, or ValueError."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"`{name}` must be a torch.device or a device string such as 'cpu', 'cuda' or 'cuda:0', "
                              f"got {device!r}") from exc


def check_device_usable(name: str, device) -> torch.device:
    """:func:`check_device`, and the device must exist here: ``cuda`` needs a CUDA device that torch can use
    (``cuda:N`` one with that index); the CPU always exists."""
    dev = check_device(name, device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            raise InvalidArgument(f"`{name}` is {str(device)!r}, but there is no CUDA device here ({why}); "
                                  "use 'cpu' (`fdp info` says what this machine has)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidArgument(f"`{name}` is {str(device)!r}, but this machine has {count} CUDA device(s) "
                                  f"(cuda:0 to cuda:{count - 1})")
    elif dev.type not in ("cpu", "meta") and not _backend_present(dev.type):
        raise InvalidArgument(f"`{name}` is {str(device)!r}, but torch cannot use a {dev.type} device here")
    return dev


def _backend_present(kind: str) -> bool:
    module = getattr(torch, kind, None)
    is_available = getattr(module, "is_available", None)
    try:
        return bool(is_available()) if callable(is_available) else False
    except Exception:  # noqa: BLE001 - a backend module that cannot answer is one we cannot use
        return False


def read_json_object(path, what: str = "a JSON object") -> dict:
    """The JSON object (a ``dict``) in the file ``path``; every failure names the file.

    Raises:
        MissingFile: no such file.
        InvalidFile: not readable as UTF-8 JSON (a truncated file, another format) or not an object.
    """
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist; expected {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidFile(f"{path} cannot be read as {what}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated")
        hint = " (the file looks truncated)" if cut else ""
        raise InvalidFile(f"{path} is not valid JSON{hint}: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
                          f"expected {what}") from None
    if not isinstance(data, dict):
        raise InvalidFile(f"{path} holds a JSON {_json_kind(data)}, expected {what}")
    return data


def check_output_path(name: str, path, *, folder: bool = False):
    """Check, before any work, that ``path`` can be written: as a file (``folder=False``) or as a folder to
    create or fill. Its nearest existing ancestor must be a writable folder (the missing ones are created at
    the time of writing), and ``path`` itself, if it exists, a file (a folder with ``folder=True``).
    Returns it as a ``pathlib.Path``."""
    import os
    from pathlib import Path

    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise InvalidArgumentType(f"`{name}` must be a path (a non-empty str or pathlib.Path), got {path!r}")
    path = Path(path)
    want = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        is_now = "a folder" if path.is_dir() else "a file"
        raise InvalidArgument(f"`{name}` must be {want} to write, but {path} is {is_now}")
    parent = path if folder and path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidArgument(f"`{name}` is {str(path)!r}, but {parent} is a file, not a folder: no file can be "
                              "written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"`{name}` is {str(path)!r}, but the folder {parent} is not writable")
    return path


def _json_kind(value) -> str:
    for kind, types in (("array", list), ("string", str), ("boolean", bool), ("number", (int, float))):
        if isinstance(value, types):
            return kind
    return "null" if value is None else type(value).__name__


@contextlib.contextmanager
def about_file(path):
    """Within this block a :class:`UserError` gets ``"<path>: "`` in front of its message (same class), so that
    a check of a value read from a file names the file as well as the field."""
    try:
        yield
    except UserError as exc:
        raise type(exc)(f"{path}: {exc}") from None


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` if the floating tensor ``t`` contains NaN or Inf.

    Integer and bool tensors are always finite and pass without work. For a
    CUDA tensor the check reads one flag back to the host (a device sync).
    It is skipped while a CUDA graph is being captured or ``torch.compile``
    is tracing, where a host read is impossible; inputs are checked on the
    eager calls before and after.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.device.type == "meta":
        return
    if _tracing_or_capturing(t) or _checked.active:
        return
    if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS and not t.requires_grad:
        # A control loop's per-call check: numpy's isfinite costs a third of torch's two small ops here.
        if bool(np.isfinite(t.numpy()).all()):
            return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidArgument(f"`{name}` must be finite, but {bad} of its {t.numel()} entries are NaN or Inf")


class _Checked(threading.local):
    active = False


_checked = _Checked()


@contextlib.contextmanager
def inputs_already_checked():
    """Within this block :func:`check_finite` does nothing.

    For inner loops (the eager sampler's steps) whose inputs were checked once
    on entry: on CUDA every finiteness check is a device sync, and K of them
    per step would dominate the loop's time.
    """
    prev = _checked.active
    _checked.active = True
    try:
        yield
    finally:
        _checked.active = prev


# -- internals ---------------------------------------------------------------------


def _int_description(min_value: int | None, odd: bool) -> str:
    what = "an odd int" if odd else "an int"
    if min_value == 1:
        what = "a positive " + what.split(" ", 1)[1]
    elif min_value == 0:
        what = "a non-negative " + what.split(" ", 1)[1]
    elif min_value is not None:
        what += f" >= {min_value}"
    return what


def _number_description(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | str) -> None:
    if isinstance(dtype, torch.dtype):
        if t.dtype != dtype:
            raise InvalidArgumentType(f"`{name}` must have dtype {dtype}, got {t.dtype}")
        return
    if dtype not in _DTYPE_KINDS:
        raise ValueError(f"check_tensor: dtype must be a torch.dtype or one of {_DTYPE_KINDS}, got {dtype!r}")
    is_float = t.is_floating_point()
    is_int = not is_float and not t.is_complex() and t.dtype != torch.bool
    ok = {"floating": is_float, "integer": is_int, "real": is_float or is_int}[dtype]
    if not ok:
        expected = {"floating": "a floating", "integer": "an integer", "real": "a floating or integer"}[dtype]
        raise InvalidArgumentType(f"`{name}` must have {expected} dtype, got {t.dtype}")


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    if actual.type != expected.type:
        return False
    return expected.index is None or actual.index is None or actual.index == expected.index


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
