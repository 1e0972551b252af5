"""What the host side (``fdp``) and the fused kernels agree on: weight dtypes, the scheduler table's columns, limits.

This module is the one definition on the Python side: ``fdp.packing``,
``fdp.schedulers`` and the backends import these names, and the Triton kernels
read them as compile-time constants. The CUDA kernels hold the same facts in
``csrc/abi.h``; the extension returns them from ``fdp._C.abi()`` and
:func:`cuda_abi` says what that must equal (tests/test_abi.py compares both,
and compiles ``csrc/abi.h`` on its own where no extension is built).

It imports only torch, so that ``fdp`` can import it without the kernels.
"""

from __future__ import annotations

import torch

#: Weight dtypes of a pack; a weight's position here is its ``wtype`` code in the CUDA extension.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The router's strategies (fdp.router.STRATEGIES); a strategy's position here is the code the kernels that
#: compute the per-call terms take (fdp.packing.PackedCond.strategy).
ROUTER_STRATEGIES = ("soft", "tanh", "hard", "topk", "fixed")
STRATEGY_SOFT, STRATEGY_TANH, STRATEGY_HARD, STRATEGY_TOPK, STRATEGY_FIXED = range(len(ROUTER_STRATEGIES))

#: Columns of one scheduler-table row (``fdp.schedulers.StepTable.coef``), in order:
#: ``x0 = a_x x + a_m eps``, ``x' = c_x0 x0 + c_x x + c_m eps + sigma z``.
COEF_COLUMNS = ("a_x", "a_m", "c_x0", "c_x", "c_m", "sigma")
COL_A_X, COL_A_M, COL_C_X0, COL_C_X, COL_C_M, COL_SIGMA = range(len(COEF_COLUMNS))
NUM_COLS = len(COEF_COLUMNS)

#: The CUDA kernels read one ``[T, CUDA_COEF_WIDTH]`` float32 table: the NUM_COLS scheduler columns, then
#: ``adds_noise`` as 0/1 in column CUDA_COL_ADDS_NOISE, then zero padding (32-byte rows).
CUDA_COL_ADDS_NOISE = NUM_COLS
CUDA_COEF_WIDTH = 8

#: Limits of the Triton kernels (fdp_kernels.mlp_common): components, hidden width, D = horizon * action_dim.
TRITON_MAX_K = 8
TRITON_MIN_H = 16
TRITON_MAX_H = 512
TRITON_MAX_D = 512

#: Limits of the CUDA kernels (csrc/abi.h); shared memory may refuse a model earlier.
CUDA_MAX_K = 8
CUDA_MAX_L = 16
CUDA_MAX_H = 4096
CUDA_MAX_D = 4096


def cuda_abi() -> dict:
    """What ``fdp._C.abi()`` returns when the extension was built from sources that agree with this module."""
    return dict(
        columns=list(COEF_COLUMNS),
        col_a_x=COL_A_X, col_a_m=COL_A_M, col_c_x0=COL_C_X0, col_c_x=COL_C_X, col_c_m=COL_C_M,
        col_sigma=COL_SIGMA, num_cols=NUM_COLS, col_adds_noise=CUDA_COL_ADDS_NOISE, coef_width=CUDA_COEF_WIDTH,
        weight_types=[str(dt).removeprefix("torch.") for dt in WEIGHT_DTYPES],
        max_k=CUDA_MAX_K, max_l=CUDA_MAX_L, max_h=CUDA_MAX_H, max_d=CUDA_MAX_D,
        strategies=list(ROUTER_STRATEGIES),
    )
