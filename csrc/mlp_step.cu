// backend="cuda": one kernel launch per denoising step.
//
// Step i, for a tile of rows x of the flattened sample [B, D]:
//   eps = sum_k weights[:, k] * MLP_k(x; t_in[i,k], t_shift[i,k], c_in[:,k], scale[:,k], shift[:,k])
//   x   = apply_step(coef[i], x, eps, noise[i])       (DDPM with clip + noise, DDIM)
// with the packed layout of python/fdp/packing.py (see mlp_common.cuh for the
// exact tensors and the coefficient row [T, 8]).
//
// Decomposition (mlp_common.cuh, planner in mlp_host.cuh): grid = (cluster size *
// tiles, groups / gpc). For small batches every component gets its own group of
// blocks, and on sm_90 R column ranks per component split the columns of every
// matmul (each rank pushes its columns into the others with st.async and waits
// on an mbarrier for theirs: no cluster barrier per phase). Where it pays, one
// cluster per tile holds all K groups (K x R <= 16 blocks; at K = 4, H = 256, batch 1 one 16-block
// cluster), every block pushes its weighted partial into all blocks of the
// cluster and each combines them from its own shared memory; else
// (GPUs without clusters, or blocks that would read too many of their weights
// from L2, or an explicit `groups`) each group is its own cluster, the partials
// meet in a global scratch buffer and the tile's last arriving block applies the
// scheduler update. Large batches use one group per tile (no combine).
//
// Every launch stages its weight slices into shared memory with cp.async at
// start (those that do not fit are read from L2 in the matmul). On sm_90 the
// launches after the first are programmatic dependent launches: a block stages
// everything that was written before the call (weights, step vectors, per-call
// terms), waits (griddepcontrol.wait) for the previous step's grid, lets the
// next step's grid start, then reads x, so step i+1 can stage its weights on free
// SMs while step i computes (launch_steps in mlp_host.cuh says why this is safe).
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
