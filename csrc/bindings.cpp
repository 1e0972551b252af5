// pybind11 bindings of fdp._C. Tensors never cross this boundary: Python
// validates them and passes raw pointers, sizes and the caller's stream.
#include <pybind11/pybind11.h>

#include "fdp.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fdp CUDA kernels (raw pointers + stream; validated in Python)";
  m.def("runtime_info", [] {
    fdp::RuntimeInfo info = fdp::runtime_info();
    py::dict d;
    d["runtime_version"] = info.runtime_version;
    d["driver_version"] = info.driver_version;
    d["device_count"] = info.device_count;
    d["error"] = info.error;
    return d;
  }, "CUDA runtime version, driver version and visible device count.");
}
