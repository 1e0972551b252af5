import pytest
import torch

import fdp
from helpers import make_mlp_policy


def test_composition_is_the_weighted_sum(mlp_policy):
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    c = torch.randn(4, 5, dtype=torch.float64)
    w = mlp_policy.weights(c)
    expect = torch.zeros_like(x)
    for b in range(4):
        for k, comp in enumerate(mlp_policy.components):
            expect[b] += w[b, k] * comp(x[b:b + 1], 17, global_cond=c[b:b + 1])[0]
    torch.testing.assert_close(mlp_policy(x, 17, global_cond=c), expect)
    # Explicit weights bypass the router.
    w1 = torch.zeros(4, 3, dtype=torch.float64)
    w1[:, 1] = 1
    torch.testing.assert_close(mlp_policy(x, 17, global_cond=c, weights=w1),
                               mlp_policy.components[1](x, 17, global_cond=c))


def test_k_mismatch_is_refused():
    comps = [fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16) for _ in range(2)]
    with pytest.raises(ValueError, match="K must match"):
        fdp.FactorizedPolicy(comps, fdp.Router(5, 3), 4, 3)
    with pytest.raises(ValueError, match="horizon"):
        fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 8, 3)
    with pytest.raises(TypeError, match="router"):
        fdp.FactorizedPolicy(comps, torch.nn.Linear(5, 2), 4, 3)


def test_bad_inputs(mlp_policy):
    c = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="sample"):
        mlp_policy(torch.randn(4, 4, 2, dtype=torch.float64), 3, global_cond=c)
    with pytest.raises(ValueError, match="global_cond"):
        mlp_policy(torch.randn(4, 4, 3, dtype=torch.float64), 3, global_cond=c[:3])
    bad = c.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="global_cond"):
        mlp_policy(torch.randn(4, 4, 3, dtype=torch.float64), 3, global_cond=bad)


@pytest.mark.parametrize("strategy", ["soft", "tanh", "hard", "topk"])
def test_add_component_leaves_outputs_unchanged(strategy):
    policy = make_mlp_policy(K=3, dtype=torch.float32, strategy=strategy)
    x = torch.randn(6, 4, 3)
    c = torch.randn(6, 5)
    before = policy(x, 42, global_cond=c)
    idx = policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16))
    assert idx == 3 and policy.num_components == 4 and policy.router.num_components == 4
    assert policy.is_new.tolist() == [False, False, False, True]
    if strategy == "tanh":
        # tanh(0) = 0: the new component is left out of every row.
        assert torch.all(policy.weights(c)[:, 3] == 0)
    # exp(-20) relative weight, or 0 under tanh: unchanged to float32 rounding (the grown router layer's matmul
    # may sum the old logits in another order).
    torch.testing.assert_close(policy(x, 42, global_cond=c), before, rtol=1e-6, atol=1e-7)


def _new_component_grads(policy):
    policy.zero_grad()
    loss = policy.loss(torch.rand(8, 4, 3) * 2 - 1, torch.randn(8, 5), generator=torch.Generator().manual_seed(0))
    loss.backward()
    return abs(float(policy.router.net[2].bias.grad[-1])), float(policy.components[-1].out.weight.grad.abs().max())


def test_adapt_starts_the_new_component_where_adam_can_train_it():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16))
    policy.requires_grad_(True)
    # At the output-preserving logit the gradients sit below Adam's eps (1e-8):
    # the new component would never train.
    assert max(_new_component_grads(policy)) < 1e-8
    policy.adapt("router+new")
    assert float(policy.router.net[2].bias[-1].detach()) == fdp.policy.ADAPT_START_LOGIT
    assert min(_new_component_grads(policy)) > 1e-5
    # Only once: a second adapt() keeps what training has done since.
    with torch.no_grad():
        policy.router.net[2].bias[-1] = 0.5
    policy.adapt("router+new")
    assert float(policy.router.net[2].bias[-1].detach()) == 0.5


