"""The autograder: ``python -m course_utils.grade PATH... [--json FILE]``.

PATH is a notebook, a folder of notebooks, or a class folder holding one folder per student
(``submissions/alice/ex00_warmup.ipynb``). For each notebook the grader

1. finds its source in ``solutions/`` (by the notebook's ``metadata["course"]["exercise"]``, else
   by its file name), and takes every graded test cell *from the source*: hidden tests come
   back, and a student who edited or deleted a visible test is graded by the original;
2. runs the student's cells and the test cells in a fresh kernel, one cell at a time, with a time
   limit per cell and a cap on how much a cell may print, with ``COURSE_PROFILE=tiny`` and a
   fresh ``COURSE_GRADER_SEED`` for the hidden inputs;
3. awards a question's points when its test cell runs without an exception, and otherwise
   reports what went wrong in one line, with the question's hint.

Student code that raises, hangs, prints a flood or returns the wrong type costs only the questions
whose tests fail. The exit status is 0 whenever grading ran, whatever the scores; 2 for a grader
problem (a missing file, a file that is not a notebook, an exercise with no solution source).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from course_utils.checks import SEED_VARIABLE
from course_utils.exercises import SOLUTIONS_DIR, cell_text

DEFAULT_CELL_TIMEOUT_S = 120
DEFAULT_OUTPUT_LIMIT_CHARS = 20_000
EXERCISE_NAME = re.compile(r"(ex\d\d_[a-z0-9_]+?)(?:[ _-]*\(\d+\)|-checkpoint)?\.ipynb$")


class GraderError(Exception):
    """A problem with the grading itself (not with the student's answers)."""


@dataclass
class QuestionResult:
    """One question of one notebook, as it goes into the table and the JSON report."""

    student: str | None
    notebook: str
    exercise: str
    question: str
    points: float
    possible: float
    status: str  # passed | failed | error | timeout
    message: str
    hint: str


def graded_cells(notebook: dict) -> list[tuple[int, dict]]:
    """``(index, course metadata)`` of every graded test cell (``metadata.course.grade_id``)."""
    found = []
    for index, cell in enumerate(notebook["cells"]):
        meta = cell.get("metadata", {}).get("course", {})
        if cell["cell_type"] == "code" and "grade_id" in meta:
            if "points" not in meta:
                raise GraderError(f"graded cell {meta['grade_id']!r} has no 'points'")
            found.append((index, meta))
    return found


def exercise_name(path: Path, notebook: dict) -> str:
    """The exercise a notebook answers: its metadata, else its file name (``ex00_warmup``)."""
    name = notebook.get("metadata", {}).get("course", {}).get("exercise")
    if name:
        return name
    match = EXERCISE_NAME.search(path.name)
    if not match:
        raise GraderError(f"{path}: cannot tell which exercise this is (no course metadata and "
                          "the file name does not look like exNN_topic.ipynb)")
    return match.group(1)


def read_notebook(path: Path) -> dict:
    if not path.exists():
        raise GraderError(f"{path}: no such file")
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
            raise ValueError("no cell list")
    except (ValueError, UnicodeDecodeError) as error:
        raise GraderError(f"{path}: not a Jupyter notebook ({error})") from None
    return notebook


GUARD_CELL = '''\
import os as _os
_os.environ["{seed_variable}"] = "{seed}"
_os.environ["MPLBACKEND"] = "Agg"
from course_utils.grade import install_output_guard as _install_output_guard
_install_output_guard({limit})
'''


def install_output_guard(limit_chars: int) -> None:
    """Make any cell that prints more than ``limit_chars`` characters raise ``OutputFloodError``.

    Runs inside the grading kernel. The count restarts with every cell.
    """
    from IPython import get_ipython

    class OutputFloodError(RuntimeError):
        pass

    class GuardedStream:
        def __init__(self, stream):
            self._stream, self.written = stream, 0

        def write(self, text):
            self.written += len(text)
            if self.written > limit_chars:
                raise OutputFloodError(f"printed more than {limit_chars:,} characters in one cell")
            return self._stream.write(text)

        def __getattr__(self, name):
            return getattr(self._stream, name)

    sys.stdout, sys.stderr = GuardedStream(sys.stdout), GuardedStream(sys.stderr)

    def reset(*_):
        sys.stdout.written = sys.stderr.written = 0

    get_ipython().events.register("pre_run_cell", reset)


def grading_notebook(student: dict, source: dict, seed: int, output_limit: int):
    """The notebook the kernel runs: a guard cell, the student's cells, the source's test cells.

    Returns ``(nbformat notebook, {cell index: grade_id})``. Test cells the student deleted are
    appended at the end; grade ids a student invented are ignored.
    """
    import nbformat

    tests = {meta["grade_id"]: source["cells"][i] for i, meta in graded_cells(source)}
    cells, positions, placed = [], {}, set()
    cells.append(nbformat.v4.new_code_cell(GUARD_CELL.format(
        seed_variable=SEED_VARIABLE, seed=seed, limit=output_limit)))
    for cell in student["cells"]:
        if cell.get("cell_type") != "code":
            continue
        grade_id = cell.get("metadata", {}).get("course", {}).get("grade_id")
        if grade_id in tests and grade_id not in placed:
            positions[len(cells)] = grade_id
            placed.add(grade_id)
            cells.append(nbformat.v4.new_code_cell(cell_text(tests[grade_id])))
        else:
            cells.append(nbformat.v4.new_code_cell(cell_text(cell)))
    for grade_id, test in tests.items():
        if grade_id not in placed:
            positions[len(cells)] = grade_id
            cells.append(nbformat.v4.new_code_cell(cell_text(test)))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    return notebook, positions


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_cells(notebook, workdir: Path, timeout_s: float) -> dict[int, tuple[str, str]]:
    """Execute ``notebook`` cell by cell; return ``{index: (status, message)}`` per code cell."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    replies: dict[int, dict] = {}
    client = NotebookClient(
        notebook, timeout=timeout_s, kernel_name="python3", allow_errors=True,
        interrupt_on_timeout=True, record_timing=False,
        error_on_timeout={"ename": "Timeout", "evalue": f"no result after {timeout_s:g} s",
                          "traceback": []},
        resources={"metadata": {"path": str(workdir)}},
        on_cell_executed=lambda cell, cell_index, execute_reply: replies.__setitem__(
            cell_index, execute_reply))
    results: dict[int, tuple[str, str]] = {}
    with client.setup_kernel(env={**os.environ, "COURSE_PROFILE": "tiny"}):
        for index, cell in enumerate(notebook.cells):
            try:
                client.execute_cell(cell, index)
            except DeadKernelError:
                for rest in range(index, len(notebook.cells)):
                    results[rest] = ("error", f"the kernel died in cell {index}")
                break
            content = replies.get(index, {}).get("content", {})
            if content.get("status") == "ok":
                results[index] = ("passed", "")
            elif content.get("ename") == "Timeout":
                results[index] = ("timeout", f"timed out: {content.get('evalue')}")
            else:
                ename, evalue = content.get("ename", "Error"), content.get("evalue", "")
                if ename == "NotImplementedError":
                    results[index] = ("error", f"not answered yet (NotImplementedError: {evalue})")
                else:
                    results[index] = ("failed" if ename == "AssertionError" else "error",
                                      f"{ename}: {evalue}" if evalue else ename)
            cell.outputs = []  # keep memory flat whatever the cell printed
    return results


def grade_notebook(path: Path, student: str | None = None, solutions_dir: Path = SOLUTIONS_DIR,
                   timeout_s: float = DEFAULT_CELL_TIMEOUT_S,
                   output_limit: int = DEFAULT_OUTPUT_LIMIT_CHARS,
                   seed: int | None = None) -> list[QuestionResult]:
    """Grade one notebook; raise ``GraderError`` only for problems that are not the student's."""
    student_nb = read_notebook(path)
    exercise = exercise_name(path, student_nb)
    source_path = Path(solutions_dir) / f"{exercise}.ipynb"
    if not source_path.exists():
        raise GraderError(f"{path}: no solution source {source_path} for exercise {exercise!r}")
    source = read_notebook(source_path)
    questions = graded_cells(source)
    if not questions:
        raise GraderError(f"{source_path} has no graded cells")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    notebook, positions = grading_notebook(student_nb, source, seed, output_limit)
    outcomes = run_cells(notebook, path.parent, timeout_s)
    guard_status = outcomes.get(0, ("error", "grader setup cell did not run"))
    if guard_status[0] != "passed":
        raise GraderError(f"the grader's setup cell failed: {guard_status[1]}")
    by_id = {}
    for index, grade_id in positions.items():
        status, message = outcomes.get(index, ("error", "not run"))
        earlier = [i for i in range(1, index) if i not in positions
                   and outcomes.get(i, ("passed",))[0] != "passed"]
        if status != "passed" and message.startswith("NameError") and earlier:
            message += f" (an earlier cell failed: {outcomes[earlier[0]][1]})"
        by_id[grade_id] = (status, message)
    results = []
    for _, meta in questions:
        status, message = by_id[meta["grade_id"]]
        passed = status == "passed"
        results.append(QuestionResult(
            student=student, notebook=str(path), exercise=exercise, question=meta["grade_id"],
            points=float(meta["points"]) if passed else 0.0, possible=float(meta["points"]),
            status=status, message=one_line(message), hint="" if passed else meta.get("hint", "")))
    return results


def collect(path: Path) -> list[tuple[str | None, Path]]:
    """``(student, notebook)`` pairs for one PATH argument: a class folder's sub-folders name the
    students; a single notebook has no student name."""
    if not path.is_dir():
        return [(None, path)]
    pairs = []
    for notebook in sorted(path.rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in notebook.parts:
            relative = notebook.parent.relative_to(path)
            pairs.append((None if relative == Path(".") else relative.as_posix(), notebook))
    if not pairs:
        raise GraderError(f"{path}: no notebooks in this folder")
    return pairs


def format_table(results: list[QuestionResult]) -> str:
    """One block per notebook: question, points earned / possible, what went wrong and the hint."""
    lines = []
    first = results[0]
    who = f"  student: {first.student}" if first.student else ""
    lines.append(f"{first.notebook}  ({first.exercise}){who}")
    width = max(len("question"), *(len(r.question) for r in results))
    lines.append(f"  {'question':<{width}}  {'points':>9}  result")
    for r in results:
        detail = "passed" if r.status == "passed" else f"{r.status}: {r.message}"
        if r.hint:
            detail += f" | hint: {r.hint}"
        lines.append(f"  {r.question:<{width}}  {r.points:>4g} / {r.possible:<2g}  {detail}")
    earned, possible = sum(r.points for r in results), sum(r.possible for r in results)
    lines.append(f"  {'total':<{width}}  {earned:>4g} / {possible:<2g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.grade",
        description="Grade exercise notebooks: a notebook, a folder, or a class folder with one "
                    "folder per student.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--solutions", default=str(SOLUTIONS_DIR),
                        help="folder of solution notebooks (default: solutions/)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CELL_TIMEOUT_S,
                        help="seconds a cell may run (default: %(default)s)")
    parser.add_argument("--output-limit", type=int, default=DEFAULT_OUTPUT_LIMIT_CHARS,
                        help="characters a cell may print (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="seed for hidden inputs (default: fresh)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks graded at once, each in its own kernel (default: 1; a "
                             "class grades about twice as fast with --jobs 2 on two cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")

    all_results, problems, pairs = [], [], []
    for raw in args.paths:
        try:
            pairs += collect(Path(raw))
        except GraderError as error:
            problems.append(str(error))
            print(f"grader problem: {error}", file=sys.stderr)
    def grade_one(pair):
        student, path = pair
        start = time.perf_counter()
        try:
            results = grade_notebook(path, student, Path(args.solutions), args.timeout,
                                     args.output_limit, args.seed)
        except GraderError as error:
            return None, error, time.perf_counter() - start
        return results, None, time.perf_counter() - start

    # each notebook runs in its own kernel process, so threads are enough to grade several at
    # once; map() hands the outcomes back in submission order
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for results, error, seconds in pool.map(grade_one, pairs):
            if error is not None:
                problems.append(str(error))
                print(f"grader problem: {error}", file=sys.stderr)
                continue
            all_results += results
            print(format_table(results))
            print(f"  graded in {seconds:.1f} s\n", flush=True)
    if args.json:
        report = {"results": [asdict(r) for r in all_results], "problems": problems}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json} ({len(all_results)} rows)")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
