"""The portability run: every lesson under variations that stand in for other machines and other
samples of the same experiment, and the committed report of what held (``make portability``).

A lesson's sentences are checked against its own numbers (``reporting.check_claims``) and its
re-implementations against the libraries (``numerics.check_close``). Both depend on more than the
code: on the recipes' seeds, on how many threads split each reduction, and on which CPU kernels
(AVX-512, AVX2, scalar; MKL's code path) compute them. A learner's laptop, Colab and a TA's CI
server each pick another combination. So this module runs each lesson under

- the recipes as they are, one thread (what ``make test`` runs), the *reference* run;
- every recipe seed (and each notebook's ``SEED``) shifted by 1 and by 2;
- 2 and 4 threads;
- torch's AVX2 kernels instead of AVX-512 (``ATEN_CPU_CAPABILITY=avx2``, which also turns off
  bitsandbytes' AVX-512 CPU paths, since they follow torch's capability; the scalar kernels,
  ``aten-scalar``, run only when asked for: ``EXTRA_VARIATIONS`` says why);
- MKL's conditional-numerical-reproducibility code path (``MKL_CBWR=COMPATIBLE``), whose matrix
  products round differently from the path this CPU picks by itself, as another CPU's would;
- bitsandbytes as on a CPU without AVX512-BF16 (``NO_AVX512_BF16``: no repacked 4-bit kernel);

each variation changing one thing from the reference run. Every claim and every ``check_close``
is logged with the quantities it compared (``COURSE_PORTABILITY_LOG``), and each lesson gets one
report, ``portability/<lesson>.json``: per claim, in how many runs it held and the range of each
quantity; per check, the largest error against its tolerance; the range of every metric; with the
date, the machine, the library versions and the hashes of the lesson, of the lessons whose models
it uses and of every recipe it read. ``tests/test_portability.py`` fails when any of them changed
after the report was made, and when a claim did not hold in every run.

    python -m course_utils.notebook_tools.portability              # every lesson whose report is stale
    python -m course_utils.notebook_tools.portability 09_ppo_rlhf  # this lesson (and no other)
    python -m course_utils.notebook_tools.portability --all        # every lesson
    python -m course_utils.notebook_tools.portability --check      # which reports are stale; exit 1 if any
    python -m course_utils.notebook_tools.portability --carry      # after an edit that changes no number

Lessons run side by side, one thread each (two workers on two cores), then the variations with
more threads one lesson at a time, each variation in ``artifacts/portability/<variation>/``, so
that lessons 08-11 find the models 07-10 built under the same variation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from course_utils.course import paths, reporting
from course_utils.course.reporting import format_value
from course_utils.notebook_tools import run_notebooks
from course_utils.notebook_tools.run_notebooks import lesson_notebooks, run_record

RECIPES_DIR = paths.REPO_ROOT / "configs" / "recipes"

#: lessons whose models (``artifacts/models/``) a lesson uses: a change to one of them changes what
#: the later lesson measures. (Lesson 05 reuses 02-04's method runs, but each is saved under a key of
#: everything that determines it, not of the notebook: a changed lesson 02 changes nothing 05 measures.)
UPSTREAM = {"08": ("07",), "09": ("07", "08"), "10": ("07", "08"),
            "11": ("07", "08", "09", "10")}

#: lessons that run one after the other in a variation's folder (the others' models are theirs)
CHAINS = (("00", "01", "02", "03", "04", "05", "06"), ("07", "08", "09", "10", "11"))


@dataclass(frozen=True)
class Variation:
    """One way a learner's run can differ from the reference run."""

    name: str
    description: str
    seed_offset: int = 0
    threads: int = 1
    env: dict = field(default_factory=dict)
    #: Python the notebook's kernel runs before the lesson (an IPython startup file)
    startup: str = ""


#: bitsandbytes asks its native library whether the CPU has AVX512-BF16; where it does (this
#: machine may), every ``Linear4bit`` evaluated without gradients is repacked for a faster CPU
#: inference kernel. Answering "no" runs what a CPU without AVX512-BF16 (most laptops) runs.
NO_AVX512_BF16 = """\
import bitsandbytes.functional
bitsandbytes.functional.lib.has_avx512bf16_cpu = lambda: False
"""


