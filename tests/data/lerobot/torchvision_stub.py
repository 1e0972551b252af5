"""A stand-in for ``torchvision`` so that LeRobot's modules import beside a CPU torch build.

PyPI's torchvision wheel is built against a CUDA torch and cannot load next to
``torch==2.13.0+cpu``. LeRobot imports torchvision at module level but uses it
only for image policies (resize/crop transforms, the ResNet backbone); the
fixtures here are state-only policies, so nothing from it is ever called.
``install()`` puts a finder on ``sys.meta_path`` that answers every
``torchvision`` import with an empty module whose attributes are classes that
raise when instantiated, so accidental use fails loudly.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{qualname} is a stub (torchvision_stub): the real torchvision is not installed")

        return type(name, (), {"__init__": unavailable})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
