"""``fdp.integrations.lerobot`` against outputs of the real LeRobot (tests/data/lerobot, see make_fixtures.py).

The ``lerobot``-marked tests run ``accelerate`` on a real LeRobot policy. ``bash scripts/test.sh`` installs
LeRobot (``FDP_LEROBOT=1``) and requires them to run; elsewhere they skip where LeRobot is not importable.
Beside a CPU torch build, ``tests/conftest.py`` makes PyPI's torchvision importable (``tests/torchvision_cpu.py``);
with no torchvision installed, ``tests/data/lerobot/torchvision_stub.py`` (what make_fixtures.py imports) can stand in.
"""

import copy
import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_TOL, assert_within_float32_bound, float32_loop_bound, rel_err

import fdp
from fdp.backends.graph_backend import GraphPrepared
from fdp.integrations import lerobot

safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).parent / "data" / "lerobot"
CASES = ["ddpm_film_2stage", "ddpm_nofilm_3stage", "ddim_nofilm_2stage", "ddim_film_3stage"]


def _io(name):
    return safetensors_torch.load_file(str(DATA / name / "io.safetensors"))


@pytest.mark.parametrize("name", CASES)
def test_load_pretrained_returns_lerobots_actions(name):
    io = _io(name)
    cfg = json.loads((DATA / name / "config.json").read_text())
    sampler = lerobot.load_pretrained(DATA / name, device="cpu")
    assert sampler.selection.requested == "auto"  # what auto picks on this CPU is checked against torch
    unet = sampler.policy.components[0]
    assert unet.cond_predict_scale == cfg["use_film_scale_modulation"]
    assert list(unet.down_dims) == cfg["down_dims"]
    assert type(sampler.scheduler).__name__ == cfg["noise_scheduler_type"] + "Scheduler"
    assert sampler.num_steps == (cfg["num_inference_steps"] or cfg["num_train_timesteps"])
    assert ("step_noise" in io) == (cfg["noise_scheduler_type"] == "DDPM")
    got = sampler(io["global_cond"], x_T=io["x_T"], step_noise=io.get("step_noise"))
    assert got.shape == io["actions"].shape == (3, cfg["horizon"], 2)
    # auto's pick (e.g. ONNX Runtime on this CPU) is within its backend's bound of LeRobot's actions ...
    assert rel_err(got, io["actions"]) < KERNEL_TOL[torch.float32], sampler.backend
    # ... and the torch backend computes them as LeRobot does: LeRobot's float32 actions (made on another CPU)
    # and ours both within the float32 error of this loop, derived from the computation, of the float64 result.
    exact = lerobot.load_pretrained(DATA / name, device="cpu", backend="torch")
    got = exact(io["global_cond"], x_T=io["x_T"], step_noise=io.get("step_noise"))
    x64, bound = _float64_and_bound(name, io)
    assert_within_float32_bound(io["actions"], x64, bound, f"{name}: LeRobot")
    assert_within_float32_bound(got, x64, bound, f"{name}: fdp")
    # the graph backend's loop (on the CPU: no capture, torch composition) gives the same actions
    graph = GraphPrepared(sampler.policy, sampler.table, capture=False, compose="torch")
    got = graph.run(io["global_cond"], io["x_T"], io.get("step_noise"))
    assert_within_float32_bound(got, x64, bound, f"{name}: graph loop")


def _float64_and_bound(name, io, **options):
    """The fixture's actions in float64 and the float32 bound around them (helpers.float32_loop_bound)."""
    s64 = lerobot.load_pretrained(DATA / name, device="cpu", dtype=torch.float64, **options)
    d = {k: v.double() for k, v in io.items()}
    return float32_loop_bound(lambda: s64(d["global_cond"], x_T=d["x_T"], step_noise=d.get("step_noise")),
                              [s64.policy], extent=s64.policy.horizon)


def test_load_pretrained_dtype_steps_and_no_router_work():
    io = _io("ddpm_nofilm_3stage")
    sampler = lerobot.load_pretrained(DATA / "ddpm_nofilm_3stage", device="cpu", dtype=torch.float64)
    calls = []
    sampler.policy.router.net.register_forward_hook(lambda *a: calls.append(1))
    got = sampler(io["global_cond"].double(), x_T=io["x_T"].double(), step_noise=io["step_noise"].double())
    assert got.dtype == torch.float64 and calls == []
    x64, bound = _float64_and_bound("ddpm_nofilm_3stage", io)
    assert float((got - x64).abs().max()) <= 1e-12 * float(x64.abs().max())  # the same float64 computation
    assert_within_float32_bound(io["actions"], got, bound, "LeRobot's float32 actions")
    assert lerobot.load_pretrained(DATA / "ddpm_film_2stage", device="cpu", num_inference_steps=4).num_steps == 4


