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
//   - mbarriers keep PTX's state (pending arrivals, a transaction count that
//     may go negative, the phase), and a wait blocks until the phase of the
//     given parity has completed; st.async writes into a peer's shared memory
//     and then completes its bytes on the named mbarrier of that peer. Protocol
//     mistakes abort with a message: an arrival or a store meant for another
//     phase than the barrier's current one, a transaction count beyond
//     +-(2^20 - 1), a store whose data and barrier are in different blocks, a
//     store into a block whose threads have begun to exit, a block exiting
//     with a phase half done, and a wait that does not complete within FDP_EMU_HANG_S seconds
//     (default 120). FDP_EMU_TX_SKEW adds that many bytes to every
//     arrive.expect_tx, to prove that a wrong byte count is caught;
//     FDP_EMU_LAG_US delays every arrival of the cluster's last block by that
//     many microseconds, so that the others run ahead of it as far as the
//     protocol lets them; FDP_EMU_WARP_LAG_US delays warp 0 of that block after
//     every wait, so that the block's other warps run ahead of it (the team
//     exchanges have no block barrier: every thread arrives, every warp waits);
//     more arrivals in one phase than the mbarrier's count abort too;
//   - cluster addresses (mapa) encode rank and offset; addresses outside
//     shared memory or ranks outside the cluster abort.
#pragma once
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
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

// An mbarrier object, kept beside the 8 bytes of shared memory it occupies on the GPU.
struct MBar {
  int count = 0;         // arrivals per phase
  int pending = 0;       // arrivals still missing in the current phase
  long long tx = 0;      // transaction bytes still missing (negative: arrived before expected)
  unsigned phase = 0;    // completed phases; the current phase's parity is phase & 1
  std::condition_variable cv;
};

struct Block {
  std::vector<unsigned char> smem;  // dynamic shared memory
  int s_last = 0;                   // the kernel's static __shared__ int
  std::barrier<>* bar = nullptr;    // __syncthreads
  Warp warps[8];                    // kThreads / 32
  int rank = 0;                     // in the cluster
  std::mutex mu;                    // guards the mbarriers and `exited`
  std::map<std::ptrdiff_t, std::unique_ptr<MBar>> mbars;  // by shared-memory offset
  int exited = 0;                   // threads that have returned from the kernel
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
inline thread_local bool t_exiting = false;     // past the relaxed arrive of the exit cluster barrier

inline unsigned char* block_smem() { return t_block->smem.data(); }
inline int& block_s_last() { return t_block->s_last; }
inline uint32_t bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float flt(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
[[noreturn]] inline void die(const char* what) { std::fprintf(stderr, "emu: %s\n", what); std::abort(); }
template <class... A>
[[noreturn]] inline void dief(const char* fmt, A... a) {
  std::fprintf(stderr, "emu: ");
  std::fprintf(stderr, fmt, a...);
  std::fprintf(stderr, "\n");
  std::abort();
}

inline long env_long(const char* name, long dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtol(v, nullptr, 10) : dflt;
}
inline const long kHangSeconds = env_long("FDP_EMU_HANG_S", 120);
inline const long kTxSkew = env_long("FDP_EMU_TX_SKEW", 0);
inline const long kLagUs = env_long("FDP_EMU_LAG_US", 0);
inline const long kWarpLagUs = env_long("FDP_EMU_WARP_LAG_US", 0);
inline const long kReverseClusters = env_long("FDP_EMU_REVERSE_CLUSTERS", 0);
constexpr long long kTxLimit = (1 << 20) - 1;  // PTX: the tx-count range of an mbarrier

// Offset of p in this block's shared memory, checked to hold `bytes` bytes.
inline std::ptrdiff_t smem_offset(const void* p, std::size_t bytes, const char* what) {
  const auto off = static_cast<const unsigned char*>(p) - t_block->smem.data();
  if (off < 0 || off + static_cast<std::ptrdiff_t>(bytes) > static_cast<std::ptrdiff_t>(t_block->smem.size()))
    dief("%s of an address outside shared memory", what);
  return off;
}

// The mbarrier at `off` of block `b`; the caller holds b.mu.
inline MBar& mbar_at(Block& b, std::ptrdiff_t off, const char* what) {
  auto it = b.mbars.find(off);
  if (it == b.mbars.end()) dief("%s on an uninitialised mbarrier (block rank %d, offset %td)", what, b.rank, off);
  return *it->second;
}

// Completes the current phase when nothing is missing; the caller holds the block's mutex.
inline void mbar_settle(Block& b, std::ptrdiff_t off, MBar& m) {
  if (m.tx > kTxLimit || m.tx < -kTxLimit)
    dief("mbarrier (block rank %d, offset %td) tx-count %lld outside +-(2^20 - 1)", b.rank, off, m.tx);
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
    m.cv.notify_all();
  }
}

// Called by each host thread when its kernel body returns. The last thread of a block checks that
// no mbarrier is left in the middle of a phase (bytes or arrivals received for an exchange the
// block never waited for), which on the GPU would be a write into a block that may be gone.
inline void thread_exit() {
  Block& b = *t_block;
  std::lock_guard<std::mutex> lk(b.mu);
  if (++b.exited < static_cast<int>(sizeof(b.warps) / sizeof(b.warps[0])) * 32) return;
  for (auto& [off, m] : b.mbars)
    if (m->pending != m->count || m->tx != 0)
      dief("block rank %d exits with mbarrier at offset %td mid-phase (%d of %d arrivals missing, tx %lld)", b.rank,
           off, m->pending, m->count, m->tx);
}

}  // namespace emu

