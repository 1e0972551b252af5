"""``FusedUnets``: K ``ConditionalUnet1D`` components evaluated as one horizontally fused network.

A factorized policy evaluates K U-Nets on the same noisy sample at every
denoising step. Run one after the other, each layer is K small kernels; at
the paper's sizes a step is bound by reading the weights, and at small
batches by launch count. ``FusedUnets`` packs the K networks so that every
layer runs once for all of them:

* **Channels are concatenated over K.** Activations are ``[B, K*C, T]`` and
  component ``k`` owns channels ``k*C .. (k+1)*C``. A Conv1d becomes a
  grouped Conv1d (``groups=K``, weights stacked over K on the output axis),
  likewise the strided down-sampling conv and the ConvTranspose1d. A
  GroupNorm with ``K*G`` groups over ``K*C`` channels normalizes exactly the
  channel groups that the K GroupNorms with ``G`` groups normalize, so the
  fused network computes the same function, up to rounding order.
* **The first layer reads the shared input once.** Every component sees the
  same sample (and local conditioning), so the convolutions that read it are
  dense convs with ``K*C`` outputs instead of grouped convs over K copies.
* **Skip connections** concatenate per component (``[x_k, skip_k]`` for every
  ``k``), so the up path interleaves the two ``[B, K*C, T]`` tensors by
  component before its grouped conv.
* **Conditioning leaves the per-step path.** A residual block's FiLM is
  ``Linear(Mish(g))`` with ``g = [temb(t), global_cond]``. Mish acts
  elementwise, so it distributes over the concatenation and the Linear
  splits by columns::

      FiLM = W_t Mish(temb(t)) + b  +  W_c Mish(global_cond)
           = step term [T, F]       +  call term [B, F]

  Both are precomputed (:meth:`FusedUnets.step_terms` once per schedule,
  :meth:`FusedUnets.call_terms` once per sampling call) for all blocks of all
  K components into one flat vector of ``F`` values per row; a step only adds
  the two and slices per block. (Materializing the sum for all T steps and B
  samples would cost ``T*B*F`` values: about 6 GB at the paper's K = 4,
  T = 100, B = 256.)

FiLM vector layout (``F`` values per row): the residual blocks in the order
local-conditioning block (when present), down stages (two blocks each),
middle (two), up stages (two each); per block ``[scale (K*C) | bias (K*C)]``
when any component predicts a scale, else ``[bias (K*C)]``, each
component-major like the channels. A component that predicts no scale gets
scale 1 in a block of components that do, so components may differ in
``cond_predict_scale``, in ``diffusion_step_embed_dim`` and in whether they
take ``global_cond`` (``global_cond_dim`` None); the trunk (``input_dim``,
``local_cond_dim``, ``down_dims``, ``kernel_size``, ``n_groups``) must match
(:func:`fusion_mismatch` says why not).

The fused module holds its own copies of the weights: packing never modifies
the components, and changes made to the components afterwards need a new
``from_components``. Trunk weights take ``dtype`` (e.g. bfloat16); the FiLM
weights keep the components' dtype, so the conditioning terms are computed
at the components' precision and cast once per step.

``forward`` returns the K predictions as ``[K, B, T, input_dim]``: a
non-contiguous view of the trunk's channels-first ``[B, K, input_dim, T]``
output (``.contiguous()`` if needed); :func:`fdp_kernels.compose_step.compose_step`
reads it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_finite, check_tensor, format_shape
from .unet import ConditionalUnet1D, _timesteps_tensor

__all__ = ["FusedUnets", "fusion_mismatch"]

_TRUNK_ATTRS = ("input_dim", "local_cond_dim", "down_dims", "kernel_size", "n_groups")


def fusion_mismatch(components) -> str | None:
    """None if ``components`` can be fused into one :class:`FusedUnets`, else why not."""
    if isinstance(components, nn.Module) or not isinstance(components, Sequence):
        return f"`components` must be a sequence of ConditionalUnet1D, got {type(components).__name__}"
    if len(components) == 0:
        return "`components` must hold at least one ConditionalUnet1D"
    for i, comp in enumerate(components):
        if not isinstance(comp, ConditionalUnet1D):
            return f"component {i} is a {type(comp).__name__}, not a ConditionalUnet1D"
    first = components[0]
    ref_param = first.final_conv[1].weight
    for i, comp in enumerate(components[1:], start=1):
        for attr in _TRUNK_ATTRS:
            a, b = getattr(first, attr), getattr(comp, attr)
            if a != b:
                return f"component {i} has {attr}={b!r} but component 0 has {a!r}; the trunks must match"
        gdims = {first.global_cond_dim, comp.global_cond_dim} - {None}
        if len(gdims) > 1:
            return (f"component {i} has global_cond_dim={comp.global_cond_dim} but component 0 has "
                    f"{first.global_cond_dim}; components that take global_cond must agree on its size")
        param = comp.final_conv[1].weight
        if param.device != ref_param.device or param.dtype != ref_param.dtype:
            return (f"component {i} is {param.dtype} on {param.device} but component 0 is "
                    f"{ref_param.dtype} on {ref_param.device}")
    eps = {m.eps for comp in components for m in comp.modules() if isinstance(m, nn.GroupNorm)}
    if len(eps) > 1:
        return f"the components' GroupNorms use different eps values {sorted(eps)}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Packing helpers: each returns new tensors (torch.cat copies), never views of the components' parameters.


def _cat(tensors, dtype):
    return torch.cat([t.detach() for t in tensors], dim=0).to(dtype)


class _Conv(nn.Module):
    """K same-shaped Conv1d (or ConvTranspose1d) as one grouped conv; ``groups=1`` for a shared input."""

    def __init__(self, convs, dtype, shared_input=False):
        super().__init__()
        c = convs[0]
        self.transposed = isinstance(c, nn.ConvTranspose1d)
        # Conv1d weight [out, in/g, k] and ConvTranspose1d weight [in, out/g, k] both stack on dim 0.
        self.register_buffer("weight", _cat([m.weight for m in convs], dtype))
        self.register_buffer("bias", _cat([m.bias for m in convs], dtype))
        self.groups = 1 if shared_input else len(convs)
        self.stride, self.padding = c.stride[0], c.padding[0]

    def forward(self, x):
        if self.transposed:
            return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding, groups=self.groups)
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, groups=self.groups)


class _ConvBlock(nn.Module):
    """K ``Conv1dBlock`` s: grouped conv, GroupNorm with K*G groups, Mish."""

    def __init__(self, blocks, dtype, shared_input=False):
        super().__init__()
        convs = [b.block[0] for b in blocks]
        norms = [b.block[1] for b in blocks]
        self.conv = _Conv(convs, dtype, shared_input)
        self.register_buffer("gn_weight", _cat([n.weight for n in norms], dtype))
        self.register_buffer("gn_bias", _cat([n.bias for n in norms], dtype))
        self.num_groups = len(blocks) * norms[0].num_groups
        self.eps = norms[0].eps

    def forward(self, x):
        x = self.conv(x)
        return F.mish(F.group_norm(x, self.num_groups, self.gn_weight, self.gn_bias, self.eps))


class _ResBlock(nn.Module):
    """K ``ConditionalResidualBlock1D`` s; FiLM comes in from the flat vector at ``film_offset``."""

    def __init__(self, blocks, dtype, film_offset, shared_input=False):
        super().__init__()
        K = len(blocks)
        self.K = K
        self.channels = blocks[0].out_channels
        self.blocks1 = _ConvBlock([b.blocks[0] for b in blocks], dtype, shared_input)
        self.blocks2 = _ConvBlock([b.blocks[1] for b in blocks], dtype)
        self.has_scale = any(b.cond_predict_scale for b in blocks)
        self.film_offset = film_offset
        self.film_size = (2 if self.has_scale else 1) * K * self.channels
        res = [b.residual_conv for b in blocks]
        # An identity residual on a shared input still needs one copy of it per component.
        self.residual = None if isinstance(res[0], nn.Identity) else _Conv(res, dtype, shared_input)
        self.repeat_input = self.residual is None and shared_input

    def forward(self, x, film):
        kc = self.K * self.channels
        o = self.film_offset
        h = self.blocks1(x)
        if self.has_scale:
            h = film[:, o:o + kc, None] * h + film[:, o + kc:o + 2 * kc, None]
        else:
            h = h + film[:, o:o + kc, None]
        h = self.blocks2(h)
        if self.residual is not None:
            return h + self.residual(x)
        if self.repeat_input:
            return h + x.repeat(1, self.K, 1)
        return h + x


class _TimeTerms(nn.Module):
    """One component's timestep embedding and the timestep columns of all its FiLM Linears."""

    def __init__(self, comp, w_film, b_film, idx):
        super().__init__()
        fd = w_film.dtype
        _, lin1, _, lin2 = comp.diffusion_step_encoder
        self.dim = comp.diffusion_step_embed_dim
        for name, t in (("w1", lin1.weight), ("b1", lin1.bias), ("w2", lin2.weight), ("b2", lin2.bias)):
            self.register_buffer(name, t.detach().to(fd, copy=True))
        self.register_buffer("w_film", w_film)
        self.register_buffer("b_film", b_film)
        self.register_buffer("idx", idx)

    def forward(self, t):
        fd = self.w_film.dtype
        # fdp.unet.SinusoidalPosEmb and cond_embedding: sinusoids at float32 at least, then cast.
        compute = torch.promote_types(fd, torch.float32)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=compute) * -(math.log(10000.0) / (half - 1)))
        args = t.to(compute)[:, None] * freqs[None, :]
        e = torch.cat((args.sin(), args.cos()), dim=-1).to(fd)
        e = F.linear(F.mish(F.linear(e, self.w1, self.b1)), self.w2, self.b2)
        return F.linear(F.mish(e), self.w_film, self.b_film)


