"""Reward modeling, a compact PPO and DPO for causal language models (lessons 08-10).

trl 1.x no longer ships a PPO trainer, so the course writes its own, small enough to read in one
sitting. Each piece is a plain function over tensors, unit-tested against a loop-by-loop
reference:

- ``bradley_terry_loss`` / ``pairwise_accuracy``: the reward model's objective and metric;
- ``combine_rewards``: Llama 2's rule for a helpfulness and a safety reward model;
- ``kl_shaped_rewards``: per-token rewards, ``-beta * (log pi - log pi_ref)`` at every response
  token plus the reward model's score at the last one;
- ``gae``: generalized advantage estimation (Schulman et al. 2016), returns and advantages;
- ``ppo_policy_loss`` / ``ppo_value_loss``: the clipped objectives (Schulman et al. 2017);
- ``PPOConfig`` / ``ppo_step``: rollouts, scoring, several PPO epochs per batch, on a LoRA policy
  whose reference is the same model with the adapter switched off.

Shapes: ``[batch, time]`` over response tokens, with a ``mask`` of 1 for real tokens and 0 for
padding after the response ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course_utils.chat import padding_side, truncation_side

# --- reward modeling ---------------------------------------------------------------------------

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                       ) -> torch.Tensor:
    """Mean negative log-likelihood that the chosen response wins under Bradley-Terry:
    ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``, so the loss is
    ``-log sigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, eq. 1), averaged over pairs."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs where the chosen response gets the strictly higher reward."""
    return (chosen_rewards > rejected_rewards).float().mean().item()


