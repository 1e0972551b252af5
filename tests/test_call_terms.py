"""The per-call terms (router weights, conditioning terms) folded into one launch.

- :func:`fdp.packing.reference_call_terms` on :class:`fdp.packing.PackedCond` against what the policy's own
  modules give (``packing.call_terms`` with ``policy.weights``), for every strategy and the router's NaN rules;
- the Triton kernel (:mod:`fdp_kernels.call_terms`, interpreted) against the same ground truth: fresh random
  inputs, NaN-poisoned outputs, odd sizes, batch 1;
- launches per call counted on the CPU by construction: each fused MLP backend's ``_sample`` with the kernel
  launches recorded (not run) and every aten op dispatched counted.

Error bounds: every term is a float32 dot product of length n plus a bias, so it is within
``(n + 5) u (|c| |W| + |b|)`` (first order; u = 2^-24) of the float64 truth: n roundings of the accumulation, the
features rounded to float32, the packed weight rounded (twice for ``shift``'s folded rows), the bias add and the
truth's own rounding to float32. The router's logits carry the first layer's bound through ``|W2|`` (ReLU is
1-Lipschitz) plus their own; a softmax weight moves by at most ``w_k (d_k + sum_j w_j d_j)`` for logit errors
``d``, tanh by ``(1 - w^2) d``; both then add a few roundings of exp / division (8 u |w|). ``hard`` is compared
exactly, where the top two logits are further apart than twice their bound (asserted, so a case that does not
test that cannot pass silently).
"""

import pytest
import torch

import fdp
from fdp import packing
from fdp._validation import inputs_already_checked
from fdp_kernels.abi import ROUTER_STRATEGIES

U = 2.0 ** -24
NAN = float("nan")
STRATEGIES = list(ROUTER_STRATEGIES)


def make_policy(K=3, L=2, H=16, Dc=5, Hr=8, strategy="soft", conditional=True, seed=0, horizon=4, action_dim=3):
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


def truth_and_bounds(policy, c):
    """The float64 per-call terms of ``policy`` for features ``c`` (as float32 reads them), and float32 error
    bounds for each (module docstring)."""
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
    bound = (n + 5) * U * mags
    bounds = {"c_in": bound[:, :, :H], "scale": bound[:, :, H:H + L * H].unflatten(-1, (L, H)),
              "shift": bound[:, :, H + L * H:].unflatten(-1, (L, H))}
    router = policy.router
    first, last = router.net[0], router.net[2]
    w = truth.weights.double()
    if router.strategy == "fixed":
        bounds["weights"] = torch.zeros_like(w)
    else:
        pre = c @ first.weight.t() + first.bias
        d_h = (router.cond_dim + 5) * U * (c.abs() @ first.weight.abs().t() + first.bias.abs())
        h = pre.clamp_min(0)
        d_l = (first.out_features + 5) * U * (h.abs() @ last.weight.abs().t() + last.bias.abs()) \
            + d_h @ last.weight.abs().t()
        if router.strategy == "tanh":
            bounds["weights"] = (1 - w * w) * d_l + 8 * U * w.abs()
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
            bounds["weights"] = w * (d_l + (w * d_l).sum(1, keepdim=True)) + 8 * U * w.abs()
    # The truth is float32 (call_terms rounds): one more rounding of every value.
    for f in bounds:
        bounds[f] = (bounds[f] + U * getattr(truth, f).double().abs()) * 1.01  # 1 %: second-order terms
    return truth, bounds


def assert_within(got, truth, bounds, rows=None):
    for f in ("weights", "c_in", "scale", "shift"):
        g, t, b = getattr(got, f).double(), getattr(truth, f).double(), bounds[f]
        if rows is not None:
            g, t, b = g[rows], t[rows], b[rows]
        assert g.shape == t.shape, f
        err = (g - t).abs()
        assert torch.isfinite(g).all(), f"{f}: non-finite values"
        assert (err <= b).all(), f"{f}: max error {float(err.max()):.3g}, excess {float((err - b).max()):.3g}"


