"""The PEFT comparison harness: each method trains only its own parameters, has the expected
size, and saves and reloads to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from course_utils import memory, peft_comparison, peft_scratch
from course_utils.course.paths import COURSE_MODEL_DIR, WORLD_DIR


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    from course_utils.course.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR)
    with (WORLD_DIR / "sft_train.jsonl").open() as file:
        chats = [json.loads(line) for line in file][:64]
    with (WORLD_DIR / "eval_qa.jsonl").open() as file:
        questions = [json.loads(line) for line in file][:8]
    return base, load_tokenizer(COURSE_MODEL_DIR), chats, questions


def expected_trainable(name, config):
    layers, hidden = config.num_hidden_layers, config.hidden_size
    kv = memory.linear_shapes(config)["k_proj"][1]
    methods = peft_comparison.methods_recipe().methods
    return {
        "full": memory.count_parameters(config),
        "houlsby": 2 * layers * peft_scratch.adapter_parameters(
            hidden, methods["houlsby"]["bottleneck"]),
        "prompt_tuning": methods["prompt_tuning"]["num_virtual_tokens"] * hidden,
        "lora": memory.lora_parameters(config, methods["lora"]["r"],
                                       methods["lora"]["target_modules"]),
        "qlora": memory.lora_parameters(config, methods["qlora"]["r"],
                                        methods["qlora"]["target_modules"]),
        "ia3": layers * (2 * kv + config.intermediate_size),
    }.get(name)


@pytest.mark.parametrize("name", peft_comparison.METHODS)
def test_method_trains_its_parameters_and_reloads_exactly(setup, name):
    base, tokenizer, chats, questions = setup
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    quick = peft_comparison.methods_recipe().with_changes(training={"steps": 3, "batch_size": 8})
    model, row = peft_comparison.run_method(name, base, tokenizer, chats, chats[:8], questions, quick)
    assert row.reload_max_abs_error < 1e-5
    expected = expected_trainable(name, base.config)
    if expected is not None:
        assert row.trainable_parameters == expected
    assert 0 < row.trainable_parameters <= memory.count_parameters(base.config)
    assert row.saved_bytes > 0 and row.seconds_per_step > 0 and row.training_bytes > 0
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # base untouched
    untrained = dict(peft_comparison.make_method(name, base).named_parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(dict(model.named_parameters())[n], untrained[n]) for n in trained)


def test_qlora_trains_lora_on_nf4_weights_of_the_same_model(setup):
    """The ``qlora`` method is LoRA's settings on the base model's weights stored in NF4: the
    linear layers are bitsandbytes' 4-bit ones, the LM head is not, and the dequantized weights are
    the base model's within NF4's error (lesson 06: at most half a code step times the absmax)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    base = setup[0]
    model = peft_comparison.make_method("qlora", base)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 7 * base.config.num_hidden_layers
    assert not any("lm_head" in name for name in layers)
    q_proj = next(m for n, m in layers.items() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
    original = base.model.layers[0].self_attn.q_proj.weight.detach()
    restored = dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state).float()
    assert restored.shape == original.shape
    # NF4's largest gap between neighbouring codes is ~0.28 of the block's absmax (its two
    # extreme codes, -1 and -0.696): the rounding error stays below half of it
    assert (restored - original).abs().max() <= 0.15 * original.abs().max()
    lora = peft_comparison.make_method("lora", base)
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {n for n, p in lora.named_parameters() if p.requires_grad})


def test_forgetting_probes_measure_the_corpus_as_lesson_11_does(setup):
    """The probes' perplexity goes through labels (prompt-tuned models prepend virtual tokens to
    the logits); on a plain model it equals lesson 11's logit-based perplexity on the same sample."""
    import random

    from course_utils import evaluation
    from course_utils.course import world

    base, tokenizer = setup[0], setup[1]
    probes_of_base = peft_comparison.forgetting_probes(base, tokenizer)
    passages = world.read_corpus(WORLD_DIR / "corpus.txt")
    sample = random.Random(0).sample(passages, peft_comparison.FORGETTING_PASSAGES)
    oracle = evaluation.perplexity(base, tokenizer, sample, max_length=base.config.max_position_embeddings)
    assert probes_of_base["corpus_perplexity"] == pytest.approx(oracle, rel=1e-5)
    assert 0.5 < probes_of_base["fact_completion"] <= 1.0  # lesson 00: the base model knows the world


