"""How long a lesson takes a learner: the reading-time estimate each lesson's header states, and
the README's course map and lab plan use.

The estimate, for the cells a learner reads (every Markdown cell; every code cell after the set-up
and ``parameters`` cells, counting lines that are neither blank nor comments):

- prose at ``WORDS_PER_MINUTE`` (careful technical reading, with the formulas and figures it
  points to, is slower than the 200-250 words a minute of ordinary prose);
- code at ``CODE_LINES_PER_MINUTE`` (read, understood, and run);
- ``MINUTES_PER_PREDICTION`` for each predict-then-run moment (think, write the guess, compare);
- ``MINUTES_PER_FIGURE`` for each figure shown (``plt.show()``).

The main line is every cell before the first Markdown heading that starts with "Optional"
(``## Optional A. ...``); what follows is optional and nothing before it depends on it. A lab is
``LAB_MINUTES``: a lesson's main line, read at this rate plus its CPU run time (the median of its
runs in the portability report, ``portability/<lesson>.json``), must fit it.

``python -m course_utils.notebook_tools.lab_time`` prints the table; ``--write`` rewrites each
lesson's ``**Reading time**`` line to the estimate (``tests/test_lab_time.py`` fails when one
differs).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from course_utils.course import paths

WORDS_PER_MINUTE = 100
CODE_LINES_PER_MINUTE = 10
MINUTES_PER_PREDICTION = 2
MINUTES_PER_FIGURE = 1
LAB_MINUTES = 90
#: the first cells of every lesson: header, Colab set-up, ``parameters``; the header is read, the
#: set-up and parameters cells are run without reading
SET_UP_CELLS = 3

OPTIONAL_HEADING = re.compile(r"^#{2,3}\s+Optional\b", re.MULTILINE)
PREDICTION = re.compile(r"^\s*(?:\w+\s*=\s*)?reveal(?:_number)?\(", re.MULTILINE)
FIGURE = re.compile(r"\bplt\.show\(")
READING_LINE = re.compile(r"\*\*Reading time\*\*:[^\n]*")


@dataclass(frozen=True)
class LessonTime:
    stem: str
    main_minutes: float
    optional_minutes: float
    predictions: int
    optional_sections: int
    cpu_minutes: float | None

    @property
    def main_rounded(self) -> int:
        return round_minutes(self.main_minutes)

    @property
    def optional_rounded(self) -> int:
        return round_minutes(self.optional_minutes) if self.optional_sections else 0

    @property
    def lab_minutes(self) -> float:
        return self.main_minutes + (self.cpu_minutes or 0.0)

    def reading_line(self) -> str:
        line = f"**Reading time**: about {self.main_rounded} minutes for the main line"
        if self.optional_sections:
            line += f", {self.optional_rounded} more for the optional sections at the end"
        return line + " (the course's estimate: README, \"Lab plan\")."


def round_minutes(minutes: float) -> int:
    """To the nearest 5 minutes, at least 5: an estimate, not a stopwatch."""
    return max(5, int(5 * round(minutes / 5)))


def lesson_notebooks() -> list[Path]:
    return sorted((paths.REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _code_lines(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#"))


def cpu_minutes(stem: str) -> float | None:
    """The median of the lesson's runs in its portability report, in minutes (``None`` without
    one): not its reference run alone, which may have reused earlier lessons' saved runs (lesson
    05 reads back 02-04's) or been timed on a quiet machine."""
    path = paths.REPO_ROOT / "portability" / f"{stem}.json"
    if not path.exists():
        return None
    seconds = [run["seconds"] for run in json.loads(path.read_text(encoding="utf-8"))["runs"]]
    return statistics.median(seconds) / 60 if seconds else None


def estimate(path: Path) -> LessonTime:
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    minutes = {"main": 0.0, "optional": 0.0}
    predictions, optional_sections, part = 0, 0, "main"
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            sections = len(OPTIONAL_HEADING.findall(source))
            if sections:
                optional_sections += sections
                part = "optional"
            read = READING_LINE.sub("", source)  # the estimate's own line does not count
            minutes[part] += len(read.split()) / WORDS_PER_MINUTE
        elif index >= SET_UP_CELLS:
            minutes[part] += _code_lines(source) / CODE_LINES_PER_MINUTE
            found = len(PREDICTION.findall(source))
            minutes[part] += found * MINUTES_PER_PREDICTION
            minutes[part] += len(FIGURE.findall(source)) * MINUTES_PER_FIGURE
            predictions += found if part == "main" else 0
    return LessonTime(stem=Path(path).stem, main_minutes=minutes["main"],
                      optional_minutes=minutes["optional"], predictions=predictions,
                      optional_sections=optional_sections, cpu_minutes=cpu_minutes(Path(path).stem))


def stated_line(path: Path) -> str | None:
    header = "".join(json.loads(Path(path).read_text(encoding="utf-8"))["cells"][0]["source"])
    found = READING_LINE.search(header)
    return found.group(0) if found else None


