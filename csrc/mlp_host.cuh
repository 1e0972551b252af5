// Host side of the fused MLP kernels: device facts, the planner and its cache, and the
// launchers both kernels' entry points call.
#pragma once

#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mlp_types.cuh"

namespace fdp {
namespace mlp {

// ---------------------------------------------------------------------------------------------
// Host side: device facts, planning, launching (host functions; nvcc parses them in
// every pass, so they are not hidden behind __CUDA_ARCH__).

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("fdp CUDA error in ") + what + ": " + cudaGetErrorString(e) + " (" +
                             cudaGetErrorName(e) + ")");
  }
}

struct DeviceInfo {
  int id = -1, major = 0, minor = 0, sms = 0, smem_optin = 0, cluster = 0;
};

inline DeviceInfo current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo di;
  di.id = dev;
  check_cuda(cudaDeviceGetAttribute(&di.major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&di.minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&di.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&di.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  if (di.major >= 9)
    check_cuda(cudaDeviceGetAttribute(&di.cluster, cudaDevAttrClusterLaunch, dev), "cudaDeviceGetAttribute");
  cache[dev] = di;
  return di;
}

struct FnInfo {
  int binary_version = 0;
  int static_smem = 0;
  int smem_limit = 0;  // dynamic shared memory a block may use
  bool clusters = false;
  bool programmatic = false;  // the code has griddepcontrol (built for sm_90+): launches may overlap
};

// Attributes are set once per kernel and device (they are not stream operations,
// but doing them at most once keeps the launch path to the launch itself).
inline FnInfo prepare_fn(const void* fn, const DeviceInfo& di) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, FnInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(fn, di.id);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes at{};
  check_cuda(cudaFuncGetAttributes(&at, fn), "cudaFuncGetAttributes");
  FnInfo fi;
  fi.binary_version = at.binaryVersion;
  fi.static_smem = static_cast<int>(at.sharedSizeBytes);
  fi.smem_limit = di.smem_optin - fi.static_smem;
  check_cuda(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, fi.smem_limit),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  // The device code compiled for __CUDA_ARCH__ >= 900 (ptxVersion; a binary JIT-compiled from
  // older PTX has a newer binaryVersion but none of the cluster or griddepcontrol code).
  const bool sm90_code = at.binaryVersion >= 90 && at.ptxVersion >= 90;
  fi.clusters = di.cluster != 0 && sm90_code;
  fi.programmatic = sm90_code;
  if (fi.clusters)
    check_cuda(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
               "cudaFuncSetAttribute(NonPortableClusterSizeAllowed)");
  cache[key] = fi;
  return fi;
}

