"""Smoke test of the MetaWorld benchmark (runs only with the `metaworld` extra installed).

A few expert demos for one task, a handful of training steps for a factorized policy, a
short closed-loop episode through fdp.Sampler, and the adaptation path (add a component,
train router + new). Well under a minute on a CPU.
"""

import copy
import os
import sys

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("mujoco")
pytest.importorskip("tqdm")

import torch  # noqa: E402

import fdp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                "metaworld"))

import mw_common as mw  # noqa: E402

TASK = "drawer-close-v3"


def test_metaworld_end_to_end(tmp_path):
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


def test_variants_adaptation_methods_replay_and_diagnostics(tmp_path, monkeypatch):
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
