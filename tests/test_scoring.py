"""The same pixels give the same score, whatever the container (issue: 0.02 tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.conftest import kermany_files
from tests.dicom_factory import radiograph
from worker.prepare import prepare


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
        prepared = prepare(str(path), scorer.input_size)
        assert prepared.tensor is not None, f"{name}: {prepared.reason}"
        tensors.append(prepared.tensor)
    scores = [s.pneumonia_probability for s in scorer.score_batch(np.stack(tensors))]
    spread = max(scores) - min(scores)
    assert spread <= 0.02, dict(zip(containers, scores, strict=True))


def test_batch_and_single_scores_agree(containers, scorer):
    tensors = np.stack([prepare(str(p), scorer.input_size).tensor for p in containers.values()])
    batch = [s.pneumonia_probability for s in scorer.score_batch(tensors)]
    single = [scorer.score_batch(t[np.newaxis])[0].pneumonia_probability for t in tensors]
    np.testing.assert_allclose(batch, single, atol=1e-5)
