"""The portability report (``portability/``, ``make portability``): it describes today's lessons
and recipes, every claim held in every run it made, and its machinery records what it says."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from course_utils.course import reporting
from course_utils.notebook_tools import portability
from course_utils.notebook_tools.run_notebooks import lesson_notebooks
from course_utils.numerics import check_close

LESSONS = [path.stem for path in lesson_notebooks()]


@pytest.mark.parametrize("stem", LESSONS)
def test_the_report_describes_todays_lesson_and_recipes(stem):
    why = portability.why_stale(stem)
    assert why is None, (f"portability/{stem}.json: {why}. Run `make portability` (it reruns only the "
                         f"lessons whose report is stale) and commit portability/.")


@pytest.mark.parametrize("stem", LESSONS)
def test_every_claim_and_check_held_in_every_variation(stem):
    report = reporting.read_report(stem)
    if report is None:
        pytest.fail(f"no portability/{stem}.json: run `make portability`")
    ran = {run["variation"] for run in report["runs"] if run["completed"]}
    assert ran >= set(portability.VARIATION_NAMES), \
        f"{stem} did not complete under {sorted(set(portability.VARIATION_NAMES) - ran)}"
    assert report["claims"], "a lesson with no claim checked"
    failing = [f"{c.get('statement') or c.get('what')!r} held in {c['held']} of {c['runs']} "
               f"(not in {', '.join(c['failed_in'])})"
               for c in report["claims"] + report["checks"] if c["held"] != c["runs"]]
    assert not failing, f"{stem}: " + "; ".join(failing)


def test_the_variations_cover_seeds_threads_and_kernels():
    reported = portability.VARIATIONS  # what every committed report must have run
    assert {v.seed_offset for v in reported} >= {0, 1, 2}
    assert {v.threads for v in reported} >= {1, 2, 4}
    assert {v.env.get("ATEN_CPU_CAPABILITY") for v in reported} >= {"avx2"}
    assert {v.env.get("MKL_CBWR") for v in reported} >= {"COMPATIBLE"}
    assert any(v.startup for v in reported)  # bitsandbytes as without AVX512-BF16
    assert {v.env.get("ATEN_CPU_CAPABILITY") for v in portability.EXTRA_VARIATIONS} == {"default"}
    # one change at a time from the reference run
    for variation in reported + portability.EXTRA_VARIATIONS:
        changes = ((variation.seed_offset != 0) + (variation.threads != 1) + bool(variation.env)
                   + bool(variation.startup))
        assert changes == (variation.name != "reference"), variation.name


def test_seeds_are_shifted_everywhere_and_nothing_else(tmp_path):
    shifted = portability.shifted_recipes(2, tmp_path)
    originals = sorted(portability.RECIPES_DIR.glob("*/*.yaml"))
    assert originals
    found_nested = False
    for original in originals:
        before = yaml.safe_load(original.read_text())
        after = yaml.safe_load((shifted / original.relative_to(portability.RECIPES_DIR)).read_text())

        def compare(a, b, where, original=original):
            nonlocal found_nested
            if isinstance(a, dict):
                assert set(a) == set(b), where
                for key in a:
                    if key == "seed" and isinstance(a[key], int):
                        assert b[key] == a[key] + 2, f"{where}.{key}"
                        found_nested |= where != original.name
                    else:
                        compare(a[key], b[key], f"{where}.{key}", original)
            else:
                assert a == b, where

        if isinstance(before, dict):
            compare(before, after, original.name)
    assert found_nested  # the evaluation recipe's sampling seed, one level down


def test_a_report_goes_stale_when_its_lesson_an_upstream_lesson_or_a_recipe_changes(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path)
    stem = next(s for s in LESSONS if s.startswith("09"))
    run = {"variation": "reference", "seconds": 1.0, "completed": True, "error": None,
           "entries": [{"kind": "recipe", "file": "tiny/ppo.yaml"}], "metrics": {}}
    portability.write_report(stem, [run])
    assert portability.why_stale(stem) is None
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert set(report["upstream_sha256"]) == {s for s in LESSONS if s[:2] in ("07", "08")}
    assert list(report["recipes_sha256"]) == ["tiny/ppo.yaml"]

    for change, expected in [
            (lambda r: r.update(lesson_sha256="0" * 64), f"notebooks/{stem}.ipynb changed"),
            (lambda r: r["upstream_sha256"].update({LESSONS[7]: "0" * 64}), "whose models it uses"),
            (lambda r: r["recipes_sha256"].update({"tiny/ppo.yaml": "0" * 64}), "tiny/ppo.yaml changed")]:
        changed = json.loads(json.dumps(report))
        change(changed)
        (tmp_path / f"{stem}.json").write_text(json.dumps(changed))
        assert expected in portability.why_stale(stem)
    (tmp_path / f"{stem}.json").unlink()
    assert portability.why_stale(stem) == "no report yet"


def test_the_report_counts_each_claim_per_run_and_a_run_that_stopped_early_as_failed(tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path)

    def claim(statement, holds, **measured):
        return {"kind": "claim", "statement": statement, "holds": holds, "measured": measured}

    runs = [{"variation": "reference", "seconds": 10.0, "completed": True, "error": None,
             "metrics": {"acc": 0.5},
             "entries": [claim("A", True, gap=0.3), claim("B", True),
                         {"kind": "check_close", "what": "x", "holds": True, "max_abs_error": 1e-7,
                          "atol": 1e-6, "rtol": 0.0}]},
            {"variation": "seed+1", "seconds": 11.0, "completed": True, "error": None,
             "metrics": {"acc": 0.7},
             "entries": [claim("A", False, gap=-0.1), claim("B", True),
                         {"kind": "check_close", "what": "x", "holds": True, "max_abs_error": 3e-7,
                          "atol": 1e-6, "rtol": 0.0}]},
            {"variation": "threads-2", "seconds": 3.0, "completed": False, "error": "AssertionError",
             "metrics": {}, "entries": [claim("A", True, gap=0.2)]}]
    report = portability.summarize(LESSONS[0], runs)
    by_statement = {c["statement"]: c for c in report["claims"]}
    assert (by_statement["A"]["held"], by_statement["A"]["failed_in"]) == (2, ["seed+1"])
    assert by_statement["A"]["measured"] == {"gap": [-0.1, 0.3]}
    assert (by_statement["B"]["held"], by_statement["B"]["failed_in"]) == (2, ["threads-2"])
    assert report["checks"][0]["max_abs_error"] == [1e-7, 3e-7]
    assert report["checks"][0]["failed_in"] == ["threads-2"]
    assert report["metrics"] == {"acc": [0.5, 0.7]}
    assert report["metrics_by_run"] == {"reference": {"acc": 0.5}, "seed+1": {"acc": 0.7}}


def test_seed_replicates_reads_each_seed_and_each_same_seed_run_from_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path)
    stem = LESSONS[-1]
    runs = [{"variation": v.name, "seconds": 1.0, "completed": v.name != "threads-4", "error": None,
             "entries": [], "metrics": {"gold": 0.5 + v.seed_offset / 10 + v.threads / 100}}
            for v in portability.VARIATIONS]
    reporting.report_path(stem).write_text(json.dumps(portability.summarize(stem, runs)))
    replicates = portability.seed_replicates(stem)
    assert replicates["seeds"] == {0: {"gold": 0.51}, 1: {"gold": 0.61}, 2: {"gold": 0.71}}
    assert replicates["same_seed"]["threads-2"] == {"gold": 0.52}
    assert "threads-4" not in replicates["same_seed"]  # it did not complete
    assert set(replicates["same_seed"]) == set(portability.VARIATION_NAMES) - {
        "reference", "seed+1", "seed+2", "threads-4"}
    reporting.report_path(stem).unlink()
    with pytest.raises(FileNotFoundError, match="make portability LESSONS="):
        portability.seed_replicates(stem)


@pytest.mark.parametrize("stem", ["07_qlora_sft", "08_reward_modeling", "09_ppo_rlhf", "10_dpo"])
def test_the_reports_lesson_11_compares_seeds_with_hold_every_runs_numbers(stem):
    report = reporting.read_report(stem)
    by_run = report["metrics_by_run"]
    assert set(by_run) == {run["variation"] for run in report["runs"] if run["completed"]}
    for name, (low, high) in report["metrics"].items():
        values = [run[name] for run in by_run.values() if name in run]
        assert (min(values), max(values)) == (low, high), name


def test_claims_and_checks_are_logged_and_a_learner_sees_the_reports_range(tmp_path, monkeypatch,
                                                                         capsys):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(reporting.LOG_VARIABLE, str(log))
    monkeypatch.delenv(reporting.STRICT_CLAIMS_VARIABLE, raising=False)
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path)
    (tmp_path / "99_made_up.json").write_text(json.dumps({
        "lesson": "99_made_up", "runs": [{"variation": "reference"}, {"variation": "seed+1"}],
        "machine": {"cpu": "a CPU"},
        "claims": [{"statement": "the gap is positive", "held": 2, "runs": 2, "failed_in": [],
                    "measured": {"gap": [0.12, 0.31]}}]}))
    monkeypatch.setattr(reporting, "read_report", lambda stem: json.loads(
        (tmp_path / f"{stem}.json").read_text()))
    verdicts = reporting.check_claims({"the gap is positive": False}, measured={"gap": -0.05})
    assert verdicts == {"the gap is positive": False}
    out = capsys.readouterr().out
    assert "held in 2 of 2 runs" in out and "gap = -0.05 here; report 0.12 to 0.31" in out
    check_close(torch.tensor([1.0, 2.0], dtype=torch.float64),
                torch.tensor([1.0, 2.0 + 1e-7], dtype=torch.float64), what="two numbers")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0] == {"kind": "claim", "statement": "the gap is positive", "holds": False,
                          "measured": {"gap": -0.05}}
    assert entries[1]["kind"] == "check_close" and entries[1]["holds"] is True
    assert entries[1]["max_abs_error"] == pytest.approx(1e-7, rel=1e-3)


def test_the_readme_says_what_the_reports_say():
    readme = (portability.paths.REPO_ROOT / "README.md").read_text()
    start = readme.index(portability.README_BEGIN)
    end = readme.index(portability.README_END) + len(portability.README_END)
    assert readme[start:end] == portability.readme_block(), \
        "README's portability table differs from portability/*.json: run `make portability`"
    summary = (reporting.REPORT_DIR / "README.md").read_text()
    assert summary == portability.summary_markdown(), "portability/README.md is out of date"


def test_carry_keeps_the_other_runs_only_when_the_reference_measured_the_same(tmp_path, monkeypatch):
    """``make portability LESSONS=--carry``: after an edit, the reference variation reruns; the
    other variations' stored runs are re-pinned to today's lesson only if every number it measured
    is the stored reference run's, and stay stale otherwise."""
    stem = "01_full_finetuning_memory"
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path / "reports")
    monkeypatch.setattr(portability, "write_summary", lambda: None)
    old_pins = {"lesson_sha256": "old", "upstream_sha256": {}}

    def result(variation, pinned, gap, seconds=1.0):
        return {"variation": variation, "seconds": seconds, "completed": True, "error": None,
                "pinned": pinned, "recipes_sha256": {},
                "entries": [{"kind": "claim", "statement": "s", "holds": True, "measured": {"gap": gap}}],
                "metrics": {"gap": gap, "train_seconds": seconds}}

    for variation in portability.VARIATIONS:
        path = portability.result_path(tmp_path, variation, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result(variation.name, old_pins, 0.25)))
    reruns = []

    def rerun(stem_, variation, workdir, recipes, gap):
        reruns.append(variation.name)
        fresh = result(variation.name, portability.pins(stem_), gap, seconds=9.0)  # another clock
        portability.result_path(workdir, variation, stem_).write_text(json.dumps(fresh))
        return fresh

    monkeypatch.setattr(portability, "run_lesson", lambda *a: rerun(*a, gap=0.25))
    assert portability.carry([stem], tmp_path) == {stem: []}
    assert reruns == ["reference"]
    for variation in portability.VARIATIONS:
        assert portability.saved_result(tmp_path, variation, stem) is not None, variation.name
    carried = json.loads(portability.result_path(tmp_path, portability.VARIATIONS[1], stem).read_text())
    assert carried["carried"]["from_pinned"] == old_pins
    report = reporting.read_report(stem)
    assert sum("carried_from" in run for run in report["runs"]) == len(portability.VARIATIONS) - 1

    for variation in portability.VARIATIONS:  # the lesson changes again, and now a number moves
        path = portability.result_path(tmp_path, variation, stem)
        path.write_text(json.dumps({**json.loads(path.read_text()), "pinned": old_pins}))
    monkeypatch.setattr(portability, "run_lesson", lambda *a: rerun(*a, gap=0.26))
    found = portability.carry([stem], tmp_path)[stem]
    assert found == ["claims: ['s', True, {'gap': 0.25}] -> ['s', True, {'gap': 0.26}]",
                     "metric gap: 0.25 -> 0.26"]
    assert portability.saved_result(tmp_path, portability.VARIATIONS[1], stem) is None
    kept = json.loads(portability.result_path(tmp_path, portability.VARIATIONS[0], stem).read_text())
    assert kept["metrics"]["gap"] == 0.25, "a carry that found a difference must keep the stored reference"


