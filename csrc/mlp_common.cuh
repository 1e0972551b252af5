// Shared device code of the fused MLP kernels (mlp_step.cu: one launch per
// denoising step; mlp_persistent.cu: the whole sampling loop in one launch),
// plus the host-side planning both launchers use. The per-component chain is
// written once, here, in `run_tile`.
//
// Math (docs/mlp_denoiser.md, on the packed tensors of python/fdp/packing.py):
// for step i and a tile of rows x,
//
//   for k (skipped when the router gives it weight 0 on every row of the tile):
//     h   = x W_in[k] + t_in[i,k] + c_in[:,k]
//     for l: u = SiLU(scale[:,k,l] * (h W_a[k,l]) + shift[:,k,l] + t_shift[i,k,l])
//            h = h + u W_b[k,l] + b_b[k,l]
//     eps += weights[:,k] * (h W_out[k] + b_out[k])
//   x0 = a_x x + a_m eps;  x0 = clamp(x0, +-clip_range) if clip
//   x  = c_x0 x0 + c_x x + c_m eps + [adds_noise[i]] sigma z
//
// Layout (all contiguous): w_in [K,D,H], w_a/w_b [K,L,H,H], w_out [K,H,D]
// input-major in the weight type W (float, bf16 or fp16); b_b [K,L,H],
// b_out [K,D], t_in [T,K,H], t_shift [T,K,L,H], weights [B,K], c_in [B,K,H],
// scale/shift [B,K,L,H], noise [T,B,D], x [B,D] float32; coef [T,8] float32
// with columns a_x, a_m, c_x0, c_x, c_m, sigma, adds_noise (0/1), unused.
//
// Work decomposition. A block owns a tile of BT rows and, for every matmul, a
// slice of output columns: "rank" r of R owns columns [r*ns, r*ns+ns) of the
// H-wide matrices and [r*ds, r*ds+ds) of W_out. The R ranks of one component
// group form a team; on sm_90 a team is (part of) a thread-block cluster and
// every rank pushes its slice of h / SiLU(y) into all team members' shared
// memory (distributed shared memory), then the cluster synchronises. Group g
// of G evaluates components g, g+G, ...; the groups' partial sums of
// w_k eps_k are combined either inside the cluster ("local combine": the
// cluster holds all G groups of the tile, every block reads the partials over
// DSMEM and keeps an identical copy of x) or, for the per-step kernel only,
// through a global scratch buffer and a per-tile arrival counter whose last
// block applies the update ("global combine"). Without clusters R = 1.
//
// Each block stages its weight slices in shared memory with cp.async at the
// start of the launch (as many as fit; the rest is read from global/L2 inside
// the matmul). The persistent kernel does this once for all T steps.
//
// Matmuls: act [BT, In] (fp32, shared) x W[In, cols] -> BT x cols, fp32
// accumulation. FMA path (BT <= 8): threads own V consecutive columns and a
// strided subset of the input rows, then a fixed-order warp/block reduction
// (deterministic). MMA path (BT = 16/32/64, 16-bit weights only): warps own
// 8-column tiles and run mma.sync m16n8k8 TF32; bf16/fp16 weights are exact
// in TF32, activations are rounded to TF32 (10-bit mantissa).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

#include <cstddef>
#include <cstdint>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "abi.h"
#include "fdp.h"

#define FDP_HD __host__ __device__ __forceinline__

// FDP_HOST_EMULATION names a header that supplies the CUDA primitives used below
// (barriers, shuffles, cp.async, mma, cluster DSMEM) for host threads, so the
// device code can be exercised on a machine without a GPU. Production builds never set it.
#if defined(FDP_HOST_EMULATION)
#include FDP_HOST_EMULATION
#endif

