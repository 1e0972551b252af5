import json

from fdp import cli


def test_demo_runs_end_to_end(tmp_path, capsys):
    # A handful of training steps: this checks the pipeline (train, sample,
    # evaluate, report, plot), not the demo's quality, which `fdp demo` shows.
    assert cli.main(["demo", "--out", str(tmp_path), "--train-steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for task in ("right", "up", "left", "down"):
        assert task in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["tasks"]) == 4
    assert all(0.0 <= t["on_mode"] <= 1.0 and len(t["weights"]) == 4 for t in report["tasks"])
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_info(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CUDA extension" in out
