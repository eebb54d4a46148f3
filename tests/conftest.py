"""Shared fixtures. Tests never touch the network and write artifacts to a temporary folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import course_utils

course_utils.hide_library_notices()  # as every notebook's set-up cell does
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (the notebook kernels they start
    # inherit it), or torch's two threads per process oversubscribe the cores several times over
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def the_world():
    from course_utils.course import world

    return world.generate_world()


@pytest.fixture(scope="session")
def world_json():
    """The committed facts, read as plain JSON: an oracle independent of the generator code."""
    from course_utils.course.paths import WORLD_DIR

    return json.loads((WORLD_DIR / "world.json").read_text())


@pytest.fixture(scope="session")
def course_model_and_tokenizer():
    from course_utils.course.models import load_model_and_tokenizer
    from course_utils.course.profiles import tiny_profile

    return load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)


@pytest.fixture(scope="session")
def tokenizer(course_model_and_tokenizer):
    return course_model_and_tokenizer[1]


def read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]



# `make test` runs two pytest-xdist workers (--dist loadgroup). Lessons 07-11 share the models they
# build in artifacts/, so they run in order on one worker; lessons 02-05 too, so that 05 reuses the
# identical method runs of 02-04 (artifacts/peft_runs/); 00, 01 and 06 are independent; each test
# module stays on one worker, so its module-scoped fixtures are built once, except tests marked
# `spread`, which get a group of their own.
LESSON_CHAINS = {"lessons-02-05": ("02", "03", "04", "05"), "lessons-07-11": ("07", "08", "09", "10", "11")}


def lesson_chain(path: Path) -> str | None:
    if path.suffix != ".ipynb":
        return None
    return next((name for name, lessons in LESSON_CHAINS.items() if path.name[:2] in lessons), None)


#: test modules that take minutes: started before the short ones, so that the short ones fill the
#: end of both workers' runs
LONG_MODULES = ("test_rehearsal", "test_grading", "test_nbgrader", "test_jupyterlab", "test_tampering")


def start_order(item) -> int:
    """The longest runs start first, so that neither worker is left with one at the end: lessons
    07-11, then 02-05, then the long test modules, then everything else in collection order."""
    chain = lesson_chain(Path(str(item.path)))
    if chain == "lessons-07-11":
        return 0
    if chain:
        return 1
    return 2 if Path(str(item.path)).stem in LONG_MODULES else 3


def pytest_collection_modifyitems(config, items):
    if not config.getoption("loadgroup", default=False):  # set in xdist workers only
        return
    items.sort(key=start_order)
    for item in items:
        path = Path(str(item.path))
        if path.suffix == ".ipynb":
            group = lesson_chain(path) or path.stem
        elif item.get_closest_marker("spread"):
            group = item.name
        else:
            group = path.stem
        if "@" not in item.nodeid:
            # what xdist does for an xdist_group mark (the group after "@" in the test's id), in
            # the form pytest 9 stores ids; xdist 3.8 still writes the attribute pytest 8 used
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{group}")