VARIATIONS = (
    Variation("reference", "the recipes' seeds, 1 thread, this CPU's kernels (as make test)"),
    Variation("seed+1", "every recipe seed and notebook SEED plus 1", seed_offset=1),
    Variation("seed+2", "every recipe seed and notebook SEED plus 2", seed_offset=2),
    Variation("threads-2", "2 threads", threads=2),
    Variation("threads-4", "4 threads", threads=4),
    Variation("aten-avx2", "torch's AVX2 kernels (and bitsandbytes' non-AVX-512 CPU paths)",
              env={"ATEN_CPU_CAPABILITY": "avx2"}),
    Variation("mkl-compatible", "MKL's reproducible code path for matrix products (MKL_CBWR=COMPATIBLE)",
              env={"MKL_CBWR": "COMPATIBLE"}),
    Variation("bnb-no-avx512bf16", "bitsandbytes as on a CPU without AVX512-BF16 (no repacked 4-bit "
              "inference kernel)", startup=NO_AVX512_BF16),
)
VARIATION_NAMES = tuple(v.name for v in VARIATIONS)

#: variations that run only when asked for by name (``--variations aten-scalar``), not in the
#: committed report: torch's scalar kernels are what an x86 CPU without AVX2 runs (chips before
#: 2013, some low-end Atom-class ones after), rare among the machines the course is for (laptops,
#: Colab, CI servers), and every lesson under them costs as much as another variation
EXTRA_VARIATIONS = (
    Variation("aten-scalar", "torch's scalar kernels (no vector instructions)",
              env={"ATEN_CPU_CAPABILITY": "default"}),
)


# ---------------------------------------------------------------------------------------------
# what a report is pinned to


def lesson_path(stem_or_number: str) -> Path:
    for path in lesson_notebooks():
        if path.stem == stem_or_number or path.name[:2] == stem_or_number or path.name == stem_or_number:
            return path
    raise SystemExit(f"no lesson {stem_or_number!r} in notebooks/ (give its number, e.g. 09, or its "
                     f"name, e.g. 09_ppo_rlhf)")


def lesson_hash(path: Path) -> str:
    """The hash of a lesson's cells (type and source): what it runs and says, not its metadata."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    content = json.dumps([[cell["cell_type"], "".join(cell["source"])] for cell in cells])
    return hashlib.sha256(content.encode()).hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def upstream_of(stem: str) -> list[str]:
    return [lesson_path(number).stem for number in UPSTREAM.get(stem[:2], ())]


def why_stale(stem: str) -> str | None:
    """Why ``portability/<stem>.json`` no longer describes the lesson (``None`` when it does)."""
    report = reporting.read_report(stem)
    if report is None:
        return "no report yet"
    if report["lesson_sha256"] != lesson_hash(lesson_path(stem)):
        return f"notebooks/{stem}.ipynb changed after the report was made"
    for upstream, digest in report["upstream_sha256"].items():
        if lesson_hash(lesson_path(upstream)) != digest:
            return f"notebooks/{upstream}.ipynb, whose models it uses, changed after the report was made"
    if sorted(report["upstream_sha256"]) != sorted(upstream_of(stem)):
        return "the lessons it depends on changed"
    for name, digest in report["recipes_sha256"].items():
        path = RECIPES_DIR / name
        if not path.exists() or file_hash(path) != digest:
            return f"configs/recipes/{name} changed after the report was made"
    return None


def seed_replicates(stem: str) -> dict:
    """A lesson's numbers replicated over seeds, from its portability report (``make
    portability``): ``seeds`` maps each seed offset (0 is the recipes' seeds; 1 and 2 shift every
    recipe seed and the notebook's ``SEED``, so the whole chain of lessons 07-11 is retrained) to
    that run's metrics; ``same_seed`` holds the runs of seed offset 0 on other thread counts or
    CPU kernels; ``stale`` says why the report no longer matches today's lesson (``None`` when it
    does), ``made`` and ``machine`` where it was measured."""
    report = reporting.read_report(stem)
    if report is None or "metrics_by_run" not in report:
        raise FileNotFoundError(
            f"{reporting.report_path(stem)} {'is missing' if report is None else 'has no per-run metrics'}: "
            f"run `make portability LESSONS={stem[:2]}` (it trains the lesson under three seeds)")
    by_run = report["metrics_by_run"]
    seeds, same_seed = {}, {}
    for run in report["runs"]:
        if not run["completed"]:
            continue
        if run["seed_offset"]:
            seeds[run["seed_offset"]] = by_run.get(run["variation"], {})
        elif run["variation"] == "reference":
            seeds[0] = by_run.get(run["variation"], {})
        else:
            same_seed[run["variation"]] = by_run.get(run["variation"], {})
    return {"seeds": dict(sorted(seeds.items())), "same_seed": same_seed,
            "stale": why_stale(stem), "made": report["made"],
            "machine": report["machine"]["cpu"]}


# ---------------------------------------------------------------------------------------------
# running


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(),
            "vector_extensions": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                 "amx_tile", "amx_bf16"}),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "system": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"}


def shifted_recipes(offset: int, folder: Path) -> Path:
    """A copy of ``configs/recipes/`` with every ``seed`` (at any depth) plus ``offset``."""
    import yaml

    target = folder / "recipes"
    shutil.copytree(RECIPES_DIR, target)

    def shift(values):
        if isinstance(values, dict):
            return {k: (v + offset if k == "seed" and isinstance(v, int) else shift(v))
                    for k, v in values.items()}
        return values

    for path in target.glob("*/*.yaml"):
        values = yaml.safe_load(path.read_text())
        if isinstance(values, dict):
            path.write_text(yaml.safe_dump(shift(values), sort_keys=False))
    return target


def notebook_seed(path: Path) -> int | None:
    """The ``SEED`` of a lesson's ``parameters`` cell, if it has one."""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace = {}
            exec("".join(cell["source"]), namespace)  # the cell is plain assignments
            return namespace.get("SEED")
    return None


