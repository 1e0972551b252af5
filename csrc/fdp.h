// Host-side declarations shared by the CUDA sources and the pybind11 bindings.
#pragma once

#include <string>

namespace fdp {

struct RuntimeInfo {
  int runtime_version;  // CUDART_VERSION the extension was built against, e.g. 13000
  int driver_version;   // 0 when no driver is present
  int device_count;     // 0 when no device is visible
  std::string error;    // why device_count is 0, when it is
};

RuntimeInfo runtime_info();

}  // namespace fdp
