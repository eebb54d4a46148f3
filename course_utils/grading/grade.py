"""The autograder: ``python -m course_utils.grading.grade PATH... [--json FILE]``.

PATH is a notebook, a folder of notebooks, or a class folder holding one folder per student
(``submissions/alice/ex00_warmup.ipynb``). For each notebook the grader

1. finds its source in ``solutions/`` (by the notebook's ``metadata["course"]["exercise"]``, else
   by its file name), and takes every graded test cell *from the source*: hidden tests come
   back, and a student who edited or deleted a visible test is graded by the original;
2. runs the student's cells, and only those, in a fresh kernel inside ``course_utils.grading.sandbox``'s
   limits (memory, CPU time, processes, file size, files it may read, network, environment), one
   cell at a time, with a time limit per cell and a cap on how much a cell may print;
3. runs the test cells in the *judge* (``course_utils.grading.verdict``), a separate process that never runs
   student code: the hidden inputs (from a fresh ``COURSE_GRADER_SEED``), the references and the
   comparisons happen there, and each call to an answer function is forwarded to the student's
   kernel as plain data and its result sent back the same way;
4. awards a question's points when its test cell runs without an exception in the judge, and
   otherwise reports what went wrong in one line, with the question's hint.

Nothing the submission does in its own process (patching the check helpers, ``torch``, builtins,
printing "passed", exiting, reading files) can change a verdict: the judge only sees the values
its functions return.

Student code that raises, hangs, prints a flood or returns the wrong type costs only the questions
whose tests fail. The exit status is 0 whenever grading ran, whatever the scores; 2 for a grader
problem (a missing file, a file that is not a notebook, an exercise with no solution source).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from course_utils.grading.make_exercises import SOLUTIONS_DIR, cell_text
from course_utils.grading.sandbox import Limits, clean_environment, kill_strays
from course_utils.grading.verdict import REPLY_FILE, REQUEST_FILE

DEFAULT_CELL_TIMEOUT_S = 120
DEFAULT_OUTPUT_LIMIT_CHARS = 20_000
MAX_KERNEL_RESTARTS = 3  # per submission: a crash costs its question, a crash loop the rest
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
from course_utils.grading.grade import install_output_guard as _install_output_guard
_install_output_guard({limit})
'''
SERVE_CELL = '__import__("course_utils.grading.verdict", fromlist=["serve_call"]).serve_call({name!r})'


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


def grading_notebook(student: dict, source: dict, output_limit: int):
    """The notebook the student's kernel runs: a guard cell, then the student's cells without the
    graded test cells (those run in the judge, taken from the source). Cells whose grade id a
    student invented run as ordinary cells."""
    import nbformat

    test_ids = {meta["grade_id"] for _, meta in graded_cells(source)}
    cells = [nbformat.v4.new_code_cell(GUARD_CELL.format(limit=output_limit))]
    for cell in student["cells"]:
        if cell.get("cell_type") != "code":
            continue
        if cell.get("metadata", {}).get("course", {}).get("grade_id") in test_ids:
            continue
        cells.append(nbformat.v4.new_code_cell(cell_text(cell)))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "course-sandbox", "display_name": "Python 3 (graded)",
                                       "language": "python"}
    return notebook


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sandbox_client_class():
    """nbclient's client, starting its kernel through ``course_utils.grading.sandbox`` and dropping output
    past a cap (the kernel's own guard can be undone by the submission; this one cannot)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class SandboxClient(NotebookClient):
        spec_dir: str = ""
        output_cap: int = DEFAULT_OUTPUT_LIMIT_CHARS
        printed: dict

        def create_kernel_manager(self):
            self.km = AsyncKernelManager(
                kernel_name="course-sandbox", config=self.config,
                kernel_spec_manager=KernelSpecManager(kernel_dirs=[self.spec_dir]))
            return self.km

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            size = len(str(content.get("text", ""))) + len(str(content.get("data", "")))
            self.printed[cell_index] = self.printed.get(cell_index, 0) + size
            if self.printed[cell_index] > self.output_cap:
                return None
            return super().output(outs, msg, display_id, cell_index)

    return SandboxClient


def _cell_outcome(content: dict, printed: int, output_limit: int) -> tuple[str, str]:
    if printed > 2 * output_limit:
        return "error", f"printed more than {output_limit:,} characters in one cell"
    if content.get("status") == "ok":
        return "passed", ""
    if content.get("ename") == "Timeout":
        return "timeout", f"timed out: {content.get('evalue')}"
    ename, evalue = content.get("ename", "Error"), content.get("evalue", "")
    if ename == "NotImplementedError":
        return "error", "not answered yet (NotImplementedError" + (f": {evalue})" if evalue else ")")
    return ("failed" if ename == "AssertionError" else "error",
            f"{ename}: {evalue}" if evalue else ename)


def _kernel_pid(client) -> int | None:
    try:
        return client.km.provisioner.process.pid
    except AttributeError:
        return None


def _kill_strays(client) -> None:
    """After every cell and call: whatever the kernel forked and left running goes."""

    pid = _kernel_pid(client)
    if pid and sys.platform.startswith("linux"):
        kill_strays(pid)


def _kill_kernel_group(client) -> None:
    """Kill whatever the kernel left running (a fork bomb's children share its process group)."""
    try:
        pid = client.km.provisioner.process.pid
        os.killpg(pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError, OSError):
        pass


def run_submission(notebook, source_path: Path, seed: int, timeout_s: float, output_limit: int,
                   limits: Limits) -> tuple[dict[int, tuple[str, str]], dict, dict]:
    """Run the student's ``notebook`` in a sandboxed kernel, then the judge against it.

    Returns ``(cell outcomes of the student's cells, {grade_id: (status, message)} from the judge,
    what the sandbox enforced)``.
    """
    from nbclient.exceptions import DeadKernelError

    workdir = Path(tempfile.mkdtemp(prefix="course-grade-"))
    spec_dir = Path(tempfile.mkdtemp(prefix="course-kernel-"))
    (spec_dir / "course-sandbox").mkdir()
    (spec_dir / "course-sandbox" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "course_utils.grading.sandbox", limits.to_json(), str(workdir),
                 "{connection_file}"],
        "display_name": "Python 3 (graded)", "language": "python"}))
    os.chmod(workdir, 0o755)
    judge = JUDGES.acquire(source_path, timeout_s)
    # the judge sets up the solution's context while the student's cells run
    judge.send({"grade": str(source_path), "seed": seed})
    replies: dict[int, dict] = {}
    client = _sandbox_client_class()(
        notebook, timeout=timeout_s, kernel_name="course-sandbox", allow_errors=True,
        interrupt_on_timeout=True, record_timing=False, startup_timeout=120,
        error_on_timeout={"ename": "Timeout", "evalue": f"no result after {timeout_s:g} s",
                          "traceback": []},
        resources={"metadata": {"path": str(workdir)}},
        on_cell_executed=lambda cell, cell_index, execute_reply: replies.__setitem__(
            cell_index, execute_reply))
    client.spec_dir, client.output_cap, client.printed = str(spec_dir), 2 * output_limit, {}
    outcomes: dict[int, tuple[str, str]] = {}
    verdicts: dict = {}
    kernel_env = clean_environment(workdir, {"COURSE_PROFILE": "tiny", "MPLBACKEND": "Agg"})
    dead = None
    try:
        with client.setup_kernel(env=kernel_env, cwd=str(workdir)):
            try:
                for index, cell in enumerate(list(notebook.cells)):
                    try:
                        client.execute_cell(cell, index)
                    except DeadKernelError:
                        dead = f"the kernel died in cell {index}"
                        for rest in range(index, len(notebook.cells)):
                            outcomes[rest] = ("error", dead)
                        break
                    outcomes[index] = _cell_outcome(replies.get(index, {}).get("content", {}),
                                                    client.printed.get(index, 0), output_limit)
                    cell.outputs = []  # keep memory flat whatever the cell printed
                    _kill_strays(client)
                verdicts = _serve_judge(judge, client, notebook, workdir, timeout_s, output_limit,
                                        replies, dead)
            finally:
                _kill_kernel_group(client)
    finally:
        judge_errors = JUDGES.release(judge, finished="verdicts" in verdicts)
        enforced = {}
        try:
            enforced = json.loads((workdir / "sandbox.json").read_text())
        except (OSError, ValueError):
            pass
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(spec_dir, ignore_errors=True)
    if "grader_error" in verdicts:
        raise GraderError(f"the judge could not run {source_path}: {verdicts['grader_error']}")
    if "verdicts" not in verdicts:
        raise GraderError(f"the judge stopped without verdicts for {source_path}: {judge_errors}")
    return outcomes, verdicts["verdicts"], enforced


