"""The same pixels give the same score, whatever the container (issue: 0.02 tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.conftest import kermany_files
from tests.dicom_factory import radiograph
from worker.scoring.prepare import prepare


@pytest.fixture(scope="module")
def containers(tmp_path_factory, kermany) -> dict:
    folder = tmp_path_factory.mktemp("containers")
    source = kermany_files(kermany, "PNEUMONIA", 1)[0]
    film = np.asarray(Image.open(source).convert("L"))
    stored12 = film.astype(np.uint16) * 16
    files = {
        "jpeg": source,
        "png8": folder / "film8.png",
        "png16": folder / "film16.png",
        "dicom12-mono2": radiograph(stored12, folder / "mono2.dcm"),
        "dicom-mono1": radiograph(4095 - stored12, folder / "mono1.dcm", photometric="MONOCHROME1"),
        "dicom-j2k": radiograph(stored12, folder / "j2k.dcm", syntax=JPEG2000Lossless),
        "dicom-rle-rescale": radiograph(
            stored12, folder / "rle.dcm", syntax=RLELossless, slope=0.25, intercept=-1024.0
        ),
    }
    Image.fromarray(film).save(files["png8"])
    Image.fromarray(film.astype(np.uint16) * 257).save(files["png16"])
    return files


def test_same_pixels_same_score(containers, scorer):
    tensors = []
    for name, path in containers.items():
        prepared = prepare(str(path), scorer.input_plan)
        assert prepared.tensor is not None, f"{name}: {prepared.reason}"
        tensors.append(prepared.tensor)
    scores = [s.pneumonia_probability for s in scorer.score_batch(np.stack(tensors))]
    spread = max(scores) - min(scores)
    assert spread <= 0.02, dict(zip(containers, scores, strict=True))


def test_batch_and_single_scores_agree(containers, scorer):
    tensors = np.stack([prepare(str(p), scorer.input_plan).tensor for p in containers.values()])
    batch = [s.pneumonia_probability for s in scorer.score_batch(tensors)]
    single = [scorer.score_batch(t[np.newaxis])[0].pneumonia_probability for t in tensors]
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_scan_scores_equal_evaluate_scores(kermany, scorer, model_dir, tmp_path):
    """No train/serve skew: `cxr-triage scan` stores what `model evaluate` computes for the same file."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.migrate import upgrade
    from db.schema import Image, Score, SourceFile
    from worker.queue.embedded import scan_embedded
    from worker.settings import Settings

    files = kermany_files(kermany, "NORMAL", 3) + kermany_files(kermany, "PNEUMONIA", 5)
    url = f"sqlite:///{tmp_path / 'skew.sqlite3'}"
    upgrade(url)
    settings = Settings(database_url=url, model_dir=model_dir, batch_size=4, decode_workers=2)
    summary = scan_embedded(settings, [str(p) for p in files])
    assert summary.outcomes["scored"] == len(files)
    with session_scope(url) as session:
        stored = dict(
            session.execute(
                select(SourceFile.path, Score.pneumonia_probability)
                .join(Image, SourceFile.image_id == Image.id)
                .join(Score, Score.image_id == Image.id)
            ).all()
        )
    evaluated = scorer.score_files(files, batch_size=32)  # the path models.evaluate takes
    for path, score in zip(files, evaluated, strict=True):
        assert abs(stored[str(path)] - score.pneumonia_probability) < 1e-5
