"""Which Chromium the browser checks of ``make test`` drive (the site, JupyterLab), found before any
test runs, so that a machine without one stops in its first seconds with one message.

``make test`` runs ``python -m course_utils.notebook_tools.browser`` first. ``choose`` looks, in
order, at:

1. ``COURSE_CHROMIUM``: a path you set to any Chromium or Chrome executable;
2. a system Chromium on ``PATH`` (``chromium``, ``chromium-browser``, ``google-chrome``, ...), or
   Debian's ``/usr/bin/chromium``;
3. Playwright's own browser, where ``python -m playwright install chromium`` has put one;
4. getting one: Debian's package when this process may install packages (root with ``apt-get``),
   else Playwright's download (which needs its CDN, not only the package index).

It prints the path it settles on (the Makefile hands it to the tests as ``COURSE_CHROMIUM``);
with none it exits with ``NO_BROWSER`` (what to install, three ways). ``decide`` holds the logic
and takes every probe as an argument, so ``tests/test_browser.py`` checks each branch without a
second machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VARIABLE = "COURSE_CHROMIUM"
SYSTEM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
NO_BROWSER = (
    "make test needs a Chromium for its browser checks (the executed site, JupyterLab) and found "
    "none. Install one, then run make test again:\n"
    "  - Debian or Ubuntu: sudo apt-get install chromium\n"
    "  - any system where Playwright can download its browser: .venv/bin/python -m playwright "
    "install chromium\n"
    "  - or point COURSE_CHROMIUM at an installed Chromium or Chrome executable "
    "(macOS: COURSE_CHROMIUM='/Applications/Google Chrome.app/Contents/MacOS/Google Chrome')")


@dataclass(frozen=True)
class Choice:
    path: Path | None
    how: str            # where it came from, in words
    tried: tuple = ()   # installs attempted on the way, with their outcome


def runs(path: Path) -> bool:
    """``path`` is an executable that answers ``--version``."""
    try:
        return subprocess.run([str(path), "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def playwright_chromium() -> Path | None:
    """Playwright's own Chromium, if ``playwright install chromium`` has downloaded it."""
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            path = Path(playwright.chromium.executable_path)
    except Exception:  # no playwright, or no driver: no browser from it either
        return None
    return path if path.exists() else None


def install_debian_chromium() -> bool:
    result = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                            "apt-get install -y -qq chromium", shell=True, capture_output=True)
    return result.returncode == 0


def install_playwright_chromium() -> bool:
    result = subprocess.run([sys.executable, "-m", "playwright", "install", "chromium"],
                            capture_output=True, timeout=600)
    return result.returncode == 0


def decide(environ: dict, which: Callable[[str], str | None], works: Callable[[Path], bool],
           playwright_path: Callable[[], Path | None], may_install_packages: bool,
           install_debian: Callable[[], bool], install_playwright: Callable[[], bool]) -> Choice:
    """The first usable Chromium in the order of the module's docstring, installing one only when
    none is found."""
    if environ.get(VARIABLE):
        path = Path(environ[VARIABLE])
        if works(path):
            return Choice(path, f"{VARIABLE}")
        return Choice(None, f"{VARIABLE}={path} does not run (`{path} --version` failed)")
    for name in SYSTEM_NAMES:
        found = which(name)
        if found and works(Path(found)):
            return Choice(Path(found), f"the system's {name}")
    if works(DEBIAN_CHROMIUM):
        return Choice(DEBIAN_CHROMIUM, "Debian's chromium package")
    own = playwright_path()
    if own is not None and works(own):
        return Choice(own, "Playwright's own Chromium")
    tried = []
    if may_install_packages:
        installed = install_debian()
        tried.append(f"apt-get install chromium: {'done' if installed else 'failed'}")
        if installed and works(DEBIAN_CHROMIUM):
            return Choice(DEBIAN_CHROMIUM, "Debian's chromium package, installed now", tuple(tried))
    installed = install_playwright()
    tried.append(f"playwright install chromium: {'done' if installed else 'failed'}")
    own = playwright_path() if installed else None
    if own is not None and works(own):
        return Choice(own, "Playwright's own Chromium, downloaded now", tuple(tried))
    return Choice(None, "none found", tuple(tried))


def may_install_packages() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def choose() -> Choice:
    return decide(dict(os.environ), shutil.which, runs, playwright_chromium, may_install_packages(),
                  install_debian_chromium, install_playwright_chromium)


def chosen_path() -> Path | None:
    """The Chromium to drive: ``COURSE_CHROMIUM`` (``make test`` sets it to what ``choose``
    found), else a system one (a test run outside ``make test``); ``None`` without either."""
    if os.environ.get(VARIABLE):
        return Path(os.environ[VARIABLE])
    for name in SYSTEM_NAMES:
        if shutil.which(name):
            return Path(shutil.which(name))
    return DEBIAN_CHROMIUM if DEBIAN_CHROMIUM.exists() else None


def main() -> int:
    choice = choose()
    for attempt in choice.tried:
        print(f"[browser] tried {attempt}", file=sys.stderr)
    if choice.path is None:
        print(f"[browser] {choice.how}.\n{NO_BROWSER}", file=sys.stderr)
        return 1
    print(f"[browser] {choice.path} ({choice.how})", file=sys.stderr)
    print(choice.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
