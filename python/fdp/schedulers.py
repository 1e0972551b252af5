"""DDPM and DDIM schedulers that reproduce diffusers' numbers from one coefficient table.

Every step of both schedulers, for every supported option, has the same form.
For step ``i`` in sampling order, with ``x`` the current sample, ``m`` the model
output and ``z`` the noise the step adds::

    x0   = a_x[i] * x + a_m[i] * m                        # predicted original sample
    x0c  = clamp(x0, -clip_range, clip_range)  if clip_sample else x0
    prev = c_x0[i] * x0c + c_x[i] * x + c_m[i] * m + sigma[i] * z

With ab_t = alphas_cumprod[t], ab_p the same at the previous timestep (DDPM:
the run's next timestep; DDIM: t - num_train_timesteps // num_inference_steps;
ab_p = 1 past the end, or alphas_cumprod[0] for DDIM with set_alpha_to_one=False)
and b = 1 - ab:

- ``a_x, a_m``: epsilon ``(1/sqrt(ab_t), -sqrt(b_t)/sqrt(ab_t))``, sample ``(0, 1)``,
  v_prediction ``(sqrt(ab_t), -sqrt(b_t))``.
- DDPM (Ho et al. eq. 7): ``c_x0 = sqrt(ab_p) beta_t / b_t``,
  ``c_x = sqrt(alpha_t) b_p / b_t``, ``c_m = 0``, with alpha_t = ab_t/ab_p and
  beta_t = 1 - alpha_t; ``sigma`` is the standard deviation of the added noise
  (fixed_small and fixed_small_log: ``sqrt(max(b_p/b_t beta_t, 1e-20))``,
  fixed_large: ``sqrt(beta_t)``), and 0 at t = 0.
- DDIM: the predicted noise is ``eps = p x + q m`` (epsilon ``(0, 1)``, sample
  ``(1/sqrt(b_t), -sqrt(ab_t)/sqrt(b_t))``, v ``(sqrt(b_t), sqrt(ab_t))``), and
  ``prev = sqrt(ab_p) x0c + d eps + s z`` with ``s = eta sqrt(b_p/b_t (1 - ab_t/ab_p))``
  and ``d = sqrt(1 - ab_p - s^2)``: ``c_x0 = sqrt(ab_p)``, ``c_x = d p``,
  ``c_m = d q``. With ``use_clipped_model_output`` eps is recomputed from x0c,
  ``(x - sqrt(ab_t) x0c)/sqrt(b_t)``, so ``c_x0 = sqrt(ab_p) - d sqrt(ab_t)/sqrt(b_t)``,
  ``c_x = d/sqrt(b_t)`` and ``c_m = 0``.

:meth:`step_table` builds the table once (``coef`` columns in the order of the
``COL_*`` constants); :func:`apply_step` is the readable reference of the
three lines every backend must match, and ``step()`` itself runs through it.

Precision: the per-step scalars (sqrt(ab_t), sqrt(b_t), the DDPM coefficients,
the DDIM std and direction, ...) are evaluated in float32 with the same
operations diffusers applies to its float32 ``alphas_cumprod``, then combined
into the table's columns in float64. The table therefore holds diffusers'
effective affine map to float64 accuracy: a float64 loop agrees with diffusers'
to ~1e-12, and a float32 loop differs only by the order of float32 roundings
(diffusers divides by sqrt(ab_t) where the table multiplies by its reciprocal).
Deriving every coefficient in float64 from alphas_cumprod instead is more
accurate in the abstract, but disagrees with diffusers by diffusers' own float32
coefficient rounding, which x0 amplifies by 1/sqrt(ab_t) at high noise levels:
over the same 150 random float32 loops that choice put ~270 elements outside
rtol=1e-5/atol=1e-6 of diffusers (~230 even in float64), this one 7 (0 in float64).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ._validation import (InvalidArgument, InvalidArgumentType, check_bool, check_choice, check_int, check_number)

__all__ = [
    "DDPMScheduler", "DDIMScheduler", "StepTable", "SchedulerOutput", "SchedulerConfig", "apply_step", "apply_coefficients",
    "COL_A_X", "COL_A_M", "COL_C_X0", "COL_C_X", "COL_C_M", "COL_SIGMA", "NUM_COLS",
]

# The table's column layout is the kernels' ABI: defined there, once.
from fdp_kernels.abi import COL_A_M, COL_A_X, COL_C_M, COL_C_X, COL_C_X0, COL_SIGMA, NUM_COLS  # noqa: E402

from ._state import LRU, state_mode  # noqa: E402

#: How many step tables (one per ``eta`` and ``use_clipped_model_output``) ``step`` keeps per scheduler.
STEP_CACHE_SIZE = 8

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("leading", "trailing", "linspace")
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
_UNSUPPORTED_VARIANCE_TYPES = {
    "learned": "the model would have to predict the variance",
    "learned_range": "the model would have to predict the variance",
    "fixed_large_log": "diffusers takes the square root of a negative log-variance there (NaN noise)",
}


# ----------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, eq=False)
class StepTable:
    """Per-step coefficients of a whole sampling run, in sampling order.

    ``coef`` is ``[T, NUM_COLS]`` float64 as built by ``step_table`` (``to`` casts it
    for kernels), columns indexed by ``COL_A_X, COL_A_M, COL_C_X0, COL_C_X, COL_C_M,
    COL_SIGMA``. ``adds_noise[i]`` says whether step ``i`` draws noise (DDPM: t > 0;
    DDIM: eta > 0); where it is False, ``sigma`` is 0 and the step's noise is ignored.
    """

    timesteps: torch.Tensor
    coef: torch.Tensor
    adds_noise: torch.Tensor
    clip_sample: bool
    clip_range: float
    # Host copies read once here, so that apply_step never reads a device tensor per step.
    _rows: tuple = field(init=False, repr=False, compare=False)
    _adds: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = self.timesteps.shape[0] if self.timesteps.dim() == 1 else -1
        if n < 0 or tuple(self.coef.shape) != (n, NUM_COLS) or tuple(self.adds_noise.shape) != (n,):
            raise InvalidArgument(
                f"StepTable needs timesteps [T], coef [T, {NUM_COLS}] and adds_noise [T]; got "
                f"{tuple(self.timesteps.shape)}, {tuple(self.coef.shape)} and {tuple(self.adds_noise.shape)}")
        object.__setattr__(self, "_rows", tuple(tuple(r) for r in self.coef.tolist()))
        object.__setattr__(self, "_adds", tuple(bool(a) for a in self.adds_noise.tolist()))

    def __len__(self) -> int:
        return len(self._adds)

    def to(self, device=None, dtype: torch.dtype = torch.float32) -> "StepTable":
        """All three tensors on ``device``, ``coef`` cast to ``dtype`` (what kernels read).

        Reads the coefficients back to the host once, here, for :func:`apply_step`."""
        return StepTable(self.timesteps.to(device), self.coef.to(device=device, dtype=dtype),
                         self.adds_noise.to(device), self.clip_sample, self.clip_range)


def apply_step(table: StepTable, i: int, x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None = None,
               *, return_x0: bool = False):
    """Step ``i`` of ``table``: the reference every backend must match.

    Computes in ``x``'s dtype on ``x``'s device (``m`` and ``noise`` are cast to
    it). ``noise`` is ignored on steps that add none. Returns ``prev``, or
    ``(prev, x0c)`` with ``return_x0=True``.
    """
    m = m.to(x.dtype)
    noise = noise.to(x.dtype) if noise is not None and table._adds[i] else None
    prev, x0c = apply_coefficients(table._rows[i], x, m, noise, table.clip_sample, table.clip_range)
    return (prev, x0c) if return_x0 else prev


def apply_coefficients(coef, x, m, noise, clip_sample: bool, clip_range: float):
    """The three lines of the table, for one row ``coef`` (6 numbers, or a ``[6]`` tensor).

    Returns ``(prev, x0c)``. A tensor row keeps compiled or captured code from
    specialising on the step's values; ``noise=None`` adds none.
    """
    a_x, a_m, c_x0, c_x, c_m, sigma = (coef[j] for j in range(NUM_COLS))
    x0 = a_x * x + a_m * m
    x0c = x0.clamp(-clip_range, clip_range) if clip_sample else x0
    prev = c_x0 * x0c + c_x * x + c_m * m
    if noise is not None:
        prev = prev + sigma * noise
    return prev, x0c


# ----------------------------------------------------------------------------------------------------------------
# Betas and timesteps (diffusers' float32 construction, so alphas_cumprod is bit-identical)


def _alpha_bar_betas(num_train_timesteps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    # Betas that discretize a continuous cumulative-alpha curve; evaluated in float64
    # and rounded once, as diffusers does.
    betas = []
    for i in range(num_train_timesteps):
        lo, hi = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(hi) / alpha_bar(lo), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal's squared-cosine schedule with offset s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last one is
    # exactly 0 and the first is unchanged, then recover betas. Same float32 operation order
    # as diffusers so the resulting alphas_cumprod are identical.
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    ab = root ** 2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _make_betas(cfg: dict, schedules: tuple[str, ...], owner: str) -> torch.Tensor:
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).to(torch.float32)
        if betas.dim() != 1 or betas.shape[0] != n:
            raise InvalidArgument(f"`trained_betas` must be a 1-D sequence of num_train_timesteps={n} betas, "
                                  f"got shape {tuple(betas.shape)}")
        return betas
    sched, b0, b1 = cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]
    if sched == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float32)
    if sched == "scaled_linear":
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    if sched == "squaredcos_cap_v2":
        return _alpha_bar_betas(n, _cosine_alpha_bar)
    if sched == "laplace" and sched in schedules:
        return _alpha_bar_betas(n, _laplace_alpha_bar)
    if sched == "sigmoid" and sched in schedules:
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32)) * (b1 - b0) + b0
    raise InvalidArgument(f"`beta_schedule` must be one of {list(schedules)} for {owner} (or pass `trained_betas`), "
                          f"got {sched!r}")


def _spaced_timesteps(num_train: int, n: int, spacing: str, offset: int) -> list[int]:
    """diffusers' timesteps for ``n`` inference steps, largest first, as python ints.

    Pure python reproducing numpy's float evaluation (``linspace``: i * step with the
    endpoint set exactly; ``arange``: start + i * (second - start)); Python's ``round``
    rounds half to even like numpy's. For "trailing", diffusers' ``np.arange`` sometimes
    yields one extra element (timestep -1) through float rounding of the length; only
    the first ``n`` are kept, which are identical to diffusers'.
    """
    if spacing == "linspace":
        if n == 1:
            vals = [0.0]
        else:
            step = (num_train - 1) / (n - 1)
            vals = [i * step for i in range(n - 1)] + [float(num_train - 1)]
        return [int(round(v)) for v in reversed(vals)]
    if spacing == "leading":
        ratio = num_train // n
        return [k * ratio + offset for k in reversed(range(n))]
    # trailing
    start = float(num_train)
    second = start + (-(num_train / n))
    delta = second - start
    vals = [start, second] + [start + i * delta for i in range(2, n)]
    return [int(round(v)) - 1 for v in vals[:n]]


# ----------------------------------------------------------------------------------------------------------------
# Coefficients. ``ac`` is the float32 alphas_cumprod; every elementwise operation below on
# ``ac``-derived tensors is the one diffusers applies to its 0-d float32 tensors (so the
# values are bit-identical to diffusers' scalars); only the final combination into table
# columns is float64.


def _x0_coefficients(ab_t: torch.Tensor, b_t: torch.Tensor, prediction_type: str):
    s_a, s_b = (ab_t ** 0.5).double(), (b_t ** 0.5).double()
    if prediction_type == "epsilon":
        return 1.0 / s_a, -s_b / s_a
    if prediction_type == "sample":
        return torch.zeros_like(s_a), torch.ones_like(s_a)
    return s_a, -s_b


def _ddpm_coefficients(ac, ts, prevs, prediction_type, variance_type):
    t, p = torch.tensor(ts, dtype=torch.long), torch.tensor(prevs, dtype=torch.long)
    ab_t = ac[t]
    ab_p = torch.where(p >= 0, ac[p.clamp(min=0)], torch.ones((), dtype=ac.dtype))
    b_t, b_p = 1 - ab_t, 1 - ab_p
    alpha_t = ab_t / ab_p
    beta_t = 1 - alpha_t
    c_x0 = ab_p ** 0.5 * beta_t / b_t
    c_x = alpha_t ** 0.5 * b_p / b_t
    var = torch.clamp((1 - ab_p) / (1 - ab_t) * beta_t, min=1e-20)
    if variance_type == "fixed_small":
        sigma = var ** 0.5
    elif variance_type == "fixed_small_log":
        sigma = torch.exp(0.5 * torch.log(var))
    else:  # fixed_large
        sigma = beta_t ** 0.5
    adds = t > 0
    sigma = torch.where(adds, sigma, torch.zeros_like(sigma))
    a_x, a_m = _x0_coefficients(ab_t, b_t, prediction_type)
    coef = torch.stack([a_x, a_m, c_x0.double(), c_x.double(), torch.zeros_like(a_x), sigma.double()], dim=1)
    return coef, adds


def _ddim_coefficients(ac, final_ac, ts, prevs, prediction_type, eta, use_clipped):
    t, p = torch.tensor(ts, dtype=torch.long), torch.tensor(prevs, dtype=torch.long)
    ab_t = ac[t]
    ab_p = torch.where(p >= 0, ac[p.clamp(min=0)], final_ac)
    b_t, b_p = 1 - ab_t, 1 - ab_p
    var = (b_p / b_t) * (1 - ab_t / ab_p)
    std = eta * var ** 0.5
    # Exactly >= 0 for eta <= 1 (the only etas accepted); float32 rounding can push it below 0
    # where it is 0 (eta = 1 at a zero-SNR timestep), which gives diffusers a NaN.
    radicand = (1 - ab_p - std ** 2).clamp(min=0)
    d = (radicand ** 0.5).double()
    s_ap = (ab_p ** 0.5).double()
    s_a, s_b = (ab_t ** 0.5).double(), (b_t ** 0.5).double()
    a_x, a_m = _x0_coefficients(ab_t, b_t, prediction_type)
    zero = torch.zeros_like(s_a)
    if use_clipped:
        c_x0, c_x, c_m = s_ap - d * s_a / s_b, d / s_b, zero
    else:
        if prediction_type == "epsilon":
            pe_x, pe_m = zero, torch.ones_like(s_a)
        elif prediction_type == "sample":
            pe_x, pe_m = 1.0 / s_b, -s_a / s_b
        else:
            pe_x, pe_m = s_b, s_a
        c_x0, c_x, c_m = s_ap, d * pe_x, d * pe_m
    adds = torch.full((len(ts),), eta > 0, dtype=torch.bool)
    sigma = std.double() if eta > 0 else zero
    return torch.stack([a_x, a_m, c_x0, c_x, c_m, sigma], dim=1), adds


# ----------------------------------------------------------------------------------------------------------------
# Config and output


class SchedulerConfig(Mapping):
    """Read-only mapping of a scheduler's constructor arguments (also readable as attributes)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("scheduler config is read-only; build a new scheduler with from_config(config, **changes)")

    def __reduce__(self):
        return (SchedulerConfig, (self._data,))

    def __repr__(self):
        return f"SchedulerConfig({self._data!r})"


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x_{t-1}) and the clipped ``pred_original_sample``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, key):
        # diffusers code indexes outputs by position or by name.
        return self.to_tuple()[key] if isinstance(key, int) else getattr(self, key)


