// run_tile: one block's tile of rows through steps [step_begin, step_end), the device
// body both kernels (mlp_step.cu, mlp_persistent.cu) instantiate.
#pragma once

#include "mlp_device.cuh"
#include "mlp_types.cuh"

#if defined(__CUDACC__) || defined(FDP_HOST_EMULATION)

namespace fdp {
namespace mlp {

// ---------------------------------------------------------------------------------------------
// The tile: steps [step_begin, step_end) for one block. PERSISTENT=false adds the
// global-combine path and serves exactly one step per launch (launch_plan checks it on the host).

template <typename W, int BT, bool MMA, bool PERSISTENT>
__device__ __forceinline__ void run_tile(const Args& a, const Plan& p, int step_begin, int step_end) {
#if defined(FDP_HOST_EMULATION)
  unsigned char* smem = emu::block_smem();
  int& s_last = emu::block_s_last();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_last;
#endif
  // Only step_begin's vectors and coefficients are staged before the loop; the next step's are
  // prefetched by the persistent kernel alone, so a second step here would read stale ones.
  if (!PERSISTENT && step_end != step_begin + 1) __trap();
  const Layout lay = make_layout(a.D, a.H, a.L, a.K, p);
  const int tid = threadIdx.x;
  const int D = a.D, H = a.H, L = a.L, K = a.K;
  const int R = p.ranks;
  const int S = R * p.gpc;  // cluster size
  const int crank = static_cast<int>(blockIdx.x) % S;
  const int tile = static_cast<int>(blockIdx.x) / S;
  const int r = crank % R;
  const int team_base = crank - r;
  const int gl = crank / R;  // group within the cluster
  const int g = gl + static_cast<int>(blockIdx.y) * p.gpc;
  const bool global_combine = !PERSISTENT && (p.groups != p.gpc);
  const int row0 = tile * BT;
  const int nrows = imin(BT, a.B - row0);
  const int n0 = r * p.ns, ncols = imax(0, imin(H - n0, p.ns));
  const int d0 = r * p.ds, dcols = imax(0, imin(D - d0, p.ds));
  const int nsp = lay.nsp, dsp = lay.dsp;

  float* xs = reinterpret_cast<float*>(smem + lay.xs);
  float* hs = reinterpret_cast<float*>(smem + lay.hs);
  float* us = reinterpret_cast<float*>(smem + lay.us);
  float* wts = reinterpret_cast<float*>(smem + lay.wts);
  float* bvec = reinterpret_cast<float*>(smem + lay.bvec);
  float* cvec = reinterpret_cast<float*>(smem + lay.cvec);
  int* woff = reinterpret_cast<int*>(smem + lay.woff);
  unsigned char* wbase = smem + lay.wbase;
  auto part_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.part + par * lay.part_sz); };
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + lay.mbar);
  float* tok = reinterpret_cast<float*>(smem + lay.tok);
  auto coef_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.coef + par * lay.coef_sz); };
  auto noise_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.noise + par * lay.noise_sz); };
  auto tvec_buf = [&](int par) { return reinterpret_cast<float*>(smem + lay.tvec + par * lay.tvec_sz); };

  const W* w_in = static_cast<const W*>(a.w_in);
  const W* w_a = static_cast<const W*>(a.w_a);
  const W* w_b = static_cast<const W*>(a.w_b);
  const W* w_out = static_cast<const W*>(a.w_out);

  // Peers' writes count as transactions. Arrivals per phase: every thread of the block on the team
  // exchanges' mbarriers (team_done says why), thread 0 alone on the combine's.
  if (S > 1 && tid == 0) {
    for (int i = 0; i < kNumBars; ++i) mbar_init(bars + i, i < kBarPart ? kThreads : 1);
    mbar_init_fence();
  }

  // Zero the activations: padding rows/columns must read as 0 in the MMA path.
  // xs rows < nrows, columns < D are loaded below, so only its padding is zeroed here.
  for (int e = tid; e < BT * lay.xst; e += kThreads) {
    const int b = e / lay.xst, d = e - b * lay.xst;
    if (b >= nrows || d >= D) xs[e] = 0.f;
  }
  for (int e = tid; e < BT * lay.hst; e += kThreads) {
    hs[e] = 0.f;
    us[e] = 0.f;
  }

  // Step-dependent vectors of `step` into parity buffer `par`.
  auto stage_step = [&](int step, int par) {
    float* tv = tvec_buf(par);
    for (int j = 0; j < p.slots; ++j) {
      const int k = g + j * p.groups;
      if (k >= K) continue;
      float* t = tv + j * (1 + L) * nsp;
      stage_f32(t, nsp, a.t_in + (static_cast<size_t>(step) * K + k) * H + n0, 0, 1, ncols);
      stage_f32(t + nsp, nsp, a.t_shift + (static_cast<size_t>(step) * K + k) * L * H + n0, H, L, ncols);
    }
    stage_f32(coef_buf(par), kCoefWidth, a.coef + static_cast<size_t>(step) * kCoefWidth, 0, 1, kCoefWidth);
    if (p.stage && a.noise != nullptr)
      stage_f32(noise_buf(par), lay.dp, a.noise + (static_cast<size_t>(step) * a.B + row0) * D, D, nrows, D);
  };

  AsyncGroups as;
  // Group 0: router weights, biases, FiLM terms and the first step's vectors.
  stage_f32(wts, K, a.wts + static_cast<size_t>(row0) * K, K, nrows, K);
  for (int j = 0; j < p.slots; ++j) {
    const int k = g + j * p.groups;
    if (k >= K) continue;
    float* bv = bvec + j * (L * nsp + dsp);
    stage_f32(bv, nsp, a.b_b + static_cast<size_t>(k) * L * H + n0, H, L, ncols);
    stage_f32(bv + L * nsp, dsp, a.b_out + static_cast<size_t>(k) * D + d0, 0, 1, dcols);
    if (p.stage) {
      float* cv = cvec + j * (1 + 2 * L) * BT * nsp;
      stage_f32(cv, nsp, a.c_in + (static_cast<size_t>(row0) * K + k) * H + n0, static_cast<size_t>(K) * H, nrows,
                ncols);
      for (int l = 0; l < L; ++l) {
        const size_t src = ((static_cast<size_t>(row0) * K + k) * L + l) * H + n0;
        stage_f32(cv + (1 + l) * BT * nsp, nsp, a.scale + src, static_cast<size_t>(K) * L * H, nrows, ncols);
        stage_f32(cv + (1 + L + l) * BT * nsp, nsp, a.shift + src, static_cast<size_t>(K) * L * H, nrows, ncols);
      }
    }
  }
  stage_step(step_begin, 0);
  const int g_init = as.commit();

  // Groups 1..nslices: weight slices in chain order, as many as fit in shared memory.
  const int nq = 2 * L + 2;
  const int budget = p.smem_bytes - lay.wbase;
  {
    int used = 0;
    for (int s = 0; s < lay.nslices; ++s) {
      const int j = s / nq, q = s - j * nq;
      const int k = g + j * p.groups;
      const Slice sl = slice_geom(q, D, H, L, p);
      const int off = slice_offset_step(used, sl.bytes, budget);
      if (tid == 0) woff[s] = off;
      if (off >= 0 && k < K) {
        W* dst = reinterpret_cast<W*>(wbase + off);
        if (q == 0) {
          stage_slice<W>(dst, sl, w_in + static_cast<size_t>(k) * D * H + n0, H, ncols);
        } else if (q == nq - 1) {
          stage_slice<W>(dst, sl, w_out + static_cast<size_t>(k) * H * D + d0, D, dcols);
        } else {
          const int l = (q - 1) >> 1;
          const W* src = ((q & 1) ? w_a : w_b) + (static_cast<size_t>(k) * L + l) * H * H + n0;
          stage_slice<W>(dst, sl, src, H, ncols);
        }
      }
      as.commit();  // group index g_init + 1 + s
    }
  }
  // Everything above was written before the call; x is the previous step's output in the
  // per-step kernel's programmatic launches (mlp_host.cuh, launch_steps): read it after the wait.
  if constexpr (!PERSISTENT) {
    grid_dependency_wait();
    launch_dependents();  // the next step may start staging; its own wait covers this whole grid
  }
  for (int e = tid; e < nrows * D; e += kThreads)
    xs[(e / D) * lay.xst + e % D] = a.x_in[static_cast<size_t>(row0) * D + e];

  unsigned used_mask = 0;
  int g_next = -1;

  // Team exchanges (R > 1). The hidden phases of a component write their output columns into the
  // same buffer of every team member, hs or us alternately: exchange q writes buffer q & 1 and
  // completes on that buffer's mbarrier, in its phase q / 2. The producer of exchange q + 1 has
  // waited for exchange q to complete in its own block, which took every store (or the token) of
  // every team member, and each member's stores follow its reads of the inputs of exchange q: in
  // both matmuls a warp owns whole output columns (FMA: V-column vectors, its lanes' partial sums
  // meeting through shuffles; MMA: 8-column tiles, through mma.sync), so each of its stores is
  // computed from all its lanes' reads of the rows it stores, and a warp that reads stores (one
  // without columns reads nothing). Padding rows (b >= nrows) are the exception: their stores are
  // the constant 0, not computed from the reads, but whatever overtakes such a read writes 0 there
  // too. Exchange q's inputs are the buffer exchange q + 1 writes, so
  // writes never overtake a peer's reads; and a producer is at most one exchange ahead of any team
  // member, so stores of exchange q + 1 land on the other mbarrier and those of q + 2 only after
  // this block has seen q complete. A component's chain is 2L + 1 exchanges, an odd number: the
  // next component swaps the roles of hs and us, so consecutive exchanges still alternate.
  int xq = 0;
  const int team_in = peer_bytes(BT, H, p.ns, R, r);
  auto act_buf = [&](int q) { return (q & 1) ? us : hs; };
  // y into this block's act_buf(xq) at p and into the same place of every team peer.
  auto team_put = [&](float* p, float y) {
    *p = y;
    const unsigned par = (xq >> 1) & 1;
    int pr = r;  // the peers r + 1, r + 2, ... (mod R), wrapped by a compare: no division per store
    for (int q = 1; q < R; ++q) {
      pr = pr + 1 == R ? 0 : pr + 1;
      st_async(cluster_addr(p, team_base + pr), y, cluster_addr(bars + (xq & 1), team_base + pr), par);
    }
  };
  // The end of an exchange, without a block barrier: every thread arrives on the exchange's mbarrier
  // (thread 0's arrival also announces the bytes the peers push) and every warp waits for the phase
  // itself, so each resumes as soon as the phase completes instead of after thread 0 has seen it and
  // a __syncthreads has passed it on. What the waiting threads may then read, and why:
  //  - the peers' values: each st.async's complete_tx is a release at cluster scope on this mbarrier,
  //    and the waiter's try_wait.parity.acquire.cluster that sees the phase complete acquires them;
  //  - this block's own values (plain shared stores of other warps) and the weight slices other
  //    threads' cp.async waits (next_ready) completed: every thread's arrive is a release (.cta) after
  //    them in its program order, and the phase completes only with all kThreads arrivals, so the
  //    same acquire orders them before the waiter's reads;
  //  - reuse of the buffer the next exchange writes (this exchange's input): a thread arrives after
  //    its reads of it, so no thread of this block writes it (in the next phase, after this wait)
  //    while another is still reading it. Peers' writes into it follow the argument above.
  // The cost: each warp's acquire.cluster invalidates L1 (CCTL.IVALL), 8 per block instead of 1;
  // the kernel's shared-memory data is not in L1, only weights read from L2 are.
  auto team_done = [&]() {
    if (R > 1) {
      const unsigned par = (xq >> 1) & 1;
      uint64_t* bar = bars + (xq & 1);
      if (tid == 0) {
        if (ncols == 0)
          for (int q = 1, pr = r; q < R; ++q) {
            pr = pr + 1 == R ? 0 : pr + 1;
            st_async(cluster_addr(tok + (xq & 1), team_base + pr), 0.f, cluster_addr(bar, team_base + pr), par);
          }
        mbar_arrive_expect(bar, team_in, par);
      } else {
        mbar_arrive(bar, par);
      }
      mbar_wait(bar, par);
    } else {
      __syncthreads();
    }
    ++xq;
  };
  // Partials of the in-cluster combine: every block pushes its rows x its columns of W_out into
  // slot gl of every block of the cluster (a token when it has no columns).
  const int part_in = p.gpc * (peer_bytes(nrows, D, p.ds, R, r) + rank_bytes(nrows, D, p.ds, r)) -
                      rank_bytes(nrows, D, p.ds, r);
  // Who pushes what in that combine, divided out once per launch. Push e = i * (S - 1) + j sends
  // value i of the nrows x dcols partial to rank crank + 1 + j (mod S); the threads t < P = pv * (S - 1)
  // (pv = kThreads / (S - 1)) take pushes t, t + P, t + 2P, ..., so a thread keeps its peer j = t % (S - 1)
  // in every round and its value index grows by pv: a round costs additions and compares, not the
  // four integer divisions (e / (S - 1), % S, i / dcols, i % dcols) each push would otherwise take.
  const int s1 = imax(S - 1, 1), pv = kThreads / s1, dcl = imax(dcols, 1);
  const bool pusher = tid < pv * s1;
  const int push_rank = (crank + 1 + tid % s1) % S;
  const RowWalk push_walk(tid / s1, pv, dcl);
  // This thread's elements of the per-step loops over the partial (nrows x dcols) and x (nrows x D).
  const RowWalk acc_walk(tid, kThreads, dcl), x_walk(tid, kThreads, D);

  // Row strides of the resident slices (W_in, the hidden matrices, W_out), not worked out per phase.
  const int ld_first = slice_geom(0, D, H, L, p).stride, ld_hidden = slice_geom(1, D, H, L, p).stride,
            ld_last = slice_geom(nq - 1, D, H, L, p).stride;

  for (int step = step_begin; step < step_end; ++step) {
    const int par = (step - step_begin) & 1;
    // This block's part of its group's slot of the partials: acc[b * pst + c] for its column d0 + c.
    float* acc = part_buf(par) + gl * BT * lay.pst + (global_combine ? 0 : d0);
    if (dcols > 0) walk_rows(acc_walk, nrows, dcols, [&](int b, int c) { acc[b * lay.pst + c] = 0.f; });
    if (step == step_begin) {
      as.wait_for(g_init);
      as.wait_for(g_init + 1);
      // Cluster-wide, once: the mbarriers are initialised and the activations zeroed before any
      // peer pushes into this block.
      cluster_sync_or_block(S);
      for (int k = 0; k < K; ++k) {
        bool u = !a.skip_unused;
        for (int b = 0; b < nrows && !u; ++b) u = wts[b * K + k] != 0.f;
        if (u) used_mask |= 1u << k;
      }
    } else {
      as.wait_for(g_next);
      __syncthreads();
    }
    if (PERSISTENT && step + 1 < step_end) {
      stage_step(step + 1, par ^ 1);
      g_next = as.commit();
    }
    const float* coef = coef_buf(par);
    const float* tv = tvec_buf(par);

    for (int j = 0; j < p.slots; ++j) {
      const int k = g + j * p.groups;
      // Uniform over the team: same component, same rows.
      const bool on = k < K && ((used_mask >> k) & 1u);
      if (!on) continue;
      const int sbase = j * nq;
      const float* tin = tv + j * (1 + L) * nsp;
      const float* bv = bvec + j * (L * nsp + dsp);
      const float* cv = cvec + j * (1 + 2 * L) * BT * nsp;
      const size_t rk = static_cast<size_t>(row0) * K + k;  // (row0, k) row of the [B, K, ...] terms
      auto wptr = [&](int q, const W* gsrc, int gld, int& ld, bool& res) -> const W* {
        const int off = woff[sbase + q];
        res = off >= 0;
        if (res) {
          ld = q == 0 ? ld_first : q == nq - 1 ? ld_last : ld_hidden;
          return reinterpret_cast<const W*>(wbase + off);
        }
        ld = gld;
        return gsrc;
      };
      auto next_ready = [&](int q) {  // wait for the slice the next phase reads
        const int s = sbase + q + 1;
        if (s < lay.nslices) as.wait_for(g_init + 1 + s);
      };
      float* hb = act_buf(xq);      // h of this component
      float* ub = act_buf(xq + 1);  // SiLU(...) of this component

      // Phase 0: h = x W_in + t_in + c_in
      {
        const float* cin = p.stage ? cv : a.c_in + rk * H + n0;
        const int cst = p.stage ? nsp : K * H;
        auto epi = [&](int b, int c, float v) {
          const float y = (b < nrows) ? v + tin[c] + cin[b * cst + c] : 0.f;
          team_put(hb + b * lay.hst + n0 + c, y);
        };
        int ld;
        bool res;
        const W* w = wptr(0, w_in + static_cast<size_t>(k) * D * H + n0, H, ld, res);
        matmul<W, BT, MMA>(xs, lay.xst, D, w, res, ld, ncols, epi);
      }
      next_ready(0);
      team_done();

      for (int l = 0; l < L; ++l) {
        // u = SiLU(scale * (h W_a) + shift + t_shift)
        {
          const float* tsh = tin + (1 + l) * nsp;
          const float* sc = p.stage ? cv + (1 + l) * BT * nsp : a.scale + (rk * L + l) * H + n0;
          const float* sh = p.stage ? cv + (1 + L + l) * BT * nsp : a.shift + (rk * L + l) * H + n0;
          const int sst = p.stage ? nsp : K * L * H;
          auto epi = [&](int b, int c, float v) {
            const float y = (b < nrows) ? silu(v * sc[b * sst + c] + sh[b * sst + c] + tsh[c]) : 0.f;
            team_put(ub + b * lay.hst + n0 + c, y);
          };
          int ld;
          bool res;
          const W* w = wptr(1 + 2 * l, w_a + (static_cast<size_t>(k) * L + l) * H * H + n0, H, ld, res);
          matmul<W, BT, MMA>(hb, lay.hst, H, w, res, ld, ncols, epi);
        }
        next_ready(1 + 2 * l);
        team_done();
        // h += u W_b + b_b in place: each element is read and written by one thread, peers write
        // only their own columns of h, and every team member finished reading h in the previous
        // exchange (whose completion this block waited for).
        {
          const float* bb = bv + l * nsp;
          auto epi = [&](int b, int c, float v) {
            float* hp = hb + b * lay.hst + n0 + c;
            const float y = (b < nrows) ? *hp + v + bb[c] : 0.f;
            team_put(hp, y);
          };
          int ld;
          bool res;
          const W* w = wptr(2 + 2 * l, w_b + (static_cast<size_t>(k) * L + l) * H * H + n0, H, ld, res);
          matmul<W, BT, MMA>(ub, lay.hst, H, w, res, ld, ncols, epi);
        }
        next_ready(2 + 2 * l);
        team_done();
      }

      // acc += w_k (h W_out + b_out) over this rank's columns of D
      {
        const float* bo = bv + L * nsp;
        auto epi = [&](int b, int c, float v) {
          // A zero weight leaves the component out of its row even when its output is NaN
          // (rows of one tile may be routed differently); a NaN weight is not zero.
          if (b < nrows && wts[b * K + k] != 0.f) acc[b * lay.pst + c] += wts[b * K + k] * (v + bo[c]);
        };
        int ld;
        bool res;
        const W* w = wptr(nq - 1, w_out + static_cast<size_t>(k) * H * D + d0, D, ld, res);
        matmul<W, BT, MMA>(hb, lay.hst, H, w, res, ld, dcols, epi);
      }
      next_ready(nq - 1);
      // Every thread is done reading h before this block's next stores (or token) go out: the
      // second exchange from now overwrites h in the peers once they have those.
      __syncthreads();
    }

    if (!global_combine) {
      if (S > 1) {
        // Slot gl of the partials of step parity `par`, in every block of the cluster. A block can
        // be a step ahead of a peer of another team (it waited for the peer's partials of this
        // step, not for the peer to finish reading them), never two: its partials of step s + 2
        // need the combine of s + 1, which needs the peer's partials of s + 1, which the peer
        // pushes after reading those of s. So two parities of slots and mbarriers suffice.
        uint64_t* bar = bars + kBarPart + par;
        const unsigned bpar = ((step - step_begin) >> 1) & 1;
        const int n = nrows * dcols;
        if (pusher && n > 0) {
          const unsigned pbar = cluster_addr(bar, push_rank);
          walk_rows(push_walk, nrows, dcols, [&](int b, int c) {
            float* src = acc + b * lay.pst + c;
            st_async(cluster_addr(src, push_rank), *src, pbar, bpar);
          });
        }
        if (tid == 0) {
          if (n == 0)
            for (int q = 1, pr = crank; q < S; ++q) {
              pr = pr + 1 == S ? 0 : pr + 1;
              st_async(cluster_addr(tok + kBarPart + par, pr), 0.f, cluster_addr(bar, pr), bpar);
            }
          mbar_arrive_expect(bar, part_in, bpar);
        }
        // Every warp waits itself (thread 0 alone arrives): the combine below reads only the peers'
        // partials, acquired by each thread's wait as in team_done, and this block's own slot, whose
        // writes (the W_out epilogues, or the zeroing at the step's start) a block barrier has
        // already ordered before this point.
        mbar_wait(bar, bpar);
      }
      // Every block of the cluster computes the tile's new x from the groups' partials.
      const bool last = step + 1 == step_end;
      const bool noisy = a.noise != nullptr && coef[abi::kColAddsNoise] != 0.f;
      const float* nz = noise_buf(par);
      const float* part = part_buf(par);
      walk_rows(x_walk, nrows, D, [&](int b, int d) {
        float e = 0.f;
        for (int gg = 0; gg < p.gpc; ++gg) e += part[(gg * BT + b) * lay.pst + d];
        float z = 0.f;
        if (noisy)
          z = p.stage ? nz[b * lay.dp + d] : __ldg(a.noise + (static_cast<size_t>(step) * a.B + row0 + b) * D + d);
        const float xn = inpaint(a, step, static_cast<size_t>(row0 + b), d,
                                 sched_update(xs[b * lay.xst + d], e, z, coef, a.clip, a.clip_range));
        xs[b * lay.xst + d] = xn;
        if (last && crank == 0) a.x_out[static_cast<size_t>(row0 + b) * D + d] = xn;
      });
      __syncthreads();
    } else if constexpr (!PERSISTENT) {
      // Publish this block's partial, then the tile's last arriving block applies the update.
      for (int o = tid; o < nrows * dcols; o += kThreads) {
        const int b = o / dcols, c = o - b * dcols;
        a.scratch[(static_cast<size_t>(g) * a.B + row0 + b) * D + d0 + c] = acc[b * lay.pst + c];
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) s_last = atomicAdd(a.counters + tile, 1) == R * p.groups - 1;
      __syncthreads();
      if (s_last) {
        __threadfence();
        const bool noisy = a.noise != nullptr && coef[abi::kColAddsNoise] != 0.f;
        for (int o = tid; o < nrows * D; o += kThreads) {
          const int b = o / D, d = o - b * D;
          const size_t row = static_cast<size_t>(row0 + b);
          float e = 0.f;
          for (int gg = 0; gg < p.groups; ++gg) e += __ldcg(a.scratch + (gg * static_cast<size_t>(a.B) + row) * D + d);
          const float z = noisy ? __ldg(a.noise + (static_cast<size_t>(step) * a.B + row) * D + d) : 0.f;
          a.x_out[row * D + d] = inpaint(a, step, row, d, sched_update(xs[b * lay.xst + d], e, z, coef, a.clip,
                                                                        a.clip_range));
        }
        if (tid == 0) a.counters[tile] = 0;  // ready for the next launch
      }
    }
  }
  // One cluster barrier before exit. Everything pushed INTO this block belongs to an exchange it
  // has waited for, but its own last pushes to slower peers may still be in flight, and PTX does
  // not say that a block may exit with st.async outstanding. Every block reaches this point only
  // after its last wait completed, i.e. after every push into it landed; so once all have arrived,
  // no push in the cluster is in flight. (Once per launch, not per phase.) Nothing is read after it,
  // so its arrive is relaxed (cluster_exit_sync).
  if (S > 1) cluster_exit_sync(S);
}

