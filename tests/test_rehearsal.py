"""The T4 path, rehearsed on the CPU: the colab recipes, the Hub loaders on shipped rows, a random
stand-in with TinyLlama's architecture (``course_utils.course.rehearsal``); and one test per finding of the
careful read that made it (each fails on the code before the fix)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from course_utils.course import data, recipes, rehearsal
from course_utils.course.models import tinyllama_config
from course_utils.course.paths import COURSE_MODEL_DIR, NOTEBOOKS_DIR, REPO_ROOT, SAMPLES_DIR
from course_utils.course.profiles import rehearsal_profile as make_rehearsal_profile
from course_utils.course.profiles import tiny_profile

# every notebook that branches on the profile: 07-11 in course order (each reuses the models before
# it), and those that train the course model on every profile and touch the profile's model once
REHEARSED = ["07_qlora_sft", "08_reward_modeling", "09_ppo_rlhf", "10_dpo", "11_evaluation"]
COUNTED_STAGES = ("sft", "reward", "ppo", "grpo", "dpo", "evaluation")


@pytest.fixture(scope="module")
def rehearsal_profile(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    from course_utils.course import paths

    patch.setattr(paths, "ARTIFACTS_DIR", tmp_path_factory.mktemp("rehearsal-artifacts"))
    yield make_rehearsal_profile()
    patch.undo()


# --- the profile is the colab path -------------------------------------------------------------

def test_rehearsal_recipes_are_colabs_except_counts():
    allowed = {(section, key) for section, keys in recipes.CAPPABLE_KEYS.items() for key in keys}
    for stage in COUNTED_STAGES:
        colab = recipes.load_recipe(stage, "colab").values
        rehearsed = recipes.load_recipe(stage, "rehearsal").values
        for section, values in colab.items():
            if not isinstance(values, dict):
                assert rehearsed[section] == values, (stage, section)
                continue
            for key, value in values.items():
                if rehearsed[section][key] != value:
                    assert (section, key) in allowed, f"{stage}: rehearsal changes {section}.{key}"
                    assert rehearsed[section][key] <= value, f"{stage}: a cap must lower a count"


def test_caps_refuse_anything_but_counts(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    import shutil

    shutil.copytree(recipes.RECIPES_DIR, folder)
    (folder / "rehearsal" / "caps.yaml").write_text("dpo:\n  training: {max_length: 128}\n")
    monkeypatch.setenv(recipes.RECIPES_VARIABLE, str(folder))
    with pytest.raises(recipes.RecipeError, match="max_length"):
        recipes.load_recipe("dpo", "rehearsal")


def test_standin_has_tinyllamas_architecture(rehearsal_profile):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    standin = AutoConfig.from_pretrained(rehearsal_profile.model_name_or_path)
    tiny = tinyllama_config()
    for key in ("num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rope_parameters", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "hidden_act"):
        assert getattr(standin, key) == getattr(tiny, key), key
    # as TinyLlama's 32,000 rows and its tokenizer: one embedding row per token of its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(rehearsal_profile.model_name_or_path)
    assert standin.vocab_size == len(tokenizer) and tiny.vocab_size == 32000
    tiny.num_hidden_layers, tiny.vocab_size = standin.num_hidden_layers, standin.vocab_size
    with torch.device("meta"):
        reference_names = set(AutoModelForCausalLM.from_config(tiny).state_dict())
    model = AutoModelForCausalLM.from_pretrained(rehearsal_profile.model_name_or_path)
    assert set(model.state_dict()) == reference_names


def test_samples_readme_states_the_shipped_lengths():
    readme = (SAMPLES_DIR / "README.md").read_text()
    stats = rehearsal.sample_statistics()
    for kind, label in (("sft_train", "test_sft"), ("sft_test", "test_gen")):
        s = stats[kind]
        assert (f"| `ultrachat_200k_{label}.jsonl` | {s['rows']} | {s['min']} | {s['median']} | "
                f"{s['max']} | {s['over 2048']} over 2,048") in readme, kind
    p = stats["preferences"]
    assert (f"| {p['rows']} | {p['min']} | {p['median']} | {p['max']} | {p['over 1024']} over 1,024"
            ) in readme
    assert f"keeps {p['kept by the filter']} |" in readme
    assert stats["sft_train"]["over 2048"] > 0 and p["over 1024"] > 0  # truncation is exercised


def test_guard_refuses_what_a_t4_run_would_hit(rehearsal_profile):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(rehearsal_profile.model_name_or_path)
    model(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(rehearsal.RehearsalError, match="2049 tokens"):
        model(torch.ones(1, 2049, dtype=torch.long))
    with pytest.raises(rehearsal.RehearsalError, match="sequences"):
        model(torch.ones(rehearsal.max_rows_per_forward() + 1, 8, dtype=torch.long))


def test_the_guards_leave_generate_working_for_every_model_in_the_process(rehearsal_profile):
    """The guards replace the Llama classes' forward for the whole process (a test worker too):
    generate() checks its keyword arguments against that forward's signature, so a guard without
    it refused `attention_mask` for a prompt-tuning model on the course model (CI, stop 42)."""
    import inspect

    from peft import PromptTuningConfig, get_peft_model
    from transformers.models.llama import modeling_llama

    from course_utils.course.models import load_model_and_tokenizer
    from course_utils.course.profiles import tiny_profile

    assert "attention_mask" in inspect.signature(modeling_llama.LlamaForCausalLM.forward).parameters
    base_model, tokenizer = load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)
    model = get_peft_model(base_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = tokenizer("Where does Odile live?", return_tensors="pt").input_ids
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > ids.shape[1]


# --- the findings, one test each -----------------------------------------------------------------

class _OnAnotherDevice(torch.nn.Module):
    """A model whose first parameter says it lives on the meta device: its forward refuses inputs
    left on the CPU, as a CUDA model refuses them."""

    def __init__(self, model):
        super().__init__()
        self.marker = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.model = model
        self.config = model.config

    def forward(self, input_ids, **kwargs):
        if input_ids.device.type != "meta":
            raise RuntimeError(f"input on {input_ids.device}, model on meta")
        kwargs = {k: torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v
                  for k, v in kwargs.items()}
        return self.model(torch.zeros(input_ids.shape, dtype=input_ids.dtype), **kwargs)


def test_heldout_loss_moves_batches_to_the_model_and_truncates(rehearsal_profile):
    """Finding 1: the batch stayed on the CPU; chats ran untruncated past 2,048 positions."""
    from transformers import AutoModelForCausalLM

    from course_utils.course.chat import render_chat
    from course_utils.course.models import load_tokenizer
    from course_utils.numerics import heldout_loss

    tokenizer = load_tokenizer(rehearsal_profile.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(rehearsal_profile.model_name_or_path)
    long_chats = [row for row in data.load_sft_dataset(rehearsal_profile, "test")
                  if len(tokenizer(render_chat(row["messages"])).input_ids) > 2048][:2]
    assert long_chats
    loss = heldout_loss(model, tokenizer, long_chats, batch_size=1, max_length=2048)
    assert 0 < loss < 20
    short = [{"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello there"}]}]
    assert heldout_loss(_OnAnotherDevice(model), tokenizer, short, batch_size=1, max_length=64) > 0


def test_reward_model_in_fp16_trains_under_the_grad_scaler():
    """Finding 2: the `score` copy of modules_to_save stayed fp16 and trainable, which torch's
    gradient scaler refuses at the first step."""
    from peft import LoraConfig
    from trl import RewardConfig

    from course_utils import reward_modeling
    from course_utils.course.models import load_tokenizer

    tokenizer = load_tokenizer(COURSE_MODEL_DIR)
    model = reward_modeling.load_reward_model(COURSE_MODEL_DIR, tokenizer, torch.float16)
    pairs = data.load_preference_dataset(tiny_profile(), "train").select(range(4))
    args = RewardConfig(output_dir="/tmp/unused", max_steps=1, use_cpu=True, report_to="none",
                        bf16=False, fp16=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"],
                      task_type="SEQ_CLS")
    trainer = reward_modeling.make_reward_trainer(model, tokenizer, pairs, args, lora)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(p.numel() == model.config.hidden_size for p in trainable)  # the score head
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))  # what a training step does before unscaling
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" on fp16 weights


def test_policy_evaluation_is_batched_and_bounded():
    """Finding 3: every held-out prompt went into one generate() call and one forward pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from course_utils import rollouts
    from course_utils.course.models import load_tokenizer

    tokenizer = load_tokenizer(COURSE_MODEL_DIR)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(COURSE_MODEL_DIR)),
                            LoraConfig(r=2, target_modules=["q_proj"]))
    rows = list(data.load_preference_dataset(tiny_profile(), "test"))[:40]
    widest = []
    hook = policy.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: widest.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None
             else kwargs["inputs_embeds"]).shape[0]), with_kwargs=True)
    try:
        result = rollouts.evaluate_policy(
            policy, tokenizer, rows, lambda prompts, replies: torch.zeros(len(prompts)),
            max_new_tokens=2, seed=0, samples_per_prompt=1, batch_size=8, max_prompt_length=16,
            max_prompts=20)
    finally:
        hook.remove()
    assert max(widest) <= 8
    assert len(result["responses"]) == 20


