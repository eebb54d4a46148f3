"""Recipes: every training and evaluation setting, one YAML file per stage and profile.

``configs/recipes/<profile>/<stage>.yaml`` holds the settings; ``load_recipe(stage, profile)``
reads and checks one. Keys of ``training``, ``lora`` and ``quantization`` are the keyword arguments
of the library class the section becomes (trl's ``SFTConfig``/``RewardConfig``/``DPOConfig``/
``GRPOConfig``, the course's ``ppo.PPOConfig``, peft's ``LoraConfig``, transformers'
``BitsAndBytesConfig``), so ``SFTConfig(**recipe.training, ...)`` is the call a practitioner copies.

An unknown key, a missing key or a value of the wrong type raises ``RecipeError`` naming the file,
the key and what was expected. A run that varies a setting on purpose names the change:
``recipe.with_changes(training={"beta": 0.05})`` returns a copy whose ``changes`` say what differs
from the file, and which ``course_utils.course.stages`` refuses to save as the stage's model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_utils.course import reporting
from course_utils.course.paths import REPO_ROOT

RECIPES_DIR = REPO_ROOT / "configs" / "recipes"
#: Another folder of recipes (same layout) replaces ``configs/recipes``; tests use a temporary one.
RECIPES_VARIABLE = "COURSE_RECIPES"
RECIPE_NAMES = ("sft", "reward", "ppo", "grpo", "dpo", "evaluation", "peft_methods", "tour", "data")
PRECISIONS = ("float32", "float16", "bfloat16", "auto")

#: the recipe keys a rehearsal cap may change: counts of steps and examples, nothing else
CAPPABLE_KEYS = {"training": {"max_steps", "steps", "sweep_steps", "warmup_steps", "logging_steps",
                              "gradient_accumulation_steps", "ppo_epochs"},
                 "chat": {"eval_examples"}, "benchmark": {"mc_examples"},
                 "policy": {"samples_per_prompt", "max_prompts"},
                 "best_of_n": {"pool_size", "max_prompts"}}



class RecipeError(ValueError):
    """A recipe file that is missing, or whose keys or values are not what the course expects."""


# --- the schema: section -> key -> (expected type, required) -----------------------------------
# Types: int, float (an int is accepted), bool, str, "str|list" (a module list or "all-linear"),
# "list" (of strings), "dict" (a method's settings: keyword arguments of its config class).
# Sections named in NULLABLE may be null in the file.

_REQ, _OPT = True, False
_COMMON_TRAINER = {
    "max_steps": (int, _REQ), "per_device_train_batch_size": (int, _REQ),
    "gradient_accumulation_steps": (int, _OPT), "learning_rate": (float, _REQ),
    "lr_scheduler_type": (str, _OPT), "warmup_steps": (float, _OPT), "weight_decay": (float, _OPT),
    "max_grad_norm": (float, _OPT), "optim": (str, _OPT), "activation_checkpointing": (bool, _OPT),
    "logging_steps": (int, _REQ), "save_strategy": (str, _REQ), "save_steps": (int, _OPT),
    "save_total_limit": (int, _OPT), "per_device_eval_batch_size": (int, _OPT),
}
_LORA = {"r": (int, _REQ), "lora_alpha": (int, _REQ), "lora_dropout": (float, _OPT),
         "target_modules": ("str|list", _REQ), "bias": (str, _OPT), "modules_to_save": ("list", _OPT)}
_QUANTIZATION = {"load_in_4bit": (bool, _REQ), "bnb_4bit_quant_type": (str, _REQ),
                 "bnb_4bit_use_double_quant": (bool, _REQ)}
_PPO = {name: (kind, _REQ) for name, kind in {
    "steps": int, "batch_size": int, "ppo_epochs": int, "minibatch_size": int,
    "learning_rate": float, "value_learning_rate": float, "kl_coef": float, "clip_eps": float,
    "value_clip_eps": float, "value_coef": float, "gamma": float, "lam": float,
    "max_new_tokens": int, "max_prompt_length": int, "temperature": float,
    "whiten_advantages": bool, "max_grad_norm": float}.items()}

_PEFT_METHODS = ("full", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "dora",
                 "ia3", "qlora")
_PEFT_METHOD_SETTINGS = ("houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "dora",
                         "ia3", "qlora")

SCHEMA: dict[str, dict[str, dict | None]] = {
    "sft": {"training": {**_COMMON_TRAINER, "max_length": (int, _REQ), "packing": (bool, _REQ),
                         "completion_only_loss": (bool, _REQ)},
            "lora": _LORA, "quantization": _QUANTIZATION},
    "reward": {"training": {**_COMMON_TRAINER, "max_length": (int, _REQ)},
               "lora": _LORA, "quantization": _QUANTIZATION},
    "ppo": {"training": _PPO, "lora": _LORA,
            "best_of_n": {"pool_size": (int, _REQ), "seed": (int, _REQ), "batch_size": (int, _REQ),
                          "max_prompts": (int, _REQ)}},
    "grpo": {"training": {**_COMMON_TRAINER, "num_generations": (int, _REQ), "beta": (float, _REQ),
                          "max_completion_length": (int, _REQ)},
             "lora": _LORA},
    "dpo": {"training": {**_COMMON_TRAINER, "beta": (float, _REQ), "max_length": (int, _REQ),
                         "loss_type": ("list", _OPT)},
            "lora": _LORA, "quantization": _QUANTIZATION,
            "variants": {"sweep_betas": ("numbers", _REQ), "ipo_target_scales": ("numbers", _REQ),
                         "ipo_target_pairs": (int, _REQ)},
            "held_out_curve": {"every_steps": (int, _REQ)},
            "held_out": {"max_pairs": (int, _REQ)}},
    "tour": {"training": {"steps": (int, _REQ), "batch_size": (int, _REQ),
                          "learning_rate": (float, _REQ)},
             "probes": {"max_new_tokens": (int, _REQ)}},
    "peft_methods": {
        "training": {"steps": (int, _REQ), "sweep_steps": (int, _REQ), "batch_size": (int, _REQ)},
        "learning_rates": {method: (float, _REQ) for method in _PEFT_METHODS},
        "methods": {method: ("dict", _REQ) for method in _PEFT_METHOD_SETTINGS},
        "forgetting_sweep": {method: ("numbers", _REQ) for method in ("full", "lora", "qlora")},
        "probes": {"max_new_tokens": (int, _REQ)}},
    "evaluation": {
        "chat": {"eval_examples": (int, _REQ), "max_new_tokens": (int, _REQ),
                 "batch_size": (int, _REQ), "max_length": (int, _REQ)},
        "policy": {"max_new_tokens": (int, _REQ), "samples_per_prompt": (int, _REQ),
                   "seed": (int, _REQ), "batch_size": (int, _REQ),
                   "max_prompt_length": (int, _REQ), "max_prompts": (int, _REQ)},
        "benchmark": {"mc_examples": (int, _REQ), "letter_max_new_tokens": (int, _REQ)},
        "scoring": {"reward_pairs_batch_size": (int, _REQ), "reward_replies_batch_size": (int, _REQ),
                    "dpo_pairs_batch_size": (int, _REQ)}},
    "data": {
        "sft": {"train_rows": (int, _REQ), "test_rows": (int, _REQ), "seed": (int, _REQ)},
        "preferences": {"min_chosen_score": (float, _REQ), "test_fraction": (float, _REQ),
                        "seed": (int, _REQ)}},
}
#: Sections that may be ``null`` (e.g. no LoRA: full fine-tuning; no quantization).
NULLABLE = {"lora", "quantization"}
#: Top-level keys besides the sections.
TOP_LEVEL = {"stage": str, "profile": str}
TRAINING_TOP_LEVEL = {"precision": str, "seed": int}
#: recipes that train nothing, so have no precision or seed of their own
SETTINGS_ONLY = {"evaluation", "data"}


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            "str|list": "a string or a list of strings", "list": "a list of strings",
            "dict": "a mapping of setting names to values", "numbers": "a list of numbers"}[kind]


def _matches(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if kind == "numbers":
        return isinstance(value, list) and bool(value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    is_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return is_list or (kind == "str|list" and isinstance(value, str))


def validate(raw, stage: str, source: str) -> dict:
    """Check a parsed recipe against ``SCHEMA[stage]``; return it with floats as floats."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping of keys to values at the top level, "
                          f"got {type(raw).__name__}")
    sections = SCHEMA[stage]
    allowed = dict(TOP_LEVEL)
    if stage not in SETTINGS_ONLY:
        allowed.update(TRAINING_TOP_LEVEL)
    for key in raw:
        if key not in allowed and key not in sections:
            raise RecipeError(f"{source}: unknown key '{key}'; a {stage} recipe has "
                              f"{', '.join(sorted([*allowed, *sections]))}")
    for key, kind in allowed.items():
        if key not in raw:
            raise RecipeError(f"{source}: missing key '{key}' ({_type_name(kind)})")
        if not _matches(raw[key], kind):
            raise RecipeError(f"{source}: '{key}' must be {_type_name(kind)}, got {raw[key]!r}")
    if raw["stage"] != stage:
        raise RecipeError(f"{source}: 'stage' is {raw['stage']!r} but the file is the {stage!r} "
                          "recipe")
    if "precision" in raw and raw["precision"] not in PRECISIONS:
        raise RecipeError(f"{source}: 'precision' must be one of {', '.join(PRECISIONS)}, got "
                          f"{raw['precision']!r}")
    checked = {k: raw[k] for k in allowed}
    for section, keys in sections.items():
        if section not in raw:
            raise RecipeError(f"{source}: missing section '{section}'"
                              + (" (write `null` for none)" if section in NULLABLE else ""))
        values = raw[section]
        if values is None and section in NULLABLE:
            checked[section] = None
            continue
        if not isinstance(values, dict):
            raise RecipeError(f"{source}: '{section}' must be a mapping of keys to values, got "
                              f"{values!r}")
        for key, value in values.items():
            if key not in keys:
                raise RecipeError(f"{source}: unknown key '{section}.{key}'; '{section}' takes "
                                  f"{', '.join(sorted(keys))}")
            kind = keys[key][0]
            if not _matches(value, kind):
                raise RecipeError(f"{source}: '{section}.{key}' must be {_type_name(kind)}, got "
                                  f"{value!r}")
        for key, (kind, required) in keys.items():
            if required and key not in values:
                raise RecipeError(f"{source}: missing key '{section}.{key}' "
                                  f"({_type_name(kind)})")
        checked[section] = {k: float(v) if keys[k][0] is float and not isinstance(v, bool)
                            and not (k == "warmup_steps" and isinstance(v, int)) else v
                            for k, v in values.items()}
    return checked


