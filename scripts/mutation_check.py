#!/usr/bin/env python
"""Mutation check of fdp's core modules: do the tests fail when a module's behaviour breaks?

For each module, every mutation site is listed (simple AST mutations, below); ``--n`` of them are drawn
with ``--seed`` and applied one at a time to a temporary copy of ``python/`` (the worktree is never
touched), and the module's test files run against the copy with ``pytest -x``. A mutant is *killed* when
the tests fail (or time out: ``--timeout``, default 4x the unmutated run), *survives* when they pass.

Mutations (one per mutant):

- ``compare``: a comparison operator flipped (``<`` <-> ``>=``, ``>`` <-> ``<=``, ``==`` <-> ``!=``,
  ``is`` <-> ``is not``, ``in`` <-> ``not in``);
- ``drop-cond``: one operand of an ``and`` / ``or`` dropped;
- ``negate``: an ``if`` / ``while`` / ternary condition negated, or a ``not`` removed;
- ``constant``: a number changed (``n`` -> ``n + 1``, ``x`` -> ``2 x``, ``0`` <-> ``1``), ``True`` <-> ``False``,
  ``None`` -> ``0``; argument defaults included. Strings are left alone (messages, names);
- ``dict-key``: one entry removed from a dict literal;
- ``arith``: ``+`` <-> ``-``, ``*`` <-> ``/``.

Docstrings, annotations, ``__all__``, logging calls and ``raise`` statements' arguments are not mutated (messages are
tested by the error tests; a changed message is no behaviour change). Equivalent mutants exist (e.g. a
bound that no input reaches): a survivor is a lead to read, not always a missing test.

Each run is a fork of this process, which has imported torch and pytest once (not fdp), so that a
mutant costs its tests, not an interpreter start; ``FDP_MUTATION_SUBPROCESS=1`` runs each in a fresh
interpreter instead.

Usage (from the repository root, the shared venv):

    python scripts/mutation_check.py                         # every module, 12 mutants each, seed 0
    python scripts/mutation_check.py --modules router policy --n 20 --seed 3
    python scripts/mutation_check.py --list router           # the sites, without running anything

The score per module is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module name -> (source file, the test files (or pytest node ids) that hold it to its behaviour).
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "schedulers": ("python/fdp/schedulers.py", ("tests/test_schedulers.py",)),
    "router": ("python/fdp/router.py", ("tests/test_router.py", "tests/test_behaviour.py")),
    "policy": ("python/fdp/policy.py", ("tests/test_policy.py", "tests/test_behaviour.py")),
    "_watch": ("python/fdp/_watch.py", ("tests/test_behaviour.py",
                                        "tests/test_reliability.py::test_policy_watch_sees_what_bypasses_the_hooks",
                                        "tests/test_reliability.py::test_policy_watch_with_inference_tensors",
                                        "tests/test_reliability.py::test_freshness_check_reads_nothing_and_repacks_only_on_change",
                                        "tests/test_reliability.py::test_sampler_follows_the_policy_after_packing")),
    "selection": ("python/fdp/backends/selection.py", ("tests/test_selection.py", "tests/test_cache_safety.py",
                                                        "tests/test_isolation.py", "tests/test_behaviour.py")),
    "packing": ("python/fdp/packing.py", ("tests/test_packing.py", "tests/test_precision.py",
                                          *(f"tests/test_call_terms.py::{t}" for t in (
                                              "test_reference_is_the_policy", "test_pack_layout",
                                              "test_ties_go_to_the_lowest_index", "test_nan_feature_row",
                                              "test_non_finite_logit")))),
    "sampler": ("python/fdp/sampler.py", ("tests/test_sampler.py", "tests/test_inpainting.py", "tests/test_behaviour.py")),
    "static_call": ("python/fdp/static_call.py", ("tests/test_static_call.py",)),
}

_COMPARE_FLIP = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_ARITH_FLIP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass(frozen=True)
class Site:
    """One mutation: the ``index``-th node (in ``ast.walk`` order) gets mutation ``kind`` variant ``variant``."""

    kind: str
    index: int
    variant: int
    line: int
    what: str

    def describe(self) -> str:
        return f"line {self.line}: {self.kind}: {self.what}"


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes not to mutate: docstrings, annotations, __all__, logging calls, raise arguments."""
    skip: set[int] = set()

    def drop(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            drop(node.returns)  # annotations are not evaluated (from __future__ import annotations)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                drop(body[0])
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            drop(node)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            drop(node.exc)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            drop(node.annotation)
        elif isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logging", "warnings"):
            drop(node)
    return skip


def _constant_variants(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if value is None:
        return [0]
    if isinstance(value, int):
        return [value + 1] if value not in (0, 1) else [1 - value]
    if isinstance(value, float):
        return [value * 2 if value else 1.0]
    return []


def sites(source: str) -> list[Site]:
    """Every mutation site of ``source``."""
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in _COMPARE_FLIP:
                    out.append(Site("compare", i, j, line, f"{type(op).__name__} -> {_COMPARE_FLIP[type(op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            for j in range(len(node.values)):
                out.append(Site("drop-cond", i, j, line, f"drop operand {j + 1} of {type(node.op).__name__}"))
        elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
            out.append(Site("negate", i, 0, line, f"negate the {type(node).__name__} condition"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append(Site("negate", i, 0, line, "remove a `not`"))
        elif isinstance(node, ast.Constant):
            for j, v in enumerate(_constant_variants(node.value)):
                out.append(Site("constant", i, j, line, f"{node.value!r} -> {v!r}"))
        elif isinstance(node, ast.Dict):
            for j, k in enumerate(node.keys):
                if k is not None:
                    out.append(Site("dict-key", i, j, line, f"remove key {ast.unparse(k)}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH_FLIP:
            out.append(Site("arith", i, 0, line, f"{type(node.op).__name__} -> {_ARITH_FLIP[type(node.op)].__name__}"))
    return out


def mutate(source: str, site: Site) -> str:
    """``source`` with ``site`` applied (as ``ast.unparse`` writes it)."""
    tree = ast.parse(source)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == site.index)
    if site.kind == "compare":
        node.ops[site.variant] = _COMPARE_FLIP[type(node.ops[site.variant])]()
    elif site.kind == "drop-cond":
        rest = [v for j, v in enumerate(node.values) if j != site.variant]
        if len(rest) == 1:
            _replace(tree, node, rest[0])
        else:
            node.values = rest
    elif site.kind == "negate":
        if isinstance(node, ast.UnaryOp):
            _replace(tree, node, node.operand)
        else:
            node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif site.kind == "constant":
        node.value = _constant_variants(node.value)[site.variant]
    elif site.kind == "dict-key":
        del node.keys[site.variant]
        del node.values[site.variant]
    elif site.kind == "arith":
        node.op = _ARITH_FLIP[type(node.op)]()
    else:
        raise ValueError(f"unknown mutation kind {site.kind!r}")
    return ast.unparse(ast.fix_missing_locations(tree))


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for k, item in enumerate(value):
                    if item is old:
                        value[k] = new
                        return
    raise LookupError("node not found")


def _run_tests(python_dir: Path, tests: tuple[str, ...], timeout: float | None) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout', seconds) of the test files against the package in ``python_dir``."""
    if hasattr(os, "fork") and not os.environ.get("FDP_MUTATION_SUBPROCESS"):
        return _run_tests_forked(python_dir, tests, timeout)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(python_dir), str(ROOT)]),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    # 0: all passed; 5: nothing collected (a module that fails to import fails collection: 2).
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - start


def _preload() -> None:
    """Import what every test run imports, except fdp, once in this process: each mutant's run is a fork of
    it (on a busy machine importing torch is most of a killed mutant's time)."""
    import pytest  # noqa: F401
    import torch  # noqa: F401


def _run_tests_forked(python_dir: Path, tests: tuple[str, ...], timeout: float | None) -> tuple[str, float]:
    _preload()
    if any(m == "fdp" or m.startswith("fdp.") or m == "fdp_kernels" or m.startswith("fdp_kernels.")
           for m in sys.modules):
        raise RuntimeError("fdp was imported in the parent: the forked runs would test it, not the mutant")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the mutant's package first on the path, pytest in-process, exit with its status
        code = 3
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(ROOT)
            sys.path[:0] = [str(python_dir), str(ROOT)]
            sys.dont_write_bytecode = True
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("passed" if code == 0 else "failed"), time.monotonic() - start
        if timeout is not None and time.monotonic() - start > timeout:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.1)


def check_module(name: str, n: int, seed: int, timeout_factor: float, out=sys.stdout) -> dict:
    rel, tests = MODULES[name]
    source = (ROOT / rel).read_text()
    all_sites = sites(source)
    chosen = random.Random(f"{seed}:{name}").sample(all_sites, min(n, len(all_sites)))
    with tempfile.TemporaryDirectory(prefix="fdp-mutants-") as tmp:
        python_dir = Path(tmp) / "python"
        shutil.copytree(ROOT / "python", python_dir, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        target = python_dir / Path(rel).relative_to("python")
        # The unmutated module as ast.unparse writes it must pass: else every mutant would look killed.
        target.write_text(ast.unparse(ast.parse(source)))
        status, base_s = _run_tests(python_dir, tests, None)
        if status != "passed":
            raise SystemExit(f"{name}: the tests fail on the unmutated module ({' '.join(tests)}); fix that first")
        timeout = max(60.0, timeout_factor * base_s)
        killed, survivors = 0, []
        for k, site in enumerate(chosen, 1):
            mutated = mutate(source, site)
            try:
                compile(mutated, rel, "exec")
            except SyntaxError:
                continue
            target.write_text(mutated)
            status, secs = _run_tests(python_dir, tests, timeout)
            if status == "passed":
                survivors.append(site)
            else:
                killed += 1
            print(f"  {name} {k}/{len(chosen)} {'SURVIVED' if status == 'passed' else status:8} "
                  f"{secs:5.1f}s  {site.describe()}", file=out, flush=True)
    total = killed + len(survivors)
    return {"module": name, "sites": len(all_sites), "mutants": total, "killed": killed,
            "score": killed / total if total else 1.0, "survivors": [s.describe() for s in survivors],
            "baseline_s": base_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES))
    ap.add_argument("--n", type=int, default=12, help="mutants drawn per module (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-factor", type=float, default=4.0,
                    help="a mutant's tests time out (killed) after this many times the unmutated run")
    ap.add_argument("--min-score", type=float, default=None,
                    help="exit with status 1 if a module's score is below this (e.g. 0.9)")
    ap.add_argument("--list", metavar="MODULE", choices=list(MODULES), help="print the module's sites and exit")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    if args.list:
        for site in sites((ROOT / MODULES[args.list][0]).read_text()):
            print(site.describe())
        return 0
    results = [check_module(m, args.n, args.seed, args.timeout_factor) for m in args.modules]
    print(f"\n| module | sites | mutants | killed | score | survivors |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['module']} | {r['sites']} | {r['mutants']} | {r['killed']} | {100 * r['score']:.0f} % | "
              f"{'; '.join(r['survivors']) or '-'} |")
    if args.min_score is not None and any(r["score"] < args.min_score for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