inline bool cluster_fits(const void* fn, int S, int smem) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(S, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = S;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  int n = 0;
  cudaError_t e = cudaOccupancyMaxActiveClusters(&n, fn, &cfg);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

// Kernel instantiation for (weight type, MMA, rows per tile); null if there is none.
using KernelGetter = const void* (*)(int wtype, int mma, int bt);

inline std::string check_dims(const MlpDims& d) {
  auto s = [](int64_t v) { return std::to_string(v); };
  const std::string serve = "the fused CUDA kernels serve ";
  if (d.K < 1 || d.K > kMaxK) return serve + "1.." + s(kMaxK) + " components, got K = " + s(d.K);
  if (d.L < 1 || d.L > kMaxL) return serve + "1.." + s(kMaxL) + " residual blocks, got L = " + s(d.L);
  if (d.H < 1 || d.H > kMaxH) return serve + "hidden widths 1.." + s(kMaxH) + ", got H = " + s(d.H);
  if (d.D < 1 || d.D > kMaxD)
    return "the fused CUDA kernels serve D = horizon * action_dim in 1.." + s(kMaxD) + ", got D = " + s(d.D);
  if (d.B < 1 || d.B > (int64_t(1) << 24)) return "batch size must be in 1..2**24, got B = " + s(d.B);
  if (d.T < 1 || d.T > (int64_t(1) << 20)) return "number of steps must be in 1..2**20, got T = " + s(d.T);
  if (d.K * d.L * d.H * d.H >= (int64_t(1) << 31) || d.B * d.K * d.L * d.H >= (int64_t(1) << 31) ||
      d.T * d.B * d.D >= (int64_t(1) << 31))
    return "tensor sizes exceed the kernels' 2**31-element limit";
  return "";
}

// Total bytes and resident bytes of a block's weight slices for `budget` bytes of room.
inline void weight_bytes(const MlpDims& d, const Plan& p, int budget, int* total, int* resident) {
  const int nq = 2 * static_cast<int>(d.L) + 2;
  int used = 0, all = 0;
  for (int s = 0; s < p.slots * nq; ++s) {
    const Slice sl = slice_geom(s % nq, static_cast<int>(d.D), static_cast<int>(d.H), static_cast<int>(d.L), p);
    all += sl.bytes;
    slice_offset_step(used, sl.bytes, budget);
  }
  *total = all;
  *resident = used;
}

// Fills the column split and shared-memory sizes of `p`; false if the fixed part does not fit.
inline bool size_plan(const MlpDims& d, Plan& p, int smem_limit) {
  const int H = static_cast<int>(d.H), D = static_cast<int>(d.D), K = static_cast<int>(d.K), L = static_cast<int>(d.L);
  p.ns = rup(cdiv(H, p.ranks), 8);  // multiple of 8: every rank's first column is 16-byte aligned
  p.ds = cdiv(D, p.ranks);
  p.slots = cdiv(K, p.groups);
  p.stage = p.bt <= 8;
  p.tiles = static_cast<int>((d.B + p.bt - 1) / p.bt);
  const Layout lay = make_layout(D, H, L, K, p);
  p.fixed_bytes = lay.wbase;
  if (p.fixed_bytes > smem_limit) return false;
  int total = 0, resident = 0;
  weight_bytes(d, p, smem_limit - p.fixed_bytes, &total, &resident);
  p.weight_bytes = total;
  p.resident_bytes = resident;
  p.smem_bytes = p.fixed_bytes + resident;
  return true;
}

// Weight bytes a block of plan `p` with (ranks, groups, gpc) = `c` reads from L2 inside its
// matmuls, every launch: the slices that do not fit in its shared memory. -1: the plan does not fit.
inline int64_t streamed_bytes(const MlpDims& d, Plan p, const std::tuple<int, int, int>& c, int smem_limit) {
  p.ranks = std::get<0>(c);
  p.groups = std::get<1>(c);
  p.gpc = std::get<2>(c);
  if (!size_plan(d, p, smem_limit)) return -1;
  return int64_t(p.weight_bytes) - p.resident_bytes;
}

// A global combine (partials to scratch, __threadfence, an atomic arrival, then one block per tile
// reads the G partials and updates x) costs on the order of 1-2 us on an H100, about what one SM
// takes to stream this many bytes from L2 (~100 GB/s per SM). Estimates, not measurements.
constexpr int64_t kGlobalCombineBytes = 128 * 1024;

// A step of a persistent cluster costs, besides its weight reads, the latency of its chain of
// exchanges (2L + 2 mbarrier hand-offs over DSMEM and the combine): taken as about 1 us, what an
// SM streams of this many bytes from L2. An estimate, not a measurement.
constexpr int64_t kClusterStepBytes = 128 * 1024;

// Whether the per-step kernel should combine the G groups inside one cluster of G x rc blocks
// rather than through global memory with the plan `global` (more ranks, smaller slices): yes
// unless its blocks, having fewer ranks, stream more weight bytes from L2 than a global
// combine costs. (The resident part of a slice is staged before the programmatic wait, where
// it overlaps the previous step; the streamed part is read after it.)
inline bool in_cluster_pays(const MlpDims& d, const Plan& p, int rc, int G,
                            const std::tuple<int, int, int>& global, int smem_limit) {
  const int64_t local = streamed_bytes(d, p, std::make_tuple(rc, G, G), smem_limit);
  if (local < 0) return false;
  const int64_t other = streamed_bytes(d, p, global, smem_limit);
  return other < 0 || local <= other + kGlobalCombineBytes;
}

inline int pow2_at_least(int v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// Decide tile rows, tensor cores, ranks and groups for a launch (heuristics; tune on the GPU).
inline Plan make_plan(int kind, int wtype, const MlpDims& d, const MlpOptions& o, KernelGetter get,
                      std::string& reason) {
  Plan none{};
  reason = check_dims(d);
  if (!reason.empty()) return none;
  if (wtype < kF32 || wtype > kF16) throw std::invalid_argument("`wtype` must be 0 (f32), 1 (bf16) or 2 (f16)");
  const int wsize = wtype == kF32 ? 4 : 2;
  const int K = static_cast<int>(d.K), H = static_cast<int>(d.H), D = static_cast<int>(d.D), L = static_cast<int>(d.L);
  const int B = static_cast<int>(d.B);
  const DeviceInfo di = current_device();
  if (di.major < 8) {
    reason = "the fused CUDA kernels need compute capability 8.0 or newer, this device has " +
             std::to_string(di.major) + "." + std::to_string(di.minor);
    return none;
  }
  bool mma = (o.mma >= 0) ? o.mma != 0 : (wsize == 2 && B >= 16);
  if (mma && wsize == 4)
    throw std::invalid_argument("`mma=1` needs bfloat16 or float16 weights (float32 weights use the exact FMA path)");
  std::vector<int> bts;
  if (o.bt > 0) {
    const bool ok = mma ? (o.bt == 16 || o.bt == 32 || o.bt == 64) : (o.bt == 1 || o.bt == 2 || o.bt == 4 || o.bt == 8);
    if (!ok)
      throw std::invalid_argument(std::string("`block_rows` must be one of ") + (mma ? "16, 32, 64" : "1, 2, 4, 8") +
                                  " on the " + (mma ? "MMA" : "FMA") + " path, got " + std::to_string(o.bt));
    bts.push_back(o.bt);
  } else if (mma) {
    const int top = pow2_at_least(cdiv(B, 16), 4) * 16;
    int pref = top;
    if (kind == kPersistent && di.cluster) {
      // One cluster of about K * R blocks per tile: prefer the smallest tile that still
      // runs every cluster in a single wave (more SMs on the tensor-core work).
      const int S = K * imin(kMaxCluster / K, imax(1, cdiv(H, 32)));
      pref = 16;
      while (pref < top && int64_t(cdiv(B, pref)) * S > di.sms) pref *= 2;
    }
    bts.push_back(pref);
    for (int bt = top; bt >= 16; bt /= 2)
      if (bt != pref) bts.push_back(bt);
  } else {
    for (int bt = pow2_at_least(B, 8); bt >= 1; bt /= 2) bts.push_back(bt);
  }
  if (o.groups < 0 || o.groups > K) throw std::invalid_argument("`groups` must be 0 (auto) or 1..K");
  if (o.ranks < 0 || o.ranks > kMaxCluster) throw std::invalid_argument("`ranks` must be 0 (auto) or 1..16");

  const int64_t comp_bytes = (int64_t(D) * H * 2 + int64_t(2) * L * H * H) * wsize;
  int min_fixed = -1;
  std::string cluster_fail;
  // The first of `cands` (best first) whose plan fits a block and whose cluster can be scheduled;
  // bt = 0 if none does.
  auto first_fit = [&](const void* fn, const FnInfo& fi, Plan p, const std::vector<std::tuple<int, int, int>>& cands) {
    for (auto& c : cands) {
      p.ranks = std::get<0>(c);
      p.groups = std::get<1>(c);
      p.gpc = std::get<2>(c);
      if (!size_plan(d, p, fi.smem_limit)) {
        if (min_fixed < 0 || p.fixed_bytes < min_fixed) min_fixed = p.fixed_bytes;
        continue;
      }
      const int S = p.ranks * p.gpc;
      if (S > 1 && !cluster_fits(fn, S, p.smem_bytes)) {
        cluster_fail = "no thread-block cluster of " + std::to_string(S) + " blocks with " +
                       std::to_string(p.smem_bytes) + " bytes of shared memory each can be scheduled";
        continue;
      }
      return p;
    }
    return Plan{};
  };
  // The persistent kernel takes a cluster holding all K components at the first tile size of
  // `bts` where it fits, and moves to another where it fits only if that one's step is estimated
  // shorter AND its blocks read no more weight bytes from L2 in all (every step, a block reads its
  // non-resident slices from L2: the cost that dominates at these sizes). A smaller tile leaves a
  // block more room for weights (activations and partials shrink with the rows) but needs more
  // blocks: the step takes ceil(blocks / SMs) waves (one block per SM), each as long as a block's
  // L2 read plus kClusterStepBytes, and more blocks share the L2 bandwidth. One block per tile,
  // which streams all K components' weights, only if no cluster plan fits at any tile size.
  Plan cluster_plan{}, single_plan{};
  int64_t cluster_step = 0, cluster_l2 = 0;
  for (int bt : bts) {
    const void* fn = get(wtype, mma ? 1 : 0, bt);
    if (fn == nullptr) continue;
    const FnInfo fi = prepare_fn(fn, di);
    if (o.ranks > 1 && !fi.clusters)
      throw std::invalid_argument("`ranks` > 1 needs thread-block clusters: an sm_90 device and a binary built for it");
    Plan p{};
    p.bt = bt;
    p.mma = mma ? 1 : 0;
    p.wsize = wsize;
    const int tiles = cdiv(B, bt);
    std::vector<std::tuple<int, int, int>> cands;  // (ranks, groups, groups per cluster), best first
    if (kind == kPersistent) {
      std::vector<std::tuple<int, int, int>> singles;
      if (o.groups != 0 && o.groups != 1 && o.groups != K)
        throw std::invalid_argument("the persistent kernel takes `groups` 0 (auto), 1 or K");
      // One cluster per tile holds all K components (K * R blocks): the per-step
      // combination stays inside the cluster, no grid-wide synchronisation.
      if (fi.clusters && o.groups != 1) {
        const int r0 = o.ranks ? o.ranks : imin(kMaxCluster / K, imax(1, cdiv(H, mma ? 32 : 16)));
        if (K * r0 > kMaxCluster)
          throw std::invalid_argument("the persistent kernel needs K * ranks <= 16 (one cluster per row tile)");
        for (int r = r0; r >= (o.ranks ? r0 : 1); --r) cands.emplace_back(r, K, K);
      }
      if (o.groups != K || K == 1) {
        if (o.ranks > 1 && K > 1 && o.groups == 1)
          throw std::invalid_argument("the persistent kernel splits columns only with `groups` = K");
        if (o.ranks <= 1) singles.emplace_back(1, 1, 1);
      }
      if (cands.empty() && singles.empty())
        throw std::invalid_argument("`groups` = K > 1 in the persistent kernel needs thread-block clusters (sm_90)");
      const Plan c = first_fit(fn, fi, p, cands);
      if (c.bt > 0) {
        const int blocks = c.tiles * c.ranks * c.gpc;
        const int64_t streamed = c.weight_bytes - c.resident_bytes;
        const int64_t step = int64_t(cdiv(blocks, di.sms)) * (streamed + kClusterStepBytes), l2 = blocks * streamed;
        if (cluster_plan.bt == 0 || (step < cluster_step && l2 <= cluster_l2)) {
          cluster_plan = c;
          cluster_step = step;
          cluster_l2 = l2;
        }
      }
      if (single_plan.bt == 0) single_plan = first_fit(fn, fi, p, singles);
    } else {
      const int G = o.groups ? o.groups : (tiles < di.sms ? K : 1);
      // (MMA: at least 64 columns per rank, so all 8 warps own an 8-column tile.)
      const int min_cols = mma ? 64 : 16;
      std::vector<std::tuple<int, int, int>> global;  // one group per cluster
      if (o.ranks) {
        global.emplace_back(o.ranks, G, 1);
      } else {
        int r = 1;
        if (fi.clusters) {
          // Enough ranks that a block's weight slices stay small (staged per launch), but
          // not so many blocks that the grid runs in several waves.
          const int64_t per_block = comp_bytes * cdiv(K, G);
          while (r < kMaxCluster && per_block / r > 96 * 1024 && cdiv(H, 2 * r) >= min_cols) r *= 2;
          while (r > 1 && int64_t(tiles) * G * r > 2 * int64_t(di.sms)) r /= 2;
        }
        for (; r >= 1; r /= 2) global.emplace_back(r, G, 1);
      }
      // With automatic groups, prefer one cluster per tile holding all G groups (gpc = G): the
      // groups' partials then meet over DSMEM, not through global scratch, a fence, an atomic
      // arrival and one serial last block per tile and step. Ranks: as many as fit 16 blocks,
      // since every launch stages its slices and smaller slices stage sooner. An explicit
      // `groups` keeps the global combine (tuning, and tests of that path).
      if (fi.clusters && G > 1 && o.groups == 0) {
        int rc = o.ranks ? o.ranks : imin(kMaxCluster / G, imax(1, cdiv(H, min_cols)));
        while (!o.ranks && rc > 1 && int64_t(tiles) * G * rc > 2 * int64_t(di.sms)) --rc;
        if (G * rc <= kMaxCluster && in_cluster_pays(d, p, rc, G, global.front(), fi.smem_limit))
          cands.emplace_back(rc, G, G);
      }
      cands.insert(cands.end(), global.begin(), global.end());
      const Plan q = first_fit(fn, fi, p, cands);
      if (q.bt > 0) return q;
    }
  }
  if (cluster_plan.bt > 0) return cluster_plan;
  if (single_plan.bt > 0) return single_plan;
  if (!cluster_fail.empty() && min_fixed < 0) {
    reason = cluster_fail;
    return none;
  }
  reason = "the model's activations need " + std::to_string(min_fixed < 0 ? 0 : min_fixed) +
           " bytes of shared memory per block (before any weights), more than the " +
           std::to_string(di.smem_optin) + " this device allows; reduce the hidden width or horizon * action_dim";
  return none;
}

struct PlanKey {
  int dev, kind, wtype;
  int64_t B, D, H, L, K;
  int bt, ranks, groups, mma;
  bool operator<(const PlanKey& o) const {
    return std::tie(dev, kind, wtype, B, D, H, L, K, bt, ranks, groups, mma) <
           std::tie(o.dev, o.kind, o.wtype, o.B, o.D, o.H, o.L, o.K, o.bt, o.ranks, o.groups, o.mma);
  }
};

// Plans are cached per device and shape: after the first call, a launch only launches.
inline Plan cached_plan(int kind, int wtype, const MlpDims& d, const MlpOptions& o, KernelGetter get,
                        std::string& reason) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static std::map<PlanKey, std::pair<Plan, std::string>> cache;
  const PlanKey key{dev, kind, wtype, d.B, d.D, d.H, d.L, d.K, o.bt, o.ranks, o.groups, o.mma};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      reason = it->second.second;
      return it->second.first;
    }
  }
  Plan p = make_plan(kind, wtype, d, o, get, reason);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = std::make_pair(p, reason);
  return p;
}

