"""Data loaders: the world files and the Hub code paths, run on the shipped schema samples."""

from __future__ import annotations

import pytest
from conftest import read_jsonl

from course_utils.course import data
from course_utils.course.paths import WORLD_DIR
from course_utils.course.profiles import tiny_profile
from course_utils.course.recipes import load_recipe


def test_ultrachat_sample_loads_through_the_hub_code_path():
    rows = data.load_ultrachat(data.ULTRACHAT_SAMPLE, n_rows=2, seed=42)
    assert len(rows) == 2
    assert set(rows.column_names) == {"prompt", "prompt_id", "messages"}
    again = data.load_ultrachat(data.ULTRACHAT_SAMPLE, n_rows=2, seed=42)
    assert rows["prompt_id"] == again["prompt_id"]  # seeded shuffle
    all_rows = data.load_ultrachat(data.ULTRACHAT_SAMPLE, n_rows=3000, seed=0)
    assert len(all_rows) == 3  # n_rows larger than the data set takes everything


def test_ultrachat_prompt_id_is_sha256_of_prompt():
    import hashlib

    for row in read_jsonl(data.ULTRACHAT_SAMPLE):
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()


def test_orca_pairs_are_filtered_as_in_the_literature():
    raw = read_jsonl(data.ORCA_DPO_SAMPLE)
    expected_inputs = [r["input"] for r in raw if r["status"] != "tie"
                       and r["chosen_score"] >= 8 and not r["in_gsm8k_train"]]
    assert len(expected_inputs) == 2
    pairs = data.load_orca_dpo_pairs(
        data.ORCA_DPO_SAMPLE, min_chosen_score=load_recipe("data", "colab").preferences["min_chosen_score"])
    assert [p["prompt"][-1]["content"] for p in pairs] == expected_inputs
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"}
    with_system = pairs[0]
    assert [m["role"] for m in with_system["prompt"]] == ["system", "user"]
    assert [m["role"] for m in pairs[1]["prompt"]] == ["user"]  # empty system dropped
    assert with_system["chosen"] == [{"role": "assistant", "content": raw[0]["chosen"]}]


def test_world_loaders_return_every_row():
    profile = tiny_profile()
    for split in ("train", "test"):
        assert len(data.load_sft_dataset(profile, split)) == len(
            read_jsonl(WORLD_DIR / f"sft_{split}.jsonl"))
        pairs = data.load_preference_dataset(profile, split)
        assert len(pairs) == len(read_jsonl(WORLD_DIR / f"preferences_{split}.jsonl"))
        assert "axis" in pairs.column_names


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_sft_dataset(tiny_profile(), "validation")


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "user"}], "needs 'role' and 'content'"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": "x"}], "user turn followed by an assistant turn"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
     "user turn followed by an assistant turn"),
])
def test_malformed_messages_get_a_clear_error(messages, message):
    with pytest.raises(data.DataFormatError, match=message):
        data.validate_messages(messages, "row 7")


def test_malformed_file_names_the_row(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"prompt": "a", "prompt_id": "b", "messages": [{"role": "user", '
                    '"content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"prompt": "a", "prompt_id": "b", "messages": [{"role": "user", '
                    '"content": "a"}]}\n')
    with pytest.raises(data.DataFormatError, match=r"row \d: needs a user turn followed"):
        data.load_ultrachat(path, seed=0, n_rows=10)


def test_missing_file_says_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="course_utils.course.world"):
        data.load_ultrachat(tmp_path / "missing.jsonl", n_rows=1, seed=0)
