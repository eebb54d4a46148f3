"""``make site``: the executed course as a static site, checked page by page in headless Chromium.

``make test`` runs this module after every lesson has executed (its second pytest run), so the site
is built from the executed copies that same run wrote to ``artifacts/executed/``. The check can
fail: a site with a notebook cell that raised, a link to a missing anchor, a missing image and a
console error is built and checked below.
"""

from __future__ import annotations

import json

import pytest

from course_utils.course import paths
from course_utils.notebook_tools import browser, site
from course_utils.notebook_tools.run_notebooks import NotebookFailed, execute, lesson_notebooks

SCREENSHOTS = ("index.png", "notebooks_00_setup_and_tour.png")


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    if browser.chosen_path() is None:
        pytest.fail(browser.NO_BROWSER)


def test_the_executed_course_builds_into_a_site_that_checks_out():
    html_dir = site.build()
    problems = site.check(html_dir, site.site_dir() / "screenshots")
    assert problems == [], "\n".join(problems[:20])
    lessons = [p.name for p in lesson_notebooks()]
    for lesson in lessons:
        page = (html_dir / "notebooks" / lesson.replace(".ipynb", ".html")).read_text()
        executed = json.loads((paths.artifacts_dir("executed") / lesson).read_text())
        figures = sum("image/png" in output.get("data", {}) for cell in executed["cells"]
                      for output in cell.get("outputs", []))
        assert page.count("<img") >= figures + 1, lesson  # every figure, and the badge
    tour = (html_dir / "notebooks" / "00_setup_and_tour.html").read_text()
    assert 'class="course-progress"' in tour and "HBox(children=" not in tour  # bars, not their text
    exercises = sorted((html_dir / "exercises").glob("ex*.html"))
    shipped = sorted(p.stem for p in (paths.REPO_ROOT / "exercises").glob("ex*.ipynb"))
    assert [p.stem for p in exercises] == shipped and not (html_dir / "solutions").exists()
    assert all("BEGIN SOLUTION" not in p.read_text() for p in exercises)
    landing = (html_dir / "index.html").read_text()
    assert "Course map" in landing and "This build" in landing
    assert sum(f'href="notebooks/{lesson.replace(".ipynb", ".html")}' in landing
               for lesson in lessons) == len(lessons)
    for name in SCREENSHOTS:  # look at them: a readable page, not a blank one
        assert (site.site_dir() / "screenshots" / name).stat().st_size > 30_000, name


def test_the_check_finds_what_a_broken_site_shows(tmp_path):
    """A notebook whose cell raised, a link to an anchor that does not exist, an image that is not
    there and a script that fails: each is reported."""
    import nbformat

    src = tmp_path / "src"
    src.mkdir()
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 / 0")
    cell.outputs = [nbformat.v4.new_output(
        "error", ename="ZeroDivisionError", evalue="division by zero",
        traceback=["Traceback (most recent call last)", "ZeroDivisionError: division by zero"])]
    notebook.cells = [nbformat.v4.new_markdown_cell("# Broken\n\n[there](other.md#nowhere)\n\n"
                                                    "![gone](gone.png)"), cell,
                      nbformat.v4.new_code_cell("print('ok')")]
    nbformat.write(notebook, src / "broken.ipynb")
    (src / "other.md").write_text("# Other\n\n<script>undefinedFunction()</script>\n")
    (src / "index.md").write_text("# Index\n\n```{toctree}\nbroken\nother\n```\n")
    site.write_config(src)
    with pytest.raises(site.SiteError, match="gone.png"):  # the strict build stops at its warnings
        site.sphinx_build(src, tmp_path / "strict")
    html_dir = site.sphinx_build(src, tmp_path / "html", strict=False)  # what the browser sees
    problems = "\n".join(site.check(html_dir, search_term=None))
    assert "broken.html: error output" in problems
    assert "missing anchor other.html#nowhere" in problems
    assert "broken.html: image missing or empty" in problems
    assert "other.html: console: " in problems and "undefinedFunction" in problems


def test_a_lesson_cell_that_raises_fails_its_run_and_says_where(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("PROFILE = 'auto'", metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("x / 0")]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(NotebookFailed, match=r"99_broken.ipynb: cell \d raised ZeroDivisionError"):
        execute(path, tmp_path / "executed.ipynb", profile="tiny")
    assert (tmp_path / "executed.ipynb").exists()  # the traceback is there to read
