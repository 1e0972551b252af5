// Device helpers of the fused MLP kernels: weight loads per type, cp.async staging,
// cluster (DSMEM) exchange, the FMA and tensor-core matmuls, the scheduler update.
#pragma once

#include "mlp_types.cuh"

#if defined(FDP_HOST_EMULATION)
#include <cstring>
#endif

#if defined(__CUDACC__) || defined(FDP_HOST_EMULATION)

namespace fdp {
namespace mlp {

// Loads from shared memory, typed as such. The matmuls take their weights through a pointer
// chosen at run time (a resident slice in shared memory or the matrix in global memory), so
// the compiler cannot infer the address space and would emit generic loads (LD.E); the
// SMEM instantiations read with explicit ld.shared instead (LDS). The emulation has one
// address space: plain loads.
#if defined(FDP_HOST_EMULATION)
template <typename T>
inline T lds(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
#else
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// volatile: not moved across the barriers and cp.async waits that make the data valid.
template <typename T>
__device__ __forceinline__ T lds(const void* p);
template <>
__device__ __forceinline__ float4 lds<float4>(const void* p) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(smem_u32(p)));
  return v;
}
template <>
__device__ __forceinline__ uint4 lds<uint4>(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_u32(p)));
  return v;
}
template <>
__device__ __forceinline__ float lds<float>(const void* p) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem_u32(p)));
  return v;
}
template <>
__device__ __forceinline__ unsigned short lds<unsigned short>(const void* p) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(smem_u32(p)));
  return v;
}
#endif

template <typename W>
struct WT;

template <>
struct WT<float> {
  static constexpr int V = 4;  // elements per 16-byte load
  __device__ static float f(float w) { return w; }
  template <bool SMEM>
  __device__ static float load1(const float* p) {
    return SMEM ? lds<float>(p) : __ldg(p);
  }
  template <bool SMEM>
  __device__ static void load_vec(const float* p, float (&o)[V]) {
    const float4 v = SMEM ? lds<float4>(p) : __ldg(reinterpret_cast<const float4*>(p));
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
    const unsigned short u = SMEM ? lds<unsigned short>(p) : __ldg(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(static_cast<unsigned>(u) << 16);
  }
  template <bool SMEM>
  __device__ static void load_vec(const __nv_bfloat16* p, float (&o)[V]) {
    const uint4 v = SMEM ? lds<uint4>(p) : __ldg(reinterpret_cast<const uint4*>(p));
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
    const unsigned short u = SMEM ? lds<unsigned short>(p) : __ldg(reinterpret_cast<const unsigned short*>(p));
    return __half2float(__ushort_as_half(u));
  }
  template <bool SMEM>
  __device__ static void load_vec(const __half* p, float (&o)[V]) {
    const uint4 v = SMEM ? lds<uint4>(p) : __ldg(reinterpret_cast<const uint4*>(p));
    float2 a = h2_to_f2(v.x), b = h2_to_f2(v.y), c = h2_to_f2(v.z), d = h2_to_f2(v.w);
    o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
    o[4] = c.x; o[5] = c.y; o[6] = d.x; o[7] = d.y;
  }
};

#if !defined(FDP_HOST_EMULATION)
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

// Programmatic dependent launch (sm_90+; launch_steps in mlp_host.cuh). grid_dependency_wait
// returns once the grid this launch depends on programmatically has completed and its writes
// are visible; launch_dependents lets the next such grid start. Both are no-ops in a launch
// without that dependency and in code built below sm_90 (the host never asks for it there).
#if defined(FDP_HOST_EMULATION)
void grid_dependency_wait();  // tests/cuda_emulation/emu_runtime.h
void launch_dependents();
#else
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#endif

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
  // One-row copies (the step vectors and coefficients the persistent kernel prefetches every step)
  // skip the division.
  if (v4) {
    const int c4 = cols / 4;
    for (int e = tid; e < rows * c4; e += kThreads) {
      const int i = rows == 1 ? 0 : e / c4, c = (e - i * c4) * 4;
      cp_async16(dst + i * dst_stride + c, src + i * src_stride + c);
    }
  } else {
    for (int e = tid; e < rows * cols; e += kThreads) {
      const int i = rows == 1 ? 0 : e / cols, c = e - i * cols;
      cp_async4(dst + i * dst_stride + c, src + i * src_stride + c);
    }
  }
}

