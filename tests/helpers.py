"""Helpers the tests share: the kernel tests' schedules, tolerances and policies, the error measure.

A plain module (tests/conftest.py holds only pytest's setup): the test modules import it, and so do the
native-GPU scripts they run in subprocesses with this folder on PYTHONPATH.
"""
import copy

import torch

import fdp
from fdp import packing
from fdp.tolerances import REL_TOL

U32 = 2.0 ** -24


# Feature size of the kernel tests' policies.
KERNEL_COND_DIM = 5

# Relative-error bounds for fused kernels against the float64 reference, by weight dtype: the
# library's table, which backend="auto" checks candidates with too.
KERNEL_TOL = REL_TOL

# Problems that both the CUDA kernels on a GPU (tests/test_fused_mlp.py) and their host emulation
# (tests/test_cuda_emulation.py) run: policy shape, schedule, batch and weight dtype.
KERNEL_PROBLEMS = {
    # The target shape: K=4, H=256, D=32 (horizon 16 x 2), one row, ten steps.
    "target": dict(K=4, H=256, L=2, horizon=16, action_dim=2, B=1, sched="ddpm_clip", strategy="soft", T=10,
                   dtype=torch.float32),
    # bf16 weights on the FMA path, D = 15 (unaligned rows).
    "bf16": dict(K=3, H=48, L=2, horizon=5, action_dim=3, B=5, sched="ddpm_clip", strategy="soft", T=3,
                 dtype=torch.bfloat16),
}

# Schedules every fused-kernel test draws from: name -> (scheduler factory, eta).
KERNEL_SCHEDULERS = {
    # DDPM with clipping: every step but the last adds noise.
    "ddpm_clip": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                            clip_sample=True), 0.0),
    # Deterministic DDIM (eta 0): no noise input at all.
    "ddim": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                       clip_sample=True), 0.0),
    # Stochastic DDIM, no clipping.
    "ddim_eta": (lambda: fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear",
                                           clip_sample=False, timestep_spacing="trailing"), 0.7),
    # v-prediction with the log variance.
    "ddpm_v": (lambda: fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="linear",
                                         variance_type="fixed_small_log", prediction_type="v_prediction",
                                         clip_sample=False), 0.0),
}


def make_mlp_policy(K=3, horizon=4, action_dim=3, cond_dim=5, hidden=16, blocks=2, dtype=torch.float64,
                    strategy="soft", seed=0, **router_kw):
    """A small random MLP policy (float64 by default: the ground truth for kernels)."""
    torch.manual_seed(seed)
    comps = [fdp.MLPDenoiser(action_dim, horizon, global_cond_dim=cond_dim, hidden_dim=hidden, num_blocks=blocks)
             for _ in range(K)]
    router = fdp.Router(cond_dim, K, hidden_dim=8, strategy=strategy, **router_kw)
    policy = fdp.FactorizedPolicy(comps, router, horizon, action_dim).to(dtype)
    # Non-trivial FiLM and biases, so a kernel that drops a term fails.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def signed_tanh_routing(policy, zero_comp=None):
    """Give a ``"tanh"`` router the weights the FDP authors' trained routers settle at: magnitudes up to
    about 0.9, alternating signs (logit biases 0.4 .. 1.4, the first component positive), so rows neither
    sum to 1 nor stay non-negative (with two or more components in use). ``zero_comp``: that component's
    logit row is zeroed, so its weight is exactly 0 on every row (tanh(0) = 0), the case fused kernels
    skip."""
    K = policy.num_components
    live = [k for k in range(K) if k != zero_comp]  # the signs alternate over the components in use
    with torch.no_grad():
        last = policy.router.net[2]
        signs = torch.ones(K, dtype=last.bias.dtype)
        signs[live[1::2]] = -1
        last.bias.copy_(torch.linspace(0.4, 1.4, K, dtype=last.bias.dtype) * signs)
        if zero_comp is not None:
            last.weight[zero_comp] = 0
            last.bias[zero_comp] = 0
    return policy


def assert_signed_unnormalised(weights):
    """The routing weights of a tanh kernel case hold what the case is for: a negative weight and rows
    that do not sum to 1 (so a kernel that clamps, skips ``w <= 0`` or renormalises fails it)."""
    assert (weights < 0).any(), "no negative weight: the case does not test signed routing"
    assert ((weights.sum(-1) - 1).abs() > 0.1).all(), "a row sums to ~1: the case does not test unnormalised routing"


