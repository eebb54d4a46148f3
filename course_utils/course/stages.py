"""Saved stages that know what built them, and one way to get an earlier stage's model.

Lessons 07-10 each save a model under ``artifacts/models/<stage>/`` (``sft``, ``reward``, ``ppo``,
``dpo``) with ``save_stage``, which writes ``stage_record.json`` beside the weights: the recipe
(its file, hash and contents), the profile, the fingerprints of the inputs (base model, data), the
keys of the stages it was built from, what the trainer actually ran with, the library versions,
the date and how long it took. A lesson that needs an earlier stage calls ``ensure_stage``, which
uses the saved model only while its record matches what that stage's recipe and inputs are *now*;
otherwise it rebuilds it with the same recipe (saying which stage, why, and about how long), or,
with ``COURSE_REBUILD=never`` (or ``rebuild=False``), stops with ``StaleStageError`` naming the
lesson to rerun.

``save_stage`` also refuses a model trained with settings other than the recipe's: the trainer's
arguments and the LoRA configuration are compared with the recipe key by key, so a lesson and the
rebuild path cannot build "the same" stage two ways.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from course_utils.course.recipes import Recipe, load_recipe

RECORD_FILE = "stage_record.json"
REBUILD_VARIABLE = "COURSE_REBUILD"


class StaleStageError(RuntimeError):
    """An earlier stage's model is missing or was built from other settings, and rebuilding it
    here is switched off."""


class RecipeMismatchError(ValueError):
    """A model trained with settings that differ from its stage's recipe."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    lesson: str          # the notebook that builds it
    parents: tuple       # the stages it is trained from
    data: str            # "sft" (chats) or "preferences" (pairs)
    cpu_minutes: float   # about how long a rebuild takes on a 2-core CPU (tiny profile), measured


STAGES = {
    "sft": StageSpec("sft", "07_qlora_sft", (), "sft", 1.0),
    "reward": StageSpec("reward", "08_reward_modeling", ("sft",), "preferences", 1.0),
    "ppo": StageSpec("ppo", "09_ppo_rlhf", ("sft", "reward"), "preferences", 1.0),
    "dpo": StageSpec("dpo", "10_dpo", ("sft",), "preferences", 1.0),
}


def stage_dir(stage: str) -> Path:
    from course_utils.course.paths import artifacts_dir

    return artifacts_dir("models") / stage


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_model_fingerprint(model_name_or_path: str) -> str:
    """A local model: the hash of its weights and config; a Hub id: the id itself."""
    local = Path(model_name_or_path)
    if (local / "config.json").exists():
        files = sorted([*local.glob("*.safetensors"), local / "config.json"])
        return "sha256:" + hashlib.sha256("".join(
            f"{f.name}={_file_sha256(f)};" for f in files).encode()).hexdigest()
    return f"hub:{model_name_or_path}"


def inputs_fingerprint(stage: str, profile) -> dict:
    from course_utils.course import data

    spec = STAGES[stage]
    inputs = {"data": data.fingerprint(profile, spec.data)}
    if not spec.parents:
        inputs["base_model"] = _base_model_fingerprint(profile.model_name_or_path)
    return inputs


def expected_key(stage: str, profile, recipe: Recipe | None = None) -> str:
    """The key a model of ``stage`` built today would get: a hash of its recipe, its inputs and
    (recursively) the keys of the stages it is built from."""
    recipe = recipe or load_recipe(stage, profile)
    parents = {parent: expected_key(parent, profile) for parent in STAGES[stage].parents}
    return _key(stage, profile.name, recipe.sha256, inputs_fingerprint(stage, profile), parents)


