"""Run LeRobot's trainer as ``lerobot-train`` does, for tests/test_lerobot_plugin.py.

    python tests/lerobot_plugin/run_lerobot.py [lerobot-train's arguments...]
    torchrun --standalone --nproc_per_node 2 tests/lerobot_plugin/run_lerobot.py ...

calls ``lerobot.scripts.lerobot_train.main`` (the ``lerobot-train`` console
script's target) after two things the tests need:

* ``torchvision_cpu.install()``: CI's torchvision cannot load its extension
  beside the CPU torch build (see tests/torchvision_cpu.py);
* with ``FDP_TEST_RECORD=<folder>``, a wrapper around LeRobot's
  ``update_policy`` that records, per process, every step's loss (the value
  LeRobot logs, before the update), the optimiser's step count and the
  policy's weights before the first update, and the weights after the last
  one, into ``<folder>/rank<i>.pt``. It changes nothing LeRobot computes.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for torchvision_cpu

import torchvision_cpu  # noqa: E402

torchvision_cpu.install()

import torch  # noqa: E402


def _record(module, folder: Path):
    original = module.update_policy
    seen = {"losses": [], "first": None}

    def update_policy(train_metrics, policy, batch, optimizer, grad_clip_norm, accelerator, **kwargs):
        model = accelerator.unwrap_model(policy)
        if seen["first"] is None:
            steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
            seen["first"] = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                             "optimizer_steps": sorted(set(steps))}
        out = original(train_metrics, policy, batch, optimizer, grad_clip_norm, accelerator, **kwargs)
        seen["losses"].append(train_metrics.metrics["loss"].val)
        seen["rank"], seen["model"] = accelerator.process_index, model
        seen["world_size"] = accelerator.num_processes
        return out

    module.update_policy = update_policy

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        model = seen.pop("model")
        torch.save({**seen, "last": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   folder / f"rank{seen['rank']}.pt")

    return save


def main() -> None:
    from lerobot.scripts import lerobot_train

    record = os.environ.get("FDP_TEST_RECORD")
    save = _record(lerobot_train, Path(record)) if record else None
    lerobot_train.main()
    if save is not None:
        save()


if __name__ == "__main__":
    main()
