"""What the LeRobot and diffusion_policy adapters share.

* :func:`unet_from_tensors`: an :class:`fdp.ConditionalUnet1D` whose
  parameters *are* the given tensors (no copy), its configuration read from
  their shapes.
* :class:`Patch`: an instance's sampling method replaced by fdp's, with the
  :class:`fdp.Sampler` rebuilt when the source network object or the
  settings change (weights changing in place are the Sampler's own concern),
  and ``restore()`` / context-manager use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .. import schedulers as _schedulers
from .._validation import InvalidArgument, InvalidArgumentType, UserError
from ..sampler import Sampler
from ..unet import ConditionalUnet1D

log = logging.getLogger("fdp")

# ``n_groups`` is not visible in a state dict: callers read it from a config or a module.


def unet_from_tensors(tensors: Mapping[str, torch.Tensor], n_groups: int, *,
                      source_name: Callable[[str], str] = str, what: str = "the state dict") -> ConditionalUnet1D:
    """A :class:`fdp.ConditionalUnet1D` holding ``tensors`` (keyed by fdp's parameter names) as its parameters.

    Tensors that are already ``nn.Parameter`` s are shared, so the result sees
    their later updates; plain tensors are wrapped without copying.
    ``source_name`` maps an fdp name back to the source's (for messages).
    Raises ValueError naming the first key that is missing, unexpected or of
    the wrong shape.
    """
    def shape(key, ndim):
        t = tensors.get(key)
        if t is None:
            raise InvalidArgument(f"{what} has no {source_name(key)!r}: not a diffusion-policy U-Net layout fdp "
                                  "can map")
        if t.ndim != ndim:
            raise InvalidArgument(f"{what}: {source_name(key)!r} has shape {list(t.shape)}, expected a {ndim}-D "
                                  "tensor")
        return tuple(t.shape)

    down_dims = []
    while f"down_modules.{len(down_dims)}.0.blocks.0.block.0.weight" in tensors:
        down_dims.append(shape(f"down_modules.{len(down_dims)}.0.blocks.0.block.0.weight", 3)[0])
    first_conv = shape("down_modules.0.0.blocks.0.block.0.weight", 3)
    film = shape("down_modules.0.0.cond_encoder.1.weight", 2)
    dsed = shape("diffusion_step_encoder.1.weight", 2)[1]
    local = tensors.get("local_cond_encoder.0.blocks.0.block.0.weight")
    if local is not None:
        shape("local_cond_encoder.0.blocks.0.block.0.weight", 3)
    try:
        with torch.device("meta"):  # no memory, no random initialisation
            unet = ConditionalUnet1D(
                input_dim=shape("final_conv.1.weight", 3)[0],
                local_cond_dim=None if local is None else local.shape[1],
                global_cond_dim=(film[1] - dsed) or None,
                diffusion_step_embed_dim=dsed,
                down_dims=down_dims,
                kernel_size=first_conv[2],
                n_groups=n_groups,
                cond_predict_scale=film[0] == 2 * down_dims[0],
            )
    except UserError as exc:
        raise InvalidArgument(f"{what}: its tensor shapes describe no valid U-Net: {exc}") from None
    expected = dict(unet.named_parameters())
    for key, t in tensors.items():
        if key not in expected:
            raise InvalidArgument(f"{what} has the unexpected key {source_name(key)!r}: not a diffusion-policy U-Net "
                                  "layout fdp can map")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise InvalidArgument(f"{what}: {source_name(key)!r} has shape {list(t.shape)}, but a U-Net with these "
                                  f"dimensions needs {list(expected[key].shape)}")
    for key in expected:
        if key not in tensors:
            raise InvalidArgument(f"{what} has no {source_name(key)!r}: not a diffusion-policy U-Net layout fdp "
                                  "can map")
    for key, t in tensors.items():
        owner, _, attr = key.rpartition(".")
        param = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        setattr(unet.get_submodule(owner), attr, param)
    return unet


def group_norm_groups(module: nn.Module) -> int:
    """``n_groups`` of a diffusion-policy U-Net module: its residual blocks' GroupNorm (the head's is always 8)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.GroupNorm) and not name.startswith("final_conv"):
            return m.num_groups
    raise InvalidArgument(f"{type(module).__name__} has no GroupNorm: not a diffusion-policy U-Net")