inline MlpPlanInfo plan_info(const Plan& p, const std::string& reason) {
  MlpPlanInfo info{};
  info.ok = p.bt > 0;
  info.reason = reason;
  if (!info.ok) return info;
  info.block_rows = p.bt;
  info.mma = p.mma;
  info.ranks = p.ranks;
  info.groups = p.groups;
  info.groups_per_cluster = p.gpc;
  info.tiles = p.tiles;
  info.cluster_size = p.ranks * p.gpc;
  info.smem_bytes = p.smem_bytes;
  info.fixed_bytes = p.fixed_bytes;
  info.weight_bytes = p.weight_bytes;
  info.resident_bytes = p.resident_bytes;
  info.global_combine = p.groups != p.gpc;
  return info;
}

inline Args make_args(const MlpPointers& q, const MlpDims& d, bool clip, float clip_range, int skip_unused) {
  auto need = [](std::uintptr_t v, const char* name) {
    if (v == 0) throw std::invalid_argument(std::string("`") + name + "` is a null pointer");
  };
  need(q.w_in, "w_in"); need(q.w_a, "w_a"); need(q.w_b, "w_b"); need(q.b_b, "b_b");
  need(q.w_out, "w_out"); need(q.b_out, "b_out"); need(q.t_in, "t_in"); need(q.t_shift, "t_shift");
  need(q.weights, "weights"); need(q.c_in, "c_in"); need(q.scale, "scale"); need(q.shift, "shift");
  need(q.coef, "coef"); need(q.x_in, "x_in"); need(q.x_out, "x_out");
  Args a{};
  a.w_in = reinterpret_cast<const void*>(q.w_in);
  a.w_a = reinterpret_cast<const void*>(q.w_a);
  a.w_b = reinterpret_cast<const void*>(q.w_b);
  a.b_b = reinterpret_cast<const float*>(q.b_b);
  a.w_out = reinterpret_cast<const void*>(q.w_out);
  a.b_out = reinterpret_cast<const float*>(q.b_out);
  a.t_in = reinterpret_cast<const float*>(q.t_in);
  a.t_shift = reinterpret_cast<const float*>(q.t_shift);
  a.wts = reinterpret_cast<const float*>(q.weights);
  a.c_in = reinterpret_cast<const float*>(q.c_in);
  a.scale = reinterpret_cast<const float*>(q.scale);
  a.shift = reinterpret_cast<const float*>(q.shift);
  a.coef = reinterpret_cast<const float*>(q.coef);
  a.noise = reinterpret_cast<const float*>(q.noise);
  a.x_in = reinterpret_cast<const float*>(q.x_in);
  a.x_out = reinterpret_cast<float*>(q.x_out);
  a.scratch = reinterpret_cast<float*>(q.scratch);
  a.counters = reinterpret_cast<int*>(q.counters);
  if ((q.known == 0) != (q.known_mask == 0))
    throw std::invalid_argument("inpainting needs both `known` and `known_mask`, or neither");
  if (d.known_steps != 0 && d.known_steps != d.T)
    throw std::invalid_argument("`known_steps` must be 0 (one [B, D] replacement for every step) or T = " +
                                std::to_string(d.T) + ", got " + std::to_string(d.known_steps));
  a.known = reinterpret_cast<const float*>(q.known);
  a.known_mask = reinterpret_cast<const unsigned char*>(q.known_mask);
  a.known_stride = d.known_steps != 0 ? static_cast<size_t>(d.B * d.D) : 0;
  a.B = static_cast<int>(d.B);
  a.D = static_cast<int>(d.D);
  a.H = static_cast<int>(d.H);
  a.L = static_cast<int>(d.L);
  a.K = static_cast<int>(d.K);
  a.T = static_cast<int>(d.T);
  a.clip = clip ? 1 : 0;
  a.clip_range = clip_range;
  a.skip_unused = skip_unused;
  return a;
}

