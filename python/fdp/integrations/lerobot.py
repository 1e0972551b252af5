"""LeRobot's diffusion policy on fdp: load a saved policy folder, or accelerate a live policy.

LeRobot's ``DiffusionConditionalUnet1d`` is :class:`fdp.ConditionalUnet1D`
under other parameter names: without the ``diffusion.unet.`` prefix (and
``torch.compile``'s ``_orig_mod.``), a residual block's ``conv1``/``conv2``
are fdp's ``blocks.0``/``blocks.1``, and the bare down/up-sampling conv
``(down|up)_modules.i.2`` is fdp's ``(down|up)_modules.i.2.conv``. LeRobot
has no local conditioning; ``global_cond`` is the output of its
``_prepare_global_conditioning`` (``global_cond_dim`` is read from the weights).

* :func:`load_pretrained` reads a folder written by ``save_pretrained``
  (``config.json`` + ``model.safetensors``) with ``json`` and ``safetensors``
  only (``pip install '.[lerobot]'`` in fdp's clone; LeRobot itself is not imported).
* :func:`accelerate` swaps fdp's sampler into a ``DiffusionPolicy`` instance.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .._validation import (InvalidArgument, InvalidArgumentType, InvalidFile, MissingFile, about_file, check_choice,
                           check_device_usable, check_float_dtype, check_int, check_optional_int, read_json_object)
from ..backends import get_backend
from ..sampler import Sampler
from ..schedulers import DDIMScheduler, DDPMScheduler
from ._common import Patch, fdp_scheduler, group_norm_groups, unet_from_tensors

__all__ = ["load_pretrained", "accelerate", "to_fdp_name", "from_fdp_name"]

PREFIX = "diffusion.unet."
_SCHEDULERS = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler}
# The config fields LeRobot passes to its scheduler (DiffusionModel.__init__).
_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                     "clip_sample_range", "prediction_type")
_SAMPLER_CONV = re.compile(r"^(down|up)_modules\.(\d+)\.2\.(weight|bias)$")
_FDP_SAMPLER_CONV = re.compile(r"^(down|up)_modules\.(\d+)\.2\.conv\.(weight|bias)$")


def to_fdp_name(name: str) -> str:
    """A LeRobot U-Net parameter name (relative to the U-Net) as fdp's."""
    name = name.replace("_orig_mod.", "")
    name = _SAMPLER_CONV.sub(r"\1_modules.\2.2.conv.\3", name)
    return name.replace(".conv1.", ".blocks.0.").replace(".conv2.", ".blocks.1.")


def from_fdp_name(name: str) -> str:
    """The inverse of :func:`to_fdp_name` (for messages)."""
    name = _FDP_SAMPLER_CONV.sub(r"\1_modules.\2.2.\3", name)
    return name.replace(".blocks.0.", ".conv1.").replace(".blocks.1.", ".conv2.")


