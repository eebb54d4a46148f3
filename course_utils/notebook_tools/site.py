"""``make site``: the executed course as a static HTML site, built offline, and its browser check.

Why Sphinx with myst-nb: it renders notebooks with the outputs they already have (no second
execution: ``nb_execution_mode = "off"``), it is plain Python from PyPI with nothing fetched at build
time (Jupyter Book 2 and MyST's own builder download their theme from the network, mkdocs-jupyter
renders through nbconvert's templates, which load MathJax and require.js from a CDN), its theme
(``sphinx-book-theme``, Jupyter Book's look) and search index are local files, and
``sphinx-mathjax-offline`` serves MathJax from the site itself. A page of the site therefore loads
nothing from the network except what the notebooks link to.

The pages come from ``artifacts/executed/`` (written by ``make run`` or ``make test``, which execute
each lesson once, through ``run_notebooks.execute``): the lessons in course order with their text,
code, printed tables and figures; the exercises from ``exercises/`` (never ``solutions/``), not
executed; the README (setup, grading, maintenance); the course map as the landing page; and the
date, profile and library versions each lesson ran with. Progress bars are ipywidgets in a live
kernel; here each becomes a static bar drawn from the widget state the executed notebook saved.

``python -m course_utils.notebook_tools.site`` builds into ``artifacts/site/html/``; ``--check``
then opens every page in headless Chromium (``check``): console errors, missing or empty images,
internal links and anchors that do not resolve, error outputs and tracebacks, and screenshots of
the landing page and a lesson under ``artifacts/site/screenshots/``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

from course_utils.course import paths
from course_utils.notebook_tools import browser as browsers
from course_utils.notebook_tools.colab import GITHUB_REPO
from course_utils.notebook_tools.run_notebooks import lesson_notebooks

TITLE = "Fine-tuning LLMs, from memory math to DPO"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: a Markdown link or image target: ](target) or ](target "title")
LINK = re.compile(r"(\]\()([^)\s]+)")
#: the Colab badge's image, served from the site (an offline reader cannot load colab's)
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img"
aria-label="Open In Colab"><rect width="117" height="20" rx="3" fill="#555"/>
<rect x="46" width="71" height="20" rx="3" fill="#f9ab00"/><rect x="46" width="6" height="20"
fill="#f9ab00"/><g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11">
<text x="7" y="14">Open</text><text x="52" y="14" fill="#222">in Colab</text></g></svg>
"""

