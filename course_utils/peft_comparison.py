"""Every PEFT method on one task, measured the same way (lessons 02 to 05).

``make_method(name, base_model)`` returns a trainable copy of the base model for one method;
``run_method`` trains it on the world's SFT chats and measures it: trainable parameters, adapter
file size (saved and loaded back, outputs compared), seconds per step, training memory, and
held-out loss, chat-format rate and accuracy on
characters never seen in training. The task is the one notebook 00 introduced: answer attribute
questions in the chat format. ``forgetting_probes`` measures what the training may cost the
pretrained model (lesson 05's learning-versus-forgetting section): perplexity on pretraining
passages and fact completion about the characters the chats never mention.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course_utils import memory, probes
from course_utils.course import world
from course_utils.course.chat import assistant_only_labels, padding_side
from course_utils.course.models import (
    autocast_like,
    check_4bit_support,
    load_model_and_tokenizer,
    load_tokenizer,
    parameter_count,
    tinyllama_config,
)
from course_utils.course.paths import REPO_ROOT, WORLD_DIR, artifacts_dir
from course_utils.course.profiles import get_profile, tiny_profile
from course_utils.course.recipes import load_recipe
from course_utils.numerics import heldout_loss
from course_utils.peft_scratch import add_houlsby_adapters
from course_utils.qlora_sft import prepare_for_qlora
from course_utils.sft_loop import pad_batch, train_sft

METHODS = ("full", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "dora", "ia3",
           "qlora")
HELDOUT_CHATS = 100  # held-out chats for the loss: enough for a stable mean, quick on the CPU
FORGETTING_PASSAGES = 200  # pretraining passages for the perplexity: stable to ~1%, ~1 s
#: The settings of ``methods.qlora`` in the recipe that configure the quantization, not LoRA.
QUANTIZATION_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")


@dataclass
class LessonSetup:
    """What lessons 02-05 start from: the profile, the recipe, the course model and the task."""

    profile: object
    recipe: object
    base_model: torch.nn.Module
    tokenizer: object
    train_chats: list[dict]
    test_chats: list[dict]
    questions: list[dict]


def lesson_setup(profile_name: str, seed: int) -> LessonSetup:
    """The shared opening of lessons 02-05: seed torch, resolve the profile and say what runs where
    (``where_it_runs``), read the recipe, load the course model in fp32 and the world's chats
    (training, ``HELDOUT_CHATS`` held-out) and held-out questions."""

    torch.manual_seed(seed)
    profile = get_profile(profile_name)
    print(where_it_runs(profile))
    with quiet_progress():  # no loading bar: the line above says what loads
        base_model, tokenizer = load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)

    def read(name):
        return [json.loads(line) for line in (WORLD_DIR / name).open()]

    return LessonSetup(profile, methods_recipe(profile), base_model, tokenizer,
                       read("sft_train.jsonl"), read("sft_test.jsonl")[:HELDOUT_CHATS],
                       read("eval_qa.jsonl"))


def methods_recipe(profile=None):
    """Lessons 02-05's settings: ``configs/recipes/tiny/peft_methods.yaml`` (steps, batch size, a
    learning rate per method, each method's config). These lessons train the course model on every
    profile, hence always the ``tiny`` recipe; the rehearsal caps its step counts."""

    return load_recipe("peft_methods", profile or "tiny")


def peft_config(name: str, config, recipe=None):
    """The peft config of a method (its settings from the recipe), sized for the model ``config``
    describes."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    settings = (recipe or methods_recipe()).methods.get(name)
    if name == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, **settings)
    if name == "p_tuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM,
                                   encoder_hidden_size=config.hidden_size, **settings)
    if name == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                  encoder_hidden_size=config.hidden_size, **settings)
    if name in ("lora", "dora"):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **settings)
    if name == "qlora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM,
                          **{k: v for k, v in settings.items() if k not in QUANTIZATION_KEYS})
    if name == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, **settings)
    raise ValueError(f"no peft config for {name!r}; methods: {', '.join(METHODS)}")


def make_method(name: str, base_model, seed: int | None = None, recipe=None):
    """A fresh copy of ``base_model`` set up for method ``name`` (only its parameters train).

    Gradient checkpointing stays off: prefix tuning cannot run with it (peft raises "PREFIX_TUNING
    does not work with gradient checkpointing"), and ``prepare_model_for_kbit_training`` and trl
    turn it on by default, so it must be switched off explicitly there.
    """
    from peft import get_peft_model

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    recipe = recipe or methods_recipe()
    torch.manual_seed(recipe.seed if seed is None else seed)
    model = copy.deepcopy(base_model)
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    if name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if name == "houlsby":
        add_houlsby_adapters(model, **recipe.methods["houlsby"])
        return model
    if name == "qlora":
        model = quantized_copy(base_model, recipe)
        torch.manual_seed(recipe.seed if seed is None else seed)  # the same LoRA init as "lora"
    return get_peft_model(model, peft_config(name, model.config, recipe))


