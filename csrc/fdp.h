// Host-side declarations shared by the CUDA sources and the pybind11 bindings.
#pragma once

#include <cstdint>
#include <string>

namespace fdp {

struct RuntimeInfo {
  int runtime_version;  // CUDART_VERSION the extension was built against, e.g. 13000
  int driver_version;   // 0 when no driver is present
  int device_count;     // 0 when no device is visible
  std::string error;    // why device_count is 0, when it is
};

RuntimeInfo runtime_info();

// ---- Fused MLP sampler kernels (csrc/mlp_step.cu, csrc/mlp_persistent.cu) ----
// Tensors are validated in Python (fdp.backends.cuda_backend.check_launch); only
// raw device pointers, sizes and the caller's stream cross this boundary.

// The launch's fields, each list written once: the structs below and their pybind11 bindings
// (fdp._C.MlpPointers / MlpDims, set by name from Python) expand it.
#define FDP_MLP_POINTERS(X)                                                                        \
  X(w_in) X(w_a) X(w_b) X(b_b) X(w_out) X(b_out) /* packed weights (fdp.packing.PackedMLP) */     \
  X(t_in) X(t_shift)                             /* StepTerms */                                   \
  X(weights) X(c_in) X(scale) X(shift)           /* CallTerms */                                   \
  X(coef)                    /* [T, abi::kCoefWidth] float32 (abi.h) */                             \
  X(noise)                   /* [T, B, D] float32, or 0 when no step adds noise */                  \
  X(x_in) X(x_out)           /* [B, D] float32 (may alias) */                                       \
  X(scratch) X(counters)     /* global combine only: [groups, B, D] f32, [tiles] i32 zeroed */     \
  X(known) X(known_mask)     /* inpainting, both or neither: [B, D] or [known_steps, B, D] f32, [B, D] u8 */
// known_steps: 0 when `known` is [B, D] (the same replacement after every step), else T (one slice per step).
#define FDP_MLP_DIMS(X) X(B) X(D) X(H) X(L) X(K) X(T) X(known_steps)

struct MlpPointers {
#define FDP_POINTER_FIELD(name) std::uintptr_t name = 0;
  FDP_MLP_POINTERS(FDP_POINTER_FIELD)
#undef FDP_POINTER_FIELD
};

struct MlpDims {
#define FDP_DIM_FIELD(name) std::int64_t name = 0;
  FDP_MLP_DIMS(FDP_DIM_FIELD)
#undef FDP_DIM_FIELD
};

// 0 = automatic for every field (mma: -1 = automatic).
struct MlpOptions {
  int bt = 0;      // rows per tile: 1, 2, 4, 8 (FMA) or 16, 32, 64 (MMA)
  int ranks = 0;   // column slices per component (cluster ranks; >1 needs sm_90)
  int groups = 0;  // component groups per tile
  int mma = -1;    // tensor cores (16-bit weights only)
  int skip_unused = 1;
};

struct MlpPlanInfo {
  bool ok = false;
  std::string reason;  // why not, when !ok
  int block_rows = 0, mma = 0, ranks = 0, groups = 0, groups_per_cluster = 0, tiles = 0, cluster_size = 0;
  int smem_bytes = 0, fixed_bytes = 0, weight_bytes = 0, resident_bytes = 0;
  bool global_combine = false;
};

// wtype: 0 float32, 1 bfloat16, 2 float16. Plans use the current CUDA device.
MlpPlanInfo mlp_step_plan(int wtype, const MlpDims& dims, const MlpOptions& opts);
MlpPlanInfo mlp_persistent_plan(int wtype, const MlpDims& dims, const MlpOptions& opts);
// One launch per step in [step_begin, step_end); step_begin reads x_in, later steps x_out.
void mlp_step_launch(int wtype, const MlpPointers& ptrs, const MlpDims& dims, bool clip, float clip_range,
                     int step_begin, int step_end, const MlpOptions& opts, std::uintptr_t stream);
// All T steps in one launch.
void mlp_persistent_launch(int wtype, const MlpPointers& ptrs, const MlpDims& dims, bool clip, float clip_range,
                           const MlpOptions& opts, std::uintptr_t stream);

// ---- The per-call terms (csrc/call_terms.cu): router weights and conditioning terms in one launch ----
// Tensors validated in Python (fdp.backends.cuda_backend.check_cond_launch), layout fdp.packing.PackedCond.
#define FDP_CALL_POINTERS(X)                                                                       \
  X(global_cond)             /* [B, Dc] float32 */                                                  \
  X(router_w1) X(router_b1) X(router_w2) X(router_b2) X(fixed) X(cond_w) X(cond_b)                  \
  X(out)                     /* float32, fdp.packing.call_terms_numel(B, K, L, H) */
// Dk: rows of cond_w (Dc, or 0 for unconditional components); strategy: abi::Strategy.
#define FDP_CALL_DIMS(X) X(B) X(Dc) X(Dk) X(Hr) X(K) X(L) X(H) X(strategy) X(topk)

struct CallPointers {
#define FDP_POINTER_FIELD(name) std::uintptr_t name = 0;
  FDP_CALL_POINTERS(FDP_POINTER_FIELD)
#undef FDP_POINTER_FIELD
};

struct CallDims {
#define FDP_DIM_FIELD(name) std::int64_t name = 0;
  FDP_CALL_DIMS(FDP_DIM_FIELD)
#undef FDP_DIM_FIELD
};

void call_terms_launch(const CallPointers& ptrs, const CallDims& dims, std::uintptr_t stream);

}  // namespace fdp
