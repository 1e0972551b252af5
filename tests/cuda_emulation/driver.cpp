// Runs the fused MLP sampler's device code (`run_tile` in csrc/mlp_tile.cuh)
// on host threads, through the CUDA emulation in emu.h, and its host-side planner
// and launcher (make_plan, launch_steps, launch_plan) against the emulated
// runtime in emu_runtime.h. Test-only: driven by tests/test_cuda_emulation.py,
// which writes the inputs and compares the output with the float64 reference.
//
// Build (the test does this; see README.md):
//   g++ -std=c++20 -pthread -I<cuda include> -Icsrc -Itests/cuda_emulation \
//       -DFDP_HOST_EMULATION='"emu.h"' \
//       -DFDP_EMU_VARIANTS='X(float, 1, 0, 1) X(__nv_bfloat16, 16, 1, 0)' driver.cpp variants.cpp
// FDP_EMU_VARIANTS lists the run_tile<W, BT, MMA, PERSISTENT> instantiations to
// build: each one costs seconds of compile time (far more under sanitizers), so
// the test builds only those its configurations use, spread over several
// variants.cpp objects (each with a subset) compiled in parallel.
//
// Usage:
//   driver DIR kind wtype B D H L K T clip clip_range bt mma ranks groups gpc smem_limit skip_unused
//   driver DIR kind wtype B D H L K T clip clip_range plan DEVICE skip_unused
//   driver --query    (commands on stdin, one per line; see run_query)
// kind 0: per-step kernel, 1: persistent kernel. wtype 0/1/2: float32 / bfloat16 /
// float16 weights. DIR holds <name>.bin raw little-endian arrays in the layout of
// fdp.packing (names below; noise.bin only when some step adds noise; known.bin, float32
// [B, D] or [T, B, D], and known_mask.bin, uint8 [B, D], only when inpainting); the result
// x [B, D] float32 is written to DIR/out.bin. The first form gives the plan (tile
// rows, tensor cores, cluster ranks, component groups, groups per cluster, shared
// memory for the plan) explicitly, to reach paths a GPU only takes on particular
// hardware; the second lets make_plan choose it for DEVICE (emu::kDevices). Both
// launch through launch_steps, so the emulated runtime sees (and checks) the launch
// configuration launch_plan builds, and the kernel runs on exactly that grid.
#include "mlp_common.cuh"

#include "emu_runtime.h"

#include <pthread.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>

#ifndef FDP_EMU_VARIANTS
#error "define FDP_EMU_VARIANTS, e.g. -DFDP_EMU_VARIANTS='X(float, 1, 0, 1)'"
#endif

using namespace fdp;
using namespace fdp::mlp;

using TileFn = void (*)(const Args&, const Plan&, int, int);

// run_tile<W, BT, MMA, PERS> as a plain function; the FDP_EMU_VARIANTS instantiations
// are compiled in variants.cpp, in translation units of their own that build in parallel.
template <typename W, int BT, bool MMA, bool PERS>
void tile_fn(const Args& a, const Plan& p, int s0, int s1);

