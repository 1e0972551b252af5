"""The sampler paths ``fdp bench`` times, all on the same policy and inputs.

PyTorch-native paths:

- ``eager``: the library's ``torch`` backend through :class:`fdp.Sampler` — the
  paper's reference style, one component after another, every step. In bf16
  the policy and inputs are cast to bf16 and everything runs in bf16.
- ``batched``: the K components evaluated together on stacked weights. MLPs:
  the packed tensors of :mod:`fdp.packing` and one batched matmul per layer
  for all K (with the timestep and feature terms precomputed per call, as
  the fused kernels do); U-Nets: ``torch.func.stack_module_state`` +
  ``vmap`` over the component (grouped convolutions). Weights in the case's
  dtype, matmuls in it, the residual stream, composition and scheduler
  update in float32.
- ``compile-reduce-overhead`` / ``compile-max-autotune``: ``torch.compile`` of
  the batched path's per-call and per-step functions (``fullgraph``, static
  shapes); on CUDA both modes use CUDA graphs (cudagraph trees).
- ``cuda-graph``: the batched path's whole call (router, per-call terms and
  every step) captured once in a ``torch.cuda.CUDAGraph``; a call copies the
  inputs into the static buffers and replays.

Library backends (every name in the registry but ``torch``): an
:class:`fdp.Sampler` with that backend and ``dtype`` = the case's dtype (the
fused kernels pack the weights in it and compute in float32).

Every :class:`fdp.Sampler` here (``eager`` included) runs with
``check_inputs=False``, the closed-loop setting: the pre-generated inputs are
finite, and a call then reads nothing back from the device.

Every builder returns ``run(idx) -> x_0 [B, horizon, action_dim]`` for input
set ``idx``, or raises :class:`Skip` with the reason it cannot run here. A path
whose call replays a captured CUDA graph (``cuda-graph`` and the library's
CUDA backends) also gives ``run.kernel_only()``: after a first call, a function
replaying that graph alone, which the runner times as the kernel-only device
time (``kernel_gpu_us``), without the call's host work, input and output copies.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch

import fdp
from fdp._validation import inputs_already_checked
from fdp.packing import CallTerms, call_terms, pack_policy, reference_eps, step_terms
from fdp.schedulers import apply_coefficients

from .cases import COMPONENTS, Config


class Skip(Exception):
    """A path that cannot run for this case; the message says why."""


@dataclass
class InputSet:
    cond: torch.Tensor                # [B, Dc] float32
    x_T: torch.Tensor                 # [B, Ta, Da] float32
    step_noise: torch.Tensor | None   # [T, B, Ta, Da] float32, None when no step adds noise


@dataclass
class Context:
    """What every path of one case shares."""

    config: Config
    device: torch.device
    policy: fdp.FactorizedPolicy  # float32; for bf16 cases its weights are already rounded to bf16
    scheduler: object
    table: fdp.StepTable
    inputs: list[InputSet]
    explicit: set  # path names the user named in --backends (run even where skipped by default)


# -- building the policy and the inputs -----------------------------------------------------------------------


def make_scheduler(name: str):
    """The paper's schedule family: 100 training steps, squaredcos_cap_v2, clipped, epsilon prediction."""
    kw = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
              prediction_type="epsilon")
    return fdp.DDIMScheduler(**kw) if name == "ddim" else fdp.DDPMScheduler(variance_type="fixed_small", **kw)


def make_policy(component: str, K: int, device, seed: int = 0) -> fdp.FactorizedPolicy:
    """A random float32 policy of K components of the named configuration."""
    spec = COMPONENTS[component]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            if spec["family"] == "mlp":
                comps = [fdp.MLPDenoiser(spec["action_dim"], spec["horizon"], global_cond_dim=spec["cond_dim"],
                                         hidden_dim=spec["hidden_dim"], num_blocks=spec["num_blocks"],
                                         time_embed_dim=spec["time_embed_dim"]) for _ in range(K)]
            else:
                comps = [fdp.ConditionalUnet1D(spec["action_dim"], global_cond_dim=spec["cond_dim"],
                                               diffusion_step_embed_dim=spec["diffusion_step_embed_dim"],
                                               down_dims=spec["down_dims"], kernel_size=spec["kernel_size"],
                                               n_groups=spec["n_groups"],
                                               cond_predict_scale=spec["cond_predict_scale"]) for _ in range(K)]
            router = fdp.Router(spec["cond_dim"], K)
            policy = fdp.FactorizedPolicy(comps, router, spec["horizon"], spec["action_dim"])
            # Non-trivial biases and FiLM, so that a path dropping a term shows up in the error.
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.02 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(gen_state)
    return policy.eval().requires_grad_(False)


