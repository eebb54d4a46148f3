"""A minimal supervised fine-tuning loop in plain PyTorch: lesson 00's tour and lessons 02-05.

Lesson 07 fine-tunes with trl's ``SFTTrainer`` and QLoRA, as practitioners do. Lesson 00 only
needs to *show* the effect of SFT in seconds, and lessons 02-05 train every PEFT method the same
way on the course model; ``train_sft`` does both with AdamW, a linear decay to zero, and loss on
assistant tokens only (``course_utils.course.chat.assistant_only_labels``).
"""

from __future__ import annotations

import random

import torch

from course_utils.course.chat import IGNORE_INDEX, assistant_only_labels


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """Right-pad ``(input_ids, labels)`` pairs into tensors; padding is masked and ignored."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_sft(model, tokenizer, chats: list[dict], *, steps: int, batch_size: int,
              learning_rate: float, seed: int, progress: bool = True) -> list[float]:
    """Train ``model``'s trainable parameters on ``chats`` (rows with ``messages``); return losses.

    Every weight for a plain model (full fine-tuning); only the adapter for a peft model or one
    with frozen weights. AdamW with a linear decay to zero, loss on assistant tokens only, seeded
    batch order.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    examples = [assistant_only_labels(tokenizer, chat["messages"]) for chat in chats]
    order_rng = random.Random(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.train()
    losses, order = [], []
    for _ in tqdm(range(steps), desc="SFT", disable=not progress):
        if len(order) < batch_size:
            order += order_rng.sample(range(len(examples)), len(examples))
        batch = pad_batch([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
