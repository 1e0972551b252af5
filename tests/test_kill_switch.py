"""FDP_DISABLE: backends named (or their family) are removed from every code path, at the registry."""

import logging
import subprocess
import sys
import types

import pytest
import torch
from helpers import make_mlp_policy

import fdp
from fdp import backends
from fdp.backends import Backend, get_backend, register_backend, selection


class _Copy(Backend):
    """The torch backend under another name (correct, so auto would pick it by its priority)."""

    def __init__(self, name, priority):
        self.name, self.priority = name, priority

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, policy, table, dtype):
        return None

    def prepare(self, policy, table, dtype=None):
        return get_backend("torch").prepare(policy, table, dtype)


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path / "cache"))
    # Candidates win by priority, as on a device auto does not time: on the CPU auto times the verified ones
    # (onnxruntime, torch-batched among them), and which is fastest here is not what these tests are about.
    monkeypatch.setattr(selection, "_TIMED_DEVICES", ("cuda",))
    saved_modules, saved_loaded = dict(backends._MODULES), dict(backends._LOADED)
    for name, priority in [("zz", 600), ("zz-persistent", 700), ("yy", 500)]:
        module = types.ModuleType(f"fdp_test_kill_{name.replace('-', '_')}")
        module.BACKEND = _Copy(name, priority)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        register_backend(name, module.__name__)
    backends._warned.clear()
    yield
    backends._MODULES.clear()
    backends._MODULES.update(saved_modules)
    backends._LOADED.clear()
    backends._LOADED.update(saved_loaded)


def _sampler(**kw):
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    return fdp.Sampler(make_mlp_policy(K=2, dtype=torch.float32), sched, num_inference_steps=3, **kw)


def test_a_family_and_a_name_are_removed_from_auto_explicit_and_available_backends(fakes, monkeypatch):
    assert _sampler().backend == "zz-persistent"  # without the switch: the highest priority
    monkeypatch.setenv(backends.DISABLE_ENV, "zz, cuda")
    assert set(backends.disabled_backends()) == {"zz", "zz-persistent", "cuda", "cuda-persistent"}
    s = _sampler()
    rows = {c.name: c for c in s.selection.candidates}
    assert s.backend == "yy"
    for name in ("zz", "zz-persistent"):
        assert rows[name].status == "unavailable" and "disabled by FDP_DISABLE=zz, cuda" in rows[name].reason
    info = fdp.available_backends("cpu")
    assert not info["zz-persistent"].available and "FDP_DISABLE" in info["zz-persistent"].reason
    assert info["yy"].available
    with pytest.raises(ValueError, match=r"backend 'zz' cannot serve .*disabled by FDP_DISABLE"):
        _sampler(backend="zz")
    monkeypatch.setenv(backends.DISABLE_ENV, "yy")
    assert _sampler().backend == "zz-persistent"


def test_an_unknown_name_and_the_reference_are_warned_about_by_name(fakes, monkeypatch, caplog):
    monkeypatch.setenv(backends.DISABLE_ENV, "cdua,torch,yy")
    with caplog.at_level(logging.WARNING, logger="fdp"):
        assert set(backends.disabled_backends()) == {"yy"}
        backends.disabled_backends()  # warned once per value, not at every selection
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'cdua'" in warnings[0] and "neither a backend nor a family" in warnings[0]
    assert "'torch'" in warnings[1] and "cannot be disabled" in warnings[1]
    assert _sampler(backend="torch").backend == "torch"


def test_fdp_info_shows_the_switch():
    env = {**__import__("os").environ, "FDP_DISABLE": "triton"}
    out = subprocess.run([sys.executable, "-m", "fdp", "info", "--device", "cpu"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "kill switch FDP_DISABLE: 'triton' (removes triton, triton-persistent)" in out
    assert "triton             not available: disabled by FDP_DISABLE=triton" in out
    assert "isolated first use (FDP_ISOLATE): on" in out


def test_the_path_the_integrations_take_obeys_it(fakes, monkeypatch):
    # LeRobot's and diffusion_policy's adapters build their samplers with Sampler.for_unet.
    unet = fdp.ConditionalUnet1D(2, global_cond_dim=5, down_dims=[8, 16], diffusion_step_embed_dim=8)
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    assert fdp.Sampler.for_unet(unet, sched, horizon=4, action_dim=2, num_inference_steps=2).backend == "zz-persistent"
    monkeypatch.setenv(backends.DISABLE_ENV, "zz")
    assert fdp.Sampler.for_unet(unet, sched, horizon=4, action_dim=2, num_inference_steps=2).backend == "yy"
    with pytest.raises(ValueError, match="disabled by FDP_DISABLE=zz"):
        fdp.Sampler.for_unet(unet, sched, horizon=4, action_dim=2, backend="zz-persistent")