def fdp_scheduler(scheduler):
    """The fdp scheduler equal to a diffusers (or fdp) DDPM/DDIM scheduler, from its config."""
    for cls in (_schedulers.DDPMScheduler, _schedulers.DDIMScheduler):
        if type(scheduler).__name__ == cls.__name__:
            try:
                return cls.from_config(scheduler.config)
            except UserError as exc:  # a field of the other library's config, checked as strictly as ours
                raise type(exc)(f"the policy's noise scheduler ({type(scheduler).__name__}) config: {exc}") from None
    raise InvalidArgument(f"the policy's noise scheduler is a {type(scheduler).__name__}; fdp serves DDPMScheduler and "
                          "DDIMScheduler")


class Patch:
    """An instance's method replaced by fdp's sampling; ``restore()`` puts the original back.

    Usable as a context manager (restores on exit). ``build(*shape_args)``
    makes the :class:`fdp.Sampler` for a call's shape arguments (e.g. a
    horizon); samplers are rebuilt when ``settings()`` changed or ``network()``
    is another module than before. Weights that change in place (training goes
    on, ``load_state_dict``, ``.to()``) need no rebuild: each Sampler repacks
    by itself when its policy changed. :meth:`refresh` repacks now (after writes
    through ``.data``, which leave no trace).
    ``shape_args``: those of the first call, until a call is made (None: unknown).
    A patched instance is not for ``copy.deepcopy`` or pickling: restore first.
    """

    def __init__(self, owner, method: str, replacement, network: Callable[[], nn.Module],
                 build: Callable[..., Sampler], settings: Callable[[], tuple] = tuple,
                 shape_args: tuple | None = ()):
        if not callable(getattr(owner, method, None)):
            raise InvalidArgumentType(f"{type(owner).__name__} has no method {method!r}")
        if getattr(getattr(owner, method), "_fdp_patch", None) is not None:
            raise InvalidArgument(f"{type(owner).__name__}.{method} is already accelerated by fdp; restore() that "
                                  "handle first")
        self.owner, self._method = owner, method
        self._network, self._build, self._settings = network, build, settings
        self._samplers: dict = {}
        self._key = None
        self._warned: set[str] = set()
        self._last_args = shape_args
        # The original, as the instance resolves it now (a class method, or an instance attribute).
        self.original = getattr(owner, method)
        self._had_attr = method in vars(owner)
        self._saved_attr = vars(owner).get(method)

        def patched(*args, **kwargs):
            return replacement(self, *args, **kwargs)

        patched._fdp_patch = self
        patched.__wrapped__ = self.original
        self._patched = patched
        setattr(owner, method, patched)

    @property
    def active(self) -> bool:
        return vars(self.owner).get(self._method) is self._patched

    def sampler_for(self, *shape_args) -> Sampler:
        """The sampler for these per-call arguments (e.g. a horizon), rebuilt if anything changed."""
        key = (id(self._network()), self._settings())
        if key != self._key:
            self._samplers.clear()
            self._key = key
        sampler = self._samplers.get(shape_args)
        if sampler is None:
            sampler = self._samplers[shape_args] = self._build(*shape_args)
        self._last_args = shape_args
        return sampler

    @property
    def sampler(self) -> Sampler | None:
        """The sampler for the latest call's shape arguments, current with the weights (None before a call
        when they are not known in advance)."""
        return None if self._last_args is None else self.sampler_for(*self._last_args)

    def refresh(self) -> None:
        """Repack every sampler now (after writes through ``.data``, which no version counter sees)."""
        for sampler in self._samplers.values():
            sampler.repack()

    def fallback(self, reason: str, *args, **kwargs):
        """Run the original method, logging ``reason`` the first time it is the cause."""
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("fdp: %s.%s runs the original sampler: %s", type(self.owner).__name__, self._method, reason)
        return self.original(*args, **kwargs)

    def restore(self) -> None:
        """Put the original method back (idempotent)."""
        if not self.active:
            return
        if self._had_attr:
            setattr(self.owner, self._method, self._saved_attr)
        else:
            delattr(self.owner, self._method)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self):
        state = "active" if self.active else "restored"
        return f"<fdp accelerated {type(self.owner).__name__}.{self._method} ({state})>"