def test_adapt_starts_a_tanh_component_where_it_trains():
    policy = make_mlp_policy(K=2, dtype=torch.float32, strategy="tanh")
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16))
    policy.requires_grad_(True)
    # Weight exactly 0: the composition leaves the component out, so nothing reaches it or its logit.
    assert _new_component_grads(policy) == (0.0, 0.0)
    policy.adapt("router+new")
    assert float(policy.router.net[2].bias[-1].detach()) == pytest.approx(fdp.policy.ADAPT_START_LOGIT_TANH)
    assert min(_new_component_grads(policy)) > 1e-5
    # A chosen logit counts as the caller's decision, under tanh too.
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16), initial_logit=-0.5)
    policy.adapt("router+new")
    assert float(policy.router.net[2].bias[-1].detach()) == -0.5


def test_specialisation_terms_are_refused_under_tanh():
    policy = make_mlp_policy(K=2, dtype=torch.float32, strategy="tanh")
    a, c = torch.rand(4, 4, 3) * 2 - 1, torch.randn(4, 5)
    for kw in ({"component_weight": 1.0}, {"balance_weight": 0.1}):
        with pytest.raises(ValueError, match="under the router strategy 'tanh'"):
            policy.loss(a, c, **kw)
    assert torch.isfinite(policy.loss(a, c))  # the composed MSE alone is the authors' objective


def test_add_component_as_the_authors_do_it_copies_and_resets_the_router():
    policy = make_mlp_policy(K=3, dtype=torch.float32, strategy="tanh")
    policy.components[1].requires_grad_(False)
    router_before = {k: v.clone() for k, v in policy.router.state_dict().items()}
    torch.manual_seed(5)
    idx = policy.add_component(source=1, reset_router=True)
    assert idx == 3 and policy.is_new.tolist() == [False, False, False, True]
    new, src = policy.components[3], policy.components[1]
    assert new is not src
    for (n, p), (_, q) in zip(new.state_dict().items(), src.state_dict().items()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    assert not any(p.requires_grad for p in new.parameters())  # copied with its source's flags
    # The router's whole net is drawn afresh (4 outputs now), from the global generator.
    assert policy.router.net[2].out_features == 4 and policy.router.strategy == "tanh"
    for k in ("net.0.weight", "net.0.bias"):
        assert not torch.equal(policy.router.state_dict()[k], router_before[k]), k
    assert not torch.equal(policy.router.net[2].weight[:3], router_before["net.2.weight"])
    torch.manual_seed(5)
    again = make_mlp_policy(K=3, dtype=torch.float32, strategy="tanh")
    torch.manual_seed(5)
    again.add_component(source=1, reset_router=True)
    assert all(torch.equal(a, b) for a, b in zip(again.router.state_dict().values(),
                                                  policy.router.state_dict().values()))
    # Nothing awaits a start logit: adapt leaves the fresh router as drawn, and trains the copy.
    bias = policy.router.net[2].bias.detach().clone()
    params = policy.adapt("router+new")
    assert torch.equal(policy.router.net[2].bias.detach(), bias)
    assert all(p.requires_grad for p in new.parameters())
    assert not any(p.requires_grad for c in list(policy.components)[:3] for p in c.parameters())
    assert {id(p) for p in params} == {id(p) for p in list(new.parameters()) + list(policy.router.parameters())}
    # The copy trains apart from its source.
    opt = torch.optim.Adam(params, lr=1e-2)
    policy.loss(torch.rand(8, 4, 3) * 2 - 1, torch.randn(8, 5), generator=torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert not torch.equal(new.out.weight, src.out.weight)


def test_add_component_copy_without_reset_keeps_outputs_and_the_default_source_is_0():
    policy = make_mlp_policy(K=2, dtype=torch.float32, strategy="soft")
    x, c = torch.randn(6, 4, 3), torch.randn(6, 5)
    before = policy(x, 42, global_cond=c)
    policy.add_component()
    assert all(torch.equal(p, q) for p, q in zip(policy.components[2].parameters(),
                                                  policy.components[0].parameters()))
    torch.testing.assert_close(policy(x, 42, global_cond=c), before, rtol=1e-6, atol=1e-7)
    policy.adapt("router+new")  # fdp's start logit, as for any new component at the default logit
    assert float(policy.router.net[2].bias[-1].detach()) == fdp.policy.ADAPT_START_LOGIT


def test_add_component_copy_arguments_are_checked(mlp_policy):
    for bad in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match="`source`"):
            mlp_policy.add_component(source=bad)
    with pytest.raises(ValueError, match="`initial_logit` must be None with `reset_router=True`"):
        mlp_policy.add_component(initial_logit=-3.0, reset_router=True)
    with pytest.raises(TypeError, match="`reset_router`"):
        mlp_policy.add_component(reset_router=1)
    assert mlp_policy.num_components == 3  # nothing was added by a refused call


def test_adapt_keeps_a_chosen_initial_logit_and_router_mode_keeps_outputs():
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16), initial_logit=-6.0)
    policy.adapt("router+new")
    assert float(policy.router.net[2].bias[-1].detach()) == -6.0
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16))
    policy.adapt("router")  # the new component does not train: leave its weight at ~0
    assert float(policy.router.net[2].bias[-1].detach()) == fdp.router.NEW_COMPONENT_LOGIT


