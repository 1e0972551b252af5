"""Write the LeRobot fixtures of tests/test_integrations_lerobot.py with the real LeRobot.

Each folder ``<name>/`` holds what LeRobot's ``save_pretrained`` wrote for a
small state-only ``DiffusionPolicy`` (``config.json``, ``model.safetensors``)
and ``io.safetensors``: fixed inputs and LeRobot's output for them:

* ``global_cond [B, Dg]`` and ``x_T [B, horizon, action_dim]`` (seeded normal draws);
* ``actions``: ``policy.diffusion.conditional_sample(B, global_cond, noise=x_T)``,
  run by LeRobot itself with the global RNG seeded (``SEED``) just before;
* ``step_noise [T, B, horizon, action_dim]`` (noise-adding schedulers only):
  the draws diffusers made inside that call, recorded by wrapping
  ``randn_tensor`` in diffusers' scheduler modules (the wrapper returns the
  original draw unchanged); slot ``i`` is the draw of the i-th ``step`` call,
  zeros where a step drew nothing.

Weights are LeRobot's random initialisation plus ``0.05 * N(0, 1)`` on every
parameter (seeded), so no layer is zero (GroupNorm biases start at 0).

Generated with LeRobot 0.4.4 (PyPI) on Python 3.11.7, in a venv of its own,
beside the CPU build of torch 2.13.0:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /work/venv-lerobot
    V=/work/venv-lerobot/bin
    $V/pip install torch==2.13.0                       # the +cpu build
    $V/pip install --no-deps lerobot==0.4.4            # its pins want torch<2.11
    $V/pip install "diffusers>=0.27.2,<0.36" draccus==0.10.0 "einops>=0.8,<0.9" \
        "packaging>=24.2,<26" safetensors numpy datasets
    $V/pip install --no-deps "accelerate>=1.10,<2" imageio "pyserial>=3.5,<4" \
        "deepdiff>=7.0.1,<9" orderly-set cachebox av
    $V/python tests/data/lerobot/make_fixtures.py

(``pip freeze`` there: accelerate 1.15.0, av 18.1.0, datasets 5.2.0,
diffusers 0.35.2, draccus 0.10.0, einops 0.8.2, huggingface_hub 2.4.0,
lerobot 0.4.4, numpy 2.4.6, safetensors 0.8.0, torch 2.13.0+cpu.)
torchvision is replaced by ``torchvision_stub`` (beside this file): PyPI's
wheel cannot load beside CPU torch, and state-only policies never call it.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torchvision_stub  # noqa: E402

torchvision_stub.install()

import torch  # noqa: E402
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig  # noqa: E402
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SEED = 1234
BATCH = 3
STATE_DIM, ENV_DIM, ACTION_DIM, N_OBS_STEPS = 3, 2, 2, 2

# name -> DiffusionConfig fields: DDPM and DDIM, FiLM scale on and off, 2- and 3-stage U-Nets.
CASES = {
    "ddpm_film_2stage": dict(noise_scheduler_type="DDPM", use_film_scale_modulation=True, down_dims=(8, 16),
                             kernel_size=3, horizon=8, num_train_timesteps=20, num_inference_steps=None,
                             beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon"),
    "ddpm_nofilm_3stage": dict(noise_scheduler_type="DDPM", use_film_scale_modulation=False, down_dims=(8, 16, 32),
                               kernel_size=3, horizon=16, num_train_timesteps=30, num_inference_steps=10,
                               beta_schedule="linear", clip_sample=True, clip_sample_range=1.5,
                               prediction_type="sample"),
    "ddim_nofilm_2stage": dict(noise_scheduler_type="DDIM", use_film_scale_modulation=False, down_dims=(8, 16),
                               kernel_size=5, horizon=8, num_train_timesteps=50, num_inference_steps=5,
                               beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="epsilon"),
    "ddim_film_3stage": dict(noise_scheduler_type="DDIM", use_film_scale_modulation=True, down_dims=(8, 16, 32),
                             kernel_size=3, horizon=16, num_train_timesteps=100, num_inference_steps=8,
                             beta_schedule="scaled_linear", clip_sample=True, prediction_type="sample"),
}


def make_policy(fields: dict) -> DiffusionPolicy:
    config = DiffusionConfig(
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
            "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(ENV_DIM,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        n_obs_steps=N_OBS_STEPS, n_action_steps=4, n_groups=4, diffusion_step_embed_dim=8, device="cpu",
        **fields,
    )
    policy = DiffusionPolicy(config)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


class RecordDraws:
    """Wrap diffusers' ``randn_tensor`` in the scheduler modules and the policy's ``step`` to log
    which step call each draw came from. Draws are returned unchanged."""

    def __init__(self, scheduler):
        self.scheduler, self.step_calls, self.draws = scheduler, 0, []

    def __enter__(self):
        self.originals = [(m, m.randn_tensor) for m in (scheduling_ddpm, scheduling_ddim)]
        for module, original in self.originals:
            module.randn_tensor = self._recording(original)
        original_step = self.scheduler.step

        def step(*args, **kwargs):
            self.step_calls += 1
            return original_step(*args, **kwargs)

        self.scheduler.step = step
        return self

    def _recording(self, original):
        def randn_tensor(*args, **kwargs):
            out = original(*args, **kwargs)
            self.draws.append((self.step_calls - 1, out.clone()))
            return out

        return randn_tensor

    def __exit__(self, *exc):
        for module, original in self.originals:
            module.randn_tensor = original
        del self.scheduler.step


def main() -> None:
    import lerobot

    torch.manual_seed(0)
    for name, fields in CASES.items():
        policy = make_policy(fields)
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        policy.save_pretrained(folder)
        keep = {"config.json", "model.safetensors"}
        for extra in folder.iterdir():  # e.g. a README card: not part of what fdp reads
            if extra.name not in keep:
                extra.unlink() if extra.is_file() else shutil.rmtree(extra)

        model = policy.diffusion
        dg = model.unet.down_modules[0][0].cond_encoder[1].in_features - fields.get("diffusion_step_embed_dim", 8)
        gen = torch.Generator().manual_seed(SEED)
        global_cond = torch.randn(BATCH, dg, generator=gen)
        x_T = torch.randn(BATCH, fields["horizon"], ACTION_DIM, generator=gen)
        torch.manual_seed(SEED)
        with torch.no_grad(), RecordDraws(model.noise_scheduler) as rec:
            actions = model.conditional_sample(BATCH, global_cond=global_cond, noise=x_T.clone())
        tensors = {"global_cond": global_cond, "x_T": x_T, "actions": actions.contiguous()}
        if rec.draws:
            step_noise = torch.zeros(rec.step_calls, *x_T.shape)
            for i, draw in rec.draws:
                step_noise[i] = draw
            tensors["step_noise"] = step_noise
        save_file(tensors, str(folder / "io.safetensors"),
                  metadata={"lerobot": lerobot.__version__, "torch": torch.__version__, "seed": str(SEED),
                            "num_steps": str(rec.step_calls), "draws": str(len(rec.draws))})
        cfg = json.loads((folder / "config.json").read_text())
        print(f"{name}: {cfg['noise_scheduler_type']}, {rec.step_calls} steps, {len(rec.draws)} noise draws, "
              f"global_cond_dim {dg}, |actions| max {actions.abs().max():.3f}")


if __name__ == "__main__":
    main()
