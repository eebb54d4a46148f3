"""A compact PPO for causal language models (lesson 09); trl 1.x no longer ships a PPO trainer.

Each piece is a plain function over tensors, unit-tested against a loop-by-loop reference (lesson
09 writes ``masked_mean``, ``kl_shaped_rewards``, ``gae``, ``ppo_policy_loss`` and ``ppo_step`` in
its cells; ``tests/test_lesson_code.py`` keeps both copies equal):

- ``kl_shaped_rewards``: per-token rewards, ``-beta * (log pi - log pi_ref)`` at every response
  token plus the reward model's score at the last one;
- ``gae``: generalized advantage estimation (Schulman et al. 2016), returns and advantages;
- ``ppo_policy_loss`` / ``ppo_value_loss``: the clipped objectives (Schulman et al. 2017);
- ``PPOConfig`` / ``ppo_step`` / ``train_ppo``: rollouts, scoring, several PPO epochs per batch,
  on a LoRA policy whose reference is the same model with the adapter switched off;
- ``make_ppo_policy``, ``ppo_prompts``, ``build_ppo_model``: the lesson's recipe in one call, for
  ``pipeline.ensure_stage("ppo")``.

Shapes: ``[batch, time]`` over response tokens, with a ``mask`` of 1 for real tokens and 0 for
padding after the response ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from course_utils.course import data
from course_utils.course.chat import render_chat
from course_utils.course.models import load_tokenizer
from course_utils.course.recipes import load_recipe, ran_with
from course_utils.reward_modeling import load_reward_model, reward_model_scorer
from course_utils.rollouts import decode_responses, generate_responses, response_logprobs


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
                  ) -> torch.Tensor:
    """Normalize to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO on a language model (Ziegler et al. 2019; Ouyang et al. 2022).

    Every response token gets ``-kl_coef * (log pi(token) - log pi_ref(token))``, a sample of the
    KL divergence from the reference that keeps the policy close to it; the last real token also
    gets the reward model's ``scores`` for the whole response. Returns ``(rewards, kl)``, both
    ``[batch, time]`` and zero on padding.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(dim=1) - 1
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over ``[batch, time]`` (Schulman et al. 2016).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed backwards from the end; the value after the last real token is 0 (the episode ends).
    Returns ``(advantages, returns)`` with ``returns = advantages + values``, zero on padding.
    """
    if mask is None:
        mask = torch.ones_like(rewards)
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss (Schulman et al. 2017, eq. 7), to minimize.

    ``ratio = exp(log pi - log pi_old)``; the objective per token is
    ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, so a step gains nothing from moving
    the ratio beyond the clip range in the direction the advantage favours. Returns
    ``(loss, clip_fraction)``: the negated masked mean, and the share of tokens where the clipped
    term was the smaller one (the update was held back).
    """
    if mask is None:
        mask = torch.ones_like(logprobs)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The clipped value loss of PPO implementations for RLHF (Ziegler et al. 2019):
    ``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``, masked mean."""
    if mask is None:
        mask = torch.ones_like(values)
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass(frozen=True)
class PPOConfig:
    """Settings of ``train_ppo``/``ppo_step``; the values live in the ``ppo`` recipe
    (``configs/recipes/<profile>/ppo.yaml``), whose comments say what each one does:
    ``PPOConfig.from_recipe(recipe)``."""

    steps: int                # PPO iterations
    batch_size: int           # prompts per rollout
    ppo_epochs: int           # optimization passes over each rollout
    minibatch_size: int
    learning_rate: float      # the policy's LoRA weights
    value_learning_rate: float  # the value head
    kl_coef: float            # beta: the per-token KL penalty
    clip_eps: float           # policy ratio clip
    value_clip_eps: float
    value_coef: float
    gamma: float
    lam: float
    max_new_tokens: int
    max_prompt_length: int    # longer training prompts are left out (ppo_prompts)
    temperature: float
    whiten_advantages: bool
    max_grad_norm: float
    seed: int

    @classmethod
    def from_recipe(cls, recipe) -> PPOConfig:
        return cls(**recipe.training, seed=recipe.seed)


class ValueHead(torch.nn.Module):
    """A scalar value per position from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def ppo_step(policy, value_head: ValueHead, optimizer, tokenizer, prompts: list[str],
             score_fn, config: PPOConfig, step: int) -> dict:
    """One PPO iteration: roll out ``prompts``, score, then ``ppo_epochs`` passes of minibatch
    updates on the clipped policy and value losses. Returns the step's statistics.

    ``policy`` is a peft model; its reference is the same model with the adapter disabled, so
    no second copy of the weights is needed. ``score_fn(prompts, responses) -> tensor`` scores
    decoded responses (the reward model).
    """
    policy.eval()
    input_ids, attention_mask, mask, start = generate_responses(
        policy, tokenizer, prompts, config.max_new_tokens, config.temperature,
        generator_seed=config.seed * 100_003 + step)
    responses = decode_responses(tokenizer, input_ids, mask, start)
    mask = mask.float()
    with torch.no_grad():
        old_logprobs, old_values = response_logprobs(policy, input_ids, attention_mask, start,
                                                     value_head, config.temperature)
        with policy.disable_adapter():
            ref_logprobs, _ = response_logprobs(policy, input_ids, attention_mask, start,
                                                temperature=config.temperature)
        scores = score_fn(prompts, responses).float().to(old_logprobs.device)
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, config.kl_coef)
        advantages, returns = gae(rewards, old_values, config.gamma, config.lam, mask)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask

    policy.train()
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
    n = input_ids.shape[0]
    order_generator = torch.Generator().manual_seed(config.seed * 7_919 + step)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n, generator=order_generator)
        for begin in range(0, n, config.minibatch_size):
            idx = order[begin:begin + config.minibatch_size].to(input_ids.device)
            logprobs, values = response_logprobs(policy, input_ids[idx], attention_mask[idx],
                                                 start, value_head, config.temperature)
            policy_loss, clip_fraction = ppo_policy_loss(logprobs, old_logprobs[idx],
                                                         advantages[idx], config.clip_eps,
                                                         mask[idx])
            value_loss = ppo_value_loss(values, old_values[idx], returns[idx],
                                        config.value_clip_eps, mask[idx])
            loss = policy_loss + config.value_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]],
                config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["clip_fraction"].append(clip_fraction.item())
                stats["approx_kl"].append(
                    masked_mean(old_logprobs[idx] - logprobs, mask[idx]).item())
    policy.eval()
    lengths = mask.sum(dim=1)
    summary = {key: sum(v) / len(v) for key, v in stats.items()}
    summary.update({
        "score": scores.mean().item(),
        "kl": kl.sum(dim=1).mean().item(),  # summed over the response: KL per sequence
        "response_length": lengths.mean().item(),
        "entropy_proxy": -masked_mean(old_logprobs, mask).item(),
        "responses": responses,
    })
    return summary