def _key(stage, profile_name, recipe_sha256, inputs, parents) -> str:
    payload = {"stage": stage, "profile": profile_name, "recipe_sha256": recipe_sha256,
               "inputs": inputs, "parents": parents}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_record(stage: str) -> dict | None:
    path = stage_dir(stage) / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def why_stale(stage: str, profile) -> str | None:
    """``None`` when the saved model of ``stage`` matches today's recipe and inputs; else why not,
    in words."""
    folder = stage_dir(stage)
    if not (folder / "config.json").exists():
        hint = ""
        if os.environ.get("COLAB_RELEASE_TAG") or "google.colab" in __import__("sys").modules:
            hint = (" (each Colab notebook starts in a fresh runtime: set KEEP_MODELS_ON_DRIVE = True "
                    "in the first code cell of every lesson to keep models on Google Drive)")
        return f"no model in {folder}, where lesson {STAGES[stage].lesson[:2]} saves it{hint}"
    record = read_record(stage)
    if record is None:
        return f"the model in {folder} has no {RECORD_FILE} (saved by an older version of the course)"
    recipe = load_recipe(stage, profile)
    if record.get("profile") != profile.name:
        return f"it was built for the '{record.get('profile')}' profile, this is '{profile.name}'"
    if record.get("key") == expected_key(stage, profile, recipe):
        return None
    if record.get("recipe_sha256") != recipe.sha256:
        changed = _changed_keys(record.get("recipe", {}), recipe.values)
        return (f"{recipe.label} changed since it was built"
                + (f" ({', '.join(changed)})" if changed else ""))
    if record.get("inputs") != inputs_fingerprint(stage, profile):
        return "its training data or base model changed since it was built"
    for parent in STAGES[stage].parents:
        if record.get("parents", {}).get(parent) != expected_key(parent, profile):
            return f"it was built from a '{parent}' model other than today's {parent} recipe gives"
    return "its record does not match today's recipe and inputs"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def rebuild_allowed(rebuild: bool | None) -> bool:
    if rebuild is not None:
        return rebuild
    return os.environ.get(REBUILD_VARIABLE, "").strip().lower() not in ("never", "0", "no")


def estimated_minutes(stage: str, profile) -> str:
    """About how long a rebuild of ``stage`` (with any stale parents) takes here."""
    record = read_record(stage)
    if record and record.get("build_seconds") and record.get("device") == profile.device:
        return f"about {max(1, round(record['build_seconds'] / 60))} min (its last build here)"
    if profile.device == "cpu":
        return f"about {STAGES[stage].cpu_minutes:g} min on a 2-core CPU"
    from course_utils import budget

    return (f"about {budget.rebuild_minutes(stage):.0f} min on a T4 (predicted by "
            "course_utils.budget; less on newer GPUs)")


def ensure_stage(stage: str, profile, rebuild: bool | None = None, verbose: bool = True,
                 announce_reuse: bool = True) -> Path:
    """The folder of ``stage``'s model, built with its recipe now if it is missing or stale.

    Parents are ensured first (a stale SFT model makes every later stage stale). With
    ``rebuild=False``, or ``COURSE_REBUILD=never`` in the environment, a missing or stale model
    raises ``StaleStageError`` naming the lesson that builds it.
    """
    spec = STAGES[stage]
    for parent in spec.parents:  # a parent is named only when it has to be rebuilt
        ensure_stage(parent, profile, rebuild, verbose, announce_reuse=False)
    reason = why_stale(stage, profile)
    folder = stage_dir(stage)
    if reason is None:
        if verbose and announce_reuse:
            print(f"[course] using the {stage} model of lesson {spec.lesson[:2]} from {folder}: "
                  f"built from {load_recipe(stage, profile).label}")
        return folder
    if not rebuild_allowed(rebuild):
        raise StaleStageError(
            f"the {stage} model cannot be used: {reason}. Run notebooks/{spec.lesson}.ipynb "
            f"again to rebuild it (or unset {REBUILD_VARIABLE} to let this lesson rebuild it).")
    if verbose:
        print(f"[course] rebuilding the {stage} model of lesson {spec.lesson[:2]} because {reason}: "
              f"{load_recipe(stage, profile).label}, {estimated_minutes(stage, profile)} ...")
    build_stage(stage, profile, verbose=verbose)
    return folder


def build_stage(stage: str, profile, recipe: Recipe | None = None, verbose: bool = True) -> Path:
    """Train ``stage`` from its recipe through the package's path and save it with its record."""
    from course_utils import dpo, ppo, qlora_sft, reward_modeling

    recipe = recipe or load_recipe(stage, profile)
    builders = {"sft": qlora_sft.build_sft_model, "reward": reward_modeling.build_reward_model,
                "ppo": ppo.build_ppo_model, "dpo": dpo.build_dpo_model}
    start = time.perf_counter()
    model, tokenizer, ran_with = builders[stage](profile, recipe, verbose=verbose)
    return save_stage(stage, model, tokenizer, profile, recipe, ran_with,
                      build_seconds=time.perf_counter() - start, built_by="rebuild")


# --- what a run actually used, compared with its recipe -----------------------------------------

