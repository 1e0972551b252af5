"""Optional dependencies: the extras in pyproject.toml, imported where they are used.

The core needs torch, numpy and triton only; the demo, the benchmark and the
tests need more. :func:`require` imports one of those packages or raises
:class:`MissingExtra`, whose message names the pip command that installs it.
"""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional package is not installed; the message says how to install it."""


def require(module: str, extra: str, needed_for: str):
    """Import ``module`` (a package of the extra ``extra``) or raise :class:`MissingExtra`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingExtra(f"{needed_for} needs the package '{package}', which is not installed: "
                           f"pip install '.[{extra}]' in fdp's clone (fdp is not on PyPI)") from exc