def ppo_optimizer(policy, value_head: ValueHead, config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable (LoRA) weights and the value head, each at its own rate.

    The value head starts at zero; at the policy's small rate it would still predict about 0 after
    the whole run, so every advantage would be the raw, batch-whitened score, and prompts whose
    replies always score low (here: factual questions next to refusals) would be pushed down.
    """
    return torch.optim.AdamW([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.learning_rate},
        {"params": list(value_head.parameters()), "lr": config.value_learning_rate},
    ])


def train_ppo(policy, value_head: ValueHead, tokenizer, prompts: list[str], score_fn,
              config: PPOConfig, progress: bool = True, step_fn=None) -> list[dict]:
    """``config.steps`` PPO iterations, each on ``config.batch_size`` prompts drawn (seeded) from
    ``prompts``. Returns the statistics of every step, responses included. ``step_fn`` runs one
    iteration: ``ppo_step`` unless given (lesson 09 passes the one its cell defines).
    """
    step_fn = step_fn or ppo_step
    from tqdm.auto import tqdm

    optimizer = ppo_optimizer(policy, value_head, config)
    history = []
    bar = tqdm(range(config.steps), desc="PPO", disable=not progress)
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        chosen = torch.randperm(len(prompts), generator=generator)[:config.batch_size]
        stats = step_fn(policy, value_head, optimizer, tokenizer, [prompts[i] for i in chosen],
                        score_fn, config, step)
        history.append(stats)
        bar.set_postfix(score=f"{stats['score']:.2f}", kl=f"{stats['kl']:.2f}")
    return history


def make_ppo_policy(sft_dir, profile, recipe):
    """The SFT model with a fresh LoRA adapter (the recipe's ``lora`` section; the policy; with the
    adapter off it is the frozen reference) and a zero-initialised ``ValueHead``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    base = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=recipe.torch_dtype())
    policy = get_peft_model(base.to(profile.device),
                            LoraConfig(**recipe.lora, task_type="CAUSAL_LM"))
    value_head = ValueHead(base.config.hidden_size).to(profile.device)
    return policy, value_head


def ppo_prompts(profile, tokenizer, max_prompt_length: int, verbose: bool = True
                ) -> tuple[list[str], dict]:
    """The rendered prompts PPO trains on (each training pair's prompt once, those longer than
    ``max_prompt_length`` tokens left out and counted) and the conversation of every training and
    held-out prompt, which ``reward_model_scorer`` looks replies up in."""

    train_pairs = data.load_preference_dataset(profile, "train")
    test_pairs = data.load_preference_dataset(profile, "test")
    conversations = {render_chat(row["prompt"], add_generation_prompt=True): row["prompt"]
                     for row in list(train_pairs) + list(test_pairs)}
    every_prompt = list(dict.fromkeys(render_chat(row["prompt"], add_generation_prompt=True)
                                      for row in train_pairs))
    train_prompts = [p for p in every_prompt
                     if len(tokenizer(p, add_special_tokens=False).input_ids) < max_prompt_length]
    if verbose:
        print(f"PPO prompts: {len(train_prompts)} of {len(every_prompt)}; "
              f"{len(every_prompt) - len(train_prompts)} longer than {max_prompt_length} tokens "
              "left out")
    if not train_prompts:
        raise ValueError(f"no training prompt is shorter than {max_prompt_length} tokens; raise "
                         "training.max_prompt_length in the ppo recipe")
    return train_prompts, conversations


def build_ppo_model(profile, recipe, parents: dict[str, Path], verbose: bool = True):
    """Lesson 09's recipe in one call: the course PPO on the SFT model against lesson 08's reward
    model, the adapter merged. Returns ``(model, tokenizer, what the run used)``."""

    sft_dir, reward_dir = parents["sft"], parents["reward"]
    tokenizer = load_tokenizer(sft_dir)
    reward_model = load_reward_model(reward_dir, tokenizer, recipe.torch_dtype()).to(
        profile.device).eval()
    train_prompts, conversations = ppo_prompts(profile, tokenizer,
                                               recipe.training["max_prompt_length"], verbose)
    policy, value_head = make_ppo_policy(sft_dir, profile, recipe)
    config = PPOConfig.from_recipe(recipe)
    train_ppo(policy, value_head, tokenizer, train_prompts,
              reward_model_scorer(reward_model, tokenizer, conversations, load_recipe(
                  "evaluation", profile).scoring["reward_replies_batch_size"]), config,
              progress=verbose)
    used = ran_with(recipe, config, policy)
    return policy.merge_and_unload(), tokenizer, used