def test_add_component_checks_the_module(mlp_policy):
    with pytest.raises(ValueError, match="horizon"):
        mlp_policy.add_component(fdp.MLPDenoiser(3, 8, global_cond_dim=5, hidden_dim=16))
    with pytest.raises(TypeError, match="module"):
        mlp_policy.add_component("not a module")


@pytest.mark.parametrize("mode", ["router", "router+new", "full"])
def test_adapt_modes_train_only_what_they_say(mode):
    policy = make_mlp_policy(K=2, dtype=torch.float32)
    policy.add_component(fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16))
    params = policy.adapt(mode)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        policy.loss(torch.rand(8, 4, 3) * 2 - 1, torch.randn(8, 5), generator=gen).backward()
        opt.step()
    expect_trainable = {
        "router": lambda n: n.startswith("router."),
        "router+new": lambda n: n.startswith("router.") or n.startswith("components.2."),
        "full": lambda n: True,
    }[mode]
    assert set(trainable) == {n for n, _ in policy.named_parameters() if expect_trainable(n)}
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(dict(policy.named_parameters())[n], v) for n, v in trainable.items())
    with pytest.raises(ValueError, match="mode"):
        policy.adapt("everything")


def test_freeze_components_are_bit_identical_after_steps():
    policy = make_mlp_policy(K=3, dtype=torch.float32)
    policy.freeze_components([0, 2])
    snap = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        policy.loss(torch.rand(8, 4, 3) * 2 - 1, torch.randn(8, 5), generator=gen).backward()
        opt.step()
    for n, p in policy.named_parameters():
        if n.startswith(("components.0.", "components.2.")):
            assert torch.equal(p, snap[n]), n
    assert not torch.equal(policy.components[1].out.weight, snap["components.1.out.weight"])
    with pytest.raises(ValueError, match="indices"):
        policy.freeze_components([7])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_is_mse_against_the_scheduler_target(prediction_type):
    policy = make_mlp_policy(K=2, dtype=torch.float64)
    policy.noise_scheduler = fdp.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                               prediction_type=prediction_type)
    actions = torch.rand(6, 4, 3, dtype=torch.float64) * 2 - 1
    c = torch.randn(6, 5, dtype=torch.float64)
    loss = policy.loss(actions, c, generator=torch.Generator().manual_seed(3))
    # Replay the same draws by hand.
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(actions.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (6,), generator=g)
    noisy = policy.noise_scheduler.add_noise(actions, noise, t)
    target = {"epsilon": noise, "sample": actions,
              "v_prediction": policy.noise_scheduler.get_velocity(actions, noise, t)}[prediction_type]
    expect = ((policy(noisy, t, global_cond=c) - target) ** 2).mean()
    torch.testing.assert_close(loss, expect)


def test_components_that_ignore_the_observation():
    torch.manual_seed(0)
    comps = [fdp.MLPDenoiser(3, 4, hidden_dim=16), fdp.MLPDenoiser(3, 4, global_cond_dim=5, hidden_dim=16)]
    policy = fdp.FactorizedPolicy(comps, fdp.Router(5, 2), 4, 3).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    c = torch.randn(2, 5, dtype=torch.float64)
    w = policy.weights(c)
    expect = w[:, 0, None, None] * comps[0](x, 9) + w[:, 1, None, None] * comps[1](x, 9, global_cond=c)
    torch.testing.assert_close(policy(x, 9, global_cond=c), expect)
    with pytest.raises(ValueError, match="global_cond_dim"):
        fdp.FactorizedPolicy([fdp.MLPDenoiser(3, 4, global_cond_dim=6, hidden_dim=16)], fdp.Router(5, 1), 4, 3)


