"""``ConditionalUnet1D``: the 1-D temporal U-Net denoiser of Diffusion Policy.

Each component of a factorized diffusion policy is the conditional 1-D U-Net
of Chi et al., "Diffusion Policy" (RSS 2023). This module reimplements it so
that checkpoints trained with that codebase load with ``strict=True`` (same
parameter names and shapes) and give the same output.

Architecture (channels-first ``[B, C, T]`` inside, ``[B, T, C]`` outside):

* **Conditioning vector** ``g = [MLP(sinusoidal(t)), global_cond]``, of size
  ``cond_dim = diffusion_step_embed_dim + global_cond_dim``. Every residual
  block turns ``g`` into a FiLM (per-channel scale and bias, or bias only).
* **Residual block** ``in -> out``: Conv1d-GroupNorm-Mish, FiLM, a second
  Conv1d-GroupNorm-Mish, plus the input (through a 1x1 conv when the width
  changes).
* **Down path**: for each width of ``down_dims``, two residual blocks, a skip
  connection, and a stride-2 conv that halves the horizon (not after the last
  width). **Middle**: two residual blocks at the last width. **Up path**: for
  each width but the first, in reverse, concatenate the skip, two residual
  blocks, and a transposed conv that doubles the horizon. **Head**: a conv
  block and a 1x1 conv back to ``input_dim``.
* **Local conditioning** (optional): a residual block maps per-timestep
  features to the first width; its output is added after the first block of
  the first down stage. (The reference also holds a second such block, meant
  for the up path, that its forward never uses; it is kept for loading.)

The horizon must therefore be divisible by ``2 ** (len(down_dims) - 1)``.

FiLM is computed by :meth:`ConditionalResidualBlock1D.film` and applied by
:meth:`ConditionalResidualBlock1D.forward_with_film`, so code that evaluates
several U-Nets together can batch the conditioning separately from the
convolutions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ._validation import (
    InvalidArgument,
    InvalidArgumentType,
    check_bool,
    check_finite,
    check_int,
    check_optional_int,
    check_tensor,
    format_shape,
)

__all__ = [
    "SinusoidalPosEmb",
    "Conv1dBlock",
    "ConditionalResidualBlock1D",
    "Downsample1d",
    "Upsample1d",
    "ConditionalUnet1D",
]

# The head's GroupNorm uses this many groups whatever ``n_groups`` is: the
# reference implementation builds that block with its default, and published
# checkpoints depend on it.
_FINAL_CONV_GROUPS = 8


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of a 1-D tensor of (diffusion) timesteps.

    For ``half = dim // 2`` and frequencies ``f_i = exp(-i ln(10000) / (half - 1))``,
    ``i = 0..half-1``, maps ``t [N]`` to ``[sin(t f), cos(t f)]`` of shape
    ``[N, dim]`` (sines first).

    The result has the input's dtype when that is floating, else the default
    dtype. Arguments are formed in at least float32, so half-precision
    inputs do not lose the phase of large timesteps.
    """

    def __init__(self, dim: int):
        super().__init__()
        dim = check_int("dim", dim, min_value=4)
        if dim % 2:
            raise InvalidArgument(f"`dim` must be even, got {dim}")
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=1, dtype="real")
        out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        compute = torch.promote_types(out_dtype, torch.float32)
        half = self.dim // 2
        step = math.log(10000.0) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=compute) * -step)
        args = x.to(compute)[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1).to(out_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Conv1dBlock(nn.Module):
    """Conv1d (same padding) -> GroupNorm -> Mish, on ``[B, C, T]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Residual block ``[B, in, T] -> [B, out, T]`` with FiLM conditioning on ``cond [B, cond_dim]``.

    ``y = conv_block_2(film(conv_block_1(x))) + residual(x)`` where the FiLM
    is ``scale * y + bias`` (``cond_predict_scale=True``) or ``y + bias``, and
    ``residual`` is a 1x1 conv when ``in != out``, else the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        self.blocks = nn.ModuleList([
            Conv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups),
            Conv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups),
        ])
        cond_channels = 2 * out_channels if cond_predict_scale else out_channels
        # Index layout (Mish, Linear, Unflatten) is fixed by the checkpoint
        # names: the Linear must be ``cond_encoder.1``.
        self.cond_encoder = nn.Sequential(
            nn.Mish(),
            nn.Linear(cond_dim, cond_channels),
            nn.Unflatten(1, (cond_channels, 1)),
        )
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def film(self, cond: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """FiLM parameters ``(scale, bias)``, each ``[B, out, 1]``, from ``cond [B, cond_dim]``.

        ``scale`` is ``None`` when the block predicts a bias only.
        """
        embed = self.cond_encoder(cond)
        if self.cond_predict_scale:
            # The Linear's first ``out`` outputs are the scale, the next ``out`` the bias.
            scale, bias = embed.chunk(2, dim=1)
            return scale, bias
        return None, embed

    def forward_with_film(self, x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
        """The block's forward given precomputed FiLM parameters (see :meth:`film`)."""
        out = self.blocks[0](x)
        out = out + bias if scale is None else scale * out + bias
        out = self.blocks[1](out)
        return out + self.residual_conv(x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond)
        return self.forward_with_film(x, scale, bias)


class Downsample1d(nn.Module):
    """Halve the horizon: Conv1d(dim, dim, 3, stride 2, padding 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the horizon: ConvTranspose1d(dim, dim, 4, stride 2, padding 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalUnet1D(nn.Module):
    """Conditional 1-D temporal U-Net, checkpoint-compatible with Diffusion Policy.

    Args:
        input_dim: channels of the sample (the action dimension).
        local_cond_dim: channels of the optional per-timestep conditioning
            ``local_cond [B, T, local_cond_dim]``; ``None`` disables it.
        global_cond_dim: size of the optional conditioning vector
            ``global_cond [B, global_cond_dim]``; ``None`` disables it.
        diffusion_step_embed_dim: size of the timestep embedding (even, >= 4).
        down_dims: channel width of each resolution level, finest first. Every
            width must be divisible by ``n_groups``, and the first also by 8
            (the head's GroupNorm).
        kernel_size: odd temporal kernel size of the conv blocks.
        n_groups: GroupNorm groups in the residual blocks.
        cond_predict_scale: FiLM predicts a scale and a bias (else a bias only).

    ``forward(sample [B, T, input_dim], timestep, local_cond=None,
    global_cond=None) -> [B, T, input_dim]``, with ``T`` divisible by
    :attr:`horizon_multiple`.
    """

    def __init__(
        self,
        input_dim: int,
        local_cond_dim: int | None = None,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims: Iterable[int] = (256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ):
        super().__init__()
        input_dim = check_int("input_dim", input_dim, min_value=1)
        local_cond_dim = check_optional_int("local_cond_dim", local_cond_dim, min_value=1)
        global_cond_dim = check_optional_int("global_cond_dim", global_cond_dim, min_value=1)
        dsed = check_int("diffusion_step_embed_dim", diffusion_step_embed_dim, min_value=4)
        if dsed % 2:
            raise InvalidArgument(f"`diffusion_step_embed_dim` must be even, got {dsed}")
        kernel_size = check_int("kernel_size", kernel_size, min_value=1, odd=True)
        n_groups = check_int("n_groups", n_groups, min_value=1)
        cond_predict_scale = check_bool("cond_predict_scale", cond_predict_scale)
        down_dims = _check_down_dims(down_dims, n_groups)

        self.input_dim = input_dim
        self.local_cond_dim = local_cond_dim
        self.global_cond_dim = global_cond_dim
        self.diffusion_step_embed_dim = dsed
        self.down_dims = down_dims
        self.kernel_size = kernel_size
        self.n_groups = n_groups
        self.cond_predict_scale = cond_predict_scale
        self.cond_dim = dsed + (global_cond_dim or 0)
        self.horizon_multiple = 2 ** (len(down_dims) - 1)

        def res_block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                c_in, c_out, self.cond_dim, kernel_size=kernel_size, n_groups=n_groups,
                cond_predict_scale=cond_predict_scale,
            )

        widths = [input_dim, *down_dims]
        pairs = list(zip(widths[:-1], widths[1:]))

        # Submodules are registered in the reference's order so that
        # ``parameters()`` enumerates identically: optimizer state saved by
        # the reference codebase is keyed by that position.
        self.mid_modules = nn.ModuleList([res_block(down_dims[-1], down_dims[-1]) for _ in range(2)])
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed),
            nn.Linear(dsed, 4 * dsed),
            nn.Mish(),
            nn.Linear(4 * dsed, dsed),
        )
        # The reference builds two local-conditioning blocks, the second meant
        # for the last up stage. Its injection test (``idx == len(up_modules)``)
        # never holds, and if it did the addition would fail: that stage runs
        # at half the horizon until its upsampler. Checkpoints were trained
        # without it, so the block exists for strict loading only and
        # forward() does not evaluate it.
        self.local_cond_encoder = (
            None if local_cond_dim is None
            else nn.ModuleList([res_block(local_cond_dim, down_dims[0]) for _ in range(2)])
        )
        # The reference builds an upsampler for every up stage (its "last
        # stage" test never fires there); checkpoints contain their weights.
        self.up_modules = nn.ModuleList(
            nn.ModuleList([res_block(2 * c_out, c_in), res_block(c_in, c_in), Upsample1d(c_in)])
            for c_in, c_out in reversed(pairs[1:])
        )
        self.down_modules = nn.ModuleList(
            nn.ModuleList([
                res_block(c_in, c_out),
                res_block(c_out, c_out),
                Downsample1d(c_out) if i < len(pairs) - 1 else nn.Identity(),
            ])
            for i, (c_in, c_out) in enumerate(pairs)
        )
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups=_FINAL_CONV_GROUPS),
            nn.Conv1d(down_dims[0], input_dim, 1),
        )

    # -- conditioning ---------------------------------------------------------------

    def cond_embedding(self, timesteps: torch.Tensor, global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector ``g [B, cond_dim]`` that every residual block's FiLM reads.

        ``timesteps`` is a ``[B]`` tensor on the module's device (integer or
        floating); ``global_cond`` is ``[B, global_cond_dim]`` or ``None``.
        Inputs are not validated here: :meth:`forward` does that.
        """
        dtype = self.final_conv[1].weight.dtype
        # Sinusoids in float32 at least (float64 for float64 models), then
        # cast: a bf16 timestep like 999 is not even representable exactly.
        compute = torch.promote_types(dtype, torch.float32)
        pos_emb, *mlp = self.diffusion_step_encoder
        g = pos_emb(timesteps.to(compute)).to(dtype)
        for layer in mlp:
            g = layer(g)
        if global_cond is not None:
            g = torch.cat([g, global_cond], dim=-1)
        return g

    # -- forward --------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        local_cond: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, T, input_dim]`` from a noisy ``sample [B, T, input_dim]``.

        Args:
            sample: floating tensor ``[B, T, input_dim]`` with the module's
                dtype and device; ``T`` divisible by :attr:`horizon_multiple`.
            timestep: a Python number, a 0-d tensor, or a ``[B]`` (or ``[1]``)
                tensor, integer or floating; broadcast over the batch. A tensor
                on another device (e.g. a scheduler's CPU timestep) is moved.
                A Python float is used as given (the reference codebase
                truncates it to an int; integer timesteps agree exactly).
            local_cond: ``[B, T, local_cond_dim]``, required iff the model has
                ``local_cond_dim``.
            global_cond: ``[B, global_cond_dim]``, required iff the model has
                ``global_cond_dim``.

        Raises:
            TypeError: an argument has the wrong type or dtype.
            ValueError: wrong shape or device, a missing or unexpected
                conditioning input, or NaN/Inf in the conditioning.
        """
        timesteps = self._check_inputs(sample, timestep, local_cond, global_cond)
        g = self.cond_embedding(timesteps, global_cond)

        # Only the first local-conditioning block contributes; see the
        # ``local_cond_encoder`` note in ``__init__``.
        h_local = None
        if self.local_cond_encoder is not None:
            h_local = self.local_cond_encoder[0](local_cond.transpose(1, 2), g)

        x = sample.transpose(1, 2)
        skips = []
        for idx, (block1, block2, downsample) in enumerate(self.down_modules):
            x = block1(x, g)
            if idx == 0 and h_local is not None:
                x = x + h_local
            x = block2(x, g)
            skips.append(x)
            x = downsample(x)

        for block in self.mid_modules:
            x = block(x, g)

        for block1, block2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block1(x, g)
            x = block2(x, g)
            x = upsample(x)

        x = self.final_conv(x)
        return x.transpose(1, 2)

    def _check_inputs(self, sample, timestep, local_cond, global_cond) -> torch.Tensor:
        """Validate the forward arguments; return the timesteps as a ``[B]`` tensor on the sample's device."""
        dims = check_tensor("sample", sample, shape=("B", "T", self.input_dim), dtype="floating")
        B, T = dims["B"], dims["T"]
        weight = self.final_conv[1].weight
        if sample.dtype != weight.dtype:
            raise InvalidArgumentType(f"`sample` must have the module's parameter dtype {weight.dtype}, got {sample.dtype}")
        check_tensor("sample", sample, device=weight.device)
        if B == 0 or T == 0:
            raise InvalidArgument(f"`sample` must have a non-empty batch and horizon, got {format_shape(sample.shape)}")
        if T % self.horizon_multiple:
            raise InvalidArgument(
                f"`sample` horizon T={T} must be divisible by {self.horizon_multiple} "
                f"(2 ** (len(down_dims) - 1) for down_dims={list(self.down_dims)})"
            )

        for name, value, size, shape in (
            ("global_cond", global_cond, self.global_cond_dim, ("B", self.global_cond_dim)),
            ("local_cond", local_cond, self.local_cond_dim, ("B", "T", self.local_cond_dim)),
        ):
            if size is None:
                if value is not None:
                    raise InvalidArgument(f"`{name}` must be None: this model was built with {name}_dim=None")
                continue
            if value is None:
                known = f"B={B}, T={T}" if name == "local_cond" else f"B={B}"
                raise InvalidArgument(
                    f"`{name}` is required (this model was built with {name}_dim={size}): "
                    f"expected shape {format_shape(shape)} ({known})"
                )
            check_tensor(name, value, shape=shape, dims=dims, dtype=sample.dtype, device=sample.device)
            check_finite(name, value)

        return _timesteps_tensor(timestep, B, sample.device)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, local_cond_dim={self.local_cond_dim}, "
            f"global_cond_dim={self.global_cond_dim}, down_dims={list(self.down_dims)}, "
            f"cond_predict_scale={self.cond_predict_scale}"
        )


def _check_down_dims(down_dims, n_groups: int) -> tuple[int, ...]:
    if isinstance(down_dims, (str, bytes)) or not isinstance(down_dims, Iterable):
        raise InvalidArgumentType(f"`down_dims` must be a sequence of positive ints, got {down_dims!r}")
    dims = tuple(down_dims)
    if not dims:
        raise InvalidArgument("`down_dims` must contain at least one width, got an empty sequence")
    for i, d in enumerate(dims):
        check_int(f"down_dims[{i}]", d, min_value=1)
    dims = tuple(int(d) for d in dims)
    bad = [d for d in dims if d % n_groups]
    if bad:
        raise InvalidArgument(
            f"`down_dims` widths must be divisible by n_groups={n_groups}, got {list(dims)} ({bad} are not)"
        )
    if dims[0] % _FINAL_CONV_GROUPS:
        raise InvalidArgument(
            f"`down_dims[0]` must be divisible by {_FINAL_CONV_GROUPS} (the output head's GroupNorm "
            f"always has {_FINAL_CONV_GROUPS} groups), got {dims[0]}"
        )
    return dims


def _timesteps_tensor(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """``timestep`` (number, 0-d, ``[1]`` or ``[B]`` tensor) as a ``[B]`` tensor on ``device``."""
    if isinstance(timestep, torch.Tensor):
        check_tensor("timestep", timestep, dtype="real")
        if not (timestep.ndim == 0 or (timestep.ndim == 1 and timestep.shape[0] in (1, batch))):
            raise InvalidArgument(
                f"`timestep` must be a number, a 0-d tensor or have shape [B] or [1] (B={batch}), "
                f"got {format_shape(timestep.shape)}"
            )
        check_finite("timestep", timestep)
        t = timestep.to(device)
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        if not math.isfinite(timestep):
            raise InvalidArgument(f"`timestep` must be finite, got {timestep!r}")
        t = torch.tensor(timestep, device=device)
    else:
        raise InvalidArgumentType(
            f"`timestep` must be a number or a tensor, got {timestep!r} ({type(timestep).__name__})"
        )
    return t.reshape(-1).expand(batch)