def run_lesson(stem: str, variation: Variation, workdir: Path, recipes: Path | None) -> dict:
    """Execute one lesson under one variation (in a child process, so the variation's
    environment reaches torch before it starts) and return what it logged."""
    path = lesson_path(stem)
    artifacts = workdir / variation.name
    (artifacts / "executed").mkdir(parents=True, exist_ok=True)
    log = artifacts / f"{stem}.log.jsonl"
    log.unlink(missing_ok=True)
    metrics = artifacts / stem / "metrics.json"
    metrics.unlink(missing_ok=True)
    threads = str(variation.threads)
    env = {**os.environ, "COURSE_ARTIFACTS": str(artifacts), "COURSE_PROFILE": "tiny",
           "COURSE_PORTABILITY_LOG": str(log), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **variation.env}
    if variation.threads > os.cpu_count():
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # more threads than cores: idle ones sleep, not spin
    env.pop("COURSE_STRICT_CLAIMS", None)
    if recipes is not None:
        env["COURSE_RECIPES"] = str(recipes)
    if variation.startup:
        startup = artifacts / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "00-variation.py").write_text(variation.startup)
        env["IPYTHONDIR"] = str(artifacts / "ipython")
    seed = notebook_seed(path)
    parameters = {} if seed is None else {"SEED": seed + variation.seed_offset}
    pinned = pins(stem)  # before it runs: a lesson edited meanwhile does not match its result
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "course_utils.notebook_tools.portability", "--execute", str(path),
         "--parameters", json.dumps(parameters), "--target", str(artifacts / "executed" / path.name)],
        env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    result = {"variation": variation.name, "seconds": round(seconds, 1), "completed": child.returncode == 0,
              "error": None if child.returncode == 0
              else (child.stderr.strip().splitlines() or ["?"])[-1][:500],
              "pinned": pinned, "entries": entries,
              "metrics": json.loads(metrics.read_text()) if metrics.exists() else {},
              "machine": machine()}
    result["recipes_sha256"] = {name: file_hash(RECIPES_DIR / name) for name in sorted(
        {e["file"] for e in entries if e["kind"] == "recipe"})}
    result_path(workdir, variation, stem).write_text(json.dumps(result))
    return result


def result_path(workdir: Path, variation: Variation, stem: str) -> Path:
    return workdir / variation.name / f"{stem}.result.json"