def kernel_policy(K, H, L, horizon, action_dim, strategy="soft", seed=0, dtype=torch.float64):
    """A random MLP policy for kernel tests, with routing parameters that suit ``strategy``."""
    kw = {}
    if strategy == "topk":
        kw["topk"] = min(2, K)
    if strategy == "fixed":
        w = torch.rand(K, generator=torch.Generator().manual_seed(seed)) + 0.1
        kw["fixed_weights"] = (w / w.sum()).tolist()
    policy = make_mlp_policy(K=K, horizon=horizon, action_dim=action_dim, cond_dim=KERNEL_COND_DIM, hidden=H,
                             blocks=L, strategy=strategy, seed=seed, dtype=dtype, **kw)
    return signed_tanh_routing(policy) if strategy == "tanh" else policy


def kernel_matmuls(policy):
    """The ``torch.nn.Linear`` modules of an MLP policy that the fused kernels evaluate as matmuls (packed
    weights, ``tl.dot`` / mma): each component's input, block and output layers. The time and condition
    terms are computed once per step or call, outside them."""
    return [m for c in policy.components for m in (c.inp, *c.blocks_a, *c.blocks_b, c.out)]


def rounded_reference(policy, dtype):
    """The float64 ground truth for a pack in ``dtype``: weight matrices rounded to
    ``dtype`` (the kernels compute with exactly those values), everything else float64."""
    ref = copy.deepcopy(policy).double()
    if dtype != torch.float32:
        with torch.no_grad():
            for m in kernel_matmuls(ref):
                m.weight.copy_(m.weight.to(dtype).double())
    return ref


