"""Small server-side SVG charts for the quality page: no script, no CDN, no inline style (the page's
Content-Security-Policy stays ``style-src 'self'``; colours are presentation attributes and classes
from ``static/app.css``). Every text is escaped; the inputs are numbers and short labels.
"""

from __future__ import annotations

import math
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 420, 200
LEFT, RIGHT, TOP, BOTTOM = 42, 28, 14, 34


def _scale(highest: float) -> tuple[float, int]:
    """A round top of the y axis for shares up to ``highest`` and its number of ticks (10 % or 20 % apart)."""
    step = 0.1 if highest <= 0.4 else 0.2
    ticks = max(1, math.ceil(round(highest / step, 6)))
    return min(1.0, ticks * step), ticks if ticks * step <= 1.0 else round(1.0 / step)


def _text(x: float, y: float, label: str, css: str = "tick", anchor: str = "start") -> str:
    return f'<text class="{css}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(label)}</text>'


def _bar(css: str, x: float, y: float, width: float, base: float) -> str:
    return (
        f'<rect class="{css}" x="{x + 1:.1f}" y="{y:.1f}" width="{width - 2:.1f}" height="{base - y:.1f}"/>'
    )


def _frame(title: str, y_max: float, y_ticks: int, y_format: str = "{:.0%}") -> list[str]:
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(y_ticks + 1):
        value = y_max * i / y_ticks
        y = TOP + inner_h - inner_h * i / y_ticks
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + inner_w}" y2="{y:.1f}"/>')
        parts.append(_text(LEFT - 4, y + 3, y_format.format(value), anchor="end"))
    return parts


def _y(value: float, y_max: float) -> float:
    inner_h = HEIGHT - TOP - BOTTOM
    return TOP + inner_h - inner_h * min(value, y_max) / y_max


def weekly_flagged(weeks: list[dict], title: str) -> Markup:
    """The share of scored films flagged screen+ (with its Wilson band) and HIGH, week by week."""
    points = [w for w in weeks if w["flagged_screen"]["estimate"] is not None]
    y_max, ticks = _scale(max([0.2] + [w["flagged_screen"]["high"] for w in points]))
    parts = _frame(title, y_max, ticks)
    inner_w = WIDTH - LEFT - RIGHT
    if not points:
        parts.append(_text(WIDTH / 2, HEIGHT / 2, "no scored films", "empty", "middle"))
        return Markup("".join(parts) + "</svg>")
    step = inner_w / max(len(points) - 1, 1)
    xs = [LEFT + (step * i if len(points) > 1 else inner_w / 2) for i in range(len(points))]
    band = [(x, _y(w["flagged_screen"]["high"], y_max)) for x, w in zip(xs, points, strict=True)]
    band += [
        (x, _y(w["flagged_screen"]["low"], y_max)) for x, w in reversed(list(zip(xs, points, strict=True)))
    ]
    parts.append('<polygon class="band" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in band) + '"/>')
    for key, css in (("flagged_screen", "line-screen"), ("flagged_high", "line-high")):
        line = " ".join(
            f"{x:.1f},{_y(w[key]['estimate'] or 0.0, y_max):.1f}" for x, w in zip(xs, points, strict=True)
        )
        parts.append(f'<polyline class="{css}" points="{line}"/>')
        for x, w in zip(xs, points, strict=True):
            y = _y(w[key]["estimate"] or 0.0, y_max)
            parts.append(f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>')
    every = max(1, len(points) // 6)
    for i, (x, w) in enumerate(zip(xs, points, strict=True)):
        if i % every == 0 or i == len(points) - 1:
            parts.append(_text(x, HEIGHT - BOTTOM + 14, w["week"], anchor="middle"))
    parts.append(
        f'<text class="legend line-screen-text" x="{LEFT}" y="{HEIGHT - 4}">— screen+ (95 % band)</text>'
        f'<text class="legend line-high-text" x="{LEFT + 170}" y="{HEIGHT - 4}">— HIGH</text>'
    )
    return Markup("".join(parts) + "</svg>")


def score_histogram(
    recent: list[float], sample: list[float], thresholds: tuple[float, float] | None, title: str
) -> Markup:
    """The last days' score distribution (bars) against the calibration sample's (outlined bars),
    with the site's two thresholds."""
    bins = len(recent)
    y_max, ticks = _scale(max([0.2] + list(recent) + list(sample)))
    parts = _frame(title, y_max, ticks)
    inner_w = WIDTH - LEFT - RIGHT
    width = inner_w / bins
    base = _y(0.0, y_max)
    for i, share in enumerate(recent):
        x, y = LEFT + i * width, _y(share, y_max)
        parts.append(_bar("bar-recent", x, y, width, base))
    for i, share in enumerate(sample):
        x, y = LEFT + i * width, _y(share, y_max)
        parts.append(_bar("bar-sample", x, y, width, base))
    for i in range(0, 11, 2):
        x = LEFT + inner_w * i / 10
        parts.append(_text(x, HEIGHT - BOTTOM + 14, f"{i / 10:.1f}", anchor="middle"))
    if thresholds:
        for value, css in zip(thresholds, ("thr-screen", "thr-high"), strict=True):
            x = LEFT + inner_w * value
            parts.append(f'<line class="{css}" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{base:.1f}"/>')
    parts.append(
        f'<text class="legend" x="{LEFT}" y="{HEIGHT - 4}">filled: last 7 days; outline: calibration sample; '
        "lines: thresholds</text>"
    )
    return Markup("".join(parts) + "</svg>")
