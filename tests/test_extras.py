"""Serving without TensorFlow: the engine choice and the one-line hints of a missing extra."""

import pytest

import pipeline.model_folder as model_folder
from models import default_model_dir
from pipeline import extras


def test_auto_engine_serves_litert_on_a_gpu_machine_without_tensorflow(monkeypatch):
    """The serving install on a GPU node: `auto` must not reach for the TensorFlow it does not have."""
    monkeypatch.setattr(model_folder, "_gpu_present", lambda: True)
    monkeypatch.setattr(model_folder, "tensorflow_installed", lambda: False)
    assert model_folder.resolve_engine(default_model_dir()) is model_folder.Engine.LITERT
    monkeypatch.setattr(model_folder, "tensorflow_installed", lambda: True)
    assert model_folder.resolve_engine(default_model_dir()) is model_folder.Engine.TENSORFLOW


@pytest.mark.parametrize("module", ["tensorflow", "keras", "tensorflow.python", "matplotlib.pyplot"])
def test_missing_extra_is_one_line_naming_the_extra(module):
    message = extras.missing_extra_message(ModuleNotFoundError(f"No module named '{module}'", name=module))
    assert message is not None and "\n" not in message
    assert "pip install 'cxr-triage[train]'" in message


def test_other_import_errors_get_no_hint():
    assert extras.missing_extra_message(ModuleNotFoundError("x", name="sqlalchemy")) is None
    assert extras.missing_extra_message(ValueError("tensorflow")) is None


def test_scorer_on_tensorflow_without_it_names_the_extra(monkeypatch):
    from pipeline.inference import Scorer

    monkeypatch.setattr(extras, "tensorflow_installed", lambda: False)
    with pytest.raises(extras.ExtraMissing, match=r"needs TensorFlow: pip install 'cxr-triage\[train\]'"):
        Scorer.load(default_model_dir(), engine="tensorflow")