def test_load_pretrained_reads_a_compiled_policys_keys(tmp_path):
    folder = _copy(tmp_path, "ddim_film_3stage")
    _rewrite_weights(folder, lambda t: t.update({k.replace("diffusion.unet.", "diffusion.unet._orig_mod."): t.pop(k)
                                                 for k in list(t)}))
    io = _io("ddim_film_3stage")
    got = lerobot.load_pretrained(folder, device="cpu")(io["global_cond"], x_T=io["x_T"])
    x64, bound = _float64_and_bound("ddim_film_3stage", io)
    assert_within_float32_bound(got, x64, bound, "fdp from a compiled policy's keys")


def test_parameter_names_map_both_ways():
    for lr, ours in [("down_modules.0.0.conv1.block.0.weight", "down_modules.0.0.blocks.0.block.0.weight"),
                     ("up_modules.1.1.conv2.block.1.bias", "up_modules.1.1.blocks.1.block.1.bias"),
                     ("down_modules.0.2.weight", "down_modules.0.2.conv.weight"),
                     ("up_modules.0.2.bias", "up_modules.0.2.conv.bias"),
                     ("mid_modules.0.cond_encoder.1.weight", "mid_modules.0.cond_encoder.1.weight"),
                     ("final_conv.1.weight", "final_conv.1.weight")]:
        assert lerobot.to_fdp_name(lr) == ours and lerobot.from_fdp_name(ours) == lr
    assert lerobot.to_fdp_name("_orig_mod.down_modules.1.2.weight") == "down_modules.1.2.conv.weight"


def _copy(tmp_path, name="ddpm_film_2stage"):
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    return dst


def _rewrite_weights(folder, edit):
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))


def test_load_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        lerobot.load_pretrained(tmp_path / "absent")
    folder = _copy(tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lerobot.load_pretrained(folder)

    folder = _copy(tmp_path, "ddim_film_3stage")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "type": "act"}))
    with pytest.raises(ValueError, match="'act' policy"):
        lerobot.load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "beta_schedule"}))
    with pytest.raises(ValueError, match="beta_schedule"):
        lerobot.load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "noise_scheduler_type": "DPMSolver"}))
    with pytest.raises(ValueError, match="DPMSolver"):
        lerobot.load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))

    def add_key(t):
        t["diffusion.unet.mid_modules.0.attention.weight"] = torch.ones(2)

    _rewrite_weights(folder, add_key)
    with pytest.raises(ValueError, match=r"unexpected key 'diffusion\.unet\.mid_modules\.0\.attention\.weight'"):
        lerobot.load_pretrained(folder)

    folder = _copy(tmp_path / "b", "ddim_film_3stage")
    _rewrite_weights(folder, lambda t: t.pop("diffusion.unet.up_modules.0.1.conv2.block.0.bias"))
    with pytest.raises(ValueError, match=r"no 'diffusion\.unet\.up_modules\.0\.1\.conv2\.block\.0\.bias'"):
        lerobot.load_pretrained(folder)

    folder = _copy(tmp_path / "c", "ddim_film_3stage")
    _rewrite_weights(folder, lambda t: t.update({"diffusion.unet.final_conv.0.block.0.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match=r"final_conv\.0\.block\.0\.bias' has shape \[5\]"):
        lerobot.load_pretrained(folder)

    folder = _copy(tmp_path / "d", "ddim_film_3stage")
    _rewrite_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("diffusion.unet.")])
    with pytest.raises(ValueError, match="no diffusion.unet"):
        lerobot.load_pretrained(folder)

    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[lerobot\]' in fdp's clone"):
        lerobot.load_pretrained(DATA / "ddpm_film_2stage")


# -- untrusted files: every failure a named user error, naming the file (and the field or the tensor) ----------

from fdp._validation import InvalidArgument, InvalidArgumentType, InvalidFile  # noqa: E402


def _config_error(tmp_path, edit, cls, *message_parts):
    folder = _copy(tmp_path, "ddim_film_3stage")
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cls) as info:
        lerobot.load_pretrained(folder, device="cpu")
    text = str(info.value)
    assert text.startswith(f"{folder / 'config.json'}: "), text
    for part in message_parts:
        assert part in text, text


