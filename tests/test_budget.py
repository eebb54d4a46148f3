"""The T4 budget (course_utils.budget): every colab phase fits a T4 and every lesson a Colab session,
by lesson 01's memory model; the model sizes it starts from are checked against the real model."""

from __future__ import annotations

import pytest
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


# --- the budget against a trace of every phase at full scale (course_utils.course.gpu_trace) -------

def _phase(phases, words):
    return next(p for p in phases if words in p[0].name) if isinstance(phases[0], tuple) else \
        next(p for p in phases if words in p.name)


def test_the_budget_agrees_with_a_full_scale_trace_and_the_file_is_current():
    """Every colab phase traced again (TinyLlama-1.1B, its vocabulary, the recipes' batches and
    lengths, fp16 as on a T4; under a minute on a CPU): the committed ``t4/trace.json`` holds these
    numbers, every phase fits 14 GB, and the budget's prediction is within 10% of the trace."""
    import json

    recorded = json.loads(budget.TRACE_FILE.read_text())
    assert recorded["recipes_sha256"] == budget.trace_inputs()["recipes_sha256"], \
        "the colab recipes changed: run `python -m course_utils.budget --trace`"
    traced = budget.trace_phases()
    assert [row["phase"] for row in recorded["phases"]] == [phase.name for phase, _ in traced]
    for row, (phase, peak) in zip(recorded["phases"], traced):
        traced_gb = peak["total"] / budget.GB + budget.CUDA_CONTEXT_GB
        assert abs(row["traced_gb"] - traced_gb) < 0.01, (phase.name, row["traced_gb"], traced_gb)
        assert abs(row["predicted_gb"] - phase.peak_gb) < 0.01, (phase.name, "rerun budget --trace")
        assert traced_gb <= budget.LIMIT_GB, (phase.name, traced_gb)
        assert abs(phase.peak_gb - traced_gb) <= 0.10 * traced_gb, (phase.name, phase.peak_gb, traced_gb)


def test_the_trace_and_the_budget_both_refuse_the_old_pair_scoring_batch(monkeypatch):
    """Issue 35, finding 3: 32 pairs per ``pair_logprobs`` pass (64 rows of 1,024 tokens) would not
    fit a T4, by the trace and by the budget alike."""
    from course_utils.course import recipes

    original = recipes.load_recipe

    def old_load(stage, profile, path=None):
        recipe = original(stage, profile, path)
        return recipe.with_changes(scoring={"dpo_pairs_batch_size": 32}) if stage == "evaluation" \
            else recipe

    monkeypatch.setattr(budget, "load_recipe", old_load)
    phases = budget.course_phases()
    index = next(i for i, p in enumerate(phases) if p.name.startswith("held-out pairs scored"))
    [(phase, peak)] = budget.trace_phases(only={index})
    assert peak["total"] / budget.GB > budget.LIMIT_GB and phase.peak_gb > budget.LIMIT_GB
    assert abs(phase.peak_gb - budget.CUDA_CONTEXT_GB - peak["total"] / budget.GB) < 0.02 * phase.peak_gb


def test_one_traced_layer_keeps_what_lesson_01_counts():
    """The layer trace against an independent count: an fp32 Llama decoder layer trained in full,
    without checkpointing, keeps per token the per-layer bytes of ``memory.activation_bytes``
    (lesson 01's count, itself checked against the CPU's allocator in tests/test_memory.py)."""
    from course_utils.course import gpu_trace

    config = tinyllama_config()
    config.num_hidden_layers = 1
    model = gpu_trace.meta_model(config, dtype=torch.float32)
    tokens = 256
    with gpu_trace.fake_tensors():
        gpu_trace.materialize(model)
        model.train()
        traced = gpu_trace.layer_bytes_per_token(model, torch.float32, autocast=False, tokens=tokens)
    layer_and_head = memory.activation_bytes(config, 1, tokens)
    config.num_hidden_layers = 2
    per_layer = memory.activation_bytes(config, 1, tokens) - layer_and_head
    assert traced["saved"] * tokens == pytest.approx(per_layer, rel=0.02)


def test_the_readme_t4_column_states_the_budgets_minutes_and_the_traced_peaks():
    import json
    import re

    from course_utils.course.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    minutes = budget.lesson_minutes()
    traced = json.loads(budget.TRACE_FILE.read_text())["phases"]
    for lesson in ("07", "08", "09", "10", "11"):
        row = re.search(rf"^\| {lesson} \| .*\| ([^|]*) \|$", readme, re.MULTILINE)
        assert row, lesson
        peak = max(r["traced_gb"] for r in traced if r["lesson"] == lesson)
        assert row.group(1) == f"predicted ~{minutes[lesson]:.0f} min, {peak:.1f} GB peak traced", lesson


def test_the_gpu_scripts_phase_runner_runs_every_kind_of_step_on_real_tensors():
    """``scripts/t4_check.py`` runs the budget's phases on a GPU on real tensors
    (``trace_phases(device="cuda")``). No GPU here: the same code on real CPU tensors, at a small
    width, for a training step on 16-bit weights with dropout, a QLoRA DPO step on 4-bit weights,
    and generation's prefill with the reward model after it (dropout and trl's fused LM head with
    CUDA's memory behaviour, as in the trace). The CPU's own attention and 4-bit matmul kernels keep
    somewhat different tensors from the fake trace, hence the loose agreement asked for."""
    config = tinyllama_config()
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 256, 512
    config.vocab_size, config.head_dim = 1024, 8
    phases = budget.course_phases(config)
    chosen = {i for i, p in enumerate(phases)
              if p.lesson == "08" or p.name in ("QLoRA DPO", "best-of-n pool (the PPO policy kept)")}
    assert len(chosen) == 3
    fake = budget.trace_phases(config, only=chosen)
    real = budget.trace_phases(config, only=chosen, device="cpu")
    for (phase, traced), (_, measured) in zip(fake, real):
        assert abs(measured["total"] - traced["total"]) < 0.25 * traced["total"], phase.name


def test_each_lesson_header_states_the_t4_prediction_the_readme_states():
    import json
    import re

    from course_utils.course.paths import REPO_ROOT

    minutes = budget.lesson_minutes()
    traced = json.loads(budget.TRACE_FILE.read_text())["phases"]
    for lesson in ("07", "08", "09", "10", "11"):
        path = next((REPO_ROOT / "notebooks").glob(f"{lesson}_*.ipynb"))
        header = "".join(json.loads(path.read_text())["cells"][0]["source"])
        peak = max(r["traced_gb"] for r in traced if r["lesson"] == lesson)
        stated = re.search(r"T4 \(`colab`\): predicted ~(\d+) min, ([\d.]+) GB peak traced", header)
        assert stated, f"{path.name}'s header does not state its T4 prediction"
        assert stated.groups() == (f"{minutes[lesson]:.0f}", f"{peak:.1f}"), path.name
