"""Adapters that put fdp's sampler under diffusion policies trained elsewhere.

* :mod:`fdp.integrations.lerobot`: LeRobot's ``DiffusionPolicy`` (``load_pretrained``, ``accelerate``).
* :mod:`fdp.integrations.diffusion_policy`: Chi et al.'s U-Net policies (``accelerate``).

Neither imports the other project: they read its files or duck-type its objects.
"""
