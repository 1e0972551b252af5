"""``MLPDenoiser``: a FiLM-conditioned residual MLP with separable conditioning.

The math (docs/mlp_denoiser.md holds the same text; every backend implements
exactly this). With ``x = flatten(sample)`` in R^D (D = horizon * action_dim),
hidden width H, L residual blocks, timestep t and features c:

    e(t)   = W_e2 SiLU(W_e1 sinusoidal(t) + b_e1) + b_e2                 (per step)
    h_0    = W_in x + [U_in e(t)] + [V_in c + b_in]
    y_l    = (W_a,l h_{l-1}) * s_l(c) + [r_l(c)] + [T_l e(t)]             l = 1..L
    h_l    = h_{l-1} + W_b,l SiLU(y_l) + b_b,l
    eps    = W_out h_L + b_out

with the FiLM terms ``(g_l, beta_l) = G_l c + g0_l`` folded per sample into
``s_l = 1 + g_l`` and ``r_l = (1 + g_l) * b_a,l + beta_l`` (b_a,l is the bias
of the first block matmul). Every term in square brackets depends only on the
timestep or only on ``c``: :meth:`MLPDenoiser.step_terms` and
:meth:`MLPDenoiser.sample_terms` compute them once per sampling call, and the
per-step work that remains is the ``x``-dependent matrix chain — what the
fused kernels do. ``forward`` is written in terms of those same two methods so
the decomposition cannot drift from the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import InvalidArgument, check_finite, check_int, check_optional_int, check_tensor
from .unet import SinusoidalPosEmb


@dataclass
class StepTerms:
    """Timestep-only terms, one row per timestep: ``t_in [T, H]``, ``t_shift [T, L, H]`` for one component;
    :func:`fdp.packing.step_terms` stacks them over the K components as ``[T, K, H]``, ``[T, K, L, H]``."""

    t_in: torch.Tensor
    t_shift: torch.Tensor


@dataclass
class SampleTerms:
    """Sample-only terms: ``c_in [B, H]``, ``scale [B, L, H]``, ``shift [B, L, H]``."""

    c_in: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class MLPDenoiser(nn.Module):
    """Noise-prediction MLP over a flattened action chunk.

    Same forward signature as :class:`fdp.ConditionalUnet1D`:
    ``forward(sample [B, horizon, input_dim], timestep, local_cond=None,
    global_cond=None) -> [B, horizon, input_dim]``.

    Args:
        input_dim: action dimension Da.
        horizon: action-chunk length Ta.
        global_cond_dim: observation-feature dimension Dc (0 or None: unconditional).
        hidden_dim: width H of the residual stream.
        num_blocks: number L of residual blocks.
        time_embed_dim: size of the sinusoidal timestep embedding.
    """

    def __init__(
        self,
        input_dim: int,
        horizon: int,
        global_cond_dim: int | None = None,
        hidden_dim: int = 256,
        num_blocks: int = 2,
        time_embed_dim: int = 64,
    ):
        super().__init__()
        for name, v in (("input_dim", input_dim), ("horizon", horizon), ("hidden_dim", hidden_dim),
                        ("num_blocks", num_blocks), ("time_embed_dim", time_embed_dim)):
            check_int(name, v, min_value=1)
        if time_embed_dim % 2 or time_embed_dim < 4:
            raise InvalidArgument(f"`time_embed_dim` must be even and >= 4, got {time_embed_dim}")
        global_cond_dim = check_optional_int("global_cond_dim", global_cond_dim, min_value=0)
        self.input_dim = input_dim
        self.horizon = horizon
        self.global_cond_dim = global_cond_dim or 0
        self.hidden_dim = hidden_dim
        self.num_blocks = num_blocks
        self.time_embed_dim = time_embed_dim
        D, H, L = input_dim * horizon, hidden_dim, num_blocks

        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(time_embed_dim), nn.Linear(time_embed_dim, H), nn.SiLU(), nn.Linear(H, H)
        )
        # One projection of e(t) gives U_in e(t) and every block's T_l e(t).
        self.time_proj = nn.Linear(H, (L + 1) * H, bias=False)
        self.inp = nn.Linear(D, H, bias=False)
        # V_in c + b_in, and the FiLM (gamma, beta) of every block, from c in one matmul.
        self.cond_proj = nn.Linear(self.global_cond_dim, H + 2 * L * H) if self.global_cond_dim else None
        self.in_bias = nn.Parameter(torch.zeros(H)) if not self.global_cond_dim else None
        self.blocks_a = nn.ModuleList(nn.Linear(H, H) for _ in range(L))
        self.blocks_b = nn.ModuleList(nn.Linear(H, H) for _ in range(L))
        self.out = nn.Linear(H, D)
        if self.cond_proj is not None:
            # Start with identity FiLM (scale 1): conditioning is learned, not noise.
            nn.init.normal_(self.cond_proj.weight, std=1.0 / math.sqrt(max(self.global_cond_dim, 1)) * 0.1)
            nn.init.zeros_(self.cond_proj.bias)

    # -- the separable conditioning -------------------------------------------------
    def step_terms(self, timesteps: torch.Tensor) -> StepTerms:
        """Timestep-only terms for a 1-D tensor of timesteps ``[T]``."""
        dtype = self.out.weight.dtype
        timesteps = torch.as_tensor(timesteps, device=self.out.weight.device)
        # Timesteps and sinusoids in float32 at least, then cast: in bf16, 999 rounds to 1000 and the
        # embedding's phases go with it (fdp.unet.ConditionalUnet1D.cond_embedding does the same).
        compute = torch.promote_types(dtype, torch.float32)
        pos_emb, *mlp = self.time_mlp
        e = pos_emb(timesteps.reshape(-1).to(compute)).to(dtype)
        for layer in mlp:
            e = layer(e)
        p = self.time_proj(e).unflatten(-1, (self.num_blocks + 1, self.hidden_dim))
        return StepTerms(t_in=p[:, 0], t_shift=p[:, 1:])

    def sample_terms(self, global_cond: torch.Tensor | None, batch_size: int) -> SampleTerms:
        """Sample-only terms for features ``[B, Dc]`` (``None`` when unconditional)."""
        H, L = self.hidden_dim, self.num_blocks
        w = self.out.weight
        if self.cond_proj is None:
            c_in = self.in_bias.expand(batch_size, H)
            gamma = torch.zeros(batch_size, L, H, device=w.device, dtype=w.dtype)
            beta = gamma
        else:
            p = self.cond_proj(global_cond)
            c_in = p[:, :H]
            gamma, beta = p[:, H:].unflatten(-1, (2, L, H)).unbind(1)
        scale = 1.0 + gamma
        b_a = torch.stack([blk.bias for blk in self.blocks_a])  # [L, H]
        shift = scale * b_a + beta
        return SampleTerms(c_in=c_in, scale=scale, shift=shift)

    def forward_terms(self, x: torch.Tensor, t_in, t_shift, c_in, scale, shift) -> torch.Tensor:
        """The ``x``-dependent chain, given precomputed terms (``x`` is ``[B, D]``).

        ``t_in``/``t_shift`` broadcast against the batch (``[H]`` or ``[B, H]``;
        ``[L, H]`` or ``[B, L, H]``).
        """
        h = F.linear(x, self.inp.weight) + t_in + c_in
        for i, (blk_a, blk_b) in enumerate(zip(self.blocks_a, self.blocks_b)):
            y = F.linear(h, blk_a.weight) * scale[:, i] + shift[:, i] + t_shift[..., i, :]
            h = h + blk_b(F.silu(y))
        return self.out(h)

    # -- the module API shared with ConditionalUnet1D ---------------------------------
    def forward(self, sample, timestep, local_cond=None, global_cond=None):
        B = self.check_inputs(sample, timestep, local_cond, global_cond)
        t = torch.as_tensor(timestep, device=sample.device)
        steps = self.step_terms(t.reshape(-1))
        t_in, t_shift = steps.t_in, steps.t_shift
        if t.ndim == 0 or t.numel() == 1:
            t_in, t_shift = t_in[0], t_shift[0]
        terms = self.sample_terms(global_cond, B)
        eps = self.forward_terms(sample.reshape(B, -1), t_in, t_shift, terms.c_in, terms.scale, terms.shift)
        return eps.reshape(sample.shape)

    def check_inputs(self, sample, timestep, local_cond, global_cond) -> int:
        check_tensor("sample", sample, shape=(None, self.horizon, self.input_dim), dtype="floating")
        B = sample.shape[0]
        if local_cond is not None:
            raise InvalidArgument("`local_cond` is not supported by MLPDenoiser (pass None)")
        t = torch.as_tensor(timestep)
        if not (t.ndim == 0 or (t.ndim == 1 and t.shape[0] in (1, B))):
            raise InvalidArgument(f"`timestep` must be a scalar or have shape [{B}], got {list(t.shape)}")
        if self.global_cond_dim:
            if global_cond is None:
                raise InvalidArgument(f"`global_cond` is required: expected shape [{B}, {self.global_cond_dim}]")
            check_tensor("global_cond", global_cond, shape=(B, self.global_cond_dim),
                         dtype=sample.dtype, device=sample.device)
            check_finite("global_cond", global_cond)
        elif global_cond is not None and global_cond.numel():
            raise InvalidArgument("`global_cond` was given but this MLPDenoiser has global_cond_dim=0")
        return B

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, horizon={self.horizon}, global_cond_dim={self.global_cond_dim}, "
                f"hidden_dim={self.hidden_dim}, num_blocks={self.num_blocks}")
