"""The benchmark grid: which policies, batches, schedules and dtypes ``fdp bench`` times.

A :class:`Config` is one policy evaluated one way (component family and
size, K, batch, schedule, weight dtype); every sampler path is timed on it,
on the same weights and inputs, in the same process. :func:`build_grid`
expands the axes, applies the command-line filters and drops what cannot
run on the device (the paper-size U-Net runs on CUDA only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .._validation import InvalidArgument

# -- component families ---------------------------------------------------------------------------------------

#: Shared by every family: an action chunk of 16 steps of a 2-D action (Push-T's shape).
HORIZON = 16
ACTION_DIM = 2

#: Component configurations by name. ``family`` is what the JSON calls ``component``.
COMPONENTS: dict[str, dict] = {
    # The family the fused kernels serve; the performance targets in docs/design.md are for width 256.
    "mlp": dict(family="mlp", horizon=HORIZON, action_dim=ACTION_DIM, cond_dim=64, hidden_dim=256, num_blocks=2,
                time_embed_dim=64),
    # A U-Net small enough for a CPU; same architecture as the paper's.
    "unet-small": dict(family="unet", horizon=HORIZON, action_dim=ACTION_DIM, cond_dim=274, down_dims=[64, 128, 256],
                       kernel_size=5, n_groups=8, cond_predict_scale=True, diffusion_step_embed_dim=128),
    # The paper's component (Chi et al.'s defaults as the factorized-policy reference uses them): ~66M parameters.
    "unet-paper": dict(family="unet", horizon=HORIZON, action_dim=ACTION_DIM, cond_dim=274,
                       down_dims=[256, 512, 1024], kernel_size=5, n_groups=8, cond_predict_scale=True,
                       diffusion_step_embed_dim=256),
}

#: Components that only run where there is a CUDA device (too slow elsewhere).
CUDA_ONLY_COMPONENTS = ("unet-paper",)

#: Schedules by name: (scheduler, inference steps).
SCHEDULES = {"ddim": 10, "ddpm": 100}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"}

# -- the sampler paths ----------------------------------------------------------------------------------------

#: PyTorch-native paths, in table order (``eager`` is the library's ``torch`` backend).
NATIVE_PATHS = ("eager", "batched", "compile-reduce-overhead", "compile-max-autotune", "cuda-graph")
#: Aliases accepted by ``--backends``.
PATH_GROUPS = {
    "native": NATIVE_PATHS,
    "compile": ("compile-reduce-overhead", "compile-max-autotune"),
}


@dataclass(frozen=True)
class Config:
    """One (policy, batch, schedule, dtype) point of the grid."""

    component: str  # a key of COMPONENTS
    K: int
    batch: int
    scheduler: str  # "ddim" or "ddpm"
    steps: int
    dtype: str  # "fp32" or "bf16"

    @property
    def family(self) -> str:
        return COMPONENTS[self.component]["family"]

    @property
    def spec(self) -> dict:
        return dict(COMPONENTS[self.component], name=self.component)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"{self.component} K={self.K} B={self.batch} {self.scheduler}{self.steps} {self.dtype}"


@dataclass
class Grid:
    """The axes of a run (after filtering) and the paths to time."""

    components: list[str]
    K: list[int]
    batch: list[int]
    schedules: list[str]
    dtype: list[str]
    backends: list[str] | None  # None: every native path and every registered library backend
    skipped: list[str] = field(default_factory=list)  # axis values dropped, with the reason

    def configs(self) -> list[Config]:
        return [Config(c, k, b, s, SCHEDULES[s], d)
                for c, s, d, k, b in itertools.product(self.components, self.schedules, self.dtype, self.K,
                                                       self.batch)]


FULL = dict(components=["mlp", "unet-small", "unet-paper"], K=[1, 2, 4, 8], batch=[1, 16, 256, 1024],
            schedules=["ddim", "ddpm"], dtype=["fp32", "bf16"], backends=None)
#: ``--quick``: the smallest cases; eager + batched + the library backends available here.
QUICK = dict(components=["mlp"], K=[2, 4], batch=[1, 16], schedules=["ddim"], dtype=["fp32"],
             backends=["eager", "batched", "fused"])


def _parse_list(text: str | None, cast, name: str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InvalidArgument(f"`--{name}` must be a comma-separated list, got {text!r}")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise InvalidArgument(f"`--{name}` has a value that is not valid: {text!r}") from None


def _restrict(name: str, default: list, asked: list | None) -> list:
    if asked is None:
        return list(default)
    return list(dict.fromkeys(asked))


def build_grid(quick: bool = False, *, components=None, K=None, batch=None, steps=None, dtype=None, backends=None,
               device: torch.device | str = "cpu") -> Grid:
    """The grid of a run: the full grid (or ``quick``), restricted by comma-separated filters.

    ``components``: ``mlp``, ``unet`` (both sizes), ``unet-small``, ``unet-paper``;
    ``steps``: ``ddim``/``ddpm`` or their step counts ``10``/``100``; ``dtype``:
    ``fp32``/``bf16``; ``backends``: path names, ``native``, ``compile``,
    ``fused`` (every library backend but ``torch``) or registry names.
    A filter may name values outside the default grid of ``quick``
    (e.g. ``--quick --batch 256``): it replaces that axis.
    """
    base = QUICK if quick else FULL
    device = torch.device(device)

    comp = _parse_list(components, str, "component")
    if comp is not None:
        expanded = []
        for c in comp:
            if c == "unet":
                expanded += ["unet-small", "unet-paper"] if device.type == "cuda" else ["unet-small"]
            elif c in COMPONENTS:
                expanded.append(c)
            else:
                raise InvalidArgument(f"`--component` must name one of {['unet', *COMPONENTS]}, got {c!r}")
        comp = expanded
    comps = _restrict("component", base["components"], comp)

    ks = _restrict("K", base["K"], _parse_list(K, int, "K"))
    if any(k < 1 for k in ks):
        raise InvalidArgument(f"`--K` values must be positive, got {ks}")
    bs = _restrict("batch", base["batch"], _parse_list(batch, int, "batch"))
    if any(b < 1 for b in bs):
        raise InvalidArgument(f"`--batch` values must be positive, got {bs}")

    sch = _parse_list(steps, str, "steps")
    if sch is not None:
        by_steps = {str(n): s for s, n in SCHEDULES.items()}
        bad = [s for s in sch if s.lower() not in SCHEDULES and s not in by_steps]
        if bad:
            raise InvalidArgument(f"`--steps` must name {list(SCHEDULES)} or {list(by_steps)}, got {bad}")
        sch = [s.lower() if s.lower() in SCHEDULES else by_steps[s] for s in sch]
    schedules = _restrict("steps", base["schedules"], sch)

    dts = _parse_list(dtype, str, "dtype")
    if dts is not None:
        bad = [d for d in dts if d.lower() not in _DTYPE_ALIASES]
        if bad:
            raise InvalidArgument(f"`--dtype` must name fp32 or bf16, got {bad}")
        dts = [_DTYPE_ALIASES[d.lower()] for d in dts]
    dts = _restrict("dtype", base["dtype"], dts)

    bks = _parse_list(backends, str, "backends")
    bks = base["backends"] if bks is None else bks

    skipped = []
    if device.type != "cuda":
        for c in [c for c in comps if c in CUDA_ONLY_COMPONENTS]:
            comps.remove(c)
            skipped.append(f"component {c}: CUDA only (too slow on {device.type})")
    return Grid(components=comps, K=ks, batch=bs, schedules=schedules, dtype=dts, backends=bks, skipped=skipped)


def expand_backends(asked: list[str] | None, library: list[str]) -> tuple[list[str], set[str]]:
    """Path names to time, in table order, and those named explicitly (not via a group).

    ``library`` lists the registry's backends other than ``torch`` (which is ``eager``).
    Unknown names raise ValueError.
    """
    if asked is None:
        return list(NATIVE_PATHS) + list(library), set()
    names, explicit = [], set()
    for a in asked:
        if a in PATH_GROUPS:
            names += PATH_GROUPS[a]
        elif a == "fused":
            names += library
        elif a == "torch":
            names.append("eager")
            explicit.add("eager")
        elif a in NATIVE_PATHS or a in library:
            names.append(a)
            explicit.add(a)
        else:
            raise InvalidArgument(f"`--backends` must name paths from {[*NATIVE_PATHS, *library]} or the groups "
                             f"{[*PATH_GROUPS, 'fused']}, got {a!r}")
    order = list(NATIVE_PATHS) + list(library)
    names = sorted(set(names), key=order.index)
    return names, explicit
