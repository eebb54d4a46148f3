"""Recipes: every shipped file is valid and is what the library classes accept; a malformed one
stops with an error that names the file, the key and what was expected."""

from __future__ import annotations

import inspect
import json
import re
import shutil

import pytest
import yaml

from course_utils.course import recipes
from course_utils.course.recipes import RecipeError, load_recipe

PROFILES = ("tiny", "colab")
TRAINING_STAGES = ("sft", "reward", "ppo", "grpo", "dpo")


def library_class(stage: str):
    """The class each stage's ``training`` section becomes: the independent oracle of its keys."""
    import trl

    from course_utils import ppo

    return {"sft": trl.SFTConfig, "reward": trl.RewardConfig, "grpo": trl.GRPOConfig,
            "dpo": trl.DPOConfig, "ppo": ppo.PPOConfig}[stage]


# lessons 00 and 02-05 train the course model on every profile: their recipes exist for tiny only;
# the Hub data's selection exists for the profiles that load Hub data
SHIPPED = [(stage, profile) for stage in recipes.RECIPE_NAMES for profile in PROFILES
           if (profile == "tiny" or stage not in recipes.COURSE_MODEL_STAGES)
           and (profile != "tiny" or stage not in recipes.HUB_DATA_STAGES)]


@pytest.mark.parametrize("stage, profile", SHIPPED)
def test_every_stage_has_a_valid_recipe_per_profile(stage, profile):
    recipe = load_recipe(stage, profile)
    assert recipe.stage == stage and recipe.profile == profile
    assert recipe.path == recipes.RECIPES_DIR / profile / f"{stage}.yaml"


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_training_key_is_an_argument_of_the_library_class(stage):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    accepted = set(inspect.signature(library_class(stage)).parameters)
    lora_keys = set(inspect.signature(LoraConfig).parameters)
    bnb_keys = set(inspect.signature(BitsAndBytesConfig).parameters)
    for profile in PROFILES:
        recipe = load_recipe(stage, profile)
        assert set(recipe.training) <= accepted, set(recipe.training) - accepted
        assert set(recipe.lora or {}) <= lora_keys
        assert set(recipe.values.get("quantization") or {}) <= bnb_keys


@pytest.mark.parametrize("stage", ("sft", "reward", "dpo", "grpo"))
def test_the_tiny_recipes_build_their_trl_configs(stage, tmp_path):
    """The trl config built from the recipe carries every value of it (trl renames nothing)."""
    from course_utils import dpo, qlora_sft, reward_modeling
    from course_utils.course.profiles import tiny_profile

    recipe, profile = load_recipe(stage, "tiny"), tiny_profile()
    if stage == "sft":
        args = qlora_sft.sft_config(recipe, tmp_path, profile)
    elif stage == "reward":
        args = reward_modeling.reward_config(recipe, tmp_path, profile)
    elif stage == "dpo":
        args = dpo.dpo_config(recipe, tmp_path, profile)
    else:
        args = library_class("grpo")(output_dir=str(tmp_path), **recipe.training, use_cpu=True,
                                     **recipe.precision_flags())
    for key, value in recipe.training.items():
        actual = getattr(args, key)
        assert getattr(actual, "value", actual) == value, key
    assert args.bf16 is False and args.fp16 is False


def test_colab_recipes_keep_the_t4_on_fp16_and_tiny_on_fp32(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4
    assert load_recipe("sft", "colab").precision_flags() == {"bf16": False, "fp16": True}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    assert load_recipe("sft", "colab").precision_flags() == {"bf16": True, "fp16": False}
    assert load_recipe("sft", "tiny").torch_dtype() == torch.float32


# --- malformed recipes -----------------------------------------------------------------------------

def write_variant(tmp_path, stage="dpo", edit=None, text=None):
    """A copy of the tiny recipe of ``stage`` with ``edit(values)`` applied (or ``text``)."""
    path = tmp_path / f"{stage}.yaml"
    if text is None:
        values = yaml.safe_load(recipes.recipe_path(stage, "tiny").read_text())
        edit(values)
        text = yaml.safe_dump(values)
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["training"].update(learnig_rate=1e-4), r"unknown key 'training.learnig_rate'"),
    (lambda v: v.update(optimizer="adamw"), r"unknown key 'optimizer'"),
    (lambda v: v["training"].pop("beta"), r"missing key 'training.beta' \(a number\)"),
    (lambda v: v.pop("lora"), r"missing section 'lora'"),
    (lambda v: v.pop("seed"), r"missing key 'seed' \(an integer\)"),
    (lambda v: v["training"].update(max_steps="100"), r"'training.max_steps' must be an integer, got '100'"),
    (lambda v: v["training"].update(max_steps=10.5), r"'training.max_steps' must be an integer"),
    (lambda v: v["training"].update(activation_checkpointing="no"), r"must be true or false"),
    (lambda v: v["lora"].update(target_modules=3), r"'lora.target_modules' must be a string or a list"),
    (lambda v: v.update(precision="fp8"), r"'precision' must be one of float32"),
    (lambda v: v.update(stage="sft"), r"'stage' is 'sft' but the file is the 'dpo' recipe"),
    (lambda v: v.update(profile="colab"), r"loaded for the 'tiny' profile"),
])
def test_a_malformed_recipe_names_the_file_the_key_and_what_was_expected(tmp_path, edit, message):
    path = write_variant(tmp_path, edit=edit)
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe("dpo", "tiny", path=path)
    assert str(path) in str(error.value)


