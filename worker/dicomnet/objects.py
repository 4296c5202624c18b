"""Build the DICOM objects that carry a triage result back to the study, with highdicom.

* Structured Report: TID 1500 Measurement Report (PS3.16 TID 1500, TID 1501 measurement group) in a
  Comprehensive SR (PS3.3 A.35.3), new series, same study as the film (Patient and General Study
  modules copied from the source by highdicom). The group references the source instance
  (TID 1501 "Source image for measurement group"), holds the pneumonia probability and both
  thresholds as numeric measurements (TID 300), the triage tier as a qualitative evaluation, the
  viral share when the model gives it, and the model as the algorithm identification (TID 4019).
  The observer is a device (TID 1004): cxr-triage and its version.
* Secondary Capture (PS3.3 A.8.1): the Grad-CAM overlay with a burned-in research label.
* Key Object Selection (PS3.3 A.35.4): "Of Interest" (DCM 113000) pointing at HIGH films.

Real films are sparse: Patient and General Study type 2 attributes (PS3.3 C.7.1.1, C.7.2.1) may be
absent, and PS3.5 7.4 lets type 2 be present with no value, so they are filled empty on a copy of the
source header before highdicom copies them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from db.schema import OutboxKind
from models import explain

#: highdicom logs UIDs of the datasets it copies from at INFO, and highdicom and pydicom quote header
#: values (patient names, UIDs) in their warnings: identifiers stay out of our logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")

MANUFACTURER = "cxr-triage"
#: Local coding scheme for concepts no standard code covers (PS3.3 8.1: a "99" prefix is private).
SCHEME = "99CXRTRIAGE"
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
PNEUMONIA_PROBABILITY = hd.sr.CodedConcept("PNEUMONIA-P", SCHEME, "Pneumonia probability")
VIRAL_PROBABILITY = hd.sr.CodedConcept("VIRAL-P", SCHEME, "Viral probability given pneumonia")
SCREENING_THRESHOLD = hd.sr.CodedConcept("SCREEN-T", SCHEME, "Screening threshold")
HIGH_THRESHOLD = hd.sr.CodedConcept("HIGH-T", SCHEME, "High-confidence threshold")
TRIAGE_CATEGORY = hd.sr.CodedConcept("TRIAGE", SCHEME, "Triage category")
#: The scope state (is the film inside the population the model was validated on?) and its reasons.
SCOPE = hd.sr.CodedConcept("SCOPE", SCHEME, "Validated population")
SCOPE_STATES = {
    False: hd.sr.CodedConcept("IN-SCOPE", SCHEME, "Within the validated population"),
    True: hd.sr.CodedConcept("OUT-OF-SCOPE", SCHEME, "OUT OF SCOPE: outside the validated population"),
}
SCOPE_REASON = hd.sr.CodedConcept("SCOPE-REASON", SCHEME, "Out-of-scope reason")
CALIBRATION = hd.sr.CodedConcept("CALIBRATION", SCHEME, "Calibration in force")
MODEL_VERSION = hd.sr.CodedConcept("MODEL-VERSION", SCHEME, "Model version")
INTENDED_USE = hd.sr.CodedConcept("INTENDED-USE", SCHEME, "Intended use")
INTENDED_USE_TEXT = (
    "Triage aid that orders the reading worklist; not a diagnosis. A radiologist reads every film. "
    "Research software. Validated on {population}."
)
TIERS = {
    "HIGH": hd.sr.CodedConcept("HIGH", SCHEME, "High confidence pneumonia"),
    "SCREEN": hd.sr.CodedConcept("SCREEN", SCHEME, "Screening positive"),
    "BELOW": hd.sr.CodedConcept("BELOW", SCHEME, "Below screening threshold"),
}
RESEARCH_LABEL = "research visualisation, not for diagnostic use"
#: Series numbers of the returned objects (a PACS sorts series by number; ours go after the films).
SERIES_NUMBER = {
    OutboxKind.STRUCTURED_REPORT: 9901,
    OutboxKind.SECONDARY_CAPTURE: 9902,
    OutboxKind.KEY_OBJECT: 9903,
}

# Type 2 attributes (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.3.1 General Series,
# C.7.5.1 General Equipment): present, possibly empty. highdicom copies them from the source.
_TYPE2 = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
    "StudyID": "SH",
    "AccessionNumber": "SH",
}


class SourceProblem(ValueError):
    """The source header cannot carry a result back (no study, no SOP instance)."""


@dataclass(frozen=True)
class Result:
    """The stored score of one film, as sent."""

    pneumonia_probability: float
    viral_probability: float | None
    screening_threshold: float
    high_confidence_threshold: float
    model_name: str
    model_version: str
    #: Name of the calibration whose thresholds (and temperature) gave this result ("shipped": the model's).
    calibration: str = "shipped"
    out_of_scope: bool = False
    scope_reasons: tuple[str, ...] = ()
    #: The population the model was validated on, in words (``ScopePolicy.describe``).
    validated_population: str = "frontal chest radiographs of patients aged 1 to 5 years"

    @property
    def intended_use(self) -> str:
        return INTENDED_USE_TEXT.format(population=self.validated_population)

    @property
    def tier(self) -> str:
        if self.pneumonia_probability >= self.high_confidence_threshold:
            return "HIGH"
        return "SCREEN" if self.pneumonia_probability >= self.screening_threshold else "BELOW"


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-triage")
    except PackageNotFoundError:
        return "0+unknown"


def usable_source(header: Dataset) -> Dataset:
    """A copy of ``header`` with empty type 2 values where they are missing; raises if unusable."""
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(header.get(keyword, "") or ""):
            raise SourceProblem(f"the source has no {keyword}: no study to return a result to")
    source = copy.deepcopy(header)
    _drop_invalid_values(source)
    for keyword, vr in _TYPE2.items():
        if keyword not in source:
            source.add_new(keyword, vr, None)
    if "SeriesInstanceUID" not in source:  # type 1 in the source; needed for the evidence sequence
        source.SeriesInstanceUID = generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "series"])
    if "Modality" not in source:
        source.Modality = "OT"
    source.pop("PixelData", None)
    return source


def _drop_invalid_values(source: Dataset) -> None:
    """Values the source got wrong for their VR (PS3.5 6.2; e.g. PatientAge "62" for AS "062Y") are not
    copied into our objects: type 2 ones become empty, others are left out (guessing would be worse)."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    for element in list(source):
        if element.VR == "SQ" or element.tag.group not in (0x0008, 0x0010, 0x0020) or element.value is None:
            continue
        try:
            validate_value(element.VR, element.value, config.RAISE)
        except (ValueError, TypeError):
            if element.keyword in _TYPE2:
                element.value = None
            else:
                del source[element.tag]