def test_hub_loaders_fetch_one_split(monkeypatch):
    """Finding 9: load_dataset(id, split=...) downloads every split of the data set."""
    import datasets

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        raise RuntimeError("stop")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for loader in (lambda: data.load_ultrachat(split="test_sft", n_rows=3, seed=0),
                   lambda: data.load_orca_dpo_pairs(min_chosen_score=8.0),
                   lambda: data.load_mmlu_subset(10)):
        with pytest.raises(RuntimeError, match="stop"):
            loader()
    for path, _, kwargs in calls:
        split = kwargs["split"]
        assert list(kwargs.get("data_files", {})) == [split], path
        assert f"/{split}-" in kwargs["data_files"][split], path


def test_each_process_loads_onto_its_own_gpu(monkeypatch):
    """Finding 8: device_map={"": 0} put every process of a multi-GPU launch on GPU 0."""
    from dataclasses import replace

    from course_utils.course.models import process_device

    gpu_profile = replace(tiny_profile(), device="cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device(gpu_profile) == 3
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device(gpu_profile) == 0
    assert process_device(tiny_profile()) == "cpu"


# --- the lessons, run on the rehearsal -----------------------------------------------------------

LIBRARY_WARNING = re.compile(r"\b[A-Z]\w*Warning: |Failed to load CPU gemm_4bit_forward")


#: what only the rehearsal's substitution (a CPU for the T4) makes a library say
CPU_FOR_GPU = ("Paged optimizers are not supported on CPU",)


def library_warnings(notebook) -> list[str]:
    """Lines of the executed cells' stderr that are a Python warning or a known library notice
    (the lessons' own claim verdicts print to stdout; progress bars write to stderr), except what
    running colab's recipes on a CPU instead of a GPU causes."""
    return [line for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", [])
            if output.get("output_type") == "stream" and output.get("name") == "stderr"
            for line in output["text"].splitlines()
            if LIBRARY_WARNING.search(line) and not any(text in line for text in CPU_FOR_GPU)]


#: parameters the rehearsal sets, so that code paths a lesson runs only on request run here too
PARAMETERS = {"09_ppo_rlhf": {"RUN_KL_SWEEP": True, "RUN_PPO_ABLATIONS": True}}


def run_on_the_rehearsal(stems, artifacts, monkeypatch) -> dict:
    """Execute the lessons ``stems`` in order on the rehearsal profile; return seconds per lesson."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("COURSE_PROFILE", "rehearsal")
    monkeypatch.setenv("COURSE_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("COURSE_STRICT_CLAIMS", "0")  # random weights learn nothing
    monkeypatch.setenv("COURSE_REBUILD", "never")  # each lesson uses the models of the ones before
    seconds = {}
    for stem in stems:
        notebook = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
        if stem in PARAMETERS:  # as papermill injects them: a cell after the parameters cell
            at = next(i for i, cell in enumerate(notebook.cells)
                      if "parameters" in cell.metadata.get("tags", []))
            notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
                "\n".join(f"{name} = {value!r}" for name, value in PARAMETERS[stem].items())))
        start = time.perf_counter()
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}).execute()
        seconds[stem] = time.perf_counter() - start
        assert json.loads((artifacts / stem / "metrics.json").read_text()), stem
        assert not library_warnings(notebook), f"{stem} shows: {library_warnings(notebook)[:3]}"
    print("rehearsal seconds per lesson:", {k: round(v) for k, v in seconds.items()})
    return seconds


@pytest.mark.spread  # its own xdist group: the lessons below run beside it on the other worker
def test_lessons_07_to_11_run_on_the_rehearsal(tmp_path, monkeypatch):
    """Lessons 07-11 in order on the rehearsal profile: no exception (findings 4 and 5 raised in
    11 and 10), every metrics file written, dropped and truncated pairs counted."""
    artifacts = tmp_path / "artifacts"
    run_on_the_rehearsal(REHEARSED, artifacts, monkeypatch)
    reward = json.loads((artifacts / "08_reward_modeling" / "metrics.json").read_text())
    assert 0 < reward["dropped_pairs"] < 0.25 * reward["training_pairs"]  # finding 6: few, counted
    dpo = json.loads((artifacts / "10_dpo" / "metrics.json").read_text())
    assert 0 < dpo["truncated_pairs"] < 0.25 * dpo["training_pairs"]
    assert Path(artifacts / "models" / "dpo" / "stage_record.json").exists()


@pytest.mark.spread
def test_lesson_00_runs_its_profile_branch_on_the_rehearsal(tmp_path, monkeypatch):
    """00 trains the course model on every profile (step counts capped here) and loads the
    profile's own model in its last section: the stand-in, here."""
    run_on_the_rehearsal(["00_setup_and_tour"], tmp_path / "artifacts", monkeypatch)


def test_lessons_02_to_05_scale_every_method_to_the_profiles_model(rehearsal_profile):
    """02-05 train the course model on every profile, with the same cells `make test` runs under
    `tiny`; the one thing they build on the profile's own model is the scale table
    (``peft_comparison.scale_rows``, all eight methods in lesson 05): on the rehearsal, each method
    on the stand-in with one training step on four of the lessons' chats."""
    from transformers import AutoConfig

    from course_utils import peft_comparison

    methods = ["full", "houlsby", "prompt_tuning", "p_tuning", "prefix_tuning", "lora", "dora", "ia3"]
    chats = list(data.load_sft_dataset(tiny_profile(), "train"))[:4]
    rows = {row["method"]: row for row in
            peft_comparison.scale_rows(rehearsal_profile, methods, chats)}
    assert list(rows) == methods and all(row["step_seconds"] > 0 for row in rows.values())
    config = AutoConfig.from_pretrained(rehearsal_profile.model_name_or_path)
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    q_out = config.num_attention_heads * config.head_dim
    lora = peft_comparison.methods_recipe().methods["lora"]
    shapes = {"q_proj": (h, q_out), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q_out, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    assert rows["lora"]["trainable"] == layers * lora["r"] * sum(
        sum(shapes[name]) for name in lora["target_modules"])
    assert rows["full"]["percent"] == 100 and all(
        0 < row["percent"] < 100 for name, row in rows.items() if name != "full")


# --- T4 precision: the guards, each shown catching its finding on the code before the fix ------

def _standin_sft_trainer(profile, tmp_path, cast: bool):
    """Lesson 07's QLoRA SFT on the stand-in under the rehearsal's fp16, one step: through
    ``qlora_sft.make_trainer`` (``cast``) or as the lesson built it before the fix (no cast)."""
    from trl import SFTTrainer

    from course_utils import qlora_sft

    recipe = recipes.load_recipe("sft", profile).with_changes(training={"max_steps": 1})
    assert recipe.precision_flags() == {"bf16": False, "fp16": True}  # "auto" computes as a T4
    model, tokenizer = qlora_sft.load_quantized_base(profile, recipe)
    chats = data.load_sft_dataset(profile, "train").select(range(4))
    if cast:
        return qlora_sft.make_trainer(model, tokenizer, chats, recipe, profile, tmp_path)
    return SFTTrainer(model=model, args=qlora_sft.sft_config(recipe, tmp_path, profile),
                      train_dataset=qlora_sft.prompt_completion_rows(chats),
                      processing_class=qlora_sft.training_tokenizer(tokenizer),
                      peft_config=qlora_sft.lora_config(recipe))


def test_a_bf16_gradient_reaching_the_fp16_scaler_fails_as_on_a_t4(rehearsal_profile, tmp_path):
    """Issue 35, finding 1: trl keeps a 4-bit model's adapters in bf16; under fp16 CUDA's unscale
    kernel has no bf16 version. On the CPU accelerate would compute in fp32 with no scaler, and
    the CPU's kernel accepts bf16: the rehearsal's T4 scaler refuses it."""
    old = _standin_sft_trainer(rehearsal_profile, tmp_path / "old", cast=False)
    assert {p.dtype for p in old.model.parameters() if p.requires_grad} == {torch.bfloat16}
    with pytest.raises(rehearsal.RehearsalError, match="_amp_foreach_non_finite_check_and_unscale_cuda"):
        old.train()
    assert isinstance(old.accelerator.scaler, rehearsal.T4GradScaler)
    new = _standin_sft_trainer(rehearsal_profile, tmp_path / "new", cast=True)
    assert {p.dtype for p in new.model.parameters() if p.requires_grad} == {torch.float32}
    new.train()
    assert new.state.global_step == 1
    # the step ran as on a T4: the 16-bit model computed under fp16 autocast, the loss was scaled
    assert new.accelerator.native_amp and new.accelerator.scaler.get_scale() > 1
    assert new.model.get_base_model().lm_head.weight.dtype == torch.float32  # prepare_model_for_kbit


def test_an_fp32_head_fed_fp16_outside_autocast_fails_as_on_a_t4(rehearsal_profile):
    """Issue 35, finding 2: lesson 08 scored with the LoRA reward model (fp16 weights, its trainable
    ``score`` head cast to fp32) before ``train()``, outside the trainer's autocast."""
    from peft import LoraConfig, get_peft_model

    from course_utils import reward_modeling
    from course_utils.course import models

    tokenizer = models.load_tokenizer(rehearsal_profile.model_name_or_path)
    model = reward_modeling.load_reward_model(rehearsal_profile.model_name_or_path, tokenizer,
                                              rehearsal_profile.compute_dtype)
    lora = recipes.load_recipe("reward", rehearsal_profile).lora
    model = get_peft_model(model, LoraConfig(**lora, task_type="SEQ_CLS"))
    assert models.trainable_in_fp32(model) > 0
    pairs = data.load_preference_dataset(rehearsal_profile, "test").select(range(2))
    batch = tokenizer(["<s>a question and its reply"], return_tensors="pt")
    with pytest.raises(RuntimeError, match="dtype"):  # the old code: no autocast
        with torch.no_grad():
            model(**batch)
    chosen, rejected = reward_modeling.preference_scores(model, tokenizer, pairs, batch_size=2)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()


def test_logits_too_large_for_a_t4_fail(rehearsal_profile):
    """Issue 35, finding 3: ``pair_logprobs`` once scored 32 pairs per forward (64 rows of up to
    1,024 tokens: 8.4 GB of fp32 logits at TinyLlama's vocabulary, and as much again for the
    log-softmax). The rehearsal's held-out set has six pairs, so the row guard never saw it; the
    logits guard counts rows x positions x 32,000 whatever the stand-in's vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(rehearsal_profile.model_name_or_path)
    length = recipes.load_recipe("dpo", "colab").training["max_length"]
    old_pairs_per_pass = 32
    assert rehearsal.logits_gb(2 * old_pairs_per_pass, length) > rehearsal.LOGITS_LIMIT_GB
    with torch.no_grad():
        with pytest.raises(rehearsal.RehearsalError, match="GB of fp32 logits"):
            model(torch.ones(2 * old_pairs_per_pass, length, dtype=torch.long))
        pairs_per_pass = recipes.load_recipe("evaluation", "colab").scoring["dpo_pairs_batch_size"]
        model(torch.ones(2 * pairs_per_pass, length, dtype=torch.long))  # the recipe's batch fits
        # generate() keeps the last position's logits only: a long prefill is no burden
        rows, positions = rehearsal.max_rows_per_forward(), 2048
        assert rehearsal.logits_gb(rows, positions) > rehearsal.LOGITS_LIMIT_GB
        model(torch.ones(rows, positions, dtype=torch.long), logits_to_keep=1)


def test_a_rebuilt_model_leaves_nothing_on_the_gpu(monkeypatch, tmp_path):
    """Issue 35, finding 4: ``build_stage`` returned with its trainer (optimizer states among it)
    held in a reference cycle, as accelerate leaves one (the model keeps its original forward), so
    a T4 kept every rebuilt model's memory until Python's collector happened to run."""
    import gc
    import weakref

    from course_utils import pipeline
    from course_utils.course import stages

    states = []

    class Trainer:
        def __init__(self, model):
            self.model, self.state = model, torch.zeros(1000)
            model.trainer = self  # the cycle

    def builder(profile, recipe, parents, verbose=True):
        model = torch.nn.Linear(2, 2)
        trainer = Trainer(torch.nn.Linear(2, 2))  # unreachable once the builder returns, but a cycle
        states.append(weakref.ref(trainer.state))
        return model, None, {}

    monkeypatch.setitem(pipeline.BUILDERS, "sft", builder)
    monkeypatch.setattr(stages, "save_stage", lambda *args, **kwargs: tmp_path)
    gc.disable()
    try:
        pipeline.build_stage("sft", tiny_profile(), recipes.load_recipe("sft", "tiny"), verbose=False)
        assert all(state() is None for state in states)
    finally:
        gc.enable()


def test_reward_scoring_cuts_a_long_conversation_at_the_models_positions(rehearsal_profile):
    """Issue 35, finding 4: the reward model scored whole held-out conversations, however long (an
    Orca prompt runs to thousands of tokens): past 2,048 positions on a T4, and 64 of them per pass.
    It now keeps each conversation's last ``max_position_embeddings`` tokens, where the score is
    read."""
    from course_utils import reward_modeling
    from course_utils.course import models

    tokenizer = models.load_tokenizer(rehearsal_profile.model_name_or_path)
    model = reward_modeling.load_reward_model(rehearsal_profile.model_name_or_path, tokenizer,
                                              rehearsal_profile.compute_dtype)
    long_prompt = [{"role": "user", "content": "Tell me about Fenwick. " * 600}]
    assert len(tokenizer(long_prompt[0]["content"]).input_ids) > model.config.max_position_embeddings
    short = reward_modeling.score_responses(model, tokenizer, [long_prompt], ["It is a town."], 1)
    assert torch.isfinite(short).all()


def test_the_full_scale_rehearsal_is_tinyllama_uncapped_on_a_gpu(monkeypatch):
    """``COURSE_REHEARSAL_SCALE=full`` (``scripts/t4_check.py``): TinyLlama's own configuration and
    vocabulary, the colab recipes' counts, and a clear refusal without a GPU."""
    from course_utils.course import profiles

    monkeypatch.setenv(recipes.REHEARSAL_SCALE_VARIABLE, "full")
    config = rehearsal.standin_config()
    tiny = tinyllama_config()
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        tiny.num_hidden_layers, tiny.hidden_size, 32000)
    assert rehearsal.standin_dir().name == "rehearsal-standin-full"
    for stage in COUNTED_STAGES:
        assert recipes.load_recipe(stage, "rehearsal").values == recipes.load_recipe(stage, "colab").values
    if not torch.cuda.is_available():
        with pytest.raises(profiles.ProfileError, match="needs a CUDA GPU"):
            profiles.rehearsal_profile()
    monkeypatch.setenv(recipes.REHEARSAL_SCALE_VARIABLE, "huge")
    with pytest.raises(recipes.RecipeError, match="standin"):
        recipes.load_recipe("sft", "rehearsal")


def test_the_gpu_check_refuses_a_machine_without_one(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("t4_check", REPO_ROOT / "scripts" / "t4_check.py")
    t4_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t4_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        t4_check.main(["--phases"])
