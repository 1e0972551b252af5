"""What is particular to the CPU backends ``onnxruntime`` and ``torch-batched`` (their numbers are checked in
tests/test_fused_mlp.py's table and their contract in tests/test_reliability.py), and ``auto`` timing them."""

import logging

import pytest
import torch
from helpers import KERNEL_SCHEDULERS, KERNEL_TOL, make_mlp_policy, rel_err

import fdp
from fdp.backends import get_backend, selection

pytest.importorskip("onnxruntime")
NAN = float("nan")


def _sampler(policy, backend, sched="ddpm_clip", n=3, **kw):
    factory, eta = KERNEL_SCHEDULERS[sched]
    return fdp.Sampler(policy, factory(), num_inference_steps=n, eta=eta, backend=backend, **kw)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(selection.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_onnxruntime_exports_once_per_signature_and_reuses_the_file(cache, monkeypatch):
    from fdp import export

    policy = make_mlp_policy(K=2, hidden=16, dtype=torch.float32)
    writes = []
    real = export.write_unrolled
    monkeypatch.setattr(export, "write_unrolled", lambda *a, **k: (writes.append(a[2][1].shape[0]), real(*a, **k)))
    s = _sampler(policy, "onnxruntime")
    c1, c4 = torch.randn(1, 5), torch.randn(4, 5)
    a = s(c1, generator=torch.Generator().manual_seed(0))
    s(c4, generator=torch.Generator().manual_seed(0))
    s(c1, generator=torch.Generator().manual_seed(1))
    assert writes == [1, 4]
    files = sorted(p.name for p in (cache / "onnx").glob("*.onnx"))
    assert len(files) == 2 and files[0].endswith("-b1.onnx") and files[1].endswith("-b4.onnx")
    # A new sampler on the same policy (a later process) loads the files instead of exporting again.
    again = _sampler(policy, "onnxruntime")(c1, generator=torch.Generator().manual_seed(0))
    assert writes == [1, 4] and torch.equal(again, a)
    # New weight values are a new graph: a new file, not the old one.
    with torch.no_grad():
        policy.components[0].out.bias.add_(1.0)
    s(c1, generator=torch.Generator().manual_seed(0))
    assert writes == [1, 4, 1] and len(list((cache / "onnx").glob("*.onnx"))) == 3


def test_onnxruntime_writes_every_output_element_each_call(cache):
    """The bound output buffer poisoned with NaN between calls: the next call must overwrite all of it."""
    policy = make_mlp_policy(K=3, hidden=16, dtype=torch.float32)
    s = _sampler(policy, "onnxruntime", sched="ddim_eta")
    x_T, noise = s.noise(3, torch.Generator().manual_seed(2))
    c = torch.randn(3, 5)
    first = s(c, x_T=x_T, step_noise=noise)
    sig = s._prepared._signatures.get(3)
    for t in (sig.out, *sig.inputs.values()):
        t.fill_(NAN)
    second = s(c, x_T=x_T, step_noise=noise)
    assert torch.isfinite(second).all() and torch.equal(first, second)
    assert second.data_ptr() != sig.out.data_ptr()  # the caller's result survives the next call


def test_onnxruntime_threads_follow_torch(cache, monkeypatch):
    seen = []
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, options, **kw):
        seen.append(options.intra_op_num_threads)
        return real(path, options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _sampler(make_mlp_policy(K=2, hidden=16, dtype=torch.float32), "onnxruntime")(torch.randn(2, 5))
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]


def test_onnxruntime_serves_u_nets(cache):
    torch.manual_seed(0)
    unet = fdp.ConditionalUnet1D(3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(8, 16), kernel_size=3,
                                 n_groups=4, cond_predict_scale=True)
    factory, _ = KERNEL_SCHEDULERS["ddpm_clip"]
    s = fdp.Sampler.for_unet(unet, factory(), horizon=4, action_dim=3, num_inference_steps=3, backend="onnxruntime")
    ref = fdp.Sampler.for_unet(unet, factory(), horizon=4, action_dim=3, num_inference_steps=3, backend="torch")
    c = torch.randn(2, 5)
    out = s(c, generator=torch.Generator().manual_seed(4))
    assert rel_err(out, ref(c, generator=torch.Generator().manual_seed(4))) < KERNEL_TOL[torch.float32]