def series_uid_for(sop_instance_uid: str) -> str:
    """Derived from the object's own UID: a resend after a crash lands in the same series."""
    return generate_uid(entropy_srcs=[sop_instance_uid, "cxr-triage series"])


def _device_context() -> hd.sr.ObserverContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["cxr-triage device"]),
        name=f"cxr-triage {software_version()}",
        manufacturer_name=MANUFACTURER,
        model_name="cxr-triage",
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)


def _instance(kind: OutboxKind, sop_instance_uid: str) -> dict:
    """What every object this module makes says about its own series and instance."""
    return {
        "series_instance_uid": series_uid_for(sop_instance_uid),
        "series_number": SERIES_NUMBER[kind],
        "sop_instance_uid": sop_instance_uid,
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
    }


def _observer() -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=_device_context())


def _measurement(name: hd.sr.CodedConcept, value: float, algorithm) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)


class TextEvaluation(hd.sr.QualitativeEvaluation):
    """A qualitative evaluation whose value is text (PS3.16 TID 1501 allows TEXT as well as CODE
    evaluations): the scope reasons, the calibration and the intended use, as a viewer shows them."""

    def __init__(self, name: hd.sr.CodedConcept, text: str) -> None:  # noqa: D107
        from highdicom.sr.templates import Template

        item = hd.sr.TextContentItem(
            name=name, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        Template.__init__(self, [item])  # skips QualitativeEvaluation's CODE item on purpose


def _qualifiers(result: Result) -> list[hd.sr.QualitativeEvaluation]:
    """Tier, scope state and reasons, model version, calibration and intended use, in that order."""
    thresholds = (
        f"{result.calibration} (screening threshold {result.screening_threshold:.4f}, "
        f"high-confidence threshold {result.high_confidence_threshold:.4f})"
    )
    return [
        hd.sr.QualitativeEvaluation(TRIAGE_CATEGORY, TIERS[result.tier]),
        hd.sr.QualitativeEvaluation(SCOPE, SCOPE_STATES[result.out_of_scope]),
        *(TextEvaluation(SCOPE_REASON, reason) for reason in result.scope_reasons if result.out_of_scope),
        TextEvaluation(MODEL_VERSION, f"{result.model_name} {result.model_version}"),
        TextEvaluation(CALIBRATION, thresholds),
        TextEvaluation(INTENDED_USE, result.intended_use),
    ]


def series_description(base: str, result: Result | None) -> str:
    """What a PACS lists for the series (LO, 64 characters): an out-of-scope result says so first."""
    text = f"OUT OF SCOPE - {base}" if result is not None and result.out_of_scope else base
    return text[:64]


def structured_report(header: Dataset, result: Result, sop_instance_uid: str) -> hd.sr.ComprehensiveSR:
    """The TID 1500 report for one film; ``sop_instance_uid`` is kept in the outbox for resends."""
    source = usable_source(header)
    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    measurements = [
        _measurement(PNEUMONIA_PROBABILITY, result.pneumonia_probability, algorithm),
        _measurement(SCREENING_THRESHOLD, result.screening_threshold, algorithm),
        _measurement(HIGH_THRESHOLD, result.high_confidence_threshold, algorithm),
    ]
    if result.viral_probability is not None:
        measurements.append(_measurement(VIRAL_PROBABILITY, result.viral_probability, algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_instance_uid, "tracking"]), identifier="pneumonia triage"
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements,
        qualitative_evaluations=_qualifiers(result),
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observer(),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        **_instance(OutboxKind.STRUCTURED_REPORT, sop_instance_uid),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description("cxr-triage pneumonia triage (research)", result),
    )
    sr.SoftwareVersions = software_version()
    return sr


