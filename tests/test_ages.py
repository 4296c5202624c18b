"""Issue 25 item 3: the patient's age, in every form headers write it (PS3.5 6.2 AS, bare numbers, dates)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pipeline.dicom import decode_dicom, read_attributes
from pipeline.scope import ScopePolicy
from tests.dicom_factory import radiograph


def header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("age", "years"),
    [
        ("081Y", 81.0),  # PS3.5 6.2: nnnY
        ("003Y", 3.0),
        ("018M", 1.5),  # months
        ("052W", 52 * 7 / 365.25),  # weeks
        ("200D", 200 / 365.25),  # days
        ("81", 81.0),  # no unit letter (converted data sets): years
        ("62", 62.0),
        ("4", 4.0),
        (" 3y ", 3.0),  # lower case and padding, leniently
    ],
)
def test_patient_age_forms(age, years):
    assert read_attributes(header(PatientAge=age)).patient_age_years == pytest.approx(years)


@pytest.mark.parametrize("age", ["", "Y", "abc", "1234Y", "3.5Y", "-3Y"])
def test_patient_age_that_is_not_an_age_is_not_recorded(age):
    assert read_attributes(header(PatientAge=age)).patient_age_years is None


@pytest.mark.parametrize(
    ("dates", "years"),
    [
        ({"PatientBirthDate": "20210314", "StudyDate": "20240314"}, 3.0),  # a birthday: exactly 3
        ({"PatientBirthDate": "20210314", "StudyDate": "20240313"}, 2 + 365 / 365.25),  # the day before
        ({"PatientBirthDate": "19450101", "AcquisitionDate": "20260101"}, 81.0),  # no StudyDate
        ({"PatientBirthDate": "20200229", "StudyDate": "20230301"}, 3.0),  # born on 29 February
    ],
)
def test_patient_age_derived_from_birth_date_and_the_day_of_the_film(dates, years):
    assert read_attributes(header(**dates)).patient_age_years == pytest.approx(years)


def test_patient_age_tag_wins_over_dates_and_bad_dates_give_no_age():
    both = header(PatientAge="004Y", PatientBirthDate="19450101", StudyDate="20260101")
    assert read_attributes(both).patient_age_years == 4.0
    assert read_attributes(header(PatientBirthDate="19450101")).patient_age_years is None  # no film date
    later = header(PatientBirthDate="20300101", StudyDate="20260101")  # born after the film
    assert read_attributes(later).patient_age_years is None


def test_adult_film_with_a_bare_number_is_out_of_scope_for_its_age(tmp_path):
    """The reproduction: PatientAge "81" was reported as "patient age not recorded"."""
    stored = (np.indices((256, 256)).sum(axis=0) % 4096).astype(np.uint16)
    path = radiograph(stored, tmp_path / "adult.dcm", age="81", view="PA")
    _, attrs = decode_dicom(path)
    reasons = ScopePolicy().out_of_scope_reasons(attrs)
    assert reasons == ["patient age 81.0 years is outside the validated 1-5 years"]
