"""Combine trained model folders into one Keras model that averages their logits.

The result is a single ``model.keras`` with the same input and the same two outputs, so
:class:`pipeline.inference.Scorer` serves it unchanged. Temperature and thresholds are refitted
on the validation split for the averaged logit.

Run: ``cxr-triage model ensemble .work/runs/a .work/runs/b --data-dir DATA --out models/shipped``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from models import data
from models.train import TrainConfig, export


def build_ensemble(model_dirs: list[Path]):
    """One Keras model averaging the ``pneumonia`` and ``viral`` logits of each member."""
    import keras
    from keras import layers

    from models.architectures import load_trained

    members, metas = zip(*(load_trained(d) for d in model_dirs), strict=True)
    sizes = {m["input_size"] for m in metas}
    if len(sizes) != 1:
        raise ValueError(f"members disagree on input size: {sorted(sizes)}")
    size = sizes.pop()
    inputs = keras.Input((size, size, 1), name="image")
    outs = []
    for i, member in enumerate(members):
        member.name = f"member{i}_{member.name}"
        outs.append(member(inputs))
    pneumonia = layers.Average(name="pneumonia")([o["pneumonia"] for o in outs])
    viral = layers.Average(name="viral")([o["viral"] for o in outs])
    model = keras.Model(inputs, {"pneumonia": pneumonia, "viral": viral}, name="ensemble")
    return model, metas


def validation_set(
    size: int,
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    lung_model: str | Path | None = None,
    suppress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, viral labels, resized grey images) of the validation split of ``data_dir``, read once for
    any number of models (:func:`logits_on`); cut to the lung box with ``lung_model`` (``suppress``:
    what lies outside the lung fields greyed out too)."""
    samples = data.list_samples(data_dir)
    x_all = data.cached_arrays(samples, size, cache_dir, lung_model=lung_model, suppress=suppress)
    val = data.read_split()
    keep = [i for i, s in enumerate(samples) if s.patient in val]
    y, v = data.labels([samples[i] for i in keep])
    return y, v, x_all[keep]


def logits_on(model, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pneumonia logits, viral logits) of ``model`` on resized grey images, standardised as served."""
    from models.augment import standardise_tf

    p_out, v_out = [], []
    for start in range(0, len(grey), 64):
        out = model(np.asarray(standardise_tf(grey[start : start + 64])), training=False)
        p_out.append(np.asarray(out["pneumonia"])[:, 0])
        v_out.append(np.asarray(out["viral"])[:, 0])
    return np.concatenate(p_out), np.concatenate(v_out)


def validation_logits(
    model,
    size: int,
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    lung_model: str | Path | None = None,
    suppress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y, viral labels, pneumonia logits, viral logits) on the validation split of ``data_dir``."""
    y, v, grey = validation_set(size, data_dir, cache_dir, lung_model, suppress)
    return y, v, *logits_on(model, grey)


def build_and_export(
    model_dirs: list[Path], out: Path, data_dir: str | Path, cache_dir: str | Path | None = None
) -> dict:
    """Average ``model_dirs`` into one model, calibrate it on the validation split, write ``out``."""
    started = time.time()
    model, metas = build_ensemble(model_dirs)
    size = metas[0]["input_size"]
    lung_model, suppress = shared_crop(model_dirs, metas)
    y, v, p, vl = validation_logits(model, size, data_dir, cache_dir, lung_model, suppress)
    arch = f"ens{len(metas)}-" + "-".join(m["architecture"] for m in metas)
    epochs = max(m["epochs"] for m in metas)
    crop = {"lung_model": lung_model, "suppress_outside": suppress}
    cfg = TrainConfig(arch=arch, size=size, epochs=epochs, seed=metas[0]["seed"], **crop)
    history = [{"member": m["version"], "training_wall_seconds": m["training_wall_seconds"]} for m in metas]
    wall = sum(m["training_wall_seconds"] for m in metas) + (time.time() - started)
    metadata = export(model, cfg, out, y, v, p, vl, history, wall)
    metadata["members"] = [
        {k: m[k] for k in ("version", "architecture", "seed", "epochs", "training_command")} for m in metas
    ]
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def shared_crop(model_dirs: list[Path], metas: list[dict]) -> tuple[str | None, bool]:
    """(the lung model all members read their crop with, whether they suppress what lies outside the
    lungs); (None, False) where they read the whole film. Members that read different inputs cannot
    be averaged."""
    crops = {json.dumps(m.get("crop"), sort_keys=True) for m in metas}
    if len(crops) > 1:
        raise ValueError("members read different inputs (whole film vs lung crop, or other lung models)")
    crop = metas[0].get("crop")
    if not crop:
        return None, False
    return str(Path(model_dirs[0]) / crop["lung_model"]), bool(crop.get("suppress", False))


def unpack(
    model_dir: Path, out_root: Path, data_dir: str | Path, cache_dir: str | Path | None = None
) -> list[Path]:
    """Write each member of a packed ensemble back as a training run folder, so that an ensemble can
    be rebuilt with one member replaced (``cxr-triage model ensemble``) without retraining the others.

    A member's weights are exactly those inside ``model_dir``; its folder gets what training writes
    (model file, metadata with its own calibration, history, validation logits), with the version
    and the training command of the member's record in the ensemble's metadata. Returns the folders.
    """
    import keras

    from models.architectures import load_trained

    model, metadata = load_trained(model_dir)
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    records = metadata.get("members") or []
    if not members or len(members) != len(records):
        raise ValueError(f"{model_dir} is not a packed ensemble with a record of each member")
    history_file = Path(model_dir) / "history.json"
    histories = json.loads(history_file.read_text()) if history_file.is_file() else {}
    size = int(metadata["input_size"])
    y, v, grey = validation_set(size, data_dir, cache_dir)
    folders = []
    for index, (member, record) in enumerate(zip(members, records, strict=True)):
        run_name = Path(record["training_command"].split("--out ")[-1].split()[0]).name
        member.name = member.name.removeprefix(f"member{index}_")  # build_ensemble adds it again
        p, vl = logits_on(member, grey)
        history = histories.get(run_name, [])
        wall = sum(epoch.get("seconds", 0.0) for epoch in history)
        cfg = TrainConfig(
            arch=record["architecture"], size=size, epochs=record["epochs"], seed=record["seed"]
        )
        folder = Path(out_root) / run_name
        exported = export(member, cfg, folder, y, v, p, vl, history, wall)
        exported.update(
            version=record["version"],
            training_command=record["training_command"],
            unpacked_from=metadata["version"],
        )
        (folder / "metadata.json").write_text(json.dumps(exported, indent=2) + "\n")
        folders.append(folder)
    return folders