def combine_rewards(helpfulness: torch.Tensor, safety: torch.Tensor,
                    safety_threshold: float = 0.15, unsafe_prompt: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Llama 2's combination of two reward models (Touvron et al. 2023, section 3.2.2).

    Scores are first mapped to (0, 1) with a sigmoid. Where the prompt is known to be unsafe, or
    the safety model's score falls below ``safety_threshold``, the safety score is used
    (safety first); elsewhere the helpfulness score. Returned as logits again (the paper then
    whitens them), so the result lives on the scale PPO uses.
    """
    help_p, safe_p = torch.sigmoid(helpfulness.float()), torch.sigmoid(safety.float())
    use_safety = safe_p < safety_threshold
    if unsafe_prompt is not None:
        use_safety = use_safety | unsafe_prompt.bool()
    combined = torch.where(use_safety, safe_p, help_p).clamp(1e-6, 1 - 1e-6)
    return torch.log(combined) - torch.log1p(-combined)


# --- PPO building blocks -----------------------------------------------------------------------

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


# --- the PPO loop ------------------------------------------------------------------------------

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


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_start: int, value_head: ValueHead | None = None,
                      temperature: float = 1.0):
    """Log-probabilities of the response tokens (positions ``response_start`` onwards) under
    ``model``, and the value head's estimates at the positions that predict them.

    Position ``t - 1`` of the logits predicts token ``t``, hence the shift. Returns
    ``(logprobs [batch, T], values [batch, T] or None)``.
    """
    # positions count real tokens only, as generate() does for left-padded prompts; without
    # them the policy trained here would differ from the one that sampled
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=value_head is not None)
    logits = output.logits[:, response_start - 1:-1].float() / temperature
    targets = input_ids[:, response_start:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    values = None
    if value_head is not None:
        values = value_head(output.hidden_states[-1][:, response_start - 1:-1])
    return logprobs, values


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int,
                       temperature: float, generator_seed: int | None = None,
                       max_prompt_length: int | None = None):
    """Sample responses to ``prompts`` (left-padded), cut after the first ``</s>``.

    Returns ``(input_ids, attention_mask, response_mask, response_start)``: prompt and response
    in one tensor, the response starting at column ``response_start``; ``response_mask`` marks the
    response tokens up to and including ``</s>`` (or all ``max_new_tokens`` if it never ends).
    With ``max_prompt_length`` a longer prompt keeps its last that many tokens.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(model.parameters()).device
    truncation = {"truncation": True, "max_length": max_prompt_length} if max_prompt_length else {}
    with padding_side(tokenizer, "left"), truncation_side(tokenizer, "left"):
        batch = tokenizer(prompts, return_tensors="pt", padding=True, **truncation).to(device)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                            temperature=temperature, top_k=0, top_p=1.0,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    start = batch["input_ids"].shape[1]
    response = output[:, start:]
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first </s>
    response_mask = (~after_eos).long()
    response = torch.where(after_eos, torch.full_like(response, tokenizer.pad_token_id), response)
    input_ids = torch.cat([batch["input_ids"], response], dim=1)
    attention_mask = torch.cat([batch["attention_mask"], response_mask], dim=1)
    return input_ids, attention_mask, response_mask, start


def decode_responses(tokenizer, input_ids, response_mask, start) -> list[str]:
    return [tokenizer.decode([t for t, m in zip(row[start:].tolist(), mask.tolist()) if m])
            for row, mask in zip(input_ids, response_mask)]


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


def evaluate_policy(policy, tokenizer, rows, score_fn, *, max_new_tokens: int, seed: int,
                    samples_per_prompt: int, batch_size: int, max_prompt_length: int,
                    max_prompts: int, reference=None) -> dict:
    """Held-out measurements of a policy on preference-pair prompts ``rows``: mean reward-model
    score, KL to the reference (adapter off) per reply, reply length, and per rejection axis the
    mean score and the rate of preferred behaviour (``preferred_behaviour``; ``None`` and ``{}``
    for rows without an ``axis``). Replies are sampled
    at temperature 1, as during training; ``samples_per_prompt`` repeats each prompt. The KL is
    against ``reference`` if given (e.g. the SFT model for a merged policy), else against
    ``policy`` with its adapter disabled. The first ``max_prompts`` rows are measured,
    ``batch_size`` replies at a time, each prompt cut to its last ``max_prompt_length`` tokens.
    These settings are the ``policy`` section of the evaluation recipe:
    ``evaluate_policy(..., **evaluation_recipe.policy)``.
    """
    from course_utils.chat import render_chat
    from course_utils.world import generate_world

    # a trainer may hand the model back in training mode with gradient checkpointing on, where
    # generate() runs without its cache and, measured here, samples nonsense
    policy.eval()
    rows = [row for row in list(rows)[:max_prompts] for _ in range(samples_per_prompt)]
    prompts = [render_chat(row["prompt"], add_generation_prompt=True) for row in rows]
    kls, responses, lengths, scores = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        kl, chunk_responses, chunk_lengths = sequence_kl(
            policy, tokenizer, chunk, max_new_tokens, seed + start, reference=reference,
            max_prompt_length=max_prompt_length)
        kls.append(kl * len(chunk))
        responses += chunk_responses
        lengths.append(chunk_lengths)
        scores.append(score_fn(chunk, chunk_responses).float().cpu())
    scores, lengths = torch.cat(scores), torch.cat(lengths)
    result = {"reward": scores.mean().item(), "kl": sum(kls) / len(prompts),
              "length": lengths.mean().item(), "preferred": None, "axes": {}}
    if all("axis" in row for row in rows):  # the world's pairs; Hub pairs carry no axis
        world = generate_world()
        preferred = [preferred_behaviour(row, response, world)
                     for row, response in zip(rows, responses)]
        result["preferred"] = sum(preferred) / len(preferred)
        for axis in sorted({row["axis"] for row in rows}):
            idx = [i for i, row in enumerate(rows) if row["axis"] == axis]
            result["axes"][axis] = {"reward": scores[idx].mean().item(),
                                    "preferred": sum(preferred[i] for i in idx) / len(idx)}
    result["responses"] = responses
    result["scores"] = scores.tolist()
    return result


def reward_model_scorer(reward_model, tokenizer, prompt_messages: dict):
    """``score_fn(prompts, responses)`` for ``ppo_step``: looks up each rendered prompt's
    conversation in ``prompt_messages`` and scores the reply (``</s>`` removed) with the reward
    model, exactly as ``RewardTrainer`` saw pairs."""
    def score_fn(prompts, responses):
        conversations = [prompt_messages[p] for p in prompts]
        replies = [r.replace(tokenizer.eos_token, "") for r in responses]
        return score_responses(reward_model, tokenizer, conversations, replies)
    return score_fn


def sequence_kl(policy, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                temperature: float = 1.0, reference=None, max_prompt_length: int | None = None
                ) -> tuple[float, list[str], torch.Tensor]:
    """Monte Carlo KL(policy || reference) per response, from responses sampled by the policy:
    the mean over samples of ``sum_t log pi(y_t) - log pi_ref(y_t)``. The reference is
    ``reference`` if given, else ``policy`` with its adapter disabled. Returns the KL, the
    responses and their lengths."""
    from contextlib import nullcontext

    input_ids, attention_mask, mask, start = generate_responses(
        policy, tokenizer, prompts, max_new_tokens, temperature, generator_seed=seed,
        max_prompt_length=max_prompt_length)
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy, input_ids, attention_mask, start,
                                        temperature=temperature)
        if reference is None:
            reference, context = policy, policy.disable_adapter()
        else:
            reference, context = reference.eval(), nullcontext()
        with context:
            ref_logprobs, _ = response_logprobs(reference, input_ids, attention_mask, start,
                                                temperature=temperature)
    kl = ((logprobs - ref_logprobs) * mask).sum(dim=1).mean().item()
    return kl, decode_responses(tokenizer, input_ids, mask, start), mask.sum(dim=1).float().cpu()


