"""fdp.DDPMScheduler / fdp.DDIMScheduler against diffusers, and the coefficient table.

The step-by-step equivalence runs in float64 (diffusers then evaluates its float32
scalars in float64 arithmetic, and the table holds those same scalars, so the two
agree to ~1e-12) and in float32, the dtype real loops use and the one whose
generator draws must line up.
"""

import json
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fdp.schedulers import (  # noqa: E402
    COL_A_M, COL_A_X, COL_C_M, COL_C_X, COL_C_X0, COL_SIGMA, NUM_COLS, DDIMScheduler, DDPMScheduler, StepTable,
    apply_step,
)

SHAPE = (3, 4, 5)
EPS32 = torch.finfo(torch.float32).eps


def _diffusers_ddpm_has(schedule):
    try:
        diffusers.DDPMScheduler(num_train_timesteps=4, beta_schedule=schedule)
    except NotImplementedError:
        return False
    return True


# Older diffusers lack some of DDPM's schedules; compare only what the installed one has.
EXTRA_DDPM_SCHEDULES = [s for s in ("sigmoid", "laplace") if _diffusers_ddpm_has(s)]


def fake_model(x, t):
    return 0.3 * x + math.sin(t)


def random_configs(n, seed):
    """(kind, constructor kwargs, step kwargs, num_inference_steps) over every supported option."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(["ddpm", "ddim"])
        T = rng.choice([10, 50, 100, 1000])
        schedules = ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"]
        if kind == "ddpm":
            schedules += EXTRA_DDPM_SCHEDULES
        schedule = rng.choice(schedules)
        beta_start, beta_end = rng.choice([(0.0001, 0.02), (0.00085, 0.012), (0.0002, 0.03)])
        kw = dict(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                  prediction_type=rng.choice(["epsilon", "sample", "v_prediction"]),
                  clip_sample=rng.random() < 0.6, clip_sample_range=rng.choice([1.0, 2.0, 0.5]),
                  timestep_spacing=rng.choice(["leading", "trailing", "linspace"]),
                  steps_offset=rng.choice([0, 0, 1, 2]), rescale_betas_zero_snr=rng.random() < 0.15)
        if schedule == "trained":
            kw["trained_betas"] = [rng.uniform(1e-4, 0.05) for _ in range(T)]
        else:
            kw["beta_schedule"] = schedule
        if kw["rescale_betas_zero_snr"] and kw["prediction_type"] == "epsilon":
            kw["prediction_type"] = "v_prediction"  # epsilon is undefined at zero SNR (tested on its own)
        if kind == "ddpm":
            kw["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large"])
            step_kw = {}
        else:
            kw["set_alpha_to_one"] = rng.random() < 0.5
            step_kw = dict(eta=rng.choice([0.0, 0.0, 0.3, 1.0]), use_clipped_model_output=rng.random() < 0.3)
            if kw["rescale_betas_zero_snr"] and step_kw["eta"] == 1.0:
                step_kw["eta"] = 0.3  # diffusers can give NaN there (test_ddim_eta_one_at_zero_snr)
        N = rng.choice([T, rng.randint(1, min(T, 20)), rng.randint(2, min(T, 20))]) if T <= 20 \
            else rng.randint(1, 20)
        if kw["timestep_spacing"] == "leading" and (T // N) * (N - 1) + kw["steps_offset"] >= T:
            kw["steps_offset"] = 0
        out.append((kind, kw, step_kw, N))
    return out


def make_pair(kind, kw):
    if kind == "ddpm":
        return diffusers.DDPMScheduler(**kw), DDPMScheduler(**kw)
    return diffusers.DDIMScheduler(**kw), DDIMScheduler(**kw)


CONFIGS = random_configs(80, seed=1234)
CONFIG_IDS = [f"{i}-{c[0]}-{c[1]['prediction_type']}" for i, c in enumerate(CONFIGS)]


def describe(idx):
    kind, kw, step_kw, N = CONFIGS[idx]
    kw = {k: ("[...]" if k == "trained_betas" else v) for k, v in kw.items()}
    return f"config {idx}: {kind} {kw} {step_kw} N={N}"


def run_pair(kind, kw, step_kw, N, dtype, seed, explicit_noise, teacher_forced=False):
    """Full loops of diffusers and fdp side by side; yields per-step outputs of both."""
    ref, ours = make_pair(kind, kw)
    ref.set_timesteps(N)
    ours.set_timesteps(N)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    table = ours.step_table(**step_kw)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x_ref, x_ours = x.clone(), x.clone()
    g_ref = torch.Generator().manual_seed(seed + 1)
    g_ours = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(ours.timesteps.tolist()):
        m_ref, m_ours = fake_model(x_ref, t), fake_model(x_ours, t)
        if explicit_noise:
            # What diffusers' generator draws on this step, or junk that must be ignored.
            z = (torch.randn(SHAPE, generator=g_ours, dtype=dtype) if table.adds_noise[i]
                 else torch.full(SHAPE, 1e6, dtype=dtype))
            o = ours.step(m_ours, t, x_ours, noise=z, **step_kw)
        else:
            o = ours.step(m_ours, t, x_ours, generator=g_ours, **step_kw)
        r = ref.step(m_ref, t, x_ref, generator=g_ref, **step_kw)
        yield i, t, table, (x_ours, m_ours), o, r
        x_ref = r.prev_sample
        x_ours = r.prev_sample if teacher_forced else o.prev_sample


@pytest.mark.parametrize("explicit_noise", [False, True], ids=["generator", "noise"])
@pytest.mark.parametrize("idx", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_matches_diffusers_float64(idx, explicit_noise):
    for i, t, _, _, o, r in run_pair(*CONFIGS[idx], torch.float64, seed=idx, explicit_noise=explicit_noise):
        msg = f"{describe(idx)} step {i} t={t}"
        torch.testing.assert_close(o.pred_original_sample, r.pred_original_sample, rtol=1e-10, atol=1e-10,
                                   msg=lambda s: f"{msg}: pred_original_sample\n{s}")
        torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-10, atol=1e-10,
                                   msg=lambda s: f"{msg}: prev_sample\n{s}")


def _f32_rounding_bound(terms):
    # A sum of float32 products is exact to about ulp(sum of |term|) per operation; two
    # evaluation orders can differ by a few of those whatever the size of the result.
    return 4 * EPS32 * sum(t.abs() for t in terms)


@pytest.mark.parametrize("idx", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_matches_diffusers_float32(idx):
    """float32, noise from the same generator seed. sample / v_prediction: the full loop
    within rtol=1e-5, atol=1e-6. epsilon: diffusers divides by sqrt(ab_t) where the table
    multiplies by its reciprocal, and x0's terms are up to 1/sqrt(ab_t) times larger than
    x0, so each step (teacher-forced) must agree to rtol=1e-5, atol=1e-6 plus the float32
    rounding of those terms."""
    eps = CONFIGS[idx][1]["prediction_type"] == "epsilon"
    for i, t, table, (x, m), o, r in run_pair(*CONFIGS[idx], torch.float32, seed=idx, explicit_noise=False,
                                              teacher_forced=eps):
        msg = f"{describe(idx)} step {i} t={t}"
        if not eps:
            torch.testing.assert_close(o.pred_original_sample, r.pred_original_sample, rtol=1e-5, atol=1e-6,
                                       msg=lambda s: f"{msg}: pred_original_sample\n{s}")
            torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-5, atol=1e-6,
                                       msg=lambda s: f"{msg}: prev_sample\n{s}")
            continue
        c = table.coef[i].float()
        x0_bound = _f32_rounding_bound([c[COL_A_X] * x, c[COL_A_M] * m])
        prev_bound = c[COL_C_X0].abs() * x0_bound + _f32_rounding_bound(
            [c[COL_C_X0] * o.pred_original_sample, c[COL_C_X] * x, c[COL_C_M] * m, o.prev_sample])
        for name, got, want, bound in (("pred_original_sample", o.pred_original_sample, r.pred_original_sample,
                                        x0_bound), ("prev_sample", o.prev_sample, r.prev_sample, prev_bound)):
            err = (got - want).abs()
            tol = 1e-6 + 1e-5 * want.abs() + bound
            assert bool((err <= tol).all()), f"{msg}: {name} max excess {(err - tol).max().item():.3g}"


def test_float32_free_running_loops_within_tolerance():
    """The whole sweep in float32 with free-running loops (errors carried from step to
    step), every prediction type: every element within rtol=1e-5, atol=1e-6.

    One derived exception: under epsilon prediction x0 = c_ax x + c_am m cancels at high
    noise levels, so a small x0 carries the absolute difference its inputs already had
    (x and m of the two loops differ by what earlier steps left, each within tolerance)
    times |c_ax|, |c_am|, plus the float32 rounding of its terms (as in the teacher-forced
    test above). The bound for pred_original_sample there adds exactly that first-order
    propagation; prev_sample, the loop's output, is held to the plain tolerance."""
    worst_abs = worst_excess = 0.0
    outside = total = 0
    for idx, cfg in enumerate(CONFIGS):
        eps = cfg[1]["prediction_type"] == "epsilon"
        x_ref = None
        for i, t, table, (x, m), o, r in run_pair(*cfg, torch.float32, seed=idx, explicit_noise=False):
            x_ref = x if x_ref is None else x_ref  # step 0: both loops start from the same x_T
            x0_extra = 0.0
            if eps:
                c = table.coef[i].float()
                dx, dm = (x - x_ref).abs(), (m - fake_model(x_ref, t)).abs()
                x0_extra = (c[COL_A_X].abs() * dx + c[COL_A_M].abs() * dm
                            + _f32_rounding_bound([c[COL_A_X] * x, c[COL_A_M] * m]))
            for got, want, extra in ((o.prev_sample, r.prev_sample, 0.0),
                                     (o.pred_original_sample, r.pred_original_sample, x0_extra)):
                err = (got - want).abs()
                worst_abs = max(worst_abs, err.max().item())
                worst_excess = max(worst_excess, ((err - 1e-6 - extra) / want.abs()).max().item())
                outside += int((err > 1e-6 + 1e-5 * want.abs() + extra).sum())
                total += err.numel()
            x_ref = r.prev_sample
    print(f"\nfloat32 vs diffusers over {len(CONFIGS)} configs: max abs diff {worst_abs:.3g}, "
          f"max (diff - atol - propagated)/|ref| {worst_excess:.3g}; {outside}/{total} elements outside")
    assert outside == 0


