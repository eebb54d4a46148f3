"""``make drift`` and its weekly workflow: what the run installs, what it reports, and that the
workflow parses, runs the target on a schedule and opens an issue when it fails."""

from __future__ import annotations

import yaml

from course_utils.course.paths import REPO_ROOT
from course_utils.notebook_tools import drift

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_generation"
 name="test_generate_matches_the_forward_pass[p_tuning]@test_generation]">
<failure message="AssertionError: p_tuning: generate [790, 539] vs forward pass [790, 366]">
self = &lt;...&gt;
/x/artifacts/drift-venv/lib/python3.11/site-packages/transformers/generation/utils.py:2615: in generate
    result = decoding_method(
tests/test_generation.py:70: AssertionError</failure></testcase>
<testcase classname="tests.test_data" name="test_ok"/>
<testcase classname="tests.test_data" name="test_skipped"><skipped message="no GPU"/></testcase>
<testcase classname="tests.test_x" name="test_new"><error message="ImportError: cannot import name 'Foo'">
/x/artifacts/drift-venv/lib/python3.11/site-packages/trl/__init__.py:12: in &lt;module&gt;
</error></testcase></testsuite></testsuites>"""


def test_the_drift_requirements_replace_exactly_the_drifting_pins():
    pins = drift.pinned_versions()
    assert pins["transformers"] and pins["torch"] == "2.13.0"
    text = drift.drift_requirements(pins, {"transformers": "9.9.9", "torch": "3.0.0"})
    lines = text.splitlines()
    assert "transformers==9.9.9" in lines and "torch==3.0.0" in lines
    assert f"peft=={pins['peft']}" in lines  # not drifting in this call: stays pinned
    assert not any(line.startswith("transformers==" + pins["transformers"]) for line in lines)


def test_the_report_names_each_failure_its_call_and_a_known_cause(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    result = drift.read_junit(junit)
    assert result["passed"] == 1 and len(result["failed"]) == 2
    generation, missing = result["failed"]
    assert generation["test"] == "tests/test_generation.py::test_generate_matches_the_forward_pass[p_tuning]"
    assert generation["call"] == "transformers/generation/utils.py:2615"
    assert "peft 0.21.2" in generation["cause"] and missing["cause"] is None
    assert missing["call"] == "trl/__init__.py:12"
    report = {"date": "d", "python": "3.11", "pins": {"torch": "2.13.0"},
              "environment": {"tried": {"torch": "2.15.0"}, "installed": {"torch": "2.13.0"},
                              "kept_at_pin": {"torch": "torch 2.15.0 could not be installed here"}},
              "runs": [{"name": "unit tests", "seconds": 60, **result}]}
    markdown = drift.report_markdown(report)
    assert "| torch | 2.13.0 | 2.15.0 | 2.13.0 |" in markdown and "could not be installed" in markdown
    assert "1 passed, 2 failed" in markdown and "not yet traced" in markdown


def test_the_weekly_workflow_runs_make_drift_and_opens_an_issue_on_failure():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "drift.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["schedule"][0]["cron"].split()[4] == "1"  # weekly, on Mondays
    steps = workflow["jobs"]["drift"]["steps"]
    assert any(step.get("run", "").startswith("make drift") for step in steps)
    assert workflow["jobs"]["drift"]["strategy"]["matrix"]["torch"] == ["newest", "colab"]
    issue = [step for step in steps if step.get("if") == "failure()"]
    assert issue and "gh issue create" in issue[0]["run"] and "drift/REPORT.md" in issue[0]["run"]
    assert workflow["permissions"]["issues"] == "write"
    assert "drift:" in (REPO_ROOT / "Makefile").read_text()


def test_colabs_torch_is_read_from_googles_published_package_list(tmp_path):
    freeze = tmp_path / "pip-freeze.gpu.txt"
    freeze.write_text("tokenizers==0.22.1\ntorch==2.11.0+cu128\ntorchao==0.10.0\n")
    assert drift.colab_torch(freeze.as_uri()) == "2.11.0"