def test_invalid_yaml_and_a_missing_file_are_clear_errors(tmp_path):
    path = write_variant(tmp_path, text="training: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("dpo", "tiny", path=path)
    with pytest.raises(RecipeError, match="no recipe file at"):
        load_recipe("dpo", "tiny", path=tmp_path / "absent.yaml")
    # lessons 00 and 02-05 train the course model on every profile: tiny's recipe serves them all
    assert load_recipe("peft_methods", "colab").path == load_recipe("peft_methods", "tiny").path
    with pytest.raises(RecipeError, match="unknown stage 'ppo2'"):
        load_recipe("ppo2", "tiny")


def test_a_null_lora_section_means_full_fine_tuning_only_where_allowed(tmp_path):
    assert load_recipe("reward", "tiny").lora is None
    path = write_variant(tmp_path, stage="ppo", edit=lambda v: v.update(training=None))
    with pytest.raises(RecipeError, match="'training' must be a mapping"):
        load_recipe("ppo", "tiny", path=path)


def test_changes_are_checked_named_and_leave_the_file_alone():
    recipe = load_recipe("dpo", "tiny")
    changed = recipe.with_changes(training={"beta": 0.05})
    assert changed.training["beta"] == 0.05 and recipe.training["beta"] == 0.3
    assert changed.flat_changes() == {"training.beta": 0.05}
    assert "with training.beta=0.05" in changed.label and changed.sha256 != recipe.sha256
    assert recipe.with_changes(training={"beta": 0.3}).sha256 == recipe.sha256
    with pytest.raises(RecipeError, match="unknown key 'training.bta'"):
        recipe.with_changes(training={"bta": 0.05})
    with pytest.raises(RecipeError, match="must be a number"):
        recipe.with_changes(training={"beta": "high"})


def test_recipe_values_cannot_be_changed_through_the_returned_sections():
    recipe = load_recipe("sft", "tiny")
    recipe.training["learning_rate"] = 1.0
    assert recipe.training["learning_rate"] == load_recipe("sft", "tiny").training["learning_rate"]


def test_course_recipes_points_every_loader_at_another_folder(tmp_path, monkeypatch):
    shutil.copytree(recipes.RECIPES_DIR, tmp_path / "recipes")
    path = tmp_path / "recipes" / "tiny" / "sft.yaml"
    path.write_text(path.read_text().replace("max_steps: 150", "max_steps: 7"))
    monkeypatch.setenv(recipes.RECIPES_VARIABLE, str(tmp_path / "recipes"))
    assert load_recipe("sft", "tiny").training["max_steps"] == 7


def test_sft_script_applies_overrides_and_prints_the_effective_recipe(capsys):
    import importlib.util

    from course_utils.course.paths import REPO_ROOT
    from course_utils.course.profiles import tiny_profile

    spec = importlib.util.spec_from_file_location("sft_script", REPO_ROOT / "scripts" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--output-dir", "x", "--set", "training.max_steps=3",
                              "--set", "lora.target_modules=[q_proj, v_proj]"])
    recipe = script.resolve_recipe(args, tiny_profile())
    assert recipe.training["max_steps"] == 3 and recipe.lora["target_modules"] == ["q_proj", "v_proj"]
    assert recipe.training["learning_rate"] == load_recipe("sft", "tiny").training["learning_rate"]
    with pytest.raises(RecipeError, match="unknown key 'training.stpes'"):
        script.resolve_recipe(script.parse_args(["--output-dir", "x", "--set",
                                                 "training.stpes=3"]), tiny_profile())
    with pytest.raises(RecipeError, match="pass --profile colab"):
        script.resolve_recipe(script.parse_args(["--output-dir", "x", "--recipe", "colab"]),
                              tiny_profile())


# --- no training setting typed outside configs/recipes -------------------------------------------

SETTING = re.compile(
    r"\b(learning_rate|lr|max_steps|steps|num_train_epochs|per_device_train_batch_size|batch_size|"
    r"gradient_accumulation_steps|warmup_steps|beta|kl_coef|lora_alpha|lora_dropout|r|alpha|"
    r"num_virtual_tokens|max_new_tokens|max_length|max_completion_length|num_generations|epochs)"
    r"\s*[:=]\s*(int\s*=\s*|float\s*=\s*)?[0-9.]")