# ---------------------------------------------------------------------------------------------------------------
# apply_step and the table


@pytest.mark.parametrize("idx", range(24), ids=CONFIG_IDS[:24])
def test_apply_step_reproduces_step(idx):
    kind, kw, step_kw, N = CONFIGS[idx]
    ours = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(**kw)
    ours.set_timesteps(N)
    table = ours.step_table(**step_kw)
    table32 = table.to("cpu", torch.float32)
    assert table32.coef.dtype == torch.float32 and table.coef.dtype == torch.float64
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    for i, t in enumerate(table.timesteps.tolist()):
        m = fake_model(x, t)
        z = torch.randn(SHAPE, generator=g)
        o = ours.step(m, t, x, noise=z, **step_kw)
        prev, x0 = apply_step(table, i, x, m, z, return_x0=True)
        assert torch.equal(prev, o.prev_sample) and torch.equal(x0, o.pred_original_sample)
        # A float32 table is what a float32 step multiplies by anyway.
        assert torch.equal(apply_step(table32, i, x, m, z), prev)
        # The three lines, spelled out.
        a_x, a_m, c_x0, c_x, c_m, sigma = table.coef[i].tolist()
        x0_ref = a_x * x + a_m * m
        if table.clip_sample:
            x0_ref = x0_ref.clamp(-table.clip_range, table.clip_range)
        prev_ref = c_x0 * x0_ref + c_x * x + c_m * m + (sigma * z if table.adds_noise[i] else 0)
        torch.testing.assert_close(prev, prev_ref, rtol=1e-6, atol=1e-6)
        x = prev


