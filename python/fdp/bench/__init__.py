"""``fdp bench``: every sampler path side by side, on the same policy, in one run.

Paths: the eager loop (``eager``, the library's ``torch`` backend), the
components batched over stacked weights (``batched``), ``torch.compile`` of
the batched path (``compile-reduce-overhead``, ``compile-max-autotune``), a
CUDA graph of it (``cuda-graph``) and every library backend in the registry
(``fdp.available_backends``). Each is checked once against the eager result,
then timed (GPU time with CUDA events, wall time with ``perf_counter``), and
set against the roofline floor of its case. Results go to a JSON file with
plots beside it; benchmarks/README.md explains how to read them.

Modules: :mod:`.cases` (the grid), :mod:`.paths` (the native paths),
:mod:`.timing`, :mod:`.roofline` (bytes/FLOPs formulas and the device
rates), :mod:`.report` (JSON, table, plots), :mod:`.runner` (one run).
"""

from .runner import TOLERANCE, Options, run, run_and_report

__all__ = ["Options", "run", "run_and_report", "TOLERANCE"]
