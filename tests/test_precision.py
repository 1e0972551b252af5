"""Timesteps and their sinusoidal embeddings stay float32 whatever the weight dtype (issue 28).

The table: every component that turns a timestep into conditioning terms, in float32, bfloat16 and
float16 weights, at t in {0, 1, 255, 256, 999}, against the same module in float32 arithmetic on the
*same rounded weights*. What may differ is then only the rounding of activations to the weight dtype
(and float32 accumulation order), and the bound is computed from the computation itself: a first-order
running error bound, elementwise, carried through the chain of layers (:func:`chain_bound`).

A model that rounds the timestep to its weight dtype before the embedding (bf16: 999 -> 1000, 257 -> 256)
changes the embedding's high-frequency phases by O(1) and is far outside that bound.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fdp
from fdp import packing
from fdp.unet_fused import FusedUnets
from helpers import make_mlp_policy

TIMESTEPS = (0, 1, 255, 256, 999)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
U32 = torch.finfo(torch.float32).eps / 2


def _lipschitz(fn) -> float:
    """max |fn'| over a grid wide enough for both activations' extrema (SiLU ~1.0998, Mish ~1.0886), plus 1 %."""
    x = torch.linspace(-20, 20, 400001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return 1.01 * float(g.abs().max())


LIP = {"silu": _lipschitz(F.silu), "mish": _lipschitz(F.mish)}
ACT = {"silu": F.silu, "mish": F.mish}


def chain_bound(t: torch.Tensor, dim: int, layers, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference value, elementwise bound on |value in dtype - reference|)`` of a timestep chain.

    ``layers``: ("linear", W, b) or ("act", name), applied to the sinusoidal embedding of ``t``. W and b are
    the dtype-rounded weights (in float64 here). Rounding model, per op (u: the weight dtype's unit roundoff,
    accumulation in float32 as torch does on the CPU and every fdp kernel on the GPU):

    - embedding: computed in float32 by both, then rounded once to ``dtype``: ``u |e|``;
    - linear ``y = W x + b``: the input error through ``|W|``, float32 accumulation over n terms for both
      sides (``2 n u32 (|W||x| + |b|)``), and up to two roundings to ``dtype`` (product, then the bias):
      ``2 u (|W||x| + |b|)``;
    - activation ``phi``: the input error times ``max |phi'|`` (measured on a grid) and one rounding ``u |phi|``.

    The result is first order in u; the tests compare against twice it, the factor 2 covering the
    second-order terms (u * error), which are below 2 % of the first-order ones for bf16.
    """
    u = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    x = torch.cat((args.sin(), args.cos()), dim=-1).double()
    err = u * x.abs()
    for layer in layers:
        if layer[0] == "linear":
            _, W, b = layer
            W = W.double()
            b = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.double()
            mag = (x.abs() + err) @ W.abs().t() + b.abs()
            n = W.shape[1]
            err = err @ W.abs().t() + (2 * n * U32 + 2 * u) * mag
            x = x @ W.t() + b
        else:
            x_new = ACT[layer[1]](x)
            err = LIP[layer[1]] * err + u * (x_new.abs() + LIP[layer[1]] * err)
            x = x_new
    return x, err


def _rounded(module, dtype):
    """(the module in ``dtype``, the same rounded weights in float32)."""
    low = copy.deepcopy(module).to(dtype)
    return low, copy.deepcopy(low).float()


def _lin(m):
    return ("linear", m.weight.detach(), None if m.bias is None else m.bias.detach())


def _mlp_denoiser():
    torch.manual_seed(0)
    m = fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=32, num_blocks=2, time_embed_dim=32)
    with torch.no_grad():
        for p in m.parameters():  # biases non-zero too, so a dropped bias shows
            p.add_(0.05 * torch.randn_like(p))
    return m


def _mlp_case(dtype, t):
    low, ref = _rounded(_mlp_denoiser(), dtype)
    with torch.no_grad():
        out, want = low.step_terms(t), ref.step_terms(t)
    _, lin1, act, lin2 = ref.time_mlp
    chain = [_lin(lin1), ("act", "silu"), _lin(lin2), _lin(ref.time_proj)]
    flat = lambda s: torch.cat([s.t_in.flatten(1), s.t_shift.flatten(1)], 1)  # noqa: E731
    value, bound = chain_bound(t, ref.time_embed_dim, chain, dtype)
    # t_in and t_shift are the rows of time_proj's output, in that order.
    return flat(out), flat(want), value, bound