def rel_err(a, b):
    """The fused-kernel tests' error measure, ``max|a - b| / max|b|`` in float64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def replaced(obj, **kw):
    """A shallow copy of ``obj`` with attributes replaced (bad-input tests on packed objects)."""
    new = copy.copy(obj)
    for k, v in kw.items():
        setattr(new, k, v)
    return new


# -- float32 error bounds derived from the computation (issue 28: never tuned to one machine) --------------------


def float32_loop_bound(run64, modules, extent: int = 1, runs: int = 4, seed: int = 0, coverage: float = 4.0,
                       tf32=()):
    """``(x64, bound)``: the float64 result of a computation and a bound on how far any float32 evaluation
    of it (any kernel order, any CPU) may be from it, elementwise.

    Monte Carlo arithmetic, as :func:`fdp.tolerances.loop_rounding_bound` (which ``fdp export onnx`` runs)
    but around any computation: ``run64()`` is run ``runs`` times in float64 with the scheduler's update
    (:func:`fdp.schedulers.apply_coefficients`) rounded likewise relative to its terms
    (:func:`fdp.tolerances.rounded_update`), and every leaf module's output (of ``modules``) multiplied by
    ``1 + d``, ``d`` uniform in ``[-s, s]`` with ``s = sqrt(n) u32`` (:func:`fdp.tolerances.perturb_outputs`):
    the probabilistic rounding error of a float32 sum of ``n`` terms (Higham and Mary 2019: ``lambda sqrt(n) u``
    with probability ``1 - 2 exp(-lambda^2 / 2)``), ``n`` the module's reduction length (times ``extent``
    for normalisations, which reduce over the sequence too). The perturbations travel through the whole
    loop, T steps of the scheduler included, so the spread measures the float32 error growth of this
    computation on these inputs at these magnitudes. The bound is ``coverage`` times the largest deviation
    seen (elementwise max over the runs), plus float64 rounding of the result; ``coverage = 4`` covers the
    tail beyond ``runs`` samples of a sum of many independent roundings (4 standard deviations).

    ``tf32``: the ``torch.nn.Linear`` modules (of ``modules``) that the evaluation computes on tensor cores
    in tf32 (e.g. :func:`kernel_matmuls` under ``precision="tf32"``): their operands are rounded as
    :class:`fdp.tolerances.OperandRounding` models it, new weight roundings each run.
    """
    import fdp.schedulers as schedulers
    from fdp import tolerances

    x64 = run64()
    u32 = torch.finfo(torch.float32).eps / 2
    gen = torch.Generator().manual_seed(seed)
    exact = schedulers.apply_coefficients
    # The test's own computation may be any loop that calls the scheduler's update: patched here, in tests only.
    schedulers.apply_coefficients = lambda *a: tolerances.rounded_update(*a, unit=u32, generator=gen)
    # The operands' hooks first: the float32 accumulation's perturbation then applies to their result.
    operands = tolerances.OperandRounding(tf32, tolerances.TF32_OPERAND_UNIT, gen) if tf32 else None
    hooks = tolerances.perturb_outputs(modules, u32, gen, extent)
    try:
        spread = torch.zeros_like(x64, dtype=torch.float64)
        for _ in range(runs):
            if operands is not None:
                operands.redraw()
            spread = torch.maximum(spread, (run64().double() - x64.double()).abs())
    finally:
        schedulers.apply_coefficients = exact
        for h in hooks:
            h.remove()
        if operands is not None:
            operands.remove()
    return x64, tolerances.finish_bound(x64, spread, coverage)


def torch_loop_bound(policy, table, cond, x_T, step_noise=None, known=None, known_mask=None, tf32=False):
    """``(x64, bound)``: the torch backend's sampling loop of ``policy`` over ``table`` in float64 (a copy, on
    these inputs widened) and :func:`float32_loop_bound` of it: how far a float32 evaluation of that loop may
    be. ``tf32``: for a fused MLP kernel computing its matmuls on tensor cores in tf32 (Triton's
    ``precision="tf32"`` on float32 weights), the operands of :func:`kernel_matmuls` rounded to tf32
    (:class:`fdp.tolerances.OperandRounding`)."""
    from fdp.backends import get_backend

    p64 = copy.deepcopy(policy).double()
    prep = get_backend("torch").prepare(p64, table)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return float32_loop_bound(lambda: prep.run(d(cond), d(x_T), d(step_noise), d(known), known_mask), [p64],
                              extent=p64.horizon, tf32=kernel_matmuls(p64) if tf32 else ())


def tf32_kernel_bound(policy, table, cond, x_T, step_noise=None):
    """:func:`torch_loop_bound` of a fused MLP kernel whose matmuls run in tf32."""
    return torch_loop_bound(policy, table, cond, x_T, step_noise, tf32=True)


def round_to_tf32(t, toward_zero=False):
    """``t`` rounded to tf32 (10 explicit mantissa bits) as float64: to nearest even, or truncated toward zero
    (the two ways a tensor core's operand may be rounded; finite values)."""
    bits = t.float().view(torch.int32)
    if not toward_zero:
        bits = bits + 0x0FFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32).double()


def tf32_matmuls(linears, toward_zero=False):
    """Evaluate ``linears`` as a tf32 tensor-core matmul does, wherever their weights are used
    (:class:`fdp.tolerances.LinearsByWeight`): both operands rounded to tf32 (:func:`round_to_tf32`), products
    and sums exact (float64 here). Returns the handles to remove."""
    from fdp.tolerances import LinearsByWeight

    def linear(m, inp, weight, bias):
        return torch.nn.functional.linear(round_to_tf32(inp, toward_zero), round_to_tf32(weight, toward_zero), bias)
    return [LinearsByWeight({m.weight: m for m in linears}, linear)]


def assert_within_float32_bound(got, x64, bound, what: str):
    """Every element of the float32 result ``got`` within ``bound`` of the float64 ``x64``."""
    err = (got.double().cpu() - x64.double().cpu()).abs()
    assert bool(torch.isfinite(got).all()), f"{what}: not finite"
    assert float(err.max()) <= float(bound), (f"{what}: max |float32 - float64| {float(err.max()):.3g} exceeds the "
                                              f"derived float32 bound {float(bound):.3g}")


def step_bound(table, i, x, eps, weights, noise):
    """:func:`fdp.tolerances.compose_step_bound` for step ``i`` of ``table`` on these inputs (any dtype, any
    device; ``noise`` ignored on a step that adds none)."""
    from fdp.tolerances import compose_step_bound

    d = torch.float64
    return compose_step_bound(table.coef[i], x.to(d), eps.to(d), weights.to(d),
                              noise.to(d) if table._adds[i] else None, table.clip_range if table.clip_sample else None)


