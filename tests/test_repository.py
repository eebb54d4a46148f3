"""The repository itself: pins agree, notebooks open the same way, links resolve, data stays small."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from course_utils.course.paths import DATA_DIR, REPO_ROOT
from course_utils.notebook_tools.colab import BADGE_IMAGE, GITHUB_REPO, SETUP_CELL, course_notebooks

PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-\[\]]+)==([^\s#]+)\s*$")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_requirements_and_environment_pin_the_same_versions():
    requirements = pins(REPO_ROOT / "requirements.txt")
    environment = pins(REPO_ROOT / "environment.yml")
    assert requirements == environment
    assert requirements["torch"] == "2.13.0"
    for package in ("transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                    "matplotlib", "jupyterlab", "ipykernel", "papermill", "nbgrader", "pytest"):
        assert package in requirements, package


def test_every_requirement_line_is_pinned():
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert PIN.match(line), f"unpinned requirement: {line}"


def test_colab_requirements_are_a_subset_without_torch():
    colab = pins(REPO_ROOT / "requirements-colab.txt")
    requirements = pins(REPO_ROOT / "requirements.txt")
    assert "torch" not in colab
    assert {k: requirements[k] for k in colab} == colab


def test_ci_entry_calls_the_readme_test_command():
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in (REPO_ROOT / "README.md").read_text()


def test_shipped_data_stays_small():
    size = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert size < 25 * 1024**2, f"data/ is {size / 1024**2:.1f} MB"


NOTEBOOKS = course_notebooks()


def load(path):
    return json.loads(path.read_text())


def test_there_are_notebooks():
    assert any(p.parent.name == "notebooks" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_committed_without_outputs(path):
    for cell in load(path)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    assert "widgets" not in load(path)["metadata"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 requires cell ids (Jupyter warns, and will refuse, without them)."""
    ids = [cell.get("id") for cell in load(path)["cells"]]
    assert all(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_has_the_fixed_opening(path):
    cells = load(path)["cells"]
    title = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and title.startswith("# ")
    # a solution's badge opens its exercise: what nbgrader releases from it never leads to answers
    relative = path.relative_to(REPO_ROOT).as_posix().replace("solutions/", "exercises/")
    badge = (f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/"
             f"{GITHUB_REPO}/blob/main/{relative})")
    assert badge in title, "the Colab badge must point at this notebook (a solution's: its exercise)"
    for heading in ("Learning goals", "Prerequisites", "Time"):
        assert heading in title
    assert "".join(cells[1]["source"]) == SETUP_CELL, "run python -m course_utils.notebook_tools.colab"
    assert "parameters" in cells[2]["metadata"].get("tags", [])
    assert 'PROFILE = "auto"' in "".join(cells[2]["source"])


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.parent.name == "notebooks"],
                         ids=lambda p: p.name)
def test_lesson_notebook_names_follow_the_course_map(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)