def _packed_case(dtype, t):
    """The fused MLP backends' per-step terms (fdp.packing.step_terms), from a policy in ``dtype``."""
    policy = make_mlp_policy(K=2, hidden=32, dtype=torch.float32)
    low, ref = _rounded(policy, dtype)
    out, want = packing.step_terms(low, t), packing.step_terms(ref, t)
    assert out.t_in.dtype == torch.float32 and out.t_shift.dtype == torch.float32
    values, bounds = [], []
    for comp in ref.components:
        _, lin1, _, lin2 = comp.time_mlp
        v, b = chain_bound(t, comp.time_embed_dim, [_lin(lin1), ("act", "silu"), _lin(lin2), _lin(comp.time_proj)],
                           dtype)
        values.append(v.unflatten(1, (comp.num_blocks + 1, comp.hidden_dim)))
        bounds.append(b.unflatten(1, (comp.num_blocks + 1, comp.hidden_dim)))
    # [T, K, L+1, H] -> the packed (t_in [T, K, H], t_shift [T, K, L, H]) order, flattened per t.
    v, b = torch.stack(values, 1), torch.stack(bounds, 1)
    flat = lambda s: torch.cat([s.t_in.flatten(1), s.t_shift.flatten(1)], 1)  # noqa: E731
    split = lambda a: torch.cat([a[:, :, 0].flatten(1), a[:, :, 1:].flatten(1)], 1)  # noqa: E731
    return flat(out), flat(want), split(v), split(b)


def _unet():
    torch.manual_seed(0)
    return fdp.ConditionalUnet1D(2, global_cond_dim=3, diffusion_step_embed_dim=16, down_dims=(16, 32),
                                 n_groups=4, cond_predict_scale=True)


def _unet_case(dtype, t):
    low, ref = _rounded(_unet(), dtype)
    with torch.no_grad():
        out, want = low.cond_embedding(t, None), ref.cond_embedding(t, None)
    _, lin1, _, lin2 = ref.diffusion_step_encoder
    value, bound = chain_bound(t, ref.diffusion_step_embed_dim, [_lin(lin1), ("act", "mish"), _lin(lin2)], dtype)
    return out, want, value, bound


def _unet_fused_case(dtype, t):
    """The graph backend's per-step FiLM terms (fdp.unet_fused.FusedUnets.step_terms)."""
    comps = [_unet() for _ in range(2)]
    low = [copy.deepcopy(c).to(dtype) for c in comps]
    ref = [copy.deepcopy(c).float() for c in low]
    fused_low, fused_ref = FusedUnets.from_components(low), FusedUnets.from_components(ref)
    out, want = fused_low.step_terms(t), fused_ref.step_terms(t)
    value = torch.zeros(out.shape, dtype=torch.float64)
    bound = torch.zeros(out.shape, dtype=torch.float64)
    for terms in fused_ref.time_terms:
        chain = [("linear", terms.w1, terms.b1), ("act", "mish"), ("linear", terms.w2, terms.b2), ("act", "mish"),
                 ("linear", terms.w_film, terms.b_film)]
        v, b = chain_bound(t, terms.dim, chain, dtype)
        value[:, terms.idx], bound[:, terms.idx] = v, b
    mask = torch.zeros(out.shape[1], dtype=torch.bool)
    for terms in fused_ref.time_terms:
        mask[terms.idx] = True
    # Columns no timestep reaches are constants (scale 1 of bias-only FiLMs): equal in both.
    assert torch.equal(out[:, ~mask].float(), want[:, ~mask].float())
    return out[:, mask], want[:, mask], value[:, mask], bound[:, mask]


CASES = {"mlp": _mlp_case, "mlp-packed": _packed_case, "unet": _unet_case, "unet-fused": _unet_fused_case}


