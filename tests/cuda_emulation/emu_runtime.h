// Host emulation of the CUDA runtime calls made by the planner and launcher of
// csrc/mlp_host.cuh (make_plan, prepare_fn, cluster_fits, launch_plan).
//
// Test-only, included by driver.cpp after mlp_common.cuh. It answers the device
// queries from a table of real GPUs (one emulated device id per entry, so plans
// for several GPUs can be made in one process), keeps the function attributes
// the planner sets, and checks every launch configuration the way the runtime
// would refuse it (block size, dynamic shared memory above the function's
// limit, cluster size and shape, clusters on a device or binary without them)
// before recording it and, when a runner is installed, running it. It also
// emulates programmatic dependent launch (see PdlGate).
#pragma once
#include <atomic>
#include <barrier>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace emu {

// Per-GPU limits (CUDA C++ Programming Guide, compute capability table; the
// Hopper/Ampere/Ada tuning guides; SM counts of the named parts). smem_optin is
// the most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
struct Device {
  const char* name;
  int major, minor;
  int sms;
  int smem_per_sm, smem_optin;
  int cluster;  // cudaDevAttrClusterLaunch
};

inline const Device kDevices[] = {
    {"h100", 9, 0, 132, 228 * 1024, 227 * 1024, 1},    // H100 SXM, sm_90
    {"a100", 8, 0, 108, 164 * 1024, 163 * 1024, 0},    // A100, sm_80
    {"rtx4090", 8, 9, 128, 100 * 1024, 99 * 1024, 0},  // GeForce RTX 4090, sm_89
    {"orin", 8, 7, 16, 164 * 1024, 163 * 1024, 0},     // Jetson AGX Orin, sm_87
};
constexpr int kNumDevices = sizeof(kDevices) / sizeof(kDevices[0]);
// Shared memory the runtime reserves per resident block (sm_80 and later).
constexpr int kReservedSmemPerBlock = 1024;
// Static shared memory of the kernels (run_tile's `__shared__ int s_last`), as ptxas -v reports it for sm_90.
constexpr int kStaticSmem = 16;

inline int g_device = 0;

inline int device_index(const std::string& name) {
  for (int i = 0; i < kNumDevices; ++i)
    if (name == kDevices[i].name) return i;
  return -1;
}

// The fat binary holds code for 80, 86, 87, 89 and 90: each device runs its own architecture's.
inline int binary_version(const Device& d) { return d.major * 10 + d.minor; }

struct FnState {
  int max_dynamic_smem = 48 * 1024;  // the runtime's default without opt-in
  bool nonportable = false;
};
inline std::map<std::pair<const void*, int>, FnState> g_fn;

struct LaunchRecord {
  unsigned grid_x, grid_y, block_x;
  int smem, cluster, step_begin, step_end;
  bool programmatic;  // cudaLaunchAttributeProgrammaticStreamSerialization
};
inline std::vector<LaunchRecord> g_launches;

// Runs a checked launch (the driver installs one for its built kernel variants); null: record only.
using Runner = void (*)(const void* fn, const cudaLaunchConfig_t& cfg, void** args);
inline Runner g_runner = nullptr;

inline int cluster_dim(const cudaLaunchConfig_t* cfg) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& c = cfg->attrs[i].val.clusterDim;
      return (c.y != 1 || c.z != 1) ? -1 : static_cast<int>(c.x);
    }
  return 1;
}

inline bool programmatic(const cudaLaunchConfig_t* cfg) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization)
      return cfg->attrs[i].val.programmaticStreamSerializationAllowed != 0;
  return false;
}

// Programmatic dependent launch. Launches run here one after another, so the grid a launch
// depends on has always completed; what the emulation can still catch is a kernel that reads
// that grid's results before its griddepcontrol.wait (on a GPU it would read them while they
// are being written). For a launch with the attribute, the runner hides those results (x,
// and the global combine's counters): it overwrites them with garbage and keeps their
// content here, and the first cluster's barrier at the wait, which all its threads must
// reach, puts the content back. Later clusters of the launch run the same code.
struct PdlGate {
  std::vector<std::pair<void*, std::vector<char>>> hidden;  // buffer, its content
  bool released = false;
  std::atomic<int> waits{0};  // threads that reached the wait
  void hide(void* p, size_t bytes, unsigned char garbage) {
    const char* c = static_cast<const char*>(p);
    hidden.emplace_back(p, std::vector<char>(c, c + bytes));
    std::memset(p, garbage, bytes);
  }
  void release() noexcept {
    if (released) return;
    for (auto& h : hidden) std::memcpy(h.first, h.second.data(), h.second.size());
    released = true;
  }
};
struct PdlRelease {
  PdlGate* gate;
  void operator()() noexcept { gate->release(); }
};
struct PdlCluster {  // one cluster of a programmatic launch: its threads meet at the wait
  PdlGate* gate;
  std::barrier<PdlRelease>* bar;
};
inline thread_local PdlCluster* t_pdl = nullptr;  // null: a launch without the attribute

