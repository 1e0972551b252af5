"""Bad input to the user-facing entry points: errors that name the argument and what was expected."""

import re
import warnings

import pytest
import torch

import fdp
from helpers import make_mlp_policy


def _unet_policy():
    torch.manual_seed(0)
    comps = [fdp.ConditionalUnet1D(3, global_cond_dim=5, down_dims=[8, 16], kernel_size=3, n_groups=4)
             for _ in range(2)]
    return fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 4, 3)


@pytest.mark.parametrize("make", [lambda: make_mlp_policy(dtype=torch.float32), _unet_policy], ids=["mlp", "unet"])
def test_loss_names_the_argument_with_the_wrong_dtype(make):
    policy = make()
    with pytest.raises(TypeError, match=r"^`actions` must have the policy's parameter dtype torch.float32, "
                                        r"got torch.float64"):
        policy.loss(torch.rand(2, 4, 3, dtype=torch.float64), torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"^`cond` must have the dtype of `actions` \(torch.float32\)"):
        policy.loss(torch.rand(2, 4, 3), torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^`cond` must have shape \[2, 5\]"):
        policy.loss(torch.rand(2, 4, 3), torch.randn(2, 6))


def test_loss_warns_once_about_actions_outside_the_clip_range():
    policy = make_mlp_policy(dtype=torch.float32)
    cond = torch.randn(2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(torch.rand(2, 4, 3) * 2 - 1, cond)  # inside [-1, 1]: silent
    actions = torch.rand(2, 4, 3)
    actions[1, 2, 0] = 3.5
    with pytest.warns(UserWarning, match=re.escape("`actions` reach 3.5, outside the scheduler's clip range "
                                                   "[-1, 1]")):
        policy.loss(actions, cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(actions, cond)  # once per policy


def test_no_clip_range_no_warning():
    policy = make_mlp_policy(dtype=torch.float32)
    policy.noise_scheduler = fdp.DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.loss(torch.full((2, 4, 3), 5.0), torch.randn(2, 5))


@pytest.mark.parametrize("device", ["banana", "cuda:x", 2.5])
def test_available_backends_names_a_bad_device(device):
    with pytest.raises(ValueError, match=r"^`device` must be a torch.device or a device string"):
        fdp.available_backends(device)


def test_router_help_teaches_every_strategy_and_argument():
    doc = fdp.Router.__doc__
    for strategy in fdp.router.STRATEGIES:
        assert f'``"{strategy}"``' in doc
    init = fdp.Router.__init__.__doc__
    for arg in ("cond_dim", "num_components", "hidden_dim", "strategy", "topk", "fixed_weights"):
        assert f"{arg}:" in init


# -- one rule for user errors: a UserError subclass of ValueError/TypeError/FileNotFoundError, named -----------

from fdp._validation import (InvalidArgument, InvalidArgumentType, InvalidFile, MissingFile, UserError,  # noqa: E402
                             check_number, check_output_path, read_json_object)


def test_user_errors_are_the_builtin_errors_callers_catch():
    for cls, builtin in ((InvalidArgument, ValueError), (InvalidArgumentType, TypeError), (InvalidFile, ValueError),
                         (MissingFile, FileNotFoundError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
    assert not issubclass(ValueError, UserError)  # a plain ValueError (a bug) is not mistaken for one


def _mlp(**kw):
    return fdp.MLPDenoiser(**{**dict(input_dim=3, horizon=4, global_cond_dim=5, hidden_dim=8), **kw})


CONSTRUCTOR_ERRORS = [
    (lambda: fdp.Router(True, 2), InvalidArgumentType, "`cond_dim` must be a positive int, got True"),
    (lambda: fdp.Router(5, 0), InvalidArgument, "`num_components` must be a positive int, got 0"),
    (lambda: fdp.Router(5, 2, hidden_dim=2.0), InvalidArgumentType, "`hidden_dim` must be None or a positive int"),
    (lambda: fdp.Router(5, 2, strategy="topk", topk="1"), InvalidArgumentType, "`topk` must be a positive int"),
    (lambda: fdp.Router(5, 2, strategy="best"), InvalidArgument, "`strategy` must be one of"),
    (lambda: _mlp(horizon=0), InvalidArgument, "`horizon` must be a positive int, got 0"),
    (lambda: _mlp(hidden_dim=True), InvalidArgumentType, "`hidden_dim` must be a positive int, got True"),
    (lambda: _mlp(global_cond_dim=-1), InvalidArgument, "`global_cond_dim` must be None or a non-negative int"),
    (lambda: fdp.FactorizedPolicy([_mlp()], fdp.Router(5, 1), True, 3), InvalidArgumentType, "`horizon`"),
    (lambda: fdp.FactorizedPolicy([_mlp()], fdp.Router(5, 1), 4, 0), InvalidArgument, "`action_dim`"),
    (lambda: fdp.FactorizedPolicy([], fdp.Router(5, 1), 4, 3), InvalidArgument, "`components`"),
    (lambda: fdp.FactorizedPolicy([fdp.ConditionalUnet1D(3, global_cond_dim=5, down_dims=[8, 16, 32], n_groups=4)],
                                  fdp.Router(5, 1), 6, 3), InvalidArgument,
     "`horizon` (6) must be divisible by 4 for component 0, whose U-Net halves it 2 time(s)"),
    (lambda: fdp.ConditionalUnet1D(3, down_dims=[8, 10], n_groups=4), InvalidArgument, "`down_dims`"),
    (lambda: fdp.ConditionalUnet1D(3, kernel_size=4), InvalidArgument, "`kernel_size` must be a positive odd int"),
    (lambda: fdp.DDPMScheduler(clip_sample="false"), InvalidArgumentType, "`clip_sample` must be a bool"),
    (lambda: fdp.DDPMScheduler(beta_end=2.0), InvalidArgument, r"`beta_end` must be a number in (0, 1), got 2.0"),
    (lambda: fdp.DDIMScheduler(beta_start=-1e-4), InvalidArgument, "`beta_start` must be a number in (0, 1)"),
]


@pytest.mark.parametrize("make,cls,message", CONSTRUCTOR_ERRORS, ids=[m for _, _, m in CONSTRUCTOR_ERRORS])
def test_constructors_raise_named_user_errors(make, cls, message):
    with pytest.raises(cls) as info:
        make()
    assert str(info.value).startswith(message), str(info.value)


def _sampler(**kw):
    return fdp.Sampler(make_mlp_policy(dtype=torch.float32), fdp.DDIMScheduler(num_train_timesteps=20), **kw)


@pytest.mark.parametrize("kw,cls,message", [
    (dict(backend="nonsense"), InvalidArgument, "`backend` must be 'auto' or one of"),
    (dict(backend=["torch"]), InvalidArgument, "`backend` must be 'auto' or one of"),
    (dict(num_inference_steps=0), InvalidArgument, "`num_inference_steps` must be a positive int"),
    (dict(num_inference_steps=30), InvalidArgument, "`num_inference_steps` (30) cannot be larger"),
    (dict(eta=2.0), InvalidArgument, "`eta` must be a number in [0, 1]"),
    (dict(dtype="int8"), InvalidArgument, "`dtype` must be a floating torch.dtype"),
    (dict(check_inputs="yes"), InvalidArgumentType, "`check_inputs` must be a bool"),
])
def test_sampler_arguments_are_user_errors(kw, cls, message):
    with pytest.raises(cls) as info:
        _sampler(**kw)
    assert str(info.value).startswith(message), str(info.value)


def test_number_check_names_the_interval():
    assert check_number("x", 0.5, low=0, high=1, low_open=True, high_open=True) == 0.5
    for bad, cls in ((0.0, InvalidArgument), (1.0, InvalidArgument), (float("nan"), InvalidArgument),
                     ("0.5", InvalidArgumentType), (True, InvalidArgumentType)):
        with pytest.raises(cls, match=r"^`x` must be a number in \(0, 1\), got "):
            check_number("x", bad, low=0, high=1, low_open=True, high_open=True)


def test_json_object_reader_names_the_file_and_the_problem(tmp_path):
    f = tmp_path / "config.json"
    with pytest.raises(MissingFile, match=f"^{re.escape(str(f))} does not exist"):
        read_json_object(f)
    f.write_text('{"a": 1, "b": "tru')
    with pytest.raises(InvalidFile, match=f"^{re.escape(str(f))} is not valid JSON \\(the file looks truncated\\)"):
        read_json_object(f)
    f.write_text("[1, 2]")
    with pytest.raises(InvalidFile, match=f"^{re.escape(str(f))} holds a JSON array, expected a JSON object"):
        read_json_object(f)
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidFile, match=f"^{re.escape(str(f))} cannot be read"):
        read_json_object(f)
    f.write_text('{"a": 1}')
    assert read_json_object(f) == {"a": 1}


def test_output_path_check_runs_before_any_work(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(InvalidArgument, match=r"^`--out` is .*file, not a folder: no file can be written under it"):
        check_output_path("--out", regular / "sub" / "r.json")
    with pytest.raises(InvalidArgument, match=r"^`--out` must be a file to write, but .* is a folder"):
        check_output_path("--out", tmp_path)
    with pytest.raises(InvalidArgument, match=r"^`out_dir` must be a folder to write, but .* is a file"):
        check_output_path("out_dir", regular, folder=True)
    assert check_output_path("--out", tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checked, nothing created


def test_triton_backends_on_a_torch_without_triton_op_say_which_torch_they_need(monkeypatch):
    """fdp asks for torch >= 2.4; its Triton kernels are torch.library.triton_op's (torch 2.6). On an older torch
    the Triton backends are unavailable with that reason (never an ImportError from inside fdp_kernels), `auto`
    passes them by, and the graph backend composes with torch (its compose kernel is a Triton op too)."""
    from fdp.backends.graph_backend import _compose_kernel

    monkeypatch.delattr(torch.library, "triton_op")
    monkeypatch.delattr(torch.library, "wrap_triton")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    want = r"fdp's Triton kernels need torch >= 2\.6 \(torch\.library\.triton_op\), this is torch 2\.5\.1"
    reasons = {name: info.reason for name, info in fdp.available_backends("cpu").items()}
    for name in ("triton", "triton-persistent"):
        assert re.match(want, reasons[name]), (name, reasons[name])
    policy = make_mlp_policy(dtype=torch.float32)
    with pytest.raises(InvalidArgument, match=want):
        fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), 4, backend="triton")
    assert _compose_kernel(torch.device("cpu")) == (None, reasons["triton"])
    s = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=100), 4, backend="auto")
    assert not s.backend.startswith("triton")
    assert s(torch.randn(2, policy.cond_dim)).shape == (2, 4, 3)
