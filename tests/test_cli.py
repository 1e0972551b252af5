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
    out = _info(monkeypatch, capsys, {"available": True, "reason": "", "runtime_version": 13000, "driver_version": 0,
                                      "device_count": 0, "error": "no driver", "sass_archs": "80,86,87,89,90",
                                      "ptx_archs": "90"})
    assert ("CUDA extension fdp._C: built (CUDA runtime 13.0) for sm_80, sm_86, sm_87, sm_89, sm_90 + PTX compute_90"
            in out.splitlines())


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


# -- a user error is one line on stderr and exit status 2, checked before the work; a bug keeps its traceback --

from helpers import make_mlp_policy  # noqa: E402

DATA = __import__("pathlib").Path(__file__).parent / "data" / "lerobot"


def _one_line_error(capsys, argv, prog, *parts):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, captured
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: "), err
    for part in parts:
        assert part in err, err
    return captured


def test_tune_device_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["tune", "--device", "cuda"], "fdp tune",
                    "`--device` is 'cuda', but there is no CUDA device")


def test_tune_missing_policy_file(capsys, tmp_path):
    _one_line_error(capsys, ["tune", "--device", "cpu", "--policy", str(tmp_path / "missing.pt")], "fdp tune",
                    "`--policy`", "missing.pt does not exist")


def _saved_policy(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save(make_mlp_policy(dtype=torch.float32), path)
    return path


def test_tune_reads_a_saved_policy_as_weights_only(capsys, tmp_path, monkeypatch):
    path = _saved_policy(tmp_path)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert cli.main(["tune", "--device", "cpu", "--policy", str(path), "--backend", "torch", "--json"]) == 0
    assert seen["weights_only"] is True
    assert json.loads(capsys.readouterr().out)["backend"] == "torch"


class _RunsCode:
    """A pickle that calls a function when loaded: Path.touch of a marker file, as an attack would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("pathlib").Path.touch, (self.marker,))


def test_tune_does_not_unpickle_code_unless_trusted(capsys, tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"policy": _RunsCode(marker)}, path)
    _one_line_error(capsys, ["tune", "--device", "cpu", "--policy", str(path)], "fdp tune",
                    "holds more than fdp's modules and tensors", "--trust-pickle", "runs any code")
    assert not marker.exists()
    # Opted in, the file's code runs (which is what the flag's help says), then the content is refused.
    _one_line_error(capsys, ["tune", "--device", "cpu", "--policy", str(path), "--trust-pickle"], "fdp tune",
                    "holds a dict, expected a torch.save'd fdp.FactorizedPolicy")
    assert marker.exists()


def test_tune_trust_pickle_help_says_it_runs_the_files_code(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in out and "RUNS ANY CODE THE FILE HOLDS" in out


@pytest.mark.parametrize("cut", [0, 100, -100])
def test_tune_truncated_policy_file(capsys, tmp_path, cut):
    path = _saved_policy(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    _one_line_error(capsys, ["tune", "--device", "cpu", "--policy", str(path)], "fdp tune",
                    "is not a readable torch.save file")


def test_bench_out_under_a_regular_file_is_refused_before_the_benchmark(capsys, tmp_path, monkeypatch):
    import fdp.bench.runner as runner

    monkeypatch.setattr(runner, "_run", lambda *a, **k: pytest.fail("the benchmark ran"))
    regular = tmp_path / "file"
    regular.write_text("x")
    _one_line_error(capsys, ["bench", "--quick", "--no-plots", "--out", str(regular / "r.json")], "fdp bench",
                    "`--out`", "is a file, not a folder")
    _one_line_error(capsys, ["bench", "--quick", "--no-plots", "--device", "cuda:7"], "fdp bench", "`--device`")


def test_demo_unknown_backend_is_refused_before_training(capsys, tmp_path):
    captured = _one_line_error(capsys, ["demo", "--out", str(tmp_path), "--backend", "nonsense", "--no-progress"],
                               "fdp demo", "`backend` must be 'auto' or one of", "'nonsense'")
    assert "training" not in captured.out


def test_demo_backend_that_cannot_run_here_is_refused_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    captured = _one_line_error(capsys, ["demo", "--out", str(tmp_path), "--backend", "cuda", "--no-progress"],
                               "fdp demo", "backend 'cuda' cannot serve this policy on cpu")
    assert "training" not in captured.out


@pytest.mark.parametrize("argv,part", [
    (["demo", "--train-steps", "-3"], "argument --train-steps: expected an int >= 1, got -3"),
    (["demo", "--train-steps", "many"], "argument --train-steps: expected an int, got 'many'"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int >= 0"),
    (["bench", "--repeats", "0"], "argument --repeats: expected an int >= 1"),
    (["bench", "--budget", "nan"], "argument --budget: expected a finite number > 0"),
    (["tune", "--K", "0"], "argument --K: expected an int >= 1"),
    (["tune", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["export", "onnx", "src", "out.onnx", "--batch-size", "0"], "argument --batch-size: expected an int >= 1"),
    (["nonsense"], "argument command: invalid choice"),
])
def test_argument_errors_are_one_line(capsys, argv, part):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and part in err, err
    assert err.endswith("--help)")


def test_demo_out_that_is_a_file_is_refused_before_training(capsys, tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    captured = _one_line_error(capsys, ["demo", "--out", str(regular), "--quick", "--no-progress"], "fdp demo",
                               "`--out` must be a folder to write")
    assert "training" not in captured.out


def test_export_onnx_truncated_files(capsys, tmp_path):
    import shutil

    folder = tmp_path / "policy"
    shutil.copytree(DATA / "ddim_film_3stage", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(capsys, ["export", "onnx", str(folder), str(tmp_path / "p.onnx")], "fdp export onnx",
                    str(weights), "cannot be read as a safetensors file")
    config = folder / "config.json"
    config.write_text(config.read_text()[:200])
    _one_line_error(capsys, ["export", "onnx", str(folder), str(tmp_path / "p.onnx")], "fdp export onnx",
                    str(config), "is not valid JSON (the file looks truncated)")
    _one_line_error(capsys, ["export", "onnx", str(tmp_path / "absent"), str(tmp_path / "p.onnx")], "fdp export onnx",
                    "is not a folder")
    _one_line_error(capsys, ["export", "onnx", str(folder), str(tmp_path / "no" / "p.onnx")], "fdp export onnx")
    assert not (tmp_path / "p.onnx").exists()


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    # A plain ValueError from inside fdp is a bug, not the user's mistake: it must not pass as one.
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal invariant broke" in err
    assert "fdp info: internal error: this is a bug in fdp" in err and "please report it" in err


def test_a_file_system_refusal_is_one_line(capsys, monkeypatch):
    def refused(args):
        raise PermissionError(13, "Permission denied", "/somewhere/report.json")

    monkeypatch.setattr(cli, "_info", refused)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.strip() == "fdp info: error: /somewhere/report.json: Permission denied"