namespace fdp {
namespace mlp {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 128;  // output columns per FMA reduction pass
using abi::kMaxK;
using abi::kMaxL;
using abi::kMaxH;
using abi::kMaxD;
using abi::kCoefWidth;  // floats per coefficient row
constexpr int kMaxCluster = 16;

using abi::WeightType;
using abi::kF32;
using abi::kBF16;
using abi::kF16;
enum Kind { kStep = 0, kPersistent = 1 };

struct Args {
  const void* w_in;
  const void* w_a;
  const void* w_b;
  const float* b_b;
  const void* w_out;
  const float* b_out;
  const float* t_in;
  const float* t_shift;
  const float* wts;
  const float* c_in;
  const float* scale;
  const float* shift;
  const float* coef;
  const float* noise;  // null: no step adds noise
  const float* x_in;
  float* x_out;        // may alias x_in
  float* scratch;      // [groups, B, D], global combine only
  int* counters;       // [tiles], zero before the first launch; kernels leave them zero
  int B, D, H, L, K, T;
  int clip;
  float clip_range;
  int skip_unused;
};

struct Plan {
  int bt, mma, wsize;
  int ranks;   // R: column slices per component (cluster ranks of a team)
  int groups;  // G: component groups per tile
  int gpc;     // groups per cluster (G: local combine, 1: global combine when G > 1)
  int tiles;
  int ns, ds;  // columns per rank of the H-wide matrices / of W_out
  int slots;   // components per block, ceil(K / G)
  int stage;   // per-row FiLM terms and noise staged in shared memory (small tiles)
  int smem_bytes, fixed_bytes, weight_bytes, resident_bytes;
};

FDP_HD int rup(int a, int b) { return (a + b - 1) / b * b; }
FDP_HD int cdiv(int a, int b) { return (a + b - 1) / b; }
FDP_HD int imin(int a, int b) { return a < b ? a : b; }
FDP_HD int imax(int a, int b) { return a > b ? a : b; }
FDP_HD int take(int& off, int bytes) {
  int o = off;
  off += rup(bytes, 16);
  return o;
}

// Shared-memory layout (byte offsets, 16-byte aligned), computed identically
// by the host planner and the kernel.
struct Layout {
  int xst, hst, nsp, dsp, dp;  // row strides in floats
  int xs, hs, us, acc, red, wts, coef, noise, tvec, bvec, cvec, woff, wbase;
  int acc_sz, coef_sz, noise_sz, tvec_sz;  // bytes of one parity buffer
  int nslices;
};

FDP_HD Layout make_layout(int D, int H, int L, int K, const Plan& p) {
  Layout y;
  // +4 floats per row: MMA A-fragment loads of 8 rows x 4 columns hit 32 distinct banks.
  y.xst = rup(D, 8) + 4;
  y.hst = rup(H, 8) + 4;
  y.nsp = rup(p.ns, 4);
  y.dsp = rup(p.ds, 4);
  y.dp = rup(D, 4);
  int off = 0;
  y.xs = take(off, p.bt * y.xst * 4);
  y.hs = take(off, p.bt * y.hst * 4);
  y.us = take(off, p.bt * y.hst * 4);
  y.acc_sz = rup(p.bt * y.dsp * 4, 16);
  y.acc = take(off, 2 * y.acc_sz);
  y.red = take(off, p.mma ? 0 : kWarps * p.bt * kChunk * 4);
  y.wts = take(off, p.bt * K * 4);
  y.coef_sz = kCoefWidth * 4;
  y.coef = take(off, 2 * y.coef_sz);
  y.noise_sz = p.stage ? rup(p.bt * y.dp * 4, 16) : 0;
  y.noise = take(off, 2 * y.noise_sz);
  y.tvec_sz = rup(p.slots * (1 + L) * y.nsp * 4, 16);
  y.tvec = take(off, 2 * y.tvec_sz);
  y.bvec = take(off, p.slots * (L * y.nsp + y.dsp) * 4);
  y.cvec = take(off, p.stage ? p.slots * (1 + 2 * L) * p.bt * y.nsp * 4 : 0);
  y.nslices = p.slots * (2 * L + 2);
  y.woff = take(off, y.nslices * 4);
  y.wbase = off;
  return y;
}

// Weight slice q of a component (0: W_in, 1+2l: W_a[l], 2+2l: W_b[l], 2L+1: W_out)
// as staged in shared memory: `rows` x `stride` elements, zero padded.
struct Slice {
  int in, cols, rows, stride, bytes;
};

FDP_HD Slice slice_geom(int q, int D, int H, int L, const Plan& p) {
  Slice s;
  const bool out = (q == 2 * L + 1);
  s.in = (q == 0) ? D : H;
  s.cols = out ? p.ds : p.ns;
  s.rows = p.mma ? rup(s.in, 8) : s.in;  // MMA k-steps of 8 read zero rows past `in`
  // MMA: +8 elements shift consecutive rows by 4 banks (conflict-free B fragments).
  s.stride = rup(s.cols, 8) + (p.mma ? 8 : 0);
  s.bytes = rup(s.rows * s.stride * p.wsize, 16);
  return s;
}

// Greedy residency: slices in chain order, each kept if it still fits.
FDP_HD int slice_offset_step(int& used, int bytes, int budget) {
  if (used + bytes <= budget) {
    int o = used;
    used += bytes;
    return o;
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Device helpers

#if defined(__CUDACC__) || defined(FDP_HOST_EMULATION)

template <typename W>
struct WT;

template <>
struct WT<float> {
  static constexpr int V = 4;  // elements per 16-byte load
  __device__ static float f(float w) { return w; }
  template <bool SMEM>
  __device__ static float load1(const float* p) {
    return SMEM ? *p : __ldg(p);
  }
  template <bool SMEM>
  __device__ static void load_vec(const float* p, float (&o)[V]) {
    const float4 v = SMEM ? *reinterpret_cast<const float4*>(p) : __ldg(reinterpret_cast<const float4*>(p));
    o[0] = v.x;
    o[1] = v.y;
    o[2] = v.z;
    o[3] = v.w;
  }
};

__device__ __forceinline__ float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

template <>
struct WT<__nv_bfloat16> {
  static constexpr int V = 8;
  __device__ static float f(__nv_bfloat16 w) { return __bfloat162float(w); }
  template <bool SMEM>
  __device__ static float load1(const __nv_bfloat16* p) {
    const unsigned short u = SMEM ? *reinterpret_cast<const unsigned short*>(p)
                                  : __ldg(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(static_cast<unsigned>(u) << 16);
  }
  template <bool SMEM>
  __device__ static void load_vec(const __nv_bfloat16* p, float (&o)[V]) {
    const uint4 v = SMEM ? *reinterpret_cast<const uint4*>(p) : __ldg(reinterpret_cast<const uint4*>(p));
    o[0] = bf16_lo(v.x); o[1] = bf16_hi(v.x);
    o[2] = bf16_lo(v.y); o[3] = bf16_hi(v.y);
    o[4] = bf16_lo(v.z); o[5] = bf16_hi(v.z);
    o[6] = bf16_lo(v.w); o[7] = bf16_hi(v.w);
  }
};

__device__ __forceinline__ float2 h2_to_f2(unsigned u) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

template <>
struct WT<__half> {
  static constexpr int V = 8;
  __device__ static float f(__half w) { return __half2float(w); }
  template <bool SMEM>
  __device__ static float load1(const __half* p) {
    const unsigned short u = SMEM ? *reinterpret_cast<const unsigned short*>(p)
                                  : __ldg(reinterpret_cast<const unsigned short*>(p));
    return __half2float(__ushort_as_half(u));
  }
  template <bool SMEM>
  __device__ static void load_vec(const __half* p, float (&o)[V]) {
    const uint4 v = SMEM ? *reinterpret_cast<const uint4*>(p) : __ldg(reinterpret_cast<const uint4*>(p));
    float2 a = h2_to_f2(v.x), b = h2_to_f2(v.y), c = h2_to_f2(v.z), d = h2_to_f2(v.w);
    o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
    o[4] = c.x; o[5] = c.y; o[6] = d.x; o[7] = d.y;
  }
};

#if !defined(FDP_HOST_EMULATION)
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// cp.async (sm_80+). 16-byte copies bypass L1 (.cg): weights are read once per block.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// wait_group takes an immediate; waiting for fewer pending groups than needed is
// only conservative, so counts above 7 wait for "at most 7 pending".
__device__ __forceinline__ void cp_async_wait(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
  }
}

#endif  // !FDP_HOST_EMULATION

// Per-thread bookkeeping of committed cp.async groups; every thread commits the
// same sequence of groups (possibly empty), so group indices are block-uniform.
// A wait only covers this thread's copies: a barrier must follow before others read.
struct AsyncGroups {
  int committed = 0;
  int done = -1;
  __device__ int commit() {
    cp_async_commit();
    return committed++;
  }
  __device__ void wait_for(int g) {
    if (g <= done) return;
    int n = committed - 1 - g;
    if (n > 7) n = 7;
    cp_async_wait(n);
    done = committed - 1 - n;
  }
};

// Copy a rows x cols float32 block (row strides in floats) with cp.async,
// 16 bytes at a time when every address and stride allows it.
__device__ __forceinline__ void stage_f32(float* dst, int dst_stride, const float* src, size_t src_stride,
                                          int rows, int cols) {
  if (rows <= 0 || cols <= 0) return;
  const int tid = threadIdx.x;
  const bool v4 = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                    static_cast<uintptr_t>(src_stride * 4) | static_cast<uintptr_t>(dst_stride * 4) |
                    static_cast<uintptr_t>(cols * 4)) & 15) == 0;
  if (v4) {
    const int c4 = cols / 4;
    for (int e = tid; e < rows * c4; e += kThreads) {
      const int i = e / c4, c = (e - i * c4) * 4;
      cp_async16(dst + i * dst_stride + c, src + i * src_stride + c);
    }
  } else {
    for (int e = tid; e < rows * cols; e += kThreads) {
      const int i = e / cols, c = e - i * cols;
      cp_async4(dst + i * dst_stride + c, src + i * src_stride + c);
    }
  }
}

// Stage a weight slice: `in` rows x `ncols` columns of a row-major matrix with
// leading dimension `ld` (src points at row 0, first column of the slice) into
// a zero-padded `sl.rows` x `sl.stride` block.
template <typename W>
__device__ void stage_slice(W* dst, const Slice& sl, const W* src, int ld, int ncols) {
  constexpr int E = sizeof(W);
  const int tid = threadIdx.x;
  const uintptr_t a = reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(ld) * E;
  const int cb = (a & 15) == 0 ? 16 : (a & 7) == 0 ? 8 : (a & 3) == 0 ? 4 : 0;
  int done_cols = 0;
  if (cb >= E && ncols > 0) {
    const int ce = cb / E;
    const int nch = ncols / ce;
    if (nch > 0) {
      for (int e = tid; e < sl.in * nch; e += kThreads) {
        const int i = e / nch, c = (e - i * nch) * ce;
        W* d = dst + i * sl.stride + c;
        const W* s = src + static_cast<size_t>(i) * ld + c;
        if (cb == 16) cp_async16(d, s);
        else if (cb == 8) cp_async8(d, s);
        else cp_async4(d, s);
      }
    }
    done_cols = nch * ce;
  }
  // Unaligned remainder (odd widths of 16-bit matrices): plain copies.
  const int rest = ncols - done_cols;
  if (rest > 0) {
    for (int e = tid; e < sl.in * rest; e += kThreads) {
      const int i = e / rest, c = done_cols + (e - i * rest);
      dst[i * sl.stride + c] = src[static_cast<size_t>(i) * ld + c];
    }
  }
  // Zero padding: columns past ncols, rows past `in` (MMA k-steps read them).
  const int pad = sl.stride - imax(ncols, 0);
  if (pad > 0) {
    for (int e = tid; e < sl.in * pad; e += kThreads) {
      const int i = e / pad, c = imax(ncols, 0) + (e - i * pad);
      dst[i * sl.stride + c] = W(0.0f);
    }
  }
  for (int e = tid; e < (sl.rows - sl.in) * sl.stride; e += kThreads) dst[sl.in * sl.stride + e] = W(0.0f);
}

// ---------------------------------------------------------------------------------------------
// Cluster plumbing. S is the cluster size (1: no cluster, plain block barriers).

#if !defined(FDP_HOST_EMULATION)
__device__ __forceinline__ void cluster_sync_or_block(int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#else
  if (S > 1) __trap();  // a cluster launch of a binary built without cluster support
#endif
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank, int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
  return p;
}

// Write v at the same shared-memory offset in the R blocks of a team (cluster
// ranks team_base .. team_base+R-1); one thread owns each element.
__device__ __forceinline__ void team_store(float* p, float v, int team_base, int R, int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (R > 1) {
    auto cl = cooperative_groups::this_cluster();
    for (int q = 0; q < R; ++q) *cl.map_shared_rank(p, team_base + q) = v;
    return;
  }
#endif
  (void)team_base;
  (void)S;
  *p = v;
}
#endif  // !FDP_HOST_EMULATION

// ---------------------------------------------------------------------------------------------
// Matmuls: out[b, c] = sum_i act[b*lda + i] * w[i*ldw + c], handed to epi(b, c, out)
// for c < ncols; every (b, c) goes to exactly one thread.

template <int BT, int V>
__device__ __forceinline__ void fma_rows(float (&acc)[BT][V], const float* act, int lda, int i, const float (&wv)[V]) {
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    const float a = act[b * lda + i];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[b][j] = fmaf(a, wv[j], acc[b][j]);
  }
}

template <typename W, int BT, bool SMEM, class Epi>
__device__ __forceinline__ void mm_fma(const float* __restrict__ act, int lda, int In, const W* __restrict__ w,
                                       int ldw, int ncols, float* __restrict__ red, Epi& epi) {
  constexpr int V = WT<W>::V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Shared slices are zero padded to whole vectors; global ones need a tail path.
  const int ncomp = SMEM ? rup(ncols, V) : ncols;
  const bool aligned =
      SMEM || ((reinterpret_cast<uintptr_t>(w) | static_cast<uintptr_t>(ldw) * sizeof(W)) & 15) == 0;
  for (int c0 = 0; c0 < ncols; c0 += kChunk) {
    const int cw = imin(kChunk, ncomp - c0);
    const int nv = (cw + V - 1) / V;
    int P = 1;  // threads per input row: power of two <= kChunk / V <= 32
    while (P < nv) P <<= 1;
    const int G = kThreads / P;
    const int cv = tid & (P - 1), grp = tid / P;
    float acc[BT][V];
#pragma unroll
    for (int b = 0; b < BT; ++b)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[b][j] = 0.f;
    const int col = c0 + cv * V;
    if (cv < nv) {
      const W* wp = w + col;
      if (aligned && col + V <= ncomp) {
#pragma unroll 4
        for (int i = grp; i < In; i += G) {
          float wv[V];
          WT<W>::template load_vec<SMEM>(wp + static_cast<size_t>(i) * ldw, wv);
          fma_rows<BT, V>(acc, act, lda, i, wv);
        }
      } else {
        for (int i = grp; i < In; i += G) {
          float wv[V];
#pragma unroll
          for (int j = 0; j < V; ++j)
            wv[j] = (col + j < ncols) ? WT<W>::template load1<SMEM>(wp + static_cast<size_t>(i) * ldw + j) : 0.f;
          fma_rows<BT, V>(acc, act, lda, i, wv);
        }
      }
    }
    // Lanes l, l^P, l^2P, ... hold the same columns for different input rows.
    for (int off = P; off < 32; off <<= 1)
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[b][j] += __shfl_xor_sync(0xffffffffu, acc[b][j], off);
    if (lane < P) {
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int j = 0; j < V; ++j) red[(warp * BT + b) * kChunk + cv * V + j] = acc[b][j];
    }
    __syncthreads();
    const int nout = imin(cw, ncols - c0);
    for (int o = tid; o < BT * nout; o += kThreads) {
      const int b = o / nout, c = o - b * nout;
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < kWarps; ++q) s += red[(q * BT + b) * kChunk + c];
      epi(b, c0 + c, s);
    }
    if (c0 + kChunk < ncols) __syncthreads();  // `red` is reused by the next chunk
  }
}

