// pybind11 bindings of fdp._C. Tensors never cross this boundary: Python
// validates them and passes raw pointers, sizes and the caller's stream.
// C++ exceptions become Python ones: std::invalid_argument -> ValueError,
// std::runtime_error (every failed CUDA call, with its error string) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "abi.h"
#include "fdp.h"

namespace py = pybind11;

namespace {

// Order of the pointer tuple passed from Python (fdp.backends.cuda_backend.POINTER_ORDER).
constexpr int kNumPointers = 18;
using Pointers = std::array<std::uint64_t, kNumPointers>;
using Dims = std::array<std::int64_t, 6>;     // B, D, H, L, K, T
using Options = std::array<int, 5>;           // block_rows, ranks, groups, mma, skip_unused

fdp::MlpPointers to_pointers(const Pointers& p) {
  fdp::MlpPointers q{};
  q.w_in = p[0]; q.w_a = p[1]; q.w_b = p[2]; q.b_b = p[3]; q.w_out = p[4]; q.b_out = p[5];
  q.t_in = p[6]; q.t_shift = p[7];
  q.weights = p[8]; q.c_in = p[9]; q.scale = p[10]; q.shift = p[11];
  q.coef = p[12]; q.noise = p[13]; q.x_in = p[14]; q.x_out = p[15];
  q.scratch = p[16]; q.counters = p[17];
  return q;
}

fdp::MlpDims to_dims(const Dims& d) { return fdp::MlpDims{d[0], d[1], d[2], d[3], d[4], d[5]}; }

fdp::MlpOptions to_options(const Options& o) {
  fdp::MlpOptions m;
  m.bt = o[0];
  m.ranks = o[1];
  m.groups = o[2];
  m.mma = o[3];
  m.skip_unused = o[4];
  return m;
}

// fdp_kernels.abi.cuda_abi() says what this must return; tests/test_abi.py compares them.
py::dict abi_dict() {
  namespace a = fdp::abi;
  py::dict d;
  d["columns"] = std::vector<std::string>(std::begin(a::kColumns), std::end(a::kColumns));
  d["col_a_x"] = a::kColAX;
  d["col_a_m"] = a::kColAM;
  d["col_c_x0"] = a::kColCX0;
  d["col_c_x"] = a::kColCX;
  d["col_c_m"] = a::kColCM;
  d["col_sigma"] = a::kColSigma;
  d["num_cols"] = a::kNumCols;
  d["col_adds_noise"] = a::kColAddsNoise;
  d["coef_width"] = a::kCoefWidth;
  d["weight_types"] = std::vector<std::string>(std::begin(a::kWeightTypes), std::end(a::kWeightTypes));
  d["max_k"] = a::kMaxK;
  d["max_l"] = a::kMaxL;
  d["max_h"] = a::kMaxH;
  d["max_d"] = a::kMaxD;
  return d;
}

py::dict plan_dict(const fdp::MlpPlanInfo& p) {
  py::dict d;
  d["ok"] = p.ok;
  d["reason"] = p.reason;
  d["block_rows"] = p.block_rows;
  d["mma"] = p.mma;
  d["ranks"] = p.ranks;
  d["groups"] = p.groups;
  d["groups_per_cluster"] = p.groups_per_cluster;
  d["tiles"] = p.tiles;
  d["cluster_size"] = p.cluster_size;
  d["smem_bytes"] = p.smem_bytes;
  d["fixed_bytes"] = p.fixed_bytes;
  d["weight_bytes"] = p.weight_bytes;
  d["resident_bytes"] = p.resident_bytes;
  d["global_combine"] = p.global_combine;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fdp CUDA kernels (raw pointers + stream; validated in Python)";
  m.def("abi", &abi_dict, "The coefficient-table layout, weight types and limits the kernels were built with.");
  m.def("runtime_info", [] {
    fdp::RuntimeInfo info = fdp::runtime_info();
    py::dict d;
    d["runtime_version"] = info.runtime_version;
    d["driver_version"] = info.driver_version;
    d["device_count"] = info.device_count;
    d["error"] = info.error;
    return d;
  }, "CUDA runtime version, driver version and visible device count.");

  m.def("mlp_plan", [](int kind, int wtype, const Dims& dims, const Options& opts) {
    const fdp::MlpDims d = to_dims(dims);
    const fdp::MlpOptions o = to_options(opts);
    return plan_dict(kind == 0 ? fdp::mlp_step_plan(wtype, d, o) : fdp::mlp_persistent_plan(wtype, d, o));
  }, py::arg("kind"), py::arg("wtype"), py::arg("dims"), py::arg("options"),
     "Launch plan of the fused MLP kernel `kind` (0 per-step, 1 persistent) on the current device: "
     "dims (B, D, H, L, K, T), options (block_rows, ranks, groups, mma, skip_unused; 0/-1 = auto).");

  m.def("mlp_step_launch", [](int wtype, const Pointers& ptrs, const Dims& dims, bool clip, double clip_range,
                              int step_begin, int step_end, const Options& opts, std::uint64_t stream) {
    fdp::mlp_step_launch(wtype, to_pointers(ptrs), to_dims(dims), clip, static_cast<float>(clip_range), step_begin,
                         step_end, to_options(opts), static_cast<std::uintptr_t>(stream));
  }, py::arg("wtype"), py::arg("pointers"), py::arg("dims"), py::arg("clip"), py::arg("clip_range"),
     py::arg("step_begin"), py::arg("step_end"), py::arg("options"), py::arg("stream"),
     "One launch of the per-step fused MLP kernel for each step in [step_begin, step_end) on `stream`.");

  m.def("mlp_persistent_launch", [](int wtype, const Pointers& ptrs, const Dims& dims, bool clip, double clip_range,
                                    const Options& opts, std::uint64_t stream) {
    fdp::mlp_persistent_launch(wtype, to_pointers(ptrs), to_dims(dims), clip, static_cast<float>(clip_range),
                               to_options(opts), static_cast<std::uintptr_t>(stream));
  }, py::arg("wtype"), py::arg("pointers"), py::arg("dims"), py::arg("clip"), py::arg("clip_range"),
     py::arg("options"), py::arg("stream"),
     "The persistent fused MLP kernel: all T steps in one launch on `stream`.");
}