// `programmatic`: the launch may start while the previous kernel in the stream still runs
// (programmatic dependent launch); the kernel waits for it before reading its results.
inline void launch_plan(int kind, const void* fn, const Plan& p, const Args& a, int step_begin, int step_end,
                        cudaStream_t stream, bool programmatic = false) {
  if (kind == kStep && step_end != step_begin + 1)
    throw std::invalid_argument("the per-step kernel runs exactly one step per launch, got steps [" +
                                std::to_string(step_begin) + ", " + std::to_string(step_end) + ")");
  cudaLaunchConfig_t cfg = {};
  const int S = p.ranks * p.gpc;
  cfg.gridDim = dim3(static_cast<unsigned>(S * p.tiles), static_cast<unsigned>(p.groups / p.gpc), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(p.smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute at[2];
  unsigned n = 0;
  if (S > 1) {
    at[n].id = cudaLaunchAttributeClusterDimension;
    at[n].val.clusterDim.x = static_cast<unsigned>(S);
    at[n].val.clusterDim.y = 1;
    at[n].val.clusterDim.z = 1;
    ++n;
  }
  if (programmatic) {
    at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = n ? at : nullptr;
  cfg.numAttrs = n;
  Args args = a;
  Plan plan = p;
  void* params[] = {&args, &plan, &step_begin, &step_end};
  check_cuda(cudaLaunchKernelExC(&cfg, fn, params), "kernel launch");
  check_cuda(cudaGetLastError(), "kernel launch");
}

// FDP_CUDA_PDL=0 turns programmatic launches off: a runtime or driver that cannot capture them
// into a CUDA graph (every call of the CUDA backends is captured) fails the capture instead of
// just losing the overlap, and CUDA before 12.3 does not describe them in graphs at all.
inline bool programmatic_launches_enabled() {
#if defined(CUDART_VERSION) && CUDART_VERSION < 12030
  return false;
#else
  static const bool on = [] {
    const char* v = std::getenv("FDP_CUDA_PDL");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
#endif
}

// Steps [step_begin, step_end) of kernel `kind`: the persistent kernel in one launch, the
// per-step kernel once per step (the first launch reads x_in, later ones update x_out in place).
//
// On sm_90, launches after the first are programmatic dependent launches: step s+1 starts on
// free SMs once every block of step s has passed its own wait, and stages its weight slices
// while step s computes. run_tile reads before its griddepcontrol.wait only what was written
// before this call: weights, biases, step vectors, coefficients, noise, and the per-call terms
// (router weights, c_in, scale, shift), which kernels earlier in the stream wrote. Those are
// complete because the FIRST launch is a plain one, ordered after all earlier work in the
// stream (and, in a captured graph, after it by a full edge), and launch s+1 cannot start
// before launch s has started. The previous step's x (and the global combine's scratch and
// counters) are touched only after the wait, which returns when step s has completed and its
// writes are visible.
inline void launch_steps(int kind, const void* fn, const Plan& p, Args a, int step_begin, int step_end,
                         cudaStream_t stream) {
  if (kind == kPersistent) {
    launch_plan(kind, fn, p, a, step_begin, step_end, stream);
    return;
  }
  const bool programmatic = prepare_fn(fn, current_device()).programmatic && programmatic_launches_enabled();
  for (int s = step_begin; s < step_end; ++s) {
    launch_plan(kind, fn, p, a, s, s + 1, stream, programmatic && s > step_begin);
    a.x_in = a.x_out;
  }
}

}  // namespace mlp
}  // namespace fdp
