"""QLoRA supervised fine-tuning with trl, shared by lesson 07 and ``scripts/sft.py``.

One code path for the notebook, the command line and multi-process runs:

- ``prompt_completion_rows``: every assistant reply as a trl prompt/completion row, trained with
  ``completion_only_loss`` (loss on the reply only), rendered with TinyLlama's template and
  ``<s>`` first (``TRAINING_CHAT_TEMPLATE``), exactly the tokens inference sees.
- ``SFTSettings`` / ``settings_for(profile)``: every hyperparameter, with the literature's values
  for ``colab`` and values that suit the course model for ``tiny``.
- ``load_quantized_base``: NF4 weights (``BitsAndBytesConfig``) prepared for k-bit training.
- ``make_trainer``: trl ``SFTTrainer`` with ``SFTConfig`` and LoRA on all seven projections,
  precision and optimizer set explicitly per device (trl 1.x defaults to bf16 and checkpointing).
- ``merge_adapter``: the adapter merged into a 16- or 32-bit copy of the base.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from course_utils.chat import TINYLLAMA_CHAT_TEMPLATE
from course_utils.memory import LORA_TARGETS
from course_utils.profiles import Profile

_ASSISTANT_LINE = "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
# The empty expression at the end keeps the line break after the reply: Jinja (with trim_blocks,
# as transformers renders templates) drops a line break that follows a block tag.
_MARKED_ASSISTANT_LINE = ("{{ '<|assistant|>\n' }}{% generation %}"
                          "{{ message['content'] + eos_token }}{% endgeneration %}{{ '' }}")
assert _ASSISTANT_LINE in TINYLLAMA_CHAT_TEMPLATE

#: TinyLlama's template with ``{% generation %}`` markers, which trl's ``assistant_only_loss``
#: needs. Renders byte for byte what TinyLlama's renders; lesson 07 shows why the course does
#: not train with it (the masks come from character offsets).
MARKED_CHAT_TEMPLATE = TINYLLAMA_CHAT_TEMPLATE.replace(_ASSISTANT_LINE, _MARKED_ASSISTANT_LINE)

#: The template SFT tokenizes with: TinyLlama's, plus ``<s>`` first when the row asks for it
#: (``chat_template_kwargs={"add_bos": True}``). trl tokenizes with the template alone, and
#: TinyLlama's template writes no ``<s>``, while ``tokenizer(text)`` at inference puts it first.
TRAINING_CHAT_TEMPLATE = ("{% if add_bos is defined and add_bos %}{{ bos_token }}{% endif %}"
                          + TINYLLAMA_CHAT_TEMPLATE)


def prompt_completion_rows(dataset):
    """One trl prompt/completion row per assistant reply of every chat in ``dataset``.

    ``prompt`` is the conversation before the reply, ``completion`` the reply; with
    ``completion_only_loss`` trl trains on the completion's tokens only: the reply, its ``</s>``
    and the line break the template writes after it. A chat with three replies becomes three rows,
    so every reply is trained, each with the conversation that led to it.
    """
    from datasets import Dataset

    rows = []
    for chat in dataset:
        messages = chat["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                rows.append({"prompt": messages[:i], "completion": [message],
                             "chat_template_kwargs": {"add_bos": True}})
    return Dataset.from_list(rows)


def tokenize_prompt_completion(tokenizer, prompt: list[dict], completion: list[dict]
                               ) -> tuple[list[int], list[int]]:
    """The ``(input_ids, labels)`` trl builds for one conversational prompt/completion row.

    ``input_ids`` encode the whole conversation as inference does (``<s>`` first); ``labels`` are
    -100 over the tokens of the prompt rendered with the generation prompt, and the token ids
    after it. A test checks this against the rows ``SFTTrainer`` actually trains on.
    """
    from course_utils.chat import IGNORE_INDEX

    full = tokenizer(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
    prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False,
                                                         add_generation_prompt=True))["input_ids"]
    ids = full["input_ids"]
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt's tokens are not a prefix of the conversation's tokens")
    return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]


def training_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that renders with ``TRAINING_CHAT_TEMPLATE``."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = TRAINING_CHAT_TEMPLATE
    return copied


@dataclass(frozen=True)
class SFTSettings:
    """Every choice of an SFT run. ``scripts/sft.py`` exposes each field as a flag."""

    model_name_or_path: str
    output_dir: str
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    load_in_4bit: bool
    gradient_checkpointing: bool
    optimizer: str
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    logging_steps: int = 5
    seed: int = 42
    train_rows: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def settings_for(profile: Profile, output_dir: str | Path, **overrides) -> SFTSettings:
    """The run for ``profile``.

    ``colab``: the literature's QLoRA recipe for TinyLlama on UltraChat (LoRA r=64, alpha=32,
    dropout 0.1 on all seven projections, lr 2e-4, cosine, paged AdamW, max grad norm 0.3,
    gradient checkpointing, 4-bit NF4 with double quantization). ``tiny``: the same structure
    sized for the 2.8M-parameter course model on a CPU: r=16, a larger learning rate (a small
    model on few steps), plain AdamW (paged optimizers need CUDA), no checkpointing (the
    activations are tiny and recomputing them only costs time).
    """
    common = dict(model_name_or_path=profile.model_name_or_path, output_dir=str(output_dir),
                  steps=profile.sft_steps, batch_size=profile.batch_size,
                  max_length=profile.max_length_tokens, load_in_4bit=profile.load_in_4bit,
                  seed=profile.seed)
    if profile.device == "cuda":
        settings = SFTSettings(**common, gradient_accumulation_steps=4, learning_rate=2e-4,
                               lora_r=64, lora_alpha=32, lora_dropout=0.1,
                               gradient_checkpointing=True, optimizer="paged_adamw_32bit")
    else:
        settings = SFTSettings(**common, gradient_accumulation_steps=1, learning_rate=3e-3,
                               lora_r=16, lora_alpha=32, lora_dropout=0.05,
                               gradient_checkpointing=False, optimizer="adamw_torch")
    return replace(settings, **overrides)


def lora_config(settings: SFTSettings):
    """LoRA on all seven linear projections of every decoder layer (QLoRA's choice)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout, target_modules=list(LORA_TARGETS),
                      bias="none", task_type="CAUSAL_LM")


