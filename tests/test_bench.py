"""``fdp bench``: a smoke run of the smallest case, the results schema, the roofline formulas, NVTX off."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fdp
from fdp import profiling
from fdp.bench import roofline
from fdp.bench.cases import COMPONENTS, build_grid, expand_backends
from fdp.bench.report import CASE_KEYS, TOP_KEYS
from fdp.cli import main

REPEATS = 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    argv = ["bench", "--quick", "--batch", "1", "--K", "2", "--repeats", str(REPEATS), "--warmup", "1",
            "--no-progress", "--out", str(out)]
    rc = main(argv)
    return rc, argv, out


def test_quick_run_writes_the_schema(quick_run):
    rc, argv, out = quick_run
    assert rc == 0
    data = json.loads(out.read_text())
    for key in TOP_KEYS:
        assert key in data, key
    assert isinstance(data["device"], str) and data["device"]
    assert data["torch"] == torch.__version__
    assert data["command"] == ["fdp", *argv]
    assert data["commit"] is None or (isinstance(data["commit"], str) and len(data["commit"]) == 40)
    for key in ("driver", "cuda", "triton"):
        assert data[key] is None or isinstance(data[key], str)
    assert isinstance(data["date"], str) and data["date"][:2] == "20"
    cases = data["cases"]
    assert isinstance(cases, list) and cases
    by_backend = {c["backend"]: c for c in cases}
    assert {"eager", "batched"} <= set(by_backend)
    gpu = torch.cuda.is_available()
    for c in cases:
        for key in CASE_KEYS:
            assert key in c, (c["backend"], key)
        assert c["component"] == "mlp" and c["K"] == 2 and c["batch"] == 1
        assert c["steps"] == 10 and c["scheduler"] == "ddim" and c["dtype"] == "fp32"
        assert isinstance(c["config"], dict) and c["config"]["hidden_dim"] == COMPONENTS["mlp"]["hidden_dim"]
        if c["status"] == "skipped":
            assert isinstance(c["skipped"], str) and c["skipped"]
            assert c["call_wall_us"] is None and c["raw_call_wall_us"] == []
            assert c["host_us"] is None and c["launches_per_call"] is None
            continue
        if c["kind"] == "library":  # fused backends have their own tests; here only the schema matters
            assert c["status"] in ("ok", "FAILED", "error")
            if c["status"] == "error":
                continue
        else:
            assert c["status"] == "ok", (c["backend"], c["status"], c["skipped"], c.get("rel_err"))
        assert len(c["raw_call_wall_us"]) == REPEATS
        assert all(isinstance(v, float) and v > 0 for v in c["raw_call_wall_us"])
        assert c["call_wall_us"] > 0
        if gpu:
            assert len(c["raw_step_gpu_us"]) == REPEATS and c["step_gpu_us"] > 0
            assert 0 < c["host_us"] <= c["call_wall_us"]
            assert isinstance(c["launches_per_call"], int) and c["launches_per_call"] >= 1
        else:
            assert c["step_gpu_us"] is None and c["raw_step_gpu_us"] is None
            # All of a CPU call is host work; there are no kernel launches to count.
            assert c["host_us"] == c["call_wall_us"] and c["launches_per_call"] is None
        assert c["floor_us"] is None or c["floor_us"] > 0
        if c["floor_us"] is None:
            assert c["fraction_of_floor"] is None
        else:
            assert 0 < c["fraction_of_floor"] < math.inf
        assert c["rel_err"] is not None and (c["rel_err"] <= c["tolerance"]) == (c["status"] == "ok")
        assert c["chunks_per_s"] > 0 and c["speedup_vs_eager"] > 0
    assert by_backend["eager"]["status"] == "ok" and by_backend["eager"]["rel_err"] == 0.0
    assert by_backend["eager"]["speedup_vs_eager"] == pytest.approx(1.0)


def test_quick_run_writes_plots(quick_run):
    _, _, out = quick_run
    pngs = sorted(out.parent.glob(out.stem + "-*.png"))
    kinds = {p.name.split("-")[1] for p in pngs}
    assert {"latency", "speedup"} <= kinds
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["mlp", "unet-small", "unet-paper"])
def test_roofline_parameter_count_matches_the_model(name):
    spec = COMPONENTS[name]
    with torch.device("meta"):
        if spec["family"] == "mlp":
            m = fdp.MLPDenoiser(spec["action_dim"], spec["horizon"], spec["cond_dim"], spec["hidden_dim"],
                                spec["num_blocks"], spec["time_embed_dim"])
        else:
            m = fdp.ConditionalUnet1D(spec["action_dim"], global_cond_dim=spec["cond_dim"],
                                      diffusion_step_embed_dim=spec["diffusion_step_embed_dim"],
                                      down_dims=spec["down_dims"], kernel_size=spec["kernel_size"],
                                      n_groups=spec["n_groups"], cond_predict_scale=spec["cond_predict_scale"])
    cost = roofline.step_cost(dict(spec, name=name), 3, 1, "fp32")
    assert cost.params == sum(p.numel() for p in m.parameters())
    if spec["family"] == "unet":
        assert cost.weight_bytes == 3 * 4 * cost.params
        assert roofline.step_cost(dict(spec, name=name), 3, 1, "bf16").weight_bytes == 3 * 2 * cost.params


def test_roofline_flops_match_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    spec = dict(COMPONENTS["unet-small"], down_dims=[16, 32, 64], diffusion_step_embed_dim=16, cond_dim=8)
    unet = fdp.ConditionalUnet1D(spec["action_dim"], global_cond_dim=8, diffusion_step_embed_dim=16,
                                 down_dims=[16, 32, 64], kernel_size=5, cond_predict_scale=True)
    with FlopCounterMode(display=False) as fc:
        unet(torch.randn(1, spec["horizon"], spec["action_dim"]), 3, global_cond=torch.randn(1, 8))
    assert roofline.unet_step_cost(spec, 1, 1, "fp32").flops == fc.get_total_flops()

    spec = dict(COMPONENTS["mlp"], hidden_dim=32)
    mlp = fdp.MLPDenoiser(spec["action_dim"], spec["horizon"], spec["cond_dim"], 32, spec["num_blocks"])
    B = 5
    x = torch.randn(B, spec["horizon"] * spec["action_dim"])
    st, ct = mlp.step_terms(torch.tensor([3])), mlp.sample_terms(torch.randn(B, spec["cond_dim"]), B)
    with FlopCounterMode(display=False) as fc:
        mlp.forward_terms(x, st.t_in[0], st.t_shift[0], ct.c_in, ct.scale, ct.shift)
    assert roofline.mlp_step_cost(spec, 1, B, "fp32").flops == fc.get_total_flops()


def test_floor_is_the_larger_of_memory_and_compute():
    cost = roofline.StepCost(weight_bytes=1_000_000, flops=4_000_000, params=0)
    peaks = roofline.DevicePeaks(copy_bytes_per_s=1e12, matmul_flops_per_s={"fp32": 1e12})
    assert roofline.floor_us(cost, peaks, "fp32") == (pytest.approx(4.0), "compute")
    peaks = roofline.DevicePeaks(copy_bytes_per_s=1e11, matmul_flops_per_s={"fp32": 1e12})
    assert roofline.floor_us(cost, peaks, "fp32") == (pytest.approx(10.0), "memory")
    assert roofline.floor_us(cost, peaks, "bf16") == (None, None)


def test_grid_filters():
    quick = build_grid(True)
    assert [c.label() for c in quick.configs()][:1] == ["mlp K=2 B=1 ddim10 fp32"]
    assert len(quick.configs()) == 4
    g = build_grid(False, components="unet", K="1,8", batch="16", steps="100", dtype="bfloat16", device="cpu")
    assert g.components == ["unet-small"] and g.K == [1, 8] and g.batch == [16]
    assert g.schedules == ["ddpm"] and g.dtype == ["bf16"]
    assert any("unet-paper" in s for s in build_grid(False, device="cpu").skipped)
    for bad in (dict(K="0"), dict(batch="x"), dict(steps="50"), dict(dtype="fp8"), dict(components="cnn")):
        with pytest.raises(ValueError):
            build_grid(False, **bad)
    names, explicit = expand_backends(["native", "triton"], ["graph", "triton"])
    assert names[0] == "eager" and "cuda-graph" in names and names[-1] == "triton" and explicit == {"triton"}
    with pytest.raises(ValueError):
        expand_backends(["nope"], [])
    assert main(["bench", "--quick", "--K", "0", "--no-progress"]) == 2  # a clear error, not a traceback


def test_nvtx_range_is_a_no_op_when_off():
    was = profiling.nvtx_enabled()
    try:
        profiling.enable_nvtx(False)
        assert not profiling.nvtx_enabled()
        r = profiling.nvtx_range("fdp.step", 3)
        assert r is profiling.nvtx_range("fdp.sample")  # the shared null object: no allocation
        with r:
            pass
        # Without CUDA, asking for ranges leaves them off.
        assert profiling.enable_nvtx(True) == torch.cuda.is_available()
        with profiling.nvtx_range("fdp.step", 0):
            pass
    finally:
        profiling.enable_nvtx(was)


def test_launch_counter_names():
    from fdp.bench import timing

    for name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                 "cuGraphLaunch", "cudaLaunchCooperativeKernel"):
        assert timing._LAUNCH.match(name) and not timing._COPY.match(name), name
    for name in ("cudaMemcpyAsync", "cudaMemsetAsync", "cuMemcpyDtoDAsync_v2"):
        assert timing._COPY.match(name) and not timing._LAUNCH.match(name), name
    for name in ("cudaStreamSynchronize", "cudaEventRecord", "aten::copy_", "cudaGraphInstantiate"):
        assert not timing._LAUNCH.match(name) and not timing._COPY.match(name), name
    with pytest.raises(ValueError, match="CUDA"):
        timing.count_launches(lambda i: None, "cpu")


def test_a_path_that_raises_makes_the_exit_status_nonzero(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from fdp import backends
    from fdp.backends import Backend, register_backend

    class Raises(Backend):
        name, priority = "raises-at-call", 0

        def unavailable_reason(self, device):
            return None

        def unsupported_reason(self, policy, table, dtype):
            return None

        def prepare(self, policy, table, dtype=None):
            class Prepared:
                def run(self, global_cond, x_T, step_noise):
                    raise RuntimeError("an illegal memory access (simulated)")

            return Prepared()

    module = types.ModuleType("fdp_test_bench_raises")
    module.BACKEND = Raises()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    saved = dict(backends._MODULES)
    register_backend("raises-at-call", module.__name__)
    try:
        out = tmp_path / "r.json"
        rc = main(["bench", "--quick", "--batch", "1", "--K", "2", "--repeats", "1", "--warmup", "0",
                   "--backends", "eager,raises-at-call", "--no-plots", "--no-progress", "--out", str(out)])
    finally:
        backends._MODULES.clear()
        backends._MODULES.update(saved)
        backends._LOADED.pop("raises-at-call", None)
    cases = json.loads(out.read_text())["cases"]
    assert {c["backend"]: c["status"] for c in cases} == {"eager": "ok", "raises-at-call": "error"}
    assert rc == 1 and "raised (status error)" in capsys.readouterr().out


def test_kernel_only_replays_the_captured_graph_alone():
    from types import SimpleNamespace

    from test_call_path import _affine, _Emulated  # a CapturedCall whose graph is emulated on the CPU

    from fdp.bench import paths

    call = _Emulated(_affine)
    sampler = SimpleNamespace(_prepared=SimpleNamespace(_call=call))
    assert paths._replay_alone(sampler) is None  # nothing captured yet: no kernel-only time
    args = (torch.randn(2, 3), torch.randn(2, 4, 2), None)
    call(*args)
    entry = call._entries.get(call.signatures[-1])
    replay = paths._replay_alone(sampler)
    entry.output.fill_(float("nan"))
    replay(0)
    # The graph ran on its static inputs (those of the last call) and nothing else: no input copy.
    assert torch.equal(entry.output, _affine(*args)) and call.captures == 1
    assert paths._replay_alone(SimpleNamespace(_prepared=SimpleNamespace())) is None  # e.g. the torch backend


def test_the_default_table_fits_100_columns_and_wide_has_every_column(quick_run):
    import io

    from rich.console import Console

    from fdp.bench.report import print_table

    _, _, out = quick_run
    data = json.loads(out.read_text())
    # A GPU run's columns too (step GPU time), on this run's rows, and the longest path name there is.
    gpu = json.loads(json.dumps(data))
    for c in gpu["cases"]:
        c["step_gpu_us"] = c["call_wall_us"]
    gpu["cases"].append(dict(gpu["cases"][0], backend="compile-reduce-overhead", call_wall_us=123456.7,
                             call_wall_us_iqr=98765.4))
    for result in (data, gpu):
        buf = io.StringIO()
        print_table(result, Console(file=buf, width=100, color_system=None))
        text = buf.getvalue()
        assert max(len(line) for line in text.splitlines()) <= 100
        shown = {c["backend"] for c in result["cases"] if c["status"] != "skipped"}
        for name in shown:
            assert f"  {name} " in text, name  # whole names, not cut to fit
        assert "…" not in text and "--wide" in text
    buf = io.StringIO()
    print_table(data, Console(file=buf, width=220, color_system=None), wide=True)  # fdp bench --wide | less
    assert "chunks/s" in buf.getvalue() and "% floor" in buf.getvalue()


# -- fdp bench --host ---------------------------------------------------------------------------------------------

def test_host_mode_times_every_call_path_with_the_device_work_stubbed(tmp_path, capsys):
    from fdp.bench.host import SCHEMA

    out = tmp_path / "host.json"
    assert main(["bench", "--host", "--calls", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == SCHEMA and result["calls"] == 20
    cases = {c["case"]: c for c in result["cases"]}
    assert len(cases) == 2
    for case in cases.values():
        paths = {p["path"]: p for p in case["paths"]}
        assert set(paths) == {"call", "call, check_inputs=False", "call, check_inputs=False, watch_policy=False",
                              "static call", "static call, in place"}
        for p in paths.values():
            assert len(p["host_us"]) == result["repeats"] and 0 < p["min_us"] <= p["median_us"] <= p["max_us"]
        # What each path issues, counted by construction: the default call draws x_T (one op), a static
        # call given a tensor copies it into its buffer, one in place issues nothing.
        assert paths["call"]["torch_ops"] == 1 and paths["call"]["copies"] == 0
        assert (paths["static call"]["torch_ops"], paths["static call"]["copies"]) == (1, 1)
        assert (paths["static call, in place"]["torch_ops"], paths["static call, in place"]["copies"]) == (0, 0)
    # The watch reads every tensor: the U-Net case has more of them than the MLP case.
    assert cases["unet K=4 (paper structure)"]["tensors"] > cases["mlp K=4 H=256"]["tensors"]
    assert "host µs per call" in capsys.readouterr().out


def test_host_mode_takes_one_batch_size(capsys):
    assert main(["bench", "--host", "--batch", "1,16"]) == 2
    assert "`--batch`" in capsys.readouterr().err