def test_step_table_layout_and_state():
    ddpm = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    full = ddpm.step_table()
    assert full.timesteps.tolist() == list(range(99, -1, -1)) and len(full) == 100
    ddpm.set_timesteps(10, device="cpu")
    before = ddpm.timesteps.clone()
    t = ddpm.step_table(25)
    assert torch.equal(ddpm.timesteps, before) and ddpm.num_inference_steps == 10
    assert t.coef.shape == (25, NUM_COLS) and t.coef.dtype == torch.float64
    assert t.timesteps.dtype == torch.int64 and t.adds_noise.dtype == torch.bool
    assert t.adds_noise.tolist() == [ts > 0 for ts in t.timesteps.tolist()]
    assert (t.coef[:, COL_C_M] == 0).all() and t.coef[-1, COL_SIGMA] == 0
    assert torch.equal(ddpm.step_table().coef, ddpm.step_table(10).coef)
    assert (COL_A_X, COL_A_M, COL_C_X0, COL_C_X, COL_C_M, COL_SIGMA) == tuple(range(6))

    ddim = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    t = ddim.step_table(10, eta=0.5)
    assert t.adds_noise.all() and (t.coef[:, COL_A_X] == 0).all() and (t.coef[:, COL_A_M] == 1).all()
    t0 = ddim.step_table(10)
    assert not t0.adds_noise.any() and (t0.coef[:, COL_SIGMA] == 0).all()
    tc = ddim.step_table(10, use_clipped_model_output=True)
    assert (tc.coef[:, COL_C_M] == 0).all()
    assert isinstance(t, StepTable) and t.clip_sample is True and t.clip_range == 1.0