def kernel_terms(pc, c, counters=None):
    from fdp_kernels.call_terms import call_terms

    B = c.shape[0]
    out = torch.full((packing.call_terms_numel(B, pc.K, pc.L, pc.H),), NAN)  # poisoned
    call_terms(pc, c, out=out, counters=counters)
    return packing.split_call_terms(out, B, pc.K, pc.L, pc.H)


# -- the packed layout and its torch reference ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("conditional", [True, False])
def test_reference_is_the_policy(strategy, conditional):
    policy = make_policy(K=4, L=3, H=24, Dc=7, Hr=9, strategy=strategy, conditional=conditional)
    pc = packing.pack_cond(policy)
    assert pc.strategy == STRATEGIES.index(strategy) and pc.conditional == conditional
    c = torch.randn(6, 7, dtype=torch.float64)
    truth, bounds = truth_and_bounds(policy, c.float())
    got = packing.reference_call_terms(pc, c.float())
    assert_within(got, truth, bounds)
    if strategy == "tanh":
        assert (got.weights < 0).any() and ((got.weights.sum(1) - 1).abs() > 0.1).any()  # signed, unnormalised


def test_pack_layout():
    policy = make_policy(K=3, L=2, H=16, Dc=5, Hr=8)
    pc = packing.pack_cond(policy)
    assert pc.cond_w.shape == (5, 3 * 5 * 16) and pc.cond_b.shape == (3 * 5 * 16,)
    assert pc.router_w1.shape == (5, 8) and pc.router_w2.shape == (8, 3) and (pc.K, pc.L, pc.H) == (3, 2, 16)
    for t in (pc.router_w1, pc.router_b1, pc.router_w2, pc.router_b2, pc.fixed, pc.cond_w, pc.cond_b):
        assert t.dtype == torch.float32 and t.is_contiguous()
    # c_in block: component 1's V_in^T
    torch.testing.assert_close(pc.cond_w[:, 16:32], policy.components[1].cond_proj.weight[:16].t().float())
    buf = torch.arange(float(packing.call_terms_numel(2, 3, 2, 16)))
    t = packing.split_call_terms(buf, 2, 3, 2, 16)
    assert t.weights.shape == (2, 3) and t.c_in.shape == (2, 3, 16) and t.shift.shape == (2, 3, 2, 16)
    assert int(t.shift[-1, -1, -1, -1]) == buf.numel() - 1 and int(t.c_in[0, 0, 0]) == 6


def _tied(policy, logits):
    """Make every row's logits exactly ``logits`` (the last layer reads nothing, its bias is the logits)."""
    with torch.no_grad():
        policy.router.net[2].weight.zero_()
        policy.router.net[2].bias.copy_(torch.tensor(logits, dtype=torch.float64))


