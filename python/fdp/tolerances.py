"""How far a fused backend may be from the torch reference: one table for the tests and for ``auto``.

The error measure is ``max |out - ref| / max |ref|`` over the sampled ``x_0``
(:func:`rel_error`). Accumulation is float32 in every fused kernel whatever the
weight dtype, so the bounds depend on the dtype the backend packs its weights in.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

#: Bound against a reference that computes with the same weight values as the
#: backend (weights rounded to the pack dtype, arithmetic in float32 or wider):
#: what remains is accumulation order and the rounding of activations.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

#: Bound against a reference with the policy's own weights when the backend
#: rounds them to a narrower pack dtype (e.g. a float32 policy packed in bfloat16).
ROUNDED_WEIGHTS_TOL = {torch.bfloat16: 5e-2, torch.float16: 5e-2}

_HALF = (torch.bfloat16, torch.float16)


def tolerance(pack_dtype: torch.dtype, policy_dtype: torch.dtype) -> float:
    """The bound for a backend packing weights in ``pack_dtype`` against torch on a ``policy_dtype`` policy."""
    if pack_dtype not in REL_TOL:
        raise ValueError(f"`dtype` must be one of {list(REL_TOL)} to compare with the reference, got {pack_dtype}")
    if pack_dtype in _HALF and policy_dtype != pack_dtype:
        return ROUNDED_WEIGHTS_TOL[pack_dtype]
    return REL_TOL[pack_dtype]


def reference_dtype(policy_dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch reference computes in: half-precision policies are evaluated in float32."""
    return torch.float32 if policy_dtype in _HALF else policy_dtype


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64; inf when ``out`` holds a NaN or inf."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# -- rounding bounds derived from the computation (Monte Carlo arithmetic) ----------------------------------------


def reduction_length(module) -> int | None:
    """How many terms one output element of a leaf module sums (None: not a leaf to perturb)."""
    if isinstance(module, torch.nn.Conv1d):
        return module.in_channels // module.groups * module.kernel_size[0]
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if isinstance(module, torch.nn.GroupNorm):
        return module.num_channels // module.num_groups  # per position; the length factor is in `extent`
    if not list(module.children()):
        return 1  # elementwise (activations, identity): one rounding
    return None


class LinearsByWeight(TorchFunctionMode):
    """While active (from construction to :meth:`remove`), every ``F.linear`` whose weight is a key of
    ``table`` (by identity) runs ``fn(table[weight], input, weight, bias)`` instead, however it is reached:
    an ``nn.Linear``'s forward, or ``F.linear`` on a module's weight as ``MLPDenoiser.forward_terms`` calls it
    (which a module hook would miss)."""

    def __init__(self, table: dict, fn):
        super().__init__()
        self.table = {id(w): (w, value) for w, value in table.items()}
        self.fn = fn
        self.__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            entry = self.table.get(id(weight))
            if entry is not None and entry[0] is weight:
                inp = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self.fn(entry[1], inp, weight, bias)
        return func(*args, **kwargs)

    def remove(self) -> None:
        self.__exit__(None, None, None)


def perturb_outputs(modules, unit: float, generator: torch.Generator, extent: int = 1) -> list:
    """Hooks that multiply every leaf module's floating output by ``1 + d``, ``d`` uniform in
    ``[-sqrt(n) unit, sqrt(n) unit]`` with ``n`` its :func:`reduction_length` (times ``extent`` for
    normalisations, which reduce over the sequence too): the probabilistic rounding error of a sum of ``n``
    terms in a format of unit roundoff ``unit`` (Higham and Mary 2019). A ``Linear``'s matmul is perturbed
    wherever its weight is used (:class:`LinearsByWeight`), its module called or not. Returns the handles
    to remove, in order."""
    def hook_for(scale):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            return perturbed(out, scale, generator)
        return hook

    def linear(scale, inp, weight, bias):
        return perturbed(torch.nn.functional.linear(inp, weight, bias), scale, generator)

    hooks, linears = [], {}
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, torch.nn.Linear):
                linears[m.weight] = m.in_features ** 0.5 * unit
                continue
            n = reduction_length(m)
            if n is None:
                continue
            if isinstance(m, torch.nn.GroupNorm):
                n *= extent
            hooks.append(m.register_forward_hook(hook_for(n ** 0.5 * unit)))
    if linears:
        hooks.append(LinearsByWeight(linears, linear))
    return hooks