// Stage a weight slice: `in` rows x `ncols` columns of a row-major matrix with
// leading dimension `ld` (src points at row 0, first column of the slice) into
// a zero-padded `sl.rows` x `sl.stride` block, 16-byte units swizzled as slice_geom says.
template <typename W>
__device__ void stage_slice(W* dst, const Slice& sl, const W* src, int ld, int ncols) {
  constexpr int E = sizeof(W), U = 16 / E;
  const int tid = threadIdx.x;
  // Element (i, c) of the slice; copies of 4 or 8 bytes stay within a unit.
  auto at = [&](int i, int c) { return dst + i * sl.stride + fma_unit(c / U, i, sl.sw) * U + c % U; };
  const uintptr_t a = reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(ld) * E;
  const int cb = (a & 15) == 0 ? 16 : (a & 7) == 0 ? 8 : (a & 3) == 0 ? 4 : 0;
  int done_cols = 0;
  if (cb >= E && ncols > 0) {
    const int ce = cb / E;
    const int nch = ncols / ce;
    if (nch > 0) {
      for (int e = tid; e < sl.in * nch; e += kThreads) {
        const int i = e / nch, c = (e - i * nch) * ce;
        W* d = at(i, c);
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
      *at(i, c) = src[static_cast<size_t>(i) * ld + c];
    }
  }
  // Zero padding: columns past ncols, rows past `in` (MMA k-steps read them).
  const int pad = sl.stride - imax(ncols, 0);
  if (pad > 0) {
    for (int e = tid; e < sl.in * pad; e += kThreads) {
      const int i = e / pad, c = imax(ncols, 0) + (e - i * pad);
      *at(i, c) = W(0.0f);
    }
  }
  for (int e = tid; e < (sl.rows - sl.in) * sl.stride; e += kThreads) dst[sl.in * sl.stride + e] = W(0.0f);
}

// Elements first, first + stride, first + 2 stride, ... of a rows x width block as (row, column),
// with the divisions done once (per launch) instead of per element: a step adds stride / width rows
// and stride % width columns, and a column past the width carries into the next row.
struct RowWalk {
  int b0, c0, db, dc;
  FDP_HD RowWalk(int first, int stride, int width)
      : b0(first / width), c0(first % width), db(stride / width), dc(stride % width) {}
};

// f(b, c) for every element of the walk in the first `rows` rows (`width` as the walk was made with).
template <class F>
__device__ __forceinline__ void walk_rows(const RowWalk& w, int rows, int width, F&& f) {
  for (int b = w.b0, c = w.c0; b < rows; b += w.db, c += w.dc) {
    if (c >= width) {
      c -= width;
      if (++b >= rows) break;
    }
    f(b, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Cluster plumbing. S is the cluster size (1: no cluster, plain block barriers).
//
// Blocks of a cluster hand data to each other by pushing it (sm_90): st.async writes 4 bytes into
// a peer's shared memory and then counts them off the transaction count of an mbarrier in that
// peer. The receiver arrives on its own mbarrier with the number of bytes the exchange brings
// (arrive.expect_tx; the count may go negative first, as PTX allows) and waits for the phase to
// complete (run_tile: every thread of the block arrives on the team exchanges' mbarriers, and every
// warp waits itself). Completion has release semantics at cluster scope for the counted stores
// (PTX: st.async is a weak store whose complete-tx is .release at .cluster scope), so the waiting
// threads see the data without a cluster-wide barrier or fence. PTX does not say that it also
// orders the writer's EARLIER reads; the kernels rely on data dependence instead: a warp that
// reads the buffer a later exchange overwrites owns whole output columns and pushes values
// computed from all its reads (summed over its lanes by shuffles, or through mma.sync), so those
// reads have completed before the receiver's phase can (mlp_tile.cuh, the exchanges' comment).
// Peer addresses are 32-bit shared::cluster addresses (mapa). The `parity` arguments of
// arrivals and stores name the barrier phase the caller means: the hardware does not take them,
// the host emulation checks them.

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

// The cluster barrier before exit (S > 1), with a relaxed arrive: it only keeps every block alive
// until no st.async into it can be in flight (run_tile says why that holds once all have arrived), a
// fact each block learned from its own mbarriers before arriving, not from memory the barrier would
// have to order. A release arrive (this_cluster().sync()) costs a MEMBAR.ALL.GPU first, which waits
// for the block's outstanding global stores (the last step's x) for nobody: no thread reads anything
// after this barrier, and the kernel's end makes those stores visible.
__device__ __forceinline__ void cluster_exit_sync(int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  }
#else
  if (S > 1) __trap();  // a cluster launch of a binary built without cluster support
#endif
}

// The shared::cluster address of `p` (this block's shared memory) in cluster rank `rank`.
__device__ __forceinline__ unsigned cluster_addr(const void* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_u32(p)), "r"(rank));
  return a;
#else
  (void)p;
  (void)rank;
  __trap();
  return 0;
#endif
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#else
  (void)bar;
  (void)count;
  __trap();
#endif
}

// Makes the initialised mbarriers visible to the cluster's st.async (a cluster barrier follows).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void mbar_arrive_expect(uint64_t* bar, unsigned bytes, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)parity;
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#else
  (void)bar;
  (void)bytes;
  (void)parity;
  __trap();
#endif
}

