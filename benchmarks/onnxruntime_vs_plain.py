"""The ``onnxruntime`` backend's call against plain onnxruntime on the same exported file, interleaved.

The backend's call (``fdp.Sampler``, ``check_inputs=False``: inputs copied into bound buffers, one
``run_with_iobinding``, the output copied out) and ``InferenceSession.run`` with numpy feeds on a session
built the same way, alternating call by call so that both see the same machine load. Prints and writes
(``--out``) the quartiles in milliseconds per call and the ratio of medians (plain / backend).

    python benchmarks/onnxruntime_vs_plain.py --threads 2 --calls 30 --out benchmarks/results/x.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
import torch

import fdp
from fdp.bench.paths import make_policy, make_scheduler
from fdp.bench.report import device_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for comp, K in (("unet-small", 1), ("mlp", 4)):
        pol = make_policy(comp, K, "cpu")
        s = fdp.Sampler(pol, make_scheduler("ddim"), num_inference_steps=10, backend="onnxruntime",
                        check_inputs=False)
        g = torch.Generator().manual_seed(0)
        cond, x = torch.randn(1, pol.cond_dim, generator=g), torch.randn(1, pol.horizon, pol.action_dim, generator=g)
        ours = s(cond, x_T=x)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        plain = ort.InferenceSession(str(s._prepared._path(1)), options, providers=["CPUExecutionProvider"])
        feeds = {"global_cond": cond.numpy(), "x_T": x.numpy()}
        assert torch.equal(torch.from_numpy(plain.run(None, feeds)[0]), ours)
        a, b = [], []
        for _ in range(args.calls):
            t = time.perf_counter()
            s(cond, x_T=x)
            a.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            torch.from_numpy(plain.run(None, feeds)[0])
            b.append((time.perf_counter() - t) * 1e3)
        row = {"component": comp, "K": K, "batch": 1, "steps": 10,
               "backend_ms_q25_q50_q75": [float(v) for v in np.percentile(a, [25, 50, 75])],
               "plain_ms_q25_q50_q75": [float(v) for v in np.percentile(b, [25, 50, 75])],
               "plain_over_backend": statistics.median(b) / statistics.median(a)}
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": ["python", *sys.argv], "device": device_name(torch.device("cpu")),
                       "threads": args.threads, "load_average": os.getloadavg(), "python": platform.python_version(),
                       "torch": torch.__version__, "onnxruntime": ort.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
