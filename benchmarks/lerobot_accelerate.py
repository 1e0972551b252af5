"""LeRobot's own ``select_action`` against the same policy under ``fdp.integrations.lerobot.accelerate``, on this
device: a live ``DiffusionPolicy`` (state + environment state, no images), DDIM 10 steps, batch 1.

Each call regenerates a chunk (the action queue is reset before every call), so the time is one sampling call plus
LeRobot's observation handling. Run with the environment ``bash scripts/test.sh`` sets up (LeRobot installed):

    .venv/bin/python benchmarks/lerobot_accelerate.py --down-dims 64 128 256 --calls 30 --out result.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from torchvision_cpu import install  # noqa: E402  (PyPI's torchvision beside a CPU torch)

install()
import torch  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig  # noqa: E402
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402

import fdp  # noqa: E402
from fdp.integrations import lerobot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--down-dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10, help="DDIM inference steps")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(10,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(16,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
        noise_scheduler_type="DDIM", num_train_timesteps=100, num_inference_steps=args.steps,
        down_dims=tuple(args.down_dims), horizon=16, n_action_steps=8, n_obs_steps=2, device="cpu")
    policy = DiffusionPolicy(config).eval()
    params = sum(p.numel() for p in policy.parameters())
    obs = {"observation.state": torch.randn(1, 10), "observation.environment_state": torch.randn(1, 16)}

    def timed(n):
        out = []
        for _ in range(n):
            policy.reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                policy.select_action(dict(obs))
            out.append(time.perf_counter() - t0)
        return out

    timed(3)  # warm-up
    rows = {}
    rows["lerobot"] = timed(args.calls)
    with lerobot.accelerate(policy) as handle:
        t0 = time.perf_counter()
        timed(1)  # the first call builds the sampler (auto: check and timing, an ONNX export on a CPU)
        first = time.perf_counter() - t0
        timed(3)
        rows["fdp"] = timed(args.calls)
        backend = handle.sampler.backend
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"command": " ".join(sys.argv), "device": platform.processor() or platform.machine(),
              "torch": torch.__version__, "fdp": fdp.__version__, "parameters": params, "backend": backend,
              "first_accelerated_call_s": first, "seconds": rows, "median_s": med,
              "speedup": med["lerobot"] / med["fdp"]}
    print(f"{params / 1e6:.1f} M parameters, DDIM {args.steps}: LeRobot select_action {med['lerobot'] * 1e3:.2f} ms, "
          f"accelerated ({backend}) {med['fdp'] * 1e3:.2f} ms: {result['speedup']:.2f}x "
          f"(first accelerated call {first:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
