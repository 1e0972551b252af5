// What the CUDA kernels and the Python side agree on: the coefficient table's layout,
// the weight types and the kernels' limits. fdp_kernels/abi.py holds the same facts for
// Python; fdp._C.abi() returns these (bindings.cpp) and tests/test_abi.py compares them.
// Plain C++ (no CUDA), so the bindings and the tests can include it on their own.
#pragma once

namespace fdp {
namespace abi {

// One coefficient row, [kCoefWidth] float32: the scheduler's columns in this order
// (x0 = a_x x + a_m eps; x' = c_x0 x0 + c_x x + c_m eps + sigma z), adds_noise as 0/1, padding.
constexpr const char* kColumns[] = {"a_x", "a_m", "c_x0", "c_x", "c_m", "sigma"};
constexpr int kColAX = 0, kColAM = 1, kColCX0 = 2, kColCX = 3, kColCM = 4, kColSigma = 5;
constexpr int kNumCols = 6;
constexpr int kColAddsNoise = kNumCols;
constexpr int kCoefWidth = 8;
static_assert(sizeof(kColumns) / sizeof(kColumns[0]) == kNumCols, "one name per scheduler column");
static_assert(kColAddsNoise < kCoefWidth, "adds_noise lies inside the row");

// Weight types, by the wtype code that crosses the bindings.
enum WeightType { kF32 = 0, kBF16 = 1, kF16 = 2 };
constexpr const char* kWeightTypes[] = {"float32", "bfloat16", "float16"};

// The router's strategies (fdp.router.STRATEGIES), by the code the per-call kernel takes (call_terms.cuh).
constexpr const char* kStrategies[] = {"soft", "tanh", "hard", "topk", "fixed"};
enum Strategy { kStrategySoft = 0, kStrategyTanh = 1, kStrategyHard = 2, kStrategyTopk = 3, kStrategyFixed = 4 };

// Limits of the fused MLP kernels (shared memory may refuse a model earlier).
constexpr int kMaxK = 8;
constexpr int kMaxL = 16;
constexpr int kMaxH = 4096;
constexpr int kMaxD = 4096;

}  // namespace abi
}  // namespace fdp
