"""Author clean notebooks from Python lists of cells, and read them back.

``write_notebook(path, cells)`` takes ``[("md", text) | ("code", text) | ("params", text)]`` and
writes a clean notebook: no outputs, no execution counts, the ``parameters`` tag on the
parameters cell, and the Colab install cell from ``course_utils.colab`` as the second cell.
The .ipynb files are the source of truth afterwards; this only saves hand-editing JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from course_utils.colab import INSTALL_CELL

KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _cell(kind: str, text: str, index: int, metadata: dict | None = None) -> dict:
    source = text.strip("\n").splitlines(keepends=True)
    cell_id = f"cell-{index:02d}"
    metadata = dict(metadata or {})
    if kind == "md":
        return {"cell_type": "markdown", "id": cell_id, "metadata": metadata, "source": source}
    if kind == "params":
        metadata["tags"] = ["parameters"]
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": metadata,
            "outputs": [], "source": source}


def write_notebook(path: str | Path, cells: list[tuple], metadata: dict | None = None) -> Path:
    """Write ``cells`` (the title cell first) with the install cell inserted second.

    Each cell is ``(kind, text)`` or ``(kind, text, cell metadata)``; ``metadata`` is added to
    the notebook's own metadata (exercises put ``{"course": {"exercise": ...}}`` there).
    """
    cells = [cells[0], ("code", INSTALL_CELL)] + list(cells[1:])
    notebook = {
        "cells": [_cell(*cell[:2], i, *cell[2:]) for i, cell in enumerate(cells)],
        "metadata": {"kernelspec": KERNEL, "language_info": {"name": "python"},
                     **(metadata or {})},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path = Path(path)
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return path