// An arrival without transactions; releases the caller's earlier memory operations (CTA scope) to
// the threads that see the phase complete.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)parity;
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#else
  (void)bar;
  (void)parity;
  __trap();
#endif
}

// Until the phase of `bar` with this parity has completed; acquires the stores it counted.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
#else
  (void)bar;
  (void)parity;
  __trap();
#endif
}

// v at cluster address `addr`; its 4 bytes complete on the mbarrier at cluster address `bar`, which
// must be in the same block.
__device__ __forceinline__ void st_async(unsigned addr, float v, unsigned bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)parity;
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(addr),
               "r"(__float_as_uint(v)), "r"(bar)
               : "memory");
#else
  (void)addr;
  (void)v;
  (void)bar;
  (void)parity;
  __trap();
#endif
}
#endif  // !FDP_HOST_EMULATION

// Bytes rank q of R pushes in one exchange: `rows` x its share of `total` columns (`per` to a
// rank) 4-byte values, or one token word when it has no columns, so that every rank's arrival
// also says it has reached the exchange.
FDP_HD int rank_bytes(int rows, int total, int per, int q) {
  const int cols = imax(0, imin(total - q * per, per));
  return cols > 0 ? rows * cols * 4 : 4;
}

// Bytes the ranks other than r of R push into rank r in one exchange (all of them within shared
// memory, so far below the 2^20 - 1 a transaction count holds).
FDP_HD int peer_bytes(int rows, int total, int per, int R, int r) {
  int n = 0;
  for (int q = 0; q < R; ++q)
    if (q != r) n += rank_bytes(rows, total, per, q);
  return n;
}

// ---------------------------------------------------------------------------------------------
// Matmuls: out[b, c] = sum_i act[b*lda + i] * w[i*ldw + c], handed to epi(b, c, out)
// for c < ncols; every (b, c) goes to exactly one thread.

template <int BT, int V>
__device__ __forceinline__ void fma_rows(float (&acc)[BT * V], const float* act, int lda, int i, const float (&wv)[V]) {
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    const float a = act[b * lda + i];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[b * V + j] = fmaf(a, wv[j], acc[b * V + j]);
  }
}

// Sums each of the N values of a[] over the warp's 32 lanes, every sum ending in one place: a
// reduce-scatter by recursive halving over lane offsets 16, 8, ..., 1. At a level LIVE values are
// left; a lane keeps their upper half if its OFF bit is set (else the lower), sends the other half
// to lane ^ OFF and adds what that lane sends for the half it keeps: N/2 + N/4 + ... shuffles in
// all, not N per level. Once one value is left (N < 32), the remaining levels add it across lanes.
// Afterwards lane l holds in a[0 .. per) the sums of the flat indices (l / rep) * per + m, where
// per = max(N / 32, 1), and the rep = max(32 / N, 1) lanes with equal l / rep hold the same sums.
template <int OFF, int LIVE, int N>
__device__ __forceinline__ void warp_reduce_scatter(float (&a)[N], int lane) {
  if constexpr (OFF > 0) {
    if constexpr (LIVE > 1) {
      constexpr int h = LIVE / 2;
      const bool up = (lane & OFF) != 0;
#pragma unroll
      for (int m = 0; m < h; ++m) {
        const float give = up ? a[m] : a[m + h];
        const float keep = up ? a[m + h] : a[m];
        a[m] = keep + __shfl_xor_sync(0xffffffffu, give, OFF);
      }
      warp_reduce_scatter<OFF / 2, h>(a, lane);
    } else {
      a[0] += __shfl_xor_sync(0xffffffffu, a[0], OFF);
      warp_reduce_scatter<OFF / 2, 1>(a, lane);
    }
  }
}

