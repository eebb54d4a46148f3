"""The T4 path measured on a GPU: peak memory and minutes of lessons 07-11, next to the budget.

On a machine with a CUDA GPU (no network needed), with memory capped to a T4's 15 GB
(``torch.cuda.set_per_process_memory_fraction``) and fp16 forced whatever the GPU prefers:

1. **phases**: every phase of ``course_utils.budget`` (the steps ``python -m course_utils.budget
   --trace`` traces on a CPU), run once on the GPU on real tensors: TinyLlama-1.1B's configuration
   and 32,000-token vocabulary, random weights, the colab recipes' batches and lengths. Peak memory
   allocated and reserved (the caching allocator's, fragmentation included), beside the budget's
   prediction and the CPU trace;
2. **lessons**: notebooks 07-11 executed in order on the ``rehearsal`` profile at full scale
   (``COURSE_REHEARSAL_SCALE=full``): a random stand-in with TinyLlama's full configuration and
   vocabulary, the colab recipes' settings uncapped, lesson 09's opt-in PPO variants on (the
   largest phase), on the rehearsal's shipped rows in the Hub schemas. Peak memory per lesson and
   per code cell, and minutes.

What part 2 is not: the shipped rows are few (32 UltraChat chats, 80 Orca pairs, 24 MMLU
questions), so every count the data bounds shrinks (evaluation prompts, held-out pairs, batches of
generation and scoring that are never full). Its memory peaks of the training steps, which run at
the recipes' batch and lengths, are the lessons' own; its minutes and its scoring peaks are lower
bounds, not the predicted lesson minutes (``predicted_minutes``, beside them for scale). Part 1 is
the check of every phase at full size. Random weights learn nothing, so the lessons' claims print
as warnings. Writes ``t4/measured.json``:

    make t4-check                                   # both parts, about an hour on a T4
    .venv/bin/python scripts/t4_check.py --phases   # part 1 only: a few minutes
    .venv/bin/python scripts/t4_check.py --lessons 07 08
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import course_utils  # noqa: E402

course_utils.hide_library_notices()
import torch  # noqa: E402

from course_utils import budget  # noqa: E402
from course_utils.course.paths import NOTEBOOKS_DIR, REPO_ROOT  # noqa: E402

T4_BYTES = 15 * 10**9   # what a T4 offers a process (15 GB of its 16 GiB; the rest is ECC and the driver)
LESSONS = ["07_qlora_sft", "08_reward_modeling", "09_ppo_rlhf", "10_dpo", "11_evaluation"]
OUTPUT = REPO_ROOT / "t4" / "measured.json"

#: run in each lesson's kernel first: the same cap and precision as this process
#: run in each lesson's kernel first: the same cap as this process; each cell's record is appended
#: to a file at once, so that a lesson that dies (out of memory) leaves what it measured
KERNEL_SETUP = """import json as _json, time as _time, torch as _torch
_torch.cuda.set_per_process_memory_fraction({fraction!r})
def _t4_record(cell):
    _torch.cuda.synchronize()
    with open({path!r}, "a") as _file:
        _file.write(_json.dumps({{"cell": cell, "seconds": _time.perf_counter() - _t4_start,
                                  "allocated_gb": _torch.cuda.max_memory_allocated() / 1e9,
                                  "reserved_gb": _torch.cuda.max_memory_reserved() / 1e9}}) + "\\n")
