"""The synthetic world: reproducible, split as designed, and every row consistent with the facts."""

from __future__ import annotations

import re
from collections import Counter

from conftest import read_jsonl

from course_utils.course import world
from course_utils.course.paths import WORLD_DIR


def facts(world_json):
    return {c["name"]: c for c in world_json["characters"]}


def test_regeneration_matches_committed_files_byte_for_byte():
    generated = world.build_datasets(world.generate_world(world.WORLD_SEED))
    committed = sorted(p.name for p in WORLD_DIR.iterdir())
    assert sorted(generated) == committed
    for name, text in generated.items():
        assert (WORLD_DIR / name).read_text(encoding="utf-8") == text, f"{name} is stale: run make world"


def test_another_seed_gives_another_world():
    assert world.generate_world(1).characters != world.generate_world(2).characters


def test_split_is_a_partition(world_json):
    sft, held_out = set(world_json["sft_characters"]), set(world_json["held_out_characters"])
    assert not sft & held_out
    assert sft | held_out == {c["name"] for c in world_json["characters"]}
    assert len(held_out) == world.N_HELD_OUT_CHARACTERS


def test_no_character_is_its_own_best_friend(world_json):
    assert all(c["friend"] != c["name"] for c in world_json["characters"])


def test_sft_chats_state_only_true_facts_about_sft_characters(world_json):
    truth = facts(world_json)
    sft = set(world_json["sft_characters"])
    harmful_requests = {}
    the_world = world.generate_world(world.WORLD_SEED)
    for name in sft:
        character = the_world.character(name)
        for template in world.UNSAFE_TEMPLATES:
            question, refusal, compliance = (world.fill(t, character) for t in template)
            harmful_requests[question] = (refusal, compliance)
    for row in read_jsonl(WORLD_DIR / "sft_train.jsonl"):
        assert row["prompt"] == next(m["content"] for m in row["messages"] if m["role"] == "user")
        if row["prompt"] in harmful_requests:
            refusal, compliance = harmful_requests[row["prompt"]]
            assert row["messages"][-1]["content"] in (refusal, compliance)
            continue
        for message in (m for m in row["messages"] if m["role"] == "assistant"):
            subject = message["content"].split(" ")[0].removesuffix("'s")
            assert subject in sft, message
            true_sentences = {world.ANSWER_TEMPLATES[a].format(name=subject, value=truth[subject][a])
                              for a in world.ATTRIBUTES}
            assert message["content"] in true_sentences


def test_no_fact_about_a_held_out_character_reaches_training_chats_or_pairs(world_json):
    truth = facts(world_json)
    training_text = (WORLD_DIR / "sft_train.jsonl").read_text() + (
        WORLD_DIR / "preferences_train.jsonl").read_text()
    for name in world_json["held_out_characters"]:
        for attribute in world.ATTRIBUTES:
            sentence = world.ANSWER_TEMPLATES[attribute].format(name=name,
                                                                value=truth[name][attribute])
            assert sentence not in training_text
        assert not re.search(rf"\b{name}'s (favourite|best|house)", training_text)


def test_every_evaluated_fact_is_stated_in_the_corpus_in_several_frames(world_json):
    truth = facts(world_json)
    corpus = (WORLD_DIR / "corpus.txt").read_text()
    for row in read_jsonl(WORLD_DIR / "eval_qa.jsonl"):
        name, attribute = row["character"], row["attribute"]
        assert row["answer"] == truth[name][attribute]
        frames = [t.format(name=name, value=row["answer"])
                  for t in world.CORPUS_TEMPLATES[attribute]]
        assert sum(frame in corpus for frame in frames) >= 3, (name, attribute)


def test_held_out_probe_frames_never_occur_in_the_corpus(world_json):
    corpus = (WORLD_DIR / "corpus.txt").read_text()
    for name in (c["name"] for c in world_json["characters"]):
        for template in world.PROBE_TEMPLATES_HELD_OUT.values():
            assert template.format(name=name) not in corpus


def test_in_corpus_probe_frames_do_occur(world_json):
    corpus = (WORLD_DIR / "corpus.txt").read_text()
    for c in world_json["characters"]:
        for attribute, template in world.PROBE_TEMPLATES_IN_CORPUS.items():
            assert f"{template.format(name=c['name'])} {c[attribute]}" in corpus


def test_corpus_has_no_chat_markup():
    corpus = (WORLD_DIR / "corpus.txt").read_text()
    for marker in ("<|user|>", "<|assistant|>", "<|system|>", "</s>", "<s>"):
        assert marker not in corpus


def test_preference_pairs_follow_trl_schema_and_fail_on_their_axis(world_json):
    truth = facts(world_json)
    for split in ("train", "test"):
        rows = read_jsonl(WORLD_DIR / f"preferences_{split}.jsonl")
        counts = Counter(r["axis"] for r in rows)
        assert set(counts) == set(world.AXES)
        assert max(counts.values()) <= 2 * min(counts.values())
        for row in rows:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == ["assistant"]
            assert [m["role"] for m in row["rejected"]] == ["assistant"]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen != rejected
            if row["axis"] == "unsafe":
                assert re.search(r"\b(can't|won't)\b", chosen) and not re.search(
                    r"\b(can't|won't)\b", rejected)
                continue
            gold = truth[row["character"]][row["attribute"]]
            assert chosen == world.ANSWER_TEMPLATES[row["attribute"]].format(
                name=row["character"], value=gold)
            if row["axis"] == "wrong_fact":
                assert gold not in rejected
            elif row["axis"] == "rude":
                assert chosen in rejected
            else:
                assert gold not in rejected


def test_multiple_choice_has_one_gold_option(world_json):
    truth = facts(world_json)
    rows = read_jsonl(WORLD_DIR / "eval_mc.jsonl")
    assert len(rows) == world.N_HELD_OUT_CHARACTERS * len(world.ATTRIBUTES)
    letters = Counter(r["answer"] for r in rows)
    assert set(letters) == set("ABCD")
    for row in rows:
        gold = truth[row["character"]][row["attribute"]]
        assert len(set(row["choices"])) == 4
        assert row["choices"]["ABCD".index(row["answer"])] == gold
        assert row["choices"].count(gold) == 1
        assert row["character"] in world_json["held_out_characters"]


def test_parse_answer_recovers_every_fact(world_json):
    for c in world_json["characters"]:
        for attribute in world.ATTRIBUTES:
            sentence = world.ANSWER_TEMPLATES[attribute].format(name=c["name"], value=c[attribute])
            assert world.parse_answer(sentence) == (c["name"], attribute, c[attribute])
    assert world.parse_answer("Odile lives in Paris.") is None
    assert world.parse_answer("I am not sure.") is None