#if !defined(FDP_HOST_EMULATION)
__device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif  // !FDP_HOST_EMULATION

// Fragment layout of m16n8k8 .tf32 (g = lane/4, t = lane%4): A a0 (g,t) a1 (g+8,t)
// a2 (g,t+4) a3 (g+8,t+4); B b0 (k=t, n=g) b1 (k=t+4, n=g); C c0,c1 (g, 2t..2t+1),
// c2,c3 (g+8, 2t..2t+1). The activation rows past `In` (up to a multiple of 8)
// are zero in shared memory.
template <typename W, int MT, bool SMEM, class Epi>
__device__ __forceinline__ void mm_mma(const float* __restrict__ act, int lda, int In, const W* __restrict__ w,
                                       int ldw, int ncols, Epi& epi) {
  static_assert(sizeof(W) == 2, "the MMA path serves 16-bit weights (exact in TF32)");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int ntiles = (ncols + 7) >> 3;
  const int In8 = (In + 7) & ~7;
  for (int nt = warp; nt < ntiles; nt += kWarps) {
    const int col = nt * 8 + gid;
    const bool col_ok = SMEM || col < ncols;
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
#pragma unroll 2
    for (int k0 = 0; k0 < In8; k0 += 8) {
      const int ka = k0 + tig, kb = ka + 4;
      float w0, w1;
      if (SMEM) {
        w0 = WT<W>::f(w[ka * ldw + col]);
        w1 = WT<W>::f(w[kb * ldw + col]);
      } else {
        w0 = (col_ok && ka < In) ? WT<W>::template load1<false>(w + static_cast<size_t>(ka) * ldw + col) : 0.f;
        w1 = (col_ok && kb < In) ? WT<W>::template load1<false>(w + static_cast<size_t>(kb) * ldw + col) : 0.f;
      }
      const unsigned b0 = __float_as_uint(w0), b1 = __float_as_uint(w1);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float* ar = act + (m * 16 + gid) * lda + ka;
        mma_tf32(acc[m], to_tf32(ar[0]), to_tf32(ar[8 * lda]), to_tf32(ar[4]), to_tf32(ar[8 * lda + 4]), b0, b1);
      }
    }
    const int c = nt * 8 + tig * 2;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int r0 = m * 16 + gid;
      if (c < ncols) {
        epi(r0, c, acc[m][0]);
        epi(r0 + 8, c, acc[m][2]);
      }
      if (c + 1 < ncols) {
        epi(r0, c + 1, acc[m][1]);
        epi(r0 + 8, c + 1, acc[m][3]);
      }
    }
  }
}