def pins(stem: str) -> dict:
    """What a run's numbers depend on, besides the variation: the lesson and the lessons whose
    models it uses (the recipes it read are hashed when the report is written)."""
    return {"lesson_sha256": lesson_hash(lesson_path(stem)),
            "upstream_sha256": {u: lesson_hash(lesson_path(u)) for u in upstream_of(stem)}}


def saved_result(workdir: Path, variation: Variation, stem: str) -> dict | None:
    """A run saved by an earlier ``make portability`` whose lesson and upstream lessons are the
    same as now (its recipes are checked too)."""
    path = result_path(workdir, variation, stem)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("pinned") != pins(stem):
        return None
    read = {e["file"] for e in result["entries"] if e["kind"] == "recipe"}
    if result.get("recipes_sha256") != {name: file_hash(RECIPES_DIR / name) for name in sorted(read)}:
        return None
    return result


def run_chain(stems: list[str], variation: Variation, workdir: Path, results: dict, progress,
              reuse: bool = True) -> None:
    with tempfile.TemporaryDirectory() as folder:
        recipes = shifted_recipes(variation.seed_offset, Path(folder)) if variation.seed_offset else None
        for stem in stems:
            result = saved_result(workdir, variation, stem) if reuse else None
            if result is None:
                result = run_lesson(stem, variation, workdir, recipes)
            else:
                result = {**result, "reused": True}
            results.setdefault(stem, {})[variation.name] = result
            progress(stem, variation, result)


def run(stems: list[str], variations=VARIATIONS, workers: int = 2, workdir: Path | None = None,
        reuse: bool = True) -> dict:
    """Run ``stems`` under every variation, two chains at a time, and write each lesson's report.
    A run saved in ``workdir`` by an earlier call, of the same lesson, upstream lessons and
    recipes, is reused unless ``reuse`` is false."""
    workdir = Path(workdir or paths.ARTIFACTS_DIR / "portability")
    stems = [lesson_path(stem).stem for stem in stems]
    chains = [[s for s in stems if s[:2] in chain] for chain in CHAINS]
    jobs = [(chain, variation) for variation in variations for chain in chains if chain]
    results: dict = {}
    start = time.perf_counter()

    def progress(stem, variation, result):
        held = [e["holds"] for e in result["entries"] if e["kind"] in ("claim", "check_close")]
        outcome = ("reused" if result.get("reused") else "ran" if result["completed"]
                   else f"FAILED: {result['error']}")
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {stem} {variation.name}: {outcome} in "
              f"{result['seconds']:.0f} s; {sum(held)}/{len(held)} claims and checks held", flush=True)

    lock = threading.Lock()

    def finished(stem, variation, result):
        progress(stem, variation, result)
        with lock:  # a lesson's report as soon as it has a run of every variation of the report
            runs = {v.name: results.get(stem, {}).get(v.name) or saved_result(workdir, v, stem)
                    for v in VARIATIONS + EXTRA_VARIATIONS}
            if all(runs[v.name] for v in VARIATIONS):
                write_report(stem, [run_ for run_ in runs.values() if run_])
                write_summary()

    # one thread per lesson: `workers` lessons side by side. A variation with more threads runs
    # its lessons one at a time: two lessons of two threads each on two cores spend most of their
    # time waiting for each other at every parallel region (lesson 00 took 10 minutes, not 1)
    side_by_side = [(chain, v) for chain, v in jobs if v.threads == 1]
    alone = [(chain, v) for chain, v in jobs if v.threads > 1]
    for batch, width in [(side_by_side, workers), (alone, 1)]:
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            for future in [pool.submit(run_chain, chain, variation, workdir, results, finished, reuse)
                           for chain, variation in batch]:
                future.result()
    return results


# ---------------------------------------------------------------------------------------------
# carrying runs over an edit that changes no number


def measured(result: dict) -> dict:
    """Every number a run measured that a report keeps: each claim (its verdict and measured
    values), each tolerance check (verdict and error) and each metric, wall-clock ones excepted.
    Claims and checks are sorted: a report keeps them by statement, so moving a cell (a detour to
    an optional section at the end) changes no number."""
    entries = result["entries"]
    return {"completed": result["completed"],
            "claims": sorted(([e["statement"], e["holds"], e.get("measured", {})]
                              for e in entries if e["kind"] == "claim"), key=json.dumps),
            "checks": sorted(([e["what"], e["holds"], e["max_abs_error"]]
                              for e in entries if e["kind"] == "check_close"), key=json.dumps),
            "metrics": {k: v for k, v in result["metrics"].items() if not CLOCK.search(k)}}


