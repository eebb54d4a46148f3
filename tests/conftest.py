"""Shared fixtures. Tests never touch the network and write artifacts to a temporary folder."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def the_world():
    from course_utils import world

    return world.generate_world()


@pytest.fixture(scope="session")
def world_json():
    """The committed facts, read as plain JSON: an oracle independent of the generator code."""
    from course_utils.paths import WORLD_DIR

    return json.loads((WORLD_DIR / "world.json").read_text())


@pytest.fixture(scope="session")
def course_model_and_tokenizer():
    from course_utils.models import load_model_and_tokenizer
    from course_utils.profiles import tiny_profile

    return load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)


@pytest.fixture(scope="session")
def tokenizer(course_model_and_tokenizer):
    return course_model_and_tokenizer[1]


def read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]

