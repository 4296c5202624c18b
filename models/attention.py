"""Where does the ranking come from? Share of Grad-CAM mass in the central thoracic region.

A model that generalises should put its pneumonia evidence on the lung fields, not on side
markers, the neck, the arms or the image border (shortcut cues that change between sites).
This measures, over a set of films, how the Grad-CAM mass (:func:`models.explain.gradcam`)
splits between a central thoracic box and the border frame and corners of the image.

The regions are fixed fractions of the (square-resized) film, because the films are not
segmented: ``central`` is the box 15-85 % across and 10-90 % down (it holds both lung fields
on a typical frontal film), ``border`` is the outer 10 % frame, ``corners`` the four 15 %
squares. A uniform map would give each region its area share, printed beside the mass share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REGION_SIZE = 100  # heat maps are resized to this square grid before the shares are taken


def region_masks(size: int = REGION_SIZE) -> dict[str, np.ndarray]:
    """Boolean masks of the named regions on a ``size`` x ``size`` grid."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    central = (cols >= 0.15) & (cols < 0.85) & (rows >= 0.10) & (rows < 0.90)
    border = (cols < 0.10) | (cols >= 0.90) | (rows < 0.10) | (rows >= 0.90)
    corner = ((cols < 0.15) | (cols >= 0.85)) & ((rows < 0.15) | (rows >= 0.85))
    top = rows < 0.10  # neck and shoulders on a frontal film
    return {"central": central, "border": border, "corners": corner, "top_band": top}


def mass_shares(heatmap: np.ndarray, size: int = REGION_SIZE) -> dict[str, float]:
    """Share of the heat map's total mass that falls in each region (NaN for an empty map)."""
    from PIL import Image

    grid = np.asarray(
        Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize((size, size)),
        dtype=np.float64,
    )
    grid = np.clip(grid, 0.0, None)
    total = float(grid.sum())
    return {
        name: (float(grid[mask].sum()) / total if total > 0 else float("nan"))
        for name, mask in region_masks(size).items()
    }


@dataclass
class AttentionSummary:
    """Mean (and quartiles) of the mass shares over a set of films."""

    films: int
    mean: dict[str, float]
    quartiles: dict[str, tuple[float, float, float]]
    area: dict[str, float]
    central_majority: float  # fraction of films with more than half their mass in the central box

    def as_dict(self) -> dict:
        """Plain dict for JSON output."""
        return {
            "films": self.films,
            "mean_mass_share": {k: round(v, 4) for k, v in self.mean.items()},
            "quartiles": {k: [round(x, 4) for x in v] for k, v in self.quartiles.items()},
            "area_share": {k: round(v, 4) for k, v in self.area.items()},
            "films_with_central_majority": round(self.central_majority, 4),
        }


def summarise(shares: list[dict[str, float]]) -> AttentionSummary:
    """Aggregate per-film shares (films with an empty map are left out)."""
    valid = [s for s in shares if not np.isnan(s["central"])]
    names = list(region_masks(8))
    table = {name: np.array([s[name] for s in valid]) for name in names}
    area = {name: float(mask.mean()) for name, mask in region_masks().items()}
    return AttentionSummary(
        films=len(valid),
        mean={n: float(v.mean()) if len(v) else float("nan") for n, v in table.items()},
        quartiles={
            n: tuple(float(q) for q in np.percentile(v, [25, 50, 75])) if len(v) else (np.nan,) * 3
            for n, v in table.items()
        },
        area=area,
        central_majority=float((table["central"] > 0.5).mean()) if len(valid) else float("nan"),
    )


def measure(
    paths: Iterable[Path], model_dir: str | Path | None = None, member: int | None = None
) -> AttentionSummary:
    """Grad-CAM mass shares over ``paths`` (decoded through the serving path).

    ``member``: the map of one member of an ensemble only (its index), to compare a member
    with a separately trained single model; default: the ensemble's averaged map.
    """
    from models.explain import gradcam, member_gradcam
    from pipeline.decode import decode_file

    def heatmap(grey: np.ndarray) -> np.ndarray:
        return gradcam(model_dir, grey) if member is None else member_gradcam(model_dir, grey, member)

    return summarise([mass_shares(heatmap(decode_file(p).pixels)) for p in paths])


