"""Each notebook's numbers, in ``artifacts/<notebook-stem>/metrics.json``, and the summary table.

A notebook calls ``write_metrics("00_setup_and_tour", {...})`` with the numbers it claims;
``make run`` ends with ``python -m course_utils.metrics``, which prints one table of them all.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from course_utils import paths


def write_metrics(notebook_stem: str, metrics: dict) -> Path:
    """Write ``metrics`` (a flat dict of names to numbers or short strings) for a notebook."""
    for key, value in metrics.items():
        if not isinstance(value, (int, float, str, bool)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"metric {key!r} must be a finite number or a string, got {value!r}")
    path = paths.artifacts_dir(notebook_stem) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return path


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
