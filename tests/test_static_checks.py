"""Code no CI machine runs, checked without running it: names used but never defined.

The GPU-only tests, the Python scripts they start in fresh processes (strings in the test files) and the
GPU branches of the package and scripts run only in a rare GPU slot, where a NameError wastes the slot.
pyflakes finds them statically (undefined names, locals used before assignment, undefined ``__all__``
entries); its other findings (unused imports and the like) are not this test's business.
"""

from __future__ import annotations

import ast
import glob
import os
import textwrap

import pytest

# scripts/test.sh (the README's test command, CI's) installs the test extra and requires it; elsewhere, e.g. in
# a GPU slot's image, the check is skipped rather than stopping the collection of every other test.
if os.environ.get("FDP_REQUIRE_TEST_EXTRAS") == "1":
    from pyflakes import checker, messages
else:
    checker = pytest.importorskip("pyflakes.checker")
    messages = pytest.importorskip("pyflakes.messages")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UNDEFINED = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


def _undefined(code: str, filename: str) -> list[str]:
    tree = ast.parse(code, filename=filename)
    found = checker.Checker(tree, filename=filename).messages
    return [f"{filename}:{m.lineno}: {m.message % m.message_args}" for m in found if isinstance(m, _UNDEFINED)]


def _python_files() -> list[str]:
    patterns = ["python/fdp/**/*.py", "fdp_kernels/**/*.py", "tests/**/*.py", "scripts/*.py", "benchmarks/**/*.py"]
    return sorted({f for p in patterns for f in glob.glob(os.path.join(ROOT, p), recursive=True)})


def _subprocess_scripts(path: str) -> dict[str, str]:
    """The Python a test file runs in fresh processes: module-level strings of code (a multi-line string that
    imports something, assigned to a name), and the literal bodies given to a ``_run_fresh*`` helper, after
    the file's ``*PRELUDE*`` string as that helper runs them."""
    tree = ast.parse(open(path).read(), filename=path)
    strings = {node.targets[0].id: node.value.value for node in tree.body
               if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
               and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
               and "\n" in node.value.value and "import " in node.value.value}
    prelude = next((code for name, code in strings.items() if "PRELUDE" in name), "")
    scripts = {f"{path}::{name}": textwrap.dedent(code) for name, code in strings.items() if "PRELUDE" not in name}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("_run_fresh")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            scripts[f"{path}::_run_fresh@{node.lineno}"] = prelude + textwrap.dedent(node.args[0].value)
    return scripts


def test_the_check_finds_what_it_looks_for():
    assert _undefined("def f():\n    return y\n", "x.py") == ["x.py:2: undefined name 'y'"]
    assert _undefined("import os\n", "x.py") == []  # an unused import is not its business
    here = _subprocess_scripts(os.path.abspath(__file__))
    assert here == {}, "this file starts no process"


def test_no_name_is_used_undefined_in_the_package_tests_and_scripts():
    bad = [msg for f in _python_files() for msg in _undefined(open(f).read(), os.path.relpath(f, ROOT))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))),
                         ids=lambda p: os.path.basename(p))
def test_no_name_is_used_undefined_in_the_scripts_tests_run_in_fresh_processes(path):
    bad = [msg for name, code in _subprocess_scripts(path).items() for msg in _undefined(code, name)]
    assert not bad, "\n".join(bad)


def test_the_gpu_tests_fresh_process_scripts_are_found():
    """The files known to start GPU processes from strings: the extraction above must see their scripts, or the
    check would pass by finding nothing."""
    for name in ("test_call_path.py", "test_unet_fused.py", "test_fused_mlp.py", "test_call_terms.py",
                 "test_static_call.py"):
        assert _subprocess_scripts(os.path.join(ROOT, "tests", name)), name
