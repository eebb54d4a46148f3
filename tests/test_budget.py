"""The T4 budget (course_utils.budget): every colab phase fits a T4 and every lesson a Colab session,
by lesson 01's memory model; the model sizes it starts from are checked against the real model."""

from __future__ import annotations

import torch

from course_utils import budget, memory
from course_utils.course.models import tinyllama_config


def test_every_phase_fits_a_t4_and_every_lesson_half_an_hour():
    phases = budget.course_phases()
    assert {p.lesson for p in phases} == {"07", "08", "09", "10", "11"}
    for phase in phases:
        assert phase.peak_gb <= budget.LIMIT_GB, (phase.lesson, phase.name, phase.peak_gb)
    for lesson, minutes in budget.lesson_minutes(phases).items():
        assert minutes <= budget.LIMIT_MINUTES, (lesson, minutes)


def test_model_sizes_match_tinyllama_built_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    config = tinyllama_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    numel = sum(p.numel() for p in model.parameters())
    assert budget.model_bytes("fp16") == 2 * numel
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    expected_nf4 = linear * memory.nf4_bits_per_parameter() / 8 + (numel - linear) * 2
    assert budget.model_bytes("nf4") == expected_nf4
    head = model.lm_head.weight.numel()
    assert budget.model_bytes("reward") == 2 * (numel - head + config.hidden_size)


def test_the_old_colab_recipes_would_not_have_fit():
    """The recipes before sizing (SFT 200 steps x 16 chats, DPO 200 x 16 pairs) break the budget:
    the test above can fail."""
    from course_utils.course import recipes

    original = recipes.load_recipe
    sizes = {"sft": {"max_steps": 200, "gradient_accumulation_steps": 4},
             "dpo": {"max_steps": 200, "gradient_accumulation_steps": 8}}

    def old_load(stage, profile, path=None):
        recipe = original(stage, profile, path)
        return recipe.with_changes(training=sizes[stage]) if stage in sizes else recipe

    budget.load_recipe = old_load
    try:
        minutes = budget.lesson_minutes(budget.course_phases())
    finally:
        budget.load_recipe = original
    assert minutes["07"] > budget.LIMIT_MINUTES and minutes["10"] > budget.LIMIT_MINUTES