@pytest.mark.parametrize("field,value,cls,part", [
    ("clip_sample", "false", InvalidArgumentType, "`clip_sample` must be a bool, got 'false' (str)"),
    ("beta_end", 2.0, InvalidArgument, "`beta_end` must be a number in (0, 1), got 2.0"),
    ("beta_start", -0.0001, InvalidArgument, "`beta_start` must be a number in (0, 1), got -0.0001"),
    ("beta_start", 0.5, InvalidArgument, "`beta_start` (0.5) must be <= `beta_end`"),
    ("num_train_timesteps", "100", InvalidArgumentType, "`num_train_timesteps` must be a positive int"),
    ("clip_sample_range", None, InvalidArgumentType, "`clip_sample_range` must be a number >= 0"),
    ("prediction_type", "eps", InvalidArgument, "`prediction_type` must be one of"),
    ("horizon", 0, InvalidArgument, "`horizon` must be a positive int, got 0"),
    ("horizon", 16.0, InvalidArgumentType, "`horizon` must be a positive int"),
    ("n_groups", True, InvalidArgumentType, "`n_groups` must be a positive int, got True"),
    ("noise_scheduler_type", ["DDPM"], InvalidArgument, "`noise_scheduler_type` must be one of ['DDPM', 'DDIM']"),
    ("num_inference_steps", -1, InvalidArgument, "`num_inference_steps` must be None or a positive int"),
    ("num_inference_steps", 101, InvalidFile, "`num_inference_steps` (101) cannot be larger than `num_train_timesteps` "
                                              "(100)"),
    ("horizon", 6, InvalidFile, "`horizon` (6) must be divisible by 4: the U-Net in model.safetensors halves the "
                                "horizon 2 time(s)"),
])
def test_load_pretrained_refuses_a_bad_config_field_by_name(tmp_path, field, value, cls, part):
    _config_error(tmp_path, lambda cfg: cfg.update({field: value}), cls, part)


def test_load_pretrained_config_fields_reach_the_scheduler(tmp_path):
    # Every field fdp reads changes what it builds (a field dropped on the way would leave the default).
    folder = _copy(tmp_path, "ddpm_film_2stage")
    cfg = json.loads((folder / "config.json").read_text())
    changed = dict(num_train_timesteps=60, beta_start=0.0003, beta_end=0.03, beta_schedule="linear",
                   clip_sample=not cfg["clip_sample"], clip_sample_range=0.5, prediction_type="sample")
    (folder / "config.json").write_text(json.dumps({**cfg, **changed, "num_inference_steps": None}))
    sampler = lerobot.load_pretrained(folder, device="cpu")
    for key, value in changed.items():
        assert sampler.scheduler.config[key] == value, key
    assert sampler.num_inference_steps == 60


@pytest.mark.parametrize("text,part", [
    ("[1, 2, 3]", "holds a JSON array, expected a LeRobot policy config (a JSON object)"),
    ('"diffusion"', "holds a JSON string"),
    ("", "is not valid JSON (the file looks truncated)"),
    (None, "is not valid JSON (the file looks truncated)"),  # the real file cut in half
])
def test_load_pretrained_names_a_config_that_is_not_a_json_object(tmp_path, text, part):
    folder = _copy(tmp_path, "ddim_film_3stage")
    file = folder / "config.json"
    file.write_text(file.read_text()[: len(file.read_text()) // 2] if text is None else text)
    with pytest.raises(InvalidFile) as info:
        lerobot.load_pretrained(folder, device="cpu")
    assert str(info.value).startswith(f"{file} {part}"), str(info.value)


@pytest.mark.parametrize("keep", [0, 7, 0.5, -16])
def test_load_pretrained_names_a_truncated_safetensors_file(tmp_path, keep):
    folder = _copy(tmp_path, "ddim_film_3stage")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])  # -16: all but the end
    with pytest.raises(InvalidFile) as info:
        lerobot.load_pretrained(folder, device="cpu")
    assert str(info.value).startswith(f"{file} cannot be read as a safetensors file"), str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float64])
def test_load_pretrained_refuses_non_float_or_mixed_dtype_tensors_naming_them(tmp_path, dtype):
    folder = _copy(tmp_path, "ddim_film_3stage")
    key = "diffusion.unet.final_conv.1.bias"
    _rewrite_weights(folder, lambda t: t.update({key: t[key].to(dtype)}))
    with pytest.raises(InvalidFile) as info:
        lerobot.load_pretrained(folder, device="cpu")
    text = str(info.value)
    assert text.startswith(f"{folder / 'model.safetensors'}: the tensor ") and repr(key) in text, text
    assert f"has dtype {dtype}" in text