template <typename W, int BT, bool MMA, class Epi>
__device__ __forceinline__ void matmul(const float* act, int lda, int In, const W* w, bool resident, int ldw,
                                       int ncols, float* red, Epi& epi) {
  if (ncols <= 0) return;
  if constexpr (MMA) {
    if (resident) mm_mma<W, BT / 16, true>(act, lda, In, w, ldw, ncols, epi);
    else mm_mma<W, BT / 16, false>(act, lda, In, w, ldw, ncols, epi);
  } else {
    if (resident) mm_fma<W, BT, true>(act, lda, In, w, ldw, ncols, red, epi);
    else mm_fma<W, BT, false>(act, lda, In, w, ldw, ncols, red, epi);
  }
}

__device__ __forceinline__ float silu(float y) { return y / (1.0f + __expf(-y)); }

// fdp.schedulers.apply_step for one element; c = coefficient row, z = 0 when the step adds no noise.
__device__ __forceinline__ float sched_update(float x, float e, float z, const float* c, int clip, float cr) {
  using namespace abi;
  float x0 = c[kColAX] * x + c[kColAM] * e;
  if (clip) x0 = (x0 < -cr) ? -cr : ((x0 > cr) ? cr : x0);  // NaN stays NaN, as torch.clamp
  return c[kColCX0] * x0 + c[kColCX] * x + c[kColCM] * e + c[kColSigma] * z;
}

