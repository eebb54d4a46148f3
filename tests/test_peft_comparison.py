"""The PEFT comparison harness: each method trains only its own parameters, has the expected
size, and saves and reloads to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from course_utils import memory, peft_comparison, peft_scratch
from course_utils.paths import COURSE_MODEL_DIR, WORLD_DIR


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    from course_utils.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR)
    with (WORLD_DIR / "sft_train.jsonl").open() as file:
        chats = [json.loads(line) for line in file][:64]
    with (WORLD_DIR / "eval_qa.jsonl").open() as file:
        questions = [json.loads(line) for line in file][:8]
    return base, load_tokenizer(COURSE_MODEL_DIR), chats, questions


def expected_trainable(name, config):
    layers, hidden = config.num_hidden_layers, config.hidden_size
    kv = memory.linear_shapes(config)["k_proj"][1]
    methods = peft_comparison.methods_recipe().methods
    return {
        "full": memory.count_parameters(config),
        "houlsby": 2 * layers * peft_scratch.adapter_parameters(
            hidden, methods["houlsby"]["bottleneck"]),
        "prompt_tuning": methods["prompt_tuning"]["num_virtual_tokens"] * hidden,
        "lora": memory.lora_parameters(config, methods["lora"]["r"],
                                       methods["lora"]["target_modules"]),
        "ia3": layers * (2 * kv + config.intermediate_size),
    }.get(name)


@pytest.mark.parametrize("name", peft_comparison.METHODS)
def test_method_trains_its_parameters_and_reloads_exactly(setup, name):
    base, tokenizer, chats, questions = setup
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    quick = peft_comparison.methods_recipe().with_changes(training={"steps": 3, "batch_size": 8})
    model, row = peft_comparison.run_method(name, base, tokenizer, chats, chats[:8], questions, quick)
    assert row.reload_max_abs_error < 1e-5
    expected = expected_trainable(name, base.config)
    if expected is not None:
        assert row.trainable_parameters == expected
    assert 0 < row.trainable_parameters <= memory.count_parameters(base.config)
    assert row.saved_bytes > 0 and row.seconds_per_step > 0 and row.training_bytes > 0
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # base untouched
    untrained = dict(peft_comparison.make_method(name, base).named_parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(dict(model.named_parameters())[n], untrained[n]) for n in trained)


def test_unknown_method_is_rejected(setup):
    with pytest.raises(ValueError, match="unknown method"):
        peft_comparison.make_method("bitfit", setup[0])


def test_lessons_02_to_05_at_tinyllamas_scale():
    """Deliverable of the T4 issue: the methods built on TinyLlama (its config on the meta device
    under tiny; the rehearsal's stand-in with weights and a timed step), counted as the memory
    model and TinyLlama's real size say."""
    from course_utils import data, memory, peft_comparison
    from course_utils.models import tinyllama_config
    from course_utils.profiles import rehearsal_profile, tiny_profile

    chats = list(data.load_sft_dataset(tiny_profile(), "train"))[:4]
    rows = {r["method"]: r for r in peft_comparison.scale_rows(tiny_profile(), ["full", "lora"], chats)}
    config = tinyllama_config()
    lora = peft_comparison.methods_recipe().methods["lora"]
    assert rows["full"]["trainable"] == memory.count_parameters(config)
    assert rows["lora"]["trainable"] == memory.lora_parameters(config, lora["r"], lora["target_modules"])
    assert rows["lora"]["step_seconds"] is None
    rehearsal = rehearsal_profile()
    timed = peft_comparison.scale_rows(rehearsal, ["ia3", "prefix_tuning"], chats)
    assert all(r["step_seconds"] > 0 and 0 < r["percent"] < 5 for r in timed)
    assert "course model" in peft_comparison.where_it_runs(rehearsal)
