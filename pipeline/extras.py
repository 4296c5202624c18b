"""Optional parts of the install: serving needs none of them; training and the Keras model do.

``pip install cxr-triage`` serves on LiteRT. TensorFlow/Keras (training, ``model export-lite``,
evaluation against the Keras model) come with the ``train`` extra, or ``gpu`` for an NVIDIA GPU.
A command that reaches for a missing one stops with one line naming the extra to install.
"""

from __future__ import annotations

import importlib.util

TRAIN_INSTALL = "pip install 'cxr-triage[train]'"
GPU_INSTALL = "pip install 'cxr-triage[gpu]'"
#: Top-level modules that only the extras install, and what they are called in the message.
_EXTRA_MODULES = {"tensorflow": "TensorFlow", "keras": "TensorFlow", "matplotlib": "matplotlib"}


class ExtraMissing(RuntimeError):
    """A command needs an optional part that is not installed; the message says what to install."""


def tensorflow_installed() -> bool:
    """TensorFlow importable (found without importing it: importing costs seconds)."""
    return importlib.util.find_spec("tensorflow") is not None


def missing_extra_message(exc: BaseException) -> str | None:
    """The one-line install hint for an ImportError of an extra's module, else None."""
    if not isinstance(exc, ImportError):
        return None
    name = (getattr(exc, "name", None) or "").split(".")[0]
    what = _EXTRA_MODULES.get(name)
    if what is None:
        return None
    return f"this command needs {what}: {TRAIN_INSTALL} (on an NVIDIA GPU: {GPU_INSTALL})"


def require_tensorflow() -> None:
    """Raise :class:`ExtraMissing` with the install hint when TensorFlow is not installed."""
    if not tensorflow_installed():
        raise ExtraMissing(missing_extra_message(ModuleNotFoundError(name="tensorflow")))
