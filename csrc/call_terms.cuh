// One sampling call's per-call terms: the router (its MLP and strategy) and every component's conditioning
// terms, from the features c [B, Dc] and the packed layout of python/fdp/packing.py (PackedCond, float32):
//
//   weights [B, K]        strategy(relu(c W1 + b1) W2 + b2)            (fixed: the fixed weights)
//   c_in    [B, K, H]     \
//   scale   [B, K, L, H]   }  p = c W + b (cond_w [Dk, N], cond_b [N], N = K (1 + 2L) H), split by column
//   shift   [B, K, L, H]  /
//
// written into one float32 buffer in that order (fdp.packing.split_call_terms). The definition is
// fdp.packing.reference_call_terms; the Triton twin fdp_kernels/call_terms.py. Strategies (abi.h) and the
// router's NaN rules: soft = softmax; tanh = signed, unnormalised; hard = one-hot at the largest logit and topk =
// softmax over the topk largest, ties to the lowest index; a row with a NaN or +Inf logit is NaN (tanh: any
// non-finite logit); fixed skips the router's MLP. Unconditional components (Dk = 0) never read c.
//
// Work: grid (col_blocks + 1, row tiles of kRows). Block x < col_blocks: thread t owns column x * kThreads + t of
// p for the tile's rows (coalesced weight reads, the tile's c values broadcast). Block col_blocks: the router of
// the tile's rows, one row at a time: every thread sums its hidden units' share of the K logits, a tree reduction
// in shared memory adds the shares, thread 0 applies the strategy. No block reads another's output.
//
// The block body is written once, over "each thread does f, then the block synchronises" (Each): on the GPU
// that is f(threadIdx.x) then __syncthreads(); the host emulation (tests/cuda_emulation/call_terms_driver.cpp)
// runs f for every thread in turn, so it executes this same code under ASan/UBSan.
#pragma once

#include <cmath>
#include <cstdint>

#include "abi.h"

#if defined(__CUDACC__)
#define FDP_CT_HD __host__ __device__ __forceinline__
#else
#define FDP_CT_HD inline
#endif

namespace fdp {
namespace call {

constexpr int kThreads = 256;
constexpr int kRows = 8;  // rows of a tile: each column thread keeps kRows sums

struct Args {
  const float* c;  // [B, Dc] float32, contiguous
  const float* w1;  // [Dc, Hr]
  const float* b1;  // [Hr]
  const float* w2;  // [Hr, K]
  const float* b2;  // [K]
  const float* fixed;  // [K]
  const float* cw;  // [Dk, N]
  const float* cb;  // [N]
  float* out;  // call_terms_numel(B, K, L, H)
  std::int64_t B, Dc, Dk, Hr, K, L, H;
  int strategy, topk;
};

FDP_CT_HD std::int64_t columns(const Args& a) { return a.K * (1 + 2 * a.L) * a.H; }
FDP_CT_HD std::int64_t col_blocks(const Args& a) { return (columns(a) + kThreads - 1) / kThreads; }

FDP_CT_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

FDP_CT_HD float tanh_f(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}

FDP_CT_HD bool below_inf(float x) { return x < INFINITY; }  // false for NaN and +Inf

// Column n of p for the tile's rows, stored into the tensor it belongs to.
FDP_CT_HD void column_thread(const Args& a, std::int64_t bx, std::int64_t by, int t) {
  const std::int64_t N = columns(a), n = bx * kThreads + t;
  if (n >= N) return;
  const std::int64_t r0 = by * kRows;
  const int rows = static_cast<int>(a.B - r0 < kRows ? a.B - r0 : kRows);
  // Loops over all kRows with a guard, unrolled, so that `acc` stays in registers (see router_finish).
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  const float* c = a.c + r0 * a.Dc;
  for (std::int64_t d = 0; d < a.Dk; ++d, ++c) {
    const float w = a.cw[d * N + n];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) acc[r] += c[r * a.Dc] * w;
  }
  const float bias = a.cb[n];
  const std::int64_t KH = a.K * a.H, KLH = a.K * a.L * a.H, BK = a.B * a.K;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) continue;
    const std::int64_t row = r0 + r;
    std::int64_t off;
    if (n < KH) off = BK + row * KH + n;
    else if (n < KH + KLH) off = BK + a.B * KH + row * KLH + (n - KH);
    else off = BK + a.B * KH + a.B * KLH + row * KLH + (n - KH - KLH);
    a.out[off] = acc[r] + bias;
  }
}

