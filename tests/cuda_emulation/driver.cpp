// Runs the fused MLP sampler's device code (`run_tile` in csrc/mlp_common.cuh)
// on host threads, through the CUDA emulation in emu.h. Test-only: driven by
// tests/test_cuda_emulation.py, which writes the inputs and compares the output
// with the float64 reference.
//
// Build (the test does this; see README.md):
//   g++ -std=c++20 -pthread -I<cuda include> -Icsrc -Itests/cuda_emulation \
//       -DFDP_HOST_EMULATION='"emu.h"' \
//       -DFDP_EMU_VARIANTS='X(float, 1, 0, 1) X(__nv_bfloat16, 16, 1, 0)' driver.cpp
// FDP_EMU_VARIANTS lists the run_tile<W, BT, MMA, PERSISTENT> instantiations to
// build: each one costs seconds of compile time (far more under sanitizers), so
// the test builds only those its configurations use.
//
// Usage: driver DIR kind wtype B D H L K T clip clip_range bt mma ranks groups gpc smem_limit skip_unused
//   kind 0: per-step kernel (one emulated launch per step), 1: persistent kernel.
//   wtype 0/1/2: float32 / bfloat16 / float16 weights.
//   DIR holds <name>.bin raw little-endian arrays in the layout of
//   fdp.packing (names below; noise.bin only when some step adds noise);
//   the result x [B, D] float32 is written to DIR/out.bin.
// The plan (bt, mma, ranks, groups, groups per cluster) is given explicitly
// rather than chosen by make_plan, which needs a device; size_plan then fills
// in the column split and shared-memory layout exactly as on the GPU.
#include "mlp_common.cuh"

#include <pthread.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#ifndef FDP_EMU_VARIANTS
#error "define FDP_EMU_VARIANTS, e.g. -DFDP_EMU_VARIANTS='X(float, 1, 0, 1)'"
#endif

using namespace fdp;
using namespace fdp::mlp;

using TileFn = void (*)(const Args&, const Plan&, int, int);

namespace {

std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {};
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

template <typename W, int BT, bool MMA, bool PERS>
void tile_fn(const Args& a, const Plan& p, int s0, int s1) {
  run_tile<W, BT, MMA, PERS>(a, p, s0, s1);
}

template <typename W>
constexpr int wtype_of() {
  return std::is_same_v<W, float> ? kF32 : std::is_same_v<W, __nv_bfloat16> ? kBF16 : kF16;
}

TileFn pick(int wtype, int bt, int mma, int kind) {
#define X(W, BT, MMA, PERS) \
  if (wtype == wtype_of<W>() && bt == (BT) && mma == (MMA) && kind == (PERS)) return tile_fn<W, BT, (MMA) != 0, (PERS) != 0>;
  FDP_EMU_VARIANTS
#undef X
  return nullptr;
}

struct ThreadArg {
  emu::Block* blk;
  emu::Cluster* cl;
  unsigned tid;
  emu::Dim bid;
  TileFn fn;
  const Args* a;
  const Plan* p;
  int s0, s1;
};

void* thread_main(void* v) {
  const ThreadArg* t = static_cast<const ThreadArg*>(v);
  emu::t_block = t->blk;
  emu::t_cluster = t->cl;
  emu::t_tid.x = t->tid;
  emu::t_bid = t->bid;
  t->fn(*t->a, *t->p, t->s0, t->s1);
  return nullptr;
}

// One kernel launch: grid (S * tiles, groups / gpc) of clusters of S blocks.
// Clusters run one after another (they only share global memory, and the
// global-combine counter protocol does not depend on co-scheduling: the last
// arriving block does the update); the S * 256 threads of one cluster run
// concurrently, as they must for cluster barriers.
void launch(TileFn fn, const Args& a, const Plan& p, int s0, int s1) {
  const int S = p.ranks * p.gpc;
  const int gy = p.groups / p.gpc;
  for (int y = 0; y < gy; ++y) {
    for (int cx = 0; cx < p.tiles; ++cx) {
      emu::Cluster cl;
      std::barrier<> cbar(S * kThreads);
      cl.bar = &cbar;
      std::vector<std::unique_ptr<emu::Block>> blocks;
      std::vector<std::unique_ptr<std::barrier<>>> bars;
      for (int b = 0; b < S; ++b) {
        blocks.emplace_back(new emu::Block);
        emu::Block& blk = *blocks.back();
        // Shared memory starts as garbage on a GPU; a fixed non-zero pattern
        // makes reads of never-written bytes show up in the result.
        blk.smem.assign(static_cast<size_t>(p.smem_bytes), 0xCD);
        bars.emplace_back(new std::barrier<>(kThreads));
        blk.bar = bars.back().get();
        for (int w = 0; w < kWarps; ++w) {
          bars.emplace_back(new std::barrier<>(32));
          blk.warps[w].bar = bars.back().get();
        }
        cl.blocks.push_back(&blk);
      }
      std::vector<ThreadArg> args(static_cast<size_t>(S) * kThreads);
      std::vector<pthread_t> th(args.size());
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, 1 << 20);  // thousands of threads: keep stacks small
      for (int b = 0; b < S; ++b) {
        for (int t = 0; t < kThreads; ++t) {
          ThreadArg& ta = args[static_cast<size_t>(b) * kThreads + t];
          ta = ThreadArg{blocks[b].get(), &cl, static_cast<unsigned>(t),
                         emu::Dim{static_cast<unsigned>(cx * S + b), static_cast<unsigned>(y), 0}, fn, &a, &p, s0, s1};
          if (pthread_create(&th[static_cast<size_t>(b) * kThreads + t], &attr, thread_main, &ta)) {
            std::perror("pthread_create");
            std::abort();
          }
        }
      }
      pthread_attr_destroy(&attr);
      for (pthread_t& t : th) pthread_join(t, nullptr);
    }
  }
}