def rounded_update(coef, x, m, noise, clip_sample: bool, clip_range: float, unit: float,
                   generator: torch.Generator):
    """:func:`fdp.schedulers.apply_coefficients` with each of its two sums (x0: 2 terms, prev: up to 4)
    rounded at random, relative to the sum of its terms' magnitudes (they may cancel), not to the result."""
    a_x, a_m, c_x0, c_x, c_m, sigma = (coef[j] for j in range(6))
    x0 = a_x * x + a_m * m
    x0 = x0 + _uniform_like(x0, generator) * 2 ** 0.5 * unit * (abs(a_x) * x.abs() + abs(a_m) * m.abs())
    x0c = x0.clamp(-clip_range, clip_range) if clip_sample else x0
    prev = c_x0 * x0c + c_x * x + c_m * m
    size = abs(c_x0) * x0c.abs() + abs(c_x) * x.abs() + abs(c_m) * m.abs()
    if noise is not None:
        prev = prev + sigma * noise
        size = size + abs(sigma) * noise.abs()
    return prev + _uniform_like(prev, generator) * 2 * unit * size, x0c


def perturbed(t: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``t`` times ``1 + scale d``, ``d`` uniform in ``[-1, 1]`` per element: one rounding of relative size up to
    ``scale``, at random (Monte Carlo arithmetic)."""
    return t * (1 + scale * _uniform_like(t, generator))


def _uniform_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1], drawn on the CPU from ``generator`` (the same draws on every device)."""
    return (torch.rand(t.shape, generator=generator, dtype=t.dtype) * 2 - 1).to(t.device)


def finish_bound(x64: torch.Tensor, spread: torch.Tensor, coverage: float) -> torch.Tensor:
    """The bound from the largest deviation seen: ``coverage`` times it, plus float64 rounding of ``x64``."""
    eps64 = torch.finfo(torch.float64).eps
    return coverage * spread.max() + 64 * eps64 * x64.double().abs().max()


@torch.no_grad()
def loop_rounding_bound(policy, table, global_cond, x_T, step_noise, dtype: torch.dtype, runs: int = 4,
                        seed: int = 0, coverage: float = 4.0):
    """``(x64, bound)``: the sampling loop of ``policy`` over ``table`` (the torch backend's loop, no
    inpainting) in float64 on the given inputs, and a bound on how far any evaluation of it in ``dtype``
    (any kernel order, any CPU or runtime) may be from ``x64``, elementwise.

    Monte Carlo arithmetic: the loop runs ``runs`` more times in float64 with every layer's output
    perturbed by its rounding (:func:`perturb_outputs`) and the scheduler's update likewise
    (:func:`rounded_update`), at ``dtype``'s unit roundoff; the perturbations travel through all T
    steps, so their spread is this loop's error growth at these magnitudes. The bound is ``coverage``
    times the largest deviation seen (4: the tail beyond a few samples of a sum of many independent
    roundings), plus float64 rounding. ``policy`` is not modified (a float64 copy runs). Costs
    ``runs + 1`` float64 sampling calls.
    """
    import copy

    from ._validation import inputs_already_checked
    from .schedulers import apply_coefficients

    p64 = copy.deepcopy(policy).double().eval()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    cond, x_T, step_noise = d(global_cond), d(x_T), d(step_noise)
    unit = torch.finfo(dtype).eps / 2
    gen = torch.Generator().manual_seed(seed)

    def run(update):
        weights = p64.weights(cond)
        x = x_T
        with inputs_already_checked():
            for i, t in enumerate(int(t) for t in table.timesteps.tolist()):
                eps = p64.compose(x, t, cond, weights)
                noise = step_noise[i] if step_noise is not None and table._adds[i] else None
                x = update(table._rows[i], x, eps, noise, table.clip_sample, table.clip_range)[0]
        return x

    x64 = run(apply_coefficients)
    hooks = perturb_outputs([p64], unit, gen, extent=p64.horizon)
    try:
        spread = torch.zeros_like(x64)
        for _ in range(runs):
            got = run(lambda *a: rounded_update(*a, unit=unit, generator=gen))
            spread = torch.maximum(spread, (got - x64).abs())
    finally:
        for h in hooks:
            h.remove()
    return x64, finish_bound(x64, spread, coverage)


# -- worst-case rounding bound of one composition + scheduler step (deterministic, elementwise) --------------------


def _gamma(n: int, unit: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error of ``n`` successive roundings."""
    return n * unit / (1 - n * unit)


def compose_step_bound(coef, x, eps, weights, noise=None, clip_range: float | None = None,
                       unit: float = torch.finfo(torch.float32).eps / 2) -> torch.Tensor:
    """Elementwise bound on ``|out - exact|`` for one step of the compose kernel (fdp_kernels.compose_step,
    :func:`fdp.backends.graph_backend.compose_step_torch`): ``m = sum_k w_k eps_k`` and
    :func:`fdp.schedulers.apply_coefficients` on it, evaluated in a format of unit roundoff ``unit``
    (float32 by default) on the given inputs, against the same formula in exact arithmetic with the
    table's exact coefficients ``coef`` (6 numbers; the kernel reads them rounded to that format).

    ``x [B, *S]``, ``eps [K, B, *S]``, ``weights [B, K]`` and ``noise [B, *S]`` (None on a step that adds
    none) hold the values the kernel computes with (half inputs already widened). The derivation (Higham,
    Accuracy and Stability of Numerical Algorithms, 2002, sections 3.1 and 3.5), with
    ``g_n = gamma_n(unit)`` and magnitudes rather than values, so that cancellation is accounted for:

    * ``m``: ``K`` products summed in any order, with or without FMA: ``|dm| <= E_m = g_K M``,
      ``M = sum_k |w_k eps_k|``;
    * ``x0 = a_x x + a_m m``: each term sees the coefficient's rounding, its product and the sum
      (3 roundings): ``E_x0 = (1 + g_3) |a_m| E_m + g_3 (|a_x x| + |a_m| M)``; clamping does not enlarge it;
    * ``prev = ((c_x0 x0c + c_x x) + c_m m) + sigma z``: at most 5 roundings per term (coefficient,
      product, three additions):
      ``E = (1 + g_5) (|c_x0| E_x0 + |c_m| E_m) + g_5 (|c_x0| (|x0c| + E_x0) + |c_x x| + |c_m| M + |sigma z|)``,
      ``x0c`` the exact clamped ``x0``.

    A worst case, not a probable one: a correct kernel can never exceed it on any device, and one step is
    short enough (K + 7 roundings per element) that it stays within a few units of roundoff of the
    magnitudes, so a dropped component, a wrong coefficient or another step's row fails it. The float64
    rounding of the reference itself is added (``64 eps64`` of its magnitudes).
    """
    a_x, a_m, c_x0, c_x, c_m, sigma = (abs(float(c)) for c in coef[:6])
    x, eps, weights = x.double(), eps.double(), weights.double()
    K = eps.shape[0]
    w = weights.T.reshape(K, *weights.shape[:1], *([1] * (x.ndim - 1)))
    M = (w.abs() * eps.abs()).where(w != 0, torch.zeros((), dtype=torch.float64)).sum(0)
    m = (w * eps).where(w != 0, torch.zeros((), dtype=torch.float64)).sum(0)
    sa_x, sa_m = (float(coef[j]) for j in range(2))
    x0 = sa_x * x + sa_m * m
    x0c = x0.clamp(-clip_range, clip_range) if clip_range is not None else x0
    g_k, g3, g5 = _gamma(K, unit), _gamma(3, unit), _gamma(5, unit)
    e_m = g_k * M
    e_x0 = (1 + g3) * a_m * e_m + g3 * (a_x * x.abs() + a_m * M)
    z = 0.0 if noise is None else sigma * noise.double().abs()
    size = c_x0 * (x0c.abs() + e_x0) + c_x * x.abs() + c_m * M + z
    eps64 = torch.finfo(torch.float64).eps
    return (1 + g5) * (c_x0 * e_x0 + c_m * e_m) + g5 * size + 64 * eps64 * size


# -- tensor-core (tf32) matmuls ---------------------------------------------------------------------------------

#: The largest relative error of one float32 matmul operand rounded to tf32 (10 explicit mantissa bits) by a
#: tensor-core matmul: ``2**-11`` when converted to nearest (``cvt.rna.tf32.f32``), ``2**-10`` when the 13 low
#: bits are dropped (a float32 register handed to a ``.tf32`` mma as it is: truncation toward zero). The
#: products of two tf32 numbers are exact in float32 and accumulate in float32.
TF32_OPERAND_UNIT = 2.0 ** -10


class OperandRounding:
    """Evaluates each ``torch.nn.Linear`` in ``linears`` on its input and weight multiplied elementwise by
    ``1 - unit * U``, ``U`` uniform in ``[0, 1]``, wherever its weight is used (:class:`LinearsByWeight`):
    the operand rounding of a tf32 matmul (:data:`TF32_OPERAND_UNIT`), one-sided as truncation is, so that
    its bias (every product shrinks) accumulates coherently over layers and steps as it does on the device;
    rounding to nearest errs by half as much and without bias, so the same model covers it. The weights are
    drawn once per :meth:`redraw` (one run: a kernel rounds the same weights the same way at every step),
    the inputs at every call. Modules are not modified; :meth:`remove` ends it."""

    def __init__(self, linears, unit: float, generator: torch.Generator):
        self.linears = list(linears)
        for m in self.linears:
            if not isinstance(m, torch.nn.Linear):
                raise TypeError(f"`linears` must hold torch.nn.Linear modules, got {type(m).__name__}")
        self.unit, self.generator, self.weights = unit, generator, {}
        self.redraw()
        self._mode = LinearsByWeight({m.weight: m for m in self.linears}, self._linear)

    def _shrink(self, t):
        return t * (1 - self.unit * (_uniform_like(t, self.generator) + 1) / 2)

    def redraw(self):
        self.weights = {m: self._shrink(m.weight.detach()) for m in self.linears}

    def _linear(self, module, inp, weight, bias):
        return torch.nn.functional.linear(self._shrink(inp), self.weights[module], bias)

    def remove(self):
        self._mode.remove()