def differences(before: dict, after: dict, limit: int = 5) -> list[str]:
    """The first ``limit`` numbers that differ between two ``measured`` records, in words."""
    found = []
    for section in ("completed", "claims", "checks"):
        if before[section] != after[section]:
            pairs = zip(before[section], after[section]) if isinstance(before[section], list) else \
                [(before[section], after[section])]
            found += [f"{section}: {a} -> {b}" for a, b in pairs if a != b]
            if len(before[section] if isinstance(before[section], list) else []) != \
                    len(after[section] if isinstance(after[section], list) else []):
                found.append(f"{section}: {len(before[section])} -> {len(after[section])} entries")
    for name in sorted(set(before["metrics"]) | set(after["metrics"])):
        if before["metrics"].get(name) != after["metrics"].get(name):
            found.append(f"metric {name}: {before['metrics'].get(name)} -> {after['metrics'].get(name)}")
    return found[:limit]


def carry(stems: list[str], workdir: Path | None = None, reuse: bool = True) -> dict[str, list[str]]:
    """After an edit meant to change no number (a moved module, a renamed import, a comment, a
    shorter printout), rerun only the reference variation of each stale lesson; where it measured
    exactly what the stored reference run measured (``measured``), the stored runs of every other
    variation are re-pinned to today's lesson and recipes, each marked ``carried`` with the hashes
    it ran under, and the report is rewritten. Where any number differs, nothing is carried: the
    lesson stays stale until ``make portability`` reruns every variation. With ``reuse=False``
    (``--carry --rerun``) the reference reruns even where it is fresh: after a change to package
    code, which the reports' hashes do not cover. Returns, per lesson, the differences found
    (empty: carried)."""
    workdir = Path(workdir or paths.ARTIFACTS_DIR / "portability")
    reference = VARIATIONS[0]
    stems = [lesson_path(stem).stem for stem in stems]
    every_stored = {stem: {v.name: json.loads(result_path(workdir, v, stem).read_text())
                           for v in VARIATIONS + EXTRA_VARIATIONS
                           if result_path(workdir, v, stem).exists()} for stem in stems}
    fresh_runs: dict[str, dict] = {}

    def run_in_order(chain):  # 08 needs the models 07 builds under the same variation
        for stem in chain:
            saved = saved_result(workdir, reference, stem) if reuse else None
            fresh_runs[stem] = saved or run_lesson(stem, reference, workdir, None)

    chains = [[s for s in stems if s[:2] in chain] for chain in CHAINS]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(run_in_order, chain) for chain in chains if chain]:
            future.result()
    outcome: dict[str, list[str]] = {}
    for stem in stems:
        stored, fresh = every_stored[stem], fresh_runs[stem]
        missing = [v.name for v in VARIATIONS if v.name not in stored]
        if missing:
            outcome[stem] = [f"no stored run of {', '.join(missing)}: run make portability"]
            continue
        found = differences(measured(stored[reference.name]), measured(fresh))
        outcome[stem] = found
        print(f"{stem}: " + ("the reference run measured the same numbers; carried"
                             if not found else "numbers differ, nothing carried: " + "; ".join(found)),
              flush=True)
        if found:  # the stored reference stays: a later carry (upstream reports current) compares with it
            result_path(workdir, reference, stem).write_text(json.dumps(stored[reference.name]))
            continue
        runs = [fresh]
        for name, result in stored.items():
            if name == reference.name:
                continue
            if result["pinned"] != stored[reference.name]["pinned"]:
                print(f"{stem}: the stored {name} run measured another version of the lesson than the "
                      f"reference did; left out (rerun it: --variations {name})", flush=True)
                continue
            read = sorted({e["file"] for e in result["entries"] if e["kind"] == "recipe"})
            carried = {"from_pinned": result.get("carried", {}).get("from_pinned", result["pinned"]),
                       "from_recipes_sha256": result.get("carried", {}).get(
                           "from_recipes_sha256", result["recipes_sha256"]),
                       "reference_identical_on": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            result = {**result, "pinned": fresh["pinned"], "carried": carried,
                      "recipes_sha256": {n: file_hash(RECIPES_DIR / n) for n in read}}
            result_path(workdir, by_name(name), stem).write_text(json.dumps(result))
            runs.append(result)
        write_report(stem, runs)
    write_summary()
    return outcome


def by_name(name: str) -> Variation:
    return next(v for v in VARIATIONS + EXTRA_VARIATIONS if v.name == name)


# ---------------------------------------------------------------------------------------------
# the report


def _span(values: list) -> list:
    return [min(values), max(values)]


def summarize(stem: str, runs: list[dict]) -> dict:
    """One lesson's report from its runs (one per variation)."""

    claims: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    recipes: set[str] = set()
    for run_ in runs:
        seen: dict[str, int] = {}
        for entry in run_["entries"]:
            if entry["kind"] == "recipe":
                recipes.add(entry["file"])
            elif entry["kind"] == "claim":
                claim = claims.setdefault(entry["statement"], {"statement": entry["statement"],
                                                               "held_in": [], "failed_in": [],
                                                               "values": {}})
                (claim["held_in"] if entry["holds"] else claim["failed_in"]).append(run_["variation"])
                for name, value in entry["measured"].items():
                    claim["values"].setdefault(name, []).append(value)
            elif entry["kind"] == "check_close":
                seen[entry["what"]] = seen.get(entry["what"], 0) + 1
                count = seen[entry["what"]]
                key = entry["what"] if count == 1 else f"{entry['what']} ({count})"
                check = checks.setdefault(key, {"what": key, "atol": entry["atol"], "rtol": entry["rtol"],
                                                "held_in": [], "failed_in": [], "errors": []})
                (check["held_in"] if entry["holds"] else check["failed_in"]).append(run_["variation"])
                check["errors"].append(entry["max_abs_error"])
    every = [run_["variation"] for run_ in runs]
    for item in list(claims.values()) + list(checks.values()):
        # a run that stopped before reaching it did not show it either
        item["failed_in"] += [v for v in every if v not in item["held_in"] + item["failed_in"]]
    metric_values: dict[str, list] = {}
    by_run: dict[str, dict] = {}
    for run_ in runs:
        for name, value in run_["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric_values.setdefault(name, []).append(value)
                by_run.setdefault(run_["variation"], {})[name] = value
    record = run_record("tiny", "papermill, course_utils.notebook_tools.portability")
    return {
        "lesson": stem,
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": next((r["machine"] for r in runs if r.get("machine")), None) or machine(),
        "versions": record["versions"],
        "lesson_sha256": lesson_hash(lesson_path(stem)),
        "upstream_sha256": {u: lesson_hash(lesson_path(u)) for u in upstream_of(stem)},
        "recipes_sha256": {name: file_hash(RECIPES_DIR / name) for name in sorted(recipes)},
        "runs": [{"variation": r["variation"],
                  "description": by_name(r["variation"]).description,
                  "seed_offset": by_name(r["variation"]).seed_offset,
                  "threads": by_name(r["variation"]).threads,
                  "completed": r["completed"], "error": r["error"], "seconds": r["seconds"],
                  **({"carried_from": r["carried"]["from_pinned"]["lesson_sha256"]}
                     if r.get("carried") else {})}
                 for r in runs],
        "minutes_all_runs": round(sum(r["seconds"] for r in runs) / 60, 1),
        "claims": [{"statement": c["statement"], "held": len(c["held_in"]), "runs": len(every),
                    "failed_in": c["failed_in"],
                    "measured": {name: _span(values) for name, values in c["values"].items()}}
                   for c in claims.values()],
        "checks": [{"what": c["what"], "held": len(c["held_in"]), "runs": len(every),
                    "failed_in": c["failed_in"], "max_abs_error": _span(c["errors"]),
                    "atol": c["atol"], "rtol": c["rtol"]} for c in checks.values()],
        "metrics": {name: _span(values) for name, values in sorted(metric_values.items())},
        # each run's own numbers: the seed variations are three replicates of the whole lesson
        # (seed_replicates; lesson 11 compares the trained models over them)
        "metrics_by_run": {name: dict(sorted(values.items())) for name, values in by_run.items()},
    }


def write_report(stem: str, runs: list[dict]) -> Path:
    reporting.REPORT_DIR.mkdir(exist_ok=True)
    path = reporting.report_path(stem)
    path.write_text(json.dumps(summarize(stem, runs), indent=1) + "\n")
    return path


def summary_markdown() -> str:
    """``portability/README.md``: one row per lesson, then every claim that did not hold
    everywhere, then the spread of each lesson's metrics."""

    lines = ["# Portability report", "",
             "Made by `make portability` (`course_utils/notebook_tools/portability.py`, which says what each "
             "variation changes); one JSON file per lesson holds every claim, check and metric. "
             "`tests/test_portability.py` fails when a lesson or recipe changed after its report "
             "was made, or when a claim did not hold in every run.", "",
             "| lesson | runs | claims held in every run | checks held in every run | minutes per run "
             "(reference) | machine | made |", "|---|---|---|---|---|---|---|"]
    reports = {p.stem: reporting.read_report(p.stem) for p in lesson_notebooks()}
    for stem, report in reports.items():
        if report is None:
            lines.append(f"| {stem} | no report | | | | | |")
            continue
        everywhere = sum(c["held"] == c["runs"] for c in report["claims"])
        checks = sum(c["held"] == c["runs"] for c in report["checks"])
        reference = next((r["seconds"] for r in report["runs"] if r["variation"] == "reference"), None)
        stale = why_stale(stem)
        lines.append(f"| {stem}{' (stale: ' + stale + ')' if stale else ''} | {len(report['runs'])} | "
                     f"{everywhere} of {len(report['claims'])} | {checks} of {len(report['checks'])} | "
                     f"{reference / 60 if reference else float('nan'):.1f} | {report['machine']['cpu']} | "
                     f"{report['made'][:10]} |")
    failing = [(stem, c) for stem, r in reports.items() if r for c in r["claims"] + r["checks"]
               if c["held"] < c["runs"]]
    lines += ["", "## Claims and checks that did not hold in every run", ""]
    lines += [f"- {stem}: {c.get('statement', c.get('what'))!r}: held in {c['held']} of {c['runs']} "
              f"(failed in {', '.join(c['failed_in'])})" for stem, c in failing] or ["None."]
    lines += ["", "## How much the measured quantities vary", "",
              "The range over all runs of each quantity a claim compares (a learner's machine "
              "lands somewhere in it, or near).", ""]
    for stem, report in reports.items():
        if not report:
            continue
        spans = {name: span for c in report["claims"] for name, span in c["measured"].items()}
        spans.update(report["metrics"])
        varying = {name: span for name, span in spans.items() if span[0] != span[1]}
        if varying:
            lines.append(f"- **{stem}**: " + "; ".join(
                f"{name} {span_text(*span)}" for name, span in sorted(varying.items())))
        else:
            lines.append(f"- **{stem}**: every quantity the same in every run")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return format_value(value)


def span_text(low, high) -> str:
    """``low to high`` with as many significant digits as it takes to tell them apart (up to 8)."""
    if isinstance(low, int) and isinstance(high, int) or low == high:
        return f"{_fmt(low)} to {_fmt(high)}"
    for digits in range(4, 9):
        a, b = f"{low:.{digits}g}", f"{high:.{digits}g}"
        if a != b:
            return f"{a} to {b}"
    return f"{low:.8g} to {high:.8g}"


CLOCK = re.compile(r"seconds|per_second|latency|_ms$")
README_BEGIN = "<!-- portability report: written by `make portability`, do not edit -->"
README_END = "<!-- end of the portability report -->"


def readme_block() -> str:
    """The README's table of what varies between machines, from the reports: per lesson, the
    claims held in every run and the quantities that moved most (relative to their size)."""

    lines = [README_BEGIN, "", "| lesson | runs | claims held in every run | what moved most between runs |",
             "|---|---|---|---|"]
    for path in lesson_notebooks():
        report = reporting.read_report(path.stem)
        if report is None:
            lines.append(f"| {path.stem} | not yet run | | |")
            continue
        spans = {name: span for c in report["claims"] for name, span in c["measured"].items()}
        spans.update(report["metrics"])
        # wall-clock numbers move with the machine's load, not with what the lesson computes
        spans = {name: span for name, span in spans.items() if not CLOCK.search(name)}
        moved = sorted(((abs(hi - lo) / max(abs(hi), abs(lo), 1e-12), name, lo, hi)
                        for name, (lo, hi) in spans.items()
                        if isinstance(lo, (int, float)) and not isinstance(lo, bool) and hi != lo),
                       reverse=True)[:3]
        held = sum(c["held"] == c["runs"] for c in report["claims"])
        lines.append(f"| {path.stem} | {len(report['runs'])} | {held} of {len(report['claims'])} | "
                     + ("; ".join(f"`{name}` {span_text(lo, hi)}" for _, name, lo, hi in moved)
                        or "nothing: the same numbers in every run") + " |")
    return "\n".join(lines + ["", README_END])


def write_summary() -> Path:
    reporting.REPORT_DIR.mkdir(exist_ok=True)
    path = reporting.REPORT_DIR / "README.md"
    path.write_text(summary_markdown())
    readme = paths.REPO_ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        readme.write_text(head + readme_block() + rest.split(README_END, 1)[1])
    return path


# ---------------------------------------------------------------------------------------------


def _execute_child(notebook: str, parameters: str, target: str) -> int:
    try:
        run_notebooks.execute(Path(notebook), Path(target), profile="tiny",
                              parameters=json.loads(parameters), cell_timeout=1800)
    except run_notebooks.NotebookFailed as error:
        print(str(error).splitlines()[0], file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers or names (default: stale ones)")
    parser.add_argument("--all", action="store_true", help="every lesson")
    parser.add_argument("--check", action="store_true", help="list stale reports; exit 1 if any")
    parser.add_argument("--variations", default=",".join(VARIATION_NAMES),
                        help=f"comma-separated, in the order to run them, from "
                             f"{', '.join(v.name for v in VARIATIONS + EXTRA_VARIATIONS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rerun", action="store_true",
                        help="run again even where artifacts/portability/ holds a run of the same lesson")
    parser.add_argument("--summary", action="store_true", help="only rewrite portability/README.md")
    parser.add_argument("--carry", action="store_true",
                        help="after an edit meant to change no number: rerun only the reference "
                             "variation of each stale lesson and keep the other runs where it "
                             "measured the same numbers")
    parser.add_argument("--execute", help=argparse.SUPPRESS)
    parser.add_argument("--parameters", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.execute:
        return _execute_child(args.execute, args.parameters, args.target)

    every = [p.stem for p in lesson_notebooks()]
    stale = {stem: why_stale(stem) for stem in every}
    if args.check:
        for stem, why in stale.items():
            print(f"{stem}: {why or 'up to date'}")
        return 1 if any(stale.values()) else 0
    if args.summary:
        print(write_summary())
        return 0
    known = [v.name for v in VARIATIONS + EXTRA_VARIATIONS]
    unknown = set(args.variations.split(",")) - set(known)
    if unknown:
        raise SystemExit(f"unknown variation(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(known)}")
    by_name = {v.name: v for v in VARIATIONS + EXTRA_VARIATIONS}
    variations = [by_name[name] for name in args.variations.split(",")]  # run in the order given
    stems = every if args.all else [lesson_path(s).stem for s in args.lessons] or \
        [stem for stem, why in stale.items() if why]
    if not stems:
        print("every report is up to date (portability/); --all reruns them")
        return 0
    if args.carry:
        outcome = carry(stems, reuse=not args.rerun)
        kept = [stem for stem, found in outcome.items() if found]
        print(f"carried: {len(outcome) - len(kept)} of {len(outcome)} lessons"
              + (f"; still stale (run make portability LESSONS=\"{' '.join(s[:2] for s in kept)}\"): "
                 f"{', '.join(kept)}" if kept else ""))
        return 1 if kept else 0
    print(f"lessons: {', '.join(stems)}\nvariations: {', '.join(v.name for v in variations)}", flush=True)
    start = time.perf_counter()
    run(stems, variations, workers=args.workers, reuse=not args.rerun)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; report in {reporting.REPORT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