// Thread t's share of row `row`'s logits: its hidden units h = t, t + kThreads, ... into sm[t * kMaxK + k].
FDP_CT_HD void router_partial(const Args& a, std::int64_t row, int t, float* sm) {
  float part[abi::kMaxK];
  for (int k = 0; k < abi::kMaxK; ++k) part[k] = 0.0f;
  const float* c = a.c + row * a.Dc;
  for (std::int64_t h = t; h < a.Hr; h += kThreads) {
    float s = 0.0f;
    for (std::int64_t d = 0; d < a.Dc; ++d) s += c[d] * a.w1[d * a.Hr + h];
    s += a.b1[h];
    s = s < 0.0f ? 0.0f : s;  // ReLU that keeps NaN, as torch's
    // Over all kMaxK slots with a guard, unrolled, so that `part` stays in registers.
#pragma unroll
    for (int k = 0; k < abi::kMaxK; ++k)
      if (k < a.K) part[k] += s * a.w2[h * a.K + k];
  }
  for (int k = 0; k < abi::kMaxK; ++k) sm[t * abi::kMaxK + k] = part[k];
}

FDP_CT_HD void router_reduce(int s, int t, float* sm) {
  if (t < s)
    for (int k = 0; k < abi::kMaxK; ++k) sm[t * abi::kMaxK + k] += sm[(t + s) * abi::kMaxK + k];
}

// The strategy on row `row`'s logits (sm[0 .. K)), stored as its weights. Every loop runs over all kMaxK
// slots with a guard and is unrolled, so that l, w and keep are indexed by constants and stay in registers
// (a loop bounded by K indexes them at run time: a local-memory array).
FDP_CT_HD void router_finish(const Args& a, std::int64_t row, const float* sm) {
  const int K = static_cast<int>(a.K);
  const bool tanh_strategy = a.strategy == abi::kStrategyTanh;
  float l[abi::kMaxK], w[abi::kMaxK];
  bool bad = false;
#pragma unroll
  for (int k = 0; k < abi::kMaxK; ++k) {
    l[k] = k < K ? sm[k] + a.b2[k] : 0.0f;
    if (k < K) bad = bad || (tanh_strategy ? !(l[k] < INFINITY && l[k] > -INFINITY) : !below_inf(l[k]));
  }
  if (tanh_strategy) {
#pragma unroll
    for (int k = 0; k < abi::kMaxK; ++k) w[k] = k < K ? tanh_f(l[k]) : 0.0f;
  } else {
    bool keep[abi::kMaxK];
    const int n = a.strategy == abi::kStrategySoft ? K : (a.strategy == abi::kStrategyHard ? 1 : a.topk);
#pragma unroll
    for (int k = 0; k < abi::kMaxK; ++k) {
      int rank = 0;  // how many logits beat logit k: larger, or equal at a lower index
#pragma unroll
      for (int j = 0; j < abi::kMaxK; ++j) rank += j < K && ((l[j] > l[k]) || (l[j] == l[k] && j < k));
      keep[k] = k < K && rank < n;
    }
    if (a.strategy == abi::kStrategyHard) {
#pragma unroll
      for (int k = 0; k < abi::kMaxK; ++k) w[k] = keep[k] ? 1.0f : 0.0f;
    } else {
      float m = -INFINITY, sum = 0.0f;  // every kept logit -Inf: exp(-Inf + Inf) is NaN, as torch's softmax
#pragma unroll
      for (int k = 0; k < abi::kMaxK; ++k) if (keep[k] && l[k] > m) m = l[k];
#pragma unroll
      for (int k = 0; k < abi::kMaxK; ++k) {
        w[k] = keep[k] ? exp_f(l[k] - m) : 0.0f;
        sum += w[k];
      }
#pragma unroll
      for (int k = 0; k < abi::kMaxK; ++k) w[k] /= sum;
    }
  }
#pragma unroll
  for (int k = 0; k < abi::kMaxK; ++k)
    if (k < K) a.out[row * a.K + k] = bad ? NAN : w[k];
}

// The whole block (bx, by); `each(f)` runs f(t) for every thread t, then synchronises the block. `sm` holds
// kThreads * abi::kMaxK floats.
template <class Each>
FDP_CT_HD void call_terms_block(const Args& a, std::int64_t bx, std::int64_t by, float* sm, const Each& each) {
  if (bx < col_blocks(a)) {
    each([&](int t) { column_thread(a, bx, by, t); });
    return;
  }
  const std::int64_t r0 = by * kRows, r1 = a.B < r0 + kRows ? a.B : r0 + kRows;
  if (a.strategy == abi::kStrategyFixed) {
    each([&](int t) {
      for (std::int64_t i = t; i < (r1 - r0) * a.K; i += kThreads) a.out[r0 * a.K + i] = a.fixed[i % a.K];
    });
    return;
  }
  for (std::int64_t row = r0; row < r1; ++row) {
    each([&](int t) { router_partial(a, row, t, sm); });
    for (int s = kThreads / 2; s > 0; s >>= 1) each([&](int t) { router_reduce(s, t, sm); });
    each([&](int t) { if (t == 0) router_finish(a, row, sm); });  // its sync: sm is reused by the next row
  }
}

}  // namespace call
}  // namespace fdp