def make_inputs(policy, table, batch: int, device, n_sets: int = 4, seed: int = 1) -> list[InputSet]:
    """``n_sets`` pre-generated (features, x_T, step noise) sets, float32, on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, policy.horizon, policy.action_dim)
    noisy = bool(table.adds_noise.any())
    sets = []
    for _ in range(n_sets):
        cond = torch.randn(batch, policy.cond_dim, generator=g)
        x_T = torch.randn(shape, generator=g)
        noise = torch.randn((len(table), *shape), generator=g) if noisy else None
        sets.append(InputSet(cond.to(device), x_T.to(device), None if noise is None else noise.to(device)))
    return sets


def reference(ctx: Context, idx: int = 0) -> torch.Tensor:
    """The eager float32 result on input set ``idx``: what every path is checked against."""
    s = fdp.Sampler(ctx.policy, ctx.scheduler, num_inference_steps=ctx.config.steps, backend="torch")
    inp = ctx.inputs[idx]
    with torch.no_grad():
        return s(inp.cond, x_T=inp.x_T, step_noise=inp.step_noise).float()


# -- eager and library backends -------------------------------------------------------------------------------


def _sampler_runner(sampler, sets: list[InputSet]):
    def run(idx: int):
        inp = sets[idx]
        return sampler(inp.cond, x_T=inp.x_T, step_noise=inp.step_noise)

    return run


def build_eager(ctx: Context):
    dt = ctx.config.torch_dtype
    policy = ctx.policy if dt == torch.float32 else copy.deepcopy(ctx.policy).to(dt)
    sampler = fdp.Sampler(policy, ctx.scheduler, num_inference_steps=ctx.config.steps, backend="torch",
                          check_inputs=False)
    sets = [InputSet(s.cond.to(dt), s.x_T.to(dt), None if s.step_noise is None else s.step_noise.to(dt))
            for s in ctx.inputs]
    return torch.no_grad()(_sampler_runner(sampler, sets))


#: A library backend's name with this suffix is its static call (``sampler.prepare(batch)``).
STATIC_SUFFIX = ":static"


def _library_sampler(name: str, ctx: Context):
    info = fdp.available_backends(ctx.device).get(name)
    if info is None:
        raise Skip(f"backend {name!r} is not registered")
    if not info.available:
        raise Skip(info.reason or "unavailable")
    if (ctx.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
            and name not in ctx.explicit):
        raise Skip("TRITON_INTERPRET=1 on CPU: the kernel would run in the Triton interpreter, whose timings mean "
                   f"nothing (name {name!r} in --backends to time it anyway)")
    try:
        return fdp.Sampler(ctx.policy, ctx.scheduler, num_inference_steps=ctx.config.steps, backend=name,
                           dtype=ctx.config.torch_dtype, check_inputs=False)
    except (ValueError, TypeError) as exc:
        raise Skip(str(exc)) from None


def build_library(name: str, ctx: Context):
    sampler = _library_sampler(name, ctx)
    run = torch.no_grad()(_sampler_runner(sampler, ctx.inputs))
    run.kernel_only = lambda: _replay_alone(sampler)
    return run


def build_static(name: str, ctx: Context):
    """A backend's static call, given each input set's noise (copied into its buffers, as the features
    are): per call up to three copies and one graph replay on CUDA. Off CUDA only when named: there it
    runs the library path's work without the Sampler's checks (``fdp bench --host`` times that)."""
    base = name[:-len(STATIC_SUFFIX)]
    if ctx.device.type != "cuda" and name not in ctx.explicit:
        raise Skip("a static call off CUDA is the library path without its host checks: see fdp bench --host "
                   f"(name {name!r} in --backends to time it anyway)")
    sampler = _library_sampler(base, ctx)
    call = sampler.prepare(ctx.inputs[0].cond.shape[0], draw_noise=False)

    def run(idx: int):
        inp = ctx.inputs[idx]
        call.x_T.copy_(inp.x_T)
        if call.step_noise is not None:
            call.step_noise.copy_(inp.step_noise)
        return call(inp.cond)

    run = torch.no_grad()(run)
    run.kernel_only = lambda: (lambda _idx: call._graph.replay()) if call.graphed else None
    return run


def _replay_alone(sampler):
    """``fn(idx)`` replaying the graph the sampler captured for its last input signature and nothing else
    (no input copies, no checks, no output copy): the kernels' own device time. None if it captured none."""
    call = getattr(sampler._prepared, "_call", None)
    replay = None if call is None else call.replay_alone()
    return None if replay is None else (lambda _idx: replay())


