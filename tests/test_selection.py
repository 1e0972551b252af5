"""backend="auto": verify each candidate against torch, time on CUDA, cache the decision; verify=True for named ones."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from helpers import KERNEL_TOL, make_mlp_policy

import fdp
from fdp import backends, tolerances
from fdp.backends import Backend, VerificationError, get_backend, register_backend, selection


class _Fake(Backend):
    """The torch backend with its output scaled by ``1 + offset`` (or raising), counting its calls."""

    def __init__(self, name, priority, offset=0.0, raises=False, max_batch=None, default_dtype=None):
        self.name, self.priority, self.offset, self.raises = name, priority, offset, raises
        self.max_batch = max_batch  # raise on larger batches
        self.default_dtype = default_dtype  # default_weight_dtype's answer (None: the policy's)
        self.runs = 0
        self.packed_dtypes = []

    def default_weight_dtype(self, policy_dtype):
        return self.default_dtype or policy_dtype

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, policy, table, dtype):
        return None

    def prepare(self, policy, table, dtype=None):
        self.packed_dtypes.append(dtype)
        inner = get_backend("torch").prepare(policy, table, dtype)
        fake = self

        class Prepared:
            def run(self, global_cond, x_T, step_noise):
                fake.runs += 1
                if fake.raises or (fake.max_batch is not None and x_T.shape[0] > fake.max_batch):
                    raise RuntimeError("illegal memory access (simulated)")
                return inner.run(global_cond, x_T, step_noise) * (1 + fake.offset)

        return Prepared()


@pytest.fixture
def register(monkeypatch, tmp_path):
    """Register fakes through fdp.backends.register_backend; the registry is restored afterwards.

    The fakes are torch itself, as fast as the reference: these tests check the order by priority (what
    ``auto`` does on a device it does not time), so the CPU is untimed here; the timed decision has its own
    tests with fixed times."""
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(selection, "_TIMED_DEVICES", ("cuda",))
    # The real CPU backends would compete with the fakes: these tests are about the fakes alone.
    for name in CPU_BACKENDS:
        monkeypatch.delitem(backends._MODULES, name)
    saved_modules, saved_loaded = dict(backends._MODULES), dict(backends._LOADED)

    def add(name, priority, **kw):
        be = _Fake(name, priority, **kw)
        module = types.ModuleType(f"fdp_test_backend_{name.replace('-', '_')}")
        module.BACKEND = be
        monkeypatch.setitem(sys.modules, module.__name__, module)
        register_backend(name, module.__name__)
        return be

    yield add
    backends._MODULES.clear()
    backends._MODULES.update(saved_modules)
    backends._LOADED.clear()
    backends._LOADED.update(saved_loaded)


#: Registered backends that run on the CPU above torch (tested against it in test_sampler.py and
#: test_fused_mlp.py).
CPU_BACKENDS = ("onnxruntime", "torch-batched")


def _sched():
    return fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def _policy(hidden=16):
    return make_mlp_policy(K=3, hidden=hidden, dtype=torch.float32)


def test_a_backend_one_percent_off_is_never_picked_and_the_warning_names_it(register, caplog):
    off = register("off-by-1pct", 1000, offset=0.01)
    with caplog.at_level(logging.WARNING, logger="fdp"):
        s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert s.backend == "torch" and off.runs == 1
    row = {c.name: c for c in s.selection.candidates}["off-by-1pct"]
    assert row.status == "disagrees" and row.rel_error == pytest.approx(0.01, rel=1e-3)
    assert row.tolerance == KERNEL_TOL[torch.float32]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'off-by-1pct'" in warning and "1.00e-02" in warning and "report" in warning


def test_a_correct_backend_is_picked_over_torch_and_below_a_wrong_one(register, caplog):
    register("off-by-1pct", 1000, offset=0.01)
    good = register("good", 500)
    broken = register("broken", 700, raises=True)
    with caplog.at_level(logging.INFO, logger="fdp"):
        s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert s.backend == "good" and s.selection.mode == "priority"
    rows = {c.name: c for c in s.selection.candidates}
    assert rows["good"].status == "picked" and rows["good"].rel_error < KERNEL_TOL[torch.float32]
    assert rows["broken"].status == "failed" and "illegal memory access" in rows["broken"].reason
    assert rows["torch"].status == "ranked below"
    # The sampler runs what was verified: same numbers as torch.
    cond = torch.randn(2, 5)
    x_T, noise = s.noise(2, torch.Generator().manual_seed(3))
    ref = fdp.Sampler(s.policy, _sched(), num_inference_steps=4, backend="torch")(cond, x_T=x_T, step_noise=noise)
    runs = good.runs
    assert torch.equal(s(cond, x_T=x_T, step_noise=noise), ref) and good.runs == runs + 1
    # The info line names every backend skipped and why.
    info = next(r.getMessage() for r in caplog.records if "picked 'good'" in r.getMessage())
    for name in backends.backend_names():
        if name != "good":
            assert f"skipped {name!r}" in info, (name, info)
    assert "broken" in caplog.text and any(r.levelno == logging.WARNING and "'broken'" in r.getMessage()
                                           for r in caplog.records)


def test_the_cache_is_written_reused_and_invalidated_by_new_weight_shapes(register, caplog, tmp_path):
    off = register("off-by-1pct", 1000, offset=0.01)
    good = register("good", 500)
    first = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert not first.selection.cached and first.backend == "good"
    files = list((tmp_path / "cache").glob("select-*.json"))
    assert [str(f) for f in files] == [first.selection.cache_file]
    stored = json.loads(files[0].read_text())
    assert stored["selection"]["backend"] == "good" and stored["key"]["batch_size"] == 1
    runs = (off.runs, good.runs)

    # Same shapes (other weights): decided from the cache, no candidate runs again; the warning is repeated.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdp"):
        again = fdp.Sampler(make_mlp_policy(K=3, hidden=16, dtype=torch.float32, seed=7), _sched(),
                            num_inference_steps=4)
    assert again.selection.cached and again.backend == "good" and (off.runs, good.runs) == runs
    assert "'off-by-1pct'" in caplog.text and "cached" in caplog.text
    assert again.selection.candidates == first.selection.candidates

    # Other weight shapes: a new key, checked again, a second file.
    wider = fdp.Sampler(_policy(hidden=24), _sched(), num_inference_steps=4)
    assert not wider.selection.cached and off.runs == runs[0] + 1 and good.runs == runs[1] + 1
    assert len(list((tmp_path / "cache").glob("select-*.json"))) == 2
    # So do another batch size, dtype, schedule and set of candidates.
    keys = {json.dumps(selection._cache_key(p, t, torch.device("cpu"), d, b, [good]))
            for p, t, d, b in [(_policy(), _sched().step_table(4), torch.float32, 1),
                               (_policy(), _sched().step_table(4), torch.float32, 2),
                               (_policy(), _sched().step_table(4), torch.bfloat16, 1),
                               (_policy(), _sched().step_table(5), torch.float32, 1)]}
    assert len(keys) == 4
    assert selection._cache_key(_policy(), _sched().step_table(4), torch.device("cpu"), torch.float32, 1, [good]) != \
        selection._cache_key(_policy(), _sched().step_table(4), torch.device("cpu"), torch.float32, 1, [good, off])


def test_the_routing_strategy_is_part_of_the_cache_key():
    # tanh gives signed, unnormalised weights: a backend verified under softmax is checked again.
    keys = []
    for strategy in ("soft", "tanh", "hard"):
        p = _policy()
        p.router.set_strategy(strategy)
        keys.append(json.dumps(selection._cache_key(p, _sched().step_table(4), torch.device("cpu"), torch.float32, 1,
                                                    [])))
    assert len(set(keys)) == 3


def test_an_unreadable_cache_file_is_checked_again_and_rewritten(register):
    good = register("good", 500)
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    with open(s.selection.cache_file, "w") as f:
        f.write("{not json")
    runs = good.runs
    again = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert not again.selection.cached and good.runs == runs + 1
    assert json.loads(open(again.selection.cache_file).read())["selection"]["backend"] == "good"


def test_an_unwritable_cache_warns_and_still_selects(register, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(selection.CACHE_ENV, str(blocker / "cache"))
    register("good", 500)
    with caplog.at_level(logging.WARNING, logger="fdp"):
        s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert s.backend == "good" and s.selection.cache_file is None and selection.CACHE_ENV in caplog.text


def test_no_candidate_above_torch_costs_no_check_and_no_file(register, tmp_path):
    tie = register("tie", 0)
    below = register("below", -5)
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4)
    assert s.backend == "torch" and s.selection.why.startswith("no faster backend")
    assert tie.runs == below.runs == 0 and not (tmp_path / "cache").exists()
    skipped = s.selection.skipped()
    assert skipped["tie"] == "ranked below: priority 0 <= 0 of 'torch'"
    assert skipped["below"] == "ranked below: priority -5 <= 0 of 'torch'"


def test_a_named_backend_is_never_replaced_and_verify_checks_it(register):
    off = register("off-by-1pct", 1000, offset=0.01)
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="off-by-1pct")
    assert s.backend == "off-by-1pct" and off.runs == 0 and s.selection.mode == "explicit"
    with pytest.raises(VerificationError, match=r"'off-by-1pct' disagrees .* 1\.00e-02 > tolerance 1e-04"):
        fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="off-by-1pct", verify=True)
    register("broken", 700, raises=True)
    with pytest.raises(VerificationError, match="'broken' failed .*illegal memory access"):
        fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="broken", verify=True)
    register("good", 500)
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="good", verify=True)
    assert s.backend == "good" and s.selection.candidates[0].rel_error < KERNEL_TOL[torch.float32]
    assert "verified" in s.selection.why


def test_a_named_backend_packs_in_its_default_dtype_and_auto_keeps_the_policys(register):
    be = register("prefers-bf16", 1000, default_dtype=torch.bfloat16)
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="prefers-bf16", verify=True)
    assert s.dtype == torch.bfloat16 and set(be.packed_dtypes) == {torch.bfloat16}
    # verified against the bound of the dtype it packs, not the policy's
    assert s.selection.candidates[0].tolerance == tolerances.tolerance(torch.bfloat16, torch.float32)
    be.packed_dtypes.clear()
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="prefers-bf16", dtype="float32")
    assert s.dtype == torch.float32 and be.packed_dtypes == [torch.float32]
    be.packed_dtypes.clear()
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="auto")
    assert s.backend == "prefers-bf16" and s.dtype == torch.float32 and set(be.packed_dtypes) == {torch.float32}
    # a named backend follows the policy to a new dtype through its default again
    policy = _policy()
    s = fdp.Sampler(policy, _sched(), num_inference_steps=4, backend="prefers-bf16")
    policy.to(torch.float64)
    be.packed_dtypes.clear()
    s.repack()
    assert s.dtype == torch.bfloat16 and be.packed_dtypes == [torch.bfloat16]


def test_cuda_persistent_defaults_to_bfloat16_weights_for_a_float32_policy():
    be = get_backend("cuda-persistent")
    assert be.default_weight_dtype(torch.float32) is torch.bfloat16
    assert be.default_weight_dtype(torch.float16) is torch.float16
    assert be.default_weight_dtype(torch.bfloat16) is torch.bfloat16
    for name in ("torch", "cuda", "triton-persistent"):
        assert get_backend(name).default_weight_dtype(torch.float32) is torch.float32


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="batch_size"):
        fdp.Sampler(_policy(), _sched(), num_inference_steps=4, batch_size=0)
    with pytest.raises(TypeError, match="verify"):
        fdp.Sampler(_policy(), _sched(), num_inference_steps=4, verify="yes")


def test_on_a_timed_device_the_fastest_verified_backend_wins(register, monkeypatch):
    """The decision logic of the CUDA path, with the CUDA-event timer replaced by fixed times."""
    register("off-by-1pct", 1000, offset=0.01)
    register("small-batches-only", 800, max_batch=8)  # verified at batch 4, fails at 16
    register("slow", 600)
    register("fast", 400)
    times = {}

    def fake_time(self, prep, budget_s):
        assert 0 < budget_s <= selection.TIME_BUDGET_S
        prep.run(*self._draw(self.batch_size, seed=1))  # the real call at the batch size asked for
        name = next(n for n, p in prepared.items() if p is prep)
        return times[name]

    prepared = {}
    real_check = selection._Verifier.check

    def check(self, be):
        row, prep = real_check(self, be)
        prepared[be.name] = prep
        return row, prep

    real_prepare = get_backend("torch").prepare
    monkeypatch.setattr(get_backend("torch"), "prepare",
                        lambda *a, **k: prepared.setdefault("torch", real_prepare(*a, **k)))
    monkeypatch.setattr(selection._Verifier, "check", check)
    monkeypatch.setattr(selection._Verifier, "time", fake_time)
    monkeypatch.setattr(selection, "_TIMED_DEVICES", ("cpu",))
    times.update({"slow": 2.0, "fast": 0.5, "torch": 4.0})
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, batch_size=16)
    assert s.backend == "fast" and s.selection.mode == "timed"
    rows = {c.name: c for c in s.selection.candidates}
    assert rows["fast"].status == "picked" and rows["fast"].time_ms == 0.5
    assert "4.00x the time of 'fast'" in rows["slow"].reason and rows["torch"].time_ms == 4.0
    assert rows["torch"].status == "reference"  # timed beside the others, never "ranked below" them
    assert rows["off-by-1pct"].status == "disagrees" and rows["off-by-1pct"].time_ms is None
    small = rows["small-batches-only"]
    assert small.status == "failed" and "at batch 16" in small.reason and small.rel_error < KERNEL_TOL[torch.float32]
    assert "fastest of 3 verified" in s.selection.why and "batch 16" in s.selection.why
    assert s._prepared is prepared["fast"]  # the verified pack is the one used


def test_tolerances_are_one_table():
    assert KERNEL_TOL is tolerances.REL_TOL
    assert tolerances.tolerance(torch.float32, torch.float32) == 1e-4
    assert tolerances.tolerance(torch.bfloat16, torch.bfloat16) == 2e-2
    assert tolerances.tolerance(torch.bfloat16, torch.float32) == tolerances.ROUNDED_WEIGHTS_TOL[torch.bfloat16]
    assert tolerances.reference_dtype(torch.float16) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        tolerances.tolerance(torch.int8, torch.float32)
    assert tolerances.rel_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == float("inf")


def test_half_precision_policies_are_checked_against_a_float32_reference(register):
    register("good", 500)
    pol = _policy().to(torch.bfloat16)
    s = fdp.Sampler(pol, _sched(), num_inference_steps=4)
    row = {c.name: c for c in s.selection.candidates}["good"]
    # The fake computes in bfloat16 (eager torch), so its error is the bfloat16 rounding of a whole loop.
    assert s.backend == "good" and row.tolerance == KERNEL_TOL[torch.bfloat16] and 0 < row.rel_error < 2e-2


def test_selection_round_trips_and_prints(register):
    register("good", 500)
    sel = fdp.Sampler(_policy(), _sched(), num_inference_steps=4).selection
    assert backends.Selection.from_dict(json.loads(json.dumps(sel.to_dict()))) == sel
    text = str(sel)
    assert text.startswith("backend 'good'") and "ranked below" in text and "cuda-persistent" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_gpu_times_the_verified_backends_and_caches(tmp_path):
    """Native kernels (a fresh interpreter without TRITON_INTERPRET): every candidate verified, timed, cached."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([here, *sys.path]), FDP_CACHE_DIR=str(tmp_path))
    code = textwrap.dedent("""
        import time, torch, fdp
        from helpers import make_mlp_policy
        pol = make_mlp_policy(K=4, hidden=256, horizon=16, action_dim=7, cond_dim=5, dtype=torch.float32).cuda()
        sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
        t0 = time.perf_counter()
        s = fdp.Sampler(pol, sched, num_inference_steps=10, batch_size=16)
        first = time.perf_counter() - t0
        print(s.selection, f"\\nfirst selection {first:.2f} s", flush=True)
        sel = s.selection
        assert sel.mode == "timed" and not sel.cached, sel
        timed = [c for c in sel.candidates if c.time_ms is not None]
        assert len(timed) >= 2 and min(timed, key=lambda c: c.time_ms).name == s.backend, sel
        for c in sel.candidates:
            if c.status in ("picked", "verified"):
                assert c.rel_error is not None and c.rel_error <= c.tolerance, c
        t0 = time.perf_counter()
        again = fdp.Sampler(pol, sched, num_inference_steps=10, batch_size=16)
        print(f"cached selection {time.perf_counter() - t0:.3f} s")
        assert again.selection.cached and again.backend == s.backend
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]


def test_fdp_tune_shows_the_decision_and_refresh_checks_again(register, capsys, tmp_path):
    from fdp.cli import main

    good = register("good", 500)
    assert main(["tune", "--K", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["backend"] == "good" and not first["cached"] and first["batch_size"] == 1
    runs = good.runs
    assert main(["tune", "--K", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend 'good'") and "from the cache" in out and good.runs == runs
    assert main(["tune", "--K", "2", "--refresh", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["cached"] and good.runs == runs + 1
    register("off-by-1pct", 1000, offset=0.01)
    assert main(["tune", "--K", "2", "--backend", "off-by-1pct"]) == 1
    assert "'off-by-1pct' disagrees" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # a usage error: one line, exit status 2, before any work
        main(["tune", "--batch", "0"])
    assert refused.value.code == 2 and "argument --batch: expected an int >= 1" in capsys.readouterr().err
    torch.save({"not": "a policy"}, tmp_path / "p.pt")
    assert main(["tune", "--policy", str(tmp_path / "p.pt")]) == 2
    assert "FactorizedPolicy" in capsys.readouterr().err
    torch.save(_policy(), tmp_path / "policy.pt")
    assert main(["tune", "--policy", str(tmp_path / "policy.pt"), "--steps", "ddpm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "good"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_passes_a_real_fused_backend(dtype):
    """The Triton kernel (interpreted) through the same check: correct kernels pass at the library's bounds."""
    pytest.importorskip("triton")
    s = fdp.Sampler(_policy(), _sched(), num_inference_steps=4, backend="triton-persistent", dtype=dtype,
                    verify=True, batch_size=3)
    row = s.selection.candidates[0]
    assert s.backend == "triton-persistent" and row.tolerance == tolerances.tolerance(dtype, torch.float32)
    assert 0 < row.rel_error <= row.tolerance, row