@pytest.mark.parametrize("name,match", [("onnxruntime", "on the CPU"), ("torch-batched", None)])
def test_cpu_backends_availability(name, match):
    be = get_backend(name)
    assert be.unavailable_reason(torch.device("cpu")) is None
    reason = be.unavailable_reason(torch.device("meta"))
    assert (reason is None) if match is None else (match in reason)


def test_torch_batched_refuses_u_nets_with_a_reason():
    unet = fdp.ConditionalUnet1D(3, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(8, 16), kernel_size=3,
                                 n_groups=4)
    policy = fdp.single.single_denoiser_policy(unet, 4, 3, KERNEL_SCHEDULERS["ddim"][0]())
    assert "MLPDenoiser components only" in get_backend("torch-batched").unsupported_reason(policy, None, None)


def test_auto_on_the_cpu_times_the_verified_cpu_backends(cache, caplog):
    """The real decision on this CPU: every CPU backend verified and timed against torch, the fastest picked,
    the decision cached. Which one wins depends on the machine; that it is the fastest measured does not."""
    policy = make_mlp_policy(K=3, hidden=32, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="fdp"):
        s = _sampler(policy, "auto", sched="ddim")
    sel = s.selection
    assert sel.mode == "timed" and not sel.cached
    rows = {c.name: c for c in sel.candidates}
    timed = {n: r.time_ms for n, r in rows.items() if r.time_ms is not None}
    assert set(timed) == {"torch", "torch-batched", "onnxruntime"}
    assert s.backend == min(timed, key=timed.get) and rows[s.backend].status == "picked"
    for n in ("torch-batched", "onnxruntime"):
        assert rows[n].rel_error <= rows[n].tolerance == KERNEL_TOL[torch.float32]
    again = _sampler(policy, "auto", sched="ddim")
    assert again.selection.cached and again.backend == s.backend
    c = torch.randn(2, 5)
    ref = _sampler(policy, "torch", sched="ddim")(c, generator=torch.Generator().manual_seed(1))
    assert rel_err(again(c, generator=torch.Generator().manual_seed(1)), ref) < KERNEL_TOL[torch.float32]


def test_onnxruntime_bounds_its_files_and_sessions(cache, monkeypatch):
    """Every batch size and every weight change writes a graph file: at most MAX_FILES stay (the least recently
    used go), and at most MAX_SIGNATURES sessions stay live per prepared policy."""
    from fdp.backends import onnxruntime_backend as ortb

    monkeypatch.setattr(ortb, "MAX_FILES", 2)
    monkeypatch.setattr(ortb, "MAX_SIGNATURES", 2)  # read when the policy is prepared
    s = _sampler(make_mlp_policy(K=2, hidden=16, dtype=torch.float32), "onnxruntime")
    for B in (1, 2, 3):
        s(torch.randn(B, 5), generator=torch.Generator().manual_seed(0))
        assert len(s._prepared._signatures) <= 2
    names = sorted(p.name[-8:] for p in (cache / "onnx").glob("*.onnx"))
    assert names == ["-b2.onnx", "-b3.onnx"]  # b1, the least recently used, was removed
    assert s._prepared._signatures.keys() == [2, 3]
    assert not list((cache / "onnx").glob("*.tmp"))  # no temporary file left behind


def test_onnxruntime_replaces_a_planted_symlink_instead_of_writing_through_it(cache):
    s = _sampler(make_mlp_policy(K=2, hidden=16, dtype=torch.float32), "onnxruntime")
    victim = cache / "victim.txt"
    victim.write_text("keep me")
    path = s._prepared._path(1)
    path.parent.mkdir(parents=True)
    path.symlink_to(victim)
    s(torch.randn(1, 5), generator=torch.Generator().manual_seed(0))
    assert victim.read_text() == "keep me" and path.is_file() and not path.is_symlink()