// ---------------------------------------------------------------------------------------------
// The tile: steps [step_begin, step_end) for one block. PERSISTENT=false adds the
// global-combine path and serves exactly one step per launch (launch_plan checks it on the host).

template <typename W, int BT, bool MMA, bool PERSISTENT>
__device__ __forceinline__ void run_tile(const Args& a, const Plan& p, int step_begin, int step_end) {
#if defined(FDP_HOST_EMULATION)
  unsigned char* smem = emu::block_smem();
  int& s_last = emu::block_s_last();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_last;
#endif
  // Only step_begin's vectors and coefficients are staged before the loop; the next step's are
  // prefetched by the persistent kernel alone, so a second step here would read stale ones.
  if (!PERSISTENT && step_end != step_begin + 1) __trap();
  const Layout lay = make_layout(a.D, a.H, a.L, a.K, p);
  const int tid = threadIdx.x;
  const int D = a.D, H = a.H, L = a.L, K = a.K;
  const int R = p.ranks;
  const int S = R * p.gpc;  // cluster size
  const int crank = static_cast<int>(blockIdx.x) % S;
  const int tile = static_cast<int>(blockIdx.x) / S;
  const int r = crank % R;
  const int team_base = crank - r;
  const int g = crank / R + static_cast<int>(blockIdx.y) * p.gpc;
  const bool global_combine = !PERSISTENT && (p.groups != p.gpc);
  const int row0 = tile * BT;
  const int nrows = imin(BT, a.B - row0);
  const int n0 = r * p.ns, ncols = imax(0, imin(H - n0, p.ns));
  const int d0 = r * p.ds, dcols = imax(0, imin(D - d0, p.ds));
  const int nsp = lay.nsp, dsp = lay.dsp;

  float* xs = reinterpret_cast<float*>(smem + lay.xs);
  float* hs = reinterpret_cast<float*>(smem + lay.hs);
  float* us = reinterpret_cast<float*>(smem + lay.us);
  float* red = reinterpret_cast<float*>(smem + lay.red);
  float* wts = reinterpret_cast<float*>(smem + lay.wts);
  float* bvec = reinterpret_cast<float*>(smem + lay.bvec);
  float* cvec = reinterpret_cast<float*>(smem + lay.cvec);
  int* woff = reinterpret_cast<int*>(smem + lay.woff);
  unsigned char* wbase = smem + lay.wbase;
  auto acc_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.acc + par * lay.acc_sz); };
  auto coef_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.coef + par * lay.coef_sz); };
  auto noise_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.noise + par * lay.noise_sz); };
  auto tvec_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.tvec + par * lay.tvec_sz); };

  const W* w_in = static_cast<const W*>(a.w_in);
  const W* w_a = static_cast<const W*>(a.w_a);
  const W* w_b = static_cast<const W*>(a.w_b);
  const W* w_out = static_cast<const W*>(a.w_out);

  // Zero the activations: padding rows/columns must read as 0 in the MMA path.
  // xs rows < nrows, columns < D arrive by cp.async, so only its padding is zeroed here.
  for (int e = tid; e < BT * lay.xst; e += kThreads) {
    const int b = e / lay.xst, d = e - b * lay.xst;
    if (b >= nrows || d >= D) xs[e] = 0.f;
  }
  for (int e = tid; e < BT * lay.hst; e += kThreads) {
    hs[e] = 0.f;
    us[e] = 0.f;
  }

  // Step-dependent vectors of `step` into parity buffer `par`.
  auto stage_step = [&](int step, int par) {
    float* tv = tvec_buf(par);
    for (int j = 0; j < p.slots; ++j) {
      const int k = g + j * p.groups;
      if (k >= K) continue;
      float* t = tv + j * (1 + L) * nsp;
      stage_f32(t, nsp, a.t_in + (static_cast<size_t>(step) * K + k) * H + n0, 0, 1, ncols);
      stage_f32(t + nsp, nsp, a.t_shift + (static_cast<size_t>(step) * K + k) * L * H + n0, H, L, ncols);
    }
    stage_f32(coef_buf(par), kCoefWidth, a.coef + static_cast<size_t>(step) * kCoefWidth, 0, 1, kCoefWidth);
    if (p.stage && a.noise != nullptr)
      stage_f32(noise_buf(par), lay.dp, a.noise + (static_cast<size_t>(step) * a.B + row0) * D, D, nrows, D);
  };

  AsyncGroups as;
  // Group 0: router weights, biases, FiLM terms, x and the first step's vectors.
  stage_f32(wts, K, a.wts + static_cast<size_t>(row0) * K, K, nrows, K);
  for (int j = 0; j < p.slots; ++j) {
    const int k = g + j * p.groups;
    if (k >= K) continue;
    float* bv = bvec + j * (L * nsp + dsp);
    stage_f32(bv, nsp, a.b_b + static_cast<size_t>(k) * L * H + n0, H, L, ncols);
    stage_f32(bv + L * nsp, dsp, a.b_out + static_cast<size_t>(k) * D + d0, 0, 1, dcols);
    if (p.stage) {
      float* cv = cvec + j * (1 + 2 * L) * BT * nsp;
      stage_f32(cv, nsp, a.c_in + (static_cast<size_t>(row0) * K + k) * H + n0, static_cast<size_t>(K) * H, nrows,
                ncols);
      for (int l = 0; l < L; ++l) {
        const size_t src = ((static_cast<size_t>(row0) * K + k) * L + l) * H + n0;
        stage_f32(cv + (1 + l) * BT * nsp, nsp, a.scale + src, static_cast<size_t>(K) * L * H, nrows, ncols);
        stage_f32(cv + (1 + L + l) * BT * nsp, nsp, a.shift + src, static_cast<size_t>(K) * L * H, nrows, ncols);
      }
    }
  }
  stage_f32(xs, lay.xst, a.x_in + static_cast<size_t>(row0) * D, D, nrows, D);
  stage_step(step_begin, 0);
  const int g_init = as.commit();

  // Groups 1..nslices: weight slices in chain order, as many as fit in shared memory.
  const int nq = 2 * L + 2;
  const int budget = p.smem_bytes - lay.wbase;
  {
    int used = 0;
    for (int s = 0; s < lay.nslices; ++s) {
      const int j = s / nq, q = s - j * nq;
      const int k = g + j * p.groups;
      const Slice sl = slice_geom(q, D, H, L, p);
      const int off = slice_offset_step(used, sl.bytes, budget);
      if (tid == 0) woff[s] = off;
      if (off >= 0 && k < K) {
        W* dst = reinterpret_cast<W*>(wbase + off);
        if (q == 0) {
          stage_slice<W>(dst, sl, w_in + static_cast<size_t>(k) * D * H + n0, H, ncols);
        } else if (q == nq - 1) {
          stage_slice<W>(dst, sl, w_out + static_cast<size_t>(k) * H * D + d0, D, dcols);
        } else {
          const int l = (q - 1) >> 1;
          const W* src = ((q & 1) ? w_a : w_b) + (static_cast<size_t>(k) * L + l) * H * H + n0;
          stage_slice<W>(dst, sl, src, H, ncols);
        }
      }
      as.commit();  // group index g_init + 1 + s
    }
  }

  unsigned used_mask = 0;
  int g_next = -1;
  for (int step = step_begin; step < step_end; ++step) {
    const int par = (step - step_begin) & 1;
    float* acc = acc_buf(par);
    for (int e = tid; e < BT * dsp; e += kThreads) acc[e] = 0.f;
    if (step == step_begin) {
      as.wait_for(g_init);
      as.wait_for(g_init + 1);
      // Cluster-wide: peers write into this block's shared memory from the first phase on.
      cluster_sync_or_block(S);
      for (int k = 0; k < K; ++k) {
        bool u = !a.skip_unused;
        for (int b = 0; b < nrows && !u; ++b) u = wts[b * K + k] != 0.f;
        if (u) used_mask |= 1u << k;
      }
    } else {
      as.wait_for(g_next);
      __syncthreads();
    }
    if (PERSISTENT && step + 1 < step_end) {
      stage_step(step + 1, par ^ 1);
      g_next = as.commit();
    }
    const float* coef = coef_buf(par);
    const float* tv = tvec_buf(par);

    for (int j = 0; j < p.slots; ++j) {
      const int k = g + j * p.groups;
      const bool on = k < K && ((used_mask >> k) & 1u);
      const int sbase = j * nq;
      const float* tin = tv + j * (1 + L) * nsp;
      const float* bv = bvec + j * (L * nsp + dsp);
      const float* cv = cvec + j * (1 + 2 * L) * BT * nsp;
      const size_t rk = static_cast<size_t>(row0) * K + k;  // (row0, k) row of the [B, K, ...] terms
      auto wptr = [&](int q, const W* gsrc, int gld, int& ld, bool& res) -> const W* {
        const int off = woff[sbase + q];
        res = off >= 0;
        if (res) {
          ld = slice_geom(q, D, H, L, p).stride;
          return reinterpret_cast<const W*>(wbase + off);
        }
        ld = gld;
        return gsrc;
      };
      auto next_ready = [&](int q) {  // wait for the slice the next phase reads
        const int s = sbase + q + 1;
        if (s < lay.nslices) as.wait_for(g_init + 1 + s);
      };

      // Phase 0: h = x W_in + t_in + c_in
      if (on) {
        const float* cin = p.stage ? cv : a.c_in + rk * H + n0;
        const int cst = p.stage ? nsp : K * H;
        auto epi = [&](int b, int c, float v) {
          const float y = (b < nrows) ? v + tin[c] + cin[b * cst + c] : 0.f;
          team_store(hs + b * lay.hst + n0 + c, y, team_base, R, S);
        };
        int ld;
        bool res;
        const W* w = wptr(0, w_in + static_cast<size_t>(k) * D * H + n0, H, ld, res);
        matmul<W, BT, MMA>(xs, lay.xst, D, w, res, ld, ncols, red, epi);
      }
      next_ready(0);
      cluster_sync_or_block(S);

      for (int l = 0; l < L; ++l) {
        // u = SiLU(scale * (h W_a) + shift + t_shift)
        if (on) {
          const float* tsh = tin + (1 + l) * nsp;
          const float* sc = p.stage ? cv + (1 + l) * BT * nsp : a.scale + (rk * L + l) * H + n0;
          const float* sh = p.stage ? cv + (1 + L + l) * BT * nsp : a.shift + (rk * L + l) * H + n0;
          const int sst = p.stage ? nsp : K * L * H;
          auto epi = [&](int b, int c, float v) {
            const float y = (b < nrows) ? silu(v * sc[b * sst + c] + sh[b * sst + c] + tsh[c]) : 0.f;
            team_store(us + b * lay.hst + n0 + c, y, team_base, R, S);
          };
          int ld;
          bool res;
          const W* w = wptr(1 + 2 * l, w_a + (static_cast<size_t>(k) * L + l) * H * H + n0, H, ld, res);
          matmul<W, BT, MMA>(hs, lay.hst, H, w, res, ld, ncols, red, epi);
        }
        next_ready(1 + 2 * l);
        cluster_sync_or_block(S);
        // h += u W_b + b_b (in place: each element is read and written by one thread,
        // and peers only read their own columns of h in this phase)
        if (on) {
          const float* bb = bv + l * nsp;
          auto epi = [&](int b, int c, float v) {
            float* hp = hs + b * lay.hst + n0 + c;
            const float y = (b < nrows) ? *hp + v + bb[c] : 0.f;
            team_store(hp, y, team_base, R, S);
          };
          int ld;
          bool res;
          const W* w = wptr(2 + 2 * l, w_b + (static_cast<size_t>(k) * L + l) * H * H + n0, H, ld, res);
          matmul<W, BT, MMA>(us, lay.hst, H, w, res, ld, ncols, red, epi);
        }
        next_ready(2 + 2 * l);
        cluster_sync_or_block(S);
      }

      // acc += w_k (h W_out + b_out) over this rank's columns of D
      if (on) {
        const float* bo = bv + L * nsp;
        auto epi = [&](int b, int c, float v) {
          // A zero weight leaves the component out of its row even when its output is NaN
          // (rows of one tile may be routed differently); a NaN weight is not zero.
          if (b < nrows && wts[b * K + k] != 0.f) acc[b * dsp + c] += wts[b * K + k] * (v + bo[c]);
        };
        int ld;
        bool res;
        const W* w = wptr(nq - 1, w_out + static_cast<size_t>(k) * H * D + d0, D, ld, res);
        matmul<W, BT, MMA>(hs, lay.hst, H, w, res, ld, dcols, red, epi);
      }
      next_ready(nq - 1);
      // Peers still read h in this phase, and the next component (or the combine) follows.
      cluster_sync_or_block(S);
    }

    if (!global_combine) {
      // Every block of the cluster computes the tile's new x from the groups' partials.
      const bool last = step + 1 == step_end;
      const bool noisy = a.noise != nullptr && coef[abi::kColAddsNoise] != 0.f;
      const float* nz = noise_buf(par);
      for (int o = tid; o < nrows * D; o += kThreads) {
        const int b = o / D, d = o - b * D;
        const int rr = d / p.ds, dl = d - rr * p.ds;
        float e = 0.f;
        for (int gg = 0; gg < p.gpc; ++gg) e += cluster_peer(acc, gg * R + rr, S)[b * dsp + dl];
        float z = 0.f;
        if (noisy)
          z = p.stage ? nz[b * lay.dp + d] : __ldg(a.noise + (static_cast<size_t>(step) * a.B + row0 + b) * D + d);
        const float xn = sched_update(xs[b * lay.xst + d], e, z, coef, a.clip, a.clip_range);
        xs[b * lay.xst + d] = xn;
        if (last && crank == 0) a.x_out[static_cast<size_t>(row0 + b) * D + d] = xn;
      }
      __syncthreads();
    } else if constexpr (!PERSISTENT) {
      // Publish this block's partial, then the tile's last arriving block applies the update.
      for (int o = tid; o < nrows * dcols; o += kThreads) {
        const int b = o / dcols, c = o - b * dcols;
        a.scratch[(static_cast<size_t>(g) * a.B + row0 + b) * D + d0 + c] = acc[b * dsp + c];
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) s_last = atomicAdd(a.counters + tile, 1) == R * p.groups - 1;
      __syncthreads();
      if (s_last) {
        __threadfence();
        const bool noisy = a.noise != nullptr && coef[abi::kColAddsNoise] != 0.f;
        for (int o = tid; o < nrows * D; o += kThreads) {
          const int b = o / D, d = o - b * D;
          const size_t row = static_cast<size_t>(row0 + b);
          float e = 0.f;
          for (int gg = 0; gg < p.groups; ++gg) e += __ldcg(a.scratch + (gg * static_cast<size_t>(a.B) + row) * D + d);
          const float z = noisy ? __ldg(a.noise + (static_cast<size_t>(step) * a.B + row) * D + d) : 0.f;
          a.x_out[row * D + d] = sched_update(xs[b * lay.xst + d], e, z, coef, a.clip, a.clip_range);
        }
        if (tid == 0) a.counters[tile] = 0;  // ready for the next launch
      }
    }
  }
  // Peers read this block's partials over DSMEM in the last combine: stay resident until they are done.
  if (!global_combine && S > 1) cluster_sync_or_block(S);
}