def write_line(path: Path) -> bool:
    """Rewrite the header's reading-time line to the estimate (added after the **Time** paragraph
    when missing); returns whether the file changed."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    header = "".join(notebook["cells"][0]["source"])
    line = estimate(path).reading_line()
    if READING_LINE.search(header):
        new = READING_LINE.sub(lambda _: line, header)
    else:
        new = header.rstrip("\n") + "\n\n" + line
    if new == header:
        return False
    lines = new.split("\n")
    notebook["cells"][0]["source"] = [text + "\n" for text in lines[:-1]] + [lines[-1]]
    Path(path).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


@dataclass(frozen=True)
class Exercise:
    name: str
    lessons: tuple[str, ...]
    minutes: int


def exercises() -> list[Exercise]:
    """Each graded exercise (``solutions/``): the lessons it practises (its header's **Lessons**
    line, else the lessons its header links) and its minutes of work (the header's **Time**, the
    larger end of a range)."""
    found = []
    for path in sorted((paths.REPO_ROOT / "solutions").glob("ex[0-9][0-9]_*.ipynb")):
        header = "".join(json.loads(path.read_text(encoding="utf-8"))["cells"][0]["source"])
        stated = re.search(r"\*\*Lessons?\*\*:([^\n]*)", header)
        lessons = re.findall(r"\b(\d\d)\b", stated.group(1)) if stated else re.findall(
            r"notebooks/(\d\d)_", header)
        time = re.search(r"\*\*Time\*\*:\s*([\d\s\u2013-]+)minutes", header)
        if not lessons or not time:
            raise ValueError(f"{path.name}: its header must name its lessons and its minutes of work")
        minutes = max(int(number) for number in re.findall(r"\d+", time.group(1)))
        found.append(Exercise(path.stem, tuple(sorted(set(lessons))), minutes))
    return found


def lab_plan() -> list[dict]:
    """Lessons in order, packed into labs of ``LAB_MINUTES``: each lesson's main line (reading and
    CPU run) with the exercises whose last lesson it is, when they fit beside it (else they are
    homework); consecutive lessons share a lab while they fit together."""
    labs: list[dict] = []
    every_exercise = exercises()
    for path in lesson_notebooks():
        number = path.name[:2]
        unit = {"lessons": [number], "minutes": estimate(path).lab_minutes, "exercises": [], "homework": []}
        for exercise in every_exercise:
            if max(exercise.lessons) != number:
                continue
            if unit["minutes"] + exercise.minutes <= LAB_MINUTES:
                unit["exercises"].append(exercise.name)
                unit["minutes"] += exercise.minutes
            else:
                unit["homework"].append(exercise.name)
        if labs and labs[-1]["minutes"] + unit["minutes"] <= LAB_MINUTES:
            for key in ("lessons", "exercises", "homework"):
                labs[-1][key] += unit[key]
            labs[-1]["minutes"] += unit["minutes"]
        else:
            labs.append(unit)
    return labs


PLAN_START, PLAN_END = "<!-- lab plan: start -->", "<!-- lab plan: end -->"


def plan_markdown() -> str:
    rows = ["| lab | lessons (main line) | exercises in the lab | exercises after it | minutes |",
            "|---|---|---|---|---|"]
    for number, lab in enumerate(lab_plan(), 1):
        rows.append(f"| {number} | {', '.join(lab['lessons'])} | {', '.join(lab['exercises']) or '-'} | "
                    f"{', '.join(lab['homework']) or '-'} | {5 * round(lab['minutes'] / 5):.0f} |")
    return "\n".join(rows)


README_COLUMN = "reading (main + optional)"


def readme_cell(path: Path) -> str:
    time = estimate(path)
    return f"{time.main_rounded} min" + (f" + {time.optional_rounded}" if time.optional_sections else "")


def write_readme() -> bool:
    """Set the README course map's reading-time column (before the CPU column) to the estimates."""
    readme = paths.REPO_ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    lines, column = text.split("\n"), None
    cells_of = {path.name[:2]: readme_cell(path) for path in lesson_notebooks()}
    for number, line in enumerate(lines):
        cells = line.strip("|").split("|")
        if line.startswith("| # | notebook"):
            names = [cell.strip() for cell in cells]
            if README_COLUMN not in names:
                at = names.index("CPU (`tiny`)")
                cells.insert(at, f" {README_COLUMN} ")
                lines[number + 1] = "|" + "---|" * len(cells)
                lines[number] = "|" + "|".join(cells) + "|"
                names.insert(at, README_COLUMN)
            column = names.index(README_COLUMN)
        elif column is not None and line.startswith("| ") and cells[0].strip() in cells_of:
            if len(cells) < len(names):
                cells.insert(column, "")
            cells[column] = f" {cells_of[cells[0].strip()]} "
            lines[number] = "|" + "|".join(cells) + "|"
        elif column is not None and not line.startswith("|"):
            column = None
    new = "\n".join(lines)
    if PLAN_START in new:
        head, rest = new.split(PLAN_START, 1)
        new = head + PLAN_START + "\n" + plan_markdown() + "\n" + PLAN_END + rest.split(PLAN_END, 1)[1]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def table() -> str:
    rows = ["| lesson | reading, main line (min) | optional (min) | CPU run (min) | main line + run | "
            "predictions |", "|---|---|---|---|---|---|"]
    for path in lesson_notebooks():
        time = estimate(path)
        cpu = f"{time.cpu_minutes:.1f}" if time.cpu_minutes is not None else "?"
        rows.append(f"| {time.stem} | {time.main_minutes:.0f} | {time.optional_minutes:.0f} | {cpu} | "
                    f"{time.lab_minutes:.0f} | {time.predictions} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        for path in lesson_notebooks():
            if write_line(path):
                print(f"rewrote the reading-time line of {path.name}")
        if write_readme():
            print("rewrote the README course map's reading-time column")
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
