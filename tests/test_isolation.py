"""Isolated first use: a backend running native code is tried first in a child process (fdp.isolation).

The fakes (tests/isolation_fakes.py) hang, abort or break their own process only in the child; run in
this process they raise "ran in the caller's process", so a test in which isolation did not protect the
caller fails instead of hanging or killing the test run. Each child imports torch (3-4 s on an idle
2-core machine, over 10 s on a loaded one); the children of one selection run as many at a time as
there are cores.
"""

import logging
import sys

import pytest
import torch
from helpers import make_mlp_policy
from isolation_fakes import IN_PARENT_MESSAGE

import fdp
from fdp import backends, isolation
from fdp.backends import VerificationError, get_backend, register_backend, selection

# Seconds a child may take once it is ready (imports done): far above the ~0.5 s of CPU time a 4-step MLP
# policy, the probe and the report need on a loaded 2-core machine, and the time the hanging fake costs.
RUN_TIMEOUT_S = "15"


@pytest.fixture
def register(monkeypatch, tmp_path):
    """``add(name, priority, behaviour)``: a fake in a module of its own that a child process can import."""
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(isolation.TIMEOUT_ENV, RUN_TIMEOUT_S)
    monkeypatch.delenv(isolation.ISOLATE_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Candidates win by priority, as on a device auto does not time: on the CPU auto times the verified ones, and
    # whether fake-good, onnxruntime or torch is fastest on this machine is not what these tests are about.
    monkeypatch.setattr(selection, "_TIMED_DEVICES", ("cuda",))
    # Only the fakes and the reference compete: the real CPU backends (which run no native code of fdp's) would
    # take the place a test expects the reference or a fake in.
    monkeypatch.setenv(backends.DISABLE_ENV, "onnxruntime,torch-batched")
    saved_modules, saved_loaded = dict(backends._MODULES), dict(backends._LOADED)
    added = []

    def add(name, priority, behaviour):
        module = f"fdp_isolation_fake_{name.replace('-', '_')}"
        (tmp_path / f"{module}.py").write_text(
            f"from isolation_fakes import FakeNative\nBACKEND = FakeNative({name!r}, {priority}, {behaviour!r})\n")
        added.append(module)
        register_backend(name, module)
        return get_backend(name)

    yield add
    backends._MODULES.clear()
    backends._MODULES.update(saved_modules)
    backends._LOADED.clear()
    backends._LOADED.update(saved_loaded)
    for module in added:
        sys.modules.pop(module, None)


def _sched():
    return fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def _policy(seed=0):
    return make_mlp_policy(K=2, hidden=16, dtype=torch.float32, seed=seed)


def _rows(s):
    return {c.name: c for c in s.selection.candidates}


def test_auto_skips_a_hang_an_abort_and_a_poisoned_process_then_samples_with_the_next(register, caplog):
    hang = register("fake-hang", 900, "hang")
    abort = register("fake-abort", 800, "abort")
    poison = register("fake-poison", 700, "poison")
    register("fake-off", 600, "off")
    good = register("fake-good", 500, "good")
    before = isolation.children_started
    with caplog.at_level(logging.WARNING, logger="fdp"):
        s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, batch_size=7)
    assert isolation.children_started - before == 5  # one child per candidate running native code
    assert s.backend == "fake-good"
    rows = _rows(s)
    assert rows["fake-hang"].status == "failed" and "did not finish within 15 s" in rows["fake-hang"].reason
    assert rows["fake-abort"].status == "failed" and "SIGABRT" in rows["fake-abort"].reason
    assert rows["fake-poison"].status == "failed"
    assert "left its process unusable" in rows["fake-poison"].reason
    assert "illegal memory access" in rows["fake-poison"].reason
    # A wrong result in the child is "disagrees", as in this process.
    assert rows["fake-off"].status == "disagrees" and "separate process" in rows["fake-off"].reason
    assert rows["fake-off"].rel_error == pytest.approx(0.01, rel=1e-3)
    assert "separate process" in rows["fake-good"].reason and rows["fake-good"].status == "picked"
    # None of the three ran here; the warning names each and why.
    assert (hang.runs_here, abort.runs_here, poison.runs_here) == (0, 0, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, why in [("fake-hang", "did not finish"), ("fake-abort", "SIGABRT"), ("fake-poison", "unusable")]:
        assert any(f"skips {name!r}" in w and why in w for w in warnings), (name, warnings)
    # This process is intact and samples what the torch reference samples, with the picked backend.
    cond = torch.randn(3, 5)
    x_T, noise = s.noise(3, torch.Generator().manual_seed(1))
    ref = fdp.Sampler(s.policy, _sched(), num_inference_steps=4, backend="torch")(cond, x_T=x_T, step_noise=noise)
    runs = good.runs_here
    assert torch.equal(s(cond, x_T=x_T, step_noise=noise), ref) and good.runs_here == runs + 1

    # A second Sampler (other weights, same shapes) decides from the cache: no child, no run of the bad ones.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdp"):
        again = fdp.Sampler(_policy(seed=3), _sched(), num_inference_steps=4, batch_size=7)
    assert isolation.children_started - before == 5
    assert again.selection.cached and again.backend == "fake-good"
    assert (hang.runs_here, abort.runs_here, poison.runs_here) == (0, 0, 0)
    assert "'fake-abort'" in caplog.text and "cached" in caplog.text


def test_verify_true_raises_with_the_childs_reason_and_caches_the_verdict(register):
    abort = register("fake-abort", 800, "abort")
    before = isolation.children_started
    with pytest.raises(VerificationError, match=r"'fake-abort'.*killed by signal SIGABRT"):
        fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="fake-abort", verify=True)
    assert isolation.children_started - before == 1
    # The next check of the same variant reads the verdict instead of starting a child.
    with pytest.raises(VerificationError, match=r"SIGABRT.*cached verdict of an earlier process"):
        fdp.Sampler(_policy(seed=5), _sched(), num_inference_steps=4, backend="fake-abort", verify=True)
    assert isolation.children_started - before == 1 and abort.runs_here == 0
    # Named without verify=True, a backend is the caller's choice and runs here at once.
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="fake-abort")
    with pytest.raises(RuntimeError, match=IN_PARENT_MESSAGE):
        s(torch.randn(1, 5))
    assert isolation.children_started - before == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_the_opt_out_checks_in_this_process_and_starts_no_child(register, monkeypatch, how):
    hang = register("fake-hang", 900, "hang")
    before = isolation.children_started
    kw = {}
    if how == "argument":
        kw["isolate"] = False
    else:
        monkeypatch.setenv(isolation.ISOLATE_ENV, "0")
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, **kw)
    assert isolation.children_started == before and hang.runs_here == 1
    assert s.backend == "torch" and IN_PARENT_MESSAGE in _rows(s)["fake-hang"].reason


def test_which_backends_run_native_code():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not get_backend("torch").native_code_on(cpu) and not get_backend("torch").native_code_on(cuda)
    for name in ("cuda", "cuda-persistent", "graph"):
        assert get_backend(name).native_code_on(cuda), name
    for name in ("triton", "triton-persistent"):
        assert not get_backend(name).native_code_on(cpu)  # the interpreter
        assert get_backend(name).native_code_on(cuda) is (isolation.os.environ.get("TRITON_INTERPRET") != "1")


def test_isolate_and_the_environment_are_validated(monkeypatch, caplog):
    with pytest.raises(TypeError, match="isolate"):
        isolation.enabled("no")
    monkeypatch.setenv(isolation.ISOLATE_ENV, "maybe")
    with caplog.at_level(logging.WARNING, logger="fdp"):
        assert isolation.enabled() is True
    assert "FDP_ISOLATE='maybe'" in caplog.text
    monkeypatch.setenv(isolation.TIMEOUT_ENV, "-1")
    assert isolation.run_timeout() == isolation.RUN_TIMEOUT_S
