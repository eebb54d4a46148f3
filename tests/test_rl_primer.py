"""The RL primer's small problems against closed forms."""

from __future__ import annotations

import pytest
import torch

from course_utils import rl_primer


def closed_form_always_right(mdp: rl_primer.ChainMDP) -> list[float]:
    values = []
    for s in range(mdp.n_states):
        k = mdp.n_states - 1 - s  # steps to the goal
        if k == 0:
            values.append(0.0)
            continue
        values.append(sum(mdp.gamma ** i * mdp.step_cost for i in range(k - 1))
                      + mdp.gamma ** (k - 1) * mdp.goal_reward)
    return values


def test_policy_values_and_value_iteration_agree_with_the_closed_form():
    mdp = rl_primer.ChainMDP()
    expected = closed_form_always_right(mdp)
    assert mdp.policy_values([1.0] * mdp.n_states) == pytest.approx(expected)
    optimal, policy = mdp.value_iteration()
    assert optimal == pytest.approx(expected)
    assert policy[:-1] == [1] * (mdp.n_states - 1)


def test_a_random_policy_is_worth_less_than_the_optimal_one():
    mdp = rl_primer.ChainMDP()
    random_values = mdp.policy_values([0.5] * mdp.n_states)
    assert all(r < o for r, o in zip(random_values[:-1], closed_form_always_right(mdp)[:-1]))


def test_exploration_beats_greedy_on_average():
    arms = [0.2, 0.5, 1.0, 0.1]
    greedy = sum(sum(rl_primer.run_bandit(arms, 500, 0.0, seed)) for seed in range(20))
    explore = sum(sum(rl_primer.run_bandit(arms, 500, 0.1, seed)) for seed in range(20))
    assert explore > greedy


@pytest.mark.parametrize("baseline", ["none", "mean", "critic"])
def test_policy_gradient_learns_to_walk_right(baseline):
    mdp = rl_primer.ChainMDP()
    returns, logits = rl_primer.reinforce(mdp, 300, 0.1, baseline, seed=0)
    assert sum(returns[-50:]) / 50 > sum(returns[:50]) / 50
    assert (torch.sigmoid(logits[:-1]) > 0.5).all()


def test_reinforce_estimates_are_unbiased_and_a_baseline_lowers_their_variance():
    """The oracle is the exact gradient of the start value (autograd through the Bellman solve,
    checked here against finite differences). At a policy partway through learning every
    estimator's mean is within 4 standard errors of it, and both baselines cut the variance."""
    mdp = rl_primer.ChainMDP()
    _, logits = rl_primer.reinforce(mdp, 100, 0.1, "none", seed=0)
    exact = rl_primer.exact_policy_gradient(mdp, logits)
    for s in range(mdp.n_states - 1):
        step = torch.zeros(mdp.n_states, dtype=torch.float64)
        step[s] = 1e-6
        value = lambda theta: mdp.policy_values(torch.sigmoid(theta))[0]
        finite = (value(logits.double() + step) - value(logits.double() - step)) / 2e-6
        assert abs(finite - exact[s].item()) < 1e-6
    variance = {}
    for baseline in rl_primer.BASELINES:
        estimates = rl_primer.gradient_estimates(mdp, logits, 1000, baseline, seed=0)
        standard_error = estimates.std(0) / 1000 ** 0.5
        assert ((estimates.mean(0) - exact).abs() <= 4 * standard_error + 1e-12).all(), baseline
        variance[baseline] = estimates.var(0).sum().item()
    assert variance["start value"] < variance["none"] / 2
    assert variance["state value"] < variance["none"] / 2
    with pytest.raises(ValueError, match="baseline must be one of"):
        rl_primer.gradient_estimates(mdp, logits, 1, "mean", seed=0)

