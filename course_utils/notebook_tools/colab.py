"""The fixed opening of every notebook: the Colab badge and the set-up cell, and what that cell calls.

Each notebook carries a copy of ``SETUP_CELL`` as its second cell: on Colab it clones the course
(``course_utils`` does not exist there before), then calls ``set_up_notebook``, which installs the
pinned packages on Colab and, everywhere, hides four library notices no lesson needs
(``course_utils.hide_library_notices``). ``tests/test_repository.py`` fails when a copy drifts
from this source; ``python -m course_utils.notebook_tools.colab`` rewrites the copies. A fork runs
``python -m course_utils.notebook_tools.colab --repo owner/name``: ``GITHUB_REPO`` below is the one
setting, and ``set_repository`` rewrites it and every copy of it (badges, set-up cells, README).

This module, ``course_utils/__init__.py`` and ``course.paths`` import nothing beyond the standard
library: on Colab they run before the pinned packages exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import course_utils
from course_utils.course.paths import REPO_ROOT

GITHUB_REPO = "fine-tuning-course/llm-finetuning-course"
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

COURSE_DIR = "/content/llm-finetuning-course"  # where the set-up cell clones the course on Colab
DRIVE_ARTIFACTS = "/content/drive/MyDrive/llm-finetuning-course/artifacts"

SETUP_CELL = f'''\
# Set-up. On Colab: fetch the course and install its pinned packages. Everywhere: hide four library
# notices the lessons do not need (course_utils/__init__.py lists them). See notebook_tools/colab.py.
import subprocess
import sys

KEEP_MODELS_ON_DRIVE = False  # True: artifacts/ on Google Drive, so later lessons find 07-10's models

COURSE = "{COURSE_DIR}"
if "google.colab" in sys.modules:  # the clone, once per runtime
    clone = "git clone --depth 1 https://github.com/{GITHUB_REPO}"
    subprocess.run(f"test -d {{COURSE}} || {{clone}} {{COURSE}}", shell=True, check=True)
    sys.path.insert(0, COURSE)
from course_utils.notebook_tools.colab import set_up_notebook  # noqa: E402 (after the clone)

set_up_notebook(keep_models_on_drive=KEEP_MODELS_ON_DRIVE)'''


def on_colab() -> bool:
    return "google.colab" in sys.modules


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def install_pinned_packages(course_dir: str | None = None) -> None:
    """pip-install ``requirements-colab.txt`` on top of Colab's own torch (pinned as a constraint,
    so pip never replaces it with another multi-GB build); say whether to restart the runtime."""
    course_dir = course_dir or COURSE_DIR
    requirements = f"{course_dir}/requirements-colab.txt"
    packages = [line.split("==")[0] for line in open(requirements)
                if line.strip() and not line.startswith("#")]
    before = {name: installed_version(name) for name in packages}
    with open("/tmp/keep-torch.txt", "w") as constraint:
        constraint.write(f"torch=={version('torch')}\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", requirements,
                    "-c", "/tmp/keep-torch.txt"], check=True)
    changed = [name for name in packages if installed_version(name) != before[name]]
    imported = [name for name in changed if name.replace("-", "_") in sys.modules]
    if imported:
        print("Upgraded packages that were already imported:", ", ".join(imported))
        print("Restart the runtime now (Runtime > Restart session), then run all cells again.")
    else:
        print("Course ready:", course_dir, "| installed or upgraded:", ", ".join(changed) or "none")


def set_up_notebook(keep_models_on_drive: bool = False) -> None:
    """What the set-up cell does after the clone. On Colab: keep ``artifacts/`` on Google Drive if
    asked (each notebook gets a fresh runtime; the Drive folder outlives it), install the pinned
    packages and work from the clone's ``notebooks/``. Everywhere: ``hide_library_notices()``,
    before any cell imports bitsandbytes, and ``hide_housekeeping_bars()``."""
    if on_colab():
        if keep_models_on_drive:
            from google.colab import drive  # only exists on Colab

            drive.mount("/content/drive")
            os.environ["COURSE_ARTIFACTS"] = DRIVE_ARTIFACTS
        install_pinned_packages()
        os.chdir(f"{COURSE_DIR}/notebooks")
    elif keep_models_on_drive:
        print("KEEP_MODELS_ON_DRIVE applies on Colab only; here artifacts/ stays in the repository.")
    course_utils.hide_library_notices()
    course_utils.hide_housekeeping_bars()


def course_notebooks() -> list:
    """Every notebook that carries the fixed opening: lessons, solutions and exercises."""
    folders = ("notebooks", "solutions", "exercises")
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).glob("*.ipynb"))


def sync_setup_cells() -> list:
    """Rewrite the set-up cell (the second cell) of every course notebook from ``SETUP_CELL``;
    return the notebooks that changed."""
    changed = []
    for path in course_notebooks():
        notebook = json.loads(path.read_text())
        cell = notebook["cells"][1]
        if "".join(cell["source"]) != SETUP_CELL:
            cell["source"] = SETUP_CELL.splitlines(keepends=True)
            path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
            changed.append(path)
    return changed


REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$")


def repository_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every file that names the repository: this module, the README and the course notebooks."""
    folders = ("notebooks", "solutions", "exercises")
    return [root / "course_utils" / "notebook_tools" / "colab.py", root / "README.md",
            *sorted(p for folder in folders for p in (root / folder).glob("*.ipynb"))]


def set_repository(repo: str, root: Path = REPO_ROOT, current: str = GITHUB_REPO) -> list[Path]:
    """Point the course at ``repo`` (``owner/name``): rewrite ``current`` in every file of
    ``repository_files(root)``. Returns the files that changed."""
    if not REPO_PATTERN.match(repo):
        raise ValueError(f"expected a GitHub path such as 'you/your-fork', got {repo!r}")
    changed = []
    for path in repository_files(root):
        text = path.read_text()
        if current in text:
            path.write_text(text.replace(current, repo))
            changed.append(path)
    return changed


def main(argv: list[str]) -> int:
    if argv[:1] == ["--repo"] and len(argv) == 2:
        for path in set_repository(argv[1]):
            print(f"updated {path.relative_to(REPO_ROOT)}")
        return 0
    if argv:
        print("usage: python -m course_utils.notebook_tools.colab [--repo owner/name]", file=sys.stderr)
        return 2
    for path in sync_setup_cells():
        print(f"updated {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