class FusedUnets(nn.Module):
    """K ConditionalUnet1D evaluated together; build with :meth:`from_components`.

    ``forward(sample [B, T, Da], timestep, local_cond=None, global_cond=None)
    -> [K, B, T, Da]`` (see the module docstring for the layout); the parts are
    :meth:`step_terms`, :meth:`call_terms` and :meth:`trunk`.
    """

    def __init__(self, components, dtype=None):
        super().__init__()
        reason = fusion_mismatch(components)
        if reason:
            raise ValueError(reason)
        comps = list(components)
        first = comps[0]
        film_dtype = first.final_conv[1].weight.dtype
        dtype = film_dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
        K = len(comps)
        self.K = K
        self.dtype = dtype
        self.film_dtype = film_dtype
        for attr in _TRUNK_ATTRS:
            setattr(self, attr, getattr(first, attr))
        self.global_cond_dim = next((c.global_cond_dim for c in comps if c.global_cond_dim), None)
        self.takes_cond = [c.global_cond_dim is not None for c in comps]
        self.horizon_multiple = first.horizon_multiple

        # Per component, the residual blocks in FiLM order (see the module docstring).
        order = []
        for comp in comps:
            blocks = []
            if comp.local_cond_encoder is not None:
                blocks.append(comp.local_cond_encoder[0])
            for b1, b2, _ in comp.down_modules:
                blocks += [b1, b2]
            blocks += list(comp.mid_modules)
            for b1, b2, _ in comp.up_modules:
                blocks += [b1, b2]
            order.append(blocks)
        n_blocks = len(order[0])

        # The local-conditioning block and the first down block read the sample (or the local
        # features) directly: one shared input for all K.
        n_shared = 2 if first.local_cond_encoder is not None else 1
        offset = 0
        fused_blocks = []
        for j in range(n_blocks):
            blk = _ResBlock([order[k][j] for k in range(K)], dtype, offset, shared_input=j < n_shared)
            fused_blocks.append(blk)
            offset += blk.film_size
        self.film_size = offset

        it = iter(fused_blocks)
        self.local_block = next(it) if first.local_cond_encoder is not None else None
        self.down = nn.ModuleList()
        for s, (_, _, ds) in enumerate(first.down_modules):
            stage = [next(it), next(it)]
            if not isinstance(ds, nn.Identity):
                stage.append(_Conv([c.down_modules[s][2].conv for c in comps], dtype))
            self.down.append(nn.ModuleList(stage))
        self.mid = nn.ModuleList([next(it), next(it)])
        self.up = nn.ModuleList()
        for s in range(len(first.up_modules)):
            b1, b2 = next(it), next(it)
            upsample = _Conv([c.up_modules[s][2].conv for c in comps], dtype)
            self.up.append(nn.ModuleList([b1, b2, upsample]))
        self.head = _ConvBlock([c.final_conv[0] for c in comps], dtype)
        self.head_out = _Conv([c.final_conv[1] for c in comps], dtype)
        self._pack_film(comps, order)

    @classmethod
    def from_components(cls, components, dtype: torch.dtype | None = None) -> "FusedUnets":
        """Pack K ConditionalUnet1D (same trunk configuration) into one network.

        ``dtype``: the trunk's weight dtype (default: the components'). The
        components are only read.
        """
        return cls(components, dtype)

    # -- conditioning ----------------------------------------------------------------------------------------

    def _pack_film(self, comps, order):
        """Split every FiLM Linear into timestep columns (per component) and global_cond columns (all K at once)."""
        fd = self.film_dtype
        device = comps[0].final_conv[1].weight.device
        blocks = ([self.local_block] if self.local_block is not None else []) + [
            b for stage in self.down for b in stage[:2]] + list(self.mid) + [b for stage in self.up for b in stage[:2]]
        const = torch.zeros(self.film_size, dtype=fd, device=device)
        self.time_terms = nn.ModuleList()
        cond_w, cond_idx = [], []
        for k, comp in enumerate(comps):
            dsed = comp.diffusion_step_embed_dim
            w_t, b_t, idx = [], [], []
            for fb, blk in zip(blocks, order[k]):
                lin = blk.cond_encoder[1]
                kc = slice(fb.film_offset + k * fb.channels, fb.film_offset + (k + 1) * fb.channels)
                bias = range(kc.start + fb.film_size // 2, kc.stop + fb.film_size // 2) if fb.has_scale else \
                    range(kc.start, kc.stop)
                # The Linear's rows are [scale; bias] or [bias].
                pos = ([*range(kc.start, kc.stop)] if blk.cond_predict_scale else []) + [*bias]
                if fb.has_scale and not blk.cond_predict_scale:
                    const[kc] = 1
                w_t.append(lin.weight[:, :dsed])
                b_t.append(lin.bias)
                idx.append(torch.tensor(pos, device=device))
                if self.takes_cond[k]:
                    cond_w.append(lin.weight[:, dsed:])
                    cond_idx.append(idx[-1])
            self.time_terms.append(_TimeTerms(comp, _cat(w_t, fd), _cat(b_t, fd), torch.cat(idx)))
        self.register_buffer("film_const", const)
        if not cond_w:
            self.register_buffer("cond_w", None)
            self.register_buffer("cond_idx", None)
            return
        # Rows in FiLM order: in the common case (every component takes global_cond and predicts
        # what its block does) they cover the whole vector, and call_terms needs no scatter.
        idx = torch.cat(cond_idx)
        order = torch.argsort(idx)
        self.register_buffer("cond_w", _cat(cond_w, fd)[order])
        idx = idx[order]
        full = idx.numel() == self.film_size and bool((idx == torch.arange(self.film_size, device=device)).all())
        self.register_buffer("cond_idx", None if full else idx)

    @torch.no_grad()
    def step_terms(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep part of every FiLM, ``[N, F]`` in the components' dtype, for ``timesteps [N]``.

        Includes the Linear biases and the constant scale 1 of components that
        predict no scale; computed once per schedule.
        """
        check_tensor("timesteps", timesteps, ndim=1, dtype="real")
        t = timesteps.to(self.film_const.device)
        out = self.film_const.expand(t.shape[0], -1).clone()
        for terms in self.time_terms:
            out.index_copy_(1, terms.idx, terms(t))
        return out

    @torch.no_grad()
    def call_terms(self, global_cond: torch.Tensor | None) -> torch.Tensor | None:
        """The global_cond part of every FiLM, ``[B, F]`` in the components' dtype (None: no component takes it)."""
        if self.cond_w is None:
            return None
        m = F.mish(global_cond.to(self.film_dtype))
        r = F.linear(m, self.cond_w)
        if self.cond_idx is None:
            return r
        return r.new_zeros(r.shape[0], self.film_size).index_copy_(1, self.cond_idx, r)

    # -- trunk ---------------------------------------------------------------------------------------------

    def trunk(self, sample: torch.Tensor, film: torch.Tensor, local_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The K predictions ``[K, B, T, Da]`` (a view) from ``sample [B, T, Da]`` and FiLM values ``[B or 1, F]``.

        No input checks: this is the per-step path (``forward`` validates).
        """
        B, T, Da = sample.shape
        K = self.K
        x = sample.transpose(1, 2)
        h_local = None
        if self.local_block is not None:
            h_local = self.local_block(local_cond.transpose(1, 2), film)
        skips = []
        for s, stage in enumerate(self.down):
            x = stage[0](x, film)
            if s == 0 and h_local is not None:
                x = x + h_local
            x = stage[1](x, film)
            skips.append(x)
            if len(stage) == 3:
                x = stage[2](x)
        for blk in self.mid:
            x = blk(x, film)
        for b1, b2, upsample in self.up:
            skip = skips.pop()
            C = x.shape[1] // K
            # Per component [x_k, skip_k], as each component concatenates its own.
            x = torch.cat((x.view(B, K, C, -1), skip.view(B, K, C, -1)), dim=2).view(B, 2 * K * C, -1)
            x = b1(x, film)
            x = b2(x, film)
            x = upsample(x)
        x = self.head_out(self.head(x))
        return x.view(B, K, Da, T).permute(1, 0, 3, 2)

    def film(self, timesteps: torch.Tensor, global_cond: torch.Tensor | None) -> torch.Tensor:
        """FiLM values ``[B, F]`` in the trunk dtype for per-sample ``timesteps [B]``."""
        film = self.step_terms(timesteps)
        call = self.call_terms(global_cond)
        if call is not None:
            film = film + call
        return film.to(self.dtype)

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep, local_cond: torch.Tensor | None = None,
                global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """All K predictions ``[K, B, T, Da]`` for one ``sample [B, T, Da]`` (what each component's forward gives).

        ``global_cond`` is required when any component takes it (those that do
        not ignore it); ``local_cond [B, T, local_cond_dim]`` iff the components have it.
        """
        dims = check_tensor("sample", sample, shape=("B", "T", self.input_dim), dtype=self.dtype,
                            device=self.film_const.device)
        B, T = dims["B"], dims["T"]
        if B == 0 or T == 0 or T % self.horizon_multiple:
            raise ValueError(f"`sample` must have a non-empty batch and a horizon divisible by "
                             f"{self.horizon_multiple}, got {format_shape(sample.shape)}")
        if self.global_cond_dim is None:
            if global_cond is not None:
                raise ValueError("`global_cond` must be None: no component was built with global_cond_dim")
        else:
            if global_cond is None:
                raise ValueError(f"`global_cond` is required: expected shape [B, {self.global_cond_dim}] (B={B})")
            check_tensor("global_cond", global_cond, shape=(B, self.global_cond_dim), dtype="floating",
                         device=sample.device)
            check_finite("global_cond", global_cond)
        if self.local_cond_dim is None:
            if local_cond is not None:
                raise ValueError("`local_cond` must be None: the components were built with local_cond_dim=None")
        else:
            if local_cond is None:
                raise ValueError(f"`local_cond` is required: expected shape [B, T, {self.local_cond_dim}] "
                                 f"(B={B}, T={T})")
            check_tensor("local_cond", local_cond, shape=(B, T, self.local_cond_dim), dtype=self.dtype,
                         device=sample.device)
            check_finite("local_cond", local_cond)
        timesteps = _timesteps_tensor(timestep, B, sample.device)
        return self.trunk(sample, self.film(timesteps, global_cond), local_cond)

    def extra_repr(self) -> str:
        return (f"K={self.K}, input_dim={self.input_dim}, down_dims={list(self.down_dims)}, "
                f"kernel_size={self.kernel_size}, n_groups={self.n_groups}, dtype={self.dtype}, "
                f"film_size={self.film_size}")
