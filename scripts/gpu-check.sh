#!/usr/bin/env bash
# The whole GPU acceptance of fdp in one command, for a short slot on a GPU:
#
#   bash scripts/gpu-check.sh --budget 540 --archive DIR RESULTS_DIR   # the one command for a short slot
#   bash scripts/gpu-check.sh --dry-run              # list every stage and command, run nothing
#   bash scripts/gpu-check.sh --stages tests,bench-mlp --budget 1500 RESULTS_DIR
#
# A short slot (a 10-minute command) gets as far as the budget allows, in the order below; the summary
# (and the archive, with --archive) is rewritten after every stage and when the script is stopped
# (SIGTERM, SIGINT), so that a run cut short still returns what it found.
#
# Stages (each independent: a failing one does not stop the others; the exit
# status is 1 if any failed or ran out of time, 0 otherwise; skipped ones say why):
#   env         versions of the GPU, driver, nvcc, python, torch, triton and fdp
#   build       the CUDA extension for the GPU present (FDP_CUDA_ARCHS from its compute capability),
#               installed without network into build/gpu-check-site (pip --target; PYTHONPATH for the rest)
#   target      fdp bench at the kernels' performance target (MLP K=4 H=256, batch 1, DDIM-10, bf16+fp32):
#               eager, the CUDA-graph baseline and every fused backend, each checked against eager, with
#               kernel-only device time (the captured graph replayed alone) and the whole call's over it
#               (target: at most 1.2x for cuda and cuda-persistent; reported); fails unless every path's
#               status is ok; the per-step `cuda` kernel again with programmatic launches off (FDP_CUDA_PDL=0)
#   selftest    fdp selftest --quick --no-timing: every backend against the torch reference in child
#               processes (a hang or a device fault there is recorded, not fatal), selftest.json
#   tests       every GPU test (pytest -m gpu): the CUDA kernels' decompositions, CUDA-graph capture and
#               the graph backend first, then the slow native Triton sweep and the torch.compile tests,
#               then the GPU-aware tests of fdp bench
#   bench-mlp   fdp bench: MLP K=4 H=256, batch 1/16/256, fp32+bf16, DDIM-10 and DDPM-100
#   sanitizer   benchmarks/run_sanitizer.sh (memcheck + racecheck), if compute-sanitizer runs here
#   tune        backend="auto" on the benchmark policies: what it verified, timed and picked
#   bench-unet  fdp bench: U-Net K=4 paper size, batch 1, bf16, DDIM-10 and DDPM-100 (fdp bench has
#               no fp16; the tune stage checks and times the U-Net in fp16)
#   ncu         Nsight Compute on the two persistent kernels (cuda-persistent, triton-persistent)
#
# RESULTS_DIR receives one log per stage, the bench JSON files (fdp bench's schema), selftest.json, the ncu
# reports, summary.md (versions, pass/fail and time per stage) and summary.json. --archive DIR writes
# DIR/gpu-check.tar.gz: at most 8 files (the summaries, every log in one file, the JSON results), what a
# short run can bring back.
# Needs nothing from the network: missing optional packages (rich, matplotlib) are detected and
# their stage skipped or reduced, with the reason logged.
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD

# In this order: what a slot too short for all of them needs most comes first: the figures the
# performance targets are stated in (a minute or two, each path checked against eager), then the tests,
# then the wider benchmark.
ALL_STAGES=(env build target selftest tests bench-mlp sanitizer tune bench-unet ncu)
# Longest each stage may run, in seconds (also capped by what is left of --budget).
declare -A LIMIT=([env]=60 [build]=900 [target]=240 [selftest]=240 [tests]=600 [sanitizer]=420 [tune]=180
                  [bench-mlp]=420 [bench-unet]=300 [ncu]=240)

usage() {
  cat <<EOF
usage: bash scripts/gpu-check.sh [--dry-run] [--budget SECONDS] [--stages a,b] [--skip a,b] [--archive DIR] RESULTS_DIR

  --dry-run         print every stage with its commands and exit 0 (no GPU needed)
  --budget SECONDS  wall-clock budget for all stages (default 540: one 10-minute command); a stage gets at
                    most what is left
  --stages LIST     run only these stages (default: all): ${ALL_STAGES[*]}
  --skip LIST       run all stages but these
  --archive DIR     also write DIR/gpu-check.tar.gz, at most 8 files (summaries, all logs in one file, JSON
                    results), rewritten after every stage: the one file to copy off a machine
  PYTHON=...        interpreter to use (default python3); it needs torch, triton, pytest, scikit-build-core,
                    pybind11, cmake and ninja; FDP_CUDA_ARCHS overrides the detected architecture
EOF
}