def quantized_copy(base_model, recipe=None):
    """``base_model``'s weights with every linear layer but the LM head stored in NF4 (lesson 06),
    prepared for QLoRA as lesson 07 does (``prepare_model_for_kbit_training`` without
    checkpointing), on the CPU in fp32: the recipe's ``methods.qlora`` quantization settings."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_4bit_support("cpu")
    settings = (recipe or methods_recipe()).methods["qlora"]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                      **{k: settings[k] for k in QUANTIZATION_KEYS})
    with tempfile.TemporaryDirectory() as folder, quiet_progress():  # quantized on loading
        base_model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                     dtype=torch.float32, device_map={"": "cpu"})
    # the base's own folder, not the deleted copy's (peft reads its config when saving)
    model.config._name_or_path = model.name_or_path = base_model.name_or_path
    return prepare_for_qlora(model, activation_checkpointing=False)


class quiet_progress:
    """Within it, transformers shows no progress bar (saving and loading a temporary copy)."""

    def __enter__(self):
        from transformers.utils import logging

        self.was_enabled = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was_enabled:
            logging.enable_progress_bar()


def trainable_parameters(model) -> int:
    return parameter_count(model, trainable_only=True)


@torch.no_grad()
def save_and_reload(model, base_model, name: str) -> tuple[int, float]:
    """Save what must be shipped to reuse the method (the adapter, or the whole model for full
    fine-tuning), load it back onto a fresh base model, and return ``(bytes on disk, max |logit
    difference| between the trained and the reloaded model)``."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 19).view(2, 8)
    model.eval()
    reference = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as folder, quiet_progress():  # no bars for a temporary copy
        if name == "houlsby":
            state = {n: p.detach().contiguous() for n, p in model.named_parameters()
                     if p.requires_grad}
            save_file(state, str(Path(folder) / "adapters.safetensors"))
            loaded = copy.deepcopy(base_model)
            add_houlsby_adapters(loaded, **methods_recipe().methods["houlsby"])
            missing = loaded.load_state_dict(load_file(str(Path(folder) / "adapters.safetensors")),
                                             strict=False).unexpected_keys
            if missing:
                raise RuntimeError(f"adapter keys did not fit the model: {missing[:3]}")
        elif name == "full":
            model.save_pretrained(folder)
            loaded = AutoModelForCausalLM.from_pretrained(folder)
        else:
            model.save_pretrained(folder)
            fresh = quantized_copy(base_model) if name == "qlora" else copy.deepcopy(base_model)
            loaded = PeftModel.from_pretrained(fresh, folder)
        size = sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
    loaded.eval()
    return size, (loaded(input_ids=ids).logits - reference).abs().max().item()




def training_bytes(model, tokenizer, chats: list[dict], batch_size: int) -> int:
    """Weights + gradients + AdamW states + saved activations for one training step, measured."""
    probe = copy.deepcopy(model)
    probe.train()
    batch = pad_batch([assistant_only_labels(tokenizer, c["messages"]) for c in chats[:batch_size]],
                      tokenizer.pad_token_id)
    activations = memory.measured_activation_bytes(probe, **batch)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    probe(**batch).loss.backward()
    optimizer.step()
    static = memory.measured_static_bytes(probe, optimizer)
    return activations + sum(static.values())


@dataclass(frozen=True)
class MethodResult:
    """One row of the comparison table."""

    method: str
    trainable_parameters: int
    percent_of_model: float
    saved_bytes: int
    reload_max_abs_error: float
    seconds_per_step: float
    training_bytes: int
    heldout_loss: float
    chat_format_rate: float
    heldout_accuracy: float
    corpus_perplexity: float
    fact_completion: float


SOURCES_OF_A_RUN = ("peft_comparison", "peft_scratch", "sft_loop", "numerics", "probes", "course.chat",
                    "evaluation", "course.world", "qlora_sft", "course.models")