def run_setup_cell(monkeypatch, tmp_path, on_colab: bool, keep_models_on_drive: bool = False):
    """Execute the set-up cell as a notebook would, with Colab simulated where asked: a fake
    ``google.colab`` (its ``drive.mount`` recorded), ``subprocess.run`` recorded instead of run,
    the clone's folder in ``tmp_path``. Returns the recorded commands and mounts."""
    import types

    from course_utils.notebook_tools import colab

    commands, mounts = [], []
    monkeypatch.setattr(colab.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COURSE_ARTIFACTS", raising=False)
    if on_colab:
        google, drive = types.ModuleType("google.colab"), types.ModuleType("google.colab.drive")
        drive.mount = mounts.append
        google.drive = drive
        monkeypatch.setitem(sys.modules, "google.colab", google)
        monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
        clone = tmp_path / "clone"
        (clone / "notebooks").mkdir(parents=True)
        (clone / "requirements-colab.txt").write_text((REPO_ROOT / "requirements-colab.txt").read_text())
        monkeypatch.setattr(colab, "COURSE_DIR", str(clone))
    cell = SETUP_CELL.replace("KEEP_MODELS_ON_DRIVE = False",
                              f"KEEP_MODELS_ON_DRIVE = {keep_models_on_drive}")
    exec(compile(cell, "set-up-cell", "exec"), {"subprocess": colab.subprocess})
    return commands, mounts


def test_the_setup_cell_outside_colab_only_hides_the_notices_and_the_housekeeping_bars(
        monkeypatch, tmp_path):
    import logging

    import datasets
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    import course_utils

    transformers_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    commands, mounts = run_setup_cell(monkeypatch, tmp_path, on_colab=False)
    assert commands == [] and mounts == [] and Path.cwd() == tmp_path
    for name in course_utils.KNOWN_NOTICES:
        assert logging.getLogger(name).filters, "set_up_notebook must hide the library notices"
    assert not transformers_logging.is_progress_bar_enabled(), "a bar per model loaded or saved"
    assert datasets.is_progress_bar_enabled() is False, "a bar per map() of trl's trainers"
    assert not huggingface_hub.utils.are_progress_bars_disabled(), "Hub downloads keep their bars"


def test_the_setup_cell_on_colab_clones_installs_around_torch_and_keeps_models_on_drive(
        monkeypatch, tmp_path):
    from importlib.metadata import version

    from course_utils.notebook_tools import colab

    commands, mounts = run_setup_cell(monkeypatch, tmp_path, on_colab=True, keep_models_on_drive=True)
    clone, install = commands
    assert clone == ("test -d /content/llm-finetuning-course || git clone --depth 1 "
                     f"https://github.com/{GITHUB_REPO} /content/llm-finetuning-course")
    assert install[1:4] == ["-m", "pip", "install"] and install[-2:] == ["-c", "/tmp/keep-torch.txt"]
    assert Path("/tmp/keep-torch.txt").read_text() == f"torch=={version('torch')}\n"
    assert mounts == ["/content/drive"] and os.environ["COURSE_ARTIFACTS"] == colab.DRIVE_ARTIFACTS
    assert Path.cwd() == tmp_path / "clone" / "notebooks"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_sources():
    yield REPO_ROOT / "README.md", (REPO_ROOT / "README.md").read_text()
    for md in sorted(REPO_ROOT.glob("*/**/README.md")):
        if not {".venv", "artifacts"} & set(md.parts):
            yield md, md.read_text()
    for path in NOTEBOOKS:
        text = "\n".join("".join(c["source"]) for c in load(path)["cells"]
                         if c["cell_type"] == "markdown")
        yield path, text


def test_relative_links_and_badges_resolve():
    broken = []
    for source, text in markdown_sources():
        for target in LINK.findall(text):
            target = target.split("#")[0]
            if target.startswith("https://colab.research.google.com/github/"):
                relative = target.split("/blob/main/", 1)[1]
                if not (REPO_ROOT / relative).exists():
                    broken.append((source.name, target))
            elif target and not re.match(r"^[a-z]+:", target):
                if not (source.parent / target).exists():
                    broken.append((source.name, target))
    assert not broken


def test_code_passes_ruff():
    """What `make lint` checks (its paths read from the Makefile): the package, the tests, the
    scripts and every notebook, solution and exercise."""
    import subprocess

    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (it is in requirements.txt)")
    lint_line = next(line for line in (REPO_ROOT / "Makefile").read_text().splitlines()
                     if "ruff check" in line)
    paths = lint_line.split("ruff check", 1)[1].split()
    assert {"course_utils", "tests", "notebooks", "solutions", "exercises"} <= set(paths)
    result = subprocess.run([str(ruff), "check", *paths], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]


def test_metrics_table_formats_numbers_readably(tmp_path):
    from course_utils.course import reporting

    table = reporting.summary_table({"01_x": {"bytes": 22482660.0, "rate": 0.98333, "n": 1200,
                                            "ok": True}})
    assert "22,482,660" in table and "0.9833" in table and "1,200" in table and "True" in table
    with pytest.raises(ValueError, match="finite"):
        reporting.write_metrics("x", {"loss": float("nan")})


def test_check_claims_passes_true_statements_and_catches_false_ones(capsys, monkeypatch):
    from course_utils.course import reporting

    measured = {"before": 0.50, "after": 0.88}
    assert reporting.check_claims({"accuracy rose": measured["after"] > measured["before"]},
                                strict=True) == {"accuracy rose": True}
    assert "holds: accuracy rose" in capsys.readouterr().out

    false_claim = {"accuracy rose": measured["after"] > measured["before"],
                   "accuracy doubled": measured["after"] >= 2 * measured["before"]}
    with pytest.raises(reporting.ClaimError, match="accuracy doubled") as error:
        reporting.check_claims(false_claim, strict=True)
    assert "accuracy rose" not in str(error.value)

    monkeypatch.setenv(reporting.STRICT_CLAIMS_VARIABLE, "1")
    with pytest.raises(reporting.ClaimError):
        reporting.check_claims(false_claim)
    monkeypatch.delenv(reporting.STRICT_CLAIMS_VARIABLE)
    capsys.readouterr()
    assert reporting.check_claims(false_claim) == {"accuracy rose": True, "accuracy doubled": False}
    out = capsys.readouterr().out
    assert "DOES NOT HOLD: accuracy doubled" in out and "Warning" in out

    with pytest.raises(TypeError, match="bool"):
        reporting.check_claims({"a number is not a verdict": 0.88})


def test_make_test_checks_the_lessons_claims_strictly():
    makefile = (REPO_ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:")[1].split("\n\n")[0]
    test_env = makefile.split("\nTEST_ENV :=")[1].split("\n")[0]
    assert "COURSE_STRICT_CLAIMS=1" in test_env
    assert "$(TEST_ENV) COURSE_CHROMIUM=\"$$chromium\" $(PY) -m pytest notebooks tests" in test_recipe
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert "-p course_utils.notebook_tools.pytest_notebooks" in pyproject  # what makes each lesson a test


GITHUB_PATH = re.compile(r"(?:github\.com|colab\.research\.google\.com/github)/([\w.-]+/[\w.-]+)")


def test_every_copy_of_the_repository_path_is_the_setting():
    from course_utils.notebook_tools.colab import repository_files

    for path in repository_files():
        for found in GITHUB_PATH.findall(path.read_text()):
            assert found == GITHUB_REPO, (path.name, found)
    badges = sum(path.read_text().count(f"colab.research.google.com/github/{GITHUB_REPO}/")
                 for path in NOTEBOOKS)
    assert badges == len(NOTEBOOKS)


def test_one_command_points_a_fork_everywhere(tmp_path):
    import shutil

    from course_utils.notebook_tools.colab import repository_files, set_repository

    for path in repository_files():
        target = tmp_path / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    changed = set_repository("someone/their-fork", root=tmp_path)
    assert len(changed) == len(repository_files(tmp_path))
    for path in repository_files(tmp_path):
        text = path.read_text()
        assert GITHUB_REPO not in text and "someone/their-fork" in text, path.name
    fork_setting = (tmp_path / "course_utils" / "notebook_tools" / "colab.py").read_text()
    assert 'GITHUB_REPO = "someone/their-fork"' in fork_setting
    with pytest.raises(ValueError):
        set_repository("not a repo", root=tmp_path)
