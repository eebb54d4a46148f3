"""The fixed opening of every notebook: the Colab badge and the Colab-only install cell.

Each notebook carries a copy of ``INSTALL_CELL`` as its second cell (Colab must run it before
``course_utils`` exists, so it cannot be imported); ``tests/test_repository.py`` fails
when a copy drifts from this source, and ``python -m course_utils.notebook_tools.colab`` rewrites the copies.
A fork runs ``python -m course_utils.notebook_tools.colab --repo owner/name``: ``GITHUB_REPO`` below is the one
setting, and ``set_repository`` rewrites it and every copy of it (badges, install cells, README).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from course_utils.course.paths import REPO_ROOT

GITHUB_REPO = "fine-tuning-course/llm-finetuning-course"
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

INSTALL_CELL = f'''\
# Colab only: install the course's pinned packages and fetch the course. Does nothing elsewhere.
import sys

KEEP_MODELS_ON_DRIVE = False  # True: artifacts/ on Google Drive, so later lessons find 07-10's models

if "google.colab" in sys.modules:
    import os
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    if KEEP_MODELS_ON_DRIVE:  # each notebook gets a fresh runtime; the Drive folder outlives it
        from google.colab import drive

        drive.mount("/content/drive")
        os.environ["COURSE_ARTIFACTS"] = "/content/drive/MyDrive/llm-finetuning-course/artifacts"

    COURSE_DIR = "/content/llm-finetuning-course"
    REPOSITORY = "https://github.com/{GITHUB_REPO}"
    if not os.path.isdir(COURSE_DIR):
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, COURSE_DIR], check=True)
    requirements = f"{{COURSE_DIR}}/requirements-colab.txt"
    packages = [line.split("==")[0] for line in open(requirements)
                if line.strip() and not line.startswith("#")]

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    before = {{name: installed(name) for name in packages}}
    # Pin Colab's own torch so pip can never replace it with another multi-GB build.
    with open("/tmp/keep-torch.txt", "w") as constraint:
        constraint.write(f"torch=={{version('torch')}}\\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", requirements,
                    "-c", "/tmp/keep-torch.txt"], check=True)
    changed = [name for name in packages if installed(name) != before[name]]
    imported = [name for name in changed if name.replace("-", "_") in sys.modules]
    sys.path.insert(0, COURSE_DIR)
    os.chdir(f"{{COURSE_DIR}}/notebooks")
    if imported:
        print("Upgraded packages that were already imported:", ", ".join(imported))
        print("Restart the runtime now (Runtime > Restart session), then run all cells again.")
    else:
        print("Course ready:", COURSE_DIR, "| installed or upgraded:", ", ".join(changed) or "none")
'''.rstrip("\n")


def badge_markdown(notebook_path: str) -> str:
    """The 'Open in Colab' badge for ``notebook_path`` (relative to the repository root)."""
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/{notebook_path}"
    return f"[![Open In Colab]({BADGE_IMAGE})]({url})"


def course_notebooks() -> list:
    """Every notebook that carries the fixed opening: lessons, solutions and exercises."""
    folders = ("notebooks", "solutions", "exercises")
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).glob("*.ipynb"))


def sync_install_cells() -> list:
    """Rewrite the install cell (the second cell) of every course notebook from ``INSTALL_CELL``;
    return the notebooks that changed."""
    changed = []
    for path in course_notebooks():
        notebook = json.loads(path.read_text())
        cell = notebook["cells"][1]
        if "".join(cell["source"]) != INSTALL_CELL:
            cell["source"] = INSTALL_CELL.splitlines(keepends=True)
            path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
            changed.append(path)
    return changed


REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$")


def repository_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every file that names the repository: this module, the README and the course notebooks."""
    folders = ("notebooks", "solutions", "exercises")
    return [root / "course_utils" / "colab.py", root / "README.md",
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
    for path in sync_install_cells():
        print(f"updated {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