#: Lines that set such a number and train nothing, by file; the comment says why.
NOT_TRAINING = {
    # the memory model's defaults (the QLoRA paper's r=64) and optimizers built to measure bytes
    "01_full_finetuning_memory.ipynb": [
        "def qlora_memory(config, r=64, batch_size=1, seq_len=512):",
        "def method_memory(config, method, r=16, batch_size=1, seq_len=512):",
        "lambda p: torch.optim.AdamW(p, lr=1e-4)", "lambda p: bnb.optim.AdamW8bit(p, lr=1e-4)",
        "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)"],
    # parameter counting
    "02_peft_and_adapters.ipynb": ['f"LoRA r=8: {lora_gb:.1f} GB',
                                   '"LoRA r=8, all projections": LoraConfig(r=8'],
    "03_prompt_prefix_ptuning.ipynb": ["get_prompt(batch_size=2)"],  # two example inputs
    # one layer, ours against peft; the sweep's named variants
    "04_lora.ipynb": ["LoRALinear(copy.deepcopy(layer), r=8, alpha=16)",
                      'LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])',
                      "rank (alpha = 2r)", '"LoRA r=8": rank_sweep[8]', '"DoRA r=4": lora_run(4',
                      '"rslora_r8_accuracy"', '"dora_r4_accuracy"',
                      "r: int = 8, alpha: float = 16",  # LoRALinear, written in the lesson
                      "of LoRA r=8's accuracy from d =", "trainable numbers than LoRA r=8 is not",
                      # labels of runs and plot shading, not settings
                      'f"r=1, all seven (', 'f"r=8, {name} (', 'alpha=0.1, label="d90',
                      "within the noise of LoRA r=8's accuracy", 'f"  LoRA r=8: {lora_accuracy'],
    "05_ia3.ipynb": ["base_loss = heldout_loss(base_model, tokenizer, test_chats, batch_size=32,",
                     'alpha=0.4, label="tuned rate'],  # plot transparency
    # memory figures
    "06_nf4_quantization.ipynb": ["memory.lora_parameters(config, r=64",
                                  "QLoRA r=64 on all projections",
                                  "PagedAdamW32bit(layer.parameters(), lr=1e-4)"],
    "07_qlora_sft.ipynb": ['trl.DPOTrainer(model="unused", beta=0.1)'],  # an old call failing
    "08_reward_modeling.ipynb": ["bins=30, alpha=0.6"],  # plot transparency
    "09_ppo_rlhf.ipynb": ['color="gray", alpha=0.15', 'for p in curve.values()], alpha=0.2)'],  # shading
    # the derivation, checked numerically on one prompt
    "10_dpo.ipynb": ["beta = 0.1  # for this check only", "torch.optim.Adam([theta], lr=0.05)"],
    "peft_scratch.py": ["r: int = 8, alpha: float = 16"],  # LoRALinear's defaults, as peft's
    # lesson 00's fact probe, a significance level, inference batches
    "probes.py": ["max_new_tokens: int = 8", "batch_size: int = 64, max_prompt_length: int | None = None"],
    "evaluation.py": ["alpha: float = 0.05", "texts: list[str], batch_size: int = 32,"],
    # inference batches (lessons 02-05's course-model comparison); an optimizer built only to
    # count its state
    "peft_comparison.py": ["model, tokenizer, test_chats, batch_size=32,", "if p.requires_grad], lr=0.0)"],
    "rl_primer.py": ["max_steps: int = 50", "state, steps = 0, []", "rng, max_steps=200)"],  # toy corridor
    "recipes.py": ['"training.learning_rate=1e-3"'],  # a docstring
}


def test_no_training_setting_is_typed_outside_the_recipes():
    """The lessons' code cells and the package set no training number themselves; the exceptions
    above train nothing. (``builds/course_model.py`` holds the build recipe of the shipped model.)"""
    from course_utils.course.paths import NOTEBOOKS_DIR, REPO_ROOT

    sources = {path.name: "\n".join("".join(cell["source"]) for cell in
                                    json.loads(path.read_text())["cells"]
                                    if cell["cell_type"] == "code")
               for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb"))}
    sources.update({path.name: path.read_text() for path in sorted(
        (REPO_ROOT / "course_utils").rglob("*.py")) if path.parent.name != "builds"})
    typed = [f"{name}: {line.strip()}" for name, text in sources.items()
             for line in text.splitlines() if SETTING.search(line) and "!r:" not in line
             and not any(allowed in line for allowed in NOT_TRAINING.get(name, []))]
    assert not typed, "training settings typed outside configs/recipes:\n" + "\n".join(typed)


@pytest.mark.parametrize("profile", ["tiny", "colab", "rehearsal"])
def test_grpo_recipes_choose_activation_checkpointing_themselves(profile, tmp_path):
    """trl's GRPOConfig turns checkpointing on through transformers' deprecated name, which warns in
    lesson 09's output, unless the recipe says what it wants."""
    import warnings

    from trl import GRPOConfig

    recipe = load_recipe("grpo", profile)
    assert "activation_checkpointing" in recipe.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        GRPOConfig(output_dir=str(tmp_path), **recipe.training, use_cpu=True, report_to=[])
