import pytest
import torch

import fdp


def _router(strategy, **kw):
    torch.manual_seed(0)
    return fdp.Router(6, 4, hidden_dim=12, strategy=strategy, **kw).double()


def test_state_dict_keys():
    assert set(fdp.Router(6, 4).state_dict()) >= {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert fdp.Router(6, 4).net[2].weight.shape == (4, 6)  # hidden defaults to cond_dim


def test_soft_is_softmax_of_the_net():
    r = _router("soft")
    c = torch.randn(5, 6, dtype=torch.float64)
    logits = r.net[2](torch.relu(r.net[0](c)))
    torch.testing.assert_close(r(c), torch.softmax(logits, -1))


def test_hard_is_one_hot_argmax():
    r = _router("hard")
    c = torch.randn(7, 6, dtype=torch.float64)
    w = r(c)
    assert torch.equal(w.argmax(-1), r.logits(c).argmax(-1))
    assert torch.equal(w.sum(-1), torch.ones(7, dtype=torch.float64))
    assert set(w.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_topk_renormalises_over_the_k_largest(k):
    r = _router("topk", topk=k)
    c = torch.randn(9, 6, dtype=torch.float64)
    logits, w = r.logits(c), r(c)
    for row in range(9):
        idx = logits[row].topk(k).indices
        expect = torch.zeros(4, dtype=torch.float64)
        expect[idx] = torch.softmax(logits[row, idx], -1)
        torch.testing.assert_close(w[row], expect)
        assert int((w[row] > 0).sum()) == k


def test_fixed_weights():
    r = _router("fixed", fixed_weights=[0.5, 0.25, 0.25, 0.0])
    w = r(torch.randn(3, 6, dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 0.25, 0.0]] * 3, dtype=torch.float64))


def test_bad_strategy_arguments():
    with pytest.raises(ValueError, match="strategy"):
        fdp.Router(6, 4, strategy="greedy")
    with pytest.raises(ValueError, match="topk"):
        fdp.Router(6, 4, strategy="topk", topk=5)
    with pytest.raises(ValueError, match="fixed_weights"):
        fdp.Router(6, 4, strategy="fixed")
    with pytest.raises(ValueError, match="fixed_weights"):
        fdp.Router(6, 4, strategy="fixed", fixed_weights=[0.5, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="fixed_weights"):
        fdp.Router(6, 4, strategy="fixed", fixed_weights=[1.0, 0.0])


def test_bad_cond():
    r = fdp.Router(6, 4)
    with pytest.raises(ValueError, match="cond"):
        r(torch.randn(3, 5))
    bad = torch.randn(3, 6)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="cond"):
        r(bad)


def test_add_output_keeps_existing_logits():
    r = _router("soft")
    c = torch.randn(5, 6, dtype=torch.float64)
    before = r.logits(c)
    r.add_output()
    after = r.logits(c)
    assert r.num_components == 5
    torch.testing.assert_close(after[:, :4], before)
    assert torch.all(after[:, 4] == fdp.router.NEW_COMPONENT_LOGIT)


@pytest.mark.parametrize("strategy,kw", [("soft", {}), ("hard", {}), ("topk", {"topk": 2})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_give_nan_rows(strategy, kw, bad):
    # An argmax or top-k would turn a NaN logit into a confident, finite choice.
    r = _router(strategy, **kw)
    c = torch.randn(5, 6, dtype=torch.float64)
    good = r(c)
    with torch.no_grad():
        r.net[2].bias[2] = bad  # every row's logit 2
        r.net[2].weight[2].zero_()
    w = r(c)
    assert torch.isnan(w).all()
    # Rows are independent: only the rows that hold a bad logit are NaN.
    c2 = torch.randn(4, 6, dtype=torch.float64)
    r2 = _router(strategy, **kw)
    logits = r2.logits(c2)
    logits[1, 3] = bad
    r2.logits = lambda cond: logits
    w2 = r2(c2)
    assert torch.isnan(w2[1]).all() and torch.isfinite(w2[[0, 2, 3]]).all()
    assert torch.isfinite(good).all()


def test_minus_inf_logit_masks_a_component():
    r = _router("hard")
    c = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        r.net[2].bias[0] = -float("inf")
    w = r(c)
    assert torch.isfinite(w).all() and torch.all(w[:, 0] == 0)


def test_tanh_is_signed_and_unnormalised():
    # The FDP authors' composition: w = tanh(logits), no normalisation.
    r = _router("tanh")
    with torch.no_grad():
        r.net[2].bias.copy_(torch.tensor([1.5, -1.5, 0.7, -0.2], dtype=torch.float64))
    c = torch.randn(9, 6, dtype=torch.float64)
    w = r(c)
    torch.testing.assert_close(w, torch.tanh(r.logits(c)), rtol=0, atol=0)
    assert (w < 0).any() and (w > 0).any()
    assert ((w.sum(1) - 1).abs() > 0.1).all()  # no row is a distribution
    assert (w.abs() < 1).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tanh_non_finite_logits_give_nan_rows(bad):
    # tanh would turn an overflowed logit into a confident +-1 (and a NaN into one NaN weight).
    r = _router("tanh")
    c = torch.randn(4, 6, dtype=torch.float64)
    logits = r.logits(c)
    logits[1, 3] = bad
    r.logits = lambda cond: logits
    w = r(c)
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2, 3]]).all()


@pytest.mark.parametrize("strategy", ["soft", "tanh"])
def test_add_output_default_logit_follows_the_strategy(strategy):
    r = _router(strategy)
    c = torch.randn(5, 6, dtype=torch.float64)
    before = r(c)
    r.add_output()
    w = r(c)
    if strategy == "tanh":
        # tanh(0) = 0 exactly: the new weight is exactly 0, the old ones the same up to the grown layer's rounding.
        assert torch.all(r.logits(c)[:, 4] == fdp.router.NEW_COMPONENT_LOGIT_TANH)
        assert torch.all(w[:, 4] == 0)
        eps = torch.finfo(torch.float64).eps
        torch.testing.assert_close(w[:, :4], before, rtol=4 * eps, atol=4 * eps)  # logits of size ~1
    else:
        assert torch.all(r.logits(c)[:, 4] == fdp.router.NEW_COMPONENT_LOGIT)
        assert (w[:, 4] < 1e-8).all()
    r.add_output(initial_logit=0.3)
    assert torch.all(r.logits(c)[:, 5] == 0.3)


def test_reset_parameters_draws_a_new_net_and_keeps_the_strategy():
    r = _router("tanh")
    old = {k: v.clone() for k, v in r.state_dict().items()}
    torch.manual_seed(1)
    r.reset_parameters()
    assert r.strategy == "tanh"
    for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        assert not torch.equal(r.state_dict()[k], old[k]), k
    # nn.Linear's initialisation bound 1/sqrt(fan_in)
    assert r.net[2].weight.abs().max() <= 1 / 12 ** 0.5
