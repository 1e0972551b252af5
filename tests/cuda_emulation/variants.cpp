// The run_tile instantiations the emulation driver (driver.cpp) runs, as plain
// functions. Test-only. Built once per subset of FDP_EMU_VARIANTS, so that the
// subsets (seconds of compile time per variant under the sanitizers) compile in
// parallel; driver.cpp, built with the whole list, only takes their addresses.
#include "mlp_common.cuh"

using fdp::mlp::Args;
using fdp::mlp::Plan;

template <typename W, int BT, bool MMA, bool PERS>
void tile_fn(const Args& a, const Plan& p, int s0, int s1) {
  fdp::mlp::run_tile<W, BT, MMA, PERS>(a, p, s0, s1);
}

#define X(W, BT, MMA, PERS) template void tile_fn<W, BT, (MMA) != 0, (PERS) != 0>(const Args&, const Plan&, int, int);
FDP_EMU_VARIANTS
#undef X