FAVICON_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16"
rx="3" fill="#f9ab00"/><text x="3" y="12" font-size="10" font-family="sans-serif">FT</text></svg>
"""


class SiteError(RuntimeError):
    """The site cannot be built: what is missing and what to run."""


def site_dir() -> Path:
    return paths.artifacts_dir("site")


# --- sources ----------------------------------------------------------------------------------

def _static_progress(state: dict, model_id: str) -> str | None:
    """tqdm's notebook bar (an HBox of a label, a FloatProgress and a label) as static HTML, from
    the widget state saved with the executed notebook; ``None`` for any other widget."""
    box = state.get(model_id, {}).get("state", {})
    entries = [state.get(ref.removeprefix("IPY_MODEL_"), {}) for ref in box.get("children", [])]
    kinds = [entry.get("model_name") or entry.get("state", {}).get("_model_name") for entry in entries]
    if kinds != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (entry["state"] for entry in entries)
    return (f'<div class="course-progress"><span>{left.get("value", "")}</span> '
            f'<progress value="{bar.get("value", 0)}" max="{bar.get("max", 1)}"></progress> '
            f'<span>{right.get("value", "")}</span></div>')


def static_widgets(notebook: dict) -> dict:
    """Replace every widget output with static HTML (progress bars) or its text, and drop the
    widget state: the site loads no widget JavaScript."""
    state = notebook.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                bar = _static_progress(state, data.pop(WIDGET_VIEW)["model_id"])
                if bar:
                    data.clear()
                    data["text/html"] = bar
    return notebook


def site_link(target: str, source: str) -> str:
    """A link of the repository file ``source`` (a path relative to the repository root) as the
    site needs it: pages of the site stay relative, anything else goes to the file on GitHub."""
    if re.match(r"[a-z]+:|#|/", target):
        return target
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path)) if path else source
    on_site = (re.fullmatch(r"(notebooks/\d\d_\w+|exercises/ex\d\d_\w+)\.ipynb", resolved)
               or resolved == "README.md")
    if on_site:
        return target
    kind = "tree" if (paths.REPO_ROOT / resolved).is_dir() or resolved.endswith("/") else "blob"
    return f"https://github.com/{GITHUB_REPO}/{kind}/main/{resolved}" + (f"#{anchor}" if anchor else "")


def rewrite_links(text: str, source: str) -> str:
    return LINK.sub(lambda m: m.group(1) + site_link(m.group(2), source), text)


def _page_notebook(notebook: dict, source: str) -> dict:
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = rewrite_links(text, source)
    return notebook


def landing_page(records: dict[str, dict]) -> str:
    """The README's introduction and course map, then when and with what the lessons ran."""
    readme = (paths.REPO_ROOT / "README.md").read_text()
    intro = readme.split("\n## ")[0].split("\n", 1)[1]
    course_map = "## " + next(part for part in readme.split("\n## ") if part.startswith("Course map"))
    lines = [f"# {TITLE}", rewrite_links(intro, "README.md"), rewrite_links(course_map, "README.md"),
             "## This build", "",
             "Every lesson page shows its notebook as it was executed, outputs included, on one "
             "machine: another CPU, thread count or seed prints other numbers, while the sentences "
             "each lesson checks hold in every run of the portability report (the guide's section "
             "*The same numbers on every machine?* says what varies and by how much). This build ran:",
             "",
             "| lesson | executed (UTC) | run through | profile | machine | torch | transformers | peft "
             "| trl | bitsandbytes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in records.items():
        v = record.get("versions", {})
        lines.append(f"| [{name}](notebooks/{name}) | {record.get('executed', '?')} | "
                     f"{record.get('executed_in', '?')} | "
                     f"{record.get('profile', '?')} | {record.get('machine', '?')} | "
                     + " | ".join(str(v.get(k)) for k in ("torch", "transformers", "peft", "trl",
                                                          "bitsandbytes")) + " |")
    lines += ["", "The exercises are shown as students get them, unexecuted (no solutions); "
              "the setup, grading and maintenance guide is the repository's README.", "",
              "```{toctree}", ":caption: Lessons", ":maxdepth: 1", ""]
    lines += [f"notebooks/{name.removesuffix('.ipynb')}" for name in records]
    lines += ["```", "", "```{toctree}", ":caption: Exercises", ":maxdepth: 1", ""]
    lines += [f"exercises/{p.stem}" for p in sorted((paths.REPO_ROOT / "exercises").glob("ex*.ipynb"))]
    lines += ["```", "", "```{toctree}", ":caption: Guide", ":maxdepth: 2", "", "README", "```", ""]
    return "\n".join(lines)


CONF = '''
project = {title!r}
extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the package installs under this name
html_theme = "sphinx_book_theme"
html_title = {title!r}
html_static_path = ["_static"]
html_css_files = ["course.css"]
html_favicon = "_static/favicon.svg"  # else the browser asks the server for /favicon.ico
html_context = {{"default_mode": "light"}}  # the theme reports an unset mode as a console error
html_theme_options = {{"show_toc_level": 2, "navigation_with_keys": False}}
html_last_updated_fmt = "%Y-%m-%d"
nb_execution_mode = "off"
nb_output_stderr = "show"
nb_ipywidgets_js = {{}}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 4
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "misc.highlighting_failure"]
exclude_patterns = ["_build"]
'''
CSS = """.course-progress { font-family: monospace; font-size: 0.85em; }
.course-progress progress { width: 12em; vertical-align: middle; }
"""


def prepare(executed_dir: Path, src: Path) -> dict[str, dict]:
    """Write the site's sources into ``src``; return each lesson's run record."""
    lessons = sorted(executed_dir.glob("[0-9][0-9]_*.ipynb"))

    expected = [p.name for p in lesson_notebooks()]
    missing = sorted(set(expected) - {p.name for p in lessons})
    if missing:
        raise SiteError(f"no executed copy of {', '.join(missing)} in {executed_dir}: run `make run` "
                        "(or `make test`), which executes every lesson into artifacts/executed/")
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    (src / "exercises").mkdir()
    records = {}
    for path in lessons:
        notebook = static_widgets(json.loads(path.read_text()))
        records[path.name] = notebook["metadata"].get("course", {})
        (src / "notebooks" / path.name).write_text(
            json.dumps(_page_notebook(notebook, f"notebooks/{path.name}")))
    for path in sorted((paths.REPO_ROOT / "exercises").glob("ex*.ipynb")):
        notebook = json.loads(path.read_text())
        (src / "exercises" / path.name).write_text(
            json.dumps(_page_notebook(notebook, f"exercises/{path.name}")))
    readme = (paths.REPO_ROOT / "README.md").read_text()
    guide = "# The course guide: setup, profiles, grading, tests\n" + readme.split("\n", 1)[1]
    (src / "README.md").write_text(rewrite_links(guide, "README.md"))
    (src / "index.md").write_text(landing_page(records))
    write_config(src)
    return records


def write_config(src: Path) -> None:
    (src / "_static").mkdir(parents=True, exist_ok=True)
    (src / "conf.py").write_text(CONF.format(title=TITLE))
    (src / "_static" / "course.css").write_text(CSS)
    (src / "_static" / "colab-badge.svg").write_text(BADGE_SVG)
    (src / "_static" / "favicon.svg").write_text(FAVICON_SVG)


def sphinx_build(src: Path, html_dir: Path, strict: bool = True) -> Path:
    """Sphinx's HTML build of ``src`` into ``html_dir``, the Colab badge served from the site.
    ``strict``: a warning (a broken role, an unknown reference, an unreadable image) fails it."""
    strictness = ["-W", "--keep-going"] if strict else []
    result = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", *strictness,
                             str(src), str(html_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SiteError(f"sphinx-build failed:\n{result.stderr[-4000:]}")
    for page in html_dir.rglob("*.html"):  # an offline reader cannot load colab's badge image
        text = page.read_text()
        if BADGE_IMAGE in text:
            depth = len(page.relative_to(html_dir).parts) - 1
            page.write_text(text.replace(BADGE_IMAGE, "../" * depth + "_static/colab-badge.svg"))
    return html_dir


def build(executed_dir: Path | None = None, out: Path | None = None) -> Path:
    """Build the site; return the folder holding ``index.html``."""
    executed_dir = Path(executed_dir or paths.artifacts_dir("executed"))
    out = Path(out or site_dir())
    prepare(executed_dir, out / "src")
    return sphinx_build(out / "src", out / "html")


# --- the browser check ------------------------------------------------------------------------

#: what a page reports to the check: its ids, its links, its images, its error outputs
PAGE_FACTS = """() => ({
  ids: [...document.querySelectorAll("[id]")].map(e => e.id),
  links: [...document.querySelectorAll("a[href]")].map(a => a.href),
  images: [...document.querySelectorAll("img")].map(i => ({src: i.currentSrc || i.src,
           ok: i.complete && i.naturalWidth > 0})),
  errors: [...document.querySelectorAll(".output.traceback, .output.error, .cell_output .traceback")]
          .map(e => e.innerText.slice(0, 120)),
  traceback: document.body.innerText.includes("Traceback (most recent call last)"),
})"""


def check(html_dir: Path, screenshots: Path | None = None, search_term: str | None = "LoRA"
          ) -> list[str]:
    """Open every page of the site in headless Chromium, served over HTTP from 127.0.0.1; return
    the problems found (none: the site is good). Screenshots of the landing page and of lesson 00
    at its first figure go to ``screenshots``."""
    import functools
    import threading
    from urllib.parse import urldefrag, urlparse

    chromium = browsers.chosen_path()
    if chromium is None:
        raise SiteError(browsers.NO_BROWSER)
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    pages = sorted(p.relative_to(html_dir).as_posix() for p in html_dir.rglob("*.html")
                   if not p.relative_to(html_dir).parts[0].startswith("_"))
    problems, ids, links = [], {}, []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium),
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            # a request the next navigation cancels (the favicon, often) is not a missing file:
            # a missing one answers 404, which the console reports
            page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
                    else console.append(f"could not load {r.url} ({r.failure})"))
            for name in pages:
                console.clear()
                page.goto(base + name, wait_until="load")
                facts = page.evaluate(PAGE_FACTS)
                ids[name] = set(facts["ids"])
                links += [(name, link) for link in facts["links"]]
                problems += [f"{name}: console: {text[:200]}" for text in console]
                problems += [f"{name}: image missing or empty: {image['src']}"
                             for image in facts["images"] if not image["ok"]]
                problems += [f"{name}: error output: {text!r}" for text in facts["errors"]]
                if facts["traceback"] and not facts["errors"]:
                    problems.append(f"{name}: shows a traceback")
                if screenshots and name in ("index.html", "notebooks/00_setup_and_tour.html"):
                    screenshots.mkdir(parents=True, exist_ok=True)
                    figures = page.locator(".cell_output img")
                    if name != "index.html" and figures.count():
                        figures.first.scroll_into_view_if_needed()
                        page.evaluate("window.scrollBy(0, -250)")
                    page.screenshot(path=str(screenshots / name.replace("/", "_").replace(
                        ".html", ".png")))
            if search_term and "search.html" in pages:
                page.goto(f"{base}search.html?q={search_term}", wait_until="load")
                try:
                    page.wait_for_selector("#search-results li", timeout=15000)
                except Exception:  # noqa: BLE001 (playwright's timeout)
                    problems.append(f"search.html: no results for {search_term!r}")
            browser.close()
    finally:
        server.shutdown()
    for name, link in links:
        url, anchor = urldefrag(link)
        if not url.startswith(base):
            continue  # another site: not this check's business
        target = urlparse(url).path.lstrip("/") or "index.html"
        if target.endswith("/"):
            target += "index.html"
        if not (html_dir / target).exists():
            problems.append(f"{name}: link to a missing page {target}")
        elif anchor and target in ids and anchor not in ids[target]:
            problems.append(f"{name}: link to a missing anchor {target}#{anchor}")
    return sorted(set(problems))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the executed course as a static site.")
    parser.add_argument("--check", action="store_true",
                        help="then open every page in headless Chromium and report problems")
    args = parser.parse_args(argv)
    try:
        html_dir = build()
        print(f"the site: {html_dir / 'index.html'}")
        if args.check:
            problems = check(html_dir, site_dir() / "screenshots")
            for problem in problems:
                print("PROBLEM:", problem)
            print(f"{len(problems)} problems; screenshots in {site_dir() / 'screenshots'}")
            return 1 if problems else 0
    except SiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
