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
    returns, _, logits = rl_primer.reinforce(mdp, 300, 0.1, baseline, seed=0)
    assert sum(returns[-50:]) / 50 > sum(returns[:50]) / 50
    assert (torch.sigmoid(logits[:-1]) > 0.5).all()


def test_baselines_lower_the_variance_of_the_gradient_weights():
    mdp = rl_primer.ChainMDP()
    variance = {b: sum(rl_primer.reinforce(mdp, 200, 0.1, b, seed=1)[1]) for b in ("none", "critic")}
    assert variance["critic"] < variance["none"]