def sft_config(settings: SFTSettings, profile: Profile, **overrides):
    """trl's ``SFTConfig`` with precision, optimizer and checkpointing set explicitly.

    trl 1.x defaults to ``bf16=True`` and ``gradient_checkpointing=True``; a T4 has no native
    bf16 (fp16 mixed precision there), and the CPU computes in fp32 (``use_cpu=True``).
    """
    from trl import SFTConfig

    kwargs = dict(
        output_dir=settings.output_dir, max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=math.ceil(settings.warmup_ratio * settings.steps),
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        optim=settings.optimizer, max_length=settings.max_length, packing=False,
        completion_only_loss=True, gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=profile.bf16, fp16=profile.fp16, use_cpu=profile.use_cpu,
        logging_steps=settings.logging_steps, save_strategy="no", report_to="none",
        seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, disable_tqdm=False)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def load_quantized_base(profile: Profile, settings: SFTSettings):
    """The base model for QLoRA: NF4 weights with double quantization when
    ``settings.load_in_4bit`` (else plain ``profile.compute_dtype``), prepared for k-bit training
    (``prepare_model_for_kbit_training``: norms in fp32, input gradients for checkpointing)."""
    from peft import prepare_model_for_kbit_training

    from course_utils.models import keep_cpu_4bit_weights_trainable, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(profile, load_in_4bit=settings.load_in_4bit,
                                                model_name_or_path=settings.model_name_or_path)
    if settings.load_in_4bit:
        keep_cpu_4bit_weights_trainable(model)  # a bitsandbytes CPU pitfall, see its docstring
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing)
    model.config.use_cache = False  # the cache is for generation, and checkpointing refuses it
    return model, tokenizer


