"""End to end in a real headless Chromium (Debian's package, driven by Playwright) on real scored films.

Films from ../shared/data/kermany-cxr224 are scored by the real `cxr-triage scan`; users are made by
`cxr-triage users add`; the page is served by `cxr-triage web`. The test signs in, checks the rows
are in the CLI's order, sees a newly scored film appear without a reload, opens a film with the
keyboard, toggles the Grad-CAM overlay, presses Agree, sees the film leave the top, signs out; a
viewer cannot review. It saves the README's screenshots to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import copy_into, kermany_files
from tests.web_helpers import add_user, cli, web_server

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = os.environ.get("CXR_TRIAGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def scored_site(kermany, tmp_path_factory):
    """A SQLite worklist of real films scored by `cxr-triage scan`, two users, a running web server."""
    root = tmp_path_factory.mktemp("site")
    films = kermany_files(kermany, "PNEUMONIA", 40)[-4:] + kermany_files(kermany, "NORMAL", 40)[-3:]
    copy_into(films, root / "drop" / "ward-3")
    url = f"sqlite:///{root / 'worklist.sqlite3'}"
    scan = cli("scan", str(root / "drop"), "--database-url", url, "--no-progress", "--decode-workers", "0")
    assert scan.returncode == 0, scan.stderr
    add_user(url, "dr-reader", "reviewer", PASSWORD)
    add_user(url, "tech-viewer", "viewer", PASSWORD)
    with web_server(url, root / "web.log") as base:
        yield url, base, root


def _cli_order(url: str) -> list[str]:
    result = cli("worklist", "--format", "json", "--database-url", url)
    assert result.returncode == 0, result.stderr
    return [row["sha256"] for row in json.loads(result.stdout)]


def _sign_in(page, base: str, username: str) -> None:
    page.goto(base + "/")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


def _until(page, predicate: str, seconds: float) -> None:
    """Poll a page predicate from here: the page's CSP forbids the eval that wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        page.wait_for_timeout(250)


def _screenshot(page, name: str) -> None:
    """Save a README screenshot, reduced to a 256-colour palette so the committed PNG stays small."""
    from PIL import Image

    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def _rows(page) -> list[str]:
    return page.eval_on_selector_all(
        "#worklist tbody tr[data-sha256]", "rows => rows.map(r => r.dataset.sha256)"
    )


def test_reader_signs_in_opens_a_film_agrees_and_signs_out(browser, scored_site, kermany):
    url, base, root = scored_site
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    csp_errors: list[str] = []
    page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)

    _sign_in(page, base, "dr-reader")
    assert _rows(page) == _cli_order(url) and len(_rows(page)) == 7, "the page shows the CLI's order"

    # a new urgent film arrives: the open page shows it at its place without a reload
    page.evaluate("window.notReloaded = true")
    new_film = kermany_files(kermany, "PNEUMONIA", 41)[-1]
    copy_into([new_film], root / "drop" / "ward-4")
    scan = cli("scan", str(root / "drop"), "--database-url", url, "--no-progress", "--decode-workers", "0")
    assert scan.returncode == 0, scan.stderr
    before = _cli_order(url)
    assert len(before) == 8
    # Until a refresh after the scan: one during it may show the new film still queued (at the bottom).
    rows = "document.querySelectorAll('#worklist tbody tr[data-sha256]')"
    shown = f"Array.from({rows}).map(r => r.dataset.sha256)"
    expected = json.dumps(json.dumps(before, separators=(",", ":")))  # as JSON.stringify writes it
    _until(page, f"() => JSON.stringify({shown}) === {expected}", 90)
    assert page.evaluate("window.notReloaded === true")
    assert _rows(page) == before, "refreshed in the CLI's order"
    _until(page, "() => Array.from(document.querySelectorAll('img.thumb')).every(i => i.complete)", 60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _screenshot(page, "worklist.png")

    # keyboard: the first row is selected; j moves down, k back up, Enter opens
    assert page.get_attribute("#worklist tbody tr.selected", "data-sha256") == before[0]
    page.keyboard.press("j")
    assert page.get_attribute("#worklist tbody tr.selected", "data-sha256") == before[1]
    page.keyboard.press("k")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/films/{before[0]}")

    # the film page: overlay off by default, labelled; toggling it loads the Grad-CAM overlay
    assert page.is_visible("#film") and not page.is_visible("#heatmap")
    assert not page.is_checked("#heatmap-toggle")
    assert "research visualisation, not a diagnosis" in page.inner_text("label.heat")
    _until(
        page,
        "() => document.getElementById('film').complete && document.getElementById('film').naturalWidth > 0",
        60,
    )
    page.check("#heatmap-toggle")
    page.wait_for_selector("#heatmap[data-loaded='1']", state="visible", timeout=240_000)
    _screenshot(page, "film.png")
    page.uncheck("#heatmap-toggle")
    assert not page.is_visible("#heatmap")

    page.click("#agree")
    page.wait_for_url(base + "/")
    after = _rows(page)
    assert after[0] != before[0] and after[-1] == before[0], "the reviewed film leaves the top"
    assert after == _cli_order(url)

    page.click("#sign-out")
    page.wait_for_url(base + "/login")
    page.goto(base + "/")
    assert page.url.endswith("/login"), "signed out: the worklist needs a new sign-in"
    assert not csp_errors, csp_errors
    context.close()


def test_the_refresh_keeps_the_readers_scroll_and_filters(browser, scored_site):
    url, base, _ = scored_site
    context = browser.new_context(viewport={"width": 1200, "height": 320})
    page = context.new_page()
    _sign_in(page, base, "tech-viewer")
    listed = cli("worklist", "--format", "json", "--database-url", url)
    unreviewed = [row["sha256"] for row in json.loads(listed.stdout) if row["reviewed_at"] is None]
    page.select_option("select[name=reviewed]", "no")
    count = "document.querySelectorAll('#worklist tbody tr[data-sha256]').length"
    _until(page, f"() => {count} === {len(unreviewed)}", 30)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    scrolled = page.evaluate("window.scrollY")
    assert scrolled > 100, "the page is taller than the window"
    stamp = page.inner_text("nav.pager .dim")
    _until(page, f"() => document.querySelector('nav.pager .dim').innerText !== {stamp!r}", 40)  # every 20 s
    assert page.evaluate("window.scrollY") == scrolled, "the reader stays where they were"
    assert page.input_value("select[name=reviewed]") == "no"
    assert _rows(page) == unreviewed, "the filter still applies to the refreshed rows"
    context.close()


def test_a_viewer_cannot_review(browser, scored_site):
    url, base, _ = scored_site
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, base, "tech-viewer")
    sha = _rows(page)[0]
    page.goto(f"{base}/films/{sha}")
    assert page.is_visible("#viewer-note") and page.query_selector("#agree") is None
    status = page.evaluate(
        """async (sha) => {
            const token = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token'];
            const r = await fetch('/api/films/' + sha + '/review', {method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token},
                body: JSON.stringify({decision: 'agree'})});
            return r.status;
        }""",
        sha,
    )
    assert status == 403
    assert _cli_order(url)[0] == sha, "nothing was recorded"
    context.close()
