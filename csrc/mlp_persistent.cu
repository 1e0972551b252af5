// backend="cuda-persistent": the whole sampling loop (all T steps) in one launch.
//
// For every step i and a tile of rows x of the flattened sample [B, D]:
//   eps = sum_k weights[:, k] * MLP_k(x; t_in[i,k], t_shift[i,k], c_in[:,k], scale[:,k], shift[:,k])
//   x   = apply_step(coef[i], x, eps, noise[i])
// on the packed layout of python/fdp/packing.py (tensors listed in mlp_common.cuh).
//
// One thread-block cluster per row tile (sm_90): K component groups x R column
// ranks, K * R <= 16 blocks. Each block loads its slices of the weights into
// shared memory once and reuses them for all T steps (slices that do not fit
// are read from L2 each step); each rank pushes its columns of the hidden
// activations into the other ranks of its component with st.async, and every
// block pushes its weighted partial of each step into all blocks of the cluster,
// which each keep an identical copy of x; receivers wait on mbarriers counting
// the bytes: two cluster barriers per launch (after the mbarriers are set up,
// and before exit), none per phase, no grid-wide synchronisation. Without clusters
// (sm_80/86/87/89) one block per row tile runs all K components.
// The next step's step-dependent vectors and noise are prefetched with
// cp.async while the current step computes.
#include "fdp.h"
#include "mlp_common.cuh"

namespace fdp {
namespace mlp {

template <typename W, int BT, bool MMA>
__global__ void __launch_bounds__(kThreads, 1)
    mlp_persistent_kernel(const Args a, const Plan p, int step_begin, int step_end) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  run_tile<W, BT, MMA, true>(a, p, step_begin, step_end);
#else
  __trap();  // the host refuses devices below compute capability 8.0
#endif
}

struct PersistentKernels {
  template <typename W, int BT, bool MMA>
  static const void* get() { return reinterpret_cast<const void*>(&mlp_persistent_kernel<W, BT, MMA>); }
};

const void* persistent_kernel(int wtype, int mma, int bt) { return kernel_for<PersistentKernels>(wtype, mma, bt); }

}  // namespace mlp

MlpPlanInfo mlp_persistent_plan(int wtype, const MlpDims& dims, const MlpOptions& opts) {
  std::string reason;
  const mlp::Plan p = mlp::cached_plan(mlp::kPersistent, wtype, dims, opts, &mlp::persistent_kernel, reason);
  return mlp::plan_info(p, reason);
}

void mlp_persistent_launch(int wtype, const MlpPointers& ptrs, const MlpDims& dims, bool clip, float clip_range,
                           const MlpOptions& opts, std::uintptr_t stream) {
  std::string reason;
  const mlp::Plan p = mlp::cached_plan(mlp::kPersistent, wtype, dims, opts, &mlp::persistent_kernel, reason);
  if (p.bt == 0) throw std::invalid_argument("backend 'cuda-persistent' cannot serve this model: " + reason);
  const mlp::Args a = mlp::make_args(ptrs, dims, clip, clip_range, opts.skip_unused);
  mlp::launch_steps(mlp::kPersistent, mlp::persistent_kernel(wtype, p.mma, p.bt), p, a, 0, static_cast<int>(dims.T),
                    reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace fdp
