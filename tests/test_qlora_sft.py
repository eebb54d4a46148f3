"""Lesson 07's SFT code path: the training template, what trl trains on, the multi-process script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import yaml

from course_utils import qlora_sft
from course_utils.course import chat, data, world
from course_utils.course.paths import REPO_ROOT, WORLD_DIR
from course_utils.course.profiles import tiny_profile
from course_utils.course.recipes import load_recipe
from course_utils.grading.checks import grader_rng, random_conversation
from course_utils.memory import LORA_TARGETS


def conversations(count: int = 30):
    rng = grader_rng()
    return [random_conversation(rng) for _ in range(count)]


@pytest.mark.parametrize("template", ["TRAINING_CHAT_TEMPLATE", "MARKED_CHAT_TEMPLATE"])
def test_course_templates_render_byte_identically_to_tinyllamas(tokenizer, template):
    for messages in conversations():
        for generation_prompt in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": generation_prompt}
            original = tokenizer.apply_chat_template(messages, **kwargs)
            ours = tokenizer.apply_chat_template(messages, chat_template=getattr(qlora_sft, template),
                                                 **kwargs)
            assert ours == original
            assert original == chat.render_chat(messages, generation_prompt)


def test_training_template_with_add_bos_gives_the_tokens_inference_sees(tokenizer):
    for messages in conversations():
        ids = tokenizer.apply_chat_template(messages, chat_template=qlora_sft.TRAINING_CHAT_TEMPLATE,
                                            tokenize=True, return_dict=True,
                                            add_bos=True)["input_ids"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert ids == tokenizer(text)["input_ids"] and ids[0] == tokenizer.bos_token_id


def test_marked_template_masks_sometimes_drop_a_replys_first_token_with_this_tokenizer(tokenizer):
    """Why lesson 07 trains on prompt/completion rows: transformers finds reply tokens by
    character offsets, and where the course tokenizer splits off the space it inserts after a
    line break as a token of its own, that token maps to the line break, outside the reply."""
    from trl.chat_template_utils import has_generation_markers

    assert not has_generation_markers(chat.TINYLLAMA_CHAT_TEMPLATE)
    assert has_generation_markers(qlora_sft.MARKED_CHAT_TEMPLATE)
    dropped = 0
    for messages in conversations():
        out = tokenizer.apply_chat_template(messages, chat_template=qlora_sft.MARKED_CHAT_TEMPLATE,
                                            tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        _, labels = chat.assistant_only_labels(tokenizer, messages)
        ours = [int(label != chat.IGNORE_INDEX) for label in labels][1:]  # without <s>
        for i, (mine, theirs) in enumerate(zip(ours, out["assistant_masks"])):
            if mine != theirs:
                assert (mine, theirs) == (1, 0) and ours[i - 1] == 0  # a reply's first token
                assert tokenizer.convert_ids_to_tokens(out["input_ids"][i]) == "Ġ"
                dropped += 1
    assert dropped > 0


def test_every_reply_becomes_one_prompt_completion_row():
    from datasets import Dataset

    chats = Dataset.from_list([{"messages": m} for m in conversations(10)])
    rows = qlora_sft.prompt_completion_rows(chats)
    assert len(rows) == sum(m["role"] == "assistant" for c in chats for m in c["messages"])
    for row in rows:
        assert row["completion"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
        assert row["chat_template_kwargs"] == {"add_bos": True}


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory):
    profile = tiny_profile()
    recipe = load_recipe("sft", profile).with_changes(training={"max_steps": 2})
    model, tokenizer = qlora_sft.load_quantized_base(profile, recipe)
    train = data.load_sft_dataset(profile, "train").select(range(40))
    return (qlora_sft.make_trainer(model, tokenizer, train, recipe, profile,
                             tmp_path_factory.mktemp("sft")), tokenizer, train)


def test_trl_trains_on_exactly_each_reply(tiny_trainer):
    """trl's tokens are what inference sees, and its loss covers exactly the reply, its </s>
    and the line break the template writes after it: the course's own label mask for that
    reply, plus that line break."""
    trainer, tokenizer, train = tiny_trainer
    rows = qlora_sft.prompt_completion_rows(train)
    assert len(trainer.train_dataset) == len(rows)
    for row, source in zip(trainer.train_dataset, rows):
        ids, labels = chat.assistant_only_labels(tokenizer, source["prompt"] + source["completion"])
        assert row["input_ids"] == ids
        prompt_length = len(tokenizer(tokenizer.apply_chat_template(
            source["prompt"], tokenize=False, add_generation_prompt=True))["input_ids"])
        expected = [chat.IGNORE_INDEX] * prompt_length + labels[prompt_length:-1] + ids[-1:]
        assert row["labels"] == expected
        assert tokenizer.decode(ids[-1:]) == "\n" and labels[-2] == tokenizer.eos_token_id
        assert (row["input_ids"], row["labels"]) == qlora_sft.tokenize_prompt_completion(
            tokenizer, source["prompt"], source["completion"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for i in range(4):
        row = trainer.train_dataset[i]
        assert batch["labels"][i, :len(row["labels"])].tolist() == row["labels"]
        assert (batch["labels"][i, len(row["labels"]):] == chat.IGNORE_INDEX).all()


def test_the_run_is_real_qlora_with_explicit_precision(tiny_trainer):
    trainer, _, _ = tiny_trainer
    args = trainer.args
    assert args.bf16 is False and args.fp16 is False and args.use_cpu
    assert args.completion_only_loss and args.lr_scheduler_type == "cosine"
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert n_4bit == 6 * 7  # every projection of every layer is NF4 underneath its adapter
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == set(LORA_TARGETS)
    state = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    assert any(not torch.equal(state[k], v) for k, v in trainer.model.named_parameters()
               if k in state)


def test_the_recipes_hold_the_literature_recipe_on_colab_and_a_cpu_recipe_on_tiny():
    """colab: the QLoRA recipe issue 7 quotes from the literature; tiny: no paged optimizer (it
    needs CUDA) and no checkpointing; and the trl config built from a recipe carries its values."""
    colab = load_recipe("sft", "colab")
    assert (colab.lora["r"], colab.lora["lora_alpha"], colab.lora["lora_dropout"]) == (64, 32, 0.1)
    assert colab.training["learning_rate"] == 2e-4
    assert colab.training["lr_scheduler_type"] == "cosine"
    assert colab.training["optim"] == "paged_adamw_32bit"
    assert colab.training["activation_checkpointing"] and colab.quantization["load_in_4bit"]
    assert colab.quantization["bnb_4bit_quant_type"] == "nf4"
    tiny = load_recipe("sft", "tiny")
    assert tiny.training["optim"] == "adamw_torch" and not tiny.training["activation_checkpointing"]
    args = qlora_sft.sft_config(tiny, "unused", tiny_profile())
    assert args.learning_rate == tiny.training["learning_rate"] and args.seed == tiny.seed
    assert args.optim.value == "adamw_torch" and args.max_length == tiny.training["max_length"]
    assert qlora_sft.lora_config(tiny.with_changes(lora={"r": 4})).r == 4


def test_unseen_characters_never_occur_in_the_shipped_data():
    text = "".join(p.read_text() for p in WORLD_DIR.glob("*"))
    assert not [name for name in world.UNSEEN_NAMES if name in text]
    questions = world.unseen_questions()
    assert len(questions) == len(world.UNSEEN_NAMES) * len(world.ATTRIBUTES)
    assert 0 < world.chance_accuracy(questions) < 0.1


def test_an_evaluation_pass_does_not_change_what_training_computes():
    """bitsandbytes' CPU fast path repacks 4-bit weights on the first no-grad forward and then
    computes training forwards differently; load_quantized_base switches it off."""
    from bitsandbytes.cextension import lib  # noqa: F401  (the native library is loaded)
    from bitsandbytes.functional import has_avx512bf16

    from course_utils.course.models import load_model_and_tokenizer

    profile = tiny_profile()
    recipe = load_recipe("sft", profile)
    batch = None
    for guarded in (True, False):
        if guarded:
            model, tokenizer = qlora_sft.load_quantized_base(profile, recipe)
        else:
            model, tokenizer = load_model_and_tokenizer(profile, load_in_4bit=True)
        batch = batch or tokenizer(["Odile lives in Fenwick and", "Who"], return_tensors="pt",
                                   padding=True)
        model.train()
        training_before = model(**batch).logits.detach()
        with torch.no_grad():
            model.eval()
            model(**batch)
        model.train()
        training_after = model(**batch).logits.detach()
        if guarded:
            assert torch.equal(training_before, training_after)
        elif has_avx512bf16():  # the machine where the pitfall exists: show it is real
            assert not torch.equal(training_before, training_after)


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel_and_the_adapter_loads(tmp_path):
    env = {**os.environ, "COURSE_PROFILE": "tiny", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29531", str(REPO_ROOT / "scripts" / "sft.py"), "--profile",
               "tiny", "--output-dir", str(tmp_path), "--set", "training.max_steps=3",
               "--train-rows", "96"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["steps"] for r in reports] == [3, 3]
    # each process trained on its own share of the data (the world repeats some questions, so a
    # few identical rows land on both), and the averaged gradients kept the adapters in sync
    assert all(r["examples_seen"] >= 3 * 16 for r in reports)
    seen = [set(r["example_fingerprints"]) for r in reports]
    assert len(seen[0] & seen[1]) < 0.5 * min(len(seen[0]), len(seen[1]))
    assert reports[0]["adapter_checksum"] == reports[1]["adapter_checksum"]
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_are_valid(name):
    from accelerate.utils import DistributedType

    config = yaml.safe_load((REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())
    assert config["distributed_type"] in {t.value for t in DistributedType}
    assert config["num_processes"] >= 2 and config["use_cpu"] is False
    if name.startswith("deepspeed"):
        assert config["deepspeed_config"]["zero_stage"] == int(name[-1])
    assert f"configs/accelerate/{name}.yaml scripts/sft.py" in (
        REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text()


def test_trl_keeps_a_4bit_models_adapters_in_bf16_whatever_the_precision():
    """Finding 11: what lesson 07 says. On the CPU (fp32) they stay in bf16; under fp16 (a T4, and
    the rehearsal) ``make_trainer`` casts them to fp32, which is what the T4 budget counts
    (tests/test_rehearsal.py shows the fp16 gradient scaler refusing them otherwise)."""
    from course_utils import qlora_sft
    from course_utils.course import data, recipes
    from course_utils.course.profiles import tiny_profile

    profile = tiny_profile()
    recipe = recipes.load_recipe("sft", profile).with_changes(training={"max_steps": 1})
    assert recipe.torch_dtype() == torch.float32
    model, tokenizer = qlora_sft.load_quantized_base(profile, recipe)
    chats = data.load_sft_dataset(profile, "train").select(range(8))
    trainer = qlora_sft.make_trainer(model, tokenizer, chats, recipe, profile, "/tmp/unused-sft")
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}


def test_the_rebuild_path_trains_with_the_recipes_activation_checkpointing(monkeypatch, tmp_path):
    """Lesson 07's model rebuilt through ``pipeline.BUILDERS["sft"]`` (as ``ensure_stage`` and
    ``scripts/sft.py`` build it) prepares its NF4 base with the recipe's ``activation_checkpointing``
    and trains with it. It once read ``gradient_checkpointing``, a key the schema no longer allows,
    so checkpointing never reached ``prepare_model_for_kbit_training`` on the colab recipe."""
    from course_utils import pipeline
    from course_utils.course import paths

    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path)
    prepared, trained = [], []
    real_prepare, real_train = qlora_sft.prepare_model_for_kbit_training, qlora_sft.make_trainer

    def prepare(model, use_gradient_checkpointing=True, **kwargs):
        prepared.append(use_gradient_checkpointing)
        return real_prepare(model, use_gradient_checkpointing=use_gradient_checkpointing, **kwargs)

    def make_trainer(model, *args, **kwargs):
        trainer = real_train(model, *args, **kwargs)
        trained.append((trainer.args.activation_checkpointing,
                        trainer.model.get_base_model().is_activation_checkpointing))
        return trainer

    monkeypatch.setattr(qlora_sft, "prepare_model_for_kbit_training", prepare)
    monkeypatch.setattr(qlora_sft, "make_trainer", make_trainer)
    profile = tiny_profile()
    for flag in (True, False):
        recipe = load_recipe("sft", profile).with_changes(
            training={"max_steps": 1, "activation_checkpointing": flag})
        _, _, used = pipeline.BUILDERS["sft"](profile, recipe, {}, verbose=False)
        assert used["training"]["activation_checkpointing"] is flag
    assert prepared == [True, False]
    assert trained == [(True, True), (False, False)]
