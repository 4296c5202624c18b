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


def test_a_command_that_needs_tensorflow_says_which_extra_in_one_line(tmp_path):
    """`model export-lite` where TensorFlow cannot be imported: one line naming the extra, no traceback."""
    import os
    import shutil
    import subprocess

    from tests.conftest import CLI, REPO

    blocker = tmp_path / "blocked" / "tensorflow"
    blocker.mkdir(parents=True)  # a tensorflow that fails to import, as where it is not installed
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError('no tensorflow', name='tensorflow')\n")
    model = shutil.copytree(default_model_dir(), tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    done = subprocess.run(
        [CLI, "model", "export-lite", "--model-dir", str(model)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "cxr-triage: error: this command needs TensorFlow: pip install 'cxr-triage[train]' "
        "(on an NVIDIA GPU: pip install 'cxr-triage[gpu]')"
    ], done.stderr
