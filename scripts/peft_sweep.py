"""Lessons 02-05's method comparison at tuned learning rates, over seeds: the ranking lesson 05 shows.

Every method of the comparison (``peft_comparison.SWEEP_METHODS``) trains with the recipe's
settings (``configs/recipes/tiny/peft_methods.yaml``: data, steps, batch size) at three learning
rates, the recipe's and its neighbours on the 1-3-10 grid (``peft_comparison.rate_grid``); where
the lowest mean held-out loss falls on the grid's edge, the next rate past it is added, up to
``MAX_EXTENSIONS`` times (``rate_beyond_the_edge``); three seeds each (the recipe's and the
next two), measured by ``peft_comparison.run_method`` as in
the lessons. The rows go to ``peft_sweep/results.json`` with the recipe's hash and the hashes of
the code that trained them; ``tests/test_peft_sweep.py`` checks that the file matches today's
recipe and that lesson 05's ranking follows from it.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/peft_sweep.py   # about half an hour of CPU

Each run is saved under ``artifacts/peft_runs/`` as the lessons save theirs, so an interrupted
sweep resumes where it stopped, and runs the lessons already made (seed 0 at the recipe's rate)
are read back. ``--methods`` and ``--seeds`` cut the grid (the file records what ran).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from importlib import import_module
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout
from course_utils import peft_comparison  # noqa: E402 (after the path)
from course_utils.course.paths import REPO_ROOT  # noqa: E402

#: how many times the sweep steps past the edge of a method's grid. These live here, not in
#: ``peft_comparison``: every saved run's key hashes that module's source.
MAX_EXTENSIONS = 2


def rate_beyond_the_edge(mean_losses: dict[float, float]) -> float | None:
    """The next rate to try for a method, given the mean held-out loss at each rate tried so far:
    when the lowest loss sits at the smallest (largest) rate, the best rate may lie below (above)
    the rates tried, so the 1-3-10 neighbour past that edge; ``None`` when the lowest is inside."""
    rates = sorted(mean_losses)
    best = min(rates, key=mean_losses.get)
    if len(rates) < 2 or best not in (rates[0], rates[-1]):
        return None
    return peft_comparison.rate_grid(best)[0 if best == rates[0] else -1]


def code_hashes() -> dict[str, str]:
    """sha256 of every module a run's numbers depend on (``peft_comparison.SOURCES_OF_A_RUN``)."""
    return {module: hashlib.sha256(Path(import_module(f"course_utils.{module}").__file__).read_bytes())
            .hexdigest() for module in peft_comparison.SOURCES_OF_A_RUN}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(peft_comparison.SWEEP_METHODS),
                        choices=peft_comparison.SWEEP_METHODS)
    parser.add_argument("--seeds", type=int, default=peft_comparison.SWEEP_SEEDS)
    parser.add_argument("--out", type=Path, default=peft_comparison.SWEEP_PATH)
    args = parser.parse_args(argv)

    setup = peft_comparison.lesson_setup("tiny", 0)
    recipe = setup.recipe
    grid = {name: peft_comparison.rate_grid(recipe.learning_rates[name]) for name in args.methods}
    seeds = [recipe.seed + offset for offset in range(args.seeds)]
    record = {
        "about": "Lessons 02-05's methods at three or more learning rates x several seeds each, made by "
                 "scripts/peft_sweep.py on the tiny profile (lesson 05 reads it).",
        "command": "OMP_NUM_THREADS=1 python scripts/peft_sweep.py " + " ".join(argv or sys.argv[1:]),
        "recipe": recipe.path.relative_to(REPO_ROOT).as_posix(), "recipe_sha256": recipe.sha256,
        "steps": recipe.training["steps"], "batch_size": recipe.training["batch_size"],
        "questions": len(setup.questions), "heldout_chats": len(setup.test_chats),
        "methods": args.methods, "seeds": seeds, "learning_rates": grid,
        "recipe_rates": {name: recipe.learning_rates[name] for name in args.methods},
        "code_sha256": code_hashes(),
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
        "machine": {"processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
        "max_extensions": MAX_EXTENSIONS, "complete": False, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    total, start = sum(len(rates) for rates in grid.values()) * len(seeds), time.perf_counter()
    def mean_losses(name):
        runs = [run for run in record["runs"] if run["method"] == name]
        return {rate: sum(r["heldout_loss"] for r in runs if r["learning_rate"] == rate) / len(seeds)
                for rate in {run["learning_rate"] for run in runs}}

    for name in args.methods:
        pending = list(grid[name])
        while pending:
            rate = pending.pop(0)
            for seed in seeds:
                began = time.perf_counter()
                run_recipe = recipe.with_changes(seed=seed, learning_rates={name: rate})
                model, row = peft_comparison.run_method(
                    name, setup.base_model, setup.tokenizer, setup.train_chats, setup.test_chats,
                    setup.questions, run_recipe, reuse=True)
                record["runs"].append({"method": name, "learning_rate": rate, "seed": seed,
                                       "reused": model is None, **asdict(row)})
                args.out.write_text(json.dumps(record, indent=1) + "\n")  # progress survives a stop
                print(f"[{len(record['runs'])}/{total}] {name} lr {rate:.0e} seed {seed}: accuracy "
                      f"{row.heldout_accuracy:.1%}, loss {row.heldout_loss:.3f} "
                      f"({'reused' if model is None else f'{time.perf_counter() - began:.0f} s'}; "
                      f"{(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)
                del model
            extensions = len(grid[name]) - 3
            if not pending and extensions < MAX_EXTENSIONS:
                beyond = rate_beyond_the_edge(mean_losses(name))
                if beyond is not None:  # the lowest loss sat at the grid's edge: look past it
                    grid[name].append(beyond)
                    total += len(seeds)
                    pending.append(beyond)
    record["complete"] = True
    record["minutes"] = round((time.perf_counter() - start) / 60, 1)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if len(seeds) > 1:
        print(peft_comparison.ranking_sentence(peft_comparison.sweep_summary(record)))
    return args.out


if __name__ == "__main__":
    main()