def run_key(name: str, base_model, train_chats, test_chats, questions, recipe, steps: int) -> str:
    """What determines a run's row: the method's settings, the base model's weights, the data, the
    code that trains and measures it, and the library versions. Seeds make the rest equal."""
    import hashlib
    from importlib import import_module
    from importlib.metadata import version

    digest = hashlib.sha256()
    settings = {"method": name, "steps": steps, "batch_size": recipe.training["batch_size"],
                "seed": recipe.seed, "learning_rate": recipe.learning_rates[name],
                "settings": recipe.methods.get(name), "heldout_chats": len(test_chats),
                "answer_tokens": recipe.probes["max_new_tokens"],
                "versions": [version(p) for p in ("torch", "transformers", "peft")]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for tensor in base_model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([train_chats, test_chats, questions], sort_keys=True).encode())
    for module in SOURCES_OF_A_RUN:
        digest.update(Path(import_module(f"course_utils.{module}").__file__).read_bytes())
    return digest.hexdigest()


def saved_run_path(name: str, key: str) -> Path:
    """Where a run's row is saved: one file per method and key, so that a learning-rate sweep
    (lesson 05) does not overwrite the comparison's run of the same method."""

    return artifacts_dir("peft_runs") / f"{name}-{key[:16]}.json"


@torch.no_grad()
def forgetting_probes(model, tokenizer) -> dict[str, float]:
    """What pretraining taught that the SFT chats never touch, measured on ``model``:

    - ``corpus_perplexity``: token-weighted perplexity on ``FORGETTING_PASSAGES`` pretraining
      passages (a seeded sample of ``data/world/corpus.txt``), every token after ``<s>``;
    - ``fact_completion``: the share of facts about the 20 held-out characters (none of them in
      any SFT chat) that greedy completion of a corpus frame gets right (lesson 00's probe).
    """
    import math
    import random

    model.eval()
    passages = world.read_corpus(WORLD_DIR / "corpus.txt")
    sample = random.Random(0).sample(passages, min(FORGETTING_PASSAGES, len(passages)))
    total, count = 0.0, 0
    # through labels, not logits: a prompt-tuned model's logits include its virtual tokens
    with padding_side(tokenizer, "right"):
        for start in range(0, len(sample), 50):
            batch = tokenizer(sample[start:start + 50], return_tensors="pt", padding=True,
                              truncation=True, max_length=model.config.max_position_embeddings)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n_tokens = int((labels[:, 1:] != -100).sum())
            total += model(**batch, labels=labels).loss.item() * n_tokens
            count += n_tokens
    held_out = world.generate_world().held_out_characters
    facts = probes.fact_completion(model, tokenizer, held_out, world.PROBE_TEMPLATES_IN_CORPUS)
    return {"corpus_perplexity": math.exp(total / count),
            "fact_completion": probes.accuracy(facts)}


def run_method(name: str, base_model, tokenizer, train_chats, test_chats, questions,
               recipe=None, steps: int | None = None, reuse: bool = False
               ) -> tuple[object, MethodResult]:
    """Build, train and measure one method with the recipe's settings (``steps`` replaces the
    recipe's step count, as lesson 04's sweeps do); return the trained model and its row.

    Every run saves its row under ``artifacts/peft_runs/`` with its ``run_key``. With
    ``reuse=True`` (lesson 05), a saved row whose key matches is returned instead of training
    again, with ``None`` for the model (how a lesson counts the runs it reused): the same seeds,
    settings, code and data give the same run.
    """
    recipe = recipe or methods_recipe()
    steps = recipe.training["steps"] if steps is None else steps
    key = run_key(name, base_model, train_chats, test_chats, questions, recipe, steps)
    saved = saved_run_path(name, key)
    if reuse and saved.exists():
        record = json.loads(saved.read_text())
        if record["key"] == key:  # silently: the lesson says once how many runs it reused
            return None, MethodResult(**record["row"])
    batch_size, seed = recipe.training["batch_size"], recipe.seed
    model = make_method(name, base_model, seed, recipe)
    n_base = parameter_count(base_model)
    lr = recipe.learning_rates[name]
    mem = training_bytes(model, tokenizer, train_chats, batch_size)
    start = time.perf_counter()
    train_sft(model, tokenizer, train_chats, steps=steps, batch_size=batch_size,
              learning_rate=lr, seed=seed, progress=False)
    seconds = (time.perf_counter() - start) / steps
    answers = probes.chat_answers(model, tokenizer, questions, recipe.probes["max_new_tokens"])
    saved_bytes, reload_error = save_and_reload(model, base_model, name)
    result = MethodResult(
        method=name, trainable_parameters=trainable_parameters(model),
        percent_of_model=100 * trainable_parameters(model) / n_base,
        saved_bytes=saved_bytes, reload_max_abs_error=reload_error, seconds_per_step=seconds,
        training_bytes=mem, heldout_loss=heldout_loss(
            model, tokenizer, test_chats, batch_size=32,
            max_length=model.config.max_position_embeddings),
        chat_format_rate=probes.accuracy(answers, "chat_format"),
        # the value in the reply's first sentence: a reply that rambles on and names it lines later,
        # about another question, did not answer (lesson 00; 35% instead of 28% for the base model)
        heldout_accuracy=probes.answer_accuracy(answers), **forgetting_probes(model, tokenizer))
    if steps == recipe.training["steps"]:  # the comparison's runs; sweeps vary the steps
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"key": key, "row": asdict(result)}, indent=1))
    return model, result