def validation_shares(
    data_dir: str | Path, model_dir: str | Path | None = None, member: int | None = None
) -> dict[str, AttentionSummary]:
    """:func:`measure` over the validation films of ``data_dir`` (the patient-wise split), by class:
    ``normal``, ``pneumonia`` and ``all`` (the figures of the model card's Grad-CAM table)."""
    from models import data

    validation = data.partition(data.list_samples(data_dir), data.read_split())[1]
    by_class = {
        "normal": [s.path for s in validation if s.pneumonia == 0],
        "pneumonia": [s.path for s in validation if s.pneumonia == 1],
    }
    summaries = {name: measure(paths, model_dir, member) for name, paths in by_class.items()}
    normal, pneumonia = summaries["normal"], summaries["pneumonia"]
    films = normal.films + pneumonia.films
    # "all" weighs each class by its films that have a map (an empty map is left out, as in summarise)
    mean = {
        region: (normal.mean[region] * normal.films + pneumonia.mean[region] * pneumonia.films) / films
        for region in normal.mean
    }
    majority = (normal.central_majority * normal.films + pneumonia.central_majority * pneumonia.films) / films
    summaries["all"] = AttentionSummary(films, mean, {}, normal.area, majority)
    return summaries


#: The lung mask is dilated by this share of the film's side before the share is taken: the
#: evidence of pneumonia lies in the lung fields and at their edges (pleura, hila, costophrenic angles).
LUNG_DILATION = 0.04


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation by a square of side 2 * pixels + 1 (separable maximum filter)."""
    out = mask.copy()
    for _ in range(2):  # rows, then columns (via the transpose)
        grown = out.copy()
        for step in range(1, pixels + 1):
            grown[step:] |= out[:-step]
            grown[:-step] |= out[step:]
        out = grown.T
    return out


def on_film_grid(cam: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """A map of the model's input placed where that input came from on the film (a ``size`` square
    grid of the whole film; zero outside the crop)."""
    from PIL import Image

    top, left, bottom, right = box
    y0, x0 = int(round(top * size)), int(round(left * size))
    y1, x1 = max(y0 + 1, int(round(bottom * size))), max(x0 + 1, int(round(right * size)))
    grid = np.zeros((size, size), np.float32)
    placed = Image.fromarray(np.asarray(cam, np.float32), mode="F").resize((x1 - x0, y1 - y0))
    grid[y0:y1, x0:x1] = np.asarray(placed, dtype=np.float32)
    return grid


def lung_share(cam_on_film: np.ndarray, lung_probability: np.ndarray) -> float:
    """Share of a heat map's mass inside the dilated lung mask (both on the same square grid)."""
    from pipeline.lungs import LUNG_PROBABILITY

    reach = int(round(LUNG_DILATION * lung_probability.shape[0]))
    lung = _dilate(lung_probability >= LUNG_PROBABILITY, reach)
    heat = np.clip(cam_on_film, 0.0, None)
    total = float(heat.sum())
    return float(heat[lung].sum()) / total if total > 0 else float("nan")


def lung_attention(scorer, greys: list[np.ndarray], lungs) -> dict:
    """Mean share of the Grad-CAM mass inside the (dilated) lung fields over ``greys``.

    ``lungs`` (:class:`pipeline.lungs.LungModel`) draws the lung mask on the whole film for every
    model alike; the model's own input (whole film or lung crop) is explained and placed on the film.
    """
    from models.explain import input_gradcam
    from pipeline.lungs import LUNG_INPUT_SIZE, crop_box

    shares = []
    for grey in greys:
        x, fields = scorer.model_input(grey)
        box = crop_box(fields) if fields is not None else (0.0, 0.0, 1.0, 1.0)
        cam = on_film_grid(input_gradcam(scorer.model_dir, x), box, LUNG_INPUT_SIZE)
        shares.append(lung_share(cam, lungs.fields(grey)[1]))
    values = np.array([v for v in shares if not np.isnan(v)])
    return {
        "films": int(values.size),
        "mean_lung_share": round(float(values.mean()), 4) if values.size else None,
        "median_lung_share": round(float(np.median(values)), 4) if values.size else None,
    }