# --- reward models with trl --------------------------------------------------------------------

def preference_rows(dataset):
    """trl's conversational preference rows (``prompt``, ``chosen``, ``rejected``), rendered with
    ``<s>`` first like every other stage of the course (``sft.TRAINING_CHAT_TEMPLATE``)."""
    keep = ("prompt", "chosen", "rejected")
    return dataset.map(lambda row: {"chat_template_kwargs": {"add_bos": True}},
                       remove_columns=[c for c in dataset.column_names if c not in keep])


def load_reward_model(model_name_or_path: str, tokenizer, dtype: torch.dtype = torch.float32):
    """A causal LM with its LM head replaced by a scalar head: ``AutoModelForSequenceClassification``
    with ``num_labels=1``. The head (``score``) starts random; everything else is the SFT model.
    It reads the score at the last non-padding token, so it needs the pad token's id."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_name_or_path), num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_config(recipe, output_dir, profile):
    """trl ``RewardConfig``: the recipe's ``training`` section, its precision (set explicitly:
    trl 1.x defaults to bf16) and seed, and the course's plumbing."""
    from trl import RewardConfig

    return RewardConfig(output_dir=str(output_dir), **recipe.training, **recipe.precision_flags(),
                        use_cpu=profile.use_cpu, seed=recipe.seed, data_seed=recipe.seed,
                        report_to="none", dataloader_num_workers=0)


def reward_peft_config(recipe):
    """peft ``LoraConfig`` for a sequence-classification reward model, or ``None`` when the recipe
    fully fine-tunes (``lora: null``)."""
    if recipe.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(**recipe.lora, task_type="SEQ_CLS")


def trainable_in_fp32(model) -> int:
    """Cast every trainable parameter to fp32; return how many were cast.

    fp16 mixed precision keeps the weights it updates in fp32: the gradient scaler refuses fp16
    gradients ("Attempting to unscale FP16 gradients"). peft upcasts LoRA's matrices itself, but
    not the trainable copy of a ``modules_to_save`` layer (the reward model's new ``score`` head),
    which stays in the fp16 the model was loaded in.
    """
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def make_reward_trainer(model, tokenizer, train_dataset, args, peft_config=None):
    """trl ``RewardTrainer`` on the course's preference rows. With ``peft_config`` the adapter is
    added here, and every trainable weight (LoRA and the ``score`` head) kept in fp32."""
    from trl import RewardTrainer

    from course_utils.sft import training_tokenizer

    torch.manual_seed(args.seed)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
        trainable_in_fp32(model)
    return RewardTrainer(model=model, args=args, train_dataset=preference_rows(train_dataset),
                         processing_class=training_tokenizer(tokenizer))