#define threadIdx (emu::t_tid)
#define blockIdx (emu::t_bid)

namespace emu {
// A relaxed cluster arrive orders none of the thread's earlier memory operations for the others, so
// the kernel may use one only where nothing passes data after it: the exit barrier. A thread that
// synchronises or communicates after it aborts.
inline void check_not_exiting(const char* what) {
  if (t_exiting) dief("%s after the relaxed arrive of the exit cluster barrier", what);
}
}  // namespace emu

inline void __syncthreads() {
  emu::check_not_exiting("__syncthreads");
  emu::t_block->bar->arrive_and_wait();
}
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
  emu::check_not_exiting("__shfl_xor_sync");
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
  emu::check_not_exiting("cluster barrier");
  if (S > 1) emu::t_cluster->bar->arrive_and_wait();
  else __syncthreads();
}

// barrier.cluster.arrive.relaxed + barrier.cluster.wait: the same rendezvous, after which the thread
// must not synchronise or communicate again (emu::check_not_exiting).
inline void cluster_exit_sync(int S) {
  emu::check_not_exiting("cluster exit barrier");
  emu::t_exiting = true;
  if (S > 1) emu::t_cluster->bar->arrive_and_wait();
}

// mapa: a cluster address is (rank << 24) | offset. Aborts on a pointer that is not in this
// block's shared memory or a rank outside the cluster, which on the GPU would be undefined
// behaviour rather than a clean error.
inline unsigned cluster_addr(const void* p, int rank) {
  const std::ptrdiff_t off = emu::smem_offset(p, 1, "mapa");
  if (rank < 0 || rank >= static_cast<int>(emu::t_cluster->blocks.size())) emu::die("mapa rank outside the cluster");
  if (off >= (1 << 24)) emu::die("shared memory beyond the emulation's 16 MB cluster addresses");
  return static_cast<unsigned>(rank) << 24 | static_cast<unsigned>(off);
}

inline void mbar_init(uint64_t* bar, unsigned count) {
  const std::ptrdiff_t off = emu::smem_offset(bar, 8, "mbarrier.init");
  if (off % 8) emu::die("mbarrier not 8-byte aligned");
  emu::Block& b = *emu::t_block;
  std::lock_guard<std::mutex> lk(b.mu);
  auto& m = b.mbars[off];
  m.reset(new emu::MBar);
  m->count = m->pending = static_cast<int>(count);
}

inline void mbar_init_fence() {}

