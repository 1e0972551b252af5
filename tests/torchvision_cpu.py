"""Make PyPI's torchvision importable beside a CPU-only torch (CI's environment for the LeRobot tests).

PyPI's torchvision wheel is a CUDA build: its C extension ``_C.so`` cannot load
beside ``torch==2.13.0+cpu`` (it needs the CUDA runtime). torchvision then runs
without its custom operators, except that ``torchvision/_meta_registrations.py``
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, which fails ("operator torchvision::nms does not exist") and
breaks ``import torchvision``. Declaring those two schemas first lets the import
go on; everything LeRobot's image encoder uses (ResNet, the crop and resize
transforms) is plain torch. Calling the declared operators raises, since they
have no kernel; nothing LeRobot's policies here run calls them.

Where torchvision's extension loads (a matching build), :func:`install` does
nothing. It must run before the first ``import torchvision``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_SCHEMA = "{}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None  # kept alive: the schemas live as long as this object


def install() -> None:
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    built = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if built:
        try:
            torch.ops.load_library(built[0])  # what torchvision does first; a matching build registers its ops
            return
        except OSError:
            pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        _library.define(_SCHEMA.format(name))
