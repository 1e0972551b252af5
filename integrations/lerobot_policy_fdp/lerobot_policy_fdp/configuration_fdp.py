"""``FdpConfig``: the settings of ``--policy.type=fdp``.

Observation settings (state, images through LeRobot's ``DiffusionRgbEncoder``,
environment state, ``n_obs_steps``, ``horizon``, ``n_action_steps``,
normalisation) mean what they mean for LeRobot's diffusion policy, under the
same names, so that its image encoder reads them from this config. The rest
describes the factorized policy (``fdp.FactorizedPolicy``): K components, the
router, the loss, the noise scheduler, the sampling backend, and adaptation
from a trained ``fdp`` checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.optim.optimizers import AdamConfig
from lerobot.optim.schedulers import DiffuserSchedulerConfig

COMPONENT_KINDS = ("unet", "mlp")
NOISE_SCHEDULERS = ("DDPM", "DDIM")
# What trains: LeRobot-facing names for fdp.FactorizedPolicy.adapt's modes.
TRAIN_MODES = {"all": "full", "router": "router", "router+new": "router+new"}


@PreTrainedConfig.register_subclass("fdp")
@dataclass
class FdpConfig(PreTrainedConfig):
    """Configuration of a factorized diffusion policy for LeRobot.

    Observations (as LeRobot's diffusion policy): ``observation.state`` is
    required; at least one ``observation.image*`` feature or
    ``observation.environment_state`` too (images of one shape, encoded by
    LeRobot's ``DiffusionRgbEncoder``, one shared or one per camera). The
    features of the last ``n_obs_steps`` steps are concatenated into the
    conditioning vector that the router and every component read.

    Factorized policy:
        num_components: K.
        component: ``"unet"`` (diffusion_policy's ``ConditionalUnet1D``, the
            paper's component; sizes ``down_dims``, ``kernel_size``, ``n_groups``,
            ``diffusion_step_embed_dim``, ``use_film_scale_modulation``) or
            ``"mlp"`` (``fdp.MLPDenoiser``: ``mlp_hidden_dim``, ``mlp_num_blocks``,
            ``mlp_time_embed_dim``; the component fdp's fused kernels serve).
        router_strategy, router_hidden_dim, router_topk, router_fixed_weights:
            ``fdp.Router``'s ``strategy``, ``hidden_dim``, ``topk``,
            ``fixed_weights``; any strategy the installed fdp's Router accepts.
        component_weight, balance_weight: ``FactorizedPolicy.loss``'s
            specialisation terms (0: the paper's plain loss).
        noise_scheduler_type and the scheduler fields: the training scheduler
            (fdp's DDPM/DDIM, diffusers' numbers); ``num_inference_steps``
            (None: the training steps) and ``eta`` (DDIM) for sampling.
        sampling_backend: ``fdp.Sampler``'s ``backend`` for ``select_action``
            (``"auto"`` picks the fastest verified one on the policy's device).

    Real-time control (``select_action``; both 0 by default: LeRobot's behaviour):
        continuation_overlap: how many of a new chunk's first actions are fixed
            (inpainted, ``fdp.inpainting.continuation``) to the previous chunk's,
            so that the new chunk continues the one the robot executes instead of
            jumping. The first ``n_obs_steps - 1`` positions of a chunk are the
            actions already executed; positions past them fix actions still to
            come (with ``sample_ahead``, at least ``n_obs_steps - 1 + sample_ahead``
            covers the actions executed while the chunk is sampled). At most
            ``horizon - n_action_steps``.
        sample_ahead: start sampling the next chunk this many control steps
            before the current one runs out, on a worker thread
            (``fdp.AsyncSampler``), from the observation of that step; the new
            chunk's actions start ``sample_ahead`` steps into it (the steps the
            current chunk still covers). At most ``n_action_steps`` and
            ``horizon - n_obs_steps + 1 - n_action_steps``.

    Adaptation (``fdp.FactorizedPolicy.adapt``): ``adapt_from`` names a trained
    ``fdp`` policy folder (``.../pretrained_model``); the new policy starts
    from its weights, adds ``adapt_add_components`` components built from this
    config's component settings, and trains what ``train_mode`` says:
    ``"router"``, ``"router+new"`` or ``"all"``. Once the policy is built,
    ``num_components`` holds the grown K, ``adapt_from`` is cleared and
    ``adapted_from`` keeps the source, so a checkpoint of the adapted policy
    reloads (and resumes) without the source folder.
    """

    # Inputs / outputs.
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.MEAN_STD,
            "STATE": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        }
    )
    # Frames near an episode's end whose action chunk would be mostly padding are not sampled
    # (LeRobot's EpisodeAwareSampler reads this field).
    drop_n_last_frames: int = 7

    # Image encoder: LeRobot's DiffusionRgbEncoder reads these fields.
    vision_backbone: str = "resnet18"
    resize_shape: tuple[int, int] | None = None
    crop_ratio: float = 1.0
    crop_shape: tuple[int, int] | None = None
    crop_is_random: bool = True
    pretrained_backbone_weights: str | None = None
    use_group_norm: bool = True
    spatial_softmax_num_keypoints: int = 32
    use_separate_rgb_encoder_per_camera: bool = False

    # Factorized policy.
    num_components: int = 4
    component: str = "unet"
    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    use_film_scale_modulation: bool = True
    mlp_hidden_dim: int = 256
    mlp_num_blocks: int = 2
    mlp_time_embed_dim: int = 64
    router_strategy: str = "soft"
    router_hidden_dim: int | None = None
    router_topk: int = 2
    router_fixed_weights: list[float] | None = None
    component_weight: float = 0.0
    balance_weight: float = 0.0

    # Noise scheduler (training) and sampling.
    noise_scheduler_type: str = "DDPM"
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    num_inference_steps: int | None = None
    eta: float = 0.0
    sampling_backend: str = "auto"
    continuation_overlap: int = 0
    sample_ahead: int = 0

    # Adaptation from a trained fdp policy.
    adapt_from: str | None = None
    adapt_add_components: int = 1
    train_mode: str = "all"
    adapted_from: str | None = None

    # Training presets (LeRobot's diffusion policy's).
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.95, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-6
    scheduler_name: str = "cosine"
    scheduler_warmup_steps: int = 500

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_obs_steps", "horizon", "n_action_steps", "num_components", "num_train_timesteps"):
            _positive_int(name, getattr(self, name))
        if self.n_action_steps > self.horizon - self.n_obs_steps + 1:
            raise ValueError(f"`n_action_steps` ({self.n_action_steps}) must be <= horizon - n_obs_steps + 1 "
                             f"({self.horizon - self.n_obs_steps + 1}): the actions kept start at the current "
                             "observation, inside the predicted horizon")
        for name in ("continuation_overlap", "sample_ahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        room = self.horizon - self.n_obs_steps + 1 - self.n_action_steps
        if self.sample_ahead > min(self.n_action_steps, room):
            raise ValueError(f"`sample_ahead` ({self.sample_ahead}) must be <= n_action_steps ({self.n_action_steps}) "
                             f"and <= horizon - n_obs_steps + 1 - n_action_steps ({room}): a chunk sampled that "
                             "early must still hold n_action_steps actions past the ones the current chunk covers")
        if self.continuation_overlap > self.horizon - self.n_action_steps:
            raise ValueError(f"`continuation_overlap` ({self.continuation_overlap}) must be <= horizon - n_action_steps "
                             f"({self.horizon - self.n_action_steps}): the actions of the previous chunk that the "
                             "next one can still share")
        if self.component not in COMPONENT_KINDS:
            raise ValueError(f"`component` must be one of {COMPONENT_KINDS}, got {self.component!r}")
        if self.component == "unet":
            self.down_dims = tuple(self.down_dims)
            multiple = 2 ** (len(self.down_dims) - 1)
            if self.horizon % multiple:
                raise ValueError(f"`horizon` ({self.horizon}) must be a multiple of {multiple}: the U-Net halves it "
                                 f"{len(self.down_dims) - 1} times (down_dims={list(self.down_dims)})")
        if self.noise_scheduler_type not in NOISE_SCHEDULERS:
            raise ValueError(f"`noise_scheduler_type` must be one of {NOISE_SCHEDULERS}, got "
                             f"{self.noise_scheduler_type!r}")
        if self.num_inference_steps is not None:
            _positive_int("num_inference_steps", self.num_inference_steps)
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"`train_mode` must be one of {list(TRAIN_MODES)}, got {self.train_mode!r}")
        if not isinstance(self.adapt_add_components, int) or self.adapt_add_components < 0:
            raise ValueError(f"`adapt_add_components` must be a non-negative int, got {self.adapt_add_components!r}")
        for name in ("component_weight", "balance_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{name}` must be a non-negative float, got {value!r}")
        self.make_router(cond_dim=1)  # the strategy and its options, checked by fdp.Router itself
        self.make_noise_scheduler().step_table(self.sampling_steps, eta=self.eta)  # scheduler fields and eta
        if not 0 < self.crop_ratio <= 1.0:
            raise ValueError(f"`crop_ratio` must be in (0, 1], got {self.crop_ratio}")
        if self.resize_shape is not None:
            if len(self.resize_shape) != 2 or any(d <= 0 for d in self.resize_shape):
                raise ValueError(f"`resize_shape` must be two positive ints, got {self.resize_shape}")
            # LeRobot's convention for its image encoder: the crop follows from the resize and the ratio.
            self.crop_shape = (None if self.crop_ratio == 1.0 else
                               (int(self.resize_shape[0] * self.crop_ratio), int(self.resize_shape[1] * self.crop_ratio)))

    # -- what the policy builds from this config ------------------------------------------
    @property
    def sampling_steps(self) -> int:
        return self.num_train_timesteps if self.num_inference_steps is None else self.num_inference_steps

    def make_router(self, cond_dim: int, num_components: int | None = None):
        import fdp

        return fdp.Router(cond_dim, self.num_components if num_components is None else num_components,
                          hidden_dim=self.router_hidden_dim, strategy=self.router_strategy, topk=self.router_topk,
                          fixed_weights=self.router_fixed_weights)

    def make_noise_scheduler(self):
        import fdp

        cls = fdp.DDPMScheduler if self.noise_scheduler_type == "DDPM" else fdp.DDIMScheduler
        return cls(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
                   beta_schedule=self.beta_schedule, clip_sample=self.clip_sample,
                   clip_sample_range=self.clip_sample_range, prediction_type=self.prediction_type)

    def make_component(self, cond_dim: int):
        import fdp

        action_dim = self.action_feature.shape[0]
        if self.component == "unet":
            return fdp.ConditionalUnet1D(action_dim, global_cond_dim=cond_dim,
                                         diffusion_step_embed_dim=self.diffusion_step_embed_dim,
                                         down_dims=self.down_dims, kernel_size=self.kernel_size,
                                         n_groups=self.n_groups, cond_predict_scale=self.use_film_scale_modulation)
        return fdp.MLPDenoiser(action_dim, self.horizon, global_cond_dim=cond_dim, hidden_dim=self.mlp_hidden_dim,
                               num_blocks=self.mlp_num_blocks, time_embed_dim=self.mlp_time_embed_dim)

    # -- LeRobot's interface ----------------------------------------------------------------
    def get_optimizer_preset(self) -> AdamConfig:
        return AdamConfig(lr=self.optimizer_lr, betas=self.optimizer_betas, eps=self.optimizer_eps,
                          weight_decay=self.optimizer_weight_decay)

    def get_scheduler_preset(self) -> DiffuserSchedulerConfig:
        return DiffuserSchedulerConfig(name=self.scheduler_name, num_warmup_steps=self.scheduler_warmup_steps)

    def validate_features(self) -> None:
        if self.robot_state_feature is None:
            raise ValueError("the fdp policy needs `observation.state` among the input features")
        if not self.image_features and self.env_state_feature is None:
            raise ValueError("the fdp policy needs at least one image or `observation.environment_state` among the "
                             "input features")
        if self.action_feature is None:
            raise ValueError("the fdp policy needs an `action` output feature")
        shapes = {key: tuple(ft.shape) for key, ft in self.image_features.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"all image features must have one shape, got {shapes}")
        if shapes and self.resize_shape is None and self.crop_shape is not None:
            _, h, w = next(iter(shapes.values()))
            if self.crop_shape[0] > h or self.crop_shape[1] > w:
                raise ValueError(f"`crop_shape` {tuple(self.crop_shape)} must fit in the images ({h}x{w})")

    @property
    def observation_delta_indices(self) -> list:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list:
        return list(range(1 - self.n_obs_steps, 1 - self.n_obs_steps + self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
