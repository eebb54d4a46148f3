"""nbmake, as its users run it: ``pytest --nbmake solutions`` runs every solution notebook top to
bottom (the exercises stop at their first stub by design), and ``--nbmake`` on ``notebooks/``
collects each lesson once, for nbmake alone (the course's own plugin steps aside)."""

from __future__ import annotations

import os
import subprocess
import sys

from course_utils.course.paths import REPO_ROOT


def pytest_run(*arguments, tmp_path):
    env = {**os.environ, "COURSE_ARTIFACTS": str(tmp_path), "COURSE_PROFILE": "tiny",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([sys.executable, "-m", "pytest", *arguments, "-q", "-p", "no:cacheprovider"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_pytest_nbmake_runs_every_solution_top_to_bottom(tmp_path):
    solutions = sorted((REPO_ROOT / "solutions").glob("ex*.ipynb"))
    result = pytest_run("--nbmake", "--nbmake-timeout=600", "solutions", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(solutions)} passed" in result.stdout


def test_with_nbmake_each_lesson_is_collected_once_and_by_nbmake(tmp_path):
    lessons = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    result = pytest_run("--nbmake", "--collect-only", "notebooks", tmp_path=tmp_path)
    collected = [line for line in result.stdout.splitlines() if line.startswith("notebooks/")]
    assert len(collected) == len(lessons), result.stdout[-2000:]
    without = pytest_run("--collect-only", "notebooks", tmp_path=tmp_path)  # the course's plugin
    assert len([line for line in without.stdout.splitlines() if line.startswith("notebooks/")]) == \
        len(lessons)