// Heap buffer of exactly `bytes` (no slack, so AddressSanitizer flags any overrun).
struct Buffers {
  std::vector<std::unique_ptr<char[]>> owned;
  char* make(size_t bytes) {
    owned.emplace_back(new char[bytes > 0 ? bytes : 1]);
    return owned.back().get();
  }
};

void fill_nan(float* p, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = NAN;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 19) {
    std::fprintf(stderr,
                 "usage: %s DIR kind wtype B D H L K T clip clip_range bt mma ranks groups gpc smem_limit skip_unused\n",
                 argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int kind = std::atoi(argv[2]), wtype = std::atoi(argv[3]);
  const MlpDims d{std::atol(argv[4]), std::atol(argv[5]), std::atol(argv[6]),
                  std::atol(argv[7]), std::atol(argv[8]), std::atol(argv[9])};
  const int clip = std::atoi(argv[10]);
  const float clip_range = static_cast<float>(std::atof(argv[11]));
  Plan p{};
  p.bt = std::atoi(argv[12]);
  p.mma = std::atoi(argv[13]);
  p.ranks = std::atoi(argv[14]);
  p.groups = std::atoi(argv[15]);
  p.gpc = std::atoi(argv[16]);
  const int smem_limit = std::atoi(argv[17]);
  const int skip_unused = std::atoi(argv[18]);
  p.wsize = wtype == kF32 ? 4 : 2;
  if (p.ranks * p.gpc > kMaxCluster || p.groups % p.gpc != 0 || (kind == kPersistent && p.groups != p.gpc)) {
    std::fprintf(stderr, "invalid plan\n");
    return 3;
  }
  if (!size_plan(d, p, smem_limit)) {
    std::fprintf(stderr, "fixed part of shared memory does not fit\n");
    return 3;
  }
  std::fprintf(stderr, "plan: bt %d mma %d R %d G %d gpc %d tiles %d ns %d ds %d slots %d stage %d smem %d fixed %d "
               "weights %d resident %d\n", p.bt, p.mma, p.ranks, p.groups, p.gpc, p.tiles, p.ns, p.ds, p.slots, p.stage,
               p.smem_bytes, p.fixed_bytes, p.weight_bytes, p.resident_bytes);
  const TileFn fn = pick(wtype, p.bt, p.mma, kind);
  if (!fn) {
    std::fprintf(stderr, "variant not built (add it to FDP_EMU_VARIANTS)\n");
    return 4;
  }

  // Inputs, in MlpPointers order up to x_in.
  const char* names[] = {"w_in", "w_a", "w_b", "b_b", "w_out", "b_out", "t_in", "t_shift",
                         "weights", "c_in", "scale", "shift", "coef", "noise", "x"};
  constexpr int kInputs = sizeof(names) / sizeof(names[0]);
  Buffers bufs;
  std::uintptr_t ptr[kInputs] = {};
  for (int i = 0; i < kInputs; ++i) {
    const std::vector<char> v = slurp(dir + "/" + names[i] + ".bin");
    if (v.empty()) continue;  // absent: null pointer (noise when no step adds noise)
    char* b = bufs.make(v.size());
    std::memcpy(b, v.data(), v.size());
    ptr[i] = reinterpret_cast<std::uintptr_t>(b);
  }
  // Output in a separate, NaN-poisoned buffer: an element the kernel never
  // writes stays NaN and fails the comparison.
  const size_t nx = static_cast<size_t>(d.B * d.D);
  float* out = reinterpret_cast<float*>(bufs.make(nx * 4));
  fill_nan(out, nx);
  float* scratch = nullptr;
  int* counters = nullptr;
  if (p.groups != p.gpc) {  // global combine
    const size_t ns = static_cast<size_t>(p.groups) * nx;
    scratch = reinterpret_cast<float*>(bufs.make(ns * 4));
    fill_nan(scratch, ns);
    counters = reinterpret_cast<int*>(bufs.make(static_cast<size_t>(p.tiles) * 4));
    std::memset(counters, 0, static_cast<size_t>(p.tiles) * 4);
  }
  const MlpPointers q{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], ptr[8], ptr[9], ptr[10], ptr[11],
                      ptr[12], ptr[13], ptr[14], reinterpret_cast<std::uintptr_t>(out),
                      reinterpret_cast<std::uintptr_t>(scratch), reinterpret_cast<std::uintptr_t>(counters)};
  Args a = make_args(q, d, clip != 0, clip_range, skip_unused);

  if (kind == kPersistent) {
    launch(fn, a, p, 0, static_cast<int>(d.T));
  } else {
    // As mlp_step_launch: step 0 reads x_in, later steps update x_out in place.
    for (int s = 0; s < d.T; ++s) {
      launch(fn, a, p, s, s + 1);
      a.x_in = a.x_out;
    }
    // The kernels promise to leave the counters zeroed for the next launch.
    for (int t = 0; counters && t < p.tiles; ++t) {
      if (counters[t] != 0) {
        std::fprintf(stderr, "arrival counter of tile %d not reset\n", t);
        return 5;
      }
    }
  }
  std::ofstream f(dir + "/out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(out), static_cast<std::streamsize>(nx * 4));
  return f ? 0 : 6;
}
