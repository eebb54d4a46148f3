"""Saved stages that know what built them.

Lessons 07-10 each save a model under ``artifacts/models/<stage>/`` (``sft``, ``reward``, ``ppo``,
``dpo``) with ``save_stage``, which writes ``stage_record.json`` beside the weights: the recipe
(its file, hash and contents), the profile, the fingerprints of the inputs (base model, data), the
keys of the stages it was built from, what the trainer actually ran with, the library versions,
the date and how long it took. ``why_stale`` says whether a saved model still matches what its
recipe and inputs are *now*; ``course_utils.pipeline.ensure_stage`` uses it only then, else rebuilds
it (or, with ``COURSE_REBUILD=never``, stops with ``StaleStageError`` naming the lesson to rerun).

``save_stage`` also refuses a model trained with settings other than the recipe's
(``recipes.check_ran_with_recipe`` compares the trainer's arguments and the LoRA configuration with
the recipe key by key), so a lesson and the rebuild path cannot build "the same" stage two ways.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from course_utils.course import data
from course_utils.course.paths import artifacts_dir
from course_utils.course.recipes import Recipe, check_ran_with_recipe, load_recipe

RECORD_FILE = "stage_record.json"
REBUILD_VARIABLE = "COURSE_REBUILD"


class StaleStageError(RuntimeError):
    """An earlier stage's model is missing or was built from other settings, and rebuilding it
    here is switched off."""


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