class JudgeProcess:
    """One ``python -m course_utils.grading.verdict`` process: it grades one submission at a time and is
    reused for the next submission of the same exercise (its imports are the slow part)."""

    def __init__(self, source_path: Path, timeout_s: float):
        self.source_path, self.timeout_s = source_path, timeout_s
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**clean_environment(Path(tempfile.gettempdir()), {}), "COURSE_PROFILE": "tiny",
               "MPLBACKEND": "Agg", "HOME": os.environ.get("HOME", tempfile.gettempdir())}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "course_utils.grading.verdict", str(max(timeout_s, 60))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def send(self, message: dict) -> bool:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def receive(self) -> dict | None:
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def errors(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


class JudgePool:
    """Idle judges per solution notebook, shared by the grading threads."""

    def __init__(self):
        import threading

        self.idle: dict[tuple[str, float], list[JudgeProcess]] = {}
        self.lock = threading.Lock()

    def acquire(self, source_path: Path, timeout_s: float) -> JudgeProcess:
        key = (str(Path(source_path).resolve()), timeout_s)
        with self.lock:
            waiting = self.idle.get(key, [])
            while waiting:
                judge = waiting.pop()
                if judge.process.poll() is None:
                    return judge
                judge.close()
        return JudgeProcess(source_path, timeout_s)

    def release(self, judge: JudgeProcess, finished: bool) -> str:
        """Keep a judge that finished cleanly for the next submission; return its error log."""
        errors = judge.errors()
        if finished and judge.process.poll() is None:
            key = (str(Path(judge.source_path).resolve()), judge.timeout_s)
            with self.lock:
                self.idle.setdefault(key, []).append(judge)
        else:
            judge.close()
        return errors

    def close(self) -> None:
        with self.lock:
            for judges in self.idle.values():
                for judge in judges:
                    judge.close()
            self.idle.clear()


JUDGES = JudgePool()
atexit.register(JUDGES.close)


def _serve_judge(judge, client, notebook, workdir: Path, timeout_s: float, output_limit: int,
                 replies: dict, dead: str | None) -> dict:
    """Answer the judge's calls with the student's kernel until it sends its verdicts."""
    import nbformat
    from nbclient.exceptions import DeadKernelError

    student_cells = len(notebook.cells)
    restarts = 0
    while True:
        message = judge.receive()
        if message is None:
            return {}
        if "call" not in message:
            return message
        if dead:
            reply = {"status": "raised", "ename": "KernelDied", "evalue": dead}
        else:
            request, answer = workdir / REQUEST_FILE, workdir / REPLY_FILE
            answer.unlink(missing_ok=True)
            request.write_text(json.dumps({"args": message["args"], "kwargs": message["kwargs"]}))
            os.chmod(request, 0o644)
            cell = nbformat.v4.new_code_cell(SERVE_CELL.format(name=message["call"]))
            notebook.cells.append(cell)
            index = len(notebook.cells) - 1
            try:
                client.execute_cell(cell, index)
                status, detail = _cell_outcome(replies.get(index, {}).get("content", {}),
                                               client.printed.get(index, 0), output_limit)
            except DeadKernelError:
                status, detail = "dead", f"the kernel died while running {message['call']}"
            cell.outputs = []
            _kill_strays(client)
            if status == "dead":
                reply = {"status": "raised", "ename": "KernelDied", "evalue": detail}
                # a crash costs its own question: a fresh kernel runs the student's cells again
                restarts += 1
                if restarts > MAX_KERNEL_RESTARTS or not _restart(client, notebook, student_cells):
                    dead = f"{detail}; not restarted"
            elif status == "timeout":
                reply = {"status": "raised", "ename": "Timeout",
                         "evalue": f"{message['call']} gave no result after {timeout_s:g} s"}
            else:
                try:
                    reply = json.loads(answer.read_text())
                    if not isinstance(reply, dict) or reply.get("status") not in ("ok", "raised"):
                        raise ValueError("not a reply")
                except (OSError, ValueError):
                    why = f" ({detail})" if detail else ""
                    reply = {"status": "raised", "ename": "NoAnswer",
                             "evalue": f"the kernel gave no answer from {message['call']}{why}"}
        reply["id"] = message.get("id")
        if not judge.send(reply):  # the judge stopped: what it said last is all there is
            return {}


def _restart(client, notebook, student_cells: int) -> bool:
    """Restart a dead kernel and run the student's cells in it again; False if that fails."""
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import DeadKernelError

    try:
        _kill_kernel_group(client)
        run_sync(client.km.restart_kernel)(now=True)
        run_sync(client.kc.wait_for_ready)(timeout=client.startup_timeout)
        for index in range(student_cells):
            client.execute_cell(notebook.cells[index], index)
            notebook.cells[index].outputs = []
            _kill_strays(client)
    except (DeadKernelError, RuntimeError, TimeoutError):
        return False
    return True


def grade_notebook(path: Path, student: str | None = None, solutions_dir: Path = SOLUTIONS_DIR,
                   timeout_s: float = DEFAULT_CELL_TIMEOUT_S,
                   output_limit: int = DEFAULT_OUTPUT_LIMIT_CHARS,
                   seed: int | None = None, limits: Limits | None = None,
                   report: dict | None = None) -> list[QuestionResult]:
    """Grade one notebook; raise ``GraderError`` only for problems that are not the student's.
    ``report``, if given, receives what the sandbox enforced (``report["sandbox"]``)."""
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
    notebook = grading_notebook(student_nb, source, output_limit)
    outcomes, verdicts, enforced = run_submission(notebook, source_path, seed, timeout_s,
                                                  output_limit, limits or Limits())
    if report is not None:
        report["sandbox"] = enforced
    guard_status = outcomes.get(0, ("error", "grader setup cell did not run"))
    if guard_status[0] != "passed":
        raise GraderError(f"the grader's setup cell failed: {guard_status[1]}")
    failed_cells = [message for index, (status, message) in sorted(outcomes.items())
                    if index > 0 and status != "passed"]
    results = []
    for _, meta in questions:
        status, message = verdicts.get(meta["grade_id"], ("error", "the judge did not reach it"))
        if status != "passed" and "NameError" in message and failed_cells:
            message += f" (an earlier cell failed: {failed_cells[0]})"
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


def sandbox_line(enforced: dict) -> str:
    """What the students' kernels ran under, in one line (the limits this OS could not enforce
    are named)."""
    missing = [what for what, key in [("process limit", "process_limit_applies"),
                                      ("file confinement", "files_confined"),
                                      ("network confinement", "network_confined")]
               if not enforced.get(key)]
    return (f"sandbox: {enforced.get('memory_mb')} MB, {enforced.get('cpu_seconds')} s CPU, "
            f"{enforced.get('processes')} processes, {enforced.get('file_mb')} MB files, "
            f"runs as {enforced.get('runs_as')}, clean environment"
            + (f"; not enforced on this OS: {', '.join(missing)}" if missing else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.grading.grade",
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
    defaults = Limits()
    parser.add_argument("--memory-mb", type=int, default=defaults.memory_mb,
                        help="address space of a student's kernel (default: %(default)s)")
    parser.add_argument("--cpu-seconds", type=int, default=defaults.cpu_seconds,
                        help="CPU time of a student's kernel, all cells (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=defaults.processes,
                        help="processes and threads a kernel may add (default: %(default)s)")
    parser.add_argument("--file-mb", type=int, default=defaults.file_mb,
                        help="largest file a kernel may write (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks graded at once, each in its own kernel (default: 1; a "
                             "class grades about twice as fast with --jobs 2 on two cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")
    limits = Limits(memory_mb=args.memory_mb, cpu_seconds=args.cpu_seconds,
                    processes=args.processes, file_mb=args.file_mb)
    sandbox_reports: list[dict] = []

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
        report: dict = {}
        try:
            results = grade_notebook(path, student, Path(args.solutions), args.timeout,
                                     args.output_limit, args.seed, limits, report)
            sandbox_reports.append(report.get("sandbox", {}))
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
    sandbox = sandbox_reports[0] if sandbox_reports else {}
    if sandbox:
        print(sandbox_line(sandbox))
    if args.json:
        report = {"results": [asdict(r) for r in all_results], "problems": problems,
                  "sandbox": sandbox}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json} ({len(all_results)} rows)")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
