"""Where things live: the repository, the shipped data and the (git-ignored) artifacts."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
WORLD_DIR = DATA_DIR / "world"
COURSE_MODEL_DIR = DATA_DIR / "course-model"
SAMPLES_DIR = DATA_DIR / "samples"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: Trained models and metrics go here; ``COURSE_ARTIFACTS`` moves it (tests use a temp folder).
ARTIFACTS_DIR = Path(os.environ.get("COURSE_ARTIFACTS", REPO_ROOT / "artifacts"))


def artifacts_dir(*parts: str) -> Path:
    """``artifacts/<parts...>``, created if missing."""
    path = ARTIFACTS_DIR.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
