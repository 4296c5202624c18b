"""The ``/quality`` page in a real headless Chromium (Debian's package, driven by Playwright), served by
the real ``cxr-triage web``; it saves docs/screenshots/quality.png.

The database holds six weeks of two sites' scores (stored through db.queue as the workers store
them, the score distributions drawn as in tests/test_quality_stats.py: scoring hundreds of real
films here would take minutes; tests/test_sites_end_to_end.py scores real ones): ``ward-a`` was
calibrated on a 60 % pneumonia sample and has received only normal films this last week (drifted);
``ward-b`` keeps the mix of its sample (stable). Readers reviewed some films.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import update

from db import queue
from db.calibration import ShippedThresholds, ensure_shipped, store
from db.engine import session_scope
from db.migrate import upgrade
from db.queue import FileSeen, ScoreRecord
from db.reviews import record_review
from db.schema import Image, ImageStatus, ReviewDecision, utcnow
from db.sites import add_site
from tests.test_web_browser import CHROMIUM_ARGS, PASSWORD, SCREENSHOTS, _screenshot, browser  # noqa: F401
from tests.web_helpers import add_user, cli, web_server


def _scores(rng, n: int, pneumonia_share: float) -> tuple[np.ndarray, np.ndarray]:
    sick = rng.random(n) < pneumonia_share
    p = np.clip(np.where(sick, rng.beta(6, 2, n), rng.beta(2, 6, n)), 1e-4, 1 - 1e-4)
    return p, sick


def populate(url: str, root) -> None:
    """Two sites, six weeks of scored films, a few rejected ones and some reviews."""
    rng = np.random.default_rng(29)
    upgrade(url)
    with session_scope(url) as session:
        ensure_shipped(session, ShippedThresholds("m1", 0.2, 0.8, 1.0))
        for site in ("ward-a", "ward-b"):
            add_site(session, site, folders=[root / site])
            sample, _ = _scores(rng, 100, 0.6)
            store(
                session, name=f"{site}-local", model_version="m1", screening_threshold=0.35,
                high_confidence_threshold=0.8, source="labels", sample_size=100, positives=60,
                target_sensitivity=0.98, target_specificity=0.95, temperature=1.0, site=site,
                details={"sample_logits": [round(math.log(p / (1 - p)), 4) for p in sample]},
            )  # fmt: skip
    n = 0
    for site in ("ward-a", "ward-b"):
        for week in range(6):
            share = 0.0 if (site == "ward-a" and week == 0) else 0.6
            probabilities, sick = _scores(rng, 40, share)
            for p, truth in zip(probabilities, sick, strict=True):
                n += 1
                with session_scope(url) as session:
                    image_id, _ = queue.register(
                        session, FileSeen(str(root / site / f"{n}.png"), 10, n), f"{n:064x}"
                    )
                    age = timedelta(days=7 * week + float(rng.uniform(0.05, 6.5)))
                    session.execute(
                        update(Image).where(Image.id == image_id).values(first_seen_at=utcnow() - age)
                    )
                    if n % 23 == 0:
                        reason = "does not look like a frontal chest radiograph (out of distribution)"
                        queue.record_problem(session, image_id, ImageStatus.REJECTED, reason)
                        continue
                    logit = math.log(p / (1 - p))
                    queue.record_score(session, image_id, ScoreRecord("m1", float(p), logit, None, 0.2, 0.8))
                if n % 3 == 0:  # a reader reviews every third film: agrees unless the model was wrong
                    with session_scope(url) as session:
                        right = (p >= 0.35) == bool(truth)
                        decision = ReviewDecision.AGREE if right else ReviewDecision.DISAGREE
                        record_review(session, f"{n:064x}", "dr-reader", decision)


@pytest.fixture(scope="module")
def quality_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    url = f"sqlite:///{root / 'worklist.sqlite3'}"
    populate(url, root)
    add_user(url, "dr-reader", "reviewer", PASSWORD)
    add_user(url, "tech-viewer", "viewer", PASSWORD)
    with web_server(url, root / "web.log") as base:
        yield url, base


def _sign_in(page, base: str, username: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


def test_quality_page_shows_each_sites_verdict_and_charts(browser, quality_site):  # noqa: F811
    url, base = quality_site
    report = json.loads(cli("quality", "--format", "json", "--database-url", url).stdout)
    verdicts = {part["site"]: part["drift"]["verdict"] for part in report["sites"]}
    assert verdicts == {"default": "insufficient", "ward-a": "drifted", "ward-b": "stable"}

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    csp_errors: list[str] = []
    page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)
    _sign_in(page, base, "dr-reader")
    page.click("a[href='/quality']")
    page.wait_for_url(base + "/quality")
    for site, verdict in verdicts.items():
        section = f"#site-{site}"
        assert page.inner_text(f"{section} .verdict") == verdict
        assert page.locator(f"{section} svg.chart").count() == 2
    assert page.locator("#site-ward-a svg.chart polyline.line-screen").count() == 1
    assert page.locator("#site-ward-a svg.chart rect.bar-sample").count() == 20
    # the charts are coloured by the stylesheet (CSP: no inline style), so the line is drawn blue
    stroke = page.eval_on_selector("#site-ward-a polyline.line-screen", "e => getComputedStyle(e).stroke")
    assert stroke == "rgb(21, 101, 192)"
    weeks = page.locator("#site-ward-b table.quality tbody tr").count()
    assert weeks == len(report["sites"][2]["weeks"]) + 1 >= 6
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 1300})
    page.goto(base + "/quality?site=ward-a")
    assert page.locator("section.site-quality").count() == 1
    _screenshot(page, "quality.png")
    assert csp_errors == []
    context.close()

    viewer = browser.new_context().new_page()
    _sign_in(viewer, base, "tech-viewer")
    assert viewer.locator("a[href='/quality']").count() == 0
    response = viewer.goto(base + "/quality")
    assert response.status == 403