def test_carry_ignores_the_order_of_claims_but_not_their_statements():
    """Moving a detour to an optional section at the end reorders a lesson's claims and changes
    no number; a reworded claim is a change."""
    def run(*statements):
        return {"completed": True, "metrics": {},
                "entries": [{"kind": "claim", "statement": s, "holds": True, "measured": {"x": 1}}
                            for s in statements]}

    def differ(before, after):
        return portability.differences(portability.measured(before), portability.measured(after))

    assert differ(run("a", "b"), run("b", "a")) == []
    assert differ(run("a", "b"), run("a", "c"))
    assert differ(run("a", "b"), run("a"))


def test_carry_leaves_out_a_stored_run_of_another_lesson_version(tmp_path, monkeypatch):
    """A variation run only when asked for (aten-scalar) can be older than the lesson's last full
    rerun: it measured another version, so a carry must not re-pin it to today's lesson."""
    stem = "01_full_finetuning_memory"
    monkeypatch.setattr(reporting, "REPORT_DIR", tmp_path / "reports")
    monkeypatch.setattr(portability, "write_summary", lambda: None)
    synced = {"lesson_sha256": "v1", "upstream_sha256": {}}
    older = {"lesson_sha256": "v0", "upstream_sha256": {}}

    def result(variation, pinned):
        return {"variation": variation, "seconds": 1.0, "completed": True, "error": None, "pinned": pinned,
                "recipes_sha256": {}, "metrics": {"gap": 0.25},
                "entries": [{"kind": "claim", "statement": "s", "holds": True, "measured": {}}]}

    for variation in portability.VARIATIONS + portability.EXTRA_VARIATIONS:
        path = portability.result_path(tmp_path, variation, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        stale = variation in portability.EXTRA_VARIATIONS
        path.write_text(json.dumps(result(variation.name, older if stale else synced)))
    monkeypatch.setattr(portability, "run_lesson",
                        lambda stem_, variation, *a: result(variation.name, portability.pins(stem_)))
    assert portability.carry([stem], tmp_path) == {stem: []}
    runs = [run["variation"] for run in reporting.read_report(stem)["runs"]]
    assert runs == [v.name for v in portability.VARIATIONS]
