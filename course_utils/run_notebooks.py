"""Execute every lesson notebook in order with papermill, then print the metrics table and the
pipeline table of lesson 11.

``make run`` calls this. Executed copies go to ``artifacts/executed/``; the profile comes from
``COURSE_PROFILE`` (unset: each notebook's ``PROFILE = "auto"``). A failing notebook stops the
run with the path of its executed copy, where the failing cell's traceback is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from course_utils import paths, reporting


def lesson_notebooks(folder: Path = paths.NOTEBOOKS_DIR) -> list[Path]:
    """``notebooks/NN_topic.ipynb`` files in course order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def main(argv=None) -> int:
    import papermill

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="run only these (default: all, in order)")
    args = parser.parse_args(argv)
    notebooks = [Path(n) for n in args.notebooks] or lesson_notebooks()
    out_dir = paths.artifacts_dir("executed")
    profile = os.environ.get("COURSE_PROFILE") or "auto"
    timings = []
    for notebook in notebooks:
        target = out_dir / notebook.name
        print(f"--- {notebook.name} (profile {profile})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(target), parameters={"PROFILE": profile},
                                       cwd=str(notebook.parent), kernel_name="python3",
                                       progress_bar=False)
        except papermill.PapermillExecutionError as error:
            print(f"FAILED: {notebook.name}: {error.ename}: {error.evalue}\n"
                  f"see the executed copy for the traceback: {target}", file=sys.stderr)
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

    from course_utils.evaluation import pipeline_table

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