def test_step_without_set_timesteps_and_off_schedule():
    kw = dict(num_train_timesteps=20, beta_schedule="linear", clip_sample=False)
    ref, ours = diffusers.DDPMScheduler(**kw), DDPMScheduler(**kw)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = torch.randn(SHAPE, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xr = xo = x
    for t in range(19, -1, -1):
        xr = ref.step(fake_model(xr, t), t, xr, generator=g1).prev_sample
        xo = ours.step(fake_model(xo, t), t, xo, generator=g2).prev_sample
    torch.testing.assert_close(xo, xr, rtol=1e-10, atol=1e-10)
    ours.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(x, 7, x)

    # DDIM's update needs only t and the step gap: any training timestep may be stepped.
    kw = dict(num_train_timesteps=100, beta_schedule="scaled_linear", clip_sample=False)
    ref, ours = diffusers.DDIMScheduler(**kw), DDIMScheduler(**kw)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    for t in (37, 95, 3, torch.tensor(55)):
        r, o = ref.step(fake_model(x, int(t)), t, x, eta=0.4, variance_noise=x), \
            ours.step(fake_model(x, int(t)), t, x, eta=0.4, variance_noise=x)
        torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(o.pred_original_sample, r.pred_original_sample, rtol=1e-10, atol=1e-10)


def test_output_forms_and_generator_list():
    s = DDPMScheduler(num_train_timesteps=50)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    t = int(s.timesteps[0])
    out = s.step(x, t, x, noise=x)
    prev, x0 = s.step(x, t, x, noise=x, return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out[1], x0) and torch.equal(out["prev_sample"], prev)
    assert s.scale_model_input(x, t) is x and s.init_noise_sigma == 1.0

    ref = diffusers.DDPMScheduler(num_train_timesteps=50)
    ref.set_timesteps(5)
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    gens2 = [torch.Generator().manual_seed(k) for k in range(3)]
    torch.testing.assert_close(s.step(x, t, x, generator=gens).prev_sample,
                               ref.step(x, t, x, generator=gens2).prev_sample, rtol=1e-5, atol=1e-6)


def test_timesteps_match_diffusers():
    for T in (1, 7, 10, 50, 100, 1000):
        Ns = range(1, T + 1) if T <= 100 else (1, 2, 3, 7, 10, 50, 61, 103, 121, 999, 1000)
        for N in Ns:
            for spacing in ("leading", "trailing", "linspace"):
                for offset in (0, 1, 3):
                    for cls, ref_cls in ((DDPMScheduler, diffusers.DDPMScheduler),
                                         (DDIMScheduler, diffusers.DDIMScheduler)):
                        kw = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                        ref, ours = ref_cls(**kw), cls(**kw)
                        ref.set_timesteps(N)
                        want = ref.timesteps.tolist()
                        if spacing == "leading" and want[0] >= T:
                            with pytest.raises(ValueError, match="steps_offset"):
                                ours.set_timesteps(N)
                            continue
                        ours.set_timesteps(N)
                        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == N
                        got = ours.timesteps.tolist()
                        # diffusers' float arange sometimes adds a trailing timestep -1.
                        if len(want) == N + 1 and spacing == "trailing":
                            assert want[-1] == -1
                            want = want[:N]
                        assert got == want, (cls.__name__, T, N, spacing, offset)
                    if spacing != "leading":
                        break  # steps_offset only shifts "leading"


def test_alphas_cumprod_bit_identical():
    for kind in ("ddpm", "ddim"):
        schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (EXTRA_DDPM_SCHEDULES if kind == "ddpm" else [])
        for schedule in schedules:
            for zero_snr in (False, True):
                for T in (10, 100, 1000):
                    kw = dict(num_train_timesteps=T, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr,
                              beta_start=0.00085, beta_end=0.012)
                    ref, ours = make_pair(kind, kw)
                    assert torch.equal(ours.betas, ref.betas), (kind, kw)
                    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod), (kind, kw)