# ----------------------------------------------------------------------------------------------------------------
# Schedulers


def _timestep_int(timestep) -> int:
    # Python ints and CPU tensors cost nothing here; a device tensor forces a sync, so
    # loops should iterate over a CPU ``timesteps`` (the default) or over ints.
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex():
            raise InvalidArgument(f"`timestep` must be a single integer, got a tensor of shape {tuple(timestep.shape)} "
                                  f"and dtype {timestep.dtype}")
        return int(timestep.reshape(()).item())
    if isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
        return int(timestep)
    if isinstance(timestep, float) and timestep.is_integer():
        return int(timestep)
    raise InvalidArgument(f"`timestep` must be an integer timestep, got {timestep!r}")


def _draw_noise(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' ``randn_tensor``: drawn on a CPU generator's device (then moved), one
    draw per batch row for a list of generators."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    gen_type = gens[0].device.type
    rand_device = device
    if gen_type != device.type:
        if gen_type != "cpu":
            raise InvalidArgument(f"cannot draw noise for a {device.type} tensor from a {gen_type} generator")
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise InvalidArgument(f"`generator` is a list of {len(gens)} generators but the batch has {shape[0]} rows")
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, device=rand_device, dtype=dtype) for g in gens]).to(device)


class _TableScheduler:
    """Shared machinery: config, betas, timesteps, forward process and the table-driven step."""

    order = 1
    init_noise_sigma = 1.0
    _beta_schedules: tuple[str, ...] = ()

    def _setup(self, cfg: dict):
        # Every field checked for type and range before any table is built: a config read from a file
        # ("clip_sample": "false") is refused with the field's name, never coerced.
        name = type(self).__name__
        cfg["num_train_timesteps"] = n = check_int("num_train_timesteps", cfg["num_train_timesteps"], min_value=1)
        check_choice("prediction_type", cfg["prediction_type"], _PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg["timestep_spacing"], _SPACINGS)
        for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one"):
            if flag in cfg:
                cfg[flag] = check_bool(flag, cfg[flag])
        if cfg["thresholding"]:
            raise InvalidArgument(f"`thresholding=True` (dynamic thresholding) is not supported by fdp.{name}: it is "
                                  "not an affine step; use clip_sample / clip_sample_range instead")
        cfg["steps_offset"] = check_int("steps_offset", cfg["steps_offset"], min_value=0)
        cfg["clip_sample_range"] = check_number("clip_sample_range", cfg["clip_sample_range"], low=0)
        # Only read with thresholding (refused above); still numbers, as in diffusers' configs.
        cfg["dynamic_thresholding_ratio"] = check_number("dynamic_thresholding_ratio",
                                                         cfg["dynamic_thresholding_ratio"])
        cfg["sample_max_value"] = check_number("sample_max_value", cfg["sample_max_value"])
        # A beta of 0 makes 1 - alphas_cumprod 0 at t = 0 (0/0 in the first coefficients); 1 or more, or a
        # negative one, makes alphas_cumprod 0 or negative (NaN square roots).
        cfg["beta_start"] = check_number("beta_start", cfg["beta_start"], low=0, high=1, low_open=True, high_open=True)
        cfg["beta_end"] = check_number("beta_end", cfg["beta_end"], low=0, high=1, low_open=True, high_open=True)
        if cfg["beta_start"] > cfg["beta_end"]:
            raise InvalidArgument(f"`beta_start` ({cfg['beta_start']:g}) must be <= `beta_end` ({cfg['beta_end']:g})")
        if not isinstance(cfg["beta_schedule"], str):
            raise InvalidArgumentType(f"`beta_schedule` must be a str, got {cfg['beta_schedule']!r}")
        if cfg["trained_betas"] is not None:
            tb = cfg["trained_betas"]
            tb = tb.tolist() if hasattr(tb, "tolist") else tb
            if isinstance(tb, (str, bytes)) or not isinstance(tb, (list, tuple)):
                raise InvalidArgumentType(f"`trained_betas` must be None or a sequence of numbers, got {tb!r}")
            # A last beta of exactly 1 is a zero-SNR schedule: kept, its epsilon step refused where it runs.
            cfg["trained_betas"] = tuple(check_number(f"trained_betas[{i}]", b, low=0, high=1, low_open=True)
                                         for i, b in enumerate(tb))

        betas = _make_betas(cfg, self._beta_schedules, f"fdp.{name}")
        if cfg["rescale_betas_zero_snr"]:
            betas = _zero_terminal_snr(betas)
        self._config = SchedulerConfig(cfg)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        ac = self.alphas_cumprod
        # alphas_cumprod underflowing to 0 in float32 before the last timestep (NaN after the zero-SNR rescale):
        # from there on no signal is left and each step divides 0 by 0 (NaN actions, in diffusers too). A single
        # 0 at the end (zero terminal SNR) is fine.
        lost = ~torch.isfinite(ac) | (ac <= 0)
        lost[-1] = not bool(torch.isfinite(ac[-1]))
        if bool(lost.any()):
            i = int(lost.nonzero()[0])
            what = ("`trained_betas`" if cfg["trained_betas"] is not None
                    else f"`beta_end`={cfg['beta_end']:g} with beta_schedule={cfg['beta_schedule']!r}")
            raise InvalidArgument(f"{what} over num_train_timesteps={n} drives alphas_cumprod to 0 (float32) from "
                                  f"timestep {i} on, where the steps divide 0 by 0; use smaller betas or fewer "
                                  "training timesteps")
        if bool((ac >= 1).any()):
            # A beta below float32's resolution near 1 (~6e-8): 1 - beta rounds to 1, and every step at that
            # timestep divides by 1 - alphas_cumprod = 0 (NaN actions, in diffusers too).
            i = int((ac >= 1).nonzero()[0])
            what = f"`trained_betas[{i}]`" if cfg["trained_betas"] is not None else "`beta_start`"
            raise InvalidArgument(f"{what} is too small for float32: 1 - beta rounds to 1 at timestep {i}, where "
                                  f"the step would divide by 1 - alphas_cumprod = 0; use betas >= {2.0 ** -23:.1e}")
        self._ac_cache: dict = {}  # one per (device, dtype): as many as the devices and dtypes in use
        self.num_inference_steps: int | None = None
        self._ts: list[int] = list(range(n - 1, -1, -1))
        self.timesteps = torch.tensor(self._ts, dtype=torch.long)
        # step()'s tables, keyed by (eta, use_clipped_model_output): an LRU, so that a caller passing a new
        # eta at every call keeps at most STEP_CACHE_SIZE tables.
        self._step_cache: LRU = LRU(STEP_CACHE_SIZE)

    # -- config ------------------------------------------------------------------------------------------------

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from a config mapping (ours or diffusers'; a scheduler with ``.config`` works
        too). Keys starting with ``_`` and keys this class does not take are ignored;
        ``kwargs`` override the config."""
        if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise InvalidArgumentType(f"`config` must be a mapping (a scheduler's .config), got {type(config).__name__}")
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        args = {k: v for k, v in config.items() if not k.startswith("_") and k in accepted}
        args.update(kwargs)
        return cls(**args)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config.items())})"

    # -- timesteps ---------------------------------------------------------------------------------------------

    def _timesteps_for(self, num_inference_steps) -> list[int]:
        cfg = self._config
        n_train = cfg["num_train_timesteps"]
        n = num_inference_steps
        n = check_int("num_inference_steps", n, min_value=1)
        if n > n_train:
            raise InvalidArgument(f"`num_inference_steps` ({n}) cannot be larger than num_train_timesteps ({n_train})")
        ts = _spaced_timesteps(n_train, int(n), cfg["timestep_spacing"], cfg["steps_offset"])
        if ts[0] >= n_train or ts[-1] < 0:
            raise InvalidArgument(f"`steps_offset`={cfg['steps_offset']} with {n} '{cfg['timestep_spacing']}' steps gives "
                                  f"timesteps {ts[0]}..{ts[-1]}, outside [0, {n_train - 1}]")
        return ts

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the inference timesteps (diffusers' values). ``timesteps`` stays a CPU
        LongTensor unless ``device`` is given; stepping with device timesteps syncs."""
        ts = self._timesteps_for(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._ts = ts
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._step_cache.clear()

    # -- forward process ---------------------------------------------------------------------------------------

    def _sqrt_ab(self, like: torch.Tensor, timesteps):
        key = (like.device, like.dtype)
        ac = self._ac_cache.get(key)
        if ac is None:
            with state_mode():  # cached: usable with grad after a call in inference_mode
                ac = self._ac_cache[key] = self.alphas_cumprod.to(device=like.device).to(dtype=like.dtype)
        ab = ac[torch.as_tensor(timesteps).to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (ab ** 0.5).reshape(shape), ((1 - ab) ** 0.5).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process q(x_t | x_0): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
        s_a, s_b = self._sqrt_ab(original_samples, timesteps)
        return s_a * original_samples + s_b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target: ``sqrt(ab_t) noise - sqrt(1 - ab_t) sample``."""
        s_a, s_b = self._sqrt_ab(sample, timesteps)
        return s_a * noise - s_b * sample

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # -- the table ---------------------------------------------------------------------------------------------

    def _prev_timesteps(self, ts: list[int], n: int | None) -> list[int]:
        raise NotImplementedError

    def _coefficients(self, ts, prevs, eta, use_clipped):
        raise NotImplementedError

    def _check_step_options(self, eta, use_clipped):
        return float(eta), bool(use_clipped)

    def _build_table(self, ts, n, eta, use_clipped) -> StepTable:
        coef, adds = self._coefficients(ts, self._prev_timesteps(ts, n), eta, use_clipped)
        if self._config["prediction_type"] == "epsilon" and not bool(torch.isfinite(coef[:, COL_A_X]).all()):
            raise InvalidArgument("`prediction_type`='epsilon' is undefined where alphas_cumprod is 0 (the last training "
                                  "timestep with rescale_betas_zero_snr=True); use v_prediction or avoid that timestep")
        return StepTable(torch.tensor(ts, dtype=torch.long), coef, adds,
                         self._config["clip_sample"], self._config["clip_sample_range"])

    def step_table(self, num_inference_steps: int | None = None, eta: float = 0.0,
                   use_clipped_model_output: bool = False) -> StepTable:
        """The whole run's coefficients (float64, CPU), for ``num_inference_steps`` (None: the
        ones of ``set_timesteps``) without changing the scheduler's state."""
        eta, use_clipped = self._check_step_options(eta, use_clipped_model_output)
        if num_inference_steps is None:
            ts, n = self._default_run()
        else:
            ts, n = self._timesteps_for(num_inference_steps), int(num_inference_steps)
        return self._build_table(ts, n, eta, use_clipped)

    def _default_run(self):
        return self._ts, self.num_inference_steps

    def _cached_table(self, eta, use_clipped):
        key = (eta, use_clipped)
        hit = self._step_cache.get(key)
        if hit is None:
            ts, n = self._default_run()
            table = self._build_table(ts, n, eta, use_clipped)
            index = {}
            for i, t in enumerate(ts):
                index.setdefault(t, i)
            hit = self._step_cache.put(key, (table, index))
        return hit

    def _step(self, model_output, timestep, sample, eta, use_clipped, generator, noise, return_dict):
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise InvalidArgumentType("`model_output` and `sample` must be tensors")
        if model_output.shape != sample.shape:
            raise InvalidArgument(f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, "
                                  f"got {tuple(model_output.shape)}")
        if noise is not None:
            if generator is not None:
                raise InvalidArgument("pass either `generator` or `noise`, not both")
            if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
                raise InvalidArgument(f"`noise` must be a tensor of the shape of `sample` {tuple(sample.shape)}, "
                                      f"got {getattr(noise, 'shape', type(noise).__name__)}")
        eta, use_clipped = self._check_step_options(eta, use_clipped)
        t = _timestep_int(timestep)
        table, index = self._cached_table(eta, use_clipped)
        i = index.get(t)
        if i is None:
            table, i = self._table_off_schedule(t, eta, use_clipped), 0
        if table._adds[i] and noise is None:
            # As diffusers: the model output's shape, device and dtype.
            noise = _draw_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        prev, x0 = apply_step(table, i, sample, model_output, noise, return_x0=True)
        out = SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
        return out if return_dict else out.to_tuple()

    def _table_off_schedule(self, t: int, eta, use_clipped) -> StepTable:
        raise InvalidArgument(f"`timestep` {t} is not one of this scheduler's timesteps; call set_timesteps first "
                              f"or step with a value from `timesteps`")


class DDPMScheduler(_TableScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020), numerically diffusers'
    ``DDPMScheduler`` (same constructor arguments and defaults).

    Not supported (ValueError): ``variance_type`` learned / learned_range / fixed_large_log
    and ``thresholding=True``. ``dynamic_thresholding_ratio`` and ``sample_max_value`` only
    matter with thresholding and are accepted for config compatibility.
    """

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if isinstance(variance_type, str) and variance_type in _UNSUPPORTED_VARIANCE_TYPES:
            raise InvalidArgument(f"`variance_type`={variance_type!r} is not supported by fdp.DDPMScheduler "
                                  f"({_UNSUPPORTED_VARIANCE_TYPES[variance_type]}); use one of {list(_VARIANCE_TYPES)}")
        check_choice("variance_type", variance_type, _VARIANCE_TYPES)
        cfg = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                   beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
                   clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
                   dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
                   sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                   rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._setup(cfg)
        self.variance_type = variance_type

    def _check_step_options(self, eta, use_clipped):
        if eta != 0 or use_clipped:
            raise InvalidArgument("`eta` and `use_clipped_model_output` are DDIM options; DDPMScheduler takes neither")
        return 0.0, False

    def _prev_timesteps(self, ts, n):
        # The next timestep of the run; -1 (alphas_cumprod 1) after the last.
        return ts[1:] + [-1]

    def _coefficients(self, ts, prevs, eta, use_clipped):
        cfg = self._config
        return _ddpm_coefficients(self.alphas_cumprod, ts, prevs, cfg["prediction_type"], cfg["variance_type"])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, noise: torch.Tensor | None = None):
        """One reverse step x_t -> x_{t-1}. Noise (steps with t > 0) is ``noise`` if given,
        else drawn as diffusers draws it from ``generator``."""
        return self._step(model_output, timestep, sample, 0.0, False, generator, noise, return_dict)


class DDIMScheduler(_TableScheduler):
    """Denoising diffusion implicit models (Song et al. 2021), numerically diffusers'
    ``DDIMScheduler`` (same constructor arguments and defaults).

    As in diffusers, the previous timestep is ``t - num_train_timesteps // num_inference_steps``
    whatever the spacing. ``thresholding=True`` is not supported (ValueError), nor is ``eta``
    outside [0, 1] (diffusers' steps can give NaN there).
    """

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        cfg = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                   beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
                   set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                   prediction_type=prediction_type, thresholding=thresholding,
                   dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
                   sample_max_value=sample_max_value, timestep_spacing=timestep_spacing,
                   rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._setup(cfg)
        # alphas_cumprod "before" the first training step: 1, or that of step 0.
        self.final_alpha_cumprod = torch.tensor(1.0) if self._config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _check_step_options(self, eta, use_clipped):
        # Past 1, std^2 can exceed 1 - ab_p: d = sqrt(1 - ab_p - std^2) of a negative number, and
        # NaN actions (diffusers computes them silently; refused here, as outside DDIM's definition).
        return (check_number("eta", eta, low=0, high=1),
                check_bool("use_clipped_model_output", use_clipped))

    def _default_run(self):
        if self.num_inference_steps is None:
            raise InvalidArgument("DDIMScheduler needs num_inference_steps: call set_timesteps(n) first "
                                  "or pass num_inference_steps")
        return self._ts, self.num_inference_steps

    def _prev_timesteps(self, ts, n):
        gap = self._config["num_train_timesteps"] // n
        return [t - gap for t in ts]

    def _coefficients(self, ts, prevs, eta, use_clipped):
        return _ddim_coefficients(self.alphas_cumprod, self.final_alpha_cumprod, ts, prevs,
                                  self._config["prediction_type"], eta, use_clipped)

    def _table_off_schedule(self, t, eta, use_clipped):
        # DDIM's update depends only on t and the step gap, so any training timestep works.
        if not 0 <= t < self._config["num_train_timesteps"]:
            raise InvalidArgument(f"`timestep` must be in [0, {self._config['num_train_timesteps'] - 1}], got {t}")
        return self._build_table([t], self.num_inference_steps, eta, use_clipped)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, noise: torch.Tensor | None = None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        """One reverse step. With ``eta > 0`` every step adds noise: ``noise`` (diffusers'
        ``variance_noise``, accepted under either name) if given, else drawn as diffusers
        draws it from ``generator``. The run's coefficients are cached per ``(eta,
        use_clipped_model_output)``, the :data:`STEP_CACHE_SIZE` most recently used."""
        if variance_noise is not None:
            if noise is not None:
                raise InvalidArgument("pass `noise` or its alias `variance_noise`, not both")
            noise = variance_noise
        return self._step(model_output, timestep, sample, eta, use_clipped_model_output, generator, noise,
                          return_dict)
