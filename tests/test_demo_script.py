"""The README's demo command, `bash scripts/demo.sh`, from a fresh copy of the checkout.

It runs the script itself (setup, install, `fdp demo`), with `--quick` so that
training takes seconds. To stay fast it does not reinstall torch: the copy's
.venv sees this environment's packages through a .pth file, as a user's venv
with torch already installed would, and setup.sh installs fdp into it from the
copy. An `nvcc` that records its calls comes first on PATH: the demo path must
never start a CUDA compile.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fresh_copy(dest: Path) -> None:
    """The files a clone of this checkout would hold (tracked and not ignored), uncommitted edits included."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_demo_script_from_a_fresh_checkout(tmp_path):
    clone = tmp_path / "fdp"
    _fresh_copy(clone)
    assert not (clone / "build").exists() and not (clone / ".venv").exists()

    venv.create(clone / ".venv", with_pip=True)
    site = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "parent_env.pth").write_text("".join(p + "\n" for p in here))

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "nvcc-calls"
    (fake_bin / "nvcc").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 1\n')
    (fake_bin / "nvcc").chmod(0o755)

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", "FDP_BUILD_EXTENSION",
                        "FDP_EXTENSION")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    out_dir = tmp_path / "demo-out"
    proc = subprocess.run(["bash", "scripts/demo.sh", "--quick", "--no-progress", "--out", str(out_dir)],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    assert not calls.exists(), f"the demo path ran nvcc: {calls.read_text()}"
    assert "not compiling the CUDA extension" in proc.stdout, log[-4000:]
    for stage in ("[setup", "[fdp demo] quick run: training", "[fdp demo] sampling", "[fdp demo] writing"):
        assert stage in proc.stdout, (stage, log[-4000:])
    assert (out_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {out_dir / 'samples.png'}" in proc.stdout

    # fdp came from the copy, into the copy's .venv, without the extension, and says why.
    probe = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                            "import fdp; print(fdp.__file__); print(fdp.extension_status()['reason'])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert probe.startswith(str(clone / ".venv")), probe
    assert "FDP_BUILD_EXTENSION=OFF" in probe, probe
    # This environment's own fdp is still installed (pip must not have removed it).
    assert sys.modules["fdp"].__file__ and Path(sys.modules["fdp"].__file__).exists()