@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[list[dict]], responses: list[str],
                    batch_size: int = 64) -> torch.Tensor:
    """The reward model's score for each (conversation ``prompt``, ``response``) pair, rendered
    with the chat template and ``<s>`` first, exactly as ``RewardTrainer`` trains on them."""
    from course_utils.chat import render_chat

    model.eval()
    device = next(model.parameters()).device
    texts = [render_chat(p + [{"role": "assistant", "content": r}])
             for p, r in zip(prompts, responses)]
    scores = []
    with padding_side(tokenizer, "right"):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt",
                              padding=True).to(device)
            scores.append(model(**batch).logits[:, 0].float().cpu())
    return torch.cat(scores)


def preference_scores(model, tokenizer, dataset, batch_size: int = 16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every pair's chosen and rejected reply, ``batch_size`` replies per forward pass
    (a whole held-out set of Orca pairs at once would not fit a T4)."""
    prompts = [row["prompt"] for row in dataset]
    chosen = score_responses(model, tokenizer, prompts, [r["chosen"][0]["content"] for r in dataset],
                             batch_size)
    rejected = score_responses(model, tokenizer, prompts,
                               [r["rejected"][0]["content"] for r in dataset], batch_size)
    return chosen, rejected


def accuracy_by_axis(chosen: torch.Tensor, rejected: torch.Tensor, axes: list[str]) -> dict:
    """Pairwise accuracy overall and for each rejection axis."""
    result = {"overall": pairwise_accuracy(chosen, rejected)}
    for axis in sorted(set(axes)):
        rows = torch.tensor([a == axis for a in axes])
        result[axis] = pairwise_accuracy(chosen[rows], rejected[rows])
    return result


def reward_model_dir():
    from course_utils import stages

    return stages.stage_dir("reward")


def build_reward_model(profile, recipe, verbose: bool = True):
    """Lesson 08's recipe in one call: a scalar head on the SFT model, trained with
    ``RewardTrainer`` (LoRA merged afterwards when the recipe uses it). Returns
    ``(model, tokenizer, what the run used)`` for ``stages.save_stage``."""
    from course_utils import data, stages
    from course_utils.models import load_tokenizer
    from course_utils.paths import artifacts_dir

    sft_dir = stages.stage_dir("sft")
    tokenizer = load_tokenizer(sft_dir)
    model = load_reward_model(sft_dir, tokenizer, recipe.torch_dtype()).to(profile.device)
    args = reward_config(recipe, artifacts_dir("08_reward_modeling") / "rebuild", profile)
    args.disable_tqdm = not verbose
    trainer = make_reward_trainer(model, tokenizer, data.load_preference_dataset(profile, "train"),
                                  args, reward_peft_config(recipe))
    trainer.train()
    model = trainer.model
    used = stages.ran_with(recipe, trainer.args, model)
    if recipe.lora is not None:
        model = model.merge_and_unload()
    return model, tokenizer, used


def ensure_reward_model(profile, verbose: bool = True, rebuild: bool | None = None):
    """Lesson 08's reward model (``artifacts/models/reward/``), rebuilt from its recipe if it is
    missing or stale (``stages.ensure_stage``)."""
    from course_utils import stages

    return stages.ensure_stage("reward", profile, rebuild=rebuild, verbose=verbose)


# --- what the world's preferences ask for, checked in generated text ---------------------------

RUDE_MARKERS = ("obviously", "silly question", "even a toad", "pester", "go away")
REFUSAL_MARKERS = ("can't help", "won't help", "i can't", "i won't")


def preferred_behaviour(row: dict, response: str, world=None) -> bool:
    """Whether ``response`` does what the preference pairs of ``row``'s axis reward.

    ``wrong_fact``: names the true value; ``unhelpful``: names some value of the attribute asked
    about (it answers); ``rude``: no rude phrase; ``unsafe``: refuses (``is_refusal``).
    """
    from course_utils.evaluation import mentions_value
    from course_utils.world import ATTRIBUTE_VALUES, generate_world

    text = response.lower()
    axis = row["axis"]
    if axis == "unsafe":
        return is_refusal(response)
    if axis == "rude":
        return bool(text.strip()) and not any(marker in text for marker in RUDE_MARKERS)
    world = world or generate_world()
    gold = world.character(row["character"]).value(row["attribute"])
    if axis == "wrong_fact":
        return mentions_value(response, gold)
    # for "friend" every name is a value: the subject's own name does not count as an answer
    values = [v for v in ATTRIBUTE_VALUES[row["attribute"]] if v != row["character"]]
    return any(mentions_value(response, value) for value in values)


def is_refusal(response: str) -> bool:
    return any(marker in response.lower() for marker in REFUSAL_MARKERS)



# --- lesson 09's PPO run, reusable by later lessons ---------------------------------------------

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


def ppo_model_dir():
    from course_utils import stages

    return stages.stage_dir("ppo")


def ppo_prompts(profile, tokenizer, max_prompt_length: int, verbose: bool = True
                ) -> tuple[list[str], dict]:
    """The rendered prompts PPO trains on (each training pair's prompt once, those longer than
    ``max_prompt_length`` tokens left out and counted) and the conversation of every training and
    held-out prompt, which ``reward_model_scorer`` looks replies up in."""
    from course_utils import data
    from course_utils.chat import render_chat

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


def build_ppo_model(profile, recipe, verbose: bool = True):
    """Lesson 09's recipe in one call: the course PPO on the SFT model against lesson 08's reward
    model, the adapter merged. Returns ``(model, tokenizer, what the run used)``."""
    from course_utils import stages
    from course_utils.models import load_tokenizer

    sft_dir, reward_dir = stages.stage_dir("sft"), stages.stage_dir("reward")
    tokenizer = load_tokenizer(sft_dir)
    reward_model = load_reward_model(reward_dir, tokenizer, recipe.torch_dtype()).to(
        profile.device).eval()
    train_prompts, conversations = ppo_prompts(profile, tokenizer,
                                               recipe.training["max_prompt_length"], verbose)
    policy, value_head = make_ppo_policy(sft_dir, profile, recipe)
    config = PPOConfig.from_recipe(recipe)
    train_ppo(policy, value_head, tokenizer, train_prompts,
              reward_model_scorer(reward_model, tokenizer, conversations), config,
              progress=verbose)
    used = stages.ran_with(recipe, config, policy)
    return policy.merge_and_unload(), tokenizer, used


def ensure_ppo_model(profile, verbose: bool = True, rebuild: bool | None = None):
    """Lesson 09's PPO policy, merged (``artifacts/models/ppo/``), rebuilt from its recipe if it is
    missing or stale (``stages.ensure_stage``)."""
    from course_utils import stages

    return stages.ensure_stage("ppo", profile, rebuild=rebuild, verbose=verbose)


# --- DPO (lesson 10) ----------------------------------------------------------------------------

def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of each sequence, ``[batch]``.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, hence the shift by one; only tokens with
    ``completion_mask`` 1 count (the prompt and padding are masked out). This is how trl's
    ``DPOTrainer`` scores a reply.
    """
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    per_token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * completion_mask[:, 1:].to(per_token.dtype)).sum(dim=1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float):
    """The DPO loss (Rafailov et al. 2023, eq. 7), averaged over the batch, and the implicit
    rewards ``beta * log(pi / pi_ref)`` of the chosen and rejected replies (detached).

    ``-log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))``
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_config(recipe, output_dir, profile):
    """trl ``DPOConfig``: the recipe's ``training`` section (``beta`` among it), its precision and
    seed, and the course's plumbing."""
    from trl import DPOConfig

    return DPOConfig(output_dir=str(output_dir), **recipe.training, **recipe.precision_flags(),
                     use_cpu=profile.use_cpu, seed=recipe.seed, data_seed=recipe.seed,
                     report_to="none", dataloader_num_workers=0)