// The FMA path (tiles of 1-8 rows). Warp w owns the V-column vectors w, w + kWarps, ... of the
// ncols columns (V columns: one 16-byte load); its 32 lanes split the input rows, and it reduces
// its own partial sums with shuffles (warp_reduce_scatter over the BT x V sums of a vector), so
// no shared buffer and no block barrier. A warp without a vector skips the loop. Resident slices
// are swizzled (slice_geom) so that the 8 lanes of a quarter warp, which read 8 consecutive rows,
// hit 8 different groups of 4 banks.
template <typename W, int BT, bool SMEM, class Epi>
__device__ __forceinline__ void mm_fma(const float* __restrict__ act, int lda, int In, const W* __restrict__ w,
                                       int ldw, int ncols, Epi& epi) {
  constexpr int V = WT<W>::V, N = BT * V;
  static_assert((N & (N - 1)) == 0 && N <= 64, "warp_reduce_scatter halves a power-of-two count of sums");
  constexpr int per = N >= 32 ? N / 32 : 1, rep = N >= 32 ? 1 : 32 / N;
  // Loads in flight per lane: a lane's rows of a vector at H = 256 in one batch where registers
  // allow it (sm_90a, unroll 8: 204-232 registers at 1-2 rows, 255 at 4 bf16 or 8 fp32 rows).
  constexpr int kUnroll = BT <= 2 ? 8 : 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Shared slices are zero padded to whole vectors; global ones need a tail path.
  const bool aligned =
      SMEM || ((reinterpret_cast<uintptr_t>(w) | static_cast<uintptr_t>(ldw) * sizeof(W)) & 15) == 0;
  const int sw = SMEM ? fma_swizzle_width(ldw / V) : 1;
  const int nvec = cdiv(ncols, V);
  for (int v = warp; v < nvec; v += kWarps) {  // uniform over the warp, as the shuffles need
    const int col = v * V;
    const W* wp = w + fma_unit(v, lane, sw) * V;  // in this lane's rows, lane + 32 k
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    if (aligned && (SMEM || col + V <= ncols)) {
#pragma unroll(kUnroll)
      for (int i = lane; i < In; i += 32) {
        float wv[V];
        WT<W>::template load_vec<SMEM>(wp + static_cast<size_t>(i) * ldw, wv);
        fma_rows<BT, V>(acc, act, lda, i, wv);
      }
    } else {
      for (int i = lane; i < In; i += 32) {
        float wv[V];
#pragma unroll
        for (int j = 0; j < V; ++j)
          wv[j] = (col + j < ncols) ? WT<W>::template load1<SMEM>(wp + static_cast<size_t>(i) * ldw + j) : 0.f;
        fma_rows<BT, V>(acc, act, lda, i, wv);
      }
    }
    warp_reduce_scatter<16, N>(acc, lane);
    if (lane % rep == 0) {
#pragma unroll
      for (int m = 0; m < per; ++m) {
        const int f = lane / rep * per + m, c = col + f % V;  // flat index b * V + j
        if (c < ncols) epi(f / V, c, acc[m]);
      }
    }
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
        w0 = WT<W>::template load1<true>(w + ka * ldw + col);
        w1 = WT<W>::template load1<true>(w + kb * ldw + col);
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
                                       int ncols, Epi& epi) {
  if (ncols <= 0) return;
  if constexpr (MMA) {
    if (resident) mm_mma<W, BT / 16, true>(act, lda, In, w, ldw, ncols, epi);
    else mm_mma<W, BT / 16, false>(act, lda, In, w, ldw, ncols, epi);
  } else {
    if (resident) mm_fma<W, BT, true>(act, lda, In, w, ldw, ncols, epi);
    else mm_fma<W, BT, false>(act, lda, In, w, ldw, ncols, epi);
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

// The inpainting epilogue of step `step` for element (row, d): the known value where the mask is set.
// Unmasked entries of `known` are never read.
__device__ __forceinline__ float inpaint(const Args& a, int step, size_t row, int d, float x) {
  if (a.known == nullptr) return x;
  const size_t i = row * static_cast<size_t>(a.D) + d;
  return __ldg(a.known_mask + i) ? __ldg(a.known + static_cast<size_t>(step) * a.known_stride + i) : x;
}

}  // namespace mlp
}  // namespace fdp

#endif  // __CUDACC__ || FDP_HOST_EMULATION
