"""The course's pipeline, lessons 07-11: each stage's model built by its lesson's code, reused while
it is fresh.

``ensure_stage("ppo", profile)`` returns the folder of a saved stage model whose record
(``course_utils.course.stages``) matches today's recipe and inputs, rebuilding it (and any stale
parent first) with ``BUILDERS`` otherwise: the one table that says which lesson's function trains
which stage. Each builder gets its recipe and its parents' folders, and returns
``(model, tokenizer, what the run used)`` for ``stages.save_stage``.
"""

from __future__ import annotations

import time
from pathlib import Path

from course_utils import budget, dpo, ppo, qlora_sft, reward_modeling
from course_utils.course import stages
from course_utils.course.models import release
from course_utils.course.recipes import Recipe, load_recipe

BUILDERS = {
    "sft": qlora_sft.build_sft_model,               # lesson 07
    "reward": reward_modeling.build_reward_model,   # lesson 08
    "ppo": ppo.build_ppo_model,                     # lesson 09
    "dpo": dpo.build_dpo_model,                     # lesson 10
}


def estimated_minutes(stage: str, profile) -> str:
    """About how long a rebuild of ``stage`` (with any stale parents) takes here."""
    record = stages.read_record(stage)
    if record and record.get("build_seconds") and record.get("device") == profile.device:
        return f"about {max(1, round(record['build_seconds'] / 60))} min (its last build here)"
    if profile.device == "cpu":
        return f"about {stages.STAGES[stage].cpu_minutes:g} min on a 2-core CPU"

    return (f"about {budget.rebuild_minutes(stage):.0f} min on a T4 (predicted by "
            "course_utils.budget; less on newer GPUs)")


def ensure_stage(stage: str, profile, rebuild: bool | None = None, verbose: bool = True,
                 announce_reuse: bool = True) -> Path:
    """The folder of ``stage``'s model, built with its recipe now if it is missing or stale.

    Parents are ensured first (a stale SFT model makes every later stage stale). With
    ``rebuild=False``, or ``COURSE_REBUILD=never`` in the environment, a missing or stale model
    raises ``StaleStageError`` naming the lesson that builds it.
    """
    spec = stages.STAGES[stage]
    for parent in spec.parents:  # a parent is named only when it has to be rebuilt
        ensure_stage(parent, profile, rebuild, verbose, announce_reuse=False)
    reason = stages.why_stale(stage, profile)
    folder = stages.stage_dir(stage)
    if reason is None:
        if verbose and announce_reuse:
            print(f"[course] using the {stage} model of lesson {spec.lesson[:2]} from {folder}: "
                  f"built from {load_recipe(stage, profile).label}")
        return folder
    if not stages.rebuild_allowed(rebuild):
        raise stages.StaleStageError(
            f"the {stage} model cannot be used: {reason}. Run notebooks/{spec.lesson}.ipynb "
            f"again to rebuild it (or unset {stages.REBUILD_VARIABLE} to let this lesson rebuild it).")
    if verbose:
        print(f"[course] rebuilding the {stage} model of lesson {spec.lesson[:2]} because {reason}: "
              f"{load_recipe(stage, profile).label}, {estimated_minutes(stage, profile)} ...")
    build_stage(stage, profile, verbose=verbose)
    return folder


def build_stage(stage: str, profile, recipe: Recipe | None = None, verbose: bool = True) -> Path:
    """Train ``stage`` from its recipe with its lesson's builder and save it with its record. The
    builder gets the folders of the stages it is trained from (already ensured)."""
    recipe = recipe or load_recipe(stage, profile)
    parents = {parent: stages.stage_dir(parent) for parent in stages.STAGES[stage].parents}
    start = time.perf_counter()
    model, tokenizer, ran_with = BUILDERS[stage](profile, recipe, parents, verbose=verbose)
    folder = stages.save_stage(stage, model, tokenizer, profile, recipe, ran_with,
                               build_seconds=time.perf_counter() - start, built_by="rebuild")
    # saved: off the GPU, and the trainer's reference cycles collected (accelerate keeps the model's
    # original forward on it), or a T4 carries every rebuilt 1.1B model into the lesson that asked
    release(model)
    return folder
