"""scripts/mutation_check.py keeps working: its mutations, and a tiny run (2 mutants of one module)."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mutation_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


SOURCE = '''
"""Docstring: not mutated."""
__all__ = ["f"]


def f(x, y=2, flag=True):
    """Not mutated either."""
    if x < y and flag:
        raise ValueError("message " + str(x))
    d = {"a": 1, "b": x * y}
    return d if not flag else x - y
'''


def _behaviour(src):
    ns = {}
    exec(compile(src, "m", "exec"), ns)
    out = []
    for args in ((1,), (3,), (1, 2, False), (5, 1, False)):
        try:
            out.append(ns["f"](*args))
        except ValueError:
            out.append("raise")
    return out


def test_every_site_gives_a_different_valid_program():
    mc = _load()
    sites = mc.sites(SOURCE)
    kinds = {s.kind for s in sites}
    assert kinds == {"compare", "drop-cond", "negate", "constant", "dict-key", "arith"}
    base = _behaviour(SOURCE)
    assert _behaviour(ast.unparse(ast.parse(SOURCE))) == base
    changed = 0
    for site in sites:
        mutated = mc.mutate(SOURCE, site)
        assert mutated != ast.unparse(ast.parse(SOURCE)), site
        assert '"""Docstring: not mutated."""' in mutated.replace("'", '"') or "Docstring: not mutated." in mutated
        assert "message " in mutated and "__all__ = ['f']" in mutated
        changed += _behaviour(mutated) != base
    # Most mutants change what f does on these inputs (some, like the dict's value, are not observed here).
    assert changed >= len(sites) // 2


def test_sites_skip_messages_docstrings_annotations_and_logging():
    mc = _load()
    src = ('import logging\nlog = logging.getLogger()\ndef g(x: int | None = None) -> int | None:\n    """Doc."""\n'
           '    log.info("x %d", 1)\n    y: int | None = x\n    raise ValueError(y == 1)\n')
    assert [s.what for s in mc.sites(src)] == ["None -> 0"]  # the default only


def test_the_modules_listed_exist_with_their_tests():
    mc = _load()
    for name, (source, tests) in mc.MODULES.items():
        assert (ROOT / source).is_file(), name
        assert all((ROOT / t.split("::")[0]).is_file() for t in tests), name
        assert mc.sites((ROOT / source).read_text()), name


def test_tiny_run():
    """Two mutants of the router, end to end (the CI's check that the script runs)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--modules", "router", "--n", "2", "--seed", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith("| router |")]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert int(cells[2]) == 2 and 0 <= int(cells[3]) <= 2
