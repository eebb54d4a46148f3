"""Which Chromium ``make test`` drives, decided before any test runs (``notebook_tools.browser``):
every branch of the decision, with the machine's probes replaced by stand-ins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from course_utils.course.paths import REPO_ROOT
from course_utils.notebook_tools import browser


def decide(environ=None, system=None, working=(), own=None, root=False, apt_works=False,
           playwright_works=False):
    """``browser.decide`` on a made-up machine: ``system`` maps names on PATH to paths, ``working``
    lists the paths that run, ``own`` is Playwright's browser once downloaded."""
    calls = []
    working = set(working)
    downloaded = {"done": own is not None and not playwright_works}

    def install_debian():
        calls.append("apt-get")
        if apt_works:
            working.add(browser.DEBIAN_CHROMIUM)
        return apt_works

    def install_playwright():
        calls.append("playwright")
        downloaded["done"] = playwright_works
        return playwright_works

    choice = browser.decide(
        environ or {}, lambda name: (system or {}).get(name), lambda path: Path(path) in working,
        lambda: own if downloaded["done"] else None, root, install_debian, install_playwright)
    return choice, calls


def test_a_system_chromium_is_used_and_nothing_is_installed():
    choice, calls = decide(system={"chromium": "/usr/bin/chromium"}, working=[Path("/usr/bin/chromium")],
                           root=True)
    assert choice.path == Path("/usr/bin/chromium") and calls == []


def test_the_variable_wins_and_a_broken_one_is_named():
    mac = Path("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
    choice, _ = decide({browser.VARIABLE: str(mac)}, system={"chromium": "/usr/bin/chromium"},
                       working=[mac, Path("/usr/bin/chromium")])
    assert choice.path == mac
    choice, calls = decide({browser.VARIABLE: "/nowhere/chrome"}, working=[Path("/usr/bin/chromium")])
    assert choice.path is None and "/nowhere/chrome" in choice.how and calls == []


def test_playwrights_own_browser_comes_before_any_install():
    own = Path("/home/me/.cache/ms-playwright/chromium-1200/chrome-linux/chrome")
    choice, calls = decide(own=own, working=[own], root=True)
    assert choice.path == own and calls == []


def test_root_on_debian_installs_the_package():
    choice, calls = decide(root=True, apt_works=True)
    assert choice.path == browser.DEBIAN_CHROMIUM and calls == ["apt-get"]


def test_without_root_playwright_downloads_its_browser():
    own = Path("/home/me/.cache/ms-playwright/chromium/chrome")
    choice, calls = decide(own=own, working=[own], playwright_works=True)
    assert choice.path == own and calls == ["playwright"]
    assert choice.tried == ("playwright install chromium: done",)


def test_with_nothing_to_be_had_the_run_stops_at_once_with_one_message(tmp_path):
    choice, calls = decide(root=True)
    assert choice.path is None and calls == ["apt-get", "playwright"]
    for way in ("sudo apt-get install chromium", "playwright install chromium", browser.VARIABLE):
        assert way in browser.NO_BROWSER
    # the real command, on a PATH with no browser and a variable pointing nowhere: exit 1, the message
    result = subprocess.run([sys.executable, "-m", "course_utils.notebook_tools.browser"],
                            env={"PATH": str(tmp_path), browser.VARIABLE: str(tmp_path / "chrome")},
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert "does not run" in result.stderr and "sudo apt-get install chromium" in result.stderr


def test_make_test_decides_first_and_ci_runs_only_the_readme_command():
    makefile = (REPO_ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    first, *_ = [line.strip() for line in test_recipe.splitlines()[1:] if line.strip()]
    assert "course_utils.notebook_tools.browser" in first
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test" and not any("make browser" in line for line in ci)
    assert "make test" in (REPO_ROOT / "README.md").read_text().split("## Quick start", 1)[1][:800]