def test_load_pretrained_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    folder = _copy(tmp_path, "ddim_film_3stage")
    key = "diffusion.unet.mid_modules.0.conv1.block.0.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key].view(-1)[[3, 5]] = torch.tensor([float("nan"), float("inf")])

    _rewrite_weights(folder, poison)
    with pytest.raises(InvalidFile, match=re.escape(f"the tensor {key!r} holds 2 NaN or Inf values")):
        lerobot.load_pretrained(folder, device="cpu")


def test_load_pretrained_names_a_tensor_of_the_wrong_rank(tmp_path):
    folder = _copy(tmp_path, "ddim_film_3stage")
    key = "diffusion.unet.down_modules.0.0.conv1.block.0.weight"
    _rewrite_weights(folder, lambda t: t.update({key: t[key].flatten()}))
    with pytest.raises(InvalidArgument, match=re.escape(f"{key}' has shape")):
        lerobot.load_pretrained(folder, device="cpu")


@pytest.mark.parametrize("kw,cls,part", [
    (dict(backend="nonsense"), InvalidArgument, "`backend` must be 'auto' or one of"),
    (dict(num_inference_steps=0), InvalidArgument, "`num_inference_steps` must be None or a positive int"),
    (dict(dtype="int8"), InvalidArgument, "`dtype` must be a floating torch.dtype"),
    (dict(device="banana"), InvalidArgument, "`device` must be a torch.device"),
])
def test_load_pretrained_checks_its_arguments_before_reading(tmp_path, kw, cls, part):
    with pytest.raises(cls, match=re.escape(part)):
        lerobot.load_pretrained(tmp_path / "absent", **kw)  # the argument is named, not the missing folder
    with pytest.raises(InvalidArgumentType, match="`path` must be a str or a pathlib.Path"):
        lerobot.load_pretrained(3)


# -- accelerate, on a stand-in of LeRobot's DiffusionModel ---------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