def load_pretrained(path, *, backend: str = "auto", num_inference_steps: int | None = None,
                    device=None, dtype: torch.dtype | None = None) -> Sampler:
    """A :class:`fdp.Sampler` for a LeRobot diffusion policy folder (``config.json`` + ``model.safetensors``).

    ``sampler(global_cond, x_T=noise, step_noise=...)`` returns what LeRobot's
    ``DiffusionModel.conditional_sample(B, global_cond, noise=noise)`` returns:
    the full horizon ``[B, horizon, action_dim]`` (``generate_actions`` then
    keeps ``[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``).
    ``step_noise[i]`` is the draw of the i-th step that adds noise (DDPM: every
    step but the last). The scheduler is the config's; ``num_inference_steps``
    overrides the config's (whose null means the training steps).

    Args:
        path: the folder (download a Hub repo first, e.g. with
            ``huggingface_hub.snapshot_download``).
        backend: as :class:`fdp.Sampler` (``auto``: the fastest backend that matches ``torch`` here;
            on a CPU, timed among ``torch`` and ``onnxruntime`` when it is installed).
        device: where the U-Net goes (default: CUDA if available, else the CPU).
        dtype: the U-Net's dtype (default: as saved).
    """
    # Every argument and both files are checked before anything is built.
    num_inference_steps = check_optional_int("num_inference_steps", num_inference_steps, min_value=1)
    dtype = check_float_dtype("dtype", dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device_usable("device", device)
    _check_backend(backend)
    if not isinstance(path, (str, Path)):
        raise InvalidArgumentType(f"`path` must be a str or a pathlib.Path (a LeRobot policy folder), got "
                                  f"{type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise MissingFile(f"`path` must be a LeRobot policy folder (config.json + model.safetensors), got "
                          f"{str(path)!r}, which is not a folder; fetch a Hub repo first, e.g. with "
                          "huggingface_hub.snapshot_download")
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise MissingFile(f"{folder} has no {name}: a LeRobot policy folder (save_pretrained) holds "
                              "config.json and model.safetensors")
    config_file = folder / "config.json"
    cfg = read_json_object(config_file, "a LeRobot policy config (a JSON object)")
    with about_file(config_file):
        horizon, n_groups, scheduler, config_steps = _read_config(cfg)

    tensors = _read_unet_tensors(folder / "model.safetensors")
    unet = unet_from_tensors(tensors, n_groups, source_name=lambda k: PREFIX + from_fdp_name(k),
                             what=str(folder / "model.safetensors"))
    n_train = scheduler.config["num_train_timesteps"]
    with about_file(config_file):
        if horizon % unet.horizon_multiple:
            raise InvalidFile(f"`horizon` ({horizon}) must be divisible by {unet.horizon_multiple}: the U-Net in "
                              f"model.safetensors halves the horizon {len(unet.down_modules) - 1} time(s)")
        if config_steps is not None and config_steps > n_train:
            raise InvalidFile(f"`num_inference_steps` ({config_steps}) cannot be larger than `num_train_timesteps` "
                              f"({n_train})")
    if num_inference_steps is not None and num_inference_steps > n_train:
        raise InvalidArgument(f"`num_inference_steps` ({num_inference_steps}) cannot be larger than the policy's "
                              f"num_train_timesteps ({n_train}, in {config_file})")
    unet = unet.to(device=device, dtype=dtype)
    steps = next(n for n in (num_inference_steps, config_steps, n_train) if n is not None)
    return Sampler.for_unet(unet, scheduler, horizon, unet.input_dim, num_inference_steps=steps,
                            backend=backend)


def _check_backend(backend) -> None:
    if backend != "auto":
        get_backend(backend)  # names the known backends


def _read_config(cfg: dict):
    """``(horizon, n_groups, scheduler, num_inference_steps or None)`` from a LeRobot diffusion config, every
    field fdp reads checked for type and range (a message names the field; the caller adds the file)."""
    kind = cfg.get("type")
    if kind != "diffusion":
        what = "has no \"type\" field" if kind is None else f"describes a {kind!r} policy"
        raise InvalidFile(f"the config {what}; load_pretrained reads LeRobot diffusion policies "
                          "(\"type\": \"diffusion\", as save_pretrained writes)")
    missing = [k for k in ("horizon", "n_groups", "noise_scheduler_type", *_SCHEDULER_FIELDS) if k not in cfg]
    if missing:
        raise InvalidFile(f"the config lacks the diffusion policy field {missing[0]!r}")
    horizon = check_int("horizon", cfg["horizon"], min_value=1)
    n_groups = check_int("n_groups", cfg["n_groups"], min_value=1)
    kind = check_choice("noise_scheduler_type", cfg["noise_scheduler_type"], list(_SCHEDULERS))
    # The scheduler's constructor checks the type and range of each field it is given, by name.
    scheduler = _SCHEDULERS[kind](**{k: cfg[k] for k in _SCHEDULER_FIELDS})
    steps = check_optional_int("num_inference_steps", cfg.get("num_inference_steps"), min_value=1)
    return horizon, n_groups, scheduler, steps


def _read_unet_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise ImportError("fdp.integrations.lerobot.load_pretrained reads model.safetensors with the `safetensors` "
                          "package: pip install '.[lerobot]' in fdp's clone") from exc
    tensors, names = {}, {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                plain = key.replace("_orig_mod.", "")
                if plain.startswith(PREFIX):
                    fdp_name = to_fdp_name(plain[len(PREFIX):])
                    tensors[fdp_name], names[fdp_name] = f.get_tensor(key), key
    except (SafetensorError, OSError) as exc:
        raise InvalidFile(f"{file} cannot be read as a safetensors file (truncated or another format?): "
                          f"{exc}") from None
    if not tensors:
        raise InvalidFile(f"{file} holds no {PREFIX}* tensors: not a LeRobot diffusion policy")
    # Weights are floating, of one dtype and finite: an integer tensor would fail deep inside a convolution,
    # a mix of dtypes inside a kernel, a NaN would make every action NaN.
    first = next(iter(tensors))
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise InvalidFile(f"{file}: the tensor {names[key]!r} has dtype {t.dtype}; U-Net weights must be "
                              "floating point")
        if t.dtype != tensors[first].dtype:
            raise InvalidFile(f"{file}: the tensor {names[key]!r} has dtype {t.dtype} but {names[first]!r} has "
                              f"{tensors[first].dtype}; all U-Net weights must have one dtype")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidFile(f"{file}: the tensor {names[key]!r} holds {bad} NaN or Inf values of {t.numel()}; "
                              "its actions would be NaN")
    return tensors


def accelerate(policy, *, backend: str = "auto", num_inference_steps: int | None = None) -> Patch:
    """Make ``policy`` (a LeRobot ``DiffusionPolicy``) sample with fdp; returns the handle.

    Replaces this instance's ``policy.diffusion.conditional_sample``; the
    handle's ``restore()`` (or leaving it as a context manager) puts LeRobot's
    back. Noise is drawn as LeRobot draws it: ``noise`` if given, else from
    ``generator``, else from the global RNG, then one draw per noise-adding
    step, so with the same seed the actions are LeRobot's to float rounding.
    The U-Net's parameters are shared, not copied; the sampler is rebuilt
    when they are replaced or updated in place (training goes on) and when
    ``policy.diffusion.num_inference_steps`` changes (``num_inference_steps``
    here overrides it). ``handle.sampler`` is the :class:`fdp.Sampler` in use.
    """
    _check_backend(backend)
    num_inference_steps = check_optional_int("num_inference_steps", num_inference_steps, min_value=1)
    model = getattr(policy, "diffusion", None)
    for attr in ("conditional_sample", "unet", "noise_scheduler", "config"):
        if not hasattr(model, attr):
            raise InvalidArgumentType(f"`policy` must be a LeRobot DiffusionPolicy (policy.diffusion.{attr} is "
                                      f"missing), got {type(policy).__name__}")

    def network():
        return getattr(model.unet, "_orig_mod", model.unet)

    def steps():
        return model.num_inference_steps if num_inference_steps is None else num_inference_steps

    def build():
        src = network()
        tensors = {to_fdp_name(k): p for k, p in src.named_parameters()}
        unet = unet_from_tensors(tensors, group_norm_groups(src), source_name=from_fdp_name,
                                 what=f"{type(src).__name__}")
        return Sampler.for_unet(unet, fdp_scheduler(model.noise_scheduler), model.config.horizon, unet.input_dim,
                                num_inference_steps=steps(), backend=backend)

    build()  # a layout fdp cannot map fails here, not at the first action
    return Patch(model, "conditional_sample", _conditional_sample, network, build,
                 settings=lambda: (steps(), id(model.noise_scheduler)))


def _conditional_sample(handle: Patch, batch_size, global_cond=None, generator=None, noise=None):
    # LeRobot's signature: DiffusionModel.conditional_sample(batch_size, global_cond, generator, noise).
    if global_cond is None:
        return handle.fallback("no global_cond was given", batch_size, global_cond=global_cond,
                               generator=generator, noise=noise)
    sampler = handle.sampler_for()
    param = next(sampler.policy.components[0].parameters())
    shape = (batch_size, sampler.policy.horizon, sampler.policy.action_dim)
    # The draws of LeRobot's loop, in its order: the prior, then diffusers' step noise.
    x_T = noise if noise is not None else torch.randn(shape, dtype=param.dtype, device=param.device,
                                                      generator=generator)
    step_noise = sampler._drawn_step_noise(shape, generator, param.dtype, per_step=False)
    return sampler(global_cond, x_T=x_T, step_noise=step_noise)
