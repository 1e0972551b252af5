// Runtime facts the Python side reports (fdp.extension_status()).
#include "fdp.h"

#include <cuda_runtime.h>

namespace fdp {

RuntimeInfo runtime_info() {
  RuntimeInfo info{};
  cudaRuntimeGetVersion(&info.runtime_version);
  // No driver, or no device, is a normal answer on a CPU machine, not an error.
  cudaError_t drv = cudaDriverGetVersion(&info.driver_version);
  cudaError_t cnt = cudaGetDeviceCount(&info.device_count);
  if (drv != cudaSuccess || cnt != cudaSuccess) {
    info.device_count = 0;
    info.error = cudaGetErrorString(cnt != cudaSuccess ? cnt : drv);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  }
  return info;
}

}  // namespace fdp