def results_table(results: list[MethodResult]) -> str:
    """The comparison as aligned text (``corpus ppl`` and ``facts``: ``forgetting_probes``)."""
    header = (f"{'method':<14}{'trainable':>11}{'% model':>9}{'saved KB':>10}{'reload':>9}"
              f"{'s/step':>8}"
              f"{'train MB':>10}{'loss':>7}{'format':>8}{'accuracy':>10}{'corpus ppl':>11}"
              f"{'facts':>7}")
    rows = [header]
    for r in results:
        rows.append(f"{r.method:<14}{r.trainable_parameters:>11,}{r.percent_of_model:>9.3f}"
                    f"{r.saved_bytes / 1e3:>10.1f}{r.reload_max_abs_error:>9.1e}"
                    f"{r.seconds_per_step:>8.3f}"
                    f"{r.training_bytes / 1e6:>10.1f}{r.heldout_loss:>7.3f}"
                    f"{r.chat_format_rate:>8.1%}{r.heldout_accuracy:>10.1%}"
                    f"{r.corpus_perplexity:>11.2f}{r.fact_completion:>7.1%}")
    return "\n".join(rows)


# --- what scales: the same methods on the profile's large model ---------------------------------

def where_it_runs(profile) -> str:
    """The one line lessons 02-05 print: what runs on which model under ``profile``."""
    if profile.name == "tiny":
        return ("[course] profile 'tiny': every method trains on the course model; the last section "
                "counts each method's parameters for TinyLlama-1.1B from its config (no weights).")
    return (f"[course] profile '{profile.name}': the trainings and their comparison stay on the course "
            "model (the world's task, where accuracy means something); the last section builds every "
            f"method on {profile.model_name_or_path} and times one training step there.")


def scale_rows(profile, names, chats, recipe=None) -> list[dict]:
    """Every method in ``names`` built on the profile's large model: its trainable parameters and
    share of the model; with weights (``colab``: TinyLlama on the GPU; ``rehearsal``: its stand-in)
    also one training step on ``chats`` (seconds, and peak GPU memory on CUDA). Under ``tiny``,
    TinyLlama's config on the meta device: counts only, exact, nothing downloaded."""
    from transformers import AutoModelForCausalLM

    recipe = recipe or methods_recipe()
    with_weights = profile.name != "tiny"
    if with_weights:
        base = AutoModelForCausalLM.from_pretrained(profile.model_name_or_path,
                                                    dtype=profile.compute_dtype).to(profile.device)
        tokenizer = load_tokenizer(profile.model_name_or_path)
        batch = pad_batch([assistant_only_labels(tokenizer, c["messages"]) for c in chats],
                          tokenizer.pad_token_id)
        batch = {key: value.to(profile.device) for key, value in batch.items()}
    else:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(tinyllama_config())
    n_base = parameter_count(base)
    rows = []
    for name in names:
        if with_weights:
            model = make_method(name, base, recipe=recipe).to(profile.device)
        else:
            with torch.device("meta"):
                model = make_method(name, base, recipe=recipe)
        row = {"method": name, "trainable": trainable_parameters(model),
               "percent": 100 * trainable_parameters(model) / n_base,
               "step_seconds": None, "peak_gb": None}
        if with_weights:
            model.train()
            if profile.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            # mixed precision as a trainer runs it: fp16 weights, the new modules (Houlsby's
            # adapters, prompts) in fp32; without autocast they meet and the matmul refuses
            with autocast_like(base):
                loss = model(**batch).loss
            loss.backward()
            if profile.device == "cuda":
                torch.cuda.synchronize()
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["step_seconds"] = time.perf_counter() - start
        rows.append(row)
        del model
    return rows