def bound_ratio(out, ref, bound):
    """``max |out - ref| / bound`` over the elements of an elementwise bound (above 1: out of bound); inf for a
    NaN. A zero bound (a copied value) admits only an exact match."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    d = (out.double() - ref).abs()
    return float(torch.where(d == 0, 0.0, d / bound).max())


def assert_matches_in_float32(results: dict, sampler, cond, x_T, step_noise=None, known=None, known_mask=None):
    """Each float32 result in ``results`` (name -> actions) and ``sampler``'s own within the derived float32
    bound (:func:`float32_loop_bound`) of the same loop in float64 on the same inputs (inpainting ``known``
    where given)."""
    import fdp

    p64 = copy.deepcopy(sampler.policy).double()
    s64 = fdp.Sampler(p64, sampler.scheduler, num_inference_steps=sampler.num_steps, eta=sampler.eta,
                      backend="torch")
    d = lambda t: None if t is None else t.double()  # noqa: E731
    inpaint = {} if known is None else {"known": known, "known_mask": known_mask}
    x64, bound = float32_loop_bound(lambda: s64(d(cond), x_T=d(x_T), step_noise=d(step_noise),
                                                **{k: d(v) if k == "known" else v for k, v in inpaint.items()}),
                                    [p64], extent=p64.horizon)
    results = dict(results, sampler=sampler(cond, x_T=x_T, step_noise=step_noise, **inpaint))
    for name, got in results.items():
        assert_within_float32_bound(got, x64, bound, name)


# -- the per-call terms (fdp.packing.PackedCond) ----------------------------------------------------------


def cond_policy(K=3, L=2, H=16, Dc=5, Hr=8, strategy="soft", conditional=True, seed=0, horizon=4, action_dim=3):
    """A float64 MLP policy with non-trivial FiLM, biases and router (the ground truth)."""
    torch.manual_seed(seed)
    comps = [fdp.MLPDenoiser(action_dim, horizon, global_cond_dim=Dc if conditional else 0, hidden_dim=H,
                             num_blocks=L) for _ in range(K)]
    kw = {"topk": min(2, K)} if strategy == "topk" else {}
    if strategy == "fixed":
        w = torch.rand(K, generator=torch.Generator().manual_seed(seed)) + 0.1
        kw["fixed_weights"] = (w / w.sum()).tolist()
    router = fdp.Router(Dc, K, hidden_dim=Hr, strategy=strategy, **kw)
    policy = fdp.FactorizedPolicy(comps, router, horizon, action_dim).double()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if strategy == "tanh":  # signed weights of both signs, rows that do not sum to 1
            last = policy.router.net[2]
            last.bias.copy_(torch.linspace(-1.0, 1.0, K, dtype=last.bias.dtype))
    return policy


def cond_truth_and_bounds(policy, c):
    """The float64 per-call terms of ``policy`` for features ``c`` (as float32 reads them), and float32 error
    bounds for each kernel that computes them in float32 from :func:`fdp.packing.pack_cond`.

    Every term is a float32 dot product of length n plus a bias, so it is within ``(n + 5) u (|c| |W| + |b|)``
    (first order; u = 2^-24) of the float64 truth: n roundings of the accumulation, the features rounded to
    float32, the packed weight rounded (twice for ``shift``'s folded rows), the bias add and the truth's own
    rounding to float32. The router's logits carry the first layer's bound through ``|W2|`` (ReLU is
    1-Lipschitz) plus their own; a softmax weight moves by at most ``w_k (d_k + sum_j w_j d_j)`` for logit
    errors ``d``, tanh by ``(1 - w^2) d``; both then add a few roundings of exp / division (8 u |w|). ``hard``
    (and the top-k choice) is compared exactly, where the logits at the boundary are further apart than twice
    their bound (asserted, so a case that does not test that cannot pass silently)."""
    c = c.double()
    B = c.shape[0]
    truth = packing.call_terms(policy, c, policy.weights(c))
    comps = list(policy.components)
    K, L, H = len(comps), comps[0].num_blocks, comps[0].hidden_dim
    # |c| |W| + |b| for every column of the one affine map, in CallTerms order (c_in, scale, shift).
    mags = []
    for comp in comps:
        if comp.cond_proj is None:
            mags.append(torch.zeros(B, (1 + 2 * L) * H, dtype=torch.float64) + (
                torch.cat([comp.in_bias.abs(), torch.ones(L * H), torch.stack([b.bias for b in comp.blocks_a])
                           .abs().flatten()]).double()))
            continue
        W, b = comp.cond_proj.weight.double(), comp.cond_proj.bias.double()
        m = c.abs() @ W.abs().t() + b.abs()                     # [B, H + 2 L H]
        b_a = torch.stack([blk.bias for blk in comp.blocks_a]).double().abs().flatten()
        m_g, m_b = m[:, H:H + L * H], m[:, H + L * H:]
        # shift = (1 + gamma) b_a + beta: |b_a| (1 + |gamma|-magnitude) + |beta|-magnitude.
        mags.append(torch.cat([m[:, :H], 1 + m_g, b_a * (1 + m_g) + m_b], dim=1))
    mags = torch.stack(mags, 1)  # [B, K, (1 + 2L) H]
    n = comps[0].global_cond_dim
    bound = (n + 5) * U32 * mags
    bounds = {"c_in": bound[:, :, :H], "scale": bound[:, :, H:H + L * H].unflatten(-1, (L, H)),
              "shift": bound[:, :, H + L * H:].unflatten(-1, (L, H))}
    router = policy.router
    first, last = router.net[0], router.net[2]
    w = truth.weights.double()
    if router.strategy == "fixed":
        bounds["weights"] = torch.zeros_like(w)
    else:
        pre = c @ first.weight.t() + first.bias
        d_h = (router.cond_dim + 5) * U32 * (c.abs() @ first.weight.abs().t() + first.bias.abs())
        h = pre.clamp_min(0)
        d_l = (first.out_features + 5) * U32 * (h.abs() @ last.weight.abs().t() + last.bias.abs()) \
            + d_h @ last.weight.abs().t()
        # A logit of -inf (a zero weight row with bias -inf: a component never chosen) is -inf in any
        # arithmetic, without error (its weight is 0, so it adds nothing to the softmax's bound either).
        d_l = torch.where(torch.isfinite(h @ last.weight.t() + last.bias), d_l, 0.0)
        if router.strategy == "tanh":
            bounds["weights"] = (1 - w * w) * d_l + 8 * U32 * w.abs()
        elif router.strategy == "hard":
            logits = h @ last.weight.t() + last.bias
            top2 = logits.topk(2, dim=1).values if logits.shape[1] > 1 else None
            if top2 is not None:
                gap = top2[:, 0] - top2[:, 1]
                ok = ~torch.isfinite(gap) | (gap > 2 * d_l.max(1).values)
                assert ok.all(), "near tie: the exact comparison of hard routing would not be sound"
            bounds["weights"] = torch.zeros_like(w)
        else:
            if router.strategy == "topk":
                logits = h @ last.weight.t() + last.bias
                srt = logits.sort(dim=1, descending=True).values
                n_top = router.topk
                if n_top < logits.shape[1]:
                    gap = srt[:, n_top - 1] - srt[:, n_top]
                    assert (gap > 2 * d_l.max(1).values).all(), "near tie at the top-k boundary"
            bounds["weights"] = w * (d_l + (w * d_l).sum(1, keepdim=True)) + 8 * U32 * w.abs()
    # The truth is float32 (call_terms rounds): one more rounding of every value.
    for f in bounds:
        bounds[f] = (bounds[f] + U32 * getattr(truth, f).double().abs()) * 1.01  # 1 %: second-order terms
    return truth, bounds


def assert_terms_within(got, truth, bounds, rows=None):
    for f in ("weights", "c_in", "scale", "shift"):
        g, t, b = getattr(got, f).double(), getattr(truth, f).double(), bounds[f]
        if rows is not None:
            g, t, b = g[rows], t[rows], b[rows]
        assert g.shape == t.shape, f
        err = (g - t).abs()
        assert torch.isfinite(g).all(), f"{f}: non-finite values"
        assert (err <= b).all(), f"{f}: max error {float(err.max()):.3g}, excess {float((err - b).max()):.3g}"
