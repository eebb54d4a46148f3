"""Numerics several lessons share: comparing two tensors within a tolerance, per-token
log-probabilities, and the held-out loss on assistant replies.

- ``check_close``: the max absolute error of a re-implementation against its reference (peft,
  bitsandbytes, trl, or the package), printed, and an error when it exceeds the tolerance; lessons
  03-06 compare what they write with the library this way, and graded cells reuse it;
- ``token_log_probs``: log p(token | the tokens before it), padding zeroed (perplexity, multiple
  choice);
- ``heldout_loss``: mean cross-entropy on the reply tokens of held-out chats, cut and batched as
  the evaluation recipe says (lessons 02-05 and 07).
"""

from __future__ import annotations

import torch

from course_utils.course import reporting
from course_utils.course.chat import assistant_only_labels
from course_utils.sft_loop import pad_batch


def check_close(mine, reference, atol: float = 1e-6, rtol: float = 1e-5,
                what: str = "the result") -> float:
    """Compare tensors (or numbers); print and return the max absolute error; raise if too big.

    ``atol``/``rtol`` should fit the dtype: around 1e-6 for fp32 arithmetic, 1e-3 for fp16.
    """
    mine_t, reference_t = torch.as_tensor(mine), torch.as_tensor(reference)
    if mine_t.shape != reference_t.shape:
        raise AssertionError(f"{what} has shape {tuple(mine_t.shape)}, expected "
                             f"{tuple(reference_t.shape)}")
    error = (mine_t.double() - reference_t.double()).abs().max().item() if mine_t.numel() else 0.0
    ok = torch.allclose(mine_t.double(), reference_t.double(), atol=atol, rtol=rtol)
    print(f"{what}: max abs error {error:.3g} -> {'OK' if ok else 'MISMATCH'}")
    reporting.record({"kind": "check_close", "what": what, "holds": ok, "max_abs_error": error,
                      "atol": atol, "rtol": rtol})
    if not ok:
        raise AssertionError(f"{what} differs from the reference (max abs error {error:.3g})")
    return error


def gather_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` at each position: a log-softmax over the vocabulary (in fp32), then each
    target's entry. The caller aligns ``logits`` with ``targets`` (position ``t`` predicts token
    ``t + 1``). Lesson 10's ``sequence_logprobs`` writes the same two steps out in its cell."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it, shaped like ``input_ids[:, 1:]``.

    Position ``t`` of the logits predicts token ``t + 1``, hence the shift by one; positions that
    predict padding are set to 0 (mask them with ``attention_mask[:, 1:]``).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return gather_log_probs(logits, input_ids[:, 1:]) * attention_mask[:, 1:]


@torch.no_grad()
def heldout_loss(model, tokenizer, chats: list[dict], *, batch_size: int, max_length: int) -> float:
    """Mean cross-entropy on the assistant tokens of ``chats`` (token-weighted), each chat cut to
    its first ``max_length`` tokens as training cuts it, ``batch_size`` chats per forward pass on
    the model's device (the evaluation recipe's ``chat`` section sets both)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    examples = [tuple(part[:max_length] for part in assistant_only_labels(tokenizer, chat["messages"]))
                for chat in chats]
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], tokenizer.pad_token_id)
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        if n_tokens == 0:  # every reply cut off by max_length
            continue
        batch = {key: value.to(device) for key, value in batch.items()}
        total += model(**batch).loss.item() * n_tokens
        count += n_tokens
    if count == 0:
        raise ValueError(f"no reply token within the first {max_length} tokens of any chat")
    return total / count
