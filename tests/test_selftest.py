"""``fdp selftest``: every backend against the reference in child processes, one JSON, a non-zero exit on failure."""

import json

from test_isolation import register  # noqa: F401 - registers fakes a child process can import

from fdp import isolation, selftest
from fdp.cli import main


def test_on_a_cpu_it_reports_what_it_can_check_and_exits_zero(tmp_path, capsys):
    out = tmp_path / "st.json"
    assert main(["selftest", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == selftest.SCHEMA and result["passed"] is True and result["device"] == "cpu"
    # The backends that run native code need a GPU: each says why it was not checked. The CPU backends (which
    # run none of fdp's) are checked here, against the reference, like any other.
    native = {"graph", "triton", "triton-persistent", "cuda", "cuda-persistent"}
    assert native <= set(result["backends"])
    assert all(result["backends"][n] != "checked" for n in native)
    assert "TRITON_INTERPRET=1" in result["backends"]["triton"] and "--backends" in result["backends"]["triton"]
    assert result["backends"]["torch-batched"] == "checked"
    rows = [r for r in result["cases"] if r["backend"] == "torch-batched"]
    assert rows and all(r["status"] == "ok" and r["rel_error"] <= r["tolerance"] for r in rows)
    assert result["timing"]["status"] == "skipped"
    text = capsys.readouterr().out
    assert "PASSED" in text and "torch-batched" in text and str(out) in text


def test_failures_disagreements_and_crashes_are_recorded_per_case_and_fail_the_run(register):  # noqa: F811
    register("st-good", 500, "good")
    register("st-off", 400, "off")
    register("st-abort-k2", 300, "abort-k2")
    before = isolation.children_started
    saved = []
    # No fake hangs here: a generous limit keeps a slow case on a loaded machine from counting as a hang.
    result = selftest.run("cpu", backends=["st-good", "st-off", "st-abort-k2"], timeout_s=120,
                          save=lambda r: saved.append(json.loads(json.dumps(r))))
    grid = selftest.CPU_GRID
    n = len(grid["components"]) * len(grid["K"]) * len(grid["batch"]) * len(grid["dtypes"]) * len(grid["schedules"])
    by = {name: [r for r in result["cases"] if r["backend"] == name] for name in ("st-good", "st-off", "st-abort-k2")}
    assert all(len(rows) == n for rows in by.values())
    assert result["summary"]["st-good"] == {"ok": n}
    assert all(r["rel_error"] <= r["tolerance"] for r in by["st-good"])
    # 1 % off: beyond float32's bound, within the half-precision bound of a policy rounded to bf16 / fp16.
    for r in by["st-off"]:
        assert r["status"] == ("disagrees" if r["dtype"] == "fp32" else "ok"), r
    assert all(abs(r["rel_error"] - 0.01) < 1e-4 for r in by["st-off"] if r["dtype"] == "fp32")
    # The K=1 half passes; the first K=2 case kills its child, then each restarted child, until MAX_CRASHES.
    aborts = by["st-abort-k2"]
    assert [r["status"] for r in aborts] == ["ok"] * (n // 2) + ["failed"] * (n // 2)
    crashed = [r for r in aborts if "SIGABRT" in r["reason"]]
    assert len(crashed) == isolation.MAX_CRASHES and all(r["K"] == 2 for r in crashed)
    assert all("not run" in r["reason"] for r in aborts[n // 2 + isolation.MAX_CRASHES:])
    # One child each for the good backends, one per crash for the third.
    assert isolation.children_started - before == 2 + isolation.MAX_CRASHES
    assert result["passed"] is False and result["complete"] is True
    # Saved as each child ended: partial results, the last one with every case reported.
    assert len(saved) == 2 + isolation.MAX_CRASHES and all(not r["complete"] and r["passed"] is None for r in saved)
    assert any(r["status"] == "pending" for r in saved[0]["cases"])
    assert not any(r["status"] == "pending" for r in saved[-1]["cases"])
    text = selftest.summarize(result)
    assert "FAILED" in text and "SIGABRT" in text and "st-off" in text


def test_the_command_writes_the_json_and_exits_1_when_a_backend_failed(tmp_path, monkeypatch, capsys):
    result = json.loads(json.dumps(selftest.run("cpu", timing=False)))  # nothing to check here: passes
    result["cases"] = [dict(backend="x", component="mlp", K=1, batch=1, dtype="fp32", scheduler="ddim", steps=10,
                            status="failed", rel_error=None, tolerance=1e-4, reason="died", seconds=1.0)]
    result["backends"], result["summary"], result["passed"] = {"x": "checked"}, {"x": {"failed": 1}}, False
    monkeypatch.setattr(selftest, "run", lambda *a, **k: result)
    out = tmp_path / "sub" / "st.json"
    assert main(["selftest", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["passed"] is False
    text = capsys.readouterr().out
    assert "Please open an issue" in text and str(out) in text and "failed: mlp K=1 batch=1 fp32 ddim-10: died" in text


def test_an_unknown_backend_is_a_user_error(capsys):
    assert main(["selftest", "--backends", "nonsense", "--no-timing"]) == 2
    assert "unknown backend 'nonsense'" in capsys.readouterr().err


def test_timing_runs_fdp_bench_with_eager_and_the_graph_baseline_and_fails_on_a_path_error(tmp_path, monkeypatch):
    import subprocess
    import types

    import torch

    calls = []

    def fake_run(argv, **kw):  # fdp bench as a child process: writes its JSON (one path raised)
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        cases = [dict(backend=b, dtype="fp32", status=s, step_kernel_us=k, step_gpu_us=g, host_us=40.0, skipped=e)
                 for b, s, k, g, e in [("eager", "ok", None, 90.0, None), ("cuda-graph", "ok", 9.0, 10.0, None),
                                       ("cuda", "error", None, None, "RuntimeError: illegal address")]]
        with open(out, "w") as f:
            json.dump({"cases": cases}, f)
        return types.SimpleNamespace(returncode=1, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    t = selftest._timing(torch.device("cuda"), ["cuda"], tmp_path)
    argv = calls[0]
    assert argv[argv.index("--backends") + 1] == "eager,cuda-graph,cuda"
    assert " ".join(selftest.TIMING_ARGS) in " ".join(argv)
    assert t["status"] == "failed" and "cuda fp32: error RuntimeError: illegal address" in t["reason"]
    assert [r["step_kernel_us"] for r in t["rows"]] == [None, 9.0, None]
