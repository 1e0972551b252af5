"""The LeRobot policy type ``fdp`` (integrations/lerobot_policy_fdp) under LeRobot's own trainer.

Every run is LeRobot's ``lerobot-train`` (its ``main``, through
tests/lerobot_plugin/run_lerobot.py, which records each process's losses and
weights) on a tiny image + state dataset built here, on the CPU, offline:

* one process, 40 steps: the loss falls; the checkpoint reloads and
  ``select_action`` returns what ``fdp.Sampler`` gives on the same weights
  and noise; the run resumes from it; a new policy adapts from it;
* two processes (``torchrun``, DDP over gloo), 40 steps at half the batch
  per process: both hold the same weights after every step's all-reduce, and
  the loss curve is the one-process curve within its sampling noise.

These tests need LeRobot (``bash scripts/test.sh`` installs it, see
scripts/setup.sh); they skip without it, except where FDP_REQUIRE_LEROBOT=1
(CI) makes a missing LeRobot an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

import fdp
from fdp.tolerances import REL_TOL, rel_error

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "lerobot_plugin"))

import torchvision_cpu  # noqa: E402

torchvision_cpu.install()

if os.environ.get("FDP_REQUIRE_LEROBOT") == "1":
    import lerobot  # noqa: F401
    import lerobot_policy_fdp  # noqa: F401
else:
    pytest.importorskip("lerobot")
    pytest.importorskip("lerobot_policy_fdp")

import tiny_dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.lerobot

RUNNER = HERE / "lerobot_plugin" / "run_lerobot.py"
STEPS, BATCH, WINDOW = 40, 16, 10
SEED = 1000
# Small enough for 2 CPU cores: K = 2 tiny U-Nets, SqueezeNet 1.1 as LeRobot's image backbone (ResNet-18,
# the default, works the same and costs 4x the step time), 10 sampling steps.
POLICY_ARGS = [
    "--policy.type=fdp", "--policy.device=cpu", "--policy.push_to_hub=false",
    "--policy.num_components=2", "--policy.down_dims=[16,32]", "--policy.kernel_size=3", "--policy.n_groups=4",
    "--policy.diffusion_step_embed_dim=16", "--policy.horizon=8", "--policy.n_obs_steps=2",
    "--policy.n_action_steps=4", "--policy.drop_n_last_frames=3", "--policy.num_inference_steps=10",
    "--policy.vision_backbone=squeezenet1_1", "--policy.pretrained_backbone_weights=null",
    "--policy.spatial_softmax_num_keypoints=8", "--policy.optimizer_lr=3e-3", "--policy.scheduler_name=constant",
    "--policy.scheduler_warmup_steps=0",
]


def _env(tmp: Path, record: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FDP_TEST_RECORD", None)
    if record is not None:
        env["FDP_TEST_RECORD"] = str(record)
    return env


def _train(tmp: Path, args: list[str], record: Path | None = None, nproc: int = 1) -> str:
    """Run lerobot-train (``nproc`` processes under torchrun); returns its output, fails with its tail."""
    if nproc == 1:
        cmd = [sys.executable, str(RUNNER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(RUNNER)]
    proc = subprocess.run(cmd + args, env=_env(tmp, record), cwd=tmp, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lerobot-train failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _common(data: Path, out: Path, steps: int, batch: int) -> list[str]:
    return [f"--dataset.repo_id={tiny_dataset.REPO_ID}", f"--dataset.root={data}", "--wandb.enable=false",
            "--num_workers=0", f"--batch_size={batch}", f"--steps={steps}", f"--save_freq={steps}", "--log_freq=10",
            f"--seed={SEED}", f"--output_dir={out}"]


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"{step:06d}" / "pretrained_model"


# -- noise of a loss curve ------------------------------------------------------------------------
# A logged loss is a mean over one batch of squared errors at random timesteps and noises: each step's
# value scatters around the curve's slowly moving mean, independently from step to step. Over a window
# of w steps, half the mean squared step-to-step difference estimates that scatter's variance (a slow
# drift of the mean adds only its squared per-step change), and the window mean's standard error is
# sigma / sqrt(w).

def _window_stats(losses: list[float]) -> tuple[float, float]:
    w = len(losses)
    var = sum((b - a) ** 2 for a, b in zip(losses, losses[1:])) / (2 * (w - 1))
    return sum(losses) / w, (var / w) ** 0.5


def _windows(losses: list[float]) -> list[tuple[float, float]]:
    return [_window_stats(losses[i:i + WINDOW]) for i in range(0, len(losses), WINDOW)]


def _z(p: float) -> float:
    """The standard normal quantile exceeded with probability ``p`` (one-sided)."""
    return NormalDist().inv_cdf(1 - p)


# -- the runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("lerobot_fdp")


@pytest.fixture(scope="module")
def data(tmp):
    root = tmp / "data"
    tiny_dataset.build(root)
    return root


@pytest.fixture(scope="module")
def single(tmp, data):
    out, rec = tmp / "single", tmp / "rec_single"
    _train(tmp, _common(data, out, STEPS, BATCH) + POLICY_ARGS, record=rec)
    return out, torch.load(rec / "rank0.pt")


def test_lerobot_discovers_the_plugin():
    from importlib.metadata import entry_points

    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.utils.import_utils import register_third_party_plugins
    from lerobot_policy_fdp.configuration_fdp import FdpConfig

    # The tests run lerobot-train's target itself (run_lerobot.py): the console script is that function.
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lerobot-train"]
    assert script.value == "lerobot.scripts.lerobot_train:main"
    register_third_party_plugins()
    assert PreTrainedConfig.get_choice_class("fdp") is FdpConfig


def test_training_lowers_the_loss(single):
    _, rec = single
    losses = rec["losses"]
    assert len(losses) == STEPS and rec["world_size"] == 1
    (first, se_first), (last, se_last) = _window_stats(losses[:WINDOW]), _window_stats(losses[-WINDOW:])
    # Falls by more than the two windows' noise could make it appear to (one-sided, p = 1e-3).
    assert first - last > _z(1e-3) * (se_first ** 2 + se_last ** 2) ** 0.5, (first, last, se_first, se_last)


def test_checkpoint_select_action_is_fdp_sampler(single):
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot_policy_fdp.modeling_fdp import FdpPolicy

    out, rec = single
    folder = _checkpoint(out, STEPS)
    policy = FdpPolicy.from_pretrained(folder)
    assert isinstance(policy.sampler, fdp.Sampler)  # built here, before the noise is seeded below
    saved = load_file(str(folder / "model.safetensors"))
    for name, value in policy.state_dict().items():  # the checkpoint holds the weights training ended with
        assert torch.equal(value, saved[name]) and torch.equal(value, rec["last"][name]), name
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(folder))

    p = tiny_dataset.point(1, 5)
    obs = {"observation.state": torch.from_numpy(p),
           "observation.image": torch.from_numpy(tiny_dataset.image_of(p)).permute(2, 0, 1).float() / 255}
    batch = pre(obs)
    x_T = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # DDPM adds noise at every step but the last: drawn from the global RNG
    actions = torch.stack([policy.select_action(dict(batch), noise=x_T) for _ in range(4)], dim=1)
    assert len(policy._queues["action"]) == 0  # n_action_steps = 4 actions per chunk, all used

    # The reference: fdp alone on the checkpoint's tensors, the features laid out as the policy documents
    # (per observation step: state, then the camera's features; both steps the same first observation).
    cfg = json.loads((folder / "config.json").read_text())
    with torch.no_grad():
        step = torch.cat([batch["observation.state"], policy.encoder.rgb_encoder(batch["observation.image"])], -1)
        cond = torch.cat([step, step], -1)
    K, H = cfg["num_components"], cfg["horizon"]
    components = [fdp.ConditionalUnet1D(2, global_cond_dim=cond.shape[1], down_dims=cfg["down_dims"],
                                        diffusion_step_embed_dim=cfg["diffusion_step_embed_dim"],
                                        kernel_size=cfg["kernel_size"], n_groups=cfg["n_groups"],
                                        cond_predict_scale=cfg["use_film_scale_modulation"]) for _ in range(K)]
    router = fdp.Router(cond.shape[1], K, hidden_dim=cfg["router_hidden_dim"], strategy=cfg["router_strategy"])
    reference = fdp.FactorizedPolicy(components, router, H, 2)
    reference.load_state_dict({k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")})
    scheduler = fdp.DDPMScheduler(**{k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                          "beta_schedule", "clip_sample", "clip_sample_range",
                                                          "prediction_type")})
    sampler = fdp.Sampler(reference, scheduler, num_inference_steps=cfg["num_inference_steps"],
                          backend=policy.sampler.backend)
    torch.manual_seed(11)
    expected = sampler(cond, x_T=x_T)[:, cfg["n_obs_steps"] - 1:cfg["n_obs_steps"] - 1 + 4]
    assert rel_error(actions, expected) <= REL_TOL[torch.float32]
    unnormalized = post(actions[:, 0])  # LeRobot's postprocessor, as saved with the checkpoint
    assert unnormalized.shape == (1, 2) and bool(torch.isfinite(unnormalized).all())


def test_resume(tmp, single):
    out, rec = single
    folder = _checkpoint(out, STEPS)
    before = load_file(str(folder / "model.safetensors"))
    resumed = tmp / "rec_resume"
    _train(tmp, [f"--config_path={folder / 'train_config.json'}", "--resume=true", f"--steps={STEPS + 10}"],
           record=resumed)
    got = torch.load(resumed / "rank0.pt")
    assert len(got["losses"]) == 10  # steps STEPS+1 .. STEPS+10, not a restart
    assert got["first"]["optimizer_steps"] == [STEPS]  # Adam's moments came back with the weights
    for name, value in got["first"]["weights"].items():
        assert torch.equal(value, before[name]), name
    state = json.loads((out / "checkpoints" / f"{STEPS + 10:06d}" / "training_state" / "training_step.json")
                       .read_text())
    assert state["step"] == STEPS + 10


def test_adaptation_from_a_checkpoint(tmp, single, data):
    from lerobot_policy_fdp.modeling_fdp import FdpPolicy

    out, _ = single
    source = tmp / "source"  # a copy: the adapted checkpoint must not need it afterwards
    shutil.copytree(_checkpoint(out, STEPS), source)
    adapted_out, rec = tmp / "adapted", tmp / "rec_adapted"
    _train(tmp, _common(data, adapted_out, 10, BATCH) + POLICY_ARGS +
           [f"--policy.adapt_from={source}", "--policy.adapt_add_components=1", "--policy.train_mode=router+new"],
           record=rec)
    got = torch.load(rec / "rank0.pt")
    old = load_file(str(source / "model.safetensors"))
    first, last = got["first"]["weights"], got["last"]

    def frozen(name):
        return name.startswith(("encoder.", "model.components.0.", "model.components.1."))

    grown = {"model.router.net.2.weight", "model.router.net.2.bias", "model.router.fixed_weights", "model.is_new",
             "model.awaits_start"}  # one more entry for the new component
    assert set(old) == set(first) - {n for n in first if n.startswith("model.components.2.")}
    for name, value in old.items():
        start = first[name][:2] if name in grown else first[name]
        assert torch.equal(start, value), name  # training starts from the source
        if frozen(name):
            assert torch.equal(last[name], value), name  # the source's components and encoder stay as they were
    new = [n for n in last if n.startswith("model.components.2.")]
    assert new and any(not torch.equal(first[n], last[n]) for n in new)  # the new component trains
    assert not torch.equal(first["model.router.net.0.weight"], last["model.router.net.0.weight"])  # the router too

    folder = _checkpoint(adapted_out, 10)
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_components"], cfg["adapt_from"], cfg["adapted_from"]) == (3, None, str(source))
    shutil.rmtree(source)
    policy = FdpPolicy.from_pretrained(folder)  # strict: every tensor of K = 3 components, no source needed
    assert policy.model.num_components == 3 and policy.model.is_new.tolist() == [False, False, True]


def test_two_processes_match_one(tmp, single, data):
    _, one = single
    rec = tmp / "rec_ddp"
    _train(tmp, _common(data, tmp / "ddp", STEPS, BATCH // 2) + POLICY_ARGS, record=rec, nproc=2)
    ranks = [torch.load(rec / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for name, value in ranks[0]["last"].items():
        assert torch.equal(value, ranks[1]["last"][name]), name  # DDP: one all-reduced gradient, one update
    assert any(not torch.equal(ranks[0]["first"]["weights"][n], v) for n, v in ranks[0]["last"].items())

    # Each process's loss is the mean over its half of the global batch: their mean is the loss over
    # BATCH samples, as in the one-process run, whose expected curve it shares (same start, same gradient
    # in expectation, same optimiser). Window by window the two means may differ by their noise only:
    # two-sided, p = 1e-3 over all windows (Bonferroni).
    two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(two) == STEPS
    windows = list(zip(_windows(one["losses"]), _windows(two)))
    z = _z(1e-3 / (2 * len(windows)))
    for i, ((m1, s1), (m2, s2)) in enumerate(windows):
        assert abs(m1 - m2) <= z * (s1 ** 2 + s2 ** 2) ** 0.5, (i, m1, m2, s1, s2, z)


# -- in-process checks of the config and the policy (no trainer) -----------------------------------

def _state_config(**fields):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot_policy_fdp.configuration_fdp import FdpConfig

    fields = {"device": "cpu", "horizon": 8, "n_obs_steps": 2, "n_action_steps": 3, "num_components": 2,
              "component": "mlp", "mlp_hidden_dim": 16, "mlp_num_blocks": 1, "mlp_time_embed_dim": 8,
              "num_train_timesteps": 20, "num_inference_steps": 4, **fields}
    return FdpConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(3,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(2,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))}, **fields)


@pytest.mark.parametrize("fields, names", [
    ({"router_strategy": "no-such-strategy"}, "`strategy`"),
    ({"component": "transformer"}, "`component`"),
    ({"component": "unet", "down_dims": [8, 16, 32], "horizon": 6, "n_action_steps": 2}, "`horizon`"),
    ({"n_action_steps": 8}, "`n_action_steps`"),
    ({"train_mode": "new-only"}, "`train_mode`"),
    ({"noise_scheduler_type": "DDPM", "eta": 0.5}, "eta"),
])
def test_config_names_a_bad_setting(fields, names):
    with pytest.raises(ValueError, match=names):
        _state_config(**fields)


def test_every_router_strategy_passes_through():
    from lerobot_policy_fdp.modeling_fdp import FdpPolicy

    from fdp.router import STRATEGIES

    for strategy in STRATEGIES:  # whatever the installed fdp.Router accepts, none listed here
        extra = {"router_fixed_weights": [0.25, 0.75]} if strategy == "fixed" else {}
        policy = FdpPolicy(_state_config(router_strategy=strategy, router_topk=1, **extra))
        assert policy.model.router.strategy == strategy


def test_policy_trains_and_keeps_lerobots_action_queue():
    from lerobot_policy_fdp.modeling_fdp import FdpPolicy

    torch.manual_seed(0)
    policy = FdpPolicy(_state_config())
    B = 3
    batch = {"observation.state": torch.randn(B, 2, 3), "observation.environment_state": torch.randn(B, 2, 2),
             "action": torch.rand(B, 8, 2) * 2 - 1}
    loss, info = policy.forward(batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and sorted(info) == ["router_weight_0", "router_weight_1"]
    assert abs(sum(info.values()) - 1) < 1e-5  # mean soft-router weights
    assert all(p.grad is not None for p in policy.get_optim_params())
    with pytest.raises(ValueError, match="reduction"):
        policy.forward(batch, reduction="none")

    policy.eval()
    obs = {"observation.state": torch.randn(B, 3), "observation.environment_state": torch.randn(B, 2)}
    first = policy.select_action(obs)
    assert first.shape == (B, 2) and len(policy._queues["action"]) == 2  # n_action_steps = 3: two left
    policy.select_action(obs), policy.select_action(obs)
    sampler = policy.sampler
    policy.select_action(obs)  # the queue ran out: a new chunk, from the same Sampler
    assert policy.sampler is sampler and len(policy._queues["action"]) == 2
    policy.reset()
    assert all(len(q) == 0 for q in policy._queues.values())


# -- real-time control: continuation and sampling ahead in select_action ----------------------------------------

def _rt_policy(**fields):
    from lerobot_policy_fdp.modeling_fdp import FdpPolicy

    torch.manual_seed(0)
    policy = FdpPolicy(_state_config(noise_scheduler_type="DDIM", sampling_backend="torch", **fields))
    return policy.eval()


def _rt_inputs(B: int, steps: int):
    g = torch.Generator().manual_seed(1)
    obs = [{"observation.state": torch.randn(B, 3, generator=g),
            "observation.environment_state": torch.randn(B, 2, generator=g)} for _ in range(steps)]
    noises = [torch.randn(B, 8, 2, generator=g) for _ in range(steps)]
    return obs, noises


def _cond(policy, obs, k: int):
    """The conditioning select_action builds at step k (the queue holds steps k-1 and k; step 0 twice)."""
    prev = obs[max(k - 1, 0)]
    return policy.encoder({key: torch.stack([prev[key], obs[k][key]], dim=1) for key in obs[k]})


def test_continuation_makes_each_chunk_continue_the_previous_one():
    from fdp.inpainting import continuation

    B, n, overlap = 2, 3, 3
    policy = _rt_policy(continuation_overlap=overlap)
    obs, noises = _rt_inputs(B, 2 * n)
    actions = [policy.select_action(obs[k], noise=noises[k]) for k in range(2 * n)]
    first = policy.sampler(_cond(policy, obs, 0), x_T=noises[0])
    known, mask = continuation(first, n, overlap)
    second = policy.sampler(_cond(policy, obs, n), x_T=noises[n], known=known, known_mask=mask)
    assert torch.equal(torch.stack(actions[:n], 1), first[:, 1:1 + n])
    assert torch.equal(torch.stack(actions[n:], 1), second[:, 1:1 + n])
    # The inpainted positions are the previous chunk's actions, exactly; without continuation they are not.
    assert torch.equal(second[:, :overlap], first[:, n:n + overlap])
    free = policy.sampler(_cond(policy, obs, n), x_T=noises[n])
    assert not torch.allclose(free[:, :overlap], first[:, n:n + overlap])

    policy.reset()  # a new episode continues nothing
    assert torch.equal(policy.select_action(obs[0], noise=noises[0]), first[:, 1])


class _SlowSampler:
    """Wraps a Sampler: records every call's conditioning and sleeps on the AsyncSampler's worker thread."""

    def __init__(self, sampler, delay: float):
        self.sampler, self.delay, self.calls = sampler, delay, []
        self.device = sampler.device

    def __call__(self, cond, **kwargs):
        import threading
        import time

        self.calls.append((threading.current_thread().name, cond.clone()))
        if threading.current_thread().name == "fdp-async-sampler":
            time.sleep(self.delay)
        return self.sampler(cond, **kwargs)


def test_sample_ahead_never_waits_and_takes_the_right_actions():
    import time

    from fdp.inpainting import continuation

    B, n, ahead, overlap, delay = 2, 3, 2, 3, 1.0
    policy = _rt_policy(sample_ahead=ahead, continuation_overlap=overlap)
    real = policy.sampler
    policy._sampler = slow = _SlowSampler(real, delay)
    obs, noises = _rt_inputs(B, 2 * n + 1)
    actions, seconds = [], []
    for k in range(2 * n + 1):
        t0 = time.monotonic()
        actions.append(policy.select_action(obs[k], noise=noises[k]))
        seconds.append(time.monotonic() - t0)
    # Chunk A: sampled at step 0 on the caller's thread. B: submitted at step 1 (one action queued after
    # that step's), taken at step 3; C: submitted at step 4, taken at step 6.
    assert [name for name, _ in slow.calls] == ["MainThread"] + ["fdp-async-sampler"] * 2
    for (_, cond), step in zip(slow.calls, (0, 1, 4)):
        assert torch.equal(cond, _cond(policy, obs, step))
    a = real(_cond(policy, obs, 0), x_T=noises[0])
    b = real(_cond(policy, obs, 1), x_T=noises[1], **dict(zip(("known", "known_mask"), continuation(a, 1, overlap))))
    c = real(_cond(policy, obs, 4), x_T=noises[4], **dict(zip(("known", "known_mask"), continuation(b, 3, overlap))))
    # Each chunk's position n_obs_steps - 1 is its observation's step; the queue picks up `ahead` steps later.
    assert torch.equal(torch.stack(actions[:3], 1), a[:, 1:4])
    assert torch.equal(torch.stack(actions[3:6], 1), b[:, 3:6])
    assert torch.equal(actions[6], c[:, 3])
    # The steps between a submission and its take never wait for the (1 s) call; the takes do.
    assert max(seconds[1], seconds[2], seconds[4], seconds[5]) < delay / 2, seconds
    assert min(seconds[3], seconds[6]) > delay / 2, seconds
    policy.reset()
    policy.ahead.close()


@pytest.mark.parametrize("fields, names", [
    ({"sample_ahead": 4}, "`sample_ahead`"),   # > n_action_steps (3)
    ({"sample_ahead": -1}, "`sample_ahead`"),
    ({"continuation_overlap": 6}, "`continuation_overlap`"),  # > horizon - n_action_steps (5)
    ({"continuation_overlap": True}, "`continuation_overlap`"),
])
def test_real_time_fields_are_checked(fields, names):
    with pytest.raises(ValueError, match=names):
        _state_config(**fields)