@pytest.mark.parametrize("strategy,logits,expected", [
    ("hard", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 1, 0, 0, 0]),
    ("hard", [3.0] * 5, [1, 0, 0, 0, 0]),
    ("topk", [1.0, 2.0, 2.0, 2.0, -1.0], [0, 0.5, 0.5, 0, 0]),
    ("topk", [3.0] * 5, [0.5, 0.5, 0, 0, 0]),
    ("topk", [2.0, 1.0, 1.0, 1.0, 1.0], None),  # one clear winner, four tied for the second place
])
def test_ties_go_to_the_lowest_index(strategy, logits, expected):
    policy = make_policy(K=5, strategy=strategy)
    _tied(policy, logits)
    c = torch.randn(3, 5, dtype=torch.float64)
    if expected is None:
        e = torch.exp(torch.tensor([2.0, 1.0]) - 2.0)
        expected = [float(e[0] / e.sum()), float(e[1] / e.sum()), 0, 0, 0]
    expected = torch.tensor(expected, dtype=torch.float32).expand(3, 5)
    pc = packing.pack_cond(policy)
    for w in (policy.weights(c).float(), packing.reference_call_terms(pc, c.float()).weights,
              kernel_terms(pc, c.float()).weights):
        torch.testing.assert_close(w, expected, rtol=2 * U, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("conditional", [True, False])
def test_nan_feature_row(strategy, conditional):
    """A NaN row of the features gives what the policy gives: NaN weights on that row (the router's NaN rules;
    ``fixed``: the fixed weights), NaN terms where the components read the features (else their constants),
    the other rows untouched."""
    policy = make_policy(K=3, strategy=strategy, conditional=conditional)
    pc = packing.pack_cond(policy)
    c = torch.randn(4, 5, dtype=torch.float64)
    c[2] = NAN
    with inputs_already_checked():  # as a Sampler with check_inputs=False runs the router
        policy_terms = packing.call_terms(policy, c, policy.weights(c))
    ok = [0, 1, 3]
    truth, bounds = truth_and_bounds(policy, c[ok].float())
    for got in (packing.reference_call_terms(pc, c.float()), kernel_terms(pc, c.float())):
        for f in ("weights", "c_in", "scale", "shift"):
            g, p = getattr(got, f)[2], getattr(policy_terms, f)[2]
            assert torch.equal(torch.isnan(g), torch.isnan(p)), f
            if f == "weights":
                assert torch.isnan(g).all() == (strategy != "fixed")
            else:
                assert torch.isnan(g).all() == conditional
        assert_within(packing.CallTerms(*(getattr(got, f)[ok] for f in ("weights", "c_in", "scale", "shift"))),
                      truth, bounds)


@pytest.mark.parametrize("strategy", ["soft", "tanh", "hard", "topk"])
@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")])
def test_non_finite_logit(strategy, bad):
    """A non-finite logit on every row: NaN rows where the router gives them (NaN or +Inf; tanh: -Inf too),
    else -Inf is a component never chosen (weight 0)."""
    policy = make_policy(K=4, strategy=strategy)
    with torch.no_grad():
        policy.router.net[2].weight[1].zero_()
        policy.router.net[2].bias[1] = bad
    c = torch.randn(3, 5, dtype=torch.float64)
    want = policy.weights(c).float()
    pc = packing.pack_cond(policy)
    nan_rows = not (bad == -float("inf")) or strategy == "tanh"
    assert torch.isnan(want).all() == nan_rows
    for w in (packing.reference_call_terms(pc, c.float()).weights, kernel_terms(pc, c.float()).weights):
        assert torch.equal(torch.isnan(w), torch.isnan(want))
        if not nan_rows:
            assert (w[:, 1] == 0).all()
            torch.testing.assert_close(w, want, rtol=1e-5, atol=0)


# -- the Triton kernel --------------------------------------------------------------------------------------------

# K, L, H, Dc, Hr, B: odd sizes, several column tiles, Dc / Hr over one chunk (32), two row tiles, batch 1.
KERNEL_CASES = [
    (3, 1, 17, 5, 7, 1),
    (5, 3, 19, 37, 45, 17),
    (1, 2, 16, 33, 1, 3),
    (8, 1, 24, 3, 33, 5),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "K{}L{}H{}Dc{}Hr{}B{}".format(*c))
def test_kernel_matches_the_policy(strategy, case):
    K, L, H, Dc, Hr, B = case
    if strategy == "topk" and K == 1:
        pytest.skip("top-k of one component is hard routing")
    policy = make_policy(K=K, L=L, H=H, Dc=Dc, Hr=Hr, strategy=strategy, seed=K + L)
    pc = packing.pack_cond(policy)
    c = torch.randn(B, Dc)
    counters = torch.full((3,), 7, dtype=torch.int32)
    got = kernel_terms(pc, c, counters)
    truth, bounds = truth_and_bounds(policy, c)
    assert_within(got, truth, bounds)
    assert (counters == 0).all()


def test_kernel_unconditional_components_and_other_feature_layouts():
    policy = make_policy(K=3, L=2, H=16, Dc=6, Hr=8, conditional=False)
    pc = packing.pack_cond(policy)
    c = torch.randn(4, 12)[:, ::2]  # strided rows and columns
    truth, bounds = truth_and_bounds(policy, c)
    assert_within(kernel_terms(pc, c), truth, bounds)
    policy = make_policy(K=3, L=2, H=16, Dc=6, Hr=8)
    c16 = torch.randn(4, 6).bfloat16()  # read in its dtype, computed in float32
    truth, bounds = truth_and_bounds(policy, c16.float())
    assert_within(kernel_terms(packing.pack_cond(policy), c16), truth, bounds)


def test_kernel_rejects_bad_arguments():
    from fdp_kernels.call_terms import call_terms

    pc = packing.pack_cond(make_policy(K=3, Dc=5))
    with pytest.raises(ValueError, match="`global_cond` must be \\[B >= 1, 5\\]"):
        call_terms(pc, torch.randn(2, 6))
    with pytest.raises(TypeError, match="`global_cond` must be a floating tensor"):
        call_terms(pc, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="`out` must have shape"):
        call_terms(pc, torch.randn(2, 5), out=torch.empty(3))
    with pytest.raises(ValueError, match="`counters` must be"):
        call_terms(pc, torch.randn(2, 5), counters=torch.zeros(2))


# -- launches per call, by construction ------------------------------------------------------------------------


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


#: What a call may dispatch besides its launches, none of it device work: ``empty`` (the outputs: the call's terms
#: buffer and x_0, and while a graph is captured its own scratch and counters, which the per-call launch zeroes),
#: ``view`` (x_T and the noise flattened, x_0 shaped back, the terms' four tensors), ``slice`` and
#: ``split_with_sizes`` (the terms buffer split, the cached counters cut to the batch's tiles).
ALLOWED_OPS = {"aten.empty", "aten.view", "aten.slice", "aten.split_with_sizes"}


def _record_launches(monkeypatch):
    from fdp_kernels.call_terms import call_terms_kernel

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)

    monkeypatch.setattr(type(call_terms_kernel), "run", record)  # JITFunction, or the interpreter's twin
    return launches


