// Host emulation of the CUDA primitives used by the fused MLP kernels (csrc/mlp_*.cuh).
//
// Test-only. csrc/mlp_types.cuh includes this header when compiled with
// -DFDP_HOST_EMULATION='"emu.h"' (see tests/test_cuda_emulation.py and
// README.md next to this file); the device code of `run_tile` then runs on
// host threads, one std::thread-like pthread per CUDA thread, so CI without a
// GPU still checks the kernels' indexing and arithmetic against the float64
// reference. It models *results*, not timing or the memory model:
//   - barriers (__syncthreads, cluster sync) are std::barrier;
//   - warp shuffles and mma.sync exchange values through a per-warp buffer
//     fenced by a 32-thread barrier (so all 32 lanes must take part, as the
//     kernels' full-mask calls require on the GPU);
//   - cp.async copies synchronously, so commit/wait are no-ops (a missing
//     wait is NOT detected; a missing barrier after a wait is only caught
//     when it races visibly, e.g. under a thread sanitizer);
//   - distributed shared memory maps an address to the same offset in a peer
//     block's buffer and aborts on addresses outside shared memory.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace emu {

struct Warp {
  std::barrier<>* bar = nullptr;  // the warp's 32 lanes
  float f[2][32];                 // shuffle exchange, double buffered (see __shfl_xor_sync)
  float A[2][16][8];              // mma m16n8k8 operands gathered from the fragments,
  float B[2][8][8];               // double buffered like the shuffles
};

struct Block {
  std::vector<unsigned char> smem;  // dynamic shared memory
  int s_last = 0;                   // the kernel's static __shared__ int
  std::barrier<>* bar = nullptr;    // __syncthreads
  Warp warps[8];                    // kThreads / 32
};

struct Cluster {
  std::vector<Block*> blocks;      // indexed by cluster rank
  std::barrier<>* bar = nullptr;  // all threads of all blocks
};

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

// Each host thread plays one CUDA thread; these say which.
inline thread_local Block* t_block = nullptr;
inline thread_local Cluster* t_cluster = nullptr;
inline thread_local Dim t_tid, t_bid;
inline thread_local unsigned t_shfl_count = 0;  // shuffles this lane has made (buffer parity)
inline thread_local unsigned t_mma_count = 0;   // likewise for mma

inline unsigned char* block_smem() { return t_block->smem.data(); }
inline int& block_s_last() { return t_block->s_last; }
inline uint32_t bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float flt(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
[[noreturn]] inline void die(const char* what) { std::fprintf(stderr, "emu: %s\n", what); std::abort(); }

}  // namespace emu

#define threadIdx (emu::t_tid)
#define blockIdx (emu::t_bid)

inline void __syncthreads() { emu::t_block->bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __trap() { emu::die("__trap"); }
inline float __uint_as_float(unsigned u) { return emu::flt(u); }
inline unsigned __float_as_uint(float x) { return emu::bits(x); }
// The kernels' fast exp only feeds SiLU; the tolerance covers its error on the GPU.
inline float __expf(float x) { return std::exp(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// Every lane publishes its value, waits for all 32, then reads its partner's.
// Barriers dominate the emulation's run time (each is a round of context
// switches), so shuffles alternate between two buffers instead of waiting a
// second time: a lane can only reuse a buffer after the next warp barrier,
// which every lane reaches only after finishing its read of that buffer.
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x & 31;
  emu::Warp& w = emu::t_block->warps[threadIdx.x >> 5];
  float* buf = w.f[emu::t_shfl_count++ & 1];
  buf[lane] = v;
  w.bar->arrive_and_wait();
  return buf[lane ^ off];
}

namespace fdp {
namespace mlp {

// cp.async as plain copies: the data is there at once, so waits have nothing to do.
inline void cp_async16(void* d, const void* s) { std::memcpy(d, s, 16); }
inline void cp_async8(void* d, const void* s) { std::memcpy(d, s, 8); }
inline void cp_async4(void* d, const void* s) { std::memcpy(d, s, 4); }
inline void cp_async_wait(int) {}
inline void cp_async_commit() {}

inline void cluster_sync_or_block(int S) {
  if (S > 1) emu::t_cluster->bar->arrive_and_wait();
  else __syncthreads();
}

// map_shared_rank: same offset in the peer's shared memory. Aborts on a pointer
// that is not in this block's shared memory or a rank outside the cluster,
// which on the GPU would be undefined behaviour rather than a clean error.
template <typename T>
inline T* cluster_peer(T* p, int rank, int S) {
  if (S <= 1) return p;
  unsigned char* base = emu::t_block->smem.data();
  const auto* bp = reinterpret_cast<const unsigned char*>(p);
  const std::ptrdiff_t off = bp - base;
  if (off < 0 || off >= static_cast<std::ptrdiff_t>(emu::t_block->smem.size())) emu::die("DSMEM map of a non-shared address");
  if (rank < 0 || rank >= static_cast<int>(emu::t_cluster->blocks.size())) emu::die("DSMEM rank outside the cluster");
  return reinterpret_cast<T*>(emu::t_cluster->blocks[rank]->smem.data() + off);
}

inline void team_store(float* p, float v, int team_base, int R, int S) {
  if (R > 1) {
    for (int q = 0; q < R; ++q) *cluster_peer(p, team_base + q, S) = v;
  } else {
    *p = v;
  }
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero; Inf/NaN pass through.
inline unsigned to_tf32(float x) {
  uint32_t u = emu::bits(x);
  if ((u & 0x7f800000u) != 0x7f800000u) {
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  return u;
}

// mma.sync.m16n8k8 tf32, with the PTX fragment layout (g = lane/4, t = lane%4):
// A a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4); B b0 (k=t,n=g) b1 (k=t+4,n=g);
// C/D c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1). A fragment-layout mistake in
// the kernel therefore shows up as a wrong result here. The B operand is the
// 16-bit weight, which must already be exact in TF32; the hardware would
// silently drop the low bits, so a violation aborts. Summation order differs
// from the tensor core's (covered by the 16-bit tolerance).
inline void mma_tf32(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  emu::Warp& w = emu::t_block->warps[threadIdx.x >> 5];
  if ((b0 & 0x1fffu) || (b1 & 0x1fffu)) emu::die("mma B operand is not a TF32 value");
  const unsigned par = emu::t_mma_count++ & 1;
  float (&A)[16][8] = w.A[par];
  float (&B)[8][8] = w.B[par];
  A[g][t] = emu::flt(a0);
  A[g + 8][t] = emu::flt(a1);
  A[g][t + 4] = emu::flt(a2);
  A[g + 8][t + 4] = emu::flt(a3);
  B[t][g] = emu::flt(b0);
  B[t + 4][g] = emu::flt(b1);
  w.bar->arrive_and_wait();
  for (int q = 0; q < 4; ++q) {
    const int r = g + (q >> 1) * 8, c = 2 * t + (q & 1);
    float s = 0.f;
    for (int k = 0; k < 8; ++k) s += A[r][k] * B[k][c];
    d[q] += s;
  }
}

}  // namespace mlp
}  // namespace fdp