def make_trainer(model, tokenizer, train_dataset, settings: SFTSettings, profile: Profile,
                 eval_dataset=None, **config_overrides):
    """trl ``SFTTrainer`` for LoRA on ``model`` with loss on the replies only."""
    from trl import SFTTrainer

    torch.manual_seed(settings.seed)
    return SFTTrainer(model=model, args=sft_config(settings, profile, **config_overrides),
                      train_dataset=prompt_completion_rows(train_dataset),
                      eval_dataset=None if eval_dataset is None
                      else prompt_completion_rows(eval_dataset),
                      processing_class=training_tokenizer(tokenizer),
                      peft_config=lora_config(settings))


def adapter_bytes(folder: str | Path) -> int:
    """Bytes of the adapter weights saved in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("adapter_model.*"))


def merge_adapter(adapter_dir: str | Path, base_model_name_or_path: str, dtype: torch.dtype):
    """Load the base unquantized in ``dtype``, apply the adapter and merge it into the weights.

    QLoRA trains against NF4 weights, but merging into 4-bit weights would round the update away;
    the literature merges into a 16-bit copy of the base (fp32 on the CPU).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_name_or_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.merge_and_unload().eval()


def reply_prompts(chats, tokenizer) -> list[str]:
    """Each chat up to its first assistant reply, rendered with the generation prompt."""
    prompts = []
    for chat in chats:
        messages = chat["messages"]
        first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(tokenizer.apply_chat_template(messages[:first_reply], tokenize=False,
                                                     add_generation_prompt=True))
    return prompts


def evaluate_chat_model(model, tokenizer, test_chats, questions=None, unseen=None,
                        max_new_tokens: int = 24) -> dict:
    """Lesson 07's before/after numbers for ``model``.

    Always: ``heldout_loss`` (mean cross-entropy on the replies of ``test_chats``) and
    ``stop_rate`` (greedy replies to their first question that end with ``</s>`` within
    ``max_new_tokens``). With world ``questions``: ``format`` (a complete one-sentence answer in
    the chat format, ``evaluation.is_chat_format_answer``) and ``exact_match`` (the reply names
    the right value); with ``unseen`` questions: ``unseen_exact_match``.
    """
    from course_utils import evaluation
    from course_utils.peft_methods import heldout_loss

    results = {"heldout_loss": heldout_loss(model, tokenizer, list(test_chats))}
    outputs = evaluation.greedy_generate(model, tokenizer, reply_prompts(test_chats, tokenizer),
                                         max_new_tokens)
    results["stop_rate"] = sum(stopped for _, stopped in outputs) / len(outputs)
    if questions:
        answers = evaluation.chat_answers(model, tokenizer, questions, max_new_tokens)
        results["format"] = evaluation.accuracy(answers, "chat_format")
        results["exact_match"] = evaluation.accuracy(answers)
        results["answers"] = answers
    if unseen:
        results["unseen_exact_match"] = evaluation.accuracy(
            evaluation.chat_answers(model, tokenizer, unseen, max_new_tokens))
    return results


def sft_model_dir():
    from course_utils.paths import artifacts_dir

    return artifacts_dir("models") / "sft"


def ensure_sft_model(profile: Profile, verbose: bool = True):
    """The merged SFT model of lesson 07 (``artifacts/models/sft/``), built now if it is missing.

    Building runs lesson 07's recipe (QLoRA on the profile's SFT data, merge, save) in one call:
    under a minute on the ``tiny`` profile.
    """
    from course_utils import data
    from course_utils.paths import artifacts_dir

    target = sft_model_dir()
    if (target / "config.json").exists():
        if verbose:
            print(f"using the SFT model of lesson 07 from {target}")
        return target
    if verbose:
        print(f"no SFT model in {target}: building it with lesson 07's recipe "
              f"({profile.sft_steps} QLoRA steps) ...")
    settings = settings_for(profile, artifacts_dir("07_qlora_sft") / "rebuild")
    model, tokenizer = load_quantized_base(profile, settings)
    trainer = make_trainer(model, tokenizer, data.load_sft_dataset(profile, "train"), settings,
                           profile)
    trainer.train()
    adapter_dir = Path(settings.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    dtype = torch.float32 if profile.device == "cpu" else torch.float16
    merged = merge_adapter(adapter_dir, settings.model_name_or_path, dtype)
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target