// Why the runtime would refuse this cluster size for `fn`, or cudaSuccess.
inline cudaError_t check_cluster(const void* fn, int S) {
  const Device& d = kDevices[g_device];
  if (S == 1) return cudaSuccess;
  if (S < 1 || !d.cluster || binary_version(d) < 90) return cudaErrorInvalidClusterSize;
  if (S > 16 || (S > 8 && !g_fn[{fn, g_device}].nonportable)) return cudaErrorInvalidClusterSize;
  return cudaSuccess;
}

}  // namespace emu

namespace fdp {
namespace mlp {
// griddepcontrol.wait / .launch_dependents (mlp_device.cuh). Without a programmatic
// dependency the wait returns at once, as on the GPU. Letting dependents start has no
// effect here: the next launch runs only after this one.
void grid_dependency_wait() {
  emu::PdlCluster* c = emu::t_pdl;
  if (c == nullptr) return;
  ++c->gate->waits;
  c->bar->arrive_and_wait();
}
void launch_dependents() {}
}  // namespace mlp
}  // namespace fdp

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kNumDevices) return cudaErrorInvalidDevice;
  const emu::Device& d = emu::kDevices[device];
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = d.cluster; return cudaSuccess;
    default: return cudaErrorInvalidValue;  // not emulated: the planner must not need it
  }
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  std::memset(attr, 0, sizeof(*attr));
  const emu::Device& d = emu::kDevices[emu::g_device];
  attr->binaryVersion = emu::binary_version(d);
  attr->ptxVersion = attr->binaryVersion;
  attr->sharedSizeBytes = emu::kStaticSmem;
  attr->maxThreadsPerBlock = fdp::mlp::kThreads;
  attr->maxDynamicSharedSizeBytes = emu::g_fn[{func, emu::g_device}].max_dynamic_smem;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  const emu::Device& d = emu::kDevices[emu::g_device];
  emu::FnState& st = emu::g_fn[{func, emu::g_device}];
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value + emu::kStaticSmem > d.smem_optin) return cudaErrorInvalidValue;
      st.max_dynamic_smem = value;
      return cudaSuccess;
    case cudaFuncAttributeNonPortableClusterSizeAllowed:
      if (!d.cluster) return cudaErrorInvalidValue;
      st.nonportable = value != 0;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

// Clusters that fit at once, counting one block per SM (the planner only asks whether
// any cluster fits) and assuming every S-block cluster finds S SMs in one GPC (true for
// S <= 16 on H100, whose GPCs hold 16 or more SMs).
cudaError_t cudaOccupancyMaxActiveClusters(int* num_clusters, const void* func, const cudaLaunchConfig_t* cfg) {
  const emu::Device& d = emu::kDevices[emu::g_device];
  const int S = emu::cluster_dim(cfg);
  const cudaError_t e = emu::check_cluster(func, S);
  if (e != cudaSuccess) return e;
  if (cfg->blockDim.x != static_cast<unsigned>(fdp::mlp::kThreads)) return cudaErrorInvalidValue;
  const int smem = static_cast<int>(cfg->dynamicSmemBytes);
  if (smem > emu::g_fn[{func, emu::g_device}].max_dynamic_smem) {
    *num_clusters = 0;
    return cudaSuccess;
  }
  const int per_sm = (smem + emu::kStaticSmem + emu::kReservedSmemPerBlock) <= d.smem_per_sm ? 1 : 0;
  *num_clusters = d.sms * per_sm / S;
  return cudaSuccess;
}

cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* cfg, const void* func, void** args) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  const int S = emu::cluster_dim(cfg);
  const cudaError_t e = emu::check_cluster(func, S);
  if (e != cudaSuccess) return e;
  if (cfg->gridDim.x == 0 || cfg->gridDim.y == 0 || cfg->gridDim.z != 1 || cfg->gridDim.x % S != 0)
    return cudaErrorInvalidConfiguration;
  if (cfg->blockDim.x != static_cast<unsigned>(fdp::mlp::kThreads) || cfg->blockDim.y != 1 || cfg->blockDim.z != 1)
    return cudaErrorInvalidConfiguration;
  if (static_cast<int>(cfg->dynamicSmemBytes) > emu::g_fn[{func, emu::g_device}].max_dynamic_smem)
    return cudaErrorInvalidValue;
  // Programmatic dependent launch is a compute capability 9.0 feature: the launcher must not
  // ask for it on older GPUs (the emulation refuses it there, so a launch that does fails).
  const bool pdl = emu::programmatic(cfg);
  if (pdl && emu::kDevices[emu::g_device].major < 9) return cudaErrorNotSupported;
  emu::g_launches.push_back({cfg->gridDim.x, cfg->gridDim.y, cfg->blockDim.x, static_cast<int>(cfg->dynamicSmemBytes),
                             S, *static_cast<const int*>(args[2]), *static_cast<const int*>(args[3]), pdl});
  if (emu::g_runner) emu::g_runner(func, *cfg, args);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }  // errors are returned, never left pending

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

}  // extern "C"