@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("component", list(CASES))
def test_timestep_terms_within_derived_bound(component, dtype, t):
    ts = torch.tensor([t, 0, t])  # integer timesteps, as a scheduler gives them
    out, want, value, bound = CASES[component](dtype, ts)
    # The bound's own reference is the same computation: it must agree with the module in float32.
    assert torch.allclose(want.double(), value, rtol=0, atol=float(4 * bound.max() + 1e-5)), "bound's reference"
    err = (out.double() - want.double()).abs()
    assert torch.isfinite(err).all()
    worst = float((err / (2 * bound + 1e-30)).max().detach())
    assert worst <= 1.0, (f"{component} {dtype} t={t}: error {float(err.max()):.3g} exceeds the derived bound "
                          f"(worst element at {worst:.2f}x twice the first-order bound)")


def _embedding_inputs(component, dtype, t):
    """``(what the module in dtype feeds its first time Linear, the float32 sinusoids of t)``."""
    seen = []
    if component in ("mlp", "mlp-packed", "unet"):
        if component == "mlp":
            low = [copy.deepcopy(_mlp_denoiser()).to(dtype)]
        elif component == "unet":
            low = [copy.deepcopy(_unet()).to(dtype)]
        else:
            low = [copy.deepcopy(make_mlp_policy(K=2, hidden=32, dtype=torch.float32)).to(dtype)]
        firsts = [m.time_mlp[1] if hasattr(m, "time_mlp") else m.diffusion_step_encoder[1]
                  for mod in low for m in (mod.components if hasattr(mod, "components") else [mod])]
        hooks = [f.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for f in firsts]
        try:
            if component == "mlp":
                low[0].step_terms(t)
            elif component == "unet":
                low[0].cond_embedding(t, None)
            else:
                packing.step_terms(low[0], t)
        finally:
            for h in hooks:
                h.remove()
        dim = firsts[0].in_features
    else:
        import fdp.unet_fused as uf

        fused = FusedUnets.from_components([copy.deepcopy(_unet()).to(dtype) for _ in range(2)])
        w1s = {id(terms.w1) for terms in fused.time_terms}

        class _Recording:
            def __getattr__(self, name):
                return getattr(F, name)

            @staticmethod
            def linear(x, w, b=None):
                if id(w) in w1s:
                    seen.append(x)
                return F.linear(x, w, b)

        saved, uf.F = uf.F, _Recording()
        try:
            fused.step_terms(t)
        finally:
            uf.F = saved
        dim = fused.time_terms[0].dim
    assert seen, "no timestep embedding reached the first Linear"
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    return seen, torch.cat((args.sin(), args.cos()), dim=-1)


@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("component", list(CASES))
def test_timestep_embedding_is_float32_rounded_once(component, dtype, t):
    """The embedding a component's time MLP reads is the float32 sinusoid rounded once to the weight dtype:
    ``|e_dtype - e_32| <= u |e_32|`` elementwise (u: the dtype's unit roundoff; float32 sinusoids of the same
    float32 arguments agree to a few float32 ulps, 8 u32 allowed). Tight enough that the phase error of a
    timestep rounded to bf16 (999 -> 1000: O(1)) cannot hide in it, unlike the chain bound above."""
    ts = torch.tensor([t, 0, t])
    seen, want = _embedding_inputs(component, dtype, ts)
    u = torch.finfo(dtype).eps / 2
    for e in seen:
        assert e.dtype == dtype
        err = (e.double() - want.double()).abs()
        assert bool((err <= u * want.double().abs() + 8 * U32).all()), (
            f"{component} {dtype} t={t}: embedding off by {float(err.max()):.3g}")


def test_the_embedding_check_catches_a_timestep_rounded_to_bfloat16():
    """The check fails on the bug it is for: 999 rounded to bf16 (1000) before the embedding."""
    ts = torch.tensor([999])
    _, want = _embedding_inputs("mlp", torch.bfloat16, ts)
    _, rounded = _embedding_inputs("mlp", torch.bfloat16, ts.to(torch.bfloat16).long())
    u = torch.finfo(torch.bfloat16).eps / 2
    assert not bool(((rounded.double() - want.double()).abs() <= u * want.double().abs() + 8 * U32).all())