def test_add_noise_and_velocity_match_diffusers():
    for kind, kw in (("ddpm", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")),
                     ("ddim", dict(num_train_timesteps=1000, beta_schedule="scaled_linear")),
                     ("ddpm", dict(num_train_timesteps=1000, rescale_betas_zero_snr=True))):
        ref, ours = make_pair(kind, kw)
        T = kw["num_train_timesteps"]
        for dtype in (torch.float32, torch.float64):
            x0 = torch.randn(6, 4, 3, dtype=dtype)
            noise = torch.randn(6, 4, 3, dtype=dtype)
            for ts in (torch.randint(0, T, (6,)), torch.tensor(T - 1), torch.tensor([0])):
                assert torch.equal(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts))
                assert torch.equal(ours.get_velocity(x0, noise, ts), ref.get_velocity(x0, noise, ts))


def test_from_config():
    ref = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                  prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="trailing")
    ours = DDIMScheduler.from_config(ref.config)
    assert any(k.startswith("_") for k in ref.config) and not any(k.startswith("_") for k in ours.config)
    saved = json.loads(ref.to_json_string())  # what a saved scheduler_config.json holds
    assert saved["_class_name"] == "DDIMScheduler" and "_diffusers_version" in saved
    assert dict(DDIMScheduler.from_config(saved).config) == dict(ours.config)
    for k, v in ours.config.items():
        assert ref.config[k] == v, k
    assert ours.config.prediction_type == "v_prediction" and ours.config["set_alpha_to_one"] is False
    # Round trip, dict form, overrides, and loading one class's config into the other.
    again = DDIMScheduler.from_config(ours.config)
    assert dict(again.config) == dict(ours.config)
    assert dict(DDIMScheduler.from_config({**ours.config, "unknown_key": 1, "_private": 2}).config) == dict(ours.config)
    assert DDIMScheduler.from_config(ours.config, clip_sample=True).config["clip_sample"] is True
    ddpm = DDPMScheduler.from_config(ours.config)
    assert "set_alpha_to_one" not in ddpm.config and ddpm.config["variance_type"] == "fixed_small"
    assert DDIMScheduler.from_config(ddpm.config).config["set_alpha_to_one"] is True
    assert DDPMScheduler.from_config(diffusers.DDPMScheduler(variance_type="fixed_large").config) \
        .config["variance_type"] == "fixed_large"
    with pytest.raises(AttributeError):
        ours.config.num_train_timesteps = 3
    with pytest.raises(TypeError):
        ours.config["num_train_timesteps"] = 3
    # Trained betas survive the round trip.
    tb = [0.01] * 10
    s = DDPMScheduler(num_train_timesteps=10, trained_betas=tb)
    assert torch.equal(DDPMScheduler.from_config(s.config).alphas_cumprod, s.alphas_cumprod)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_arguments_raise(cls):
    with pytest.raises(ValueError, match="thresholding"):
        cls(thresholding=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="flow")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="random")
    with pytest.raises(ValueError, match="trained_betas"):
        cls(num_train_timesteps=10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        cls(num_train_timesteps=0)
    s = cls(num_train_timesteps=100)
    for n in (101, 0):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.step_table(n)
    with pytest.raises(ValueError, match="steps_offset"):
        cls(num_train_timesteps=100, steps_offset=1).set_timesteps(100)
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    t = int(s.timesteps[0])
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(3, 4, 6), t, x)
    with pytest.raises(ValueError, match="noise"):
        s.step(x, t, x, noise=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="generator"):
        s.step(x, t, x, generator=torch.Generator(), noise=x)
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, torch.tensor([1, 2]), x)
    # Zero terminal SNR: alphas_cumprod[T-1] == 0, where epsilon cannot give x0.
    z = cls(num_train_timesteps=100, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="prediction_type"):
        z.step_table(10)
    cls(num_train_timesteps=100, rescale_betas_zero_snr=True, timestep_spacing="trailing",
        prediction_type="v_prediction").step_table(10)