def test_runs_are_saved_per_key_and_reused_only_when_identical(setup, tmp_path, monkeypatch):
    """A learning-rate sweep (lesson 05) saves a row per rate instead of overwriting the method's
    row; reuse returns the saved row only for the identical run."""
    from course_utils.course import paths

    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path)
    base, tokenizer, chats, questions = setup
    quick = peft_comparison.methods_recipe().with_changes(training={"steps": 2, "batch_size": 4})
    faster = quick.with_changes(learning_rates={"ia3": 0.1})
    _, row = peft_comparison.run_method("ia3", base, tokenizer, chats, chats[:4], questions, quick)
    _, other = peft_comparison.run_method("ia3", base, tokenizer, chats, chats[:4], questions, faster)
    assert len(list((tmp_path / "peft_runs").glob("ia3-*.json"))) == 2
    model, again = peft_comparison.run_method("ia3", base, tokenizer, chats, chats[:4], questions, quick,
                                              reuse=True)
    assert model is None and again == row and other != row


def test_a_reply_counts_only_when_its_first_sentence_answers(setup, tmp_path, monkeypatch):
    """The comparison's accuracy is lesson 00's: the value in the reply's first sentence. A reply
    that names the value only lines later (as an untrained model's ramble does) does not count."""
    from course_utils import probes
    from course_utils.course import paths

    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path)
    base, tokenizer, chats, questions = setup

    def replies(model, tokenizer, questions, max_new_tokens):
        return [probes.ProbeResult("Odile", "city", "Where does Odile live?", "Fenwick", output, True, True)
                for output in ["Odile lives in Fenwick.</s>", "Odile?\nOdile lives in Fenwick.",
                               "In Fenwick</s>", "Odile lives in Marlow. Fenwick is her friend's town."]]

    monkeypatch.setattr(probes, "chat_answers", replies)
    quick = peft_comparison.methods_recipe().with_changes(training={"steps": 1, "batch_size": 4})
    _, row = peft_comparison.run_method("ia3", base, tokenizer, chats, chats[:4], questions, quick)
    assert row.heldout_accuracy == 0.5


def test_unknown_method_is_rejected(setup):
    with pytest.raises(ValueError, match="unknown method"):
        peft_comparison.make_method("bitfit", setup[0])


def test_lessons_02_to_05_at_tinyllamas_scale():
    """Deliverable of the T4 issue: the methods built on TinyLlama (its config on the meta device
    under tiny; the rehearsal's stand-in with weights and a timed step), counted as the memory
    model and TinyLlama's real size say."""
    from course_utils import memory, peft_comparison
    from course_utils.course import data
    from course_utils.course.models import tinyllama_config
    from course_utils.course.profiles import rehearsal_profile, tiny_profile

    chats = list(data.load_sft_dataset(tiny_profile(), "train"))[:4]
    rows = {r["method"]: r for r in peft_comparison.scale_rows(tiny_profile(), ["full", "lora"], chats)}
    config = tinyllama_config()
    lora = peft_comparison.methods_recipe().methods["lora"]
    assert rows["full"]["trainable"] == memory.count_parameters(config)
    assert rows["lora"]["trainable"] == memory.lora_parameters(config, lora["r"], lora["target_modules"])
    assert rows["lora"]["step_seconds"] is None
    rehearsal = rehearsal_profile()
    timed = peft_comparison.scale_rows(rehearsal, ["ia3", "prefix_tuning"], chats)
    assert all(r["step_seconds"] > 0 and 0 < r["percent"] < 5 for r in timed)
    assert "course model" in peft_comparison.where_it_runs(rehearsal)


def test_alpha_over_r_shrinks_the_update_as_the_rank_grows_and_rslora_does_not():
    """What lesson 04's ``LoRALinear`` docstring and its rsLoRA section say (Kalajdzievski 2023):
    with ``alpha`` fixed, ``alpha / r`` makes the update ``B A * scaling`` shrink as ``r`` grows
    (like ``1 / sqrt(r)`` for trained-looking random factors), ``alpha / sqrt(r)`` keeps its scale."""

    def update_scale(r, use_rslora):
        torch.manual_seed(0)
        layer = peft_scratch.LoRALinear(torch.nn.Linear(512, 512), r=r, alpha=16, use_rslora=use_rslora)
        torch.nn.init.normal_(layer.lora_B, std=0.02)  # as if trained: B is no longer zero
        return layer.delta_weight().std().item()

    assert update_scale(256, use_rslora=False) < 0.25 * update_scale(4, use_rslora=False)
    assert 0.7 < update_scale(256, use_rslora=True) / update_scale(4, use_rslora=True) < 1.4
    assert "comparable across ranks" not in peft_scratch.LoRALinear.__doc__  # the old, wrong claim