DRY=0
BUDGET=540
ARCHIVE=""
OUT_DIR=""
SELECTED=("${ALL_STAGES[@]}")
SKIP=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --stages) IFS=, read -r -a SELECTED <<<"${2:?--stages needs a comma-separated list}"; shift ;;
    --skip) IFS=, read -r -a SKIP <<<"${2:?--skip needs a comma-separated list}"; shift ;;
    --archive) ARCHIVE="${2:?--archive needs a folder}"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu-check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT_DIR" ] || { echo "gpu-check: one RESULTS_DIR only, got '$OUT_DIR' and '$1'" >&2; exit 2; }
       OUT_DIR="$1" ;;
  esac
  shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 1 ]; then
  echo "gpu-check: --budget must be a positive number of seconds, got '$BUDGET'" >&2; exit 2
fi
for s in "${SELECTED[@]}" "${SKIP[@]}"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "gpu-check: unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
done
if [ -z "$OUT_DIR" ]; then
  [ "$DRY" = 1 ] || { echo "gpu-check: RESULTS_DIR is required" >&2; usage >&2; exit 2; }
  OUT_DIR="gpu-check-results"
fi
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$CALLER_DIR/$OUT_DIR" ;; esac
if [ -n "$ARCHIVE" ]; then
  case "$ARCHIVE" in /*) ;; *) ARCHIVE="$CALLER_DIR/$ARCHIVE" ;; esac
fi
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT_DIR" || { echo "gpu-check: cannot create $OUT_DIR" >&2; exit 2; }
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
  if [ -n "$ARCHIVE" ]; then
    mkdir -p "$ARCHIVE" || { echo "gpu-check: cannot create --archive folder $ARCHIVE" >&2; exit 2; }
  fi
fi

PY="${PYTHON:-python3}"
SITE="$ROOT/build/gpu-check-site"
# The installed build first; the Triton interpreter off for everything but pytest (whose conftest
# turns it on in-process and starts the native GPU tests in fresh interpreters without it).
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export FDP_CACHE_DIR="$OUT_DIR/fdp-cache"
export PYTHONUNBUFFERED=1
START=$(date +%s)

# -- how a stage runs ------------------------------------------------------------------------------------------
STAGE=""; LOG=""; DEADLINE=0
declare -A STATUS=() SECS=() NOTE=()

# shown ARGS...: the command as one pastes it into a shell (arguments quoted only where they need it).
shown() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "+ ${out[*]}"
}

# cmd ARGS...: run one command of the current stage into its log, within the stage's deadline
# (in --dry-run: print it). Returns the command's status (124: out of time). The command runs in the
# background and the script waits for it, so that a SIGTERM reaches the trap at once (bash runs traps
# only between commands, and `wait` is one it interrupts).
CHILD=""
cmd() {
  if [ "$DRY" = 1 ]; then
    shown "$@"
    return 0
  fi
  local left=$((DEADLINE - $(date +%s))) rc
  shown "$@" >>"$LOG"
  if [ "$left" -le 0 ]; then
    echo "out of time before this command" >>"$LOG"; return 124
  fi
  timeout --kill-after=15 "$left" "$@" >>"$LOG" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  return $rc
}

# skip REASON: the stage cannot run here; recorded, not a failure.
skip() {
  NOTE[$STAGE]="$1"
  echo "SKIP: $1" >>"$LOG"
  return 200
}

run_stage() {
  STAGE=$1
  local fn="stage_${1//-/_}" t0 rc left
  LOG="$OUT_DIR/$STAGE.log"
  if [ "$DRY" = 1 ]; then
    echo "stage $STAGE (at most ${LIMIT[$STAGE]} s): $(describe "$STAGE")"
    "$fn"
    return
  fi
  left=$((START + BUDGET - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    STATUS[$STAGE]=SKIP; SECS[$STAGE]=0; NOTE[$STAGE]="--budget $BUDGET s used up"
    printf '%-11s SKIP   (%s)\n' "$STAGE" "${NOTE[$STAGE]}"
    return
  fi
  local limit=${LIMIT[$STAGE]}
  DEADLINE=$(($(date +%s) + (left < limit ? left : limit)))
  : >"$LOG"
  t0=$(date +%s)
  STAGE_T0=$t0
  STATUS[$STAGE]=RUNNING
  write_summary
  "$fn"
  rc=$?
  SECS[$STAGE]=$(($(date +%s) - t0))
  case $rc in
    0) STATUS[$STAGE]=PASS ;;
    200) STATUS[$STAGE]=SKIP ;;
    124|137) STATUS[$STAGE]=TIMEOUT; NOTE[$STAGE]="ran past its ${LIMIT[$STAGE]} s limit or the budget" ;;
    *) STATUS[$STAGE]=FAIL; NOTE[$STAGE]="${NOTE[$STAGE]:-exit status $rc}; see $STAGE.log" ;;
  esac
  printf '%-11s %-7s %5d s  %s\n' "$STAGE" "${STATUS[$STAGE]}" "${SECS[$STAGE]}" "${NOTE[$STAGE]:-}"
  write_summary
}

describe() {
  case "$1" in
    env) echo "versions of the GPU, driver, toolkit and packages" ;;
    build) echo "build fdp._C for the GPU present and install it (no network) into build/gpu-check-site" ;;
    target) echo "fdp bench at the target: MLP K=4 H=256, batch 1, DDIM-10, bf16+fp32, eager included," \
                 "kernel-only time; cuda without PDL" ;;
    selftest) echo "fdp selftest --quick --no-timing: every backend against torch in child processes" ;;
    tests) echo "every GPU test (pytest -m gpu): CUDA decompositions and capture first, the Triton sweep and" \
                "compile tests last; then the GPU-aware bench tests" ;;
    sanitizer) echo "compute-sanitizer memcheck + racecheck over the CUDA kernels' GPU tests" ;;
    tune) echo "backend='auto' on the benchmark policies: verified, timed, picked (fdp tune)" ;;
    bench-mlp) echo "fdp bench: MLP K=4 H=256, batch 1/16/256, fp32+bf16, DDIM-10 + DDPM-100" ;;
    bench-unet) echo "fdp bench: U-Net K=4 paper size, batch 1, bf16, DDIM-10 + DDPM-100" ;;
    ncu) echo "Nsight Compute on the two persistent kernels" ;;
  esac
}

has_module() { [ "$DRY" = 1 ] || "$PY" -c "import $1" >/dev/null 2>&1; }

# A GPU stage on a machine without one fails: skipped GPU tests must not read as a pass.
GPU_SEEN=""
need_gpu() {
  [ "$DRY" = 1 ] && return 0
  if [ -z "$GPU_SEEN" ]; then
    GPU_SEEN=no
    "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1 && GPU_SEEN=yes
  fi
  [ "$GPU_SEEN" = yes ] || { NOTE[$STAGE]="torch ($PY) sees no CUDA device"; return 1; }
}

# junit_counts FILE: "N tests, N failed, N skipped" from pytest's JUnit XML.
junit_counts() {
  "$PY" -c "import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot(); s = r if r.tag == 'testsuite' else r.find('testsuite')
print(f\"{s.get('tests')} tests, {int(s.get('failures')) + int(s.get('errors'))} failed, {s.get('skipped')} skipped\")" \
    "$1" 2>/dev/null || echo "no JUnit report"
}

# -- the stages ------------------------------------------------------------------------------------------------

ENV_SCRIPT='import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "compute capability %d.%d" % torch.cuda.get_device_capability())'

stage_env() {
  cmd nvidia-smi
  cmd "$PY" -c "$ENV_SCRIPT"
  cmd "$PY" -c 'import triton; print("triton", triton.__version__)'
  cmd nvcc --version
  cmd git -C "$ROOT" rev-parse HEAD
  [ "$DRY" = 1 ] || "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1 ||
    { NOTE[env]="torch sees no CUDA device: the GPU stages will fail"; return 1; }
}

stage_build() {
  need_gpu || return 1
  local archs="${FDP_CUDA_ARCHS:-}"
  if [ -z "$archs" ]; then
    if [ "$DRY" = 1 ]; then
      archs="<major><minor> of torch.cuda.get_device_capability(), e.g. 90"
    else
      archs=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>>"$LOG") ||
        { NOTE[build]="no CUDA device to build for"; return 1; }
    fi
  fi
  command -v nvcc >/dev/null 2>&1 || [ "$DRY" = 1 ] || { NOTE[build]="nvcc is not on PATH"; return 1; }
  NOTE[build]="FDP_CUDA_ARCHS=$archs"
  cmd env FDP_CUDA_ARCHS="$archs" "$PY" -m pip install --no-build-isolation --no-deps --no-index --upgrade \
    --disable-pip-version-check --target "$SITE" "$ROOT" || return 1
  # The package installs without the extension when the build fails: make that a failure here.
  cmd "$PY" -c 'import fdp, fdp._C; print(fdp.__file__); print(fdp.extension_status())' || return 1
  cmd "$PY" -m fdp info
}

# The GPU tests a short run must reach first, then the slow ones (native Triton sweep, torch.compile).
SLOW_GPU_TESTS="test_native_kernels_on_gpu or compile"

stage_tests() {
  need_gpu || return 1
  local rc=0
  cmd "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu -k "not ($SLOW_GPU_TESTS)" \
    --junitxml "$OUT_DIR/tests-gpu.xml" tests || rc=1
  cmd "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu -k "$SLOW_GPU_TESTS" \
    --junitxml "$OUT_DIR/tests-gpu-slow.xml" tests || rc=1
  cmd "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT_DIR/tests-bench.xml" tests/test_bench.py || rc=1
  [ "$DRY" = 1 ] || NOTE[tests]="gpu: $(junit_counts "$OUT_DIR/tests-gpu.xml"); slow gpu: $(junit_counts \
    "$OUT_DIR/tests-gpu-slow.xml"); bench: $(junit_counts "$OUT_DIR/tests-bench.xml")"
  return $rc
}

stage_selftest() {
  need_gpu || return 1
  # Correctness only (the target stage times the same paths), each backend in child processes.
  cmd "$PY" -m fdp selftest --quick --no-timing --timeout 120 --out "$OUT_DIR/selftest.json"
  local rc=$?
  [ "$DRY" = 1 ] || NOTE[selftest]="$(grep -m1 'fdp selftest on' "$LOG" | sed 's/.*: //')"
  return $rc
}

stage_sanitizer() {
  need_gpu || return 1
  command -v compute-sanitizer >/dev/null 2>&1 || [ "$DRY" = 1 ] ||
    { skip "compute-sanitizer is not on PATH"; return; }
  # Some machines refuse the device (e.g. sandboxed runtimes: "Device not supported"): probe first.
  if ! cmd compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -c \
      'import torch; torch.ones(8, device="cuda").sum().item()'; then
    skip "compute-sanitizer does not run on this machine: $(grep -m1 -i 'error\|not supported' "$LOG" || echo see log)"
    return
  fi
  cmd env PYTHON="$PY" bash "$ROOT/benchmarks/run_sanitizer.sh"
}

stage_tune() {
  need_gpu || return 1
  local rc=0
  cmd "$PY" -m fdp tune --component mlp --K 4 --batch 1 --steps ddim --dtype fp32 --refresh || rc=1
  cmd "$PY" -m fdp tune --component mlp --K 4 --batch 256 --steps ddpm --dtype bf16 --refresh || rc=1
  cmd "$PY" -m fdp tune --component unet-paper --K 4 --batch 1 --steps ddim --dtype fp16 --refresh || rc=1
  return $rc
}

bench_args() {
  local args=(--repeats 20 --warmup 2 --budget 0.5 --no-progress)
  has_module matplotlib || { args+=(--no-plots); echo "matplotlib is missing: no plots" >>"$LOG"; }
  echo "${args[@]}"
}

stage_target() {
  need_gpu || return 1
  has_module rich || { skip "fdp bench needs rich (pip install rich; not installable offline)"; return; }
  local rc=0 args=(--component mlp --K 4 --batch 1 --steps ddim --dtype bf16,fp32 --repeats 200 --warmup 5
                   --budget 2 --no-progress --no-plots)
  cmd "$PY" -m fdp bench "${args[@]}" --backends eager,cuda-graph,fused --out "$OUT_DIR/target.json" || rc=1
  cmd "$PY" -c "$TARGET_CHECK" "$OUT_DIR/target.json" || rc=1
  cmd env FDP_CUDA_PDL=0 "$PY" -m fdp bench "${args[@]}" --backends cuda --out "$OUT_DIR/target-nopdl.json" || rc=1
  cmd "$PY" -c "$TARGET_CHECK" "$OUT_DIR/target-nopdl.json" || rc=1
  [ "$DRY" = 1 ] || NOTE[target]="$(grep -h '^kernel-only\|^whole call' "$LOG" | head -2 | paste -sd ';' -)"
  return $rc
}

# TARGET_CHECK FILE: every path's status, kernel-only and whole-call device us/step; exit 1 unless every status
# is ok. The whole call (copies, the per-call terms, the graph launch) against the kernels alone is printed per
# path and, for cuda and cuda-persistent, held to the target of 1.2x (reported, not failed: a speed target).
TARGET_CHECK='import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
def f(v):
    return "-" if v is None else "%.2f" % v
def ratio(c):
    k, w = c.get("step_kernel_us"), c.get("step_gpu_us")
    return w / k if k and w else None
print("%-18s %-5s %-8s %14s %14s %12s %12s %8s" % ("path", "dtype", "status", "kernel us/step", "device us/step",
                                                   "whole/kernel", "host us/call", "vs eager"))
for c in cases:
    print("%-18s %-5s %-8s %14s %14s %12s %12s %8s  %s" % (c["backend"], c["dtype"], c["status"],
          f(c.get("step_kernel_us")), f(c["step_gpu_us"]), f(ratio(c)), f(c.get("host_us")),
          f(c.get("speedup_vs_eager")), c.get("skipped") or ""))
native = [c for c in cases if c["backend"] in ("cuda-persistent", "cuda")]
print("kernel-only us/step: " + ", ".join("%s %s %s" % (c["backend"], c["dtype"], f(c.get("step_kernel_us")))
      for c in native))
print("whole call / kernel-only (target <= 1.2): " + ", ".join(
      "%s %s %s%s" % (c["backend"], c["dtype"], f(ratio(c)),
                      "" if ratio(c) is None else " met" if ratio(c) <= 1.2 else " NOT met") for c in native))
bad = [c["backend"] + " " + c["dtype"] + ": " + c["status"] for c in cases if c["status"] != "ok"]
if bad:
    print("not ok: " + "; ".join(bad))
sys.exit(1 if bad else 0)'


stage_bench_mlp() {
  need_gpu || return 1
  has_module rich || { skip "fdp bench needs rich (pip install rich; not installable offline)"; return; }
  # shellcheck disable=SC2046
  cmd "$PY" -m fdp bench --component mlp --K 4 --batch 1,16,256 --steps ddim,ddpm --dtype fp32,bf16 \
    --backends eager,batched,cuda-graph,fused --out "$OUT_DIR/bench-mlp.json" $(bench_args)
}

stage_bench_unet() {
  need_gpu || return 1
  has_module rich || { skip "fdp bench needs rich (pip install rich; not installable offline)"; return; }
  # shellcheck disable=SC2046
  cmd "$PY" -m fdp bench --component unet-paper --K 4 --batch 1 --steps ddim,ddpm --dtype bf16 \
    --backends eager,batched,cuda-graph,fused --out "$OUT_DIR/bench-unet.json" $(bench_args)
}

# Three calls of one backend's sampler: MLP K=4 H=256, batch 16, DDIM-10, fp32.
NCU_SCRIPT='import sys, torch, fdp
from fdp.bench.paths import make_policy, make_scheduler
pol = make_policy("mlp", 4, "cuda")
s = fdp.Sampler(pol, make_scheduler("ddim"), num_inference_steps=10, backend=sys.argv[1], dtype=torch.bfloat16)
cond = torch.randn(1, pol.cond_dim, device="cuda")  # the target: batch 1, bf16 weights
for _ in range(3):
    s(cond)
torch.cuda.synchronize()'

stage_ncu() {
  need_gpu || return 1
  command -v ncu >/dev/null 2>&1 || [ "$DRY" = 1 ] || { skip "ncu (Nsight Compute) is not on PATH"; return; }
  local rc=0 be
  for be in cuda-persistent triton-persistent; do
    # The third launch is profiled: past compilation and warm-up.
    cmd ncu --clock-control none --kernel-name regex:mlp_persistent_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      -f -o "$OUT_DIR/ncu-$be" "$PY" -c "$NCU_SCRIPT" "$be" || { rc=1; continue; }
    cmd ncu --import "$OUT_DIR/ncu-$be.ncu-rep" --page details || rc=1
  done
  return $rc
}

# -- the summary and the archive ----------------------------------------------------------------------------------

json_str() { local v=${1//\\/\\\\}; v=${v//\"/\\\"}; v=${v//$'\n'/ }; v=${v//$'\t'/ }; printf '"%s"' "$v"; }

# write_summary: summary.md, summary.json and (with --archive) the archive, from what is known now.
write_summary() {
  [ "$DRY" = 1 ] && return 0
  local s sep
  {
    echo "# fdp gpu-check, $(date -u +%Y-%m-%dT%H:%M:%SZ)${INTERRUPTED:+ (stopped by $INTERRUPTED)}"
    echo
    echo '```'
    grep -h -E '^(python|torch|device|triton) |Driver Version|release [0-9]' "$OUT_DIR/env.log" 2>/dev/null || true
    echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo '```'
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    for s in "${ALL_STAGES[@]}"; do
      echo "| $s | ${STATUS[$s]:-PENDING} | ${SECS[$s]:-} | ${NOTE[$s]:-} |"
    done
  } >"$OUT_DIR/summary.md.tmp" && mv -f "$OUT_DIR/summary.md.tmp" "$OUT_DIR/summary.md"
  {
    echo "{"
    echo "  \"budget_s\": $BUDGET, \"total_s\": $(($(date +%s) - START)), \"stopped_by\": $(json_str "${INTERRUPTED:-}"),"
    echo "  \"stages\": {"
    for s in "${ALL_STAGES[@]}"; do
      sep=,; [ "$s" = "${ALL_STAGES[-1]}" ] && sep=
      echo "    \"$s\": {\"status\": \"${STATUS[$s]:-PENDING}\", \"seconds\": ${SECS[$s]:-0}, \"note\": $(json_str "${NOTE[$s]:-}")}$sep"
    done
    echo "  }"
    echo "}"
  } >"$OUT_DIR/summary.json.tmp" && mv -f "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
  [ -z "$ARCHIVE" ] || write_archive
  return 0
}

# The archive's files, at most 8: the two summaries, every stage log in one file, and the JSON results.
ARCHIVED_JSON=(selftest.json target.json target-nopdl.json bench-mlp.json bench-unet.json)
write_archive() {
  local tmp="$OUT_DIR/.archive" s f
  rm -rf "$tmp" && mkdir -p "$tmp/gpu-check" || return 0
  cp "$OUT_DIR/summary.md" "$OUT_DIR/summary.json" "$tmp/gpu-check/" 2>/dev/null
  for s in "${ALL_STAGES[@]}"; do
    [ -f "$OUT_DIR/$s.log" ] || continue
    echo "======== $s (${STATUS[$s]:-PENDING}) ========"
    cat "$OUT_DIR/$s.log"
  done >"$tmp/gpu-check/logs.txt"
  for f in "${ARCHIVED_JSON[@]}"; do
    [ ! -f "$OUT_DIR/$f" ] || cp "$OUT_DIR/$f" "$tmp/gpu-check/"
  done
  tar -czf "$ARCHIVE/gpu-check.tar.gz.tmp" -C "$tmp" gpu-check &&
    mv -f "$ARCHIVE/gpu-check.tar.gz.tmp" "$ARCHIVE/gpu-check.tar.gz"
  rm -rf "$tmp"
}

# Stopped (SIGTERM from a timeout, SIGINT): stop the running command, record it, write everything, exit.
INTERRUPTED=""
STAGE_T0=0
on_signal() {
  INTERRUPTED=$1
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  if [ -n "$STAGE" ] && [ "${STATUS[$STAGE]:-}" = RUNNING ]; then
    STATUS[$STAGE]=TIMEOUT; SECS[$STAGE]=$(($(date +%s) - STAGE_T0)); NOTE[$STAGE]="stopped by $1"
  fi
  write_summary
  echo "gpu-check: stopped by $1 after $(($(date +%s) - START)) s; summary in $OUT_DIR/summary.md" >&2
  exit 143
}
if [ "$DRY" = 0 ]; then
  trap 'on_signal SIGTERM' TERM
  trap 'on_signal SIGINT' INT
fi

# -- run -------------------------------------------------------------------------------------------------------

if [ "$DRY" = 1 ]; then
  echo "gpu-check --dry-run: results would go to $OUT_DIR (budget $BUDGET s); PYTHON=$PY"
fi
for s in "${ALL_STAGES[@]}"; do
  want=0
  for x in "${SELECTED[@]}"; do [ "$x" = "$s" ] && want=1; done
  for x in "${SKIP[@]}"; do [ "$x" = "$s" ] && want=0; done
  if [ "$want" = 1 ]; then
    run_stage "$s"
  elif [ "$DRY" = 0 ]; then
    STATUS[$s]=SKIP; SECS[$s]=0; NOTE[$s]="not selected"
  fi
done
[ "$DRY" = 1 ] && exit 0

failed=0
for s in "${ALL_STAGES[@]}"; do
  case ${STATUS[$s]} in FAIL|TIMEOUT) failed=1 ;; esac
done
write_summary
echo "gpu-check: $(($(date +%s) - START)) s; summary in $OUT_DIR/summary.md"
exit $failed