def _plain(value):
    """Enums (``SchedulerType.COSINE``) and sets as the plain values a recipe holds."""
    value = getattr(value, "value", value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    return value


def ran_with(recipe: Recipe, args=None, peft_model=None, seed: int | None = None) -> dict:
    """What a run used, read back from the objects that ran it: every ``training`` key of the
    recipe from ``args`` (a trl config, or ``ppo.PPOConfig``), the LoRA settings from
    ``peft_model``'s adapter config (``None`` without one), and the seed."""
    used: dict = {}
    if args is not None:
        used["training"] = {key: _plain(getattr(args, key, "<missing>"))
                            for key in recipe.values["training"]}
        used["seed"] = getattr(args, "seed", seed)
    else:
        used["seed"] = seed
    lora = None
    config = getattr(peft_model, "peft_config", None)
    if config:
        adapter = config[getattr(peft_model, "active_adapter", "default")]
        keys = recipe.values["lora"] or {}
        lora = {key: _plain(getattr(adapter, key, "<missing>")) for key in keys}
        if keys.get("target_modules") == "all-linear" and (
                lora["target_modules"] == _all_linear_names(peft_model)):
            lora["target_modules"] = "all-linear"  # peft expands the shorthand when it applies it
    used["lora"] = lora
    return used


def _all_linear_names(peft_model) -> list[str]:
    """The names of every linear layer but the output head: what peft's ``"all-linear"`` means."""
    import bitsandbytes as bnb
    import torch

    names = set()
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and not any(
                part in name for part in ("lm_head", "score", "lora_", "modules_to_save")):
            names.add(name.removesuffix(".base_layer").split(".")[-1])
    return sorted(names)


def check_ran_with_recipe(stage: str, recipe: Recipe, used: dict) -> None:
    """Raise ``RecipeMismatchError`` where what ran differs from the recipe."""
    if recipe.changes:
        raise RecipeMismatchError(
            f"this {stage} run changes its recipe on purpose ({recipe.label}); only a run of the "
            "recipe as written is saved as the stage's model")
    expected = {"training": recipe.values["training"], "seed": recipe.values["seed"],
                "lora": None if recipe.values.get("lora") is None else {
                    key: _plain(value) for key, value in recipe.values["lora"].items()}}
    if expected["lora"] and isinstance(expected["lora"].get("target_modules"), list):
        expected["lora"]["target_modules"] = sorted(expected["lora"]["target_modules"])
    differences = []
    for key, value in expected["training"].items():
        actual = used.get("training", {}).get(key)
        if actual != value and not (isinstance(value, float) and isinstance(actual, (int, float))
                                    and abs(actual - value) <= 1e-12 * max(1.0, abs(value))):
            differences.append(f"training.{key}: recipe {value!r}, ran with {actual!r}")
    if used.get("seed") != expected["seed"]:
        differences.append(f"seed: recipe {expected['seed']!r}, ran with {used.get('seed')!r}")
    if (expected["lora"] is None) != (used.get("lora") is None):
        differences.append(f"lora: recipe {expected['lora']!r}, ran with {used.get('lora')!r}")
    elif expected["lora"]:
        for key, value in expected["lora"].items():
            actual = used["lora"].get(key)
            if key == "modules_to_save" and isinstance(actual, list):
                # peft adds the head names it knows for the task type ("classifier", "score")
                if set(value) <= set(actual):
                    continue
            if key == "target_modules" and value == "all-linear" and isinstance(actual, list):
                # peft expands "all-linear" into the names of the model's linear layers (the
                # output head excepted) and records the expansion
                if actual and not any(name.split(".")[-1] in ("lm_head", "score")
                                      for name in actual):
                    continue
            if actual != value:
                differences.append(f"lora.{key}: recipe {value!r}, ran with {actual!r}")
    if differences:
        raise RecipeMismatchError(f"the {stage} model was not trained with {recipe.label}: "
                                  + "; ".join(differences))


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in
            ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets")}


def save_stage(stage: str, model, tokenizer, profile, recipe: Recipe, used: dict,
               build_seconds: float | None = None, built_by: str | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` as ``stage``'s model with its record, after checking that
    ``used`` (``ran_with(...)``) matches ``recipe``. Returns the folder."""
    check_ran_with_recipe(stage, recipe, used)
    folder = stage_dir(stage)
    (folder / RECORD_FILE).unlink(missing_ok=True)  # no record while the weights are half-written
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    parents = {parent: expected_key(parent, profile) for parent in STAGES[stage].parents}
    inputs = inputs_fingerprint(stage, profile)
    record = {
        "stage": stage, "profile": profile.name, "device": profile.device,
        "key": _key(stage, profile.name, recipe.sha256, inputs, parents),
        "recipe_file": recipe.label, "recipe_sha256": recipe.sha256, "recipe": recipe.values,
        "inputs": inputs, "parents": parents, "ran_with": used,
        "built_by": built_by or f"notebooks/{STAGES[stage].lesson}.ipynb",
        "build_seconds": build_seconds, "versions": library_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return folder