def key_object(header: Dataset, result: Result, sop_instance_uid: str) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS flagging the film "Of Interest" (PS3.16 CID 7010), for HIGH films."""
    source = usable_source(header)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=[source],
        observer_device_context=_device_context(),
        description=(
            f"cxr-triage: high-confidence pneumonia ({result.pneumonia_probability:.3f}); "
            + ("OUT OF SCOPE (" + "; ".join(result.scope_reasons) + "); " if result.out_of_scope else "")
            + "triage aid, not a diagnosis; research"
        )[:1024],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[source],
        content=content,
        **_instance(OutboxKind.KEY_OBJECT, sop_instance_uid),
    )


def secondary_capture(
    header: Dataset, overlay_rgb: np.ndarray, sop_instance_uid: str, result: Result | None = None
) -> hd.sc.SCImage:
    """The Grad-CAM overlay (RGB, uint8) as a Secondary Capture with the research label burned in."""
    source = usable_source(header)
    pixels = burn_label(overlay_rgb, RESEARCH_LABEL)
    orientation = _orientation(header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        **_instance(OutboxKind.SECONDARY_CAPTURE, sop_instance_uid),
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation is None:  # unknown: PatientOrientation is type 2C, empty rather than guessed
        sc.PatientOrientation = None
    if "Laterality" not in sc:  # PS3.3 C.7.3.1 type 2C: a chest is not paired, but say so (empty)
        sc.Laterality = header.get("Laterality") or None
    sc.BurnedInAnnotation = "YES"  # PS3.3 C.7.6.3: the label is in the pixels
    sc.ImageComments = RESEARCH_LABEL
    sc.SeriesDescription = series_description("cxr-triage Grad-CAM, research only, not diagnostic", result)
    return sc


def _orientation(header: Dataset) -> tuple[str, str] | None:
    values = list(header.get("PatientOrientation") or [])
    allowed = {"A", "P", "L", "R", "H", "F"}
    if len(values) == 2 and all(v and set(str(v)) <= allowed for v in values):
        return str(values[0]), str(values[1])
    return None


def burn_label(rgb: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` on a black band at the top of the image, large enough to read."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    text = text.upper()
    size = max(image.width // 30, 8)
    font = ImageFont.load_default(size=size)
    while size > 8 and font.getlength(text) > image.width - size:
        size -= 1
        font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    band = int(size * 1.6)
    draw.rectangle([0, 0, image.width, band], fill=(0, 0, 0))
    draw.text((size // 2, size // 4), text.upper(), fill=(255, 255, 0), font=font)
    return np.asarray(image)


overlay_rgb = explain.overlay_rgb  # the one blend of film and heat map (also `cxr-triage explain`)
