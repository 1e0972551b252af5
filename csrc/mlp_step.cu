// backend="cuda": one kernel launch per denoising step.
//
// Step i, for a tile of rows x of the flattened sample [B, D]:
//   eps = sum_k weights[:, k] * MLP_k(x; t_in[i,k], t_shift[i,k], c_in[:,k], scale[:,k], shift[:,k])
//   x   = apply_step(coef[i], x, eps, noise[i])       (DDPM with clip + noise, DDIM)
// with the packed layout of python/fdp/packing.py (see mlp_common.cuh for the
// exact tensors and the coefficient row [T, 8]).
//
// Decomposition (mlp_common.cuh): grid = (cluster size * tiles, groups / gpc).
// For small batches every component gets its own group of blocks, and on sm_90
// each group is a cluster of R ranks that split the columns of every matmul
// (each rank pushes its columns into the others with st.async and waits on an
// mbarrier for theirs), so batch 1 spreads a step over K * R SMs; the
// groups' partial sums meet in a global scratch buffer and the tile's last
// arriving block applies the scheduler update. Large batches use one group
// per tile (no scratch). Every launch stages its weight slices into shared
// memory with cp.async at start, so all weight loads are in flight at once.
#include "fdp.h"
#include "mlp_common.cuh"

namespace fdp {
namespace mlp {

template <typename W, int BT, bool MMA>
__global__ void __launch_bounds__(kThreads, 1)
    mlp_step_kernel(const Args a, const Plan p, int step_begin, int step_end) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  run_tile<W, BT, MMA, false>(a, p, step_begin, step_end);
#else
  __trap();  // the host refuses devices below compute capability 8.0
#endif
}

struct StepKernels {
  template <typename W, int BT, bool MMA>
  static const void* get() { return reinterpret_cast<const void*>(&mlp_step_kernel<W, BT, MMA>); }
};

const void* step_kernel(int wtype, int mma, int bt) { return kernel_for<StepKernels>(wtype, mma, bt); }

}  // namespace mlp

MlpPlanInfo mlp_step_plan(int wtype, const MlpDims& dims, const MlpOptions& opts) {
  std::string reason;
  const mlp::Plan p = mlp::cached_plan(mlp::kStep, wtype, dims, opts, &mlp::step_kernel, reason);
  return mlp::plan_info(p, reason);
}

void mlp_step_launch(int wtype, const MlpPointers& ptrs, const MlpDims& dims, bool clip, float clip_range,
                     int step_begin, int step_end, const MlpOptions& opts, std::uintptr_t stream) {
  if (step_begin < 0 || step_end > dims.T || step_begin > step_end)
    throw std::invalid_argument("steps [" + std::to_string(step_begin) + ", " + std::to_string(step_end) +
                                ") are not within [0, T = " + std::to_string(dims.T) + "]");
  std::string reason;
  const mlp::Plan p = mlp::cached_plan(mlp::kStep, wtype, dims, opts, &mlp::step_kernel, reason);
  if (p.bt == 0) throw std::invalid_argument("backend 'cuda' cannot serve this model: " + reason);
  if (p.groups != p.gpc && (ptrs.scratch == 0 || ptrs.counters == 0))
    throw std::invalid_argument("this launch combines component groups in global memory: `scratch` [groups, B, D] "
                                "and zeroed `counters` [tiles] are required");
  const mlp::Args a = mlp::make_args(ptrs, dims, clip, clip_range, opts.skip_unused);
  mlp::launch_steps(mlp::kStep, mlp::step_kernel(wtype, p.mma, p.bt), p, a, step_begin, step_end,
                    reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace fdp
