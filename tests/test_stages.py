"""Saved stages know what built them: a model is reused only while its record matches today's
recipe and inputs; otherwise it is rebuilt with the same recipe, or the lesson stops and names the
lesson to rerun. The stages are built for real, through the rebuild path, from recipes with tiny
step counts (a copy of configs/recipes in a temporary folder)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from course_utils import pipeline
from course_utils.course import paths, recipes, stages
from course_utils.course.profiles import tiny_profile

SMALL = {"sft": {"max_steps: 150": "max_steps: 2"},
         "reward": {"max_steps: 150": "max_steps: 2"},
         "dpo": {"max_steps: 60": "max_steps: 2"},
         "ppo": {"steps: 40 ": "steps: 1 ", "batch_size: 32": "batch_size: 4",
                 "minibatch_size: 16": "minibatch_size: 4"}}


def edit_recipe(folder, stage, replacements):
    path = folder / "tiny" / f"{stage}.yaml"
    text = path.read_text()
    for old, new in replacements.items():
        assert old in text, (stage, old)
        text = text.replace(old, new)
    path.write_text(text)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """Small recipes and an empty artifacts folder, then every stage built by one call."""
    root = tmp_path_factory.mktemp("stages")
    shutil.copytree(recipes.RECIPES_DIR, root / "recipes")
    for stage, replacements in SMALL.items():
        edit_recipe(root / "recipes", stage, replacements)
    patch = pytest.MonkeyPatch()
    patch.setenv(recipes.RECIPES_VARIABLE, str(root / "recipes"))
    patch.setattr(paths, "ARTIFACTS_DIR", root / "artifacts")
    patch.delenv(stages.REBUILD_VARIABLE, raising=False)
    profile = tiny_profile()
    torch.manual_seed(0)
    pipeline.ensure_stage("ppo", profile, verbose=False)  # builds sft, reward, then ppo
    pipeline.ensure_stage("dpo", profile, verbose=False)
    yield root, profile
    patch.undo()


def test_the_rebuild_path_records_what_built_each_stage(course):
    root, profile = course
    for stage in ("sft", "reward", "ppo", "dpo"):
        record = stages.read_record(stage)
        recipe = recipes.load_recipe(stage, profile)
        assert (stages.stage_dir(stage) / "config.json").exists()
        assert record["recipe"] == recipe.values and record["recipe_sha256"] == recipe.sha256
        assert record["ran_with"]["training"] == recipe.training  # read back from the trainer
        assert record["ran_with"]["seed"] == recipe.seed
        assert record["built_by"] == "rebuild" and record["versions"]["trl"]
        for parent in stages.STAGES[stage].parents:  # the very parent model on disk
            assert record["parents"][parent] == stages.read_record(parent)["key"]
        assert stages.why_stale(stage, profile) is None
    assert stages.read_record("sft")["inputs"]["base_model"].startswith("sha256:")
    assert stages.read_record("sft")["ran_with"]["lora"]["r"] == 16
    assert stages.read_record("reward")["ran_with"]["lora"] is None  # full fine-tuning on tiny


def test_a_current_stage_is_reused_and_says_which_recipe_built_it(course, capsys):
    _, profile = course
    before = stages.read_record("reward")["date"], stages.read_record("sft")["date"]
    pipeline.ensure_stage("reward", profile)
    out = capsys.readouterr().out
    assert "using the reward model of lesson 08" in out and "reward.yaml" in out
    assert (stages.read_record("reward")["date"], stages.read_record("sft")["date"]) == before


def test_editing_a_recipe_stops_a_later_lesson_with_rebuilding_off(course, monkeypatch):
    root, profile = course
    edit_recipe(root / "recipes", "sft", {"lora_dropout: 0.05": "lora_dropout: 0.1"})
    try:
        assert "lora.lora_dropout: 0.05 -> 0.1" in stages.why_stale("sft", profile)
        assert "'sft' model other than" in stages.why_stale("ppo", profile)
        assert stages.why_stale("dpo", profile) is not None
        with pytest.raises(stages.StaleStageError, match=r"07_qlora_sft\.ipynb again"):
            pipeline.ensure_stage("ppo", profile, rebuild=False)
        monkeypatch.setenv(stages.REBUILD_VARIABLE, "never")
        with pytest.raises(stages.StaleStageError, match=r"lora_dropout: 0.05 -> 0.1"):
            pipeline.ensure_stage("dpo", profile)
    finally:
        edit_recipe(root / "recipes", "sft", {"lora_dropout: 0.1": "lora_dropout: 0.05"})
    assert stages.why_stale("ppo", profile) is None  # the edit undone, the models fit again


def test_editing_a_recipe_rebuilds_that_stage_and_what_depends_on_it(course, capsys):
    root, profile = course
    old = {stage: stages.read_record(stage)["key"] for stage in ("sft", "reward", "dpo")}
    edit_recipe(root / "recipes", "reward", {"learning_rate: 3.0e-4": "learning_rate: 1.0e-4"})
    assert "learning_rate: 0.0003 -> 0.0001" in stages.why_stale("reward", profile)
    assert stages.why_stale("ppo", profile).startswith("it was built from a 'reward' model")
    pipeline.ensure_stage("reward", profile)
    out = capsys.readouterr().out
    assert "rebuilding the reward model of lesson 08 because" in out and "min" in out
    record = stages.read_record("reward")
    assert record["ran_with"]["training"]["learning_rate"] == 1e-4 and record["key"] != old["reward"]
    assert stages.read_record("sft")["key"] == old["sft"]  # the SFT model was still current
    assert stages.why_stale("reward", profile) is None and stages.why_stale("dpo", profile) is None
    assert stages.why_stale("ppo", profile) is not None  # built on the old reward model


def test_a_model_without_a_record_or_with_other_data_is_not_reused(course, monkeypatch, tmp_path):
    _, profile = course
    from course_utils.course import data

    world = tmp_path / "world"
    shutil.copytree(paths.WORLD_DIR, world)
    lines = (world / "preferences_train.jsonl").read_text().splitlines(keepends=True)
    (world / "preferences_train.jsonl").write_text("".join(lines[:-1]))
    monkeypatch.setattr(data, "WORLD_DIR", world)
    assert stages.why_stale("sft", profile) is None  # SFT does not train on preference pairs
    assert "training data or base model changed" in stages.why_stale("dpo", profile)
    monkeypatch.undo()

    record_path = stages.stage_dir("dpo") / stages.RECORD_FILE
    saved = record_path.read_text()
    record_path.unlink()
    try:
        assert "has no stage_record.json" in stages.why_stale("dpo", profile)
    finally:
        record_path.write_text(saved)
    record = json.loads(saved)
    record["profile"] = "colab"
    record_path.write_text(json.dumps(record))
    try:
        assert "built for the 'colab' profile" in stages.why_stale("dpo", profile)
    finally:
        record_path.write_text(saved)


def test_save_refuses_a_model_trained_with_other_settings_than_its_recipe(course):
    _, profile = course
    recipe = recipes.load_recipe("dpo", profile)
    used = json.loads((stages.stage_dir("dpo") / stages.RECORD_FILE).read_text())["ran_with"]
    wrong_rate = {**used, "training": {**used["training"], "learning_rate": 1e-3}}
    with pytest.raises(recipes.RecipeMismatchError, match=r"training.learning_rate: recipe 0.0002"):
        recipes.check_ran_with_recipe("dpo", recipe, wrong_rate)
    no_lora = {**used, "lora": None}
    with pytest.raises(recipes.RecipeMismatchError, match="lora: recipe"):
        recipes.check_ran_with_recipe("dpo", recipe, no_lora)
    with pytest.raises(recipes.RecipeMismatchError, match="changes its recipe on purpose"):
        recipes.check_ran_with_recipe("dpo", recipe.with_changes(training={"beta": 0.05}), used)
    recipes.check_ran_with_recipe("dpo", recipe, used)  # the run as recorded passes


def test_every_lesson_that_trains_a_stage_saves_it_with_its_record():
    """The lesson path goes through save_stage (which compares what the trainer ran with against
    the recipe) and checks the saved record matches what the rebuild path would build."""
    from course_utils.course.paths import NOTEBOOKS_DIR

    for stage, spec in stages.STAGES.items():
        cells = json.loads((NOTEBOOKS_DIR / f"{spec.lesson}.ipynb").read_text())["cells"]
        code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert f'recipes.load_recipe("{stage}", profile)' in code, stage
        assert f'stages.save_stage("{stage}"' in code, stage
        assert f'stages.why_stale("{stage}", profile) is None' in code, stage


def test_a_missing_stage_says_where_it_looked_and_how_long_a_gpu_rebuild_takes(tmp_path, monkeypatch):
    """Finding 10: on Colab each lesson starts without the models of the lessons before."""
    from dataclasses import replace

    from course_utils import budget

    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")  # how Colab marks its runtimes
    reason = stages.why_stale("dpo", tiny_profile())
    assert str(tmp_path / "models" / "dpo") in reason and "lesson 10" in reason
    assert "KEEP_MODELS_ON_DRIVE = True" in reason
    gpu = replace(tiny_profile(), device="cuda")
    estimate = pipeline.estimated_minutes("dpo", gpu)
    assert f"about {budget.rebuild_minutes('dpo'):.0f} min on a T4" in estimate
