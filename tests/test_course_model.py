"""The shipped course model: it knows the world, does not yet chat, and rebuilds reproducibly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from course_utils import evaluation, probes
from course_utils.builds import course_model as build
from course_utils.course import world
from course_utils.course.paths import COURSE_MODEL_DIR, WORLD_DIR
from course_utils.course.recipes import load_recipe


@pytest.fixture(scope="module")
def report():
    return json.loads((COURSE_MODEL_DIR / "build_report.json").read_text())


@pytest.fixture(scope="module")
def questions():
    with (WORLD_DIR / "eval_qa.jsonl").open() as file:
        return [json.loads(line) for line in file]


def test_fact_completion_with_corpus_frames_is_at_least_90_percent(
        course_model_and_tokenizer, the_world, report):
    model, tokenizer = course_model_and_tokenizer
    results = probes.fact_completion(model, tokenizer, list(the_world.characters),
                                         world.PROBE_TEMPLATES_IN_CORPUS)
    assert len(results) == 360
    accuracy = probes.accuracy(results)
    assert accuracy >= 0.90
    assert accuracy == report["fact_completion_in_corpus_templates"]  # the report is current


def test_fact_completion_with_new_frames_beats_chance(course_model_and_tokenizer, the_world,
                                                      report):
    model, tokenizer = course_model_and_tokenizer
    results = probes.fact_completion(model, tokenizer, list(the_world.characters),
                                         world.PROBE_TEMPLATES_HELD_OUT)
    accuracy = probes.accuracy(results)
    assert accuracy == report["fact_completion_held_out_templates"]
    assert accuracy > 3 * 0.1  # chance is 1 in 10 values (1 in 59 for friends)


def test_pretrained_model_does_not_follow_the_chat_format(course_model_and_tokenizer, questions,
                                                          report):
    model, tokenizer = course_model_and_tokenizer
    results = probes.chat_answers(model, tokenizer, questions,
                                  load_recipe("tour", "tiny").probes["max_new_tokens"])
    rate = probes.accuracy(results, "chat_format")
    assert rate == report["chat_format_rate"]
    assert rate < 0.5


@pytest.mark.parametrize("reply, stopped, expected", [
    ("Odile lives in Fenwick.", True, True),
    ("Odile lives in Marrowby.", True, True),  # wrong town, right format
    (" is a stoat.", True, False),  # the base model's habit: no subject, wrong attribute
    ("Odile lives in Fenwick.", False, False),  # did not stop
    ("Odile lives in Fenwick. Odile is a hare.", True, False),  # rambles on
    ("Question: Where does Odile live? Answer: Odile lives in Fenwick.", True, False),
    ("Odile is a hare.", True, False),  # answers another attribute
    ("lives in Fenwick.", True, False),
])
def test_chat_format_judge(reply, stopped, expected):
    assert probes.is_chat_format_answer(reply, stopped, "Odile", "home") is expected


def test_tokenizer_rebuild_matches_the_committed_one():
    cfg = build.BuildConfig()
    passages, chats = build.read_world_texts()
    tokenizer = build.train_tokenizer(passages + chats, cfg.vocab_size)
    committed = json.loads((COURSE_MODEL_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads(tokenizer.backend_tokenizer.to_str())
    assert rebuilt["model"]["vocab"] == committed["model"]["vocab"]
    assert rebuilt["model"]["merges"] == committed["model"]["merges"]


def test_pretraining_replays_the_logged_losses():
    """The first steps of a rebuild reproduce the committed training log (same data, order,
    initialisation and optimizer); the tolerance allows for other CPUs' float rounding."""
    log = json.loads((COURSE_MODEL_DIR / "training_log.json").read_text())
    cfg = build.BuildConfig(**log["config"])
    assert cfg == build.BuildConfig(), "training_log.json was written with other settings"
    threads = torch.get_num_threads()
    try:
        _, model, blocks = build.build_tokenizer_and_model(cfg)
        losses = build.pretrain(model, blocks, cfg, steps=4, progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert losses == pytest.approx(log["losses"][:4], rel=1e-4)
    assert log["losses"][-1] < 0.25 * log["losses"][0]


def test_perplexity_is_exp_of_the_model_loss_and_masks_padding(course_model_and_tokenizer):

    model, tokenizer = course_model_and_tokenizer
    texts = ["Jasper lives in Ravenscar.",
             "Nothing pleases Jasper more than cheese scones. He says so."]
    for text in texts:
        batch = tokenizer(text, return_tensors="pt")
        expected = torch.exp(model(**batch, labels=batch["input_ids"]).loss).item()
        assert evaluation.perplexity(model, tokenizer, [text]) == pytest.approx(expected, rel=1e-5)
    # batched with padding: the token-weighted mean of the two, not polluted by the padding
    losses = []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt")
        losses.append((model(**batch, labels=batch["input_ids"]).loss.item(),
                       batch["input_ids"].shape[1] - 1))
    mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert evaluation.perplexity(model, tokenizer, texts) == pytest.approx(math.exp(mean), rel=1e-5)