@pytest.mark.parametrize("name,B", [("triton", 1), ("triton", 20), ("triton-persistent", 1),
                                    ("triton-persistent", 20)])
@pytest.mark.parametrize("sched", ["ddpm_clip", "ddim"])
@pytest.mark.parametrize("capturing", [False, True])
def test_triton_launches_per_call(monkeypatch, name, B, sched, capturing):
    """``_sample``, the function a CUDA graph captures: the per-call launch and T step launches (triton) or one
    loop launch (triton-persistent), and no other device work."""
    from helpers import KERNEL_SCHEDULERS

    import fdp.backends.triton_backend as tb
    from fdp.backends import get_backend

    T = 3
    factory, eta = KERNEL_SCHEDULERS[sched]
    policy = make_policy(K=3, strategy="topk").float()
    prepared = get_backend(name).prepare(policy, factory().step_table(T, eta=eta), torch.float32)
    cond, x_T = torch.randn(B, 5), torch.randn(B, 4, 3)
    noise = torch.randn(T, B, 4, 3) if prepared.adds_any else None
    launches = _record_launches(monkeypatch)
    prepared._sample(cond, x_T, noise)  # grows the workspace
    if capturing:  # a graph's own workspace, allocated inside the captured call
        monkeypatch.setattr(tb, "capturing", lambda device: True)
    launches.clear()
    with _Ops() as ops:
        prepared._sample(cond, x_T, noise)
    want = ["call_terms_kernel"] + (["mlp_step_kernel"] * T if name == "triton" else ["mlp_persistent_kernel"])
    assert launches == want
    assert len(launches) == (T + 1 if name == "triton" else 2)
    ops_launched = [n for n in ops.names if n.startswith("fdp.")]
    assert ops_launched == ["fdp.call_terms_launch"] + ["fdp.mlp_launch"] * (T if name == "triton" else 1)
    others = {n for n in ops.names if not n.startswith("fdp.")}
    assert others <= ALLOWED_OPS, others - ALLOWED_OPS