@dataclass(frozen=True)
class Recipe:
    """One stage's settings for one profile, as read from ``path`` (plus any named ``changes``)."""

    stage: str
    profile: str
    path: Path
    values: dict
    changes: dict = field(default_factory=dict)
    #: the rehearsal's lowered counts (``rehearsal_caps``): part of the recipe as run, not a change
    caps: dict = field(default_factory=dict)

    def __getattr__(self, name):  # recipe.training, recipe.lora, recipe.seed, ...
        values = self.__dict__.get("values", {})
        if name in values:
            return copy.deepcopy(values[name])
        raise AttributeError(f"the {self.__dict__.get('stage')} recipe has no {name!r}")

    @property
    def sha256(self) -> str:
        """A hash of the settings (not of the file's comments or layout)."""
        return hashlib.sha256(json.dumps(self.values, sort_keys=True).encode()).hexdigest()

    @property
    def label(self) -> str:
        where = f"{self.path.relative_to(REPO_ROOT)}" if self.path.is_relative_to(REPO_ROOT) \
            else str(self.path)
        if self.caps:
            capped = ", ".join(f"{s}.{k}={v!r}" for s, kv in self.caps.items() for k, v in kv.items())
            where = f"{where} (rehearsal caps: {capped})"
        if not self.changes:
            return where
        changed = ", ".join(f"{k}={v!r}" for k, v in self.flat_changes().items())
        return f"{where} with {changed}"

    def flat_changes(self) -> dict:
        return {f"{section}.{key}" if isinstance(values, dict) else section: value
                for section, values in self.changes.items()
                for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}

    def with_changes(self, **sections) -> Recipe:
        """A copy with some values changed, e.g. ``with_changes(training={"beta": 0.05})`` or
        ``with_changes(seed=1)``; the copy is checked like a file and remembers what changed."""
        values = copy.deepcopy(self.values)
        changes = copy.deepcopy(self.changes)
        for section, update in sections.items():
            if isinstance(update, dict) and isinstance(values.get(section), dict):
                values[section].update(update)
                changes.setdefault(section, {}).update(update)
            else:
                values[section] = update
                changes[section] = update
        checked = validate(values, self.stage, f"{self.label} changed by with_changes")
        return Recipe(self.stage, self.profile, self.path, checked, changes, self.caps)

    def torch_dtype(self) -> torch.dtype:
        """``precision`` as a torch dtype; ``auto`` is bf16 on GPUs that compute it natively
        (Ampere and newer), fp16 on older ones (a T4) and in the rehearsal of the T4 path, fp32 on
        the CPU otherwise."""
        precision = self.values["precision"]
        if precision == "auto":
            if self.profile == "rehearsal":  # the T4 path on a CPU computes as a T4 (course.rehearsal)
                return torch.float16
            if not torch.cuda.is_available():
                return torch.float32
            major, _ = torch.cuda.get_device_capability()
            return torch.bfloat16 if major >= 8 else torch.float16
        return getattr(torch, precision)

    def precision_flags(self) -> dict:
        """``bf16=``/``fp16=`` for a trl/transformers config (set explicitly: trl 1.x defaults to
        bf16)."""
        dtype = self.torch_dtype()
        return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}

    def describe(self, *keys: str) -> str:
        """What a lesson prints instead of the whole file: where the recipe comes from, the comment
        at the top of its file (why these values), and ``keys`` (``"training.beta"``, or a section
        such as ``"lora"``) with their values."""
        comment = [line.removeprefix("#").strip() for line in
                   self.path.read_text().splitlines() if line.startswith("#")]
        lines = [self.label, *(f"  {line}" for line in comment)]
        for key in keys:
            section, _, name = key.partition(".")
            value = self.values[section] if not name else self.values[section][name]
            lines.append(f"  {key}: {value!r}")
        return "\n".join(lines)

    def trainer_plumbing(self, profile) -> dict:
        """What every trl config the course builds takes besides the ``training`` section: the
        precision flags, the recipe's seed (for the run and its data order), the CPU switch, and no
        reports or worker processes. One source for ``SFTConfig``, ``RewardConfig`` and
        ``DPOConfig`` (``qlora_sft.sft_config``, ``reward_modeling.reward_config``,
        ``dpo.dpo_config``)."""
        return {**self.precision_flags(), "use_cpu": profile.use_cpu, "seed": self.seed,
                "data_seed": self.seed, "report_to": "none", "dataloader_num_workers": 0}

    def as_dict(self) -> dict:
        return copy.deepcopy(self.values)