#endif  // __CUDACC__ || FDP_HOST_EMULATION

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
  fi.clusters = di.cluster != 0 && at.binaryVersion >= 90;
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
        if (o.ranks <= 1) cands.emplace_back(1, 1, 1);
      }
      if (cands.empty())
        throw std::invalid_argument("`groups` = K > 1 in the persistent kernel needs thread-block clusters (sm_90)");
    } else {
      const int G = o.groups ? o.groups : (tiles < di.sms ? K : 1);
      if (o.ranks) {
        cands.emplace_back(o.ranks, G, 1);
      } else {
        int r = 1;
        if (fi.clusters) {
          // Enough ranks that a block's weight slices stay small (staged per launch), but
          // not so many blocks that the grid runs in several waves.
          const int64_t per_block = comp_bytes * cdiv(K, G);
          // (MMA: at least 64 columns per rank, so all 8 warps own an 8-column tile.)
          while (r < kMaxCluster && per_block / r > 96 * 1024 && cdiv(H, 2 * r) >= (mma ? 64 : 16)) r *= 2;
          while (r > 1 && int64_t(tiles) * G * r > 2 * int64_t(di.sms)) r /= 2;
        }
        for (; r >= 1; r /= 2) cands.emplace_back(r, G, 1);
      }
    }
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
  }
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

