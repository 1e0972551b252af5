"""Fuzzing the entry points a user feeds: scheduler configs, LeRobot policy folders, command lines.

Every outcome must be a correct result or a named user error (:class:`fdp._validation.UserError`, whose
message names the argument, the field or the file), never another exception and never a silently wrong
result (NaN in a step table, a CLI traceback). Bounded for CI (a few seconds each), derandomized so that a
failure reproduces, no example database written.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import fdp
from fdp import cli
from fdp._validation import UserError
from fdp.integrations import lerobot

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).parent / "data" / "lerobot"


def bounded(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


#: Values of every kind a config file or a careless call can hold.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(10 ** 6), 10 ** 6),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2), st.floats(0, 0.05),
    st.text(max_size=8), st.sampled_from(["false", "true", "1", "linear", "epsilon", "DDPM"]),
    st.lists(st.floats(0, 1), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

# -- scheduler configs ---------------------------------------------------------------------------------------------

#: Each field: (legal values, anything).
FIELDS = {
    "num_train_timesteps": (st.integers(1, 200), ANY_VALUE),
    "beta_start": (st.floats(1e-5, 0.05), ANY_VALUE),
    "beta_end": (st.floats(1e-3, 0.999), ANY_VALUE),
    "beta_schedule": (st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]),
                      ANY_VALUE),
    "clip_sample": (st.booleans(), ANY_VALUE),
    "clip_sample_range": (st.floats(0, 5), ANY_VALUE),
    "prediction_type": (st.sampled_from(["epsilon", "sample", "v_prediction"]), ANY_VALUE),
    "timestep_spacing": (st.sampled_from(["leading", "trailing", "linspace"]), ANY_VALUE),
    "steps_offset": (st.integers(0, 2), ANY_VALUE),
    "rescale_betas_zero_snr": (st.booleans(), ANY_VALUE),
    "thresholding": (st.just(False), ANY_VALUE),
}


@st.composite
def scheduler_configs(draw):
    cls = draw(st.sampled_from([fdp.DDPMScheduler, fdp.DDIMScheduler]))
    fields = dict(FIELDS)
    if cls is fdp.DDIMScheduler:
        fields["set_alpha_to_one"] = (st.booleans(), ANY_VALUE)
    else:
        fields["variance_type"] = (st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large"]), ANY_VALUE)

    def value(valid, anything):
        # Mostly a legal value (so that many configs get as far as a table), sometimes anything at all.
        return draw(anything if draw(st.integers(0, 5)) == 0 else valid)

    keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=5))
    cfg = {k: value(*fields[k]) for k in keys}
    steps = value(st.one_of(st.integers(1, 30), st.none()), ANY_VALUE)
    eta = value(st.floats(0, 1), ANY_VALUE) if cls is fdp.DDIMScheduler else 0.0
    return cls, cfg, steps, eta


def _names_one_of(exc: BaseException, names) -> bool:
    text = str(exc)
    return any(n in text for n in names)


@bounded(250)
@given(scheduler_configs())
def test_scheduler_config_gives_a_finite_table_or_a_named_error(case):
    cls, cfg, steps, eta = case
    try:
        sched = cls(**cfg)
    except UserError as exc:
        event("refused by the constructor")
        assert _names_one_of(exc, cfg), (cfg, exc)
        return
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > len(sched):
        steps = len(sched)
    try:
        table = sched.step_table(steps, eta=eta)
    except UserError as exc:
        event("refused by step_table")
        assert _names_one_of(exc, [*cfg, "num_inference_steps", "eta", "steps_offset", "prediction_type"]), exc
        return
    event("a table")
    # A correct result: finite coefficients, timesteps of the training range, largest first.
    assert bool(torch.isfinite(table.coef).all()), (cfg, steps, eta, table.coef)
    ts = table.timesteps.tolist()
    assert len(ts) == (len(sched) if steps is None else steps)
    assert all(0 <= t < len(sched) for t in ts) and ts == sorted(ts, reverse=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    for i in range(len(table)):
        x = fdp.apply_step(table, i, x, torch.randn_like(x), torch.randn_like(x))
    assert bool(torch.isfinite(x).all()), (cfg, steps, eta)


# -- LeRobot policy folders: mutated copies of the fixtures ----------------------------------------------------------

CONFIG_FIELDS = ["type", "horizon", "n_groups", "noise_scheduler_type", "num_inference_steps",
                 *lerobot._SCHEDULER_FIELDS]
JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-2, 2),
                                    st.text(max_size=6), st.sampled_from(["false", "DDIM", "diffusion", "linear"])),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=5)


#: Legal values of the config fields fdp reads (a mutation sets one of these half the time).
LEGAL = {
    "type": st.just("diffusion"), "horizon": st.integers(1, 24), "n_groups": st.sampled_from([1, 2, 4, 8, 3]),
    "noise_scheduler_type": st.sampled_from(["DDPM", "DDIM"]),
    "num_inference_steps": st.one_of(st.none(), st.integers(1, 20)),
    "num_train_timesteps": st.integers(20, 120), "beta_start": st.floats(1e-5, 1e-3), "beta_end": st.floats(0.01, 0.05),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]),
    "clip_sample": st.booleans(), "clip_sample_range": st.floats(0.1, 3),
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
}


@st.composite
def folder_mutations(draw):
    kind = draw(st.sampled_from(["field", "field", "field", "drop_field", "config_json", "truncate_config",
                                 "truncate_weights", "header_bytes", "tensor_dtype", "tensor_shape", "drop_tensor"]))
    if kind == "field":
        field = draw(st.sampled_from(CONFIG_FIELDS))
        anything = st.one_of(JSON_VALUE, ANY_VALUE.filter(lambda v: not isinstance(v, float) or math.isfinite(v)))
        return kind, (field, draw(st.one_of(LEGAL[field], anything)))
    if kind == "drop_field":
        return kind, draw(st.sampled_from(CONFIG_FIELDS))
    if kind == "config_json":
        return kind, draw(JSON_VALUE)
    if kind in ("truncate_config", "truncate_weights"):
        return kind, draw(st.floats(0, 0.999))
    if kind == "header_bytes":
        return kind, draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4))
    if kind == "tensor_dtype":
        return kind, (draw(st.integers(0, 10 ** 6)), draw(st.sampled_from(
            [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16, torch.float64, torch.bfloat16])))
    if kind == "tensor_shape":
        return kind, (draw(st.integers(0, 10 ** 6)), draw(st.sampled_from(["flatten", "unsqueeze", "narrow",
                                                                           "scalar"])))
    return kind, draw(st.integers(0, 10 ** 6))


def _mutate(folder: Path, kind, arg):
    config, weights = folder / "config.json", folder / "model.safetensors"
    cfg = json.loads(config.read_text())
    if kind == "field":
        cfg[arg[0]] = arg[1]
        config.write_text(json.dumps(cfg))
    elif kind == "drop_field":
        cfg.pop(arg, None)
        config.write_text(json.dumps(cfg))
    elif kind == "config_json":
        config.write_text(json.dumps(arg))
    elif kind == "truncate_config":
        text = config.read_text()
        config.write_text(text[: int(len(text) * arg)])
    elif kind == "truncate_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * arg)])
    elif kind == "header_bytes":
        data = bytearray(weights.read_bytes())
        for pos, byte in arg:
            data[pos] = byte
        weights.write_bytes(bytes(data))
    else:
        tensors = safetensors_torch.load_file(str(weights))
        keys = sorted(tensors)
        key = keys[arg[0] % len(keys)] if isinstance(arg, tuple) else keys[arg % len(keys)]
        t = tensors[key]
        if kind == "drop_tensor":
            del tensors[key]
        elif kind == "tensor_dtype":
            tensors[key] = t.to(arg[1])
        else:
            op = arg[1]
            tensors[key] = {"flatten": lambda: t.flatten(), "unsqueeze": lambda: t.unsqueeze(0),
                            "narrow": lambda: t.narrow(0, 0, max(1, t.shape[0] - 1)).contiguous(),
                            "scalar": lambda: t.flatten()[:1].reshape(())}[op]()
        safetensors_torch.save_file(tensors, str(weights))


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory(prefix="fdp-fuzz-") as d:
        yield Path(d)


@bounded(60)
@given(name=st.sampled_from(["ddpm_film_2stage", "ddim_nofilm_2stage"]), mutation=folder_mutations())
def test_load_pretrained_on_a_mutated_folder_gives_a_sampler_or_a_named_error(fuzz_dir, name, mutation):
    folder = fuzz_dir / "policy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(DATA / name, folder, ignore=shutil.ignore_patterns("io.safetensors"))
    _mutate(folder, *mutation)
    try:
        sampler = lerobot.load_pretrained(folder, device="cpu", backend="torch")
    except UserError as exc:
        event(f"{mutation[0]}: {type(exc).__name__}")
        text = str(exc)
        assert str(folder) in text, text  # names the folder or one of its files
        return
    event(f"{mutation[0]}: a sampler")
    # A correct result: the sampler runs and gives finite actions of the policy's shape.
    if sampler.num_steps > 50:
        return  # a valid config with many steps: correct, but slow to run here
    cond = torch.randn(2, sampler.policy.cond_dim, generator=torch.Generator().manual_seed(0),
                       dtype=sampler.sample_dtype)
    actions = sampler(cond, generator=torch.Generator().manual_seed(1))
    assert actions.shape == (2, sampler.policy.horizon, sampler.policy.action_dim)
    assert bool(torch.isfinite(actions).all()), mutation


# -- command lines, run in-process with the long work stubbed --------------------------------------------------------


class _Reached(BaseException):
    """The command got past its checks to the work (stubbed out here); a BaseException, so that the CLI's
    report of bugs lets it through."""


@pytest.fixture
def stubbed_work(monkeypatch):
    import fdp.bench.paths
    import fdp.bench.runner
    import fdp.demo
    import fdp.export
    from helpers import make_mlp_policy

    reached = []

    def stop(what):
        def stub(*args, **kwargs):
            reached.append(what)
            raise _Reached(what)
        return stub

    monkeypatch.setattr(fdp.demo, "_run", stop("demo"))
    monkeypatch.setattr(fdp.bench.runner, "_run", stop("bench"))
    monkeypatch.setattr(fdp.backends, "select", stop("tune"))
    monkeypatch.setattr(fdp.bench.paths, "make_policy", lambda *a: make_mlp_policy(dtype=torch.float32))
    monkeypatch.setattr(fdp.export, "onnx", stop("export"))
    import fdp.selftest

    monkeypatch.setattr(fdp.selftest, "run", stop("selftest"))
    return reached


def _paths(root: Path):
    regular = root / "regular.txt"
    regular.write_text("not a folder")
    saved = root / "policy.pt"
    if not saved.exists():
        from helpers import make_mlp_policy

        torch.save(make_mlp_policy(dtype=torch.float32), saved)
    return [str(p) for p in (root / "absent", regular, regular / "under", root, saved, DATA / "ddpm_film_2stage",
                             root / "new" / "out.json")]


NUMBERS = st.sampled_from(["0", "1", "3", "-3", "2.5", "nan", "inf", "x", "", "1e3", "007"])
WORDS = st.sampled_from(["auto", "torch", "nonsense", "cpu", "cuda", "cuda:3", "meta", "banana", "mlp", "fp32",
                         "bf16", "ddim", "ddpm", "10", "fused", "eager,batched", "unet", ",", "K"])


@st.composite
def command_lines(draw, paths):
    value = st.one_of(NUMBERS, WORDS, st.sampled_from(paths))
    command = draw(st.sampled_from(["demo", "info", "bench", "tune", "export", "selftest"]))
    options = {
        "demo": ["--out", "--train-steps", "--seed", "--backend", "--quick", "--no-progress"],
        "info": ["--device"],
        "bench": ["--quick", "--backends", "--batch", "--K", "--component", "--steps", "--dtype", "--repeats",
                  "--warmup", "--budget", "--input-sets", "--device", "--out", "--no-plots", "--no-progress",
                  "--threads", "--seed"],
        "tune": ["--policy", "--component", "--K", "--steps", "--dtype", "--batch", "--backend", "--device",
                 "--refresh", "--json", "--trust-pickle"],
        "export": ["--batch-size", "--num-inference-steps"],
        "selftest": ["--device", "--quick", "--backends", "--no-timing", "--timeout", "--out"],
    }[command]
    flags = {"--quick", "--no-progress", "--no-plots", "--nvtx", "--refresh", "--json", "--trust-pickle",
             "--no-timing"}
    argv = [command]
    if command == "export":
        argv += ["onnx", draw(st.sampled_from(paths)), draw(st.sampled_from(paths))]
    for opt in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv += [opt] if opt in flags else [opt, draw(value)]
    if draw(st.booleans()) and command in ("bench", "tune", "info", "selftest"):
        argv += ["--device", draw(st.sampled_from(["cpu", "cuda", "cuda:1", "banana"]))]
    return argv


@pytest.fixture(scope="module")
def cli_paths(fuzz_dir):
    return _paths(fuzz_dir)


@bounded(150)
@given(data=st.data())
def test_command_lines_give_the_work_or_a_one_line_error(cli_paths, stubbed_work, capsys, monkeypatch, data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same outcomes on a GPU machine
    argv = data.draw(command_lines(cli_paths), label="argv")
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse: a usage error, or --help
        rc = exc.code
    except _Reached:
        event(f"{argv[0]}: reached the work")
        return  # past every check, to the work
    event(f"{argv[0]}: exit {rc}")
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, (argv, err)
    if rc == 0:
        assert argv[0] == "info", argv  # the one command not stubbed
        return
    assert rc == 2, (argv, rc, err)
    assert len(err.splitlines()) == 1 and err.startswith("fdp") and ": error: " in err, (argv, err)