def recipes_dir() -> Path:
    return Path(os.environ.get(RECIPES_VARIABLE) or RECIPES_DIR)


def recipe_path(stage: str, profile: str) -> Path:
    return recipes_dir() / profile / f"{stage}.yaml"


def load_recipe(stage: str, profile, path: str | Path | None = None) -> Recipe:
    """The recipe of ``stage`` (one of ``RECIPE_NAMES``) for ``profile`` (a ``Profile`` or its
    name), from ``configs/recipes/<profile>/<stage>.yaml`` or from ``path``."""
    import yaml

    profile_name = getattr(profile, "name", profile)
    # lessons that train the course model on every profile have tiny's recipe only; the rehearsal
    # runs colab's recipes; both with the rehearsal's counts capped
    file_profile = "colab" if profile_name == REHEARSAL else profile_name
    if stage in COURSE_MODEL_STAGES:
        file_profile = "tiny"
    if stage in HUB_DATA_STAGES and file_profile == "tiny":
        raise RecipeError("the tiny profile trains on the world's files (data/world/), whole: it "
                          "has no data recipe; configs/recipes/colab/data.yaml selects the Hub data")
    if stage not in SCHEMA:
        raise RecipeError(f"unknown stage {stage!r}; recipes exist for {', '.join(SCHEMA)}")
    path = Path(path) if path is not None else recipe_path(stage, file_profile)
    if not path.exists():
        raise RecipeError(f"no recipe file at {path}: every stage has one per profile under "
                          f"{recipes_dir()}/<profile>/<stage>.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from error
    values = validate(raw, stage, str(path))
    if values["profile"] != file_profile:
        raise RecipeError(f"{path}: 'profile' is {values['profile']!r}, but it was loaded for the "
                          f"{file_profile!r} profile")
    recipe = Recipe(stage, profile_name, path.resolve(), values)
    if path.resolve().is_relative_to(recipes_dir().resolve()):  # what `make portability` hashes
        reporting.record({"kind": "recipe", "file": path.resolve().relative_to(
            recipes_dir().resolve()).as_posix()})
    if profile_name == REHEARSAL:
        caps = None if rehearsal_scale() == "full" else rehearsal_caps().get(stage)
        if caps:
            capped = recipe.with_changes(**caps)
            recipe = Recipe(stage, profile_name, recipe.path, capped.values, caps=caps)
    return recipe


REHEARSAL = "rehearsal"
#: stages that train the course model on every profile (lesson 00's tour, lessons 02-05), so only
#: ``tiny`` has their recipe
COURSE_MODEL_STAGES = {"tour", "peft_methods"}
#: the selection of Hub data sets, which only the profiles that load them have
HUB_DATA_STAGES = {"data"}


#: ``full``: the rehearsal at TinyLlama's scale on a GPU, uncapped (``scripts/t4_check.py``);
#: ``standin`` (the default): the small stand-in on the CPU, counts capped
REHEARSAL_SCALE_VARIABLE = "COURSE_REHEARSAL_SCALE"


def rehearsal_scale() -> str:
    scale = os.environ.get(REHEARSAL_SCALE_VARIABLE, "").strip() or "standin"
    if scale not in ("standin", "full"):
        raise RecipeError(f"{REHEARSAL_SCALE_VARIABLE}={scale!r}: use 'standin' (the CPU rehearsal) or "
                          "'full' (TinyLlama's scale on a GPU, scripts/t4_check.py)")
    return scale


def rehearsal_caps() -> dict:
    """``configs/recipes/rehearsal/caps.yaml``: per stage, the counts the rehearsal lowers. Only
    ``CAPPABLE_KEYS`` may appear: anything else would stop the rehearsal
    from being the colab path."""
    import yaml

    path = recipes_dir() / REHEARSAL / "caps.yaml"
    caps = yaml.safe_load(path.read_text()) if path.exists() else None
    if not isinstance(caps, dict):
        raise RecipeError(f"{path}: expected a mapping of stage -> section -> key -> count")
    for stage, sections in caps.items():
        if stage not in SCHEMA or not isinstance(sections, dict):
            raise RecipeError(f"{path}: unknown stage {stage!r}")
        for section, values in sections.items():
            for key, value in (values or {}).items():
                if key not in CAPPABLE_KEYS.get(section, ()) or not isinstance(value, int):
                    raise RecipeError(f"{path}: {stage}.{section}.{key}={value!r} is not a count "
                                      "the rehearsal may cap (it must run the colab recipes as "
                                      "they are); allowed: " + ", ".join(
                                          f"{s}.{k}" for s, ks in CAPPABLE_KEYS.items() for k in ks))
    return caps


def parse_assignment(assignment: str) -> dict:
    """``"training.learning_rate=1e-3"`` -> ``{"training": {"learning_rate": 0.001}}``, the value
    parsed as YAML (so ``true``, ``16`` and ``[q_proj, v_proj]`` work)."""
    import yaml

    if "=" not in assignment:
        raise RecipeError(f"expected section.key=value, got {assignment!r}")
    target, text = assignment.split("=", 1)
    value = yaml.safe_load(text)
    if "." in target:
        section, key = target.split(".", 1)
        return {section: {key: value}}
    return {target: value}


class RecipeMismatchError(ValueError):
    """A model trained with settings that differ from its stage's recipe."""


# --- what a run actually used, compared with its recipe ----------------------------------------

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
