// The fused MLP kernels' shared types and constants: launch arguments, the plan, the
// shared-memory layout and weight-slice geometry (host and device). See mlp_common.cuh.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

#include <cstddef>
#include <cstdint>

#include <string>

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
  // Inpainting (fdp.inpainting), null: none. After step s's update x = known_mask ? known[s * known_stride] : x.
  const float* known;                 // [B, D], known_stride 0, or [T, B, D], known_stride B * D
  const unsigned char* known_mask;    // [B, D]
  size_t known_stride;
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
  int xst, hst, nsp, dsp, dp, pst;  // row strides in floats
  int xs, hs, us, part, wts, coef, noise, tvec, bvec, cvec, mbar, tok, woff, wbase;
  int part_sz, coef_sz, noise_sz, tvec_sz;  // bytes of one parity buffer
  int nslices;
};

// The mbarriers of a block (8 bytes each, at lay.mbar), in this order: the two hidden-activation
// buffers (hs, us), then the combine's partials of even and odd steps.
constexpr int kBarHs = 0, kBarUs = 1, kBarPart = 2, kNumBars = 4;

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
  // Per step parity, one [bt, pst] slot per component group of the cluster. Combined in the
  // cluster, every block pushes its weighted partial (its columns of D) into its group's slot of
  // every block, so the combine reads local memory; combined in global memory (groups > gpc),
  // a block keeps its own columns only.
  y.pst = p.groups == p.gpc ? y.dp : y.dsp;
  y.part_sz = rup(p.gpc * p.bt * y.pst * 4, 16);
  y.part = take(off, 2 * y.part_sz);
  y.wts = take(off, p.bt * K * 4);
  y.coef_sz = kCoefWidth * 4;
  y.coef = take(off, 2 * y.coef_sz);
  y.noise_sz = p.stage ? rup(p.bt * y.dp * 4, 16) : 0;
  y.noise = take(off, 2 * y.noise_sz);
  y.tvec_sz = rup(p.slots * (1 + L) * y.nsp * 4, 16);
  y.tvec = take(off, 2 * y.tvec_sz);
  y.bvec = take(off, p.slots * (L * y.nsp + y.dsp) * 4);
  y.cvec = take(off, p.stage ? p.slots * (1 + 2 * L) * p.bt * y.nsp * 4 : 0);
  y.mbar = take(off, kNumBars * 8);
  y.tok = take(off, kNumBars * 4);  // a word per mbarrier that blocks without columns write (never read)
  y.nslices = p.slots * (2 * L + 2);
  y.woff = take(off, y.nslices * 4);
  y.wbase = off;
  return y;
}

// Weight slice q of a component (0: W_in, 1+2l: W_a[l], 2+2l: W_b[l], 2L+1: W_out)
// as staged in shared memory: `rows` x `stride` elements, zero padded; the 16-byte units of
// row i permuted by fma_unit (sw = 1: not permuted).
struct Slice {
  int in, cols, rows, stride, bytes, sw;
};

// FMA slices. mm_fma's lanes load one 16-byte unit each from consecutive rows, so the 8 lanes of a
// quarter warp must find their rows' units in 8 different groups of 4 banks (a 128-byte line has 8
// units). A row of U units stores unit u at fma_unit(u, row, sw), which gives 8 consecutive rows
// 8 different groups when U is a multiple of 8 (sw = 8: u ^ row mod 8) or a power of two below 8
// (sw = U: the U rows that start on the same group differ in the swizzle). Other widths are padded
// to an odd U, which spreads consecutive rows over the 8 groups unpermuted (sw = 1).
FDP_HD int fma_units(int cols, int wsize) {
  const int u = cdiv(cols, 16 / wsize);
  return (u % 8 == 0 || (u & (u - 1)) == 0) ? u : (u | 1);
}
FDP_HD int fma_swizzle_width(int units) { return units % 8 == 0 ? 8 : (units & (units - 1)) == 0 ? units : 1; }
// Depends on row mod 8 only, so the rows of one lane (lane + 32 k) share it.
FDP_HD int fma_unit(int u, int row, int sw) { return u ^ ((row * sw >> 3) & (sw - 1)); }

FDP_HD Slice slice_geom(int q, int D, int H, int L, const Plan& p) {
  Slice s;
  const bool out = (q == 2 * L + 1);
  s.in = (q == 0) ? D : H;
  s.cols = out ? p.ds : p.ns;
  s.rows = p.mma ? rup(s.in, 8) : s.in;  // MMA k-steps of 8 read zero rows past `in`
  // MMA: +8 elements shift consecutive rows by 4 banks (conflict-free B fragments).
  const int units = fma_units(s.cols, p.wsize);
  s.stride = p.mma ? rup(s.cols, 8) + 8 : units * (16 / p.wsize);
  s.sw = p.mma ? 1 : fma_swizzle_width(units);
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

}  // namespace mlp
}  // namespace fdp
