"""Where the time of ``backend="graph"`` goes, per kernel class, on a GPU.

Builds a factorized policy of K paper-size ``ConditionalUnet1D`` components
(random weights), samples with ``backend="graph"`` (K U-Nets fused
horizontally, the loop in a CUDA graph), then:

1. times whole calls with CUDA events (the number to compare with the other
   paths; ``fdp bench`` does that side by side);
2. profiles ``--calls`` calls with ``torch.profiler`` and sorts every GPU
   kernel into a class: convolution, GEMM, GroupNorm, Mish, elementwise
   (FiLM, residual adds, casts), copies/concatenation, the compose kernel,
   other; and measures the **gaps**, the GPU time inside a call when no kernel
   runs (launch latency between graph nodes);
3. sets the per-step time against the memory-bandwidth floor, the time to
   read the fused trunk's weights once per step (the FiLM and time-embedding
   weights are off the per-step path).

Prints a table and writes JSON (device, driver, versions, command, raw
timings, the breakdown) to ``--out`` (default ``benchmarks/results/``), and
the Chrome trace beside it with ``--trace``.

    python benchmarks/unet_profile.py                       # K=4, B=1, 10 DDIM steps, fp32
    python benchmarks/unet_profile.py --batch 64 --dtype bf16 --scheduler ddpm --steps 100
    python benchmarks/unet_profile.py --no-graph            # the same fused loop, eager (launch gaps visible)

Calls are separated by a host synchronisation and a short sleep, so the
kernels of one call are the run of kernels between two idle stretches longer
than ``--split-us``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Paper-size component (Chi et al.'s defaults as the factorized-policy reference uses them).
PAPER = dict(down_dims=(256, 512, 1024), kernel_size=5, n_groups=8, cond_predict_scale=True,
             diffusion_step_embed_dim=256)

# Peak DRAM bandwidth (GB/s) by device-name fragment, for the floor; --peak-gbs overrides.
PEAK_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
            ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0), ("4090", 1008.0),
            ("A10", 600.0)]

# Kernel classes, first match wins (lower-cased kernel names).
CLASSES = [
    ("compose", r"compose_step"),
    ("groupnorm", r"group_?norm|rowwisemoments|computefusedparams|groupnormkernel|welford"),
    ("conv", r"conv|fprop|dgrad|implicit|winograd|cudnn|im2col|col2im"),
    ("gemm", r"gemm|cutlass|cublas|matmul|splitk|xmma"),
    ("mish", r"mish"),
    ("copy/cat", r"cat|copy|memcpy|memset|transpose|permute"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|softmax|index"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def peak_gbs(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for frag, gbs in PEAK_GBS:
        if frag.lower() in device_name.lower():
            return gbs
    return None


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build(args):
    import fdp

    torch.manual_seed(args.seed)
    comps = [fdp.ConditionalUnet1D(args.action_dim, global_cond_dim=args.cond_dim, **PAPER) for _ in range(args.K)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(args.cond_dim, args.K), args.horizon, args.action_dim)
    policy = policy.cuda().eval()
    if args.scheduler == "ddim":
        sched = fdp.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    else:
        sched = fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sampler = fdp.Sampler(policy, sched, num_inference_steps=args.steps, backend="graph", dtype=dtype)
    if args.no_graph:
        from fdp.backends.graph_backend import GraphPrepared

        sampler._prepared = GraphPrepared(policy, sampler.table, dtype, capture=False)
    return policy, sampler


def kernels_from_trace(path: str):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = []
    for ev in events:
        if ev.get("ph") == "X" and str(ev.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset"):
            out.append((float(ev["ts"]), float(ev["dur"]), ev.get("name", "?")))
    out.sort()
    return out


def split_calls(kernels, split_us):
    """Group time-sorted kernels into calls: a new call starts after an idle stretch longer than ``split_us``."""
    calls, end = [], None
    for ts, dur, name in kernels:
        if end is None or ts - end > split_us:
            calls.append([])
            end = ts + dur
        calls[-1].append((ts, dur, name))
        end = max(end, ts + dur)
    return calls


def busy_time(kernels):
    """Length of the union of the kernels' intervals (streams may overlap)."""
    total, cur_s, cur_e = 0.0, None, None
    for ts, dur, _ in kernels:
        if cur_e is None or ts > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = ts, ts + dur
        else:
            cur_e = max(cur_e, ts + dur)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--action-dim", type=int, default=2)
    p.add_argument("--cond-dim", type=int, default=274)
    p.add_argument("--calls", type=int, default=10, help="profiled calls")
    p.add_argument("--timed", type=int, default=50, help="calls timed with CUDA events")
    p.add_argument("--no-graph", action="store_true", help="profile the fused loop without CUDA-graph capture")
    p.add_argument("--split-us", type=float, default=500.0)
    p.add_argument("--peak-gbs", type=float, default=None, help="peak DRAM bandwidth for the floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--trace", action="store_true", help="keep the Chrome trace beside the JSON")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("unet_profile.py needs a CUDA device (backend='graph' is CUDA-only); nothing measured.", file=sys.stderr)
        return 2

    import fdp

    policy, sampler = build(args)
    prepared = sampler._prepared
    B, T = args.batch, sampler.num_steps
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    gc = torch.randn(B, args.cond_dim, device="cuda", generator=g)
    x_T, noise = sampler.noise(B, g)

    def call():
        return sampler(gc, x_T=x_T, step_noise=noise)

    ref = fdp.Sampler(policy, sampler.scheduler, num_inference_steps=args.steps, backend="torch")(
        gc, x_T=x_T, step_noise=noise)
    for _ in range(3):  # the first call captures the graph
        out = call()
    torch.cuda.synchronize()
    rel_err = float((out - ref).abs().max() / ref.abs().max())

    # 1. whole-call GPU time.
    times = []
    for _ in range(args.timed):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)  # us
    times.sort()
    median_us = times[len(times) // 2]

    # 2. kernels.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
            torch.cuda.synchronize()
            time.sleep(0.002)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev_name = torch.cuda.get_device_name()
    tag = f"unet_profile_{re.sub(r'[^A-Za-z0-9]+', '-', dev_name)}_K{args.K}_B{B}_{args.dtype}_{stamp}"
    trace_path = os.path.join(args.out if args.trace else tempfile.gettempdir(), tag + ".trace.json")
    prof.export_chrome_trace(trace_path)
    kernels = kernels_from_trace(trace_path)
    if not args.trace:
        os.remove(trace_path)
    calls = split_calls(kernels, args.split_us)
    # Each call copies its inputs in, replays and copies out: the calls are the biggest groups.
    calls = sorted(calls, key=len, reverse=True)[:args.calls]
    n = max(len(calls), 1)

    per_class: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    span = busy = 0.0
    launches = 0
    for c in calls:
        span += c[-1][0] + c[-1][1] - c[0][0]
        busy += busy_time(c)
        launches += len(c)
        for ts, dur, name in c:
            cls = classify(name)
            per_class[cls] = per_class.get(cls, 0.0) + dur
            entry = per_kernel.setdefault(name, [cls, 0, 0.0])
            entry[1] += 1
            entry[2] += dur
    per_class = {k: v / n for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])}
    gaps = (span - busy) / n

    # 3. the bandwidth floor: the trunk's weights, read once per step.
    trunk_bytes = sum(t.numel() * t.element_size() for name, t in prepared.fused.named_buffers()
                      if not name.startswith(("time_terms", "cond_", "film_const")))
    gbs = peak_gbs(dev_name, args.peak_gbs)
    floor_us = trunk_bytes / (gbs * 1e3) if gbs else None
    per_step_us = median_us / T

    print(f"device {dev_name}, driver {driver_version()}, torch {torch.__version__}")
    print(f"K={args.K} B={B} {args.scheduler} T={T} {args.dtype} graph={not args.no_graph} "
          f"compose={prepared.compose}  max rel err vs torch backend {rel_err:.2e}")
    print(f"call: median {median_us:.1f} us ({per_step_us:.1f} us/step); "
          f"{launches / n:.0f} kernels/call ({launches / n / T:.1f}/step)")
    if floor_us:
        print(f"weights {trunk_bytes / 1e6:.1f} MB/step -> floor {floor_us:.1f} us/step at {gbs:.0f} GB/s: "
              f"{100 * floor_us / per_step_us:.0f}% of the floor")
    print(f"\n{'class':<12} {'us/call':>10} {'us/step':>10} {'share':>7}")
    total = sum(per_class.values()) + gaps
    for cls, us in list(per_class.items()) + [("gaps", gaps)]:
        print(f"{cls:<12} {us:>10.1f} {us / T:>10.2f} {100 * us / total:>6.1f}%")
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][2])[:15]
    print("\ntop kernels (us per call, count per call):")
    for name, (cls, count, us) in top:
        print(f"  {us / n:>9.1f} {count / n:>6.0f}  [{cls}] {name[:110]}")

    result = dict(
        kind="unet_profile", device=dev_name, driver=driver_version(), cuda=torch.version.cuda,
        torch=torch.__version__, triton=_version("triton"), fdp=getattr(fdp, "__version__", "?"),
        python=platform.python_version(), command=" ".join([sys.executable, *sys.argv]),
        config=dict(vars(args), unet=PAPER, T=T, compose=prepared.compose,
                    tf32=dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32)),
        max_rel_err_vs_torch=rel_err, call_us=times, median_call_us=median_us, per_step_us=per_step_us,
        kernels_per_call=launches / n, per_class_us_per_call=per_class, gaps_us_per_call=gaps,
        span_us_per_call=span / n, trunk_weight_bytes=trunk_bytes, peak_gbs=gbs, floor_us_per_step=floor_us,
        top_kernels=[dict(name=k, cls=v[0], count_per_call=v[1] / n, us_per_call=v[2] / n) for k, v in top],
    )
    path = os.path.join(args.out, tag + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")
    return 0


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # pragma: no cover - optional
        return None


if __name__ == "__main__":
    sys.exit(main())
