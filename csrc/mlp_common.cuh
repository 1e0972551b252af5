// Shared device code of the fused MLP kernels (mlp_step.cu: one launch per
// denoising step; mlp_persistent.cu: the whole sampling loop in one launch),
// plus the host-side planning both launchers use. The per-component chain is
// written once, in `run_tile` (mlp_tile.cuh).
//
// Math (docs/mlp_denoiser.md, on the packed tensors of python/fdp/packing.py):
// for step i and a tile of rows x,
//
//   for k (skipped when the router gives it weight 0 on every row of the tile):
//     h   = x W_in[k] + t_in[i,k] + c_in[:,k]
//     for l: u = SiLU(scale[:,k,l] * (h W_a[k,l]) + shift[:,k,l] + t_shift[i,k,l])
//            h = h + u W_b[k,l] + b_b[k,l]
//     eps += weights[:,k] * (h W_out[k] + b_out[k])
//   x0 = a_x x + a_m eps;  x0 = clamp(x0, +-clip_range) if clip
//   x  = c_x0 x0 + c_x x + c_m eps + [adds_noise[i]] sigma z
//
// Layout (all contiguous): w_in [K,D,H], w_a/w_b [K,L,H,H], w_out [K,H,D]
// input-major in the weight type W (float, bf16 or fp16); b_b [K,L,H],
// b_out [K,D], t_in [T,K,H], t_shift [T,K,L,H], weights [B,K], c_in [B,K,H],
// scale/shift [B,K,L,H], noise [T,B,D], x [B,D] float32; coef [T,abi::kCoefWidth]
// float32 with the columns of abi.h (a_x, a_m, c_x0, c_x, c_m, sigma, adds_noise 0/1, unused).
//
// Work decomposition. A block owns a tile of BT rows and, for every matmul, a
// slice of output columns: "rank" r of R owns columns [r*ns, r*ns+ns) of the
// H-wide matrices and [r*ds, r*ds+ds) of W_out. The R ranks of one component
// group form a team; on sm_90 a team is (part of) a thread-block cluster and
// every rank pushes its slice of h / SiLU(y) into all team members' shared
// memory with st.async, then waits on an mbarrier for the bytes of the others
// (no cluster barrier per phase; see run_tile). Group g
// of G evaluates components g, g+G, ...; the groups' partial sums of
// w_k eps_k are combined either inside the cluster ("local combine": the
// cluster holds all G groups of the tile, every block pushes its partial into
// all blocks and each keeps an identical copy of x) or, for the per-step kernel only,
// through a global scratch buffer and a per-tile arrival counter whose last
// block applies the update ("global combine"). Without clusters R = 1.
//
// Each block stages its weight slices in shared memory with cp.async at the
// start of the launch (as many as fit; the rest is read from global/L2 inside
// the matmul). The persistent kernel does this once for all T steps.
//
// Matmuls: act [BT, In] (fp32, shared) x W[In, cols] -> BT x cols, fp32
// accumulation. FMA path (BT <= 8): warps own vectors of V consecutive columns,
// their lanes strided subsets of the input rows, then a fixed-order shuffle
// reduction within the warp (deterministic, no block barrier). MMA path
// (BT = 16/32/64, 16-bit weights only): warps own 8-column tiles and run
// mma.sync m16n8k8 TF32; bf16/fp16 weights are exact in TF32, activations are
// rounded to TF32 (10-bit mantissa).
#pragma once

// The pieces, by concern (each includes what it uses):
#include "mlp_types.cuh"   // launch arguments, plan, shared-memory layout (host and device)
#include "mlp_device.cuh"  // weight loads, staging, cluster exchange, matmuls, scheduler update
#include "mlp_tile.cuh"    // run_tile, the kernels' body
#include "mlp_host.cuh"    // device facts, planner, plan cache, launchers