def dpo_peft_config(recipe):
    """peft ``LoraConfig`` for the DPO adapter, from the recipe's ``lora`` section."""
    from peft import LoraConfig

    return LoraConfig(**recipe.lora, task_type="CAUSAL_LM")


def make_dpo_trainer(model, tokenizer, train_dataset, args, peft_config=None, eval_dataset=None):
    """trl ``DPOTrainer`` on the course's preference rows (``<s>`` first, as in every stage).
    With a peft model or ``peft_config`` and no reference model, the reference is the policy
    with its adapter disabled."""
    from trl import DPOTrainer

    from course_utils.sft import training_tokenizer

    torch.manual_seed(args.seed)
    return DPOTrainer(model=model, args=args, train_dataset=preference_rows(train_dataset),
                      eval_dataset=None if eval_dataset is None else preference_rows(eval_dataset),
                      processing_class=training_tokenizer(tokenizer), peft_config=peft_config)


@torch.no_grad()
def pair_logprobs(model, trainer, split: str = "eval", batch_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probabilities of every pair's chosen and rejected reply under
    ``model``, for the ``trainer``'s (a ``DPOTrainer``) ``"train"`` or ``"eval"`` data set,
    tokenized and collated exactly as the trainer does."""
    prepared = trainer.train_dataset if split == "train" else trainer.eval_dataset
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    rows = [{c: row[c] for c in columns} for row in prepared]
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for begin in range(0, len(rows), batch_size):
        batch = trainer.data_collator(rows[begin:begin + batch_size])
        input_ids = batch["input_ids"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
        logps = sequence_logprobs(logits, input_ids, batch["completion_mask"].to(device)).cpu()
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen.append(chosen_logps)
        rejected.append(rejected_logps)
    return torch.cat(chosen), torch.cat(rejected)


def dpo_model_dir():
    from course_utils import stages

    return stages.stage_dir("dpo")


def load_dpo_policy(sft_dir, profile, recipe):
    """The SFT model as DPO's starting point: NF4 weights when the recipe's ``quantization``
    section asks for them (QLoRA DPO), prepared for k-bit training, with bitsandbytes' CPU
    repacking switched off (an evaluation pass before training would otherwise corrupt it; see
    ``models.keep_cpu_4bit_weights_trainable``)."""
    from peft import prepare_model_for_kbit_training

    from course_utils.models import (
        bnb_config_from_recipe,
        keep_cpu_4bit_weights_trainable,
        load_model_and_tokenizer,
    )

    quantization = bnb_config_from_recipe(recipe)
    model, _ = load_model_and_tokenizer(profile, model_name_or_path=sft_dir,
                                        load_in_4bit=quantization is not None,
                                        quantization_config=quantization)
    if quantization is not None:
        keep_cpu_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.get("gradient_checkpointing", False))
    return model


def merge_dpo_adapter(sft_dir, adapter_dir, profile):
    """The literature's stacking: the DPO adapter loaded onto the SFT model in full precision
    (fp32 on the CPU, fp16 on a GPU; never the 4-bit weights it trained against) and merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from course_utils.sft import merge_dtype

    base = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=merge_dtype(profile)).to(
        profile.device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def build_dpo_model(profile, recipe, verbose: bool = True):
    """Lesson 10's recipe in one call: QLoRA DPO on the SFT model, the adapter merged into the
    full-precision SFT model. Returns ``(model, tokenizer, what the run used)``."""
    from course_utils import data, stages
    from course_utils.models import load_tokenizer
    from course_utils.paths import artifacts_dir

    sft_dir = stages.stage_dir("sft")
    tokenizer = load_tokenizer(sft_dir)
    output_dir = artifacts_dir("10_dpo") / "rebuild"
    args = dpo_config(recipe, output_dir, profile)
    args.disable_tqdm = not verbose
    trainer = make_dpo_trainer(load_dpo_policy(sft_dir, profile, recipe), tokenizer,
                               data.load_preference_dataset(profile, "train"), args,
                               dpo_peft_config(recipe))
    trainer.train()
    used = stages.ran_with(recipe, trainer.args, trainer.model)
    trainer.save_model(str(output_dir / "adapter"))
    merged = merge_dpo_adapter(sft_dir, output_dir / "adapter", profile).merge_and_unload()
    return merged, tokenizer, used


def ensure_dpo_model(profile, verbose: bool = True, rebuild: bool | None = None):
    """Lesson 10's DPO model, merged (``artifacts/models/dpo/``), rebuilt from its recipe if it is
    missing or stale (``stages.ensure_stage``)."""
    from course_utils import stages

    return stages.ensure_stage("dpo", profile, rebuild=rebuild, verbose=verbose)