def scale_table(rows) -> str:
    lines = [f"{'method':14s} {'trainable':>14s} {'% of model':>10s} {'step s':>7s} {'peak GB':>8s}"]
    for row in rows:
        step = f"{row['step_seconds']:7.2f}" if row["step_seconds"] is not None else f"{'-':>7s}"
        peak = f"{row['peak_gb']:8.2f}" if row["peak_gb"] is not None else f"{'-':>8s}"
        lines.append(f"{row['method']:14s} {row['trainable']:14,d} {row['percent']:10.4f} {step} {peak}")
    return "\n".join(lines)


# --- the comparison at tuned learning rates, over seeds (scripts/peft_sweep.py) -----------------

#: Lesson 05's ranking: every method of the comparison at three learning rates and three seeds,
#: trained by ``scripts/peft_sweep.py`` on the tiny profile and committed, so every machine that
#: reads it shows the same numbers.
SWEEP_PATH = REPO_ROOT / "peft_sweep" / "results.json"
SWEEP_METHODS = ("full", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "ia3")
SWEEP_SEEDS = 3  # the recipe's seed and the next two
#: Student's t, two-sided 95%, by degrees of freedom (the course pins no scipy)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def rate_grid(rate: float) -> list[float]:
    """``rate`` and its two neighbours on the 1-3-10 grid practitioners search (3e-4, 1e-3, 3e-3):
    about a factor of 3 either side."""
    import math

    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = round(rate / 10 ** exponent)
    if mantissa not in (1, 3):
        raise ValueError(f"{rate} is not on the 1-3-10 grid (1e-3, 3e-3, 1e-2, ...)")
    down, up = (0.3, 3) if mantissa == 1 else (1 / 3, 10 / 3)
    return [float(f"{rate * down:.1g}"), rate, float(f"{rate * up:.1g}")]


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of one number measured with several seeds and its 95%
    interval from their spread (Student's t with n - 1 degrees of freedom)."""
    import statistics

    if len(values) < 2:
        raise ValueError("an interval over seeds needs at least two seeds")
    mean = statistics.fmean(values)
    half = T_975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def sweep_summary(record: dict) -> list[dict]:
    """Per method of a sweep (``SWEEP_PATH``'s contents): the learning rate with the lowest mean
    held-out loss (chosen on the held-out *chats*, so the choice does not flatter the accuracy
    reported on the held-out *questions*), and at that rate the mean held-out accuracy over seeds
    with its ``seed_interval`` (clipped to [0, 1]: an accuracy). Sorted by that mean accuracy,
    highest first."""
    import statistics

    rows = []
    for method in record["methods"]:
        runs = [run for run in record["runs"] if run["method"] == method]
        by_rate = {}
        for rate in sorted({run["learning_rate"] for run in runs}):
            at = [run for run in runs if run["learning_rate"] == rate]
            by_rate[rate] = {"loss": statistics.fmean(r["heldout_loss"] for r in at),
                             "accuracies": [r["heldout_accuracy"] for r in at]}
        chosen = min(by_rate, key=lambda rate: by_rate[rate]["loss"])
        mean, low, high = seed_interval(by_rate[chosen]["accuracies"])
        rows.append({"method": method, "learning_rate": chosen, "recipe_rate": record["recipe_rates"][method],
                     "accuracy": mean, "low": max(low, 0.0), "high": min(high, 1.0),
                     "seeds": len(by_rate[chosen]["accuracies"]),
                     "trainable_parameters": runs[0]["trainable_parameters"], "rates": by_rate})
    return sorted(rows, key=lambda row: -row["accuracy"])


def ranking_tiers(summary: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """``(top, tied, below)``: the method with the highest mean accuracy; those whose interval
    overlaps its interval (not separated from it by these seeds); and those whose interval lies
    wholly below it."""
    top, others = summary[0], summary[1:]
    tied = [row for row in others if row["high"] >= top["low"]]
    return top, tied, [row for row in others if row["high"] < top["low"]]


def ranking_sentence(summary: list[dict]) -> str:
    """What the sweep lets one say about the ranking, and no more."""
    top, tied, below = ranking_tiers(summary)

    def named(row):
        return (f"{row['method']} {row['accuracy']:.1%} [{row['low']:.1%}, {row['high']:.1%}] "
                f"at {row['learning_rate']:.0e}")

    if len(summary) == 1:
        return f"Only one method was swept ({named(top)}): nothing to rank it against."
    if tied:
        first = ("Tied at the top (their intervals overlap, so no one of them is 'best'): "
                 + ", ".join(named(row) for row in [top, *tied]))
    else:
        first = f"Ahead of every other method (no other interval reaches its own): {named(top)}"
    if not below:
        return first + "."
    return (first + f"; below {'them' if tied else 'it'}, separated: "
            + ", ".join(named(row) for row in below) + ".")
