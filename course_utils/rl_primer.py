"""Lesson 09's reinforcement-learning primer: small, exact problems that run in seconds.

- ``run_bandit``: a multi-armed bandit played greedily or epsilon-greedily (exploration versus
  exploitation);
- ``ChainMDP``: a five-state corridor with a policy, its exact state values (solving the Bellman
  equations) and the optimal policy (value iteration);
- ``reinforce``: policy gradient on the corridor, with or without a baseline, or actor-critic
  (a learned value function as the baseline);
- ``gradient_estimates`` / ``exact_policy_gradient``: REINFORCE's per-episode gradient estimates
  at a fixed policy, with and without a baseline, beside the true gradient;
- everything seeded and returning plain numbers for plots.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def run_bandit(arm_means: list[float], steps: int, epsilon: float, seed: int) -> list[float]:
    """Play a Gaussian bandit (unit noise) for ``steps``; return the reward of each step.

    The agent keeps a running mean reward per arm; with probability ``epsilon`` it pulls a random
    arm (explores), otherwise the best-looking one (exploits). ``epsilon=0`` is greedy.
    """
    rng = random.Random(seed)
    counts, estimates, rewards = [0] * len(arm_means), [0.0] * len(arm_means), []
    for _ in range(steps):
        if rng.random() < epsilon:
            arm = rng.randrange(len(arm_means))
        else:
            best = max(estimates)
            arm = rng.choice([a for a, e in enumerate(estimates) if e == best])
        reward = rng.gauss(arm_means[arm], 1.0)
        counts[arm] += 1
        estimates[arm] += (reward - estimates[arm]) / counts[arm]
        rewards.append(reward)
    return rewards


@dataclass(frozen=True)
class ChainMDP:
    """A corridor of ``n_states`` cells. Actions: 0 = left, 1 = right. Reaching the right end pays
    ``goal_reward`` and ends the episode; every other step costs ``step_cost``. The left end is a
    wall. Discount ``gamma``."""

    n_states: int = 5
    goal_reward: float = 1.0
    step_cost: float = -0.05
    gamma: float = 0.95

    def step(self, state: int, action: int) -> tuple[int, float, bool]:
        next_state = min(state + 1, self.n_states - 1) if action == 1 else max(state - 1, 0)
        if next_state == self.n_states - 1:
            return next_state, self.goal_reward, True
        return next_state, self.step_cost, False

    def policy_values(self, p_right) -> list[float]:
        """Exact state values of a stochastic policy, by solving ``V = r + gamma P V``."""
        return self.policy_values_tensor(torch.as_tensor(p_right, dtype=torch.float64)).tolist()

    def policy_values_tensor(self, p_right: torch.Tensor) -> torch.Tensor:
        """``policy_values`` as a tensor that autograd differentiates through (``p_right`` may
        require grad): the exact policy gradient is the gradient of its start value."""
        n = self.n_states
        rows = []
        rewards = []
        for s in range(n):
            row = torch.zeros(n, dtype=torch.float64)
            reward = torch.zeros((), dtype=torch.float64)
            if s < n - 1:  # the goal is terminal: value 0
                for action, prob in ((1, p_right[s]), (0, 1 - p_right[s])):
                    nxt, r, done = self.step(s, action)
                    reward = reward + prob * r
                    if not done:
                        row = row + prob * torch.nn.functional.one_hot(
                            torch.tensor(nxt), n).to(torch.float64)
            rows.append(row)
            rewards.append(reward)
        transition, reward = torch.stack(rows), torch.stack(rewards)
        return torch.linalg.solve(torch.eye(n, dtype=torch.float64) - self.gamma * transition, reward)

    def value_iteration(self, sweeps: int = 200) -> tuple[list[float], list[int]]:
        """Optimal values and a greedy optimal policy (1 = right)."""
        values = [0.0] * self.n_states
        for _ in range(sweeps):
            new = list(values)
            for s in range(self.n_states - 1):
                new[s] = max(r + (0 if done else self.gamma * values[nxt])
                             for nxt, r, done in (self.step(s, a) for a in (0, 1)))
            values = new
        policy = []
        for s in range(self.n_states):
            q = [r + (0 if done else self.gamma * values[nxt])
                 for nxt, r, done in (self.step(s, a) for a in (0, 1))]
            policy.append(int(q[1] >= q[0]))
        return values, policy


def _episode(mdp: ChainMDP, logits: torch.Tensor, rng: random.Random, max_steps: int = 50):
    state, steps = 0, []
    for _ in range(max_steps):
        p_right = torch.sigmoid(logits[state]).item()
        action = int(rng.random() < p_right)
        next_state, reward, done = mdp.step(state, action)
        steps.append((state, action, reward, next_state, done))
        state = next_state
        if done:
            break
    return steps


def _returns(rewards: list[float], gamma: float) -> list[float]:
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def reinforce(mdp: ChainMDP, episodes: int, learning_rate: float, baseline: str, seed: int
              ) -> tuple[list[float], torch.Tensor]:
    """Policy gradient on the corridor with a per-state policy ``P(right | s) = sigmoid(theta_s)``.

    ``baseline``:
    - ``"none"``: REINFORCE (Williams 1992), each step weighted by the return that followed;
    - ``"mean"``: REINFORCE minus a running mean of returns, a baseline that lowers variance
      without biasing the gradient;
    - ``"critic"``: actor-critic, weighted by the TD error ``r + gamma V(s') - V(s)`` of a state
      value ``V`` learned alongside (the critic).
    Returns each episode's undiscounted return and the final policy logits. (How much a baseline
    lowers the variance of the gradient estimate: ``gradient_estimates``.)
    """
    rng = random.Random(seed)
    logits = torch.zeros(mdp.n_states, dtype=torch.float64, requires_grad=True)
    values = [0.0] * mdp.n_states
    running_mean = 0.0
    episode_returns = []
    for _ in range(episodes):
        steps = _episode(mdp, logits.detach(), rng)
        returns = _returns([r for _, _, r, _, _ in steps], mdp.gamma)
        weights = []
        for (state, _, reward, next_state, done), g in zip(steps, returns):
            if baseline == "mean":
                weights.append(g - running_mean)
            elif baseline == "critic":
                td_error = reward + (0.0 if done else mdp.gamma * values[next_state]) - values[state]
                values[state] += 0.2 * td_error
                weights.append(td_error)
            else:
                weights.append(g)
        running_mean += 0.05 * (returns[0] - running_mean)
        loss = torch.zeros((), dtype=torch.float64)
        for (state, action, _, _, _), weight in zip(steps, weights):
            log_p = torch.nn.functional.logsigmoid(logits[state] if action else -logits[state])
            loss = loss - log_p * weight
        logits.grad = None
        loss.backward()
        with torch.no_grad():
            logits -= learning_rate * logits.grad
        episode_returns.append(sum(r for _, _, r, _, _ in steps))
    return episode_returns, logits.detach()


def exact_policy_gradient(mdp: ChainMDP, logits: torch.Tensor) -> torch.Tensor:
    """The true gradient of the start state's value with respect to the policy logits
    (``P(right | s) = sigmoid(theta_s)``), by differentiating the exact Bellman solution."""
    theta = logits.detach().to(torch.float64).clone().requires_grad_(True)
    mdp.policy_values_tensor(torch.sigmoid(theta))[0].backward()
    return theta.grad


BASELINES = ("none", "start value", "state value")


def gradient_estimates(mdp: ChainMDP, logits: torch.Tensor, episodes: int, baseline: str,
                       seed: int) -> torch.Tensor:
    """REINFORCE's estimate of the policy gradient from each of ``episodes`` episodes played with
    the fixed policy ``sigmoid(logits)``, ``[episodes, n_states]``.

    One episode's estimate is ``sum_t gamma^t grad log pi(a_t | s_t) (G_t - b(s_t))`` (Williams
    1992; Sutton & Barto 2018, section 13.4), ``G_t`` the discounted return from step ``t``. The
    baseline ``b``: ``"none"``: 0; ``"start value"``: one number, the policy's exact value of the
    start state; ``"state value"``: the exact value ``V(s_t)`` of the state the action was taken
    in. A baseline that does not depend on the action leaves the expected estimate unchanged (the
    true gradient, ``exact_policy_gradient``) and changes its variance across episodes.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, not {baseline!r}")
    rng = random.Random(seed)
    p_right = torch.sigmoid(logits.detach().to(torch.float64))
    values = mdp.policy_values(p_right)
    estimates = torch.zeros(episodes, mdp.n_states, dtype=torch.float64)
    for e in range(episodes):
        steps = _episode(mdp, logits.detach(), rng, max_steps=200)
        returns = _returns([r for _, _, r, _, _ in steps], mdp.gamma)
        for t, ((state, action, _, _, _), g) in enumerate(zip(steps, returns)):
            b = {"none": 0.0, "start value": values[0], "state value": values[state]}[baseline]
            # d/d theta_s of log sigmoid(+-theta_s): 1 - p for right, -p for left
            score = (1.0 - p_right[state].item()) if action else -p_right[state].item()
            estimates[e, state] += mdp.gamma ** t * score * (g - b)
    return estimates

