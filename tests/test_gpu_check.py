"""scripts/gpu-check.sh: its dry run lists every stage and command; without a GPU its stages fail, never pass."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu-check.sh")
STAGES = ["env", "build", "target", "selftest", "tests", "bench-mlp", "sanitizer", "tune", "bench-unet", "ncu"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args, cwd=None, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_dry_run_lists_every_stage_and_command_and_touches_nothing(tmp_path):
    r = _run("--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"results would go to {tmp_path}/gpu-check-results (budget 540 s)" in out  # one 10-minute command
    headers = [line.split()[1] for line in out.splitlines() if line.startswith("stage ")]
    assert headers == STAGES
    for expected in (
            "nvidia-smi",
            "FDP_CUDA_ARCHS=",  # the architecture of the GPU present
            "-m pip install --no-build-isolation --no-deps --no-index",
            "import fdp, fdp._C",  # a build that silently lost the extension fails
            "-m pytest -q -p no:cacheprovider -rs -m gpu",
            "tests/test_bench.py",
            "benchmarks/run_sanitizer.sh",
            "fdp tune --component unet-paper --K 4 --batch 1 --steps ddim --dtype fp16",
            "fdp bench --component mlp --K 4 --batch 1,16,256 --steps ddim,ddpm --dtype fp32,bf16",
            "fdp bench --component mlp --K 4 --batch 1 --steps ddim --dtype bf16,fp32",  # the target
            "--backends eager,cuda-graph,fused",  # eager included: speedup_vs_eager is never null
            "import json, sys",  # the target's check: every path's status ok, kernel-only time printed
            "fdp selftest --quick --no-timing",
            "FDP_CUDA_PDL=0",
            "fdp bench --component unet-paper --K 4 --batch 1",
            "ncu --clock-control none --kernel-name regex:mlp_persistent_kernel",
            "cuda-persistent", "triton-persistent"):
        assert expected in out, expected
    assert sum(line.startswith("+ ") for line in out.splitlines()) >= 15
    # The CUDA decomposition and capture tests come before the slow native Triton sweep and compile tests.
    fast = out.index("-m gpu -k 'not (test_native_kernels_on_gpu or compile)'")
    slow = out.index("-m gpu -k 'test_native_kernels_on_gpu or compile'")
    assert fast < slow
    assert not os.path.exists(os.path.join(tmp_path, "gpu-check-results")) and os.listdir(tmp_path) == []


def test_stage_selection_and_bad_arguments():
    r = _run("--dry-run", "--stages", "tests,ncu,bench-mlp", "--skip", "ncu")
    assert r.returncode == 0
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("stage ")] == ["tests", "bench-mlp"]
    for args, message in ((["--dry-run", "--stages", "tests,warp"], "unknown stage 'warp'"),
                          (["--dry-run", "--budget", "soon"], "--budget must be a positive number"),
                          (["--bogus"], "unknown option --bogus"),
                          ([], "RESULTS_DIR is required")):
        r = _run(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_a_gpu_the_gpu_stages_fail_and_the_summary_says_so(tmp_path):
    out = tmp_path / "results"
    r = _run("--stages", "tune,bench-mlp", "--skip", "bench-mlp", "results", cwd=tmp_path)  # relative to the caller
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["tune"]["status"] == "FAIL" and "no CUDA device" in summary["stages"]["tune"]["note"]
    assert summary["stages"]["bench-mlp"] == {"status": "SKIP", "seconds": 0, "note": "not selected"}
    assert set(summary["stages"]) == set(STAGES)
    assert "| tune | FAIL |" in (out / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_the_archive_holds_at_most_8_files_in_the_folder_asked_for(tmp_path):
    r = _run("--stages", "env,tune", "--archive", "back", "results", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr  # no GPU: tune fails
    assert os.listdir(tmp_path / "back") == ["gpu-check.tar.gz"]  # one file, in the folder named
    with tarfile.open(tmp_path / "back" / "gpu-check.tar.gz") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        logs = tar.extractfile("gpu-check/logs.txt").read().decode()
        summary = json.loads(tar.extractfile("gpu-check/summary.json").read())
    assert len(names) <= 8 and {"gpu-check/summary.md", "gpu-check/summary.json", "gpu-check/logs.txt"} <= set(names)
    assert "======== env" in logs and "======== tune (FAIL)" in logs
    assert summary["stages"]["tune"]["status"] == "FAIL" and summary["stages"]["ncu"]["note"] == "not selected"


def test_sigterm_mid_stage_writes_the_summary_and_the_archive(tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")  # every interpreter call of the env stage hangs
    slow.chmod(0o755)
    proc = subprocess.Popen(["bash", SCRIPT, "--stages", "env,tune", "--archive", "back", "results"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": str(slow)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    summary_path = tmp_path / "results" / "summary.json"
    deadline = time.monotonic() + 60
    # Written before the first stage's work: a run stopped at any point leaves one.
    while not (summary_path.exists() and '"RUNNING"' in summary_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - t0 < 30, err  # at once, not after the 60 s sleep
    summary = json.loads(summary_path.read_text())
    assert summary["stopped_by"] == "SIGTERM"
    assert summary["stages"]["env"]["status"] == "TIMEOUT" and "stopped by SIGTERM" in summary["stages"]["env"]["note"]
    assert summary["stages"]["tune"]["status"] == "PENDING"
    assert "stopped by SIGTERM" in (tmp_path / "results" / "summary.md").read_text()
    with tarfile.open(tmp_path / "back" / "gpu-check.tar.gz") as tar:
        assert json.loads(tar.extractfile("gpu-check/summary.json").read())["stopped_by"] == "SIGTERM"


def test_the_target_check_reports_whole_call_against_kernel_only_and_fails_only_on_status(tmp_path):
    """The target stage's check (TARGET_CHECK): per path the whole call's device time over the kernels' own, held
    to issue 23's 1.2x for cuda and cuda-persistent (printed, a speed target, not a failure); exit 1 only when a
    path's status is not ok."""
    import re

    code = re.search(r"^TARGET_CHECK='(.*?)'$", open(SCRIPT).read(), re.S | re.M).group(1)

    def case(backend, status="ok", kernel=None, whole=None):
        return {"backend": backend, "dtype": "fp32", "status": status, "step_kernel_us": kernel,
                "step_gpu_us": whole, "host_us": 20.0, "speedup_vs_eager": 3.0}

    def check(cases):
        path = tmp_path / "target.json"
        path.write_text(json.dumps({"cases": cases}))
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)

    r = check([case("eager", whole=40.0), case("cuda", kernel=3.0, whole=3.3), case("cuda-persistent", kernel=2.0,
                                                                                      whole=2.6)])
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("whole call / kernel-only"))
    assert "cuda fp32 1.10 met" in line and "cuda-persistent fp32 1.30 NOT met" in line, line
    assert "eager" not in line
    r = check([case("cuda", status="FAILED", kernel=3.0, whole=3.0), case("cuda-persistent")])
    assert r.returncode == 1 and "not ok: cuda fp32: FAILED" in r.stdout, r.stdout + r.stderr
    assert "cuda-persistent fp32 -" in r.stdout  # no kernel-only time: no ratio, no verdict
