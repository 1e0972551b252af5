"""``fdp.export.onnx`` and ``fdp export onnx``: the unrolled loop in onnxruntime against the sampler."""

from pathlib import Path

import pytest
import torch

import fdp
import fdp.export
from fdp import cli
from fdp.integrations import lerobot
from helpers import assert_matches_in_float32, signed_tanh_routing

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

LEROBOT = Path(__file__).parent / "data" / "lerobot"


def _unet_sampler(kind):
    torch.manual_seed(0)
    unet = fdp.ConditionalUnet1D(2, global_cond_dim=5, diffusion_step_embed_dim=8, down_dims=(8, 16), n_groups=4,
                                 cond_predict_scale=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = (fdp.DDPMScheduler if kind == "ddpm" else fdp.DDIMScheduler)(num_train_timesteps=30)
    return fdp.Sampler.for_unet(unet, sched, 8, 2, num_inference_steps=3, eta=0.5 if kind == "ddim-eta" else 0.0)


def _mlp_sampler(strategy="soft"):
    torch.manual_seed(1)
    comps = [fdp.MLPDenoiser(2, 8, global_cond_dim=5, hidden_dim=16) for _ in range(2)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(5, 2, strategy=strategy), 8, 2)
    if strategy == "tanh":
        signed_tanh_routing(policy)  # the router's tanh and non-finite check go into the graph
    return fdp.Sampler(policy, fdp.DDPMScheduler(num_train_timesteps=20), num_inference_steps=4, backend="torch")


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(feeds)
    return torch.from_numpy(session.run(["actions"], {k: v.numpy() for k, v in feeds.items()})[0])


@pytest.mark.parametrize("make, batch", [(lambda: _unet_sampler("ddpm"), 1), (lambda: _unet_sampler("ddim"), 3),
                                         (lambda: _unet_sampler("ddim-eta"), 2), (_mlp_sampler, 3),
                                         (lambda: _mlp_sampler("tanh"), 2)])
def test_onnx_round_trip(tmp_path, make, batch):
    sampler = make()
    result = fdp.export.onnx(sampler, tmp_path / "policy.onnx", batch)
    assert result.path.is_file() and result.batch_size == batch and result.num_steps == sampler.num_steps
    assert 0 <= result.max_abs_error <= result.tolerance
    adds = bool(sampler.table.adds_noise.any())
    assert result.input_names == (("global_cond", "x_T", "step_noise") if adds else ("global_cond", "x_T"))
    # fresh inputs, not the ones the export checked with
    cond = torch.randn(batch, sampler.policy.cond_dim)
    x_T, step_noise = sampler.noise(batch, torch.Generator().manual_seed(9))
    feeds = {"global_cond": cond, "x_T": x_T, **({"step_noise": step_noise} if adds else {})}
    assert_matches_in_float32({"onnxruntime": _run(result.path, feeds)}, sampler, cond, x_T, step_noise)


def test_onnx_torch_export_path(tmp_path):
    pytest.importorskip("onnxscript")
    sampler = _unet_sampler("ddpm")
    result = fdp.export.onnx(sampler, tmp_path / "policy.onnx", 2, dynamo=True)
    cond = torch.randn(2, 5)
    x_T, step_noise = sampler.noise(2, torch.Generator().manual_seed(3))
    got = _run(result.path, {"global_cond": cond, "x_T": x_T, "step_noise": step_noise})
    assert_matches_in_float32({"onnxruntime": got}, sampler, cond, x_T, step_noise)


def test_onnx_check_catches_a_wrong_graph(tmp_path, monkeypatch):
    sampler = _unet_sampler("ddim")
    forward = fdp.export._Unrolled.forward
    monkeypatch.setattr(fdp.export._Unrolled, "forward", lambda self, *a: forward(self, *a) + 1e-3)
    with pytest.raises(ValueError, match="disagrees with the sampler"):
        fdp.export.onnx(sampler, tmp_path / "bad.onnx", 1)


def test_onnx_argument_errors(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="fdp.Sampler"):
        fdp.export.onnx(object(), tmp_path / "x.onnx", 1)
    with pytest.raises(ValueError, match="batch_size"):
        fdp.export.onnx(_unet_sampler("ddim"), tmp_path / "x.onnx", 0)
    sampler = _unet_sampler("ddim")
    with pytest.raises(ValueError, match="export a sampler built without `dtype`"):
        fdp.export.onnx(fdp.Sampler(sampler.policy, sampler.scheduler, 3, dtype=torch.bfloat16, backend="torch"),
                        tmp_path / "x.onnx", 1)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[onnx\]' in fdp's clone"):
        fdp.export.onnx(_unet_sampler("ddim"), tmp_path / "x.onnx", 1)


def test_cli_exports_a_lerobot_folder(tmp_path, capsys):
    out = tmp_path / "policy.onnx"
    assert cli.main(["export", "onnx", str(LEROBOT / "ddim_nofilm_2stage"), str(out), "--batch-size", "2",
                     "--num-inference-steps", "3"]) == 0
    assert "onnxruntime matches the sampler" in capsys.readouterr().out
    sampler = lerobot.load_pretrained(LEROBOT / "ddim_nofilm_2stage", device="cpu",
                                      num_inference_steps=3)
    cond, x_T = torch.randn(2, 10), torch.randn(2, 8, 2)
    assert_matches_in_float32({"onnxruntime": _run(out, {"global_cond": cond, "x_T": x_T})}, sampler, cond, x_T)
    assert cli.main(["export", "onnx", str(tmp_path / "absent"), str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
