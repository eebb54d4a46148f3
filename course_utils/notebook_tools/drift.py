"""``make drift``: the course against the newest releases the package index offers, before a learner
meets them.

The course pins every library (``requirements.txt``); courses in this field die of API drift, and
the Colab set-up cell installs the pins on top of whatever torch Colab ships. This run:

1. asks the index (``pip index versions``, which honours this Python) for the newest release of
   each package in ``DRIFTING``: the Hugging Face stack, bitsandbytes and torch;
2. builds ``artifacts/drift-venv`` from ``requirements.txt`` with those versions in place of the pins (a torch
   the index cannot install here is kept at its pin, and the report says why);
3. runs the unit tests and every lesson in the ``tiny`` profile (claims strict, as ``make test``)
   under it, with JUnit XML for each;
4. writes ``drift/REPORT.md`` and ``drift/report.json``: versions tried against the pins, what
   passed, each failure with the call that broke (the last frame of its traceback) and, where a
   session has traced it, the library change behind it (``KNOWN_CAUSES``).

It exits 1 when anything failed, which the weekly workflow (``.github/workflows/drift.yml``) turns
into an issue. About 25 minutes on 2 cores once the environment exists.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

from course_utils.course.paths import REPO_ROOT

DRIFTING = ("torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets",
            "bitsandbytes", "huggingface-hub", "safetensors")
#: under artifacts/ (git-ignored, outside every folder of notebooks the course checks)
VENV = REPO_ROOT / "artifacts" / "drift-venv"
REPORT_DIR = REPO_ROOT / "drift"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)")
#: what Google publishes of its Colab GPU runtime's packages (``pip freeze``, updated with the image)
COLAB_FREEZE = "https://raw.githubusercontent.com/googlecolab/backend-info/main/pip-freeze.gpu.txt"

#: test modules a drift run leaves out: browser checks, and checks of the repository's own files
REPOSITORY_ONLY = ("test_site.py", "test_jupyterlab.py", "test_portability.py", "test_repository.py",
                   "test_exercises.py")

#: failures a session has traced to their cause: (pattern in the failure's text, the change)
KNOWN_CAUSES = [
    (r"test_generate_matches_the_forward_pass\[(prompt_tuning|p_tuning|prefix_tuning)\]",
     "transformers 5.25 passes the generation cache to `prepare_inputs_for_generation` as `cache` "
     "(`past_key_values` is a deprecated alias until 5.40), and peft 0.21.2's prompt-learning "
     "models look for `past_key_values` only: from the second token on, they rebuild the virtual "
     "tokens as if nothing were cached and continue from the wrong context. No error is raised. "
     "The course decodes prompt-learning adapters without a cache "
     "(`probes.greedy_without_cache`), so its lessons are right on both; a learner's own "
     "`generate()` is not, so transformers stays pinned below 5.25 until peft reads `cache`."),
]


def normalized(name: str) -> str:
    """A distribution's name as the package index compares them (``huggingface_hub`` is
    ``huggingface-hub``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(requirements: Path = REPO_ROOT / "requirements.txt") -> dict[str, str]:
    return {normalized(m.group(1)): m.group(2) for line in requirements.read_text().splitlines()
            if (m := PIN.match(line.strip()))}


def newest_version(package: str, python: str = sys.executable) -> str | None:
    """The newest release of ``package`` that the index offers this Python, or ``None``."""
    result = subprocess.run([python, "-m", "pip", "index", "versions", package],
                            capture_output=True, text=True)
    match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", result.stdout, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


def colab_torch(url: str = COLAB_FREEZE) -> str:
    """The torch version Colab's GPU runtime ships (its CUDA suffix dropped), from Google's
    published ``pip freeze`` of the image."""
    from urllib.request import urlopen

    try:
        text = urlopen(url, timeout=30).read().decode()
    except OSError as error:
        raise SystemExit(f"cannot read Colab's package list at {url} ({error}); give a version "
                         "instead: --torch 2.11.0") from error
    match = re.search(r"^torch==([0-9.]+)", text, re.MULTILINE)
    if not match:
        raise SystemExit(f"no torch pin in {url}")
    return match.group(1)


