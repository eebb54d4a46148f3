"""QLoRA supervised fine-tuning with trl, shared by lesson 07 and ``scripts/sft.py``.

One code path for the notebook, the command line and multi-process runs:

- ``prompt_completion_rows``: every assistant reply as a trl prompt/completion row, trained with
  ``completion_only_loss`` (loss on the reply only), rendered with TinyLlama's template and
  ``<s>`` first (``TRAINING_CHAT_TEMPLATE``), exactly the tokens inference sees.
- every setting comes from the recipe ``configs/recipes/<profile>/sft.yaml``
  (``recipes.load_recipe("sft", profile)``): ``sft_config``, ``lora_config`` and
  ``load_quantized`` (through ``models.bnb_config_from_recipe``) turn its sections into
  ``SFTConfig``, ``LoraConfig`` and ``BitsAndBytesConfig``;
- ``make_trainer``: trl ``SFTTrainer`` with loss on the replies only;
- ``build_sft_model``: the same recipe as a rebuild of lesson 07's model
  (``pipeline.ensure_stage("sft", profile)``).
- ``merge_adapter``: the adapter merged into a 16- or 32-bit copy of the base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training

from course_utils import probes
from course_utils.course import data
from course_utils.course.chat import IGNORE_INDEX, TINYLLAMA_CHAT_TEMPLATE
from course_utils.course.models import (
    bnb_config_from_recipe,
    keep_cpu_4bit_weights_trainable,
    load_model_and_tokenizer,
    trainable_in_fp32_under_fp16,
)
from course_utils.course.paths import artifacts_dir
from course_utils.course.profiles import Profile
from course_utils.course.recipes import ran_with
from course_utils.numerics import heldout_loss

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


def lora_config(recipe):
    """peft ``LoraConfig`` from the recipe's ``lora`` section (all seven projections in the
    course's recipes: QLoRA's choice)."""
    from peft import LoraConfig

    return LoraConfig(**recipe.lora, task_type="CAUSAL_LM")


def sft_config(recipe, output_dir: str | Path, profile: Profile):
    """trl ``SFTConfig``: the recipe's ``training`` section, its precision and seed, and the
    course's plumbing (no reports, no worker processes, a progress bar).

    trl 1.x defaults to ``bf16=True`` and activation (gradient) checkpointing on, so both come from
    the recipe explicitly (``activation_checkpointing``, transformers 5's name for
    ``gradient_checkpointing``); on the CPU the run computes in fp32 (``use_cpu=True``).
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), **recipe.training, **recipe.trainer_plumbing(profile),
        activation_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
        disable_tqdm=False)


def prepare_for_qlora(model, activation_checkpointing: bool):
    """Lesson 07's two steps after an NF4 load, written once for every path that trains on 4-bit
    weights (SFT, DPO, lesson 05's QLoRA row): bitsandbytes' CPU repacking switched off
    (``models.keep_cpu_4bit_weights_trainable``), then ``prepare_model_for_kbit_training`` (norms in
    fp32, input gradients for checkpointing) with the recipe's ``activation_checkpointing``."""
    keep_cpu_4bit_weights_trainable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)


def load_quantized(profile: Profile, recipe, model_name_or_path: str | Path | None = None):
    """``(model, tokenizer)``: NF4 weights as the recipe's ``quantization`` section says, prepared
    for QLoRA (``prepare_for_qlora``); plain weights in the profile's precision without one."""
    quantization = bnb_config_from_recipe(recipe)
    model, tokenizer = load_model_and_tokenizer(
        profile, load_in_4bit=quantization is not None, quantization_config=quantization,
        model_name_or_path=model_name_or_path)
    if quantization is not None:
        model = prepare_for_qlora(model, recipe.training["activation_checkpointing"])
    return model, tokenizer


def load_quantized_base(profile: Profile, recipe, model_name_or_path: str | Path | None = None):
    """The base model for QLoRA SFT (``load_quantized``), its generation cache off for training."""
    model, tokenizer = load_quantized(profile, recipe, model_name_or_path)
    model.config.use_cache = False  # the cache is for generation, and checkpointing refuses it
    return model, tokenizer


def make_trainer(model, tokenizer, train_dataset, recipe, profile: Profile, output_dir,
                 eval_dataset=None):
    """trl ``SFTTrainer`` for LoRA on ``model`` (loss on the replies only in the recipes)."""
    from trl import SFTTrainer

    torch.manual_seed(recipe.seed)
    trainer = SFTTrainer(model=model, args=sft_config(recipe, output_dir, profile),
                         train_dataset=prompt_completion_rows(train_dataset),
                         eval_dataset=None if eval_dataset is None
                         else prompt_completion_rows(eval_dataset),
                         processing_class=training_tokenizer(tokenizer),
                         peft_config=lora_config(recipe))
    trainable_in_fp32_under_fp16(trainer)  # trl's bf16 adapters would crash a T4's fp16 grad scaler
    return trainer


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


def evaluate_chat_model(model, tokenizer, test_chats, questions=None, unseen=None, *,
                        max_new_tokens: int, batch_size: int, max_length: int) -> dict:
    """Lesson 07's before/after numbers for ``model``.

    Always: ``heldout_loss`` (mean cross-entropy on the replies of ``test_chats``) and
    ``stop_rate`` (greedy replies to their first question that end with ``</s>`` within
    ``max_new_tokens``). With world ``questions``: ``format`` (a complete one-sentence answer in
    the chat format, ``probes.is_chat_format_answer``) and ``exact_match`` (the reply names
    the right value); with ``unseen`` questions: ``unseen_exact_match``. ``batch_size`` and
    ``max_length`` (the evaluation recipe's ``chat`` section) bound every forward pass.
    """

    results = {"heldout_loss": heldout_loss(model, tokenizer, list(test_chats),
                                            batch_size=batch_size, max_length=max_length)}
    outputs = probes.greedy_generate(model, tokenizer, reply_prompts(test_chats, tokenizer),
                                         max_new_tokens, batch_size=batch_size,
                                         max_prompt_length=max_length - max_new_tokens)
    results["stop_rate"] = sum(stopped for _, stopped in outputs) / len(outputs)
    if questions:
        answers = probes.chat_answers(model, tokenizer, questions, max_new_tokens)
        results["format"] = probes.accuracy(answers, "chat_format")
        results["exact_match"] = probes.accuracy(answers)
        results["answers"] = answers
    if unseen:
        results["unseen_exact_match"] = probes.accuracy(
            probes.chat_answers(model, tokenizer, unseen, max_new_tokens))
    return results


def merge_dtype(profile: Profile) -> torch.dtype:
    """The dtype adapters are merged in: fp32 on the CPU, fp16 on a GPU (never the 4-bit weights
    QLoRA trained against)."""
    return torch.float32 if profile.device == "cpu" else torch.float16


def build_sft_model(profile: Profile, recipe, parents: dict[str, Path], verbose: bool = True):
    """Lesson 07's recipe in one call (QLoRA on the profile's SFT data, then the adapter merged):
    returns ``(merged model, tokenizer, what the run used)`` for ``pipeline.build_stage``."""

    output_dir = artifacts_dir("07_qlora_sft") / "rebuild"
    model, tokenizer = load_quantized_base(profile, recipe)
    trainer = make_trainer(model, tokenizer, data.load_sft_dataset(profile, "train"), recipe,
                           profile, output_dir)
    trainer.args.disable_tqdm = not verbose
    trainer.train()
    used = ran_with(recipe, trainer.args, trainer.model)
    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    merged = merge_adapter(adapter_dir, profile.model_name_or_path, merge_dtype(profile))
    return merged, tokenizer, used
