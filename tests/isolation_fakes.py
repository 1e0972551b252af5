"""Backends that misbehave the way unverified device code can, for tests of isolated first use.

Each test writes a one-line module per fake (``BACKEND = FakeNative(...)``) and registers it with
``fdp.backends.register_backend``, so that the child process imports it by that module path as it would
a real backend. A fake computes what the torch backend computes; its misbehaviour happens only in a child
of fdp.isolation: in the caller's own process it raises instead, so that a test in which isolation failed
to protect the caller fails cleanly (with "ran in the caller's process") instead of hanging or aborting
the test run.
"""

import os
import time

import torch

from fdp import isolation
from fdp.backends import Backend, get_backend

IN_PARENT_MESSAGE = "ran in the caller's process"


class FakeNative(Backend):
    runs_native_code = True

    def __init__(self, name, priority, behaviour):
        self.name, self.priority, self.behaviour = name, priority, behaviour
        self.runs_here = 0  # calls in this process

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, policy, table, dtype):
        return None

    def prepare(self, policy, table, dtype=None):
        inner = get_backend("torch").prepare(policy, table, dtype)
        fake = self
        behaviour = self.behaviour
        if behaviour == "abort-k2":  # only on policies of two components
            behaviour = "abort" if len(policy.components) == 2 else "good"

        class Prepared:
            def run(self, global_cond, x_T, step_noise):
                out = inner.run(global_cond, x_T, step_noise)
                if os.environ.get(isolation.CHILD_ENV) != "1":
                    fake.runs_here += 1
                    if behaviour not in ("good", "off"):
                        raise RuntimeError(IN_PARENT_MESSAGE)
                if behaviour == "hang":
                    time.sleep(3600)  # a wait that never completes
                elif behaviour == "abort":
                    os.abort()  # a device-side trap takes the process down
                elif behaviour == "poison":
                    # A sticky device error: this call returns, every later computation of the process fails.
                    def broken(*args, **kwargs):
                        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

                    torch.nn.functional.linear = broken
                elif behaviour == "off":
                    out = out * 1.01
                return out

        return Prepared()