# -- the batched paths ----------------------------------------------------------------------------------------


class BatchedMLP:
    """K MLPDenoisers as batched matmuls over the packed weights: :func:`fdp.packing.reference_eps` with the
    matmuls in the case's dtype (see the module docstring)."""

    def __init__(self, policy, table, dtype: torch.dtype):
        device = next(policy.parameters()).device
        self.policy = policy
        self.cdtype = dtype
        self.shape = (policy.horizon, policy.action_dim)
        self.packed = pack_policy(policy, dtype)
        self.steps = step_terms(policy, table.timesteps.to(device))
        self.coef = table.coef.to(device=device, dtype=torch.float32)                   # [T, 6]
        self.noisy = bool(table.adds_noise.any())
        self.clip, self.clip_range = bool(table.clip_sample), float(table.clip_range)
        self.T = len(table)
        self.prep_fn = self.prep
        self.step_fn = self.step

    def static_tensors(self):
        p = self.packed
        return [p.w_in, p.w_a, p.w_b, p.b_b, p.w_out, p.b_out, self.steps.t_in, self.steps.t_shift, self.coef]

    def prep(self, cond):
        """Per call: router weights and the feature terms (:class:`fdp.packing.CallTerms`' tensors)."""
        ct = call_terms(self.policy, cond, self.policy.weights(cond))
        return ct.weights, ct.c_in, ct.scale, ct.shift

    def step(self, x, coef_i, t_in_i, t_shift_i, noise_i, *terms):
        """One denoising step for ``x [B, D]`` (float32)."""
        eps = reference_eps(self.packed, t_in_i, t_shift_i, CallTerms(*terms), x, self.cdtype)
        return apply_coefficients(coef_i, x, eps, noise_i, self.clip, self.clip_range)[0]

    def __call__(self, cond, x_T, step_noise):
        B = cond.shape[0]
        terms = self.prep_fn(cond)
        x = x_T.reshape(B, -1).float()
        for i in range(self.T):
            noise_i = step_noise[i].reshape(B, -1) if self.noisy else None
            x = self.step_fn(x, self.coef[i], self.steps.t_in[i], self.steps.t_shift[i], noise_i, *terms)
        return x.reshape(B, *self.shape)


class BatchedUNet:
    """K ConditionalUnet1D evaluated as one vmapped network over stacked parameters."""

    def __init__(self, policy, table, dtype: torch.dtype):
        comps = list(policy.components)
        if any(c.local_cond_dim is not None for c in comps):
            raise Skip("the batched U-Net path does not take local conditioning")
        device = next(policy.parameters()).device
        cores = [copy.deepcopy(c).to(dtype) for c in comps]
        params, buffers = torch.func.stack_module_state(cores)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        base = copy.deepcopy(comps[0]).to("meta")
        self.policy = policy
        self.cdtype = dtype
        self.timesteps = table.timesteps.to(device)
        self.coef = table.coef.to(device=device, dtype=torch.float32)
        self.noisy = bool(table.adds_noise.any())
        self.clip, self.clip_range = bool(table.clip_sample), float(table.clip_range)
        self.T = len(table)

        def one(p, b, x, t, c):
            return torch.func.functional_call(base, (p, b), (x, t), {"global_cond": c})

        self._vmapped = torch.func.vmap(one, in_dims=(0, 0, None, None, None))
        self.prep_fn = self.prep
        self.step_fn = self.step

    def static_tensors(self):
        return [*self.params.values(), *self.buffers.values(), self.coef]

    def prep(self, cond):
        weights = self.policy.weights(cond).float().t()[:, :, None, None].contiguous()  # [K, B, 1, 1]
        return weights, cond.to(self.cdtype)

    def step(self, x, coef_i, t_i, noise_i, weights, cond_c):
        eps_k = self._vmapped(self.params, self.buffers, x.to(self.cdtype), t_i, cond_c)  # [K, B, Ta, Da]
        eps = (weights * eps_k.float()).sum(0)
        return apply_coefficients(coef_i, x, eps, noise_i, self.clip, self.clip_range)[0]

    def __call__(self, cond, x_T, step_noise):
        B = cond.shape[0]
        terms = self.prep_fn(cond)
        x = x_T.float()
        with inputs_already_checked():  # the components' finiteness checks would sync every step
            for i in range(self.T):
                noise_i = step_noise[i] if self.noisy else None
                x = self.step_fn(x, self.coef[i], self.timesteps[i].expand(B), noise_i, *terms)
        return x


