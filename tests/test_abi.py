"""The packed layout's ABI is defined once: fdp_kernels.abi for Python, csrc/abi.h for CUDA, and they agree.

The kernels package is a leaf (it imports nothing of ``fdp``); ``fdp`` takes the
scheduler columns and weight dtypes from it; the C++ constants are compared with
the Python ones both through the built extension (``fdp._C.abi()``) and, where
no extension is built, by compiling ``csrc/abi.h`` on its own.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fdp
from fdp import packing, schedulers
from fdp_kernels import abi

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_do_not_import_fdp():
    pattern = re.compile(r"^\s*(from|import) fdp\b", re.MULTILINE)
    offenders = {p.name: pattern.findall(p.read_text()) for p in (ROOT / "fdp_kernels").glob("*.py")}
    assert len(offenders) >= 6  # the package's modules were read
    assert {name: hits for name, hits in offenders.items() if hits} == {}


def test_fdp_takes_the_layout_from_the_abi():
    assert packing.WEIGHT_DTYPES is abi.WEIGHT_DTYPES
    for name in abi.COEF_COLUMNS:
        col = f"COL_{name.upper()}"
        assert getattr(schedulers, col) == getattr(abi, col)
    assert schedulers.NUM_COLS == abi.NUM_COLS == len(abi.COEF_COLUMNS)
    assert sorted(getattr(abi, f"COL_{n.upper()}") for n in abi.COEF_COLUMNS) == list(range(abi.NUM_COLS))
    table = schedulers.DDIMScheduler(num_train_timesteps=10).step_table(2)
    assert tuple(table.coef.shape) == (2, abi.NUM_COLS)
    assert abi.NUM_COLS <= abi.CUDA_COL_ADDS_NOISE < abi.CUDA_COEF_WIDTH


_PRINT_ABI = r"""
#include <cstdio>
#include "abi.h"
int main() {
  namespace a = fdp::abi;
  std::printf("{\"columns\": [");
  for (int i = 0; i < a::kNumCols; ++i) std::printf("%s\"%s\"", i ? ", " : "", a::kColumns[i]);
  std::printf("], \"weight_types\": [");
  for (int i = 0; i <= a::kF16; ++i) std::printf("%s\"%s\"", i ? ", " : "", a::kWeightTypes[i]);
  std::printf("], \"strategies\": [");
  for (int i = 0; i <= a::kStrategyFixed; ++i) std::printf("%s\"%s\"", i ? ", " : "", a::kStrategies[i]);
  std::printf("], \"col_a_x\": %d, \"col_a_m\": %d, \"col_c_x0\": %d, \"col_c_x\": %d, \"col_c_m\": %d, "
              "\"col_sigma\": %d, \"num_cols\": %d, \"col_adds_noise\": %d, \"coef_width\": %d, "
              "\"max_k\": %d, \"max_l\": %d, \"max_h\": %d, \"max_d\": %d}\n",
              a::kColAX, a::kColAM, a::kColCX0, a::kColCX, a::kColCM, a::kColSigma, a::kNumCols,
              a::kColAddsNoise, a::kCoefWidth, a::kMaxK, a::kMaxL, a::kMaxH, a::kMaxD);
}
"""


def test_cuda_header_agrees(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to compile csrc/abi.h")
    src = tmp_path / "print_abi.cpp"
    src.write_text(_PRINT_ABI)
    exe = tmp_path / "print_abi"
    subprocess.run([cxx, "-std=c++17", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == abi.cuda_abi()


def test_built_extension_agrees():
    if not fdp.extension_status()["available"]:
        pytest.skip("the CUDA extension is not built")
    from fdp._extension import extension

    ext = extension()
    assert hasattr(ext, "abi"), "the built fdp._C predates csrc/abi.h: rebuild the extension (pip install -e .)"
    assert dict(ext.abi()) == abi.cuda_abi()
