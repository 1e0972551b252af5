"""A tiny LeRobotDataset on disk (no Hub): state, one small camera, actions; a few episodes.

Each episode moves a point along a circle from its own start angle; the state
is the point, the action the next point, and the camera image shows a bright
square where the point is. Actions follow from the observations, so a policy
can learn them and the loss falls within a few dozen steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REPO_ID = "local/fdp_tiny"
IMAGE_SIZE = 32
FEATURES = {
    "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    "observation.image": {"dtype": "image", "shape": (IMAGE_SIZE, IMAGE_SIZE, 3),
                          "names": ["height", "width", "channels"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
}


def point(episode: int, t: int) -> np.ndarray:
    angle = 2 * math.pi * (episode / 4 + t / 40)
    return np.array([math.cos(angle), math.sin(angle)], dtype=np.float32)


def image_of(p: np.ndarray) -> np.ndarray:
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    r, c = ((p + 1) / 2 * (IMAGE_SIZE - 6)).astype(int)
    img[r:r + 6, c:c + 6] = 255
    return img


def build(root: Path, episodes: int = 4, frames: int = 30):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset.create(REPO_ID, fps=10, features=FEATURES, root=root, use_videos=False)
    for e in range(episodes):
        for t in range(frames):
            p = point(e, t)
            ds.add_frame({"observation.state": p, "observation.image": image_of(p), "action": point(e, t + 1),
                          "task": "follow the circle"})
        ds.save_episode()
    ds.finalize()
    return ds