namespace {

std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {};
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
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

// The planner's KernelGetter for each kind: a built variant, or else a distinct token
// (plans and recorded launches need only an identity; running a token fails cleanly).
unsigned char g_tokens[2][3][2][65];

template <int KIND>
const void* kernel_getter(int wtype, int mma, int bt) {
  if (wtype < 0 || wtype > 2 || mma < 0 || mma > 1 || bt < 1 || bt > 64) return nullptr;
  if (const TileFn fn = pick(wtype, bt, mma, KIND)) return reinterpret_cast<const void*>(fn);
  return &g_tokens[KIND][wtype][mma][bt];
}

KernelGetter getter(int kind) { return kind == kPersistent ? &kernel_getter<kPersistent> : &kernel_getter<kStep>; }

TileFn built_variant(const void* fn) {
  for (int kind = 0; kind < 2; ++kind)
    for (int w = 0; w < 3; ++w)
      for (int mma = 0; mma < 2; ++mma)
        for (int bt = 1; bt <= 64; bt *= 2) {
          const TileFn f = pick(w, bt, mma, kind);
          if (f && reinterpret_cast<const void*>(f) == fn) return f;
        }
  return nullptr;
}

struct ThreadArg {
  emu::Block* blk;
  emu::Cluster* cl;
  emu::PdlCluster* pdl;
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
  emu::t_pdl = t->pdl;
  emu::t_tid.x = t->tid;
  emu::t_bid = t->bid;
  t->fn(*t->a, *t->p, t->s0, t->s1);
  emu::thread_exit();
  return nullptr;
}

// One kernel launch as cudaLaunchKernelExC received it: a grid of gridDim.x / S
// by gridDim.y clusters of S blocks, dynamicSmemBytes of shared memory per block,
// parameters {Args, Plan, step_begin, step_end}. Clusters run one after another
// (they only share global memory, and the global-combine counter protocol does not
// depend on co-scheduling: the last arriving block does the update); the S * 256
// threads of one cluster run concurrently, as they must for cluster barriers.
// A programmatic launch hides the previous step's results until its wait (emu::PdlGate):
// x (the previous launch's output, updated in place) and the combine's arrival counters.
void run_launch(const void* fnp, const cudaLaunchConfig_t& cfg, void** params) {
  const TileFn fn = built_variant(fnp);
  if (!fn) emu::die("launch of a kernel variant that was not built (add it to FDP_EMU_VARIANTS)");
  const Args& a = *static_cast<const Args*>(params[0]);
  const Plan& p = *static_cast<const Plan*>(params[1]);
  const int s0 = *static_cast<const int*>(params[2]), s1 = *static_cast<const int*>(params[3]);
  const int S = emu::cluster_dim(&cfg);
  const int nclusters = static_cast<int>(cfg.gridDim.x) / S;
  emu::PdlGate gate;
  const bool pdl = emu::programmatic(&cfg);
  if (pdl) {
    gate.hide(const_cast<float*>(a.x_in), static_cast<size_t>(a.B) * a.D * sizeof(float), 0xFF);  // NaN
    if (a.counters) gate.hide(a.counters, static_cast<size_t>(p.tiles) * sizeof(int), 0x7F);
  }
  // FDP_EMU_REVERSE_CLUSTERS=1 runs the clusters last to first: under a global combine another block of the
  // tile arrives last and applies the update (test_global_combine_is_independent_of_arrival_order).
  const bool rev = emu::kReverseClusters != 0;
  for (unsigned yi = 0; yi < cfg.gridDim.y; ++yi) {
    const unsigned y = rev ? cfg.gridDim.y - 1 - yi : yi;
    for (int ci = 0; ci < nclusters; ++ci) {
      const int cx = rev ? nclusters - 1 - ci : ci;
      emu::Cluster cl;
      std::barrier<> cbar(S * kThreads);
      cl.bar = &cbar;
      std::barrier<emu::PdlRelease> pbar(S * kThreads, emu::PdlRelease{&gate});
      emu::PdlCluster pcl{&gate, &pbar};
      gate.waits = 0;
      std::vector<std::unique_ptr<emu::Block>> blocks;
      std::vector<std::unique_ptr<std::barrier<>>> bars;
      for (int b = 0; b < S; ++b) {
        blocks.emplace_back(new emu::Block);
        emu::Block& blk = *blocks.back();
        blk.rank = b;
        // Shared memory starts as garbage on a GPU; a fixed non-zero pattern
        // makes reads of never-written bytes show up in the result.
        blk.smem.assign(cfg.dynamicSmemBytes, 0xCD);
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
          ta = ThreadArg{blocks[b].get(), &cl, pdl ? &pcl : nullptr, static_cast<unsigned>(t),
                         emu::Dim{static_cast<unsigned>(cx * S + b), y, 0}, fn, &a, &p, s0, s1};
          if (pthread_create(&th[static_cast<size_t>(b) * kThreads + t], &attr, thread_main, &ta)) {
            std::perror("pthread_create");
            std::abort();
          }
        }
      }
      pthread_attr_destroy(&attr);
      for (pthread_t& t : th) pthread_join(t, nullptr);
      if (pdl && gate.waits != S * kThreads) emu::die("a thread of a programmatic launch never reached its wait");
    }
  }
}

std::string plan_line(const Plan& p) {
  std::ostringstream o;
  o << "bt=" << p.bt << " mma=" << p.mma << " ranks=" << p.ranks << " groups=" << p.groups << " gpc=" << p.gpc
    << " tiles=" << p.tiles << " ns=" << p.ns << " ds=" << p.ds << " slots=" << p.slots << " stage=" << p.stage
    << " smem=" << p.smem_bytes << " fixed=" << p.fixed_bytes << " weights=" << p.weight_bytes
    << " resident=" << p.resident_bytes << " static=" << emu::kStaticSmem;
  return o.str();
}