_t4_start = _time.perf_counter()"""
KERNEL_RECORD = "_t4_record({cell}); _torch.cuda.reset_peak_memory_stats(); _t4_start = _time.perf_counter()"
#: what the rehearsal's test sets too: lesson 09's opt-in runs, so that its largest phase runs
PARAMETERS = {"09_ppo_rlhf": {"RUN_KL_SWEEP": True, "RUN_PPO_ABLATIONS": True}}


def cap_memory() -> float:
    """Cap this process's CUDA memory at a T4's; return the fraction of this GPU that is."""
    if not torch.cuda.is_available():
        raise SystemExit("t4_check needs a CUDA GPU (none is visible). On the CPU, "
                         "`python -m course_utils.budget --trace` traces the same phases under fake tensors.")
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, T4_BYTES / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def measure_phases() -> list[dict]:
    """Every budget phase on the GPU (``budget.trace_phases(device="cuda")``), one at a time."""
    traced = {row["phase"]: row for row in json.loads(budget.TRACE_FILE.read_text())["phases"]}
    rows = []
    for index, phase in enumerate(budget.course_phases()):
        # NF4 weights hold their module in a reference cycle: collected, or they stay on the GPU
        gc.collect()
        torch.cuda.empty_cache()
        left_over = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            [(_, measured)] = budget.trace_phases(only={index}, device="cuda")
            # the budget's peak includes the CUDA context, which the allocator does not count
            outcome = {"allocated_gb": round(measured["total"] / 1e9 + budget.CUDA_CONTEXT_GB, 3),
                       "reserved_gb": round(measured["reserved"] / 1e9 + budget.CUDA_CONTEXT_GB, 3),
                       "error": None}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # recorded: the point of the check
            outcome = {"allocated_gb": None, "reserved_gb": None,
                       "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        row = {"lesson": phase.lesson, "phase": phase.name, "predicted_gb": round(phase.peak_gb, 3),
               "traced_gb": traced.get(phase.name, {}).get("traced_gb"), **outcome,
               "left_over_gb": round(left_over / 1e9, 3),
               "step_seconds": round(time.perf_counter() - start, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_lessons(stems: list[str], fraction: float, workdir: Path) -> list[dict]:
    """Execute ``stems`` in order at full scale; minutes and peak memory per lesson and per cell."""
    import nbformat
    from nbclient import NotebookClient

    os.environ.update({"COURSE_PROFILE": "rehearsal", "COURSE_REHEARSAL_SCALE": "full",
                       "COURSE_ARTIFACTS": str(workdir), "COURSE_STRICT_CLAIMS": "0",
                       "COURSE_REBUILD": "never", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    predicted = budget.lesson_minutes()
    rows = []
    for stem in stems:
        notebook = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
        cells_file = workdir / f"{stem}.cells.jsonl"
        cells_file.parent.mkdir(parents=True, exist_ok=True)
        cells_file.unlink(missing_ok=True)
        code = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
        for i in reversed(code):
            notebook.cells.insert(i + 1, nbformat.v4.new_code_cell(KERNEL_RECORD.format(cell=i)))
        if stem in PARAMETERS:  # as papermill injects them: a cell after the parameters cell
            at = next(i for i, cell in enumerate(notebook.cells)
                      if "parameters" in cell.metadata.get("tags", []))
            notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
                "\n".join(f"{name} = {value!r}" for name, value in PARAMETERS[stem].items())))
        notebook.cells.insert(0, nbformat.v4.new_code_cell(
            KERNEL_SETUP.format(fraction=fraction, path=str(cells_file))))
        start, error = time.perf_counter(), None
        try:
            NotebookClient(notebook, timeout=3600, kernel_name="python3",
                           resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}).execute()
        except Exception as exception:  # noqa: BLE001 (recorded: out of memory is a result here)
            error = str(exception).strip().splitlines()[-1][:300]
        cells = ([json.loads(line) for line in cells_file.read_text().splitlines()]
                 if cells_file.exists() else [])
        row = {"lesson": stem[:2], "notebook": stem, "minutes": round((time.perf_counter() - start) / 60, 2),
               "predicted_minutes": round(predicted.get(stem[:2], float("nan")), 1),
               "peak_allocated_gb": max((c["allocated_gb"] for c in cells), default=None),
               "peak_reserved_gb": max((c["reserved_gb"] for c in cells), default=None),
               "error": error, "cells": cells}
        print(json.dumps({k: v for k, v in row.items() if k != "cells"}), flush=True)
        rows.append(row)
        if error:
            break  # the later lessons use this one's models
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", action="store_true", help="part 1 only")
    parser.add_argument("--lessons", nargs="*", help="part 2 only, these lessons (07 ... 11)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    fraction = cap_memory()
    # the lessons' kernels are other processes on the same GPU: this one keeps only its context
    # (about half a GB) while they run, which a real T4 would not have to spare; the kernels are
    # capped to a T4's memory, not to what is left of it
    result = {"device": torch.cuda.get_device_name(0), "memory_fraction": fraction,
              "torch": torch.__version__, "python": platform.python_version(),
              "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.lessons is None:
        result["phases"] = measure_phases()
    if not args.phases:
        stems = [s for s in LESSONS if args.lessons is None or not args.lessons or s[:2] in args.lessons]
        result["lessons"] = run_lessons(stems, fraction, REPO_ROOT / "artifacts" / "t4-check")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.output}")
    failed = [row for row in result.get("phases", []) + result.get("lessons", []) if row["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
