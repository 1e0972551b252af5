// Host emulation of the per-call terms kernel (csrc/call_terms.cuh): the kernel's own block body, every block of
// the grid in turn, each "all threads do f, then __syncthreads" step run thread by thread. Built with ASan/UBSan by
// tests/test_cuda_emulation.py; every input buffer is a heap allocation of exactly its size, shared memory is
// filled with garbage and the output with NaN first.
//
// Usage: call_terms_driver DIR. DIR holds dims.txt ("B Dc Dk Hr K L H strategy topk") and the float32 inputs
// c.bin [B, Dc], w1.bin [Dc, Hr], b1.bin [Hr], w2.bin [Hr, K], b2.bin [K], fixed.bin [K], cw.bin [Dk, N],
// cb.bin [N]; out.bin (call_terms_numel floats) is written there.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "call_terms.cuh"

namespace {

std::unique_ptr<float[]> read(const std::string& path, std::int64_t n) {
  std::unique_ptr<float[]> buf(new float[n > 0 ? n : 0]);  // exactly n floats: ASan sees any overrun
  std::ifstream f(path, std::ios::binary);
  if (!f) { std::fprintf(stderr, "cannot open %s\n", path.c_str()); std::exit(2); }
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (static_cast<std::int64_t>(bytes.size()) != n * 4) {
    std::fprintf(stderr, "%s: %zu bytes, expected %lld\n", path.c_str(), bytes.size(), static_cast<long long>(n * 4));
    std::exit(2);
  }
  if (n > 0) std::memcpy(buf.get(), bytes.data(), bytes.size());
  return buf;
}

struct HostEach {
  template <class F>
  void operator()(const F& f) const {
    for (int t = 0; t < fdp::call::kThreads; ++t) f(t);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) { std::fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
  const std::string dir = argv[1];
  long long B, Dc, Dk, Hr, K, L, H, strategy, topk;
  std::FILE* f = std::fopen((dir + "/dims.txt").c_str(), "r");
  if (!f || std::fscanf(f, "%lld %lld %lld %lld %lld %lld %lld %lld %lld", &B, &Dc, &Dk, &Hr, &K, &L, &H, &strategy,
                        &topk) != 9) {
    std::fprintf(stderr, "bad dims.txt\n");
    return 2;
  }
  std::fclose(f);
  const std::int64_t N = K * (1 + 2 * L) * H, total = B * K * (1 + (1 + 2 * L) * H);
  auto c = read(dir + "/c.bin", B * Dc), w1 = read(dir + "/w1.bin", Dc * Hr), b1 = read(dir + "/b1.bin", Hr);
  auto w2 = read(dir + "/w2.bin", Hr * K), b2 = read(dir + "/b2.bin", K), fixed = read(dir + "/fixed.bin", K);
  auto cw = read(dir + "/cw.bin", Dk * N), cb = read(dir + "/cb.bin", N);
  std::unique_ptr<float[]> out(new float[total]);
  for (std::int64_t i = 0; i < total; ++i) out[i] = NAN;
  std::unique_ptr<float[]> sm(new float[fdp::call::kThreads * fdp::abi::kMaxK]);
  std::memset(sm.get(), 0xCD, sizeof(float) * fdp::call::kThreads * fdp::abi::kMaxK);
  const fdp::call::Args a{c.get(), w1.get(), b1.get(), w2.get(), b2.get(), fixed.get(), Dk ? cw.get() : cb.get(),
                          cb.get(), out.get(), B, Dc, Dk, Hr, K, L, H, static_cast<int>(strategy),
                          static_cast<int>(topk)};
  // The launcher's grid (csrc/call_terms.cu): (col_blocks + 1, row tiles).
  const std::int64_t gx = fdp::call::col_blocks(a) + 1, gy = (B + fdp::call::kRows - 1) / fdp::call::kRows;
  for (std::int64_t by = 0; by < gy; ++by)
    for (std::int64_t bx = 0; bx < gx; ++bx) fdp::call::call_terms_block(a, bx, by, sm.get(), HostEach{});
  std::ofstream o(dir + "/out.bin", std::ios::binary);
  o.write(reinterpret_cast<const char*>(out.get()), total * 4);
  return o ? 0 : 1;
}
