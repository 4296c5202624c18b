"""The reading room (issue 27) in the real Chromium on real films from ../shared/data.

Films: Kermany films, adult films of other shapes from ``external-cxr`` (not square), a real DICOM
chest film (JPEG 2000, with a StudyInstanceUID) and two DICOM files that get no score (a CT: rejected;
a truncated file: failed), scored by the real ``cxr-triage scan``; the page is served by
``cxr-triage web`` with a PACS ``viewer_url``. Checked at 1024x768, 1400x900 and 1920x1080: one line
per row, enough rows visible, no horizontal scroll, each row names its film; the film page shows
the film at its true aspect ratio, the heat map within 1 s of the toggle, the keys review and move
on; the PACS link carries the StudyInstanceUID; a rejected film's page says why and what next.
Screenshots for docs/web.md are saved to docs/screenshots/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED, copy_into, kermany_files
from tests.test_web_browser import PASSWORD, SCREENSHOTS, _screenshot, _sign_in, _until, browser  # noqa: F401
from tests.web_helpers import add_user, cli, web_server

EXTERNAL = SHARED / "data" / "external-cxr"
VIEWER_URL = "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}"
#: (width, height, rows that must be visible without scrolling)
SCREENS = ((1024, 768, 10), (1400, 900, 15), (1920, 1080, 22))
ROWS = "#worklist tbody tr[data-sha256]"


def _external_films(count: int) -> list[Path]:
    """Films of other shapes than square (width / height far from 1), by the manifest."""
    import csv

    with open(EXTERNAL / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    odd = [r["file"] for r in rows if not 0.8 < int(r["width"]) / int(r["height"]) < 1.25]
    return [EXTERNAL / name for name in odd[:count]]


@pytest.fixture(scope="module")
def reading_site(kermany, dicom_samples, tmp_path_factory):
    if not EXTERNAL.is_dir():
        pytest.skip("needs ../shared/data/external-cxr")
    root = tmp_path_factory.mktemp("reading")
    films = kermany_files(kermany, "PNEUMONIA", 12) + kermany_files(kermany, "NORMAL", 10)
    copy_into(films, root / "drop" / "ward-3")
    copy_into(_external_films(4), root / "drop" / "emergency")
    copy_into([dicom_samples[r] for r in ("chest_j2k", "ct", "truncated")], root / "drop" / "pacs")
    url = f"sqlite:///{root / 'worklist.sqlite3'}"
    scan = cli("scan", str(root / "drop"), "--database-url", url, "--no-progress", "--decode-workers", "0")
    assert scan.returncode == 0, scan.stderr
    add_user(url, "dr-reader", "reviewer", PASSWORD)
    env = {"CXR_TRIAGE_VIEWER_URL": VIEWER_URL}
    with web_server(url, root / "web.log", env=env) as base:
        yield url, base, root


def _rows_json(url: str) -> list[dict]:
    result = cli("worklist", "--format", "json", "--database-url", url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _visible_rows(page) -> int:
    return page.eval_on_selector_all(
        ROWS, "rows => rows.filter(r => r.getBoundingClientRect().bottom <= window.innerHeight).length"
    )


@pytest.mark.parametrize(("width", "height", "wanted"), SCREENS)
def test_rows_fit_the_screen_one_line_each(browser, reading_site, width, height, wanted):  # noqa: F811
    url, base, _ = reading_site
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    _sign_in(page, base, "dr-reader")
    rows = _rows_json(url)
    assert len(rows) >= wanted
    _until(page, "() => Array.from(document.querySelectorAll('img.thumb')).every(i => i.complete)", 60)
    assert _visible_rows(page) >= wanted, f"{_visible_rows(page)} rows visible at {width}x{height}"
    overflow = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], f"horizontal overflow at {width}x{height}: {overflow}"
    heights = page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.getBoundingClientRect().height)")
    assert max(heights) <= 32, "one line per row"
    texts = page.eval_on_selector_all(ROWS, "rows => rows.map(r => [r.dataset.sha256, r.innerText])")
    names = {row["sha256"]: Path(row["path"]).name for row in rows}
    for sha, text in texts:
        assert names[sha][:12] in text, f"the row of {names[sha]} does not name its film"
    header = page.inner_text("#models")
    versions = {row["model_version"] for row in rows if row["model_version"]}
    assert all(v in header for v in versions), "the model version is in the header"
    cells = page.eval_on_selector_all(f"{ROWS} td", "cells => cells.map(c => c.innerText)")
    assert not any(v in c for c in cells for v in versions), "not in every row"
    if (width, height) in ((1400, 900), (1024, 768)):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        _screenshot(page, f"worklist-{width}x{height}.png")
    context.close()


def _film_ratio(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as image:
        return image.width / image.height


def test_film_page_true_aspect_heatmap_and_keys(browser, reading_site):  # noqa: F811
    url, base, root = reading_site
    rows = _rows_json(url)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    _sign_in(page, base, "dr-reader")
    odd = next(r for r in rows if "/emergency/" in r["path"] and r["status"] == "scored")
    page.click(f"tr[data-sha256='{odd['sha256']}'] a.open")  # from the list: N/P follow its order
    page.wait_for_url(f"{base}/films/{odd['sha256']}")
    loaded = (
        "() => document.getElementById('film').complete && document.getElementById('film').naturalWidth > 0"
    )
    _until(page, loaded, 30)
    box = page.eval_on_selector(
        "#film", "i => [i.getBoundingClientRect().width, i.getBoundingClientRect().height]"
    )
    expected = _film_ratio(Path(odd["path"]))
    assert abs(box[0] / box[1] / expected - 1) <= 0.02, (box, expected)
    assert abs(box[0] / box[1] - 1) > 0.1, "this film is not square, and is not shown square"
    _screenshot(page, "film-page.png")

    assert not page.is_visible("#heatmap")
    assert "research visualisation, not a diagnosis" in page.inner_text("label.heat")
    started = time.monotonic()
    page.keyboard.press("h")
    page.wait_for_selector("#heatmap[data-loaded='1']", state="visible", timeout=10_000)
    took = time.monotonic() - started
    assert took <= 1.0, f"the heat map took {took:.2f} s"
    _screenshot(page, "film-page-heatmap.png")
    page.keyboard.press("h")
    assert not page.is_visible("#heatmap")

    # N opens the next film of the list, P comes back; A agrees and opens the next film
    order = [r["sha256"] for r in rows]
    here = order.index(odd["sha256"])
    page.keyboard.press("n")
    page.wait_for_url(f"{base}/films/{order[here + 1]}")
    page.keyboard.press("p")
    page.wait_for_url(f"{base}/films/{odd['sha256']}")
    page.keyboard.press("a")
    page.wait_for_url(f"{base}/films/{order[here + 1]}")
    reviewed = {r["sha256"]: r for r in _rows_json(url)}[odd["sha256"]]
    assert reviewed["reviewed_by"] == "dr-reader"
    page.keyboard.press("Escape")
    page.wait_for_url(base + "/")
    context.close()


def test_pacs_link_carries_the_study_uid(browser, reading_site, dicom_samples):  # noqa: F811
    import pydicom

    url, base, _ = reading_site
    study_uid = pydicom.dcmread(dicom_samples["chest_j2k"], stop_before_pixels=True).StudyInstanceUID
    rows = _rows_json(url)
    dicom = next(r for r in rows if r["study_uid"] == study_uid)
    png = next(r for r in rows if r["source_format"] != "dicom")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    _sign_in(page, base, "dr-reader")
    link = page.get_attribute(f"tr[data-sha256='{dicom['sha256']}'] a.pacs", "href")
    assert link == VIEWER_URL.format(study_uid=study_uid)
    assert page.query_selector(f"tr[data-sha256='{png['sha256']}'] a.pacs") is None
    page.goto(f"{base}/films/{dicom['sha256']}")
    assert page.get_attribute("#viewer-link", "href") == link
    page.goto(f"{base}/films/{png['sha256']}")
    assert page.query_selector("#viewer-link") is None
    context.close()


def test_rejected_film_says_why_and_can_be_dismissed(browser, reading_site):  # noqa: F811
    url, base, _ = reading_site
    rejected = next(r for r in _rows_json(url) if r["status"] == "rejected" and "modality CT" in r["reason"])
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    page = context.new_page()
    _sign_in(page, base, "dr-reader")
    page.goto(f"{base}/films/{rejected['sha256']}")
    assert rejected["reason"] in page.inner_text("#reason")
    assert "nothing to read" in page.inner_text("#next-step")
    assert page.query_selector("img#film") is None, "no image to break"
    broken = page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => i.complete && !i.naturalWidth).length"
    )
    assert broken == 0
    page.click("#dismiss")
    page.wait_for_url(base + "/")
    after = {r["sha256"]: r for r in _rows_json(url)}[rejected["sha256"]]
    assert after["reviewed_by"] == "dr-reader"
    context.close()


def test_next_steps_and_viewer_links_without_a_browser():
    from worker.web.app import DEFAULT_NEXT_STEP, next_step, viewer_link

    assert "nothing to read" in next_step("modality CT is not a projection radiograph (CR or DX)")
    assert "resend" in next_step("corrupt DICOM header: InvalidDicomError: truncated")
    assert next_step(None) == DEFAULT_NEXT_STEP
    dicom = {"study_uid": "1.2.840.1", "source_format": "dicom"}
    assert viewer_link(VIEWER_URL, dicom) == "https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.840.1"
    assert viewer_link(VIEWER_URL, {"study_uid": None, "source_format": "png"}) is None
    assert viewer_link(None, dicom) is None
