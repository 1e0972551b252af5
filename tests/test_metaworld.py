"""The MetaWorld benchmark: the unsaturated protocol's statistics, ablation and report (always), and
smoke runs of the simulator paths (only with the `metaworld` extra installed): a few expert demos,
a handful of training steps, short closed-loop episodes through fdp.Sampler, the adaptation path,
and run_all.py's default protocol end to end with ``--quick``.
"""

import copy
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import fdp
from helpers import make_mlp_policy, signed_tanh_routing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                "metaworld"))

import mw_common as mw  # noqa: E402
import protocol as up  # noqa: E402

TASK = "drawer-close-v3"


@pytest.fixture
def simulator():
    pytest.importorskip("metaworld")
    pytest.importorskip("mujoco")
    pytest.importorskip("tqdm")


# -- the unsaturated protocol without the simulator ----------------------------------------------------------

def _t_cdf(q, df, n=4000):
    """Student's t CDF at q > 0 by Simpson's rule on the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = [c * (1 + (q * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + q / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_quantiles_are_the_975_points():
    # Four decimals: the CDF at the rounded value is within density * 5e-5 < 2e-5 of 0.975.
    for df, q in enumerate(up._T975, start=1):
        assert abs(_t_cdf(q, df) - 0.975) < 2e-5, (df, q)


def test_t_interval_by_hand():
    r = up.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: half-width t(2) / sqrt(3)
    assert r["mean"] == 2.0 and r["sd"] == 1.0 and r["n"] == 3
    assert r["high"] - 2.0 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-12)
    assert r["low"] == pytest.approx(4.0 - r["high"], rel=1e-12)
    assert up.t_interval([0.5])["low"] is None and up.t_interval([])["mean"] is None


def test_gate_lr_choice_and_failure_ratio():
    assert [up.gate_verdict(s) for s in (0.3499, 0.35, 0.70, 0.7001)] == ["below", "in", "in", "above"]
    assert up.pick_lr({1e-3: 0.5, 3e-3: 0.6}) == 3e-3 and up.pick_lr({1e-3: 0.5, 3e-3: 0.5}) == 1e-3
    assert up.failure_ratio(0.5, 0.75) == pytest.approx(2.0) and up.failure_ratio(0.5, 1.0) is None


def test_arm_metrics_apply_both_criteria():
    mono = {0: 0.50, 1: 0.52, 2: 0.48}
    fact = {0: 0.60, 1: 0.63, 2: 0.58}  # +10, +11, +10 points
    pays = up.arm_metrics(mono, fact, {0: 0.50, 1: 0.52, 2: 0.50})  # the ablation costs 10, 11, 8
    assert pays["difference_points"]["mean"] == pytest.approx(31 / 3) and pays["difference_points"]["low"] > 0
    assert pays["gain_met"] and pays["through_routing_met"] and pays["factorization_pays"]
    assert pays["failure_rate_ratio"] == pytest.approx(0.5 / (1 - 1.81 / 3))
    # The gain without routing: the mean weights do as well.
    no_routing = up.arm_metrics(mono, fact, {0: 0.59, 1: 0.62, 2: 0.58})
    assert no_routing["gain_met"] and not no_routing["through_routing_met"] and not no_routing["factorization_pays"]
    # A mean gain of 5 points whose interval reaches below 0.
    noisy = up.arm_metrics(mono, {0: 0.70, 1: 0.47, 2: 0.48}, {0: 0.40, 1: 0.40, 2: 0.40})
    assert noisy["difference_points"]["mean"] == pytest.approx(5.0) and noisy["difference_points"]["low"] < 0
    assert not noisy["gain_met"] and not noisy["factorization_pays"]


def test_strategy_comparison_names_a_strategy_only_when_the_interval_excludes_zero():
    def arms(soft, tanh):
        return {"factorized-soft": {"mean_success_by_seed": {str(s): v for s, v in enumerate(soft)}},
                "factorized-tanh": {"mean_success_by_seed": {str(s): v for s, v in enumerate(tanh)}}}

    ahead = up.strategy_comparison(arms([0.50, 0.52, 0.48], [0.60, 0.63, 0.58]))  # +10, +11, +10 points
    assert ahead["paired_seeds"] == [0, 1, 2] and ahead["better_strategy_shown"] == "tanh"
    assert ahead["tanh_minus_soft_points"]["mean"] == pytest.approx(31 / 3) and ahead["tanh_minus_soft_points"]["low"] > 0
    behind = up.strategy_comparison(arms([0.60, 0.63, 0.58], [0.50, 0.52, 0.48]))
    assert behind["better_strategy_shown"] == "soft" and behind["tanh_minus_soft_points"]["high"] < 0
    # ahead on the mean (+5 points), but the interval holds 0: neither is shown better
    noisy = up.strategy_comparison(arms([0.40, 0.60, 0.50], [0.60, 0.50, 0.55]))
    assert noisy["tanh_minus_soft_points"]["mean"] == pytest.approx(5.0) and noisy["better_strategy_shown"] is None
    assert up.strategy_comparison({"factorized-soft": {"mean_success_by_seed": {}}}) is None


@pytest.mark.parametrize("strategy", ["soft", "tanh"])
def test_constant_router_gives_the_mean_weights_everywhere(strategy):
    policy = make_mlp_policy(K=3, dtype=torch.float32, strategy=strategy)
    if strategy == "tanh":
        signed_tanh_routing(policy)
    cond = torch.randn(64, 5)
    wbar = policy.weights(cond).double().mean(0)
    ablated = up.constant_router(policy, wbar)
    w = ablated.weights(torch.randn(9, 5))
    # float32 logits (log or atanh of wbar), then the strategy: a few float32 roundings of values <= 1
    torch.testing.assert_close(w.double(), wbar.expand(9, -1), rtol=0, atol=8 * torch.finfo(torch.float32).eps)
    if strategy == "tanh":
        assert (wbar < 0).any()  # signed weights survive the ablation
    assert not torch.equal(policy.router.net[2].weight, ablated.router.net[2].weight)  # a copy; the policy stays
    with pytest.raises(ValueError, match="mean weights"):
        up.constant_router(policy, torch.tensor([1.5, 0.0, 0.0]) if strategy == "tanh" else torch.tensor([1.0, 0, 0]))


def test_weight_recorder_sees_every_sampling_call():
    policy = make_mlp_policy(K=3, dtype=torch.float32, strategy="tanh")
    sampler = fdp.Sampler(policy, fdp.DDIMScheduler(num_train_timesteps=20), num_inference_steps=2, backend="torch")
    rec = up.WeightRecorder(policy)
    c1, c2 = torch.randn(4, 5), torch.randn(3, 5)
    sampler(c1)
    sampler(c2)
    w = rec.close()
    torch.testing.assert_close(w, policy.weights(torch.cat([c1, c2])), rtol=0, atol=0)
    sampler(c1)
    assert len(rec.rows) == 2  # closed: the hook is gone


def _synthetic_result(cfg):
    rng = np.random.default_rng(0)
    res = {"runs": {}, "seed0_by_lr": {}, "chosen_lr": {}}
    base = {"monolithic": 0.5, "factorized-soft": 0.55, "factorized-tanh": 0.62}
    for arm in up.ARMS:
        for lr in cfg.lrs:
            for s in cfg.seeds:
                if s != cfg.seeds[0] and lr != (3e-3 if arm == "factorized-tanh" else 1e-3):
                    continue
                bump = 0.05 if (arm == "factorized-tanh") == (lr == 3e-3) else 0.0
                succ = {n: float(np.clip(base[arm] + bump + rng.normal(0, 0.05), 0, 1)) for n in cfg.tasks}
                r = {"arm": arm, "lr": lr, "seed": s, "success": succ,
                     "mean_success": float(np.mean(list(succ.values())))}
                if up.ARMS[arm]:
                    r["ablated_success"] = {n: v - 0.08 for n, v in succ.items()}
                    r["ablated_mean_success"] = r["mean_success"] - 0.08
                res["runs"][up._key(arm, lr, s)] = r
    return res


def test_summary_report_and_plot_from_runs(tmp_path):
    import report

    cfg = up.Config(seeds=(0, 1, 2), tasks=tuple(up.TASKS[:4]))
    res = _synthetic_result(cfg)
    up.summarize(res, cfg)
    assert res["chosen_lr"] == {"monolithic": 1e-3, "factorized-soft": 1e-3, "factorized-tanh": 3e-3}
    assert res["criteria"]["complete"] and set(res["metrics"]) == {"factorized-soft", "factorized-tanh"}
    m = res["metrics"]["factorized-tanh"]
    assert m["paired_seeds"] == [0, 1, 2] and m["mean_weight_ablation_cost_points"]["mean"] == pytest.approx(8.0)
    assert res["arms"]["factorized-tanh"]["lr"] == 3e-3
    assert res["criteria"]["factorization_pays"] == bool(res["criteria"]["arms_where_factorization_pays"])
    # the report reads what summarize wrote (plus what main adds)
    res.update(config={**{k: v for k, v in vars(cfg).items() if k != "progress"}, "n_demos_used": 20},
               gate={"20": {"mean_success": 0.5, "verdict": "in"}, "range": [0.35, 0.7], "demos_used": 20,
                     "note": "n"},
               wall_time_s={"total": 60.0}, hardware={"parallel_jobs": 2, "cpu_count": 2})
    json.loads(json.dumps(res))
    text = report.tables_unsaturated(res)
    assert "factorized-tanh" in text and "| lr 0.001 | lr 0.003 | chosen |" in text
    assert res["strategies"]["paired_seeds"] == [0, 1, 2] and "**Strategies, paired** (seeds 0, 1, 2)" in text
    assert "Wall time: 60 s (1.0 min) with 2 parallel jobs" in text
    res["wall_time_s"]["before_resume"] = 120.0  # a resumed run: the total counts every sitting
    assert "Wall time: 180 s (3.0 min) (resumed: 120 s before, 60 s in the last sitting)" in report.tables_unsaturated(res)
    report.plot_unsaturated(res, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # incomplete: no verdict
    del res["runs"][up._key("monolithic", 1e-3, 2)]
    up.summarize(res, cfg)
    assert not res["criteria"]["complete"] and res["criteria"]["factorization_pays"] is None


def test_adaptation_methods_and_the_monolithic_budget():
    cfg = up.Config(K=3, hidden=32, num_blocks=2)
    budget = up.factorized_budget(cfg)
    torch.manual_seed(0)
    fact = up.build_policy("factorized-tanh", cfg)
    mono = up.build_policy("monolithic", cfg)
    # last-layers: the trailing layers whose count is closest to the factorized budget
    modules, count = up.trailing_layers(mono.components[0], budget)
    c = mono.components[0]
    order = [c.out, c.blocks_b[1], c.blocks_a[1], c.blocks_b[0], c.blocks_a[0]]
    sums = np.cumsum([mw.num_params(m) for m in order])
    k = int(np.argmin(abs(sums - budget)))
    assert modules == order[:k + 1] and count == sums[k]
    p = copy.deepcopy(mono)
    params = up.prepare_adaptation(p, "last-layers", cfg)
    assert sum(q.numel() for q in params) == count
    mine, _ = up.trailing_layers(p.components[0], budget)
    assert {id(q) for q in params} == {id(q) for m in mine for q in m.parameters()}
    assert all(q.requires_grad == any(q is r for r in params) for q in p.parameters())
    assert sum(q.numel() for q in up.prepare_adaptation(copy.deepcopy(mono), "full", cfg)) == mw.num_params(mono)
    # new-logit: fdp's, outputs unchanged at first (tanh: weight 0), trains a component and the router
    p = copy.deepcopy(fact)
    x, cond, t = torch.randn(4, mw.HORIZON, mw.ACTION_DIM), torch.randn(4, mw.COND_DIM), torch.tensor(30)
    before = p(x, t, global_cond=cond)
    params = up.prepare_adaptation(copy.deepcopy(fact), "new-logit", cfg)
    assert sum(q.numel() for q in params) == budget
    p.add_component(mw.make_component(cfg.hidden, cfg.num_blocks))
    assert torch.all(p.weights(cond)[:, -1] == 0)
    torch.testing.assert_close(p(x, t, global_cond=cond), before, rtol=1e-6, atol=1e-7)  # float32 rounding
    # copy-reset: the authors', a copy of component 0 and a fresh router
    p = copy.deepcopy(fact)
    params = up.prepare_adaptation(p, "copy-reset", cfg)
    assert p.num_components == cfg.K + 1 and sum(q.numel() for q in params) == budget
    assert all(torch.equal(a, b) for a, b in zip(p.components[-1].parameters(), p.components[0].parameters()))
    assert not torch.equal(p.router.net[0].weight, fact.router.net[0].weight)


def test_adaptation_summary():
    cfg = up.Config(seeds=(0, 1))
    res = {"runs": {up._key("factorized-tanh", 1e-3, s): {"mean_success": 0.6} for s in (0, 1)},
           "adaptation_runs": {up._key("factorized-tanh", 1e-3, s): {
               "arm": "factorized-tanh", "lr": 1e-3, "seed": s, "methods": {"copy-reset": {
                   "new": {"door-close-v3": 0.8 + 0.1 * s}, "old": {"hammer-v3": 0.5, "push-wall-v3": 0.3},
                   "trainable_params": 7}}} for s in (0, 1)}}
    up.summarize_adaptation(res, cfg)
    d = res["adaptation"]["factorized-tanh"]["copy-reset"]
    assert d["new_points"]["mean"] == pytest.approx(85.0) and d["new_points"]["n"] == 2
    assert d["forgetting_points"]["mean"] == pytest.approx(20.0) and d["forgetting_points"]["sd"] == 0


# -- with the simulator ----------------------------------------------------------------------------------------

def test_unsaturated_protocol_quick(tmp_path, simulator):
    """run_all.py's default protocol end to end on its --quick settings (CI's smoke path)."""
    import run_all

    out, png = tmp_path / "quick.json", tmp_path / "quick.png"
    common = ["--quick", "--jobs", "1", "--no-progress", "--cache-dir", str(tmp_path), "--out", str(out)]
    run_all.main(common)
    first = json.loads(out.read_text())
    assert "adaptation_runs" not in first
    # --resume keeps the gate and every finished run, and runs only what is new (here: --adapt)
    run_all.main(common + ["--plot", str(png), "--adapt", "--resume"])
    r = json.loads(out.read_text())
    assert r["runs"] == first["runs"] and r["gate"] == first["gate"]
    assert r["wall_time_s"]["before_resume"] == first["wall_time_s"]["total"]
    # a resume with nothing left to run, on the default process pool, changes nothing
    run_all.main(common + ["--adapt", "--resume", "--jobs", "2"])
    third = json.loads(out.read_text())
    assert third["adaptation_runs"] == r["adaptation_runs"]
    assert third["wall_time_s"]["before_resume"] == pytest.approx(first["wall_time_s"]["total"]
                                                                  + r["wall_time_s"]["total"])
    with pytest.raises(SystemExit, match="another configuration"):
        run_all.main(common + ["--resume", "--seeds", "0", "1", "2"])
    q = up.QUICK
    assert r["protocol"] == "unsaturated" and r["quick"] and r["config"]["task_id"] is False
    assert r["gate"]["demos_used"] in (q["n_demos"], q["fallback_demos"]) and r["gate"]["range"] == list(up.GATE)
    assert len(r["runs"]) == len(up.ARMS) * (len(up.Config().lrs) + len(q["seeds"]) - 1)
    assert set(r["metrics"]) == {"factorized-soft", "factorized-tanh"} and r["criteria"]["complete"]
    for arm in ("factorized-soft", "factorized-tanh"):
        run = r["runs"][up._key(arm, r["chosen_lr"][arm], q["seeds"][1])]
        assert run["eval_weights"]["samples"] > 0 and set(run["ablated_success"]) == set(q["tasks"])
        assert run["diagnostics"]["num_components"] == q["K"]
    assert r["params"]["monolithic"]["K"] == 1 and r["wall_time_s"]["total"] > 0
    assert r["normalizer"]["action"] == {"lo": [-1.0] * mw.ACTION_DIM, "hi": [1.0] * mw.ACTION_DIM}
    assert png.stat().st_size > 1000
    # --adapt: every arm, every method of its kind, every seed; new-task success and forgetting
    for arm, methods in r["adaptation"].items():
        assert set(methods) == set(up.ADAPT_METHODS[arm != "monolithic"])
        for d in methods.values():
            assert d["new_points"]["n"] == len(q["seeds"]) and d["forgetting_points"]["n"] == len(q["seeds"])
    assert set(r["adaptation"]) == set(up.ARMS)
    budget = r["config"]["adapt"]["factorized_trainable_budget"]
    assert r["adaptation"]["factorized-tanh"]["copy-reset"]["trainable_params"] == budget


def test_metaworld_end_to_end(tmp_path, simulator):
    torch.set_num_threads(1)
    demos = mw.get_demos(str(tmp_path), [TASK], n_demos=2, log=lambda *a: None)
    assert os.path.exists(mw.demo_path(str(tmp_path), TASK, 2))
    d = demos[TASK]
    assert len(d["actions"]) == 2
    assert all(len(o) == len(a) + 1 for o, a in zip(d["obs"], d["actions"]))
    assert d["obs"][0].shape[1] == mw.OBS_DIM and d["actions"][0].shape[1] == mw.ACTION_DIM

    obs_norm, act_norm = mw.fit_normalizers(demos)
    cond, actions = mw.build_dataset(demos, [TASK], obs_norm, act_norm)
    assert cond.shape == (sum(len(a) for a in d["actions"]), mw.COND_DIM)
    assert actions.shape == (len(cond), mw.HORIZON, mw.ACTION_DIM)
    assert float(actions.abs().max()) <= 1.0 + 1e-5
    x = np.concatenate(d["actions"])
    np.testing.assert_allclose(act_norm.unnormalize(act_norm.normalize(x)), x, atol=1e-5)

    policy = mw.make_policy(K=2, hidden=32)
    mono_hidden = mw.matched_hidden(2, 32)
    n_f, n_m = mw.num_params(policy), mw.num_params(mw.make_policy(1, mono_hidden))
    assert abs(n_f - n_m) / n_f < 0.02
    trained, curve = mw.train(policy, cond, actions, policy.parameters(), steps=5, batch_size=32, lr=1e-3,
                              seed=0, progress=False)
    assert curve and np.isfinite(curve[-1][1])

    res = mw.evaluate(trained, [TASK], obs_norm, act_norm, n_episodes=1, max_steps=16, envs_per_task=1,
                      exclude_vecs={TASK: d["rand_vecs"]}, progress=False)
    assert res[TASK]["episodes"] == 1
    assert 0.0 <= res[TASK]["success_rate"] <= 1.0
    assert 0 < res[TASK]["mean_length"] <= 16

    # adaptation: a new component, old ones frozen
    trained.requires_grad_(True)
    trained.add_component(mw.make_component(32))
    params = trained.adapt("router+new")
    assert sum(p.numel() for p in params) < mw.num_params(trained)
    before = [p.detach().clone() for p in trained.components[0].parameters()]
    adapted, _ = mw.train(trained, cond, actions, params, steps=3, batch_size=32, lr=1e-3, seed=1, progress=False)
    for p0, p1 in zip(before, adapted.components[0].parameters()):
        torch.testing.assert_close(p0, p1)
    assert adapted.num_components == 3


def test_variants_adaptation_methods_replay_and_diagnostics(tmp_path, monkeypatch, simulator):
    import train as tr

    torch.set_num_threads(1)
    cfg = tr.Config(n_demos=1, K=2, hidden=16, steps=3, adapt_steps=2, batch_size=20, cache_dir=str(tmp_path),
                    progress=False)
    data = tr.Data(cfg, log=lambda *a: None)
    v = tr.variant("factorized-spec-notid")
    assert v.factorized and v.specialise and not v.task_id and v.strategy == "soft"
    assert tr.variant("factorized-spec-topk").strategy == "topk" and not tr.variant("monolithic").factorized
    with pytest.raises(ValueError, match="unknown variant"):
        tr.variant("factorised")
    no_id, _ = data.dataset(mw.MT_TASKS, task_id=False)
    with_id, _ = data.dataset(mw.MT_TASKS)
    assert (no_id[:, -len(mw.ALL_TASKS):] == 0).all() and (with_id[:, -len(mw.ALL_TASKS):].sum(1) == 1).all()
    torch.testing.assert_close(no_id[:, :-len(mw.ALL_TASKS)], with_id[:, :-len(mw.ALL_TASKS)])
    assert tr.loss_kwargs("factorized", cfg) == {}
    assert tr.loss_kwargs("factorized-spec", cfg) == {"component_weight": 1.0, "balance_weight": 0.1}
    assert tr.loss_kwargs("factorized-spec", cfg, adaptation=True)["balance_weight"] == cfg.adapt_balance_weight

    policy, _ = tr.train_multitask("factorized-spec", 0, cfg, data)
    g = copy.deepcopy(policy)
    tr.prepare_adaptation(g, tr.variant("factorized-spec"), cfg, "mean-row")
    w = g.router.net[2]
    torch.testing.assert_close(w.weight[-1], w.weight[:-1].mean(0))
    torch.testing.assert_close(w.bias[-1], w.bias[:-1].mean())
    g = copy.deepcopy(policy)
    tr.prepare_adaptation(g, tr.variant("factorized-spec"), cfg, "new-logit")
    assert float(g.router.net[2].bias[-1]) == cfg.new_logit and not g.router.net[2].weight[-1].any()

    # replay: 10 % of every adaptation batch comes from the multitask tasks (told apart by the task id)
    seen = []
    real_loss = fdp.FactorizedPolicy.loss

    def recording_loss(self, actions, cond, **kw):
        seen.append(cond[:, -len(mw.ALL_TASKS):].argmax(1))
        return real_loss(self, actions, cond, **kw)

    monkeypatch.setattr(fdp.FactorizedPolicy, "loss", recording_loss)
    adapted, _ = tr.adapt("factorized-spec", policy, 0, cfg, data, "new-logit+replay")
    monkeypatch.undo()
    old_ids = {mw.TASK_INDEX[n] for n in mw.MT_TASKS}
    assert len(seen) == cfg.adapt_steps
    assert all(sum(int(i) in old_ids for i in ids) == round(cfg.replay_fraction * cfg.batch_size) for ids in seen)
    assert adapted.num_components == 3

    d = tr.diagnostics(adapted, "factorized-spec", data, mw.ALL_TASKS, max_per_task=7)
    assert list(d["tasks"]) == mw.ALL_TASKS and d["num_components"] == 3
    assert all(t["samples"] == 7 for t in d["tasks"].values())