def test_unsupported_options_raise():
    for vt in ("learned", "learned_range", "fixed_large_log"):
        with pytest.raises(ValueError, match="variance_type.*not supported"):
            DDPMScheduler(variance_type=vt)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="huge")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="sigmoid")  # diffusers' DDIM has no sigmoid either
    with pytest.raises(ValueError, match="eta"):
        DDPMScheduler().step_table(10, eta=0.5)
    d = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(torch.zeros(2), 10, torch.zeros(2))
    with pytest.raises(ValueError, match="eta"):
        d.step_table(10, eta=-1.0)


def test_ddim_eta_one_at_zero_snr():
    """At alphas_cumprod[t] == 0 with eta = 1, sqrt(1 - ab_p - std^2) is sqrt(0); diffusers'
    float32 rounding makes the radicand slightly negative (NaN), fdp uses 0."""
    kw = dict(num_train_timesteps=10, rescale_betas_zero_snr=True, timestep_spacing="trailing",
              prediction_type="v_prediction", clip_sample=False)
    ref, ours = diffusers.DDIMScheduler(**kw), DDIMScheduler(**kw)
    ref.set_timesteps(2)
    ours.set_timesteps(2)
    x = torch.randn(SHAPE, dtype=torch.float64)
    r = ref.step(fake_model(x, 9), 9, x, eta=1.0, variance_noise=x).prev_sample
    o = ours.step(fake_model(x, 9), 9, x, eta=1.0, noise=x).prev_sample
    assert torch.isfinite(o).all()
    if torch.isfinite(r).all():
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [1.5, 1.0 + 1e-6, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_ddim_eta_outside_unit_interval_is_refused(eta):
    # Past 1 the step's noise can exceed its variance: diffusers then takes sqrt of a negative (NaN).
    d = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    error = TypeError if isinstance(eta, (bool, str)) else ValueError  # a wrong type, or a number out of range
    with pytest.raises(error, match="eta"):
        d.step_table(10, eta=eta)
    d.set_timesteps(10)
    with pytest.raises(error, match="eta"):
        d.step(torch.zeros(SHAPE), int(d.timesteps[0]), torch.zeros(SHAPE), eta=eta)


def test_ddim_eta_bounds_are_accepted():
    import numpy as np

    d = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    for eta in (0, 0.0, 1, 1.0, np.float32(0.5)):
        assert torch.isfinite(d.step_table(10, eta=eta).coef).all()


# -- strict config types and ranges: a config read from a file is refused with the field's name, never coerced ----

BAD_CONFIGS = [
    (dict(clip_sample="false"), TypeError, "`clip_sample` must be a bool, got 'false' (str)"),
    (dict(clip_sample=0), TypeError, "`clip_sample` must be a bool"),
    (dict(rescale_betas_zero_snr="no"), TypeError, "`rescale_betas_zero_snr` must be a bool"),
    (dict(thresholding="false"), TypeError, "`thresholding` must be a bool"),
    (dict(beta_end=2.0), ValueError, "`beta_end` must be a number in (0, 1), got 2.0"),
    (dict(beta_end=1.0), ValueError, "`beta_end` must be a number in (0, 1), got 1.0"),
    (dict(beta_start=-0.0001), ValueError, "`beta_start` must be a number in (0, 1), got -0.0001"),
    (dict(beta_start=0.0), ValueError, "`beta_start` must be a number in (0, 1), got 0.0"),
    (dict(beta_start="0.0001"), TypeError, "`beta_start` must be a number in (0, 1), got '0.0001' (str)"),
    (dict(beta_start=float("nan")), ValueError, "`beta_start` must be a number in (0, 1)"),
    (dict(beta_start=0.03, beta_end=0.02), ValueError, "`beta_start` (0.03) must be <= `beta_end` (0.02)"),
    (dict(num_train_timesteps=0), ValueError, "`num_train_timesteps` must be a positive int, got 0"),
    (dict(num_train_timesteps=100.0), TypeError, "`num_train_timesteps` must be a positive int"),
    (dict(steps_offset=-1), ValueError, "`steps_offset` must be a non-negative int, got -1"),
    (dict(clip_sample_range=-1.0), ValueError, "`clip_sample_range` must be a number >= 0, got -1.0"),
    (dict(clip_sample_range="1"), TypeError, "`clip_sample_range` must be a number >= 0"),
    (dict(prediction_type="eps"), ValueError, "`prediction_type` must be one of"),
    (dict(timestep_spacing=None), ValueError, "`timestep_spacing` must be one of"),
    (dict(beta_schedule=1), TypeError, "`beta_schedule` must be a str"),
    (dict(beta_schedule="cubic"), ValueError, "`beta_schedule` must be one of"),
    (dict(trained_betas="0.1"), TypeError, "`trained_betas` must be None or a sequence of numbers"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, 0.0, 0.2]), ValueError,
     "`trained_betas[1]` must be a number in (0, 1]"),
    (dict(num_train_timesteps=3, trained_betas=[0.1, 1.5, 0.2]), ValueError,
     "`trained_betas[1]` must be a number in (0, 1]"),
    (dict(beta_start=1e-8), ValueError, "`beta_start` is too small for float32: 1 - beta rounds to 1 at timestep 0"),
    (dict(num_train_timesteps=2, trained_betas=[1e-9, 0.5]), ValueError, "`trained_betas[0]` is too small"),
    (dict(beta_end=0.5), ValueError, "`beta_end`=0.5 with beta_schedule='linear' over num_train_timesteps=1000 "
                                     "drives alphas_cumprod to 0 (float32) from timestep"),
    (dict(num_train_timesteps=3, trained_betas=[0.5, 1.0, 0.5]), ValueError, "`trained_betas` over "
                                                                              "num_train_timesteps=3 drives"),
    (dict(dynamic_thresholding_ratio="0.9"), TypeError, "`dynamic_thresholding_ratio` must be a finite number"),
]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("kw,exc,message", BAD_CONFIGS, ids=[m.split(" must")[0] + str(i)
                                                              for i, (_, _, m) in enumerate(BAD_CONFIGS)])
