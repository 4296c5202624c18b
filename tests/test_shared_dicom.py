"""Every real DICOM file in ../shared/data/dicom gets the outcome a screening worker should give it.

The files that are pydicom's own test files (installed with pydicom) run in the default set from
any clone; the rest of the corpus is the extended set (``-m extended``, needs ../shared).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.decode import decode_file
from pipeline.errors import ImageProblem
from tests.conftest import DICOM_DIR, pydicom_test_file

#: (status, fragment of the reason). "ok" = decoded into a grey image ready for scoring.
EXPECTED = {
    "edge-cases__dcmfx-other/SC_ybr_full_422_uncompressed.deflated_image_frame_compression.dcm": (
        "rejected",
        "modality",
    ),
    "edge-cases__dcmfx-other/examples_jpeg_2000.monochrome_2bpp.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/jpeg_lossless_with_inverse_presentation_lut_shape.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/jpeg_lossless_with_presentation_lut.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/liver_nonbyte_aligned_cropped.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/monochrome_jpeg_xl.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/monochrome_jpeg_xl_12bit.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/name with space.dcm": ("rejected", "modality"),
    "edge-cases__dcmfx-other/uppercase_extension.DCM": ("rejected", "modality"),
    "edge-cases__dcmfx-other/view0010_anon.dcm": ("rejected", "modality"),
    "edge-cases__misc/CTImageStorage_bad_meta.dcm": ("rejected", "modality"),
    "edge-cases__misc/JPEG-LS_Lossy.dcm": ("rejected", "modality"),
    "edge-cases__misc/RTImageStorage.dcm": ("rejected", "modality"),
    "edge-cases__misc/SCImageStorage_Deflated.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/JPEG-LL.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/JPGLosslessP14SV1_1s_1f_8b.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/MR-SIEMENS-DICOM-WithOverlays.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/MR2_J2KI.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/OBXXXX1A_rle_2frame.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/OT-PAL-8-face.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/SC_rgb_32bit_2frame.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/US1_J2KI.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/bad_sequence.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/eCT_Supplemental.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/emri_small.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/emri_small_RLE.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/emri_small_big_endian.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/emri_small_jpeg_2k_lossless.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/emri_small_jpeg_2k_lossless_too_short.dcm": (
        "failed",
        "no DICOM data elements",
    ),
    "edge-cases__pydicom-data-pypi/emri_small_jpeg_ls_lossless.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/explicit_VR-UN.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/gdcm-US-ALOKA-16.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/mlut_18.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-data-pypi/vlut_04.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/693_J2KI.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/CT_small.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/ExplVR_BigEndNoMeta.dcm": ("rejected", "no pixel data"),
    "edge-cases__pydicom-testfiles/J2K_pixelrep_mismatch.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/JPEG-lossy.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/JPEG2000.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/JPEGLSNearLossless_16.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/JPGExtended.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small_RLE.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small_bigendian.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small_implicit.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small_jp2klossless.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_small_jpeg_ls_lossless.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/MR_truncated.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/SC_rgb_jpeg_dcmtk.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/SC_rgb_rle_2frame.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/badVR.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/chrJapMulti.dcm": ("rejected", "no pixel data"),
    "edge-cases__pydicom-testfiles/dicomdirtests_CR1_6154": ("rejected", "body part"),
    "edge-cases__pydicom-testfiles/dicomdirtests_CR2_6247": ("rejected", "body part"),
    "edge-cases__pydicom-testfiles/examples_overlay.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/examples_palette.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/examples_ybr_color.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/image_dfl.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/liver_1frame.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/meta_missing_tsyntax.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/no_meta.dcm": ("rejected", "not a DICOM"),
    "edge-cases__pydicom-testfiles/rtdose.dcm": ("rejected", "modality"),
    "edge-cases__pydicom-testfiles/rtplan.dcm": ("rejected", "no pixel data"),
    "edge-cases__pydicom-testfiles/test-SR.dcm": ("rejected", "no pixel data"),
    "edge-cases__pydicom-testfiles/waveform_ecg.dcm": ("rejected", "no pixel data"),
    "fo-dicom-testdata__dcmfx/CR-MONO1-10-chest.dcm": ("ok", ""),
    "fo-dicom-testdata__dcmfx/CR-ModalitySequenceLUT.dcm": ("ok", ""),
    "fo-dicom-testdata__dcmfx/HasFragmentSequence.dcm": ("rejected", "modality"),
    "fo-dicom-testdata__dcmfx/OutOfBoundsOverlay.dcm": ("rejected", "modality"),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KI.dcm": ("ok", ""),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KR.dcm": ("ok", ""),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_UNCI.dcm": ("ok", ""),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_UNCR.dcm": ("ok", ""),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG3_J2KI.dcm": ("rejected", "body part"),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG3_J2KR.dcm": ("rejected", "body part"),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG3_UNCI.dcm": ("rejected", "body part"),
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG3_UNCR.dcm": ("rejected", "body part"),
    "nih-cxr14-google-dicom__nhsx-covid-chest-imaging-database/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm": (
        "ok",
        "",
    ),
    "nih-cxr14-google-dicom__nhsx-covid-chest-imaging-database/sample.dcm": ("rejected", "modality"),
    "siim-acr-pneumothorax__mlmed-torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm": (
        "ok",
        "",
    ),
    "siim-acr-pneumothorax__mlmed-torchxrayvision/Fake_MONOHR1.dcm": ("ok", ""),
    "veterinary-dx__highdicom/dx_image.dcm": ("rejected", "too small"),
}


@pytest.mark.extended
def test_inventory_is_covered(dicom_dir):
    on_disk = {
        str(p.relative_to(dicom_dir))
        for p in dicom_dir.rglob("*")
        if p.is_file() and p.suffix not in (".tsv", ".csv", ".md")
    }
    assert on_disk == set(EXPECTED), "shared DICOM folder changed: review the expectation table"


def _case(relative: str):
    """A corpus file also shipped inside pydicom runs everywhere; the others need ../shared."""
    return pytest.param(relative, marks=() if pydicom_test_file(relative) else pytest.mark.extended)


@pytest.mark.extended
def test_pydicom_copies_are_the_shared_files():
    """The default set's DICOM outcomes hold for the shared corpus because the bytes are the same."""
    copies = {r: pydicom_test_file(r) for r in EXPECTED if pydicom_test_file(r)}
    assert len(copies) == 32
    assert [r for r, copy in copies.items() if copy.read_bytes() != (DICOM_DIR / r).read_bytes()] == []