class _StandInDiffusionModel(torch.nn.Module):
    """LeRobot's DiffusionModel as far as sampling goes: its conditional_sample loop, diffusers' scheduler."""

    def __init__(self, name):
        super().__init__()
        cfg = json.loads((DATA / name / "config.json").read_text())
        self.config = types.SimpleNamespace(horizon=cfg["horizon"], action_dim=2)
        self.unet = lerobot.load_pretrained(DATA / name, device="cpu").policy.components[0].requires_grad_(True)
        cls = {"DDPM": diffusers.DDPMScheduler, "DDIM": diffusers.DDIMScheduler}[cfg["noise_scheduler_type"]]
        self.noise_scheduler = cls(**{k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                          "beta_schedule", "clip_sample", "clip_sample_range",
                                                          "prediction_type")})
        self.num_inference_steps = cfg["num_inference_steps"] or cfg["num_train_timesteps"]

    @torch.no_grad()
    def conditional_sample(self, batch_size, global_cond=None, generator=None, noise=None):
        p = next(self.parameters())
        sample = noise if noise is not None else torch.randn(
            (batch_size, self.config.horizon, self.config.action_dim), dtype=p.dtype, device=p.device,
            generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            out = self.unet(sample, torch.full(sample.shape[:1], t, dtype=torch.long), global_cond=global_cond)
            sample = self.noise_scheduler.step(out, t, sample, generator=generator).prev_sample
        return sample


def _standin(name="ddpm_film_2stage"):
    return types.SimpleNamespace(diffusion=_StandInDiffusionModel(name))


def _seeded(fn, seed=11):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("name", ["ddpm_film_2stage", "ddim_film_3stage"])
def test_accelerate_draws_noise_as_lerobot(name):
    policy = _standin(name)
    model = policy.diffusion
    cond = _io(name)["global_cond"]
    original = model.conditional_sample
    ref_global = _seeded(lambda: original(3, global_cond=cond))
    ref_gen = original(3, global_cond=cond, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn(3, model.config.horizon, 2)
    ref_noise = _seeded(lambda: original(3, global_cond=cond, noise=x_T))
    with lerobot.accelerate(policy) as handle:
        assert model.conditional_sample is not original and handle.active
        after = _seeded(lambda: (model.conditional_sample(3, global_cond=cond), torch.randn(2)))
        _assert_both_within(after[0], ref_global, *_loop_in_float64(handle.sampler, cond), "global RNG")
        # the global RNG advanced exactly as LeRobot's loop advances it (the same draws: bit-identical)
        assert torch.equal(after[1], _seeded(lambda: (original(3, global_cond=cond), torch.randn(2))[1]))
        got = model.conditional_sample(3, global_cond=cond, generator=torch.Generator().manual_seed(5))
        _assert_both_within(got, ref_gen, *_loop_in_float64(handle.sampler, cond,
                                                            generator=torch.Generator().manual_seed(5)), "generator")
        got = _seeded(lambda: model.conditional_sample(3, global_cond=cond, noise=x_T))
        _assert_both_within(got, ref_noise, *_loop_in_float64(handle.sampler, cond, x_T=x_T), "given noise")
        assert handle.sampler.selection.requested == "auto" and handle.sampler.policy.components[0].global_cond_dim == 10
    assert not handle.active and "conditional_sample" not in vars(model)
    assert model.conditional_sample == original


def test_accelerate_follows_training_and_settings():
    policy = _standin("ddim_film_3stage")
    model = policy.diffusion
    cond = _io("ddim_film_3stage")["global_cond"]
    x_T = torch.randn(3, model.config.horizon, 2)
    handle = lerobot.accelerate(policy)
    first = model.conditional_sample(3, global_cond=cond, noise=x_T)
    sampler = handle.sampler
    # the same Sampler on the same inputs twice: bit-identical by construction
    assert model.conditional_sample(3, global_cond=cond, noise=x_T).equal(first) and handle.sampler is sampler
    # a training step changes the weights in place (fused kernels leave the version counters alone)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-2, fused=True)
    model.unet(x_T, torch.full((3,), 10), global_cond=cond).square().mean().backward()
    opt.step()
    trained = model.conditional_sample(3, global_cond=cond, noise=x_T)
    assert handle.sampler is sampler  # no rebuild: the Sampler saw the step and repacked itself
    handle.restore()
    expected = model.conditional_sample(3, global_cond=cond, noise=x_T)
    assert not torch.allclose(expected, first, atol=1e-3)
    _assert_both_within(trained, expected, *_loop_in_float64(sampler, cond, x_T=x_T), "after a training step")
    # the step count is read at every call
    handle = lerobot.accelerate(policy)
    model.num_inference_steps = 3
    assert handle.sampler.num_steps == 3
    _assert_both_within(model.conditional_sample(3, global_cond=cond, noise=x_T),
                        handle.original(3, global_cond=cond, noise=x_T),
                        *_loop_in_float64(handle.sampler, cond, x_T=x_T), "3 steps")
    with pytest.raises(ValueError, match="already accelerated"):
        lerobot.accelerate(policy)
    handle.restore()
    handle.restore()  # idempotent
    assert lerobot.accelerate(policy, num_inference_steps=2).sampler.num_steps == 2


def test_accelerate_sees_through_torch_compile():
    policy = _standin("ddim_film_3stage")
    cond, x_T = _io("ddim_film_3stage")["global_cond"], torch.randn(3, 16, 2)
    expected = policy.diffusion.conditional_sample(3, global_cond=cond, noise=x_T)
    policy.diffusion.unet = torch.compile(policy.diffusion.unet)  # wrapped; fdp never calls the compiled module
    with lerobot.accelerate(policy) as handle:
        got = policy.diffusion.conditional_sample(3, global_cond=cond, noise=x_T)
        assert handle.sampler.policy.components[0].final_conv[1].weight is policy.diffusion.unet._orig_mod.final_conv[1].weight
        x64, bound = _loop_in_float64(handle.sampler, cond, x_T=x_T)
    _assert_both_within(got, expected, x64, bound, "compiled U-Net")


@pytest.mark.parametrize("kw,match", [(dict(backend="nonsense"), r"^`backend` must be 'auto' or one of"),
                                      (dict(num_inference_steps=True), r"^`num_inference_steps` must be None or a "
                                                                       r"positive int, got True")])
def test_accelerate_checks_its_arguments_before_patching(kw, match):
    policy = _standin()
    original = policy.diffusion.conditional_sample
    with pytest.raises((ValueError, TypeError), match=match):
        lerobot.accelerate(policy, **kw)
    assert policy.diffusion.conditional_sample == original  # nothing patched


def test_accelerate_rejects_other_objects():
    with pytest.raises(TypeError, match="DiffusionPolicy"):
        lerobot.accelerate(types.SimpleNamespace(diffusion=object()))


# -- the real LeRobot (optional) -----------------------------------------------------------------------------------


def _lerobot_actions_in_float64(sampler, cond, start: int, n: int):
    """LeRobot's ``generate_actions`` in float64 (the accelerated Sampler's loop on a float64 copy of its
    policy), with the noise the global RNG gives at ``_seeded``'s seed, and the derived float32 bound
    around it (helpers.float32_loop_bound): both float32 implementations must land within it."""
    x64, bound = _loop_in_float64(sampler, cond)
    return x64[:, start:start + n], bound


def _loop_in_float64(sampler, cond, x_T=None, generator=None):
    """``conditional_sample(B, global_cond=cond, noise=x_T, generator=generator)`` in float64 (``sampler``'s loop
    on a float64 copy of its policy) and the derived float32 bound around it (helpers.float32_loop_bound).

    The noise is LeRobot's draws, reproduced in the same order (``Sampler.noise`` follows diffusers'): ``x_T``
    unless given, then each noisy step's, from ``generator`` or else the global RNG at ``_seeded``'s seed."""
    def draws():
        if x_T is None:
            return sampler.noise(cond.shape[0], generator)
        return x_T, sampler._drawn_step_noise(x_T.shape, generator, sampler.sample_dtype, per_step=False)

    x_T, step_noise = _seeded(draws)
    p64 = copy.deepcopy(sampler.policy).double()
    s64 = fdp.Sampler(p64, sampler.scheduler, num_inference_steps=sampler.num_steps, eta=sampler.eta,
                      backend="torch")
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return float32_loop_bound(lambda: s64(cond.double(), x_T=d(x_T), step_noise=d(step_noise)), [p64],
                              extent=p64.horizon)


def _assert_both_within(got, expected, x64, bound, what):
    """fdp's float32 actions and the stand-in loop's both within the derived float32 bound of the float64 loop
    (two float32 implementations differ by rounding, which depends on the CPU: never held to each other)."""
    assert_within_float32_bound(expected, x64, bound, f"{what}: stand-in loop")
    assert_within_float32_bound(got, x64, bound, f"{what}: accelerated")


@pytest.mark.lerobot
@pytest.mark.parametrize("name", ["ddpm_film_2stage", "ddim_film_3stage"])
def test_accelerate_real_lerobot(name):
    modeling = pytest.importorskip("lerobot.policies.diffusion.modeling_diffusion")
    policy = modeling.DiffusionPolicy.from_pretrained(str(DATA / name)).eval()
    model = policy.diffusion
    n_obs = policy.config.n_obs_steps
    window = (n_obs - 1, policy.config.n_action_steps)  # what generate_actions keeps of the chunk
    batch = {"observation.state": torch.randn(3, n_obs, 3), "observation.environment_state": torch.randn(3, n_obs, 2)}
    with torch.no_grad():
        cond = model._prepare_global_conditioning(batch)
        expected = _seeded(lambda: model.generate_actions(batch))
    with lerobot.accelerate(policy) as handle:
        with torch.no_grad():
            got = _seeded(lambda: model.generate_actions(batch))
        # Two float32 implementations (LeRobot's torch loop, and whatever `auto` picked: ONNX Runtime on a
        # CPU), each held to the float64 loop within the float32 bound of this computation.
        x64, bound = _lerobot_actions_in_float64(handle.sampler, cond, *window)
        assert_within_float32_bound(expected, x64, bound, f"{name}: LeRobot")
        assert_within_float32_bound(got, x64, bound, f"{name}: accelerated ({handle.sampler.backend})")
        assert handle.sampler.num_steps == model.num_inference_steps
        # training goes on: an optimizer step on LeRobot's U-Net
        opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-2)
        model.unet(torch.randn(3, policy.config.horizon, 2), torch.full((3,), 5), global_cond=cond).square().mean() \
            .backward()
        opt.step()
        with torch.no_grad():
            trained = _seeded(lambda: model.generate_actions(batch))
            x64, bound = _lerobot_actions_in_float64(handle.sampler, cond, *window)
    assert "conditional_sample" not in vars(model)
    with torch.no_grad():
        reference = _seeded(lambda: model.generate_actions(batch))
    assert not torch.allclose(reference, expected, atol=1e-3)
    assert_within_float32_bound(reference, x64, bound, f"{name}: LeRobot after a training step")
    assert_within_float32_bound(trained, x64, bound, f"{name}: accelerated after a training step")