def _batched(ctx: Context):
    cls = BatchedMLP if ctx.config.family == "mlp" else BatchedUNet
    return cls(ctx.policy, ctx.table, ctx.config.torch_dtype)


def _batched_runner(model, sets: list[InputSet], before: Callable[[], None] | None = None):
    @torch.no_grad()
    def run(idx: int):
        if before is not None:
            before()
        inp = sets[idx]
        return model(inp.cond, inp.x_T, inp.step_noise)

    return run


def build_batched(ctx: Context):
    return _batched_runner(_batched(ctx), ctx.inputs)


def _raise_compile_limits() -> None:
    cfg = torch._dynamo.config
    for name, value in (("cache_size_limit", 4096), ("recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 1 << 16), ("accumulated_recompile_limit", 1 << 16)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def build_compiled(ctx: Context, mode: str):
    name = f"compile-{mode}"
    if ctx.device.type != "cuda" and name not in ctx.explicit:
        raise Skip(f"torch.compile(mode={mode!r}) on {ctx.device.type}: Inductor compiles each shape for tens of "
                   "seconds here and has no CUDA graphs to offer; name it in --backends to time it anyway")
    _raise_compile_limits()
    model = _batched(ctx)
    for t in model.static_tensors():
        # Weights are attributes, not nn.Parameters: without this, cudagraph trees would copy them on every replay.
        torch._dynamo.mark_static_address(t)
    model.prep_fn = torch.compile(model.prep, mode=mode, fullgraph=True, dynamic=False)
    model.step_fn = torch.compile(model.step, mode=mode, fullgraph=True, dynamic=False)
    before = torch.compiler.cudagraph_mark_step_begin if ctx.device.type == "cuda" else None
    return _batched_runner(model, ctx.inputs, before)


def build_cuda_graph(ctx: Context):
    if ctx.device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    model = _batched(ctx)
    first = ctx.inputs[0]
    static = InputSet(first.cond.clone(), first.x_T.clone(),
                      None if first.step_noise is None else first.step_noise.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(2):  # cuBLAS/cuDNN workspaces and algorithm choice, outside the capture
                model(static.cond, static.x_T, static.step_noise)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static.cond, static.x_T, static.step_noise)
    sets = ctx.inputs

    def run(idx: int):
        inp = sets[idx]
        static.cond.copy_(inp.cond)
        static.x_T.copy_(inp.x_T)
        if inp.step_noise is not None:
            static.step_noise.copy_(inp.step_noise)
        graph.replay()
        return out

    run.graph = graph  # keep it alive with the runner
    run.kernel_only = lambda: lambda _idx: graph.replay()
    return run


def build(name: str, ctx: Context):
    """``run(idx)`` for the path ``name`` (native or library backend), or raise :class:`Skip`."""
    if name == "eager":
        return build_eager(ctx)
    if name == "batched":
        return build_batched(ctx)
    if name == "compile-reduce-overhead":
        return build_compiled(ctx, "reduce-overhead")
    if name == "compile-max-autotune":
        return build_compiled(ctx, "max-autotune")
    if name == "cuda-graph":
        return build_cuda_graph(ctx)
    if name.endswith(STATIC_SUFFIX):
        return build_static(name, ctx)
    return build_library(name, ctx)