// Commands on stdin, one answer line each on stdout:
//   device DEVICE  -> "ok sms=N smem_per_sm=N optin=N cluster=0|1 static=N"  (the emulated GPU)
//   plan DEVICE kind wtype B D H L K T bt ranks groups mma
//       -> "ok <plan>" | "refused <reason>" | "error <exception>"      (make_plan with these options)
//   launch DEVICE kind wtype B D H L K T step_begin step_end
//       -> "ok grid=X,Y block=N smem=N cluster=S steps=B,E <plan>" | "refused ..." | "error ..."
//          (make_plan with default options, then launch_plan; the launch is recorded, not run)
//   steps DEVICE kind wtype B D H L K T step_begin step_end
//       -> "ok launches=N steps=B,E;B,E;... programmatic=0,1,..." | "refused ..." | "error ..."
//          (make_plan with default options, then launch_steps, as the entry points call it;
//          every launch is recorded, none run)
//   slice wtype cols
//       -> "ok stride=N sw=N units=U rows=U0,U1,..;.." (an FMA slice of `cols` columns, as slice_geom
//          lays it out: for rows 0..7, the position of each 16-byte unit u < U in the row, fma_unit)
int run_query() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd, dev;
    if (line.rfind("device ", 0) == 0) {
      const int i = emu::device_index(line.substr(7));
      if (i < 0) {
        std::cout << "error unknown device: " << line << std::endl;
        continue;
      }
      const emu::Device& g = emu::kDevices[i];
      std::cout << "ok sms=" << g.sms << " smem_per_sm=" << g.smem_per_sm << " optin=" << g.smem_optin
                << " cluster=" << g.cluster << " static=" << emu::kStaticSmem << std::endl;
      continue;
    }
    if (line.rfind("slice ", 0) == 0) {
      Plan p{};
      int cols = 0;
      in >> cmd >> p.wsize >> cols;
      p.wsize = p.wsize == kF32 ? 4 : 2;
      p.ns = cols;
      const Slice sl = slice_geom(1, 1, cols, 1, p);  // W_a[0]: `ns` columns
      const int units = sl.stride * p.wsize / 16;
      std::cout << "ok stride=" << sl.stride << " sw=" << sl.sw << " units=" << units << " rows=";
      for (int row = 0; row < 8; ++row)
        for (int u = 0; u < units; ++u) std::cout << (u ? "," : row ? ";" : "") << fma_unit(u, row, sl.sw);
      std::cout << std::endl;
      continue;
    }
    int kind = 0, wtype = 0;
    MlpDims d{};
    in >> cmd >> dev >> kind >> wtype >> d.B >> d.D >> d.H >> d.L >> d.K >> d.T;
    MlpOptions o;
    int s0 = 0, s1 = 0;
    if (cmd == "plan") in >> o.bt >> o.ranks >> o.groups >> o.mma;
    else in >> s0 >> s1;
    emu::g_device = emu::device_index(dev);
    if (!in || (cmd != "plan" && cmd != "launch" && cmd != "steps") || emu::g_device < 0) {
      std::cout << "error bad command: " << line << std::endl;
      emu::g_device = 0;
      continue;
    }
    try {
      std::string reason;
      const Plan p = make_plan(kind, wtype, d, o, getter(kind), reason);
      if (p.bt == 0) {
        std::cout << "refused " << reason << std::endl;
        continue;
      }
      if (cmd == "plan") {
        std::cout << "ok " << plan_line(p) << std::endl;
        continue;
      }
      emu::g_launches.clear();
      const void* fn = getter(kind)(wtype, p.mma, p.bt);
      if (cmd == "steps") {
        launch_steps(kind, fn, p, Args{}, s0, s1, nullptr);
        std::ostringstream steps, pdl;
        for (size_t i = 0; i < emu::g_launches.size(); ++i) {
          const emu::LaunchRecord& r = emu::g_launches[i];
          steps << (i ? ";" : "") << r.step_begin << "," << r.step_end;
          pdl << (i ? "," : "") << r.programmatic;
        }
        std::cout << "ok launches=" << emu::g_launches.size() << " steps=" << steps.str()
                  << " programmatic=" << pdl.str() << std::endl;
        continue;
      }
      launch_plan(kind, fn, p, Args{}, s0, s1, nullptr);
      const emu::LaunchRecord& r = emu::g_launches.at(0);
      std::cout << "ok grid=" << r.grid_x << "," << r.grid_y << " block=" << r.block_x << " smem=" << r.smem
                << " cluster=" << r.cluster << " steps=" << r.step_begin << "," << r.step_end << " "
                << plan_line(p) << std::endl;
    } catch (const std::exception& e) {
      std::cout << "error " << e.what() << std::endl;
    }
  }
  return 0;
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
  if (argc == 2 && std::string(argv[1]) == "--query") return run_query();
  const bool planned = argc == 15 && std::string(argv[12]) == "plan";
  if (argc != 19 && !planned) {
    std::fprintf(stderr,
                 "usage: %s DIR kind wtype B D H L K T clip clip_range (bt mma ranks groups gpc smem_limit | "
                 "plan DEVICE) skip_unused\n       %s --query\n",
                 argv[0], argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int kind = std::atoi(argv[2]), wtype = std::atoi(argv[3]);
  MlpDims d{std::atol(argv[4]), std::atol(argv[5]), std::atol(argv[6]),
            std::atol(argv[7]), std::atol(argv[8]), std::atol(argv[9])};
  const int clip = std::atoi(argv[10]);
  const float clip_range = static_cast<float>(std::atof(argv[11]));
  const int skip_unused = std::atoi(argv[argc - 1]);
  Plan p{};
  if (planned) {
    emu::g_device = emu::device_index(argv[13]);
    if (emu::g_device < 0) {
      std::fprintf(stderr, "unknown device %s\n", argv[13]);
      return 3;
    }
    MlpOptions o;
    o.skip_unused = skip_unused;
    std::string reason;
    p = make_plan(kind, wtype, d, o, getter(kind), reason);
    if (p.bt == 0) {
      std::fprintf(stderr, "make_plan refused: %s\n", reason.c_str());
      return 3;
    }
  } else {
    // Explicit plans launch on the emulated H100 (clusters of up to 16 blocks);
    // smem_limit only sizes the plan.
    emu::g_device = emu::device_index("h100");
    p.bt = std::atoi(argv[12]);
    p.mma = std::atoi(argv[13]);
    p.ranks = std::atoi(argv[14]);
    p.groups = std::atoi(argv[15]);
    p.gpc = std::atoi(argv[16]);
    const int smem_limit = std::atoi(argv[17]);
    p.wsize = wtype == kF32 ? 4 : 2;
    if (p.ranks * p.gpc > kMaxCluster || p.groups % p.gpc != 0 || (kind == kPersistent && p.groups != p.gpc)) {
      std::fprintf(stderr, "invalid plan\n");
      return 3;
    }
    if (!size_plan(d, p, smem_limit)) {
      std::fprintf(stderr, "fixed part of shared memory does not fit\n");
      return 3;
    }
  }
  std::fprintf(stderr, "plan (%s): %s\n", emu::kDevices[emu::g_device].name, plan_line(p).c_str());
  if (!pick(wtype, p.bt, p.mma, kind)) {
    std::fprintf(stderr, "variant not built (add it to FDP_EMU_VARIANTS)\n");
    return 4;
  }
  const void* fn = getter(kind)(wtype, p.mma, p.bt);
  prepare_fn(fn, current_device());  // the shared-memory opt-in make_plan also sets

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
  MlpPointers q{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], ptr[8], ptr[9], ptr[10], ptr[11],
                ptr[12], ptr[13], ptr[14], reinterpret_cast<std::uintptr_t>(out),
                reinterpret_cast<std::uintptr_t>(scratch), reinterpret_cast<std::uintptr_t>(counters)};
  // Inpainting: known [B, D] (known_steps 0) or [T, B, D] (known_steps T), from its size.
  const std::vector<char> known = slurp(dir + "/known.bin"), known_mask = slurp(dir + "/known_mask.bin");
  if (!known.empty()) {
    char* k = bufs.make(known.size());
    std::memcpy(k, known.data(), known.size());
    char* m = bufs.make(known_mask.size());
    std::memcpy(m, known_mask.data(), known_mask.size());
    q.known = reinterpret_cast<std::uintptr_t>(k);
    q.known_mask = known_mask.empty() ? 0 : reinterpret_cast<std::uintptr_t>(m);
    d.known_steps = known.size() == nx * 4 ? 0 : d.T;
  }
  const Args a = make_args(q, d, clip != 0, clip_range, skip_unused);

  // As mlp_step_launch / mlp_persistent_launch: one launch per step, or one for all.
  emu::g_runner = run_launch;
  try {
    launch_steps(kind, fn, p, a, 0, static_cast<int>(d.T), nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "launch failed: %s\n", e.what());
    return 5;
  }
  const size_t launches = kind == kPersistent ? 1 : static_cast<size_t>(d.T);
  if (emu::g_launches.size() != launches) {
    std::fprintf(stderr, "%zu launches, expected %zu\n", emu::g_launches.size(), launches);
    return 5;
  }
  size_t programmatic = 0;
  for (const emu::LaunchRecord& r : emu::g_launches) programmatic += r.programmatic;
  std::fprintf(stderr, "programmatic launches: %zu of %zu\n", programmatic, launches);
  // The kernels promise to leave the counters zeroed for the next launch.
  for (int t = 0; counters && t < p.tiles; ++t) {
    if (counters[t] != 0) {
      std::fprintf(stderr, "arrival counter of tile %d not reset\n", t);
      return 5;
    }
  }
  std::ofstream f(dir + "/out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(out), static_cast<std::streamsize>(nx * 4));
  return f ? 0 : 6;
}
