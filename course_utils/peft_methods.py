"""Every PEFT method on one task, measured the same way (lessons 02 to 05).

``make_method(name, base_model)`` returns a trainable copy of the base model for one method;
``run_method`` trains it on the world's SFT chats and measures it: trainable parameters, adapter
file size (saved and loaded back, outputs compared), seconds per step, training memory, and
held-out loss, chat-format rate and accuracy on
characters never seen in training. The task is the one notebook 00 introduced: answer attribute
questions in the chat format.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course_utils import evaluation, memory
from course_utils.chat import assistant_only_labels
from course_utils.peft_scratch import add_houlsby_adapters
from course_utils.training import pad_batch, train_sft

METHODS = ("full", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "dora", "ia3")

#: Learning rates per method: methods with few parameters need larger steps (the papers use
#: 3e-1 for prompt tuning, 1e-2 for prefix tuning, 1e-4 to 1e-3 for LoRA on large models).
LEARNING_RATES = {"full": 1e-3, "houlsby": 3e-3, "prompt_tuning": 3e-2, "p_tuning": 3e-3,
                  "prefix_tuning": 1e-2, "lora": 3e-3, "dora": 3e-3, "ia3": 3e-2}


def peft_config(name: str, config):
    """The peft config of a method, sized for the model ``config`` describes."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if name == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16)
    if name == "p_tuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16,
                                   encoder_hidden_size=config.hidden_size,
                                   encoder_reparameterization_type="MLP")
    if name == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16,
                                  prefix_projection=True, encoder_hidden_size=config.hidden_size)
    if name in ("lora", "dora"):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05,
                          target_modules=targets, use_dora=name == "dora")
    if name == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    raise ValueError(f"no peft config for {name!r}; methods: {', '.join(METHODS)}")


def make_method(name: str, base_model, seed: int = 0):
    """A fresh copy of ``base_model`` set up for method ``name`` (only its parameters train).

    Gradient checkpointing stays off: prefix tuning cannot run with it (peft raises "PREFIX_TUNING
    does not work with gradient checkpointing"), and ``prepare_model_for_kbit_training`` and trl
    turn it on by default, so it must be switched off explicitly there.
    """
    from peft import get_peft_model

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    if name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if name == "houlsby":
        add_houlsby_adapters(model, bottleneck=HOULSBY_BOTTLENECK)
        return model
    return get_peft_model(model, peft_config(name, model.config))


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


HOULSBY_BOTTLENECK = 16


@torch.no_grad()
def save_and_reload(model, base_model, name: str) -> tuple[int, float]:
    """Save what must be shipped to reuse the method (the adapter, or the whole model for full
    fine-tuning), load it back onto a fresh base model, and return ``(bytes on disk, max |logit
    difference| between the trained and the reloaded model)``."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 19).view(2, 8)
    model.eval()
    reference = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as folder:
        if name == "houlsby":
            state = {n: p.detach().contiguous() for n, p in model.named_parameters()
                     if p.requires_grad}
            save_file(state, str(Path(folder) / "adapters.safetensors"))
            loaded = copy.deepcopy(base_model)
            add_houlsby_adapters(loaded, bottleneck=HOULSBY_BOTTLENECK)
            missing = loaded.load_state_dict(load_file(str(Path(folder) / "adapters.safetensors")),
                                             strict=False).unexpected_keys
            if missing:
                raise RuntimeError(f"adapter keys did not fit the model: {missing[:3]}")
        elif name == "full":
            model.save_pretrained(folder)
            loaded = AutoModelForCausalLM.from_pretrained(folder)
        else:
            model.save_pretrained(folder)
            loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), folder)
        size = sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
    loaded.eval()
    return size, (loaded(input_ids=ids).logits - reference).abs().max().item()


@torch.no_grad()
def heldout_loss(model, tokenizer, chats: list[dict], batch_size: int = 32) -> float:
    """Mean cross-entropy on the assistant tokens of ``chats`` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    examples = [assistant_only_labels(tokenizer, chat["messages"]) for chat in chats]
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], tokenizer.pad_token_id)
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n_tokens
        count += n_tokens
    return total / count


def training_bytes(model, tokenizer, chats: list[dict], batch_size: int) -> int:
    """Weights + gradients + AdamW states + saved activations for one training step, measured."""
    probe = copy.deepcopy(model)
    probe.train()
    batch = pad_batch([assistant_only_labels(tokenizer, c["messages"]) for c in chats[:batch_size]],
                      tokenizer.pad_token_id)
    activations = memory.measured_activation_bytes(probe, **batch)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    probe(**batch).loss.backward()
    optimizer.step()
    static = memory.measured_static_bytes(probe, optimizer)
    return activations + sum(static.values())


@dataclass(frozen=True)
class MethodResult:
    """One row of the comparison table."""

    method: str
    trainable_parameters: int
    percent_of_model: float
    saved_bytes: int
    reload_max_abs_error: float
    seconds_per_step: float
    training_bytes: int
    heldout_loss: float
    chat_format_rate: float
    heldout_accuracy: float


def run_method(name: str, base_model, tokenizer, train_chats, test_chats, questions,
               steps: int = 80, batch_size: int = 16, seed: int = 0,
               learning_rate: float | None = None) -> tuple[object, MethodResult]:
    """Build, train and measure one method; return the trained model and its row."""
    model = make_method(name, base_model, seed)
    n_base = sum(p.numel() for p in base_model.parameters())
    lr = LEARNING_RATES[name] if learning_rate is None else learning_rate
    mem = training_bytes(model, tokenizer, train_chats, batch_size)
    start = time.perf_counter()
    train_sft(model, tokenizer, train_chats, steps=steps, batch_size=batch_size,
              learning_rate=lr, seed=seed, progress=False)
    seconds = (time.perf_counter() - start) / steps
    answers = evaluation.chat_answers(model, tokenizer, questions)
    saved_bytes, reload_error = save_and_reload(model, base_model, name)
    result = MethodResult(
        method=name, trainable_parameters=trainable_parameters(model),
        percent_of_model=100 * trainable_parameters(model) / n_base,
        saved_bytes=saved_bytes, reload_max_abs_error=reload_error, seconds_per_step=seconds,
        training_bytes=mem, heldout_loss=heldout_loss(model, tokenizer, test_chats),
        chat_format_rate=evaluation.accuracy(answers, "chat_format"),
        heldout_accuracy=evaluation.accuracy(answers))
    return model, result


def results_table(results: list[MethodResult]) -> str:
    """The comparison as aligned text."""
    header = (f"{'method':<14}{'trainable':>11}{'% model':>9}{'saved KB':>10}{'reload':>9}"
              f"{'s/step':>8}"
              f"{'train MB':>10}{'loss':>7}{'format':>8}{'accuracy':>10}")
    rows = [header]
    for r in results:
        rows.append(f"{r.method:<14}{r.trainable_parameters:>11,}{r.percent_of_model:>9.3f}"
                    f"{r.saved_bytes / 1e3:>10.1f}{r.reload_max_abs_error:>9.1e}"
                    f"{r.seconds_per_step:>8.3f}"
                    f"{r.training_bytes / 1e6:>10.1f}{r.heldout_loss:>7.3f}"
                    f"{r.chat_format_rate:>8.1%}{r.heldout_accuracy:>10.1%}")
    return "\n".join(rows)


def results_json(results: list[MethodResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)
