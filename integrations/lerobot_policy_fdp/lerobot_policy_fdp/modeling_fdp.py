"""``FdpPolicy``: LeRobot's policy interface around ``fdp.FactorizedPolicy``.

Training: ``forward`` encodes the observations into one conditioning vector
(state, image features from LeRobot's own ``DiffusionRgbEncoder``, environment
state, over ``n_obs_steps`` steps) and returns ``FactorizedPolicy.loss`` on the
action chunk. Inference: ``select_action`` keeps LeRobot's observation and
action queues (as its diffusion policy does) and samples each chunk through an
``fdp.Sampler`` built once, which repacks by itself when the weights change;
optionally each chunk continues the previous one (inpainting) and the next
chunk is sampled ahead on a worker thread (``FdpConfig``'s real-time fields).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import torch
from torch import Tensor, nn

import fdp
from fdp.inpainting import continuation
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionRgbEncoder
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.utils import populate_queues
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

from .configuration_fdp import TRAIN_MODES, FdpConfig

log = logging.getLogger(__name__)

# Fields that fix the shapes of an fdp policy's weights (and what they were trained on): an
# adapted policy takes them from its source, whatever the command line says.
STRUCTURE_FIELDS = (
    "n_obs_steps", "horizon", "vision_backbone", "resize_shape", "crop_ratio", "crop_shape", "use_group_norm",
    "spatial_softmax_num_keypoints", "use_separate_rgb_encoder_per_camera", "component", "down_dims", "kernel_size",
    "n_groups", "diffusion_step_embed_dim", "use_film_scale_modulation", "mlp_hidden_dim", "mlp_num_blocks",
    "mlp_time_embed_dim", "router_hidden_dim", "noise_scheduler_type", "num_train_timesteps", "beta_schedule",
    "beta_start", "beta_end", "prediction_type", "clip_sample", "clip_sample_range",
)


class ObservationEncoder(nn.Module):
    """Observations of ``n_obs_steps`` steps -> the conditioning vector ``[B, cond_dim]``.

    Per step: the state, then each camera's image features (LeRobot's
    ``DiffusionRgbEncoder``, shared or one per camera), then the environment
    state; the steps are concatenated in time order.
    """

    def __init__(self, config: FdpConfig):
        super().__init__()
        self.image_keys = list(config.image_features)
        self.separate = bool(config.use_separate_rgb_encoder_per_camera)
        self.env_key = OBS_ENV_STATE if config.env_state_feature is not None else None
        per_step = config.robot_state_feature.shape[0]
        if self.image_keys:
            if self.separate:
                self.rgb_encoder = nn.ModuleList(DiffusionRgbEncoder(config) for _ in self.image_keys)
                feature_dim = self.rgb_encoder[0].feature_dim
            else:
                self.rgb_encoder = DiffusionRgbEncoder(config)
                feature_dim = self.rgb_encoder.feature_dim
            per_step += feature_dim * len(self.image_keys)
        if self.env_key:
            per_step += config.env_state_feature.shape[0]
        self.n_obs_steps = config.n_obs_steps
        self.cond_dim = per_step * config.n_obs_steps

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        state = _with_time(batch[OBS_STATE], 3)
        B, S = state.shape[:2]
        if S != self.n_obs_steps:
            raise ValueError(f"`{OBS_STATE}` holds {S} observation steps, the policy reads n_obs_steps="
                             f"{self.n_obs_steps}")
        parts = [state]
        if self.image_keys:
            images = [_with_time(batch[key], 5) for key in self.image_keys]  # each [B, S, C, H, W]
            if self.separate:
                feats = [enc(img.flatten(0, 1)).view(B, S, -1) for enc, img in zip(self.rgb_encoder, images)]
                parts.extend(feats)
            else:
                # One encoder call for every camera and step; cameras end up side by side per step.
                parts.append(self.rgb_encoder(torch.stack(images, dim=2).flatten(0, 2)).view(B, S, -1))
        if self.env_key:
            parts.append(_with_time(batch[self.env_key], 3))
        return torch.cat(parts, dim=-1).flatten(1)


def _with_time(x: Tensor, ndim: int) -> Tensor:
    """A single-step observation (no time axis, as with n_obs_steps=1) gets its time axis."""
    return x.unsqueeze(1) if x.ndim == ndim - 1 else x


class FdpPolicy(PreTrainedPolicy):
    """A factorized diffusion policy (K denoisers and a router) trained and run by LeRobot."""

    config_class = FdpConfig
    name = "fdp"

    def __init__(self, config: FdpConfig, **kwargs):
        # kwargs: what make_policy passes to every policy (dataset_stats, dataset_meta); the processors
        # normalise, not the policy.
        super().__init__(config)
        if config.adapt_from:
            self._init_adapted(config)
        else:
            config.validate_features()
            self.encoder = ObservationEncoder(config)
            cond_dim = self.encoder.cond_dim
            self.model = fdp.FactorizedPolicy(
                [config.make_component(cond_dim) for _ in range(config.num_components)],
                config.make_router(cond_dim), config.horizon, config.action_feature.shape[0],
                noise_scheduler=config.make_noise_scheduler())
        self.config = config
        self._sampler = None
        self.reset()

    def _init_adapted(self, config: FdpConfig) -> None:
        source = Path(config.adapt_from)
        source_cfg = PreTrainedConfig.from_pretrained(source)
        if not isinstance(source_cfg, FdpConfig):
            raise ValueError(f"`adapt_from` must be a folder of a trained fdp policy, but {source} holds a "
                             f"{source_cfg.type!r} policy")
        for key, want in (("input_features", config.input_features), ("output_features", config.output_features)):
            have = {k: tuple(v.shape) for k, v in getattr(source_cfg, key).items()}
            if want and have != {k: tuple(v.shape) for k, v in want.items()}:
                raise ValueError(f"`adapt_from`: {source} was trained on {key} {have}, this dataset has "
                                 f"{ {k: tuple(v.shape) for k, v in want.items()} }; adaptation keeps the "
                                 "observation encoder and needs the same features")
        for name in STRUCTURE_FIELDS:
            if getattr(config, name) != getattr(source_cfg, name):
                log.info("adapt_from: %s = %r (from %s; the command line said %r)", name,
                         getattr(source_cfg, name), source, getattr(config, name))
                setattr(config, name, getattr(source_cfg, name))
        config.validate_features()
        source_cfg.device = config.device
        base = FdpPolicy.from_pretrained(source, config=source_cfg)
        self.encoder, self.model = base.encoder, base.model
        self.model.noise_scheduler = config.make_noise_scheduler()
        self.model.router.set_strategy(config.router_strategy, topk=config.router_topk,
                                       fixed_weights=config.router_fixed_weights)
        for _ in range(config.adapt_add_components):
            self.model.add_component(config.make_component(self.encoder.cond_dim))
        log.info("adapt_from: %s has %d components; added %d, training %r", source, source_cfg.num_components,
                 config.adapt_add_components, config.train_mode)
        # The config now describes the adapted policy: a checkpoint of it reloads without the source.
        config.num_components = self.model.num_components
        config.adapted_from, config.adapt_from = str(source), None

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, strict: bool = True, **kwargs):
        # LeRobot loads non-strictly by default: a checkpoint of another K or size would load
        # partially, silently. Here a mismatch fails.
        return super().from_pretrained(pretrained_name_or_path, strict=strict, **kwargs)

    # -- training --------------------------------------------------------------------------
    def get_optim_params(self) -> list[nn.Parameter]:
        """What ``train_mode`` trains (``FactorizedPolicy.adapt``); the image encoder trains with ``all`` only."""
        mode = TRAIN_MODES[self.config.train_mode]
        self.model.adapt(mode)
        self.encoder.requires_grad_(mode == "full")
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        if reduction != "mean":
            raise ValueError(f"the fdp policy's loss is a batch mean (`reduction`='mean'), got {reduction!r}")
        cond = self.encoder(batch)
        loss = self.model.loss(batch[ACTION], cond, generator=self._noise_generator(cond.device),
                               component_weight=self.config.component_weight,
                               balance_weight=self.config.balance_weight)
        with torch.no_grad():
            usage = self.model.weights(cond).mean(0).tolist()
        return loss, {f"router_weight_{k}": w for k, w in enumerate(usage)}

    @staticmethod
    def _noise_generator(device) -> torch.Generator:
        """The generator of one training step's noise and timesteps: seeded from the global RNG plus the rank.

        LeRobot seeds every process alike, so noise drawn from the global RNG would repeat on every rank
        (each rank's half of the global batch getting the same noises and timesteps). One draw from the
        global RNG per step keeps every process's RNG in step (and LeRobot's checkpointed RNG state
        meaningful for resume); adding the rank gives each process its own noise.
        """
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        return torch.Generator(device=device).manual_seed(seed + rank)

    # -- inference -------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear the observation and action queues (call at every episode start); a chunk being sampled
        ahead is dropped and the next chunk continues nothing."""
        keys = [OBS_STATE, *self.encoder.image_keys] + ([self.encoder.env_key] if self.encoder.env_key else [])
        self._queues = {key: deque(maxlen=self.config.n_obs_steps) for key in keys}
        self._queues[ACTION] = deque(maxlen=self.config.n_action_steps)
        # Continuation: the last full chunk [B, horizon, action_dim] and the control step of the observation
        # it was sampled for (steps count select_action calls since the reset).
        self._previous, self._previous_step, self._step = None, 0, 0
        if getattr(self, "_ahead_future", None) is not None:
            self._ahead_future[0].cancel()
        self._ahead_future = None  # (future of the chunk sampled ahead, its observation's step)

    @property
    def sampler(self) -> fdp.Sampler:
        """The ``fdp.Sampler`` that ``select_action`` samples with (built on first use)."""
        if self._sampler is None:
            self._sampler = fdp.Sampler(self.model, self.model.noise_scheduler,
                                        num_inference_steps=self.config.sampling_steps, eta=self.config.eta,
                                        backend=self.config.sampling_backend)
        return self._sampler

    @property
    def ahead(self) -> fdp.AsyncSampler:
        """The ``fdp.AsyncSampler`` around :attr:`sampler` that ``sample_ahead`` uses (built on first use)."""
        if getattr(self, "_ahead", None) is None or self._ahead.sampler is not self.sampler:
            self._ahead = fdp.AsyncSampler(self.sampler)
        return self._ahead

    def _condition(self) -> Tensor:
        stacked = {key: torch.stack(list(q), dim=1) for key, q in self._queues.items() if key != ACTION}
        return self.encoder(stacked)

    def _continuation(self) -> dict:
        """``known``/``known_mask`` continuing the previous chunk (empty without one, or when off)."""
        if not self.config.continuation_overlap or self._previous is None:
            return {}
        known, mask = continuation(self._previous, self._step - self._previous_step, self.config.continuation_overlap)
        return {"known": known, "known_mask": mask}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, *,
                             known: Tensor | None = None, known_mask: Tensor | None = None) -> Tensor:
        """``n_action_steps`` actions ``[B, n_action_steps, action_dim]`` from the queued observations.

        ``noise`` is the initial noise ``[B, horizon, action_dim]`` (default: drawn from the global RNG,
        as are the steps' noises). ``known``/``known_mask`` (``[B, horizon, action_dim]``, normalised
        actions) inpaint the chunk, as ``fdp.Sampler``'s arguments of those names.
        """
        if any(len(q) == 0 for key, q in self._queues.items() if key != ACTION):
            self._queues = populate_queues(self._queues, batch, exclude_keys=[ACTION])
        actions = self.sampler(self._condition(), x_T=noise, known=known, known_mask=known_mask)
        start = self.config.n_obs_steps - 1
        return actions[:, start:start + self.config.n_action_steps]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action ``[B, action_dim]``: a new chunk is sampled when the queue of actions is empty.

        With ``sample_ahead``, the next chunk is submitted ``sample_ahead`` steps before the queue runs
        out and taken when it does (waiting only if it is not finished by then); with
        ``continuation_overlap``, each chunk after an episode's first continues the previous one.
        ``noise`` is the initial noise of the chunk sampled (or submitted) during this call.
        """
        batch = {k: v for k, v in batch.items() if k != ACTION}
        self._queues = populate_queues(self._queues, batch, exclude_keys=[ACTION])
        n, ahead = self.config.n_action_steps, self.config.sample_ahead
        if not self._queues[ACTION]:
            if self._ahead_future is not None:
                (future, step), self._ahead_future = self._ahead_future, None
                chunk = future.result().actions
            else:
                chunk, step = self.sampler(self._condition(), x_T=noise, **self._continuation()), self._step
            self._previous, self._previous_step = chunk, step
            # The chunk's position n_obs_steps - 1 is its observation's step; the queue starts at this step.
            start = self.config.n_obs_steps - 1 + self._step - step
            self._queues[ACTION].extend(chunk[:, start:start + n].transpose(0, 1))
        action = self._queues[ACTION].popleft()
        if ahead and len(self._queues[ACTION]) == ahead - 1 and self._ahead_future is None:
            # From this step's observation; the chunk is taken `ahead` steps later, when the queue runs out.
            self._ahead_future = (self.ahead.submit(self._condition(), x_T=noise, **self._continuation()), self._step)
        self._step += 1
        return action
