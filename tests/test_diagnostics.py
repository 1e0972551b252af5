import json
import math

import pytest
import torch

import fdp
from helpers import make_mlp_policy


def _data(policy, sizes=(("a", 5), ("b", 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {n: torch.randn(N, policy.cond_dim, dtype=torch.float64, generator=g) for n, N in sizes}
    act = {n: torch.rand(N, policy.horizon, policy.action_dim, dtype=torch.float64, generator=g) * 2 - 1
           for n, N in sizes}
    return obs, act


def test_one_hot_routing_has_entropy_0_top_weight_1_and_composed_error_of_that_component():
    policy = make_mlp_policy(K=3, strategy="fixed", fixed_weights=[0.0, 1.0, 0.0])
    obs, act = _data(policy)
    r = fdp.diagnostics.routing(policy, obs, act, generator=torch.Generator().manual_seed(1))
    for row in list(r["tasks"].values()) + [r["overall"]]:
        assert row["entropy"] == 0.0 and row["top_weight"] == 1.0
        assert row["mean_weights"] == [0.0, 1.0, 0.0] and row["weight_std"] == [0.0, 0.0, 0.0]
        assert row["dominant"] == 1
        assert row["composed_mse"] == pytest.approx(row["component_mse"][1], rel=1e-12)
        assert row["composed_mse"] != pytest.approx(row["uniform_mse"], rel=1e-6)


def test_uniform_routing_has_normalised_entropy_1_and_equals_the_uniform_ablation():
    policy = make_mlp_policy(K=4, strategy="fixed", fixed_weights=[0.25] * 4)
    obs, act = _data(policy)
    r = fdp.diagnostics.routing(policy, obs, act, generator=torch.Generator().manual_seed(1))
    for row in list(r["tasks"].values()) + [r["overall"]]:
        assert row["entropy"] == pytest.approx(1.0, rel=1e-12)
        assert row["top_weight"] == pytest.approx(0.25, rel=1e-12)
        assert row["composed_mse"] == pytest.approx(row["uniform_mse"], rel=1e-12)


def test_entropy_and_top_weight_of_a_two_way_split():
    # [0.5, 0.5, 0, 0]: entropy log 2 / log 4 = 0.5; the zeros contribute nothing (no NaN).
    policy = make_mlp_policy(K=4, strategy="fixed", fixed_weights=[0.5, 0.0, 0.5, 0.0])
    obs, _ = _data(policy)
    r = fdp.diagnostics.routing(policy, obs)
    assert r["overall"]["entropy"] == pytest.approx(0.5, rel=1e-12)
    assert r["overall"]["top_weight"] == 0.5
    assert "composed_mse" not in r["overall"]


@torch.no_grad()
def test_soft_routing_statistics_and_errors_match_a_hand_computation():
    policy = make_mlp_policy(K=3)
    obs, act = _data(policy)
    r = fdp.diagnostics.routing(policy, obs, act, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the tasks draw in the order given
    all_w = []
    for name in ("a", "b"):
        w = policy.weights(obs[name])
        all_w.append(w)
        row = r["tasks"][name]
        assert row["samples"] == len(w)
        ent = -(w * w.log()).sum(1) / math.log(3)
        assert row["entropy"] == pytest.approx(float(ent.mean()), rel=1e-10)
        assert row["top_weight"] == pytest.approx(float(w.max(1).values.mean()), rel=1e-12)
        assert row["mean_weights"] == pytest.approx(w.mean(0).tolist(), rel=1e-12)
        assert row["weight_std"] == pytest.approx(w.std(0, unbiased=False).tolist(), rel=1e-10)
        assert row["dominant"] == int(w.mean(0).argmax())
        noisy, t, target = policy.noised(act[name], g)
        eps = [c(noisy, t, global_cond=obs[name]) for c in policy.components]
        assert row["composed_mse"] == pytest.approx(float(((policy(noisy, t, global_cond=obs[name]) - target) ** 2)
                                                          .mean()), rel=1e-10)
        assert row["component_mse"] == pytest.approx([float(((e - target) ** 2).mean()) for e in eps], rel=1e-10)
        assert row["uniform_mse"] == pytest.approx(float(((sum(eps) / 3 - target) ** 2).mean()), rel=1e-10)
        assert row["zero_mse"] == pytest.approx(float((target ** 2).mean()), rel=1e-12)
    w = torch.cat(all_w)
    assert r["overall"]["samples"] == 8
    assert r["overall"]["mean_weights"] == pytest.approx(w.mean(0).tolist(), rel=1e-12)
    # overall errors are sample-weighted means of the tasks' (every sample has the same element count)
    expect = (5 * r["tasks"]["a"]["composed_mse"] + 3 * r["tasks"]["b"]["composed_mse"]) / 8
    assert r["overall"]["composed_mse"] == pytest.approx(expect, rel=1e-12)


def test_result_is_json_and_the_table_has_a_row_per_task():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    obs, act = _data(policy)
    obs = {n: o.float() for n, o in obs.items()}
    act = {n: a.float() for n, a in act.items()}
    policy.train()
    r = fdp.diagnostics.routing(policy, obs, act)
    assert policy.training  # the mode is restored
    assert json.loads(json.dumps(r)) == r
    table = fdp.diagnostics.format_routing(r).splitlines()
    assert len(table) == 1 + 2 + 1
    assert table[1].startswith("a ") and table[2].startswith("b ") and table[3].startswith("(all)")
    assert "uniform" in table[0]
    assert "uniform" not in fdp.diagnostics.format_routing(fdp.diagnostics.routing(policy, obs))


def test_bad_inputs_are_named():
    policy = make_mlp_policy(K=2)
    obs, act = _data(policy)
    with pytest.raises(TypeError, match="`policy`"):
        fdp.diagnostics.routing(policy.router, obs)
    with pytest.raises(TypeError, match="`obs_by_task`"):
        fdp.diagnostics.routing(policy, {})
    with pytest.raises(ValueError, match=r"`obs_by_task\['a'\]` must have shape \[N, 5\]"):
        fdp.diagnostics.routing(policy, {"a": obs["a"][:, :4]})
    with pytest.raises(ValueError, match="at least one sample"):
        fdp.diagnostics.routing(policy, {"a": obs["a"][:0]})
    with pytest.raises(ValueError, match="same task names"):
        fdp.diagnostics.routing(policy, obs, {"a": act["a"]})
    with pytest.raises(ValueError, match=r"`actions_by_task\['b'\]` must have shape \[N, 4, 3\] \(N=3\)"):
        fdp.diagnostics.routing(policy, obs, {"a": act["a"], "b": act["b"][:2]})


@torch.no_grad()
def test_tanh_routing_reports_shares_row_sums_and_the_mean_weight_ablation():
    # Signed, unnormalised weights: entropy and top weight describe the shares |w_k| / sum_j |w_j|.
    policy = make_mlp_policy(K=3, strategy="tanh")
    policy.router.net[2].bias.copy_(torch.tensor([1.2, -0.9, 0.3], dtype=torch.float64))
    obs, act = _data(policy)
    r = fdp.diagnostics.routing(policy, obs, act, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for name in ("a", "b"):
        w = policy.weights(obs[name])
        assert (w < 0).any()
        share = w.abs() / w.abs().sum(1, keepdim=True)
        row = r["tasks"][name]
        assert row["entropy"] == pytest.approx(float((-(share * share.log()).sum(1) / math.log(3)).mean()), rel=1e-10)
        assert row["top_weight"] == pytest.approx(float(share.max(1).values.mean()), rel=1e-12)
        assert row["weight_sum"] == pytest.approx(float(w.sum(1).mean()), rel=1e-12)
        assert row["mean_weights"] == pytest.approx(w.mean(0).tolist(), rel=1e-12)
        assert row["dominant"] == int(share.mean(0).argmax())
        noisy, t, target = policy.noised(act[name], g)
        eps = [c(noisy, t, global_cond=obs[name]) for c in policy.components]
        wbar = w.mean(0)
        ablated = sum(wbar[k] * eps[k] for k in range(3))
        assert row["mean_weight_mse"] == pytest.approx(float(((ablated - target) ** 2).mean()), rel=1e-10)
        assert row["composed_mse"] != pytest.approx(row["mean_weight_mse"], rel=1e-6)


def test_distribution_strategies_sum_to_1_and_constant_weights_lose_nothing_to_the_mean_ablation():
    policy = make_mlp_policy(K=4, strategy="fixed", fixed_weights=[0.1, 0.2, 0.3, 0.4])
    obs, act = _data(policy)
    r = fdp.diagnostics.routing(policy, obs, act, generator=torch.Generator().manual_seed(1))
    for row in list(r["tasks"].values()) + [r["overall"]]:
        # The fixed weights are a float32 buffer: each rounded there (half an ulp), summed in float64.
        assert row["weight_sum"] == pytest.approx(1.0, abs=4 * torch.finfo(torch.float32).eps / 2)
        assert row["dominant"] == 3
        assert row["mean_weight_mse"] == pytest.approx(row["composed_mse"], rel=1e-12)


def test_all_zero_tanh_row_has_shares_0():
    policy = make_mlp_policy(K=3, strategy="tanh")
    with torch.no_grad():
        policy.router.net[2].weight.zero_()
        policy.router.net[2].bias.zero_()
    obs, _ = _data(policy)
    r = fdp.diagnostics.routing(policy, obs)
    assert r["overall"]["entropy"] == 0.0 and r["overall"]["top_weight"] == 0.0 and r["overall"]["weight_sum"] == 0.0