def test_bad_config_field_is_refused_by_name(cls, kw, exc, message):
    with pytest.raises(exc) as info:
        cls(**kw)
    assert str(info.value).startswith(message), str(info.value)
    # The same through from_config, as configs read from other libraries' files arrive.
    with pytest.raises(exc):
        cls.from_config({**cls().config, **kw})


@pytest.mark.parametrize("value", ["true", 1, None])
def test_ddim_set_alpha_to_one_is_a_bool(value):
    with pytest.raises(TypeError, match=r"^`set_alpha_to_one` must be a bool"):
        DDIMScheduler(set_alpha_to_one=value)


@pytest.mark.parametrize("value", ["learned", "fixed_small "])
def test_ddpm_variance_type_is_named(value):
    with pytest.raises(ValueError, match="`variance_type`"):
        DDPMScheduler(variance_type=value)


def test_valid_edge_configs_still_build_and_step_finitely():
    # The bounds are strict only where the step breaks: the smallest and largest legal betas give finite tables.
    for cls in (DDPMScheduler, DDIMScheduler):
        for kw in (dict(beta_start=2.0 ** -23, beta_end=2.0 ** -23), dict(beta_start=0.5, beta_end=0.999),
                   dict(clip_sample_range=0.0), dict(clip_sample=np.bool_(False))):
            table = cls(num_train_timesteps=50, **kw).step_table(5)
            assert bool(torch.isfinite(table.coef).all()), (cls, kw)