def drift_requirements(pins: dict[str, str], newest: dict[str, str]) -> str:
    """``requirements.txt`` with each drifting package at its newest version."""
    lines = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        match = PIN.match(line.strip())
        name = normalized(match.group(1)) if match else None
        lines.append(f"{match.group(1)}=={newest[name]}" if name in newest else line)
    lines += [f"{name}=={version}" for name, version in newest.items() if name not in pins]
    return "\n".join(lines) + "\n"


def pip_install(requirements: str, log: list[str]) -> tuple[bool, str]:
    path = REPORT_DIR / "requirements-drift.txt"
    path.write_text(requirements)
    result = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r",
                             str(path)], capture_output=True, text=True)
    log.append(result.stdout[-2000:] + result.stderr[-4000:])
    why = [line.strip() for line in (result.stdout + result.stderr).splitlines()
           if "requested" in line or line.startswith("ERROR: Cannot")]
    return result.returncode == 0, "; ".join(why[:4])


def build_environment(newest: dict[str, str], pins: dict[str, str]) -> dict:
    """``artifacts/drift-venv`` with the newest versions; torch falls back to its pin where the index
    cannot install the newest here (recorded with pip's reason)."""
    log: list[str] = []
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade",
                        "pip"], check=True)
    kept, tried = {}, dict(newest)
    ok, error = pip_install(drift_requirements(pins, newest), log)
    if not ok and newest.get("torch") != pins.get("torch"):
        kept["torch"] = (f"torch {newest['torch']} could not be installed here ({error or 'pip failed'}); "
                         f"the run keeps torch {pins['torch']}")
        newest = {**newest, "torch": pins["torch"]}
        ok, error = pip_install(drift_requirements(pins, newest), log)
    if not ok:
        raise SystemExit(f"the drift environment could not be built: {error}\n" + log[-1][-3000:])
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "-e", str(REPO_ROOT)], check=True)
    return {"tried": tried, "installed": installed_versions(), "kept_at_pin": kept}


def installed_versions() -> dict[str, str | None]:
    """What ``artifacts/drift-venv`` holds of each drifting package."""
    frozen = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True).stdout
    versions = {normalized(m.group(1)): m.group(2) for line in frozen.splitlines()
                if (m := PIN.match(line))}
    return {name: versions.get(name) for name in DRIFTING}


def run_pytest(name: str, arguments: list[str]) -> dict:
    """pytest under ``artifacts/drift-venv`` as ``make test`` runs it (one thread per worker, strict
    claims), with its JUnit XML read back."""
    junit = REPORT_DIR / f"junit-{slug(name)}.xml"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "COURSE_PROFILE": "tiny",
           "COURSE_STRICT_CLAIMS": "1", "PATH": f"{VENV / 'bin'}:/usr/bin:/bin",
           "COURSE_ARTIFACTS": str(REPO_ROOT / "artifacts" / "drift"), "HOME": str(Path.home())}
    start = time.perf_counter()
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", *arguments, "-q", "-n", "2",
                    "--dist", "loadgroup", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                   env=env, cwd=REPO_ROOT)
    return {"name": name, "seconds": round(time.perf_counter() - start), **read_junit(junit)}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def read_junit(path: Path) -> dict:
    if not path.exists():
        return {"passed": 0, "failed": [{"test": "(pytest did not run)", "call": "", "cause": None}]}
    passed, failed = 0, []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            passed += case.find("skipped") is None
            continue
        name = re.sub(r"@[\w.-]+\]?$", "", case.get("name"))  # xdist's group suffix
        name += "]" * (name.count("[") - name.count("]"))
        test = f"{case.get('classname').replace('.', '/')}.py::{name}"
        text = (problem.get("message") or "") + "\n" + (problem.text or "")
        failed.append({"test": test, "message": " ".join((problem.get("message") or "").split())[:400],
                       "call": breaking_call(text), "cause": known_cause(test + "\n" + text)})
    return {"passed": passed, "failed": failed}


def breaking_call(traceback: str) -> str:
    """The deepest frame of a traceback inside an installed library (else the deepest frame)."""
    frames = re.findall(r"^(\S+\.py):(\d+): ", traceback, re.MULTILINE) or re.findall(
        r'File "([^"]+)", line (\d+)', traceback)
    if not frames:
        return ""
    inside = [f for f in frames if "site-packages" in f[0]]
    path, line = (inside or frames)[-1]
    return f"{path.split('site-packages/')[-1]}:{line}"


