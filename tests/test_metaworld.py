"""Smoke test of the MetaWorld benchmark (runs only with the `metaworld` extra installed).

A few expert demos for one task, a handful of training steps for a factorized policy, a
short closed-loop episode through fdp.Sampler, and the adaptation path (add a component,
train router + new). Well under a minute on a CPU.
"""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("mujoco")
pytest.importorskip("tqdm")

import torch  # noqa: E402

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