// One arrival on the mbarrier at `bar` with `tx` expected transaction bytes. `parity`: the phase the
// caller means to arrive in (the GPU ignores it; here it must be the current one).
inline void mbar_arrive_tx(uint64_t* bar, long long tx, unsigned parity, const char* what) {
  emu::check_not_exiting(what);
  const std::ptrdiff_t off = emu::smem_offset(bar, 8, what);
  emu::Block& b = *emu::t_block;
  // A late receiver: its peers may be pushing the next exchange before it arrives for this one.
  if (emu::kLagUs > 0 && b.rank + 1 == static_cast<int>(emu::t_cluster->blocks.size()))
    std::this_thread::sleep_for(std::chrono::microseconds(emu::kLagUs));
  std::lock_guard<std::mutex> lk(b.mu);
  emu::MBar& m = emu::mbar_at(b, off, what);
  if ((m.phase & 1) != parity)
    emu::dief("mbarrier (block rank %d, offset %td): %s for phase parity %u, but phase %u is current", b.rank, off,
              what, parity, m.phase);
  // More arrivals than the count in one phase (a thread arriving twice, or a count too small): on the
  // GPU the surplus would complete a later phase early.
  if (m.pending == 0)
    emu::dief("mbarrier (block rank %d, offset %td): %s beyond the %d arrivals of phase %u", b.rank, off, what,
              m.count, m.phase);
  m.tx += tx;
  --m.pending;
  emu::mbar_settle(b, off, m);
}

inline void mbar_arrive_expect(uint64_t* bar, unsigned bytes, unsigned parity) {
  mbar_arrive_tx(bar, static_cast<long long>(bytes) + emu::kTxSkew, parity, "arrive.expect_tx");
}

inline void mbar_arrive(uint64_t* bar, unsigned parity) { mbar_arrive_tx(bar, 0, parity, "arrive"); }

inline void mbar_wait(uint64_t* bar, unsigned parity) {
  emu::check_not_exiting("mbarrier.try_wait");
  const std::ptrdiff_t off = emu::smem_offset(bar, 8, "mbarrier.try_wait");
  emu::Block& b = *emu::t_block;
  std::unique_lock<std::mutex> lk(b.mu);
  emu::MBar& m = emu::mbar_at(b, off, "try_wait.parity");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(emu::kHangSeconds);
  while ((m.phase & 1) == parity) {
    if (m.cv.wait_until(lk, deadline) == std::cv_status::timeout && (m.phase & 1) == parity)
      emu::dief("mbarrier (block rank %d, offset %td): phase %u (parity %u) not complete after %ld s: %d of %d "
                "arrivals and %lld transaction bytes missing",
                b.rank, off, m.phase, parity, emu::kHangSeconds, m.pending, m.count, m.tx);
  }
  // A late warp: in the cluster's last block, warp 0 (the one that has columns whenever any has)
  // resumes this long after each completed wait, so that the block's other warps run ahead of it as
  // far as the protocol lets them; a protocol that does not hold them back (an exchange that
  // completes without this warp's arrival) lets them read its columns before it stores them, or
  // overwrite the buffer it still reads.
  if (emu::kWarpLagUs > 0 && b.rank + 1 == static_cast<int>(emu::t_cluster->blocks.size()) &&
      (threadIdx.x >> 5) == 0) {
    lk.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(emu::kWarpLagUs));
  }
}

// st.async: v into the peer's shared memory, then its 4 bytes complete on the peer's mbarrier.
// `parity`: the receiver's phase the store belongs to (the GPU ignores it; here it must be current,
// so a producer more than one phase ahead of its receiver aborts).
inline void st_async(unsigned addr, float v, unsigned bar, unsigned parity) {
  emu::check_not_exiting("st.async");
  const int rank = static_cast<int>(addr >> 24), brank = static_cast<int>(bar >> 24);
  const std::ptrdiff_t off = addr & 0xffffff, boff = bar & 0xffffff;
  if (rank != brank) emu::die("st.async data and mbarrier in different blocks");
  emu::Block& b = *emu::t_cluster->blocks[rank];
  if (off + 4 > static_cast<std::ptrdiff_t>(b.smem.size())) emu::die("st.async outside the peer's shared memory");
  std::lock_guard<std::mutex> lk(b.mu);
  if (b.exited) emu::dief("st.async into block rank %d after its threads started exiting", rank);
  emu::MBar& m = emu::mbar_at(b, boff, "st.async complete_tx");
  if ((m.phase & 1) != parity)
    emu::dief("mbarrier (block rank %d, offset %td): st.async for phase parity %u arrived in phase %u (a producer "
              "ran ahead of its receiver)", rank, boff, parity, m.phase);
  std::memcpy(b.smem.data() + off, &v, 4);
  m.tx -= 4;
  emu::mbar_settle(b, boff, m);
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
