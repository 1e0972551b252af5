"""LeRobot policy type ``fdp``: a factorized diffusion policy (K denoisers + a router) for ``lerobot-train``.

LeRobot imports this package at start-up (it is a ``lerobot_policy_*``
distribution); importing it registers ``FdpConfig`` as ``--policy.type=fdp``.
LeRobot then finds ``FdpPolicy`` in ``modeling_fdp`` and
``make_fdp_pre_post_processors`` in ``processor_fdp`` by its naming convention.
"""

from .configuration_fdp import FdpConfig

__all__ = ["FdpConfig"]