def _loss_inputs(B=6, seed=3):
    actions = torch.rand(B, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    c = torch.randn(B, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return actions, c


def test_loss_without_extra_terms_is_bit_identical_to_the_paper_loss():
    policy = make_mlp_policy(K=3)
    actions, c = _loss_inputs()
    base = policy.loss(actions, c, generator=torch.Generator().manual_seed(5))
    zero = policy.loss(actions, c, generator=torch.Generator().manual_seed(5), component_weight=0.0, balance_weight=0)
    assert torch.equal(base, zero)
    noisy, t, target = policy.noised(actions, torch.Generator().manual_seed(5))
    assert torch.equal(base, ((policy(noisy, t, global_cond=c) - target) ** 2).mean())


def test_specialisation_terms_match_a_hand_computation():
    policy = make_mlp_policy(K=3)
    actions, c = _loss_inputs()
    loss = policy.loss(actions, c, generator=torch.Generator().manual_seed(5), component_weight=0.7,
                       balance_weight=0.3)
    noisy, t, target = policy.noised(actions, torch.Generator().manual_seed(5))
    w = policy.weights(c)
    eps = [comp(noisy, t, global_cond=c) for comp in policy.components]
    composed = sum(w[:, k, None, None] * eps[k] for k in range(3))
    mse = ((composed - target) ** 2).mean()
    per_comp = sum(w[b, k] * ((eps[k][b] - target[b]) ** 2).mean() for b in range(6) for k in range(3)) / 6
    wbar = w.mean(0)
    balance = 3 * (wbar ** 2).sum() - 1
    torch.testing.assert_close(loss, mse + 0.7 * per_comp + 0.3 * balance)


def test_balance_term_is_zero_for_uniform_use_and_k_minus_1_for_collapse():
    policy = make_mlp_policy(K=4)
    actions, c = _loss_inputs(B=8)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = policy.loss(actions, c, generator=g())
    policy.router.set_strategy("fixed", fixed_weights=[0.25] * 4)
    torch.testing.assert_close(policy.loss(actions, c, generator=g(), balance_weight=2.0),
                               policy.loss(actions, c, generator=g()))
    policy.router.set_strategy("fixed", fixed_weights=[0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(policy.loss(actions, c, generator=g(), balance_weight=2.0)
                               - policy.loss(actions, c, generator=g()), torch.tensor(2.0 * 3, dtype=base.dtype))


def test_component_term_sends_the_router_towards_the_better_component():
    # Component 0 predicts the target far better than component 1: the per-component term's
    # gradient must lower the router's preference for 1 (raise logit 0 relative to logit 1).
    policy = make_mlp_policy(K=2)
    actions, c = _loss_inputs(B=16)
    noisy, t, target = policy.noised(actions, torch.Generator().manual_seed(2))

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, sample, timestep, local_cond=None, global_cond=None):
            return self.out

    policy.components = torch.nn.ModuleList([Fixed(target + 0.01), Fixed(torch.zeros_like(target))])
    policy.loss(actions, c, generator=torch.Generator().manual_seed(2), component_weight=1.0).backward()
    gb = policy.router.net[2].bias.grad
    assert gb[0] < 0 < gb[1]


def test_topk_training_reaches_the_router_through_the_kept_logits_only():
    policy = make_mlp_policy(K=4, strategy="topk", topk=2)
    actions, c = _loss_inputs(B=1)
    logits = policy.router.logits(c)[0]
    kept = set(logits.topk(2).indices.tolist())
    policy.loss(actions, c, generator=torch.Generator().manual_seed(0), component_weight=1.0,
                balance_weight=0.1).backward()
    g = policy.router.net[2].bias.grad
    assert all(g[k] != 0 for k in kept)
    assert all(g[k] == 0 for k in set(range(4)) - kept)
    assert policy.router.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["component_weight", "balance_weight"])
@pytest.mark.parametrize("value,exc", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                       ("1", TypeError), (True, TypeError), (None, TypeError)])
def test_loss_weights_are_checked(name, value, exc):
    policy = make_mlp_policy(K=2)
    actions, c = _loss_inputs()
    with pytest.raises(exc, match=f"`{name}` must be a non-negative float"):
        policy.loss(actions, c, **{name: value})
