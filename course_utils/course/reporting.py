"""Reporting: each notebook's numbers, in ``artifacts/<notebook-stem>/metrics.json``, and the summary table.

A notebook calls ``write_metrics("00_setup_and_tour", {...})`` with the numbers it claims, and
``check_claims`` on what its text says about them; ``make run`` ends by printing one table of them
all (``summary_table``, also ``python -m course_utils.course.reporting``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy

from course_utils.course import paths


def write_metrics(notebook_stem: str, metrics: dict) -> Path:
    """Write ``metrics`` (a flat dict of names to numbers or short strings) for a notebook."""
    for key, value in metrics.items():
        if not isinstance(value, (int, float, str, bool)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"metric {key!r} must be a finite number or a string, got {value!r}")
    path = paths.artifacts_dir(notebook_stem) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return path


class ClaimError(AssertionError):
    """A sentence of a lesson's text that the numbers of this run do not support."""


STRICT_CLAIMS_VARIABLE = "COURSE_STRICT_CLAIMS"


class Verdicts(dict):
    """``{statement: holds}``; a notebook cell that ends with ``check_claims(...)`` shows nothing
    more, since the verdicts were printed one per line."""

    def _ipython_display_(self):
        pass


#: ``make portability`` sets this to a JSON-lines file: every claim and ``check_close`` of the
#: lesson is appended to it, with the quantities it compared (``course_utils.notebook_tools.portability``)
LOG_VARIABLE = "COURSE_PORTABILITY_LOG"


def record(entry: dict) -> None:
    """Append ``entry`` to the portability log when one is set (``make portability``)."""
    log = os.environ.get(LOG_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry, default=_plain) + "\n")


def _plain(value):
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"cannot record {value!r}")


def _number(value) -> float | int | bool:
    value = value.item() if hasattr(value, "item") else value
    if not isinstance(value, (int, float, bool)):
        raise TypeError(f"a measured quantity must be a number, got {type(value).__name__} {value!r}")
    return value


def check_claims(claims: dict[str, bool], strict: bool | None = None,
                 measured: dict[str, float] | None = None) -> dict[str, bool]:
    """Check what a lesson's text says about the numbers just measured, and print the verdicts.

    ``claims`` maps each statement, worded as the text words it, to the condition (computed from
    this run's numbers) that makes it true; ``measured`` names the numbers those conditions
    compare (printed when a statement does not hold, and recorded by ``make portability``, whose
    report gives each one's range over seeds, thread counts and CPU kernels). The text states
    only what held in every run of that report (``portability/``). On another machine a
    statement can still fail; then this prints the numbers measured here beside the report's
    ranges. With ``strict`` (default: the environment variable ``COURSE_STRICT_CLAIMS=1``, which
    ``make test`` sets) it raises ``ClaimError`` instead, so CI fails when a lesson's text no longer
    matches what the lesson measures. Returns ``{statement: holds}``.
    """
    if strict is None:
        strict = os.environ.get(STRICT_CLAIMS_VARIABLE) == "1"
    measured = {name: _number(value) for name, value in (measured or {}).items()}
    verdicts = Verdicts()
    for statement, condition in claims.items():
        if not isinstance(condition, (bool, numpy.bool_)):
            raise TypeError(f"claim {statement!r}: the condition must be a bool (use .item() on a "
                            f"tensor), got {type(condition).__name__} {condition!r}")
        verdicts[statement] = bool(condition)
        print(f"{'holds' if verdicts[statement] else 'DOES NOT HOLD'}: {statement}")
        record({"kind": "claim", "statement": statement, "holds": verdicts[statement],
                "measured": measured})
    failed = [statement for statement, holds in verdicts.items() if not holds]
    if failed:
        message = ("the lesson's text says " + "; ".join(repr(s) for s in failed)
                   + ", but this run's numbers do not show it")
        if strict:
            raise ClaimError(message + ". Fix the experiment or rewrite the text to match the numbers.")
        print(f"Warning: {message}.")
        print(what_the_report_found(failed, measured))
    return verdicts


def what_the_report_found(statements: list[str], measured: dict[str, float]) -> str:
    """For a learner whose run did not support a statement: this run's numbers beside the ranges
    the portability report (``portability/<lesson>.json``) found for the same statement."""
    lines = []
    for statement in statements:
        found = claim_in_reports(statement)
        if found is None:
            lines.append(f"  {statement!r}: the portability report has no run of it")
            continue
        lesson, claim = found
        lines.append(f"  {statement!r}: held in {claim['held']} of {claim['runs']} runs of the "
                     f"portability report ({lesson}: {describe_variations(lesson)})")
        for name, value in measured.items():
            span = claim.get("measured", {}).get(name)
            where = (f"report {format_value(span[0])} to {format_value(span[1])}" if span
                     else "not in the report")
            lines.append(f"      {name} = {format_value(value)} here; {where}")
    lines.append("The report's runs used the tiny profile on CPUs; another profile, another machine's "
                 "kernels or thread count give other numbers. Those above are what this run measured.")
    return "\n".join(lines)


#: the portability reports (``make portability``), read here for a learner whose claim failed
REPORT_DIR = paths.REPO_ROOT / "portability"


def report_path(stem: str) -> Path:
    return REPORT_DIR / f"{stem}.json"


def read_report(stem: str) -> dict | None:
    path = report_path(stem)
    return json.loads(path.read_text()) if path.exists() else None


def claim_in_reports(statement: str) -> tuple[str, dict] | None:
    """``(lesson, its report's entry)`` for a claim's statement, from any lesson's report."""
    for path in sorted(REPORT_DIR.glob("[0-9][0-9]_*.json")):
        for claim in json.loads(path.read_text())["claims"]:
            if claim["statement"] == statement:
                return path.stem, claim
    return None


def describe_variations(stem: str) -> str:
    report = read_report(stem)
    if report is None:
        return "no report"
    return f"{', '.join(run['variation'] for run in report['runs'])}; on {report['machine']['cpu']}"


def read_all_metrics(root: Path | None = None) -> dict[str, dict]:
    """``{notebook stem: metrics}`` for every ``metrics.json`` under ``root`` (artifacts/)."""
    root = Path(root or paths.ARTIFACTS_DIR)
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(root.glob("*/metrics.json"))}


def format_value(value) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.4g}"


def summary_table(all_metrics: dict[str, dict]) -> str:
    """A plain-text table: one block of ``metric  value`` rows per notebook."""
    if not all_metrics:
        return "no metrics.json files found under artifacts/: run the notebooks first (make run)"
    width = max(len(k) for m in all_metrics.values() for k in m) if any(all_metrics.values()) else 10
    lines = []
    for stem, metrics in all_metrics.items():
        lines.append(stem)
        lines += [f"  {key:<{width}}  {format_value(value)}" for key, value in metrics.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    root = Path(argv[0]) if argv else None
    print(summary_table(read_all_metrics(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
