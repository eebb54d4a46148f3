"""Direct preference optimization (lesson 10): the loss written out, and trl's ``DPOTrainer``
on the course's preference pairs.

- ``sequence_logprobs`` / ``dpo_loss``: a reply's summed log-probability and the DPO loss
  (Rafailov et al. 2023, eq. 7); lesson 10 writes both in its cells and
  ``tests/test_lesson_code.py`` keeps the copies equal;
- ``dpo_config``, ``dpo_peft_config``, ``load_dpo_policy``, ``make_dpo_trainer``: trl's
  ``DPOConfig``/``DPOTrainer`` and peft's ``LoraConfig`` from the ``dpo`` recipe, on the SFT model
  in 4-bit when the recipe quantizes (lesson 10 builds the same objects in its cells);
- ``pair_logprobs`` / ``pair_completion_tokens``: every pair's log-probabilities and reply lengths,
  collated exactly as the trainer does;
- ``stack_dpo_adapter`` / ``build_dpo_model``: the adapter on the full-precision SFT model (to be
  merged), and the lesson's recipe in one call, for ``pipeline.ensure_stage("dpo")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from course_utils.course import data
from course_utils.course.data import preference_rows
from course_utils.course.models import load_tokenizer, trainable_in_fp32_under_fp16
from course_utils.course.paths import artifacts_dir
from course_utils.course.recipes import ran_with
from course_utils.qlora_sft import load_quantized, merge_dtype, training_tokenizer


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

    return DPOConfig(output_dir=str(output_dir), **recipe.training, **recipe.trainer_plumbing(profile))


def dpo_peft_config(recipe):
    """peft ``LoraConfig`` for the DPO adapter, from the recipe's ``lora`` section."""
    from peft import LoraConfig

    return LoraConfig(**recipe.lora, task_type="CAUSAL_LM")


def make_dpo_trainer(model, tokenizer, train_dataset, args, peft_config=None, eval_dataset=None):
    """trl ``DPOTrainer`` on the course's preference rows (``<s>`` first, as in every stage).
    With a peft model or ``peft_config`` and no reference model, the reference is the policy
    with its adapter disabled."""
    from trl import DPOTrainer

    torch.manual_seed(args.seed)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_rows(train_dataset),
                         eval_dataset=None if eval_dataset is None else preference_rows(eval_dataset),
                         processing_class=training_tokenizer(tokenizer), peft_config=peft_config)
    trainable_in_fp32_under_fp16(trainer)  # trl's bf16 adapters would crash a T4's fp16 grad scaler
    return trainer


@torch.no_grad()
def _prepared_rows(trainer, split: str, max_pairs: int) -> list[dict]:
    prepared = trainer.train_dataset if split == "train" else trainer.eval_dataset
    if max_pairs:
        prepared = prepared.select(range(min(max_pairs, len(prepared))))
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    return [{c: row[c] for c in columns} for row in prepared]


def pair_logprobs(model, trainer, split: str, batch_size: int,
                  max_pairs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probabilities of every pair's chosen and rejected reply under
    ``model``, for the ``trainer``'s (a ``DPOTrainer``) ``"train"`` or ``"eval"`` data set (its
    first ``max_pairs`` pairs; 0: all), tokenized and collated exactly as the trainer does,
    ``batch_size`` pairs per forward pass (the evaluation recipe's
    ``scoring.dpo_pairs_batch_size``)."""
    rows = _prepared_rows(trainer, split, max_pairs)
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


def pair_completion_tokens(trainer, split: str, batch_size: int,
                           max_pairs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """How many reply tokens of every pair's chosen and rejected reply ``sequence_logprobs`` sums
    over, for the ``trainer``'s ``"train"`` or ``"eval"`` data set (its first ``max_pairs``; 0:
    all), collated as the trainer does: what trl's IPO loss divides each summed log-ratio by (its
    per-token average)."""
    rows = _prepared_rows(trainer, split, max_pairs)
    chosen, rejected = [], []
    for begin in range(0, len(rows), batch_size):
        counts = trainer.data_collator(rows[begin:begin + batch_size])["completion_mask"][:, 1:].sum(dim=1)
        chosen_counts, rejected_counts = counts.chunk(2)
        chosen.append(chosen_counts)
        rejected.append(rejected_counts)
    return torch.cat(chosen).float(), torch.cat(rejected).float()


def load_dpo_policy(sft_dir, profile, recipe):
    """The SFT model as DPO's starting point: NF4 weights when the recipe's ``quantization``
    section asks for them (QLoRA DPO), prepared as lesson 07 prepares its base
    (``qlora_sft.load_quantized``)."""
    return load_quantized(profile, recipe, model_name_or_path=sft_dir)[0]


def stack_dpo_adapter(sft_dir, adapter_dir, profile):
    """The literature's stacking: the DPO adapter loaded onto the SFT model in full precision
    (fp32 on the CPU, fp16 on a GPU; never the 4-bit weights it trained against). Returns the
    peft model, unmerged: ``.merge_and_unload()`` folds the adapter into the weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=merge_dtype(profile)).to(
        profile.device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def build_dpo_model(profile, recipe, parents: dict[str, Path], verbose: bool = True):
    """Lesson 10's recipe in one call: QLoRA DPO on the SFT model, the adapter merged into the
    full-precision SFT model. Returns ``(model, tokenizer, what the run used)``."""

    sft_dir = parents["sft"]
    tokenizer = load_tokenizer(sft_dir)
    output_dir = artifacts_dir("10_dpo") / "rebuild"
    args = dpo_config(recipe, output_dir, profile)
    args.disable_tqdm = not verbose
    trainer = make_dpo_trainer(load_dpo_policy(sft_dir, profile, recipe), tokenizer,
                               data.load_preference_dataset(profile, "train"), args,
                               dpo_peft_config(recipe))
    trainer.train()
    used = ran_with(recipe, trainer.args, trainer.model)
    trainer.save_model(str(output_dir / "adapter"))
    merged = stack_dpo_adapter(sft_dir, output_dir / "adapter", profile).merge_and_unload()
    return merged, tokenizer, used
