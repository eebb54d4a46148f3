"""Execute every lesson notebook in order with papermill, then print the metrics table and the
pipeline table of lesson 11.

``make run`` calls this, and ``make test`` executes each lesson through the same ``execute``
(``course_utils.notebook_tools.pytest_notebooks``). Executed copies go to ``artifacts/executed/``,
each with the date, profile and library versions it ran with in its metadata (``make site``
publishes them); the profile comes from ``COURSE_PROFILE`` (unset: each notebook's
``PROFILE = "auto"``). A failing
notebook stops the run with the path of its executed copy, where the failing cell's traceback is.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from course_utils.course import paths, reporting
from course_utils.evaluation import pipeline_table

#: the libraries whose versions an executed notebook records (what its numbers depend on)
RECORDED_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets",
                      "accelerate", "tokenizers", "numpy")


INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the cell, the error and where the executed copy is."""


def lesson_notebooks(folder: Path = paths.NOTEBOOKS_DIR) -> list[Path]:
    """``notebooks/NN_topic.ipynb`` files in course order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run_record(profile: str, executed_in: str) -> dict:
    """When, where, through what (``executed_in``) and with what a notebook was executed."""
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"executed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "executed_in": executed_in,
            "profile": profile, "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "versions": versions}


def execute(notebook: Path, target: Path | None = None, profile: str | None = None,
            cell_timeout: int | None = None, parameters: dict | None = None) -> Path:
    """Execute ``notebook`` with papermill in its own folder, write the executed copy (default
    ``artifacts/executed/<name>``) with ``run_record`` in its metadata, and return its path.
    ``parameters`` are set besides ``PROFILE`` (``make portability`` sets ``SEED``).
    Raises ``NotebookFailed`` when a cell raises."""
    import nbformat
    import papermill

    profile = profile or os.environ.get("COURSE_PROFILE") or "auto"
    target = Path(target or paths.artifacts_dir("executed") / notebook.name)
    record = run_record(profile, "papermill, course_utils.notebook_tools.run_notebooks")
    # the kernel inherits this process's environment: figures inline, whatever backend the
    # caller (make's MPLBACKEND=Agg for the tests' own plots) chose for itself
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    try:
        papermill.execute_notebook(str(notebook), str(target),
                                   parameters={"PROFILE": profile, **(parameters or {})},
                                   cwd=str(notebook.parent), kernel_name="python3",
                                   progress_bar=False, execution_timeout=cell_timeout)
    except papermill.PapermillExecutionError as error:
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback[-12:] or []))
        raise NotebookFailed(f"{notebook.name}: cell {error.exec_count} raised {error.ename}: "
                             f"{error.evalue}\n{traceback}\nthe executed copy: {target}") from None
    finally:
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    executed = nbformat.read(target, as_version=4)
    executed.metadata["course"] = record
    nbformat.write(executed, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="run only these (default: all, in order)")
    args = parser.parse_args(argv)
    notebooks = [Path(n) for n in args.notebooks] or lesson_notebooks()
    profile = os.environ.get("COURSE_PROFILE") or "auto"
    timings = []
    for notebook in notebooks:
        print(f"--- {notebook.name} (profile {profile})", flush=True)
        start = time.perf_counter()
        try:
            execute(notebook, profile=profile)
        except NotebookFailed as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 1
        timings.append((notebook.name, time.perf_counter() - start))
    print("\nrun times")
    for name, seconds in timings:
        print(f"  {name:<40} {seconds:6.1f} s")
    print("\nmetrics (artifacts/*/metrics.json)")
    print(reporting.summary_table(reporting.read_all_metrics()))
    print_pipeline_table()
    return 0


def print_pipeline_table(path: Path | None = None) -> bool:
    """The course's headline table, written by lesson 11: every model of the pipeline on the same
    held-out sets, with 95% intervals (Wilson for shares, resampling characters for scores). Returns
    whether it was found."""
    import json

    path = Path(path or paths.artifacts_dir("11_evaluation") / "pipeline.json")
    if not path.exists():
        print(f"\nno pipeline table at {path}: run notebooks/11_evaluation.ipynb")
        return False
    print("\nthe pipeline side by side (lesson 11; held-out sets; 95% intervals: Wilson for shares, "
          "resampling characters for the RM score and win rate)")
    print(pipeline_table(json.loads(path.read_text())))
    return True


if __name__ == "__main__":
    sys.exit(main())
