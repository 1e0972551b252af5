// pybind11 bindings of fdp._C. Tensors never cross this boundary: Python
// validates them and passes raw pointers, sizes and the caller's stream, each
// set by name on MlpPointers / MlpDims / MlpOptions (no positional lists).
// C++ exceptions become Python ones: std::invalid_argument -> ValueError,
// std::runtime_error (every failed CUDA call, with its error string) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "abi.h"
#include "fdp.h"

namespace py = pybind11;

// Set by csrc/CMakeLists.txt for plain architecture lists ("80,86,90" and "90"); empty: not known.
#ifndef FDP_SASS_ARCHS
#define FDP_SASS_ARCHS ""
#endif
#ifndef FDP_PTX_ARCHS
#define FDP_PTX_ARCHS ""
#endif

namespace {

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
  d["strategies"] = std::vector<std::string>(std::begin(a::kStrategies), std::end(a::kStrategies));
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
    d["sass_archs"] = std::string(FDP_SASS_ARCHS);
    d["ptx_archs"] = std::string(FDP_PTX_ARCHS);
    return d;
  }, "CUDA runtime version, driver version, visible device count and the architectures built for.");

  py::class_<fdp::MlpPointers> pointers(m, "MlpPointers", "Device pointers of one launch, set by name (0: none).");
  pointers.def(py::init<>());
#define FDP_BIND(name) pointers.def_readwrite(#name, &fdp::MlpPointers::name);
  FDP_MLP_POINTERS(FDP_BIND)
#undef FDP_BIND
  py::class_<fdp::MlpDims> dims(m, "MlpDims", "Sizes of one launch: B, D, H, L, K, T.");
  dims.def(py::init<>());
#define FDP_BIND(name) dims.def_readwrite(#name, &fdp::MlpDims::name);
  FDP_MLP_DIMS(FDP_BIND)
#undef FDP_BIND
  py::class_<fdp::MlpOptions>(m, "MlpOptions", "Kernel options; each field's default is automatic.")
      .def(py::init<>())
      .def_readwrite("block_rows", &fdp::MlpOptions::bt)
      .def_readwrite("ranks", &fdp::MlpOptions::ranks)
      .def_readwrite("groups", &fdp::MlpOptions::groups)
      .def_readwrite("mma", &fdp::MlpOptions::mma)
      .def_readwrite("skip_unused", &fdp::MlpOptions::skip_unused);

  m.def("mlp_plan", [](int kind, int wtype, const fdp::MlpDims& d, const fdp::MlpOptions& o) {
    return plan_dict(kind == 0 ? fdp::mlp_step_plan(wtype, d, o) : fdp::mlp_persistent_plan(wtype, d, o));
  }, py::arg("kind"), py::arg("wtype"), py::arg("dims"), py::arg("options"),
     "Launch plan of the fused MLP kernel `kind` (0 per-step, 1 persistent) on the current device.");

  m.def("mlp_step_launch", [](int wtype, const fdp::MlpPointers& ptrs, const fdp::MlpDims& dims, bool clip,
                              double clip_range, int step_begin, int step_end, const fdp::MlpOptions& opts,
                              std::uint64_t stream) {
    fdp::mlp_step_launch(wtype, ptrs, dims, clip, static_cast<float>(clip_range), step_begin, step_end, opts,
                         static_cast<std::uintptr_t>(stream));
  }, py::arg("wtype"), py::arg("pointers"), py::arg("dims"), py::arg("clip"), py::arg("clip_range"),
     py::arg("step_begin"), py::arg("step_end"), py::arg("options"), py::arg("stream"),
     "One launch of the per-step fused MLP kernel for each step in [step_begin, step_end) on `stream`.");

  py::class_<fdp::CallPointers> call_pointers(m, "CallPointers",
                                              "Device pointers of one per-call terms launch, set by name.");
  call_pointers.def(py::init<>());
#define FDP_BIND(name) call_pointers.def_readwrite(#name, &fdp::CallPointers::name);
  FDP_CALL_POINTERS(FDP_BIND)
#undef FDP_BIND
  py::class_<fdp::CallDims> call_dims(m, "CallDims", "Sizes and routing settings of one per-call terms launch.");
  call_dims.def(py::init<>());
#define FDP_BIND(name) call_dims.def_readwrite(#name, &fdp::CallDims::name);
  FDP_CALL_DIMS(FDP_BIND)
#undef FDP_BIND
  m.def("call_terms_launch", [](const fdp::CallPointers& ptrs, const fdp::CallDims& dims, std::uint64_t stream) {
    fdp::call_terms_launch(ptrs, dims, static_cast<std::uintptr_t>(stream));
  }, py::arg("pointers"), py::arg("dims"), py::arg("stream"),
     "One launch of the per-call terms kernel (router weights and conditioning terms) on `stream`.");

  m.def("mlp_persistent_launch", [](int wtype, const fdp::MlpPointers& ptrs, const fdp::MlpDims& dims, bool clip,
                                    double clip_range, const fdp::MlpOptions& opts, std::uint64_t stream) {
    fdp::mlp_persistent_launch(wtype, ptrs, dims, clip, static_cast<float>(clip_range), opts,
                               static_cast<std::uintptr_t>(stream));
  }, py::arg("wtype"), py::arg("pointers"), py::arg("dims"), py::arg("clip"), py::arg("clip_range"),
     py::arg("options"), py::arg("stream"),
     "The persistent fused MLP kernel: all T steps in one launch on `stream`.");
}