inline void launch_plan(int kind, const void* fn, const Plan& p, const Args& a, int step_begin, int step_end,
                        cudaStream_t stream) {
  if (kind == kStep && step_end != step_begin + 1)
    throw std::invalid_argument("the per-step kernel runs exactly one step per launch, got steps [" +
                                std::to_string(step_begin) + ", " + std::to_string(step_end) + ")");
  cudaLaunchConfig_t cfg = {};
  const int S = p.ranks * p.gpc;
  cfg.gridDim = dim3(static_cast<unsigned>(S * p.tiles), static_cast<unsigned>(p.groups / p.gpc), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(p.smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  if (S > 1) {
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = static_cast<unsigned>(S);
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
  }
  Args args = a;
  Plan plan = p;
  void* params[] = {&args, &plan, &step_begin, &step_end};
  check_cuda(cudaLaunchKernelExC(&cfg, fn, params), "kernel launch");
  check_cuda(cudaGetLastError(), "kernel launch");
}

// Steps [step_begin, step_end) of kernel `kind`: the persistent kernel in one launch, the
// per-step kernel once per step (the first launch reads x_in, later ones update x_out in place).
inline void launch_steps(int kind, const void* fn, const Plan& p, Args a, int step_begin, int step_end,
                         cudaStream_t stream) {
  if (kind == kPersistent) {
    launch_plan(kind, fn, p, a, step_begin, step_end, stream);
    return;
  }
  for (int s = step_begin; s < step_end; ++s) {
    launch_plan(kind, fn, p, a, s, s + 1, stream);
    a.x_in = a.x_out;
  }
}

}  // namespace mlp
}  // namespace fdp
