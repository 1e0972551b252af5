import json
import sys

import pytest
import torch

import fdp
from fdp import cli


def test_demo_runs_end_to_end(tmp_path, capsys):
    # A handful of training steps: this checks the pipeline (train, sample,
    # evaluate, report, plot), not the demo's quality, which `fdp demo` shows.
    assert cli.main(["demo", "--out", str(tmp_path), "--train-steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for task in ("right", "up", "left", "down"):
        assert task in out
    for stage in ("[fdp demo] training", "[fdp demo] sampling", "[fdp demo] writing"):
        assert stage in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["tasks"]) == 4
    assert all(0.0 <= t["on_mode"] <= 1.0 and len(t["weights"]) == 4 for t in report["tasks"])
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_help_shows_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside "fdp-demo"
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--train-steps" in out and "(default: 2000, or 40 with --quick)" in out
    assert "(default: 0)" in out and "(default: auto)" in out and "(default: fdp-demo)" in out


def _info(monkeypatch, capsys, status, cuda=False):
    monkeypatch.setattr(fdp, "extension_status", lambda: status)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert cli.main(["info", "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_info_says_built_but_no_device_never_available_beside_an_error(monkeypatch, capsys):
    # A machine with nvcc and no GPU: the extension is built, the runtime finds no driver.
    out = _info(monkeypatch, capsys, {"available": True, "reason": "", "runtime_version": 13000,
                                      "driver_version": 0, "device_count": 0,
                                      "error": "CUDA driver version is insufficient for CUDA runtime version"})
    ext_line = next(line for line in out.splitlines() if line.startswith("CUDA extension"))
    assert ext_line == "CUDA extension fdp._C: built (CUDA runtime 13.0)"
    dev_line = next(line for line in out.splitlines() if line.startswith("CUDA device"))
    assert dev_line.startswith("CUDA device: none (")
    assert "CUDA driver version is insufficient" in dev_line and "no NVIDIA driver" in dev_line
    assert "available" not in ext_line + dev_line


def test_info_says_why_the_extension_was_not_built(monkeypatch, capsys):
    reason = "fdp._C was not built: the extension build was disabled (FDP_BUILD_EXTENSION=OFF)"
    out = _info(monkeypatch, capsys, {"available": False, "reason": reason})
    assert f"CUDA extension fdp._C: not built: {reason}" in out


def test_info_lists_every_backend_with_its_reason(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, info in fdp.available_backends("cpu").items():
        line = next(line.strip() for line in lines if line.strip().startswith(name + " "))
        want = "available" if info.available else f"not available: {info.reason}"
        assert line.split(None, 1)[1] == want


def test_info_refuses_a_bad_device(capsys):
    assert cli.main(["info", "--device", "banana"]) == 2
    assert "`device` must be a torch.device or a device string" in capsys.readouterr().err


def test_bench_without_its_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "fdp bench: error:" in err and "pip install '.[bench]' in fdp's clone" in err and "'rich'" in err
    assert not (tmp_path / "r.json").exists()


def test_demo_without_its_extra_says_how_to_install_it_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "pip install '.[demo]' in fdp's clone" in captured.err and "'matplotlib'" in captured.err
    assert "training" not in captured.out


def test_bench_writes_to_the_current_directory_by_default():
    from fdp.bench.report import default_out, now

    out = default_out("CPU Some Model", now())
    assert not out.is_absolute() and out.parts[0] == "fdp-bench" and out.suffix == ".json"


def test_speedup_axis_labels_ticks_inside_one_decade():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fdp.bench.report import _label_log_axis

    fig, ax = plt.subplots()
    ax.bar([0, 1], [3.2, 6.8])
    ax.set_yscale("log")
    ax.set_ylim(2.5, 8)
    _label_log_axis(ax.yaxis, "×")
    lo, hi = ax.get_ylim()
    fmt = ax.yaxis.get_major_formatter()
    labels = [fmt(v) for v in ax.yaxis.get_majorticklocs() if lo <= v <= hi]
    plt.close(fig)
    assert labels == ["3×", "5×"]