// The entry point for a weight type, tile rows and tensor cores, or nullptr where none is built (tensor
// cores: 16-bit weights, 16/32/64 rows; FMA: 1/2/4/8 rows). `Kernels::get<W, BT, MMA>()` names one
// variant of a kernel (mlp_step.cu, mlp_persistent.cu): both kernels share this table.
template <class Kernels, typename W>
const void* kernel_for_type(int mma, int bt) {
  if constexpr (sizeof(W) == 2) {
    if (mma) {
      switch (bt) {
        case 16: return Kernels::template get<W, 16, true>();
        case 32: return Kernels::template get<W, 32, true>();
        case 64: return Kernels::template get<W, 64, true>();
        default: return nullptr;
      }
    }
  }
  if (mma) return nullptr;
  switch (bt) {
    case 1: return Kernels::template get<W, 1, false>();
    case 2: return Kernels::template get<W, 2, false>();
    case 4: return Kernels::template get<W, 4, false>();
    case 8: return Kernels::template get<W, 8, false>();
    default: return nullptr;
  }
}

template <class Kernels>
const void* kernel_for(int wtype, int mma, int bt) {
  switch (wtype) {
    case kF32: return kernel_for_type<Kernels, float>(mma, bt);
    case kBF16: return kernel_for_type<Kernels, __nv_bfloat16>(mma, bt);
    case kF16: return kernel_for_type<Kernels, __half>(mma, bt);
    default: return nullptr;
  }
}

}  // namespace mlp
}  // namespace fdp

#endif  // __CUDACC__ || FDP_HOST_EMULATION
