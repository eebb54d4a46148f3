"""Reward modeling (lesson 08): the Bradley-Terry objective, trl's ``RewardTrainer`` on the
course's preference pairs, and scoring replies with the trained model.

- ``bradley_terry_loss`` / ``pairwise_accuracy``: the reward model's objective and metric (lesson
  08 writes the loss in a cell; ``tests/test_lesson_code.py`` keeps the two copies equal);
- ``combine_rewards``: Llama 2's rule for a helpfulness and a safety reward model;
- ``load_reward_model``, ``reward_config``, ``reward_peft_config``, ``make_reward_trainer``: the
  model with a scalar head, and trl's ``RewardConfig``/``RewardTrainer`` from the ``reward``
  recipe (lesson 08 builds the same objects in its cells and checks them equal);
- ``score_responses``, ``preference_scores``, ``accuracy_by_axis``, ``reward_model_scorer``: the
  trained model's scores, its accuracy per rejection axis, and the ``score_fn`` PPO calls;
- ``build_reward_model``: the lesson's recipe in one call, for ``pipeline.ensure_stage("reward")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from course_utils.course import data
from course_utils.course.chat import padding_side, render_chat, truncation_side
from course_utils.course.data import preference_rows
from course_utils.course.models import autocast_like, load_tokenizer, trainable_in_fp32
from course_utils.course.paths import artifacts_dir
from course_utils.course.recipes import ran_with
from course_utils.qlora_sft import training_tokenizer


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

    return RewardConfig(output_dir=str(output_dir), **recipe.training,
                        **recipe.trainer_plumbing(profile))


def reward_peft_config(recipe):
    """peft ``LoraConfig`` for a sequence-classification reward model, or ``None`` when the recipe
    fully fine-tunes (``lora: null``)."""
    if recipe.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(**recipe.lora, task_type="SEQ_CLS")


def make_reward_trainer(model, tokenizer, train_dataset, args, peft_config=None):
    """trl ``RewardTrainer`` on the course's preference rows. With ``peft_config`` the adapter is
    added here, and every trainable weight (LoRA and the ``score`` head) kept in fp32."""
    from trl import RewardTrainer

    torch.manual_seed(args.seed)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
        trainable_in_fp32(model)
    return RewardTrainer(model=model, args=args, train_dataset=preference_rows(train_dataset),
                         processing_class=training_tokenizer(tokenizer))


@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[list[dict]], responses: list[str],
                    batch_size: int) -> torch.Tensor:
    """The reward model's score for each (conversation ``prompt``, ``response``) pair, rendered
    with the chat template and ``<s>`` first, exactly as ``RewardTrainer`` trains on them."""

    model.eval()
    device = next(model.parameters()).device
    texts = [render_chat(p + [{"role": "assistant", "content": r}])
             for p, r in zip(prompts, responses)]
    scores = []
    # fp16 weights with the fp32 score head of a LoRA reward model: autocast, as the trainer does
    with padding_side(tokenizer, "right"), truncation_side(tokenizer, "left"), autocast_like(model):
        for start in range(0, len(texts), batch_size):
            # a long held-out conversation keeps its end, where the score is read
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=model.config.max_position_embeddings).to(device)
            scores.append(model(**batch).logits[:, 0].float().cpu())
    return torch.cat(scores)


def preference_scores(model, tokenizer, dataset, batch_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every pair's chosen and rejected reply, ``batch_size`` replies per forward pass
    (the evaluation recipe's ``scoring.reward_pairs_batch_size``: a whole held-out set of Orca
    pairs at once would not fit a T4)."""
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


def reward_model_scorer(reward_model, tokenizer, prompt_messages: dict, batch_size: int):
    """``score_fn(prompts, responses)`` for ``ppo_step``: looks up each rendered prompt's
    conversation in ``prompt_messages`` and scores the reply (``</s>`` removed) with the reward
    model, exactly as ``RewardTrainer`` saw pairs, ``batch_size`` replies per forward pass (the
    evaluation recipe's ``scoring.reward_replies_batch_size``)."""
    def score_fn(prompts, responses):
        conversations = [prompt_messages[p] for p in prompts]
        replies = [r.replace(tokenizer.eos_token, "") for r in responses]
        return score_responses(reward_model, tokenizer, conversations, replies, batch_size)
    return score_fn


def build_reward_model(profile, recipe, parents: dict[str, Path], verbose: bool = True):
    """Lesson 08's recipe in one call: a scalar head on the SFT model, trained with
    ``RewardTrainer`` (LoRA merged afterwards when the recipe uses it). Returns
    ``(model, tokenizer, what the run used)`` for ``pipeline.build_stage``."""

    sft_dir = parents["sft"]
    tokenizer = load_tokenizer(sft_dir)
    model = load_reward_model(sft_dir, tokenizer, recipe.torch_dtype()).to(profile.device)
    args = reward_config(recipe, artifacts_dir("08_reward_modeling") / "rebuild", profile)
    args.disable_tqdm = not verbose
    trainer = make_reward_trainer(model, tokenizer, data.load_preference_dataset(profile, "train"),
                                  args, reward_peft_config(recipe))
    trainer.train()
    model = trainer.model
    used = ran_with(recipe, trainer.args, model)
    if recipe.lora is not None:
        model = model.merge_and_unload()
    return model, tokenizer, used
