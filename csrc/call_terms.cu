// The per-call terms kernel (body: call_terms.cuh) and its launcher.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "call_terms.cuh"
#include "fdp.h"

namespace fdp {
namespace call {

struct DeviceEach {
  template <class F>
  __device__ void operator()(const F& f) const {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};

__global__ void __launch_bounds__(kThreads) call_terms_kernel(const Args a) {
  __shared__ float sm[kThreads * abi::kMaxK];
  call_terms_block(a, blockIdx.x, blockIdx.y, sm, DeviceEach{});
}

}  // namespace call

void call_terms_launch(const CallPointers& p, const CallDims& d, std::uintptr_t stream) {
  if (d.K < 1 || d.K > abi::kMaxK) throw std::invalid_argument("call_terms: K must be in 1..8");
  if (d.strategy < abi::kStrategySoft || d.strategy > abi::kStrategyFixed)
    throw std::invalid_argument("call_terms: unknown strategy code " + std::to_string(d.strategy));
  const auto f = [](std::uintptr_t v) { return reinterpret_cast<const float*>(v); };
  const call::Args a{f(p.global_cond), f(p.router_w1), f(p.router_b1), f(p.router_w2), f(p.router_b2),
                     f(p.fixed), f(p.cond_w), f(p.cond_b), reinterpret_cast<float*>(p.out),
                     d.B, d.Dc, d.Dk, d.Hr, d.K, d.L, d.H, static_cast<int>(d.strategy), static_cast<int>(d.topk)};
  const dim3 grid(static_cast<unsigned>(call::col_blocks(a) + 1),
                  static_cast<unsigned>((d.B + call::kRows - 1) / call::kRows));
  call::call_terms_kernel<<<grid, call::kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("call_terms launch: ") + cudaGetErrorString(err));
}

}  // namespace fdp