@pytest.mark.parametrize("relative", [_case(r) for r in sorted(EXPECTED)])
def test_outcome(dicom_dir, relative):
    status, fragment = EXPECTED[relative]
    path = dicom_dir / relative
    if status == "ok":
        decoded = decode_file(path)
        assert decoded.pixels.ndim == 2 and decoded.pixels.dtype == np.float32
        assert 0.0 <= decoded.pixels.min() < decoded.pixels.max() <= 1.0
        assert decoded.dicom is not None
        return
    with pytest.raises(ImageProblem) as problem:
        decode_file(path)
    assert problem.value.status == status
    assert fragment in problem.value.reason


@pytest.mark.extended
def test_monochrome1_is_inverted(dicom_dir):
    """Fake_MONOHR1 has the same stored pixels as its MONOCHROME2 twin, so display grey is inverted."""
    folder = dicom_dir / "siim-acr-pneumothorax__mlmed-torchxrayvision"
    normal = decode_file(next(p for p in folder.iterdir() if p.name.startswith("1.2.276"))).pixels
    inverted = decode_file(folder / "Fake_MONOHR1.dcm").pixels
    np.testing.assert_allclose(normal, 1.0 - inverted, atol=1e-6)


@pytest.mark.extended
def test_compressed_and_uncompressed_decode_alike(dicom_dir):
    """The NEMA RG1 chest film: lossless JPEG 2000 equals the uncompressed original after the LUTs."""
    folder = dicom_dir / "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi"
    reference = decode_file(folder / "RG1_UNCR.dcm").pixels
    lossless = decode_file(folder / "RG1_J2KR.dcm").pixels
    np.testing.assert_allclose(reference, lossless, atol=1e-6)


@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_reduced_decoding_keeps_scores(dicom_dir, scorer):
    """Issue 13: on every scored real DICOM file, reduced decoding scores within 0.01 of full decoding."""
    side = scorer.input_plan.decode_side
    paths = [dicom_dir / relative for relative, (status, _) in sorted(EXPECTED.items()) if status == "ok"]
    full = np.stack([scorer.model_input(decode_file(p).pixels)[0] for p in paths])
    reduced = np.stack([scorer.model_input(decode_file(p, min_side=side).pixels)[0] for p in paths])
    p_full = [s.pneumonia_probability for s in scorer.score_batch(full)]
    p_reduced = [s.pneumonia_probability for s in scorer.score_batch(reduced)]
    gaps = {p.name: round(abs(a - b), 4) for p, a, b in zip(paths, p_full, p_reduced, strict=True)}
    assert max(gaps.values()) <= 0.01, gaps


@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_odd_sized_jpeg2000_reduces_without_error(dicom_dir):
    """RG1 is 1841 x 1955: Pillow's and OpenJPEG's rounding of reduced sizes differ (see raster)."""
    folder = dicom_dir / "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi"
    for name in ("RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        reduced = decode_file(folder / name, min_side=128).pixels
        assert reduced.shape == (978, 921), name  # ceil(1955 / 2), ceil(1841 / 2): level 1
