"""pytest plugin (``-p course_utils.notebook_tools.pytest_notebooks``, set in ``pyproject.toml``):
every lesson notebook in ``notebooks/`` is a test, executed as ``make run`` executes it
(``run_notebooks.execute``, papermill), so that ``make test`` leaves the executed course in
``artifacts/executed/`` for ``make site``: the course runs once per run, not twice.

A notebook passes when no cell raises (the lessons' ``check_claims`` raise under
``COURSE_STRICT_CLAIMS=1``); a failure shows the cell, the error, the end of its traceback and the
executed copy's path.

With ``--nbmake`` (the ``nbmake`` plugin, pinned), this plugin steps aside and nbmake runs what it
is given, lessons included: ``pytest --nbmake notebooks solutions``, as nbmake's users type it.
``make test`` uses this plugin for the lessons because nbmake can keep a notebook's outputs only
by writing them back into the committed file (``--overwrite``), and the lessons are committed
without outputs; the site would need them executed a second time.
"""

from __future__ import annotations

import pytest

from course_utils.course import paths
from course_utils.notebook_tools import run_notebooks
from course_utils.notebook_tools.run_notebooks import NotebookFailed

#: seconds one cell may run before the notebook fails
CELL_TIMEOUT_S = 900


def pytest_collect_file(parent, file_path):
    if getattr(parent.config.option, "nbmake", False):
        return None
    if file_path.suffix == ".ipynb" and file_path.parent == paths.NOTEBOOKS_DIR:
        return LessonNotebook.from_parent(parent, path=file_path)
    return None


class LessonNotebook(pytest.File):
    def collect(self):
        yield LessonRun.from_parent(self, name=self.path.name)


class LessonRun(pytest.Item):
    def runtest(self):
        run_notebooks.execute(self.path, cell_timeout=CELL_TIMEOUT_S)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, NotebookFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"notebook {self.path.name}"