def known_cause(text: str) -> str | None:
    return next((cause for pattern, cause in KNOWN_CAUSES if re.search(pattern, text)), None)


def report_markdown(report: dict) -> str:
    lines = ["# Drift run: the course against the newest releases", "",
             f"Run {report['date']} on {report['python']}, `make drift` "
             "(`course_utils/notebook_tools/drift.py`).", "",
             "| package | pinned | newest offered | installed |", "|---|---|---|---|"]
    env = report["environment"]
    for name in DRIFTING:
        lines.append(f"| {name} | {report['pins'].get(name, '-')} | {env['tried'].get(name, '-')} "
                     f"| {env['installed'].get(name) or '-'} |")
    for reason in env["kept_at_pin"].values():
        lines += ["", f"- {reason}."]
    for run_ in report["runs"]:
        lines += ["", f"## {run_['name']}: {run_['passed']} passed, {len(run_['failed'])} failed "
                      f"({run_['seconds'] / 60:.0f} min)"]
        for failure in run_["failed"]:
            lines.append(f"- `{failure['test']}`: {failure.get('message', '')[:200].strip()}"
                         + (f" (breaks in `{failure['call']}`)" if failure["call"] else ""))
            lines.append(f"  - cause: {failure['cause'] or 'not yet traced'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lessons-only", action="store_true", help="skip the unit tests")
    parser.add_argument("--tests", nargs="*", help="only these test paths (default: every unit test)")
    parser.add_argument("--torch", help="a torch version to pair with the newest stack instead of "
                        "the newest torch; 'colab' reads the one Colab's GPU runtime ships")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite drift/REPORT.md from the last run's results and artifacts/drift-venv")
    args = parser.parse_args(argv)
    REPORT_DIR.mkdir(exist_ok=True)
    if args.report_only:
        report = json.loads((REPORT_DIR / "report.json").read_text())
        report["environment"]["installed"] = installed_versions()
        report["runs"] = [{**run_, **read_junit(REPORT_DIR / f"junit-{slug(run_['name'])}.xml")}
                          for run_ in report["runs"]]
        (REPORT_DIR / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (REPORT_DIR / "REPORT.md").write_text(report_markdown(report))
        print((REPORT_DIR / "REPORT.md").read_text())
        return 1 if any(run_["failed"] for run_ in report["runs"]) else 0
    pins = pinned_versions()
    newest = {name: version for name in DRIFTING if (version := newest_version(name))}
    if args.torch:
        newest["torch"] = colab_torch() if args.torch == "colab" else args.torch
    print("newest offered:", ", ".join(f"{n} {v}" for n, v in newest.items()), flush=True)
    environment = build_environment(newest, pins)
    print("installed:", environment["installed"], environment["kept_at_pin"] or "", flush=True)
    runs = []
    if not args.lessons_only:
        # the browser checks, and the checks of the repository's own files (portability reports,
        # links, lint), which no library version changes
        name = "unit tests" if not args.tests else f"unit tests ({', '.join(args.tests)} only)"
        runs.append(run_pytest(name, [*(args.tests or ["tests"]), "-m", "not notebook",
                                              *(f"--ignore=tests/{name}" for name in REPOSITORY_ONLY)]))
    if not args.tests:
        runs.append(run_pytest("lessons (tiny profile)", ["notebooks"]))
    if args.lessons_only or args.tests:  # a partial run replaces its part of the last report
        earlier = json.loads((REPORT_DIR / "report.json").read_text()).get("runs", []) \
            if (REPORT_DIR / "report.json").exists() else []
        names = {run_["name"] for run_ in runs}
        runs = [run_ for run_ in earlier if run_["name"] not in names] + runs
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "python": sys.version.split()[0], "pins": pins, "environment": environment,
              "runs": runs}
    (REPORT_DIR / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (REPORT_DIR / "REPORT.md").write_text(report_markdown(report))
    print((REPORT_DIR / "REPORT.md").read_text())
    return 1 if any(run_["failed"] for run_ in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
