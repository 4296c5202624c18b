"""Combine trained model folders into one Keras model that averages their logits.

The result is a single ``model.keras`` with the same input and the same two outputs, so
:class:`pipeline.inference.Scorer` serves it unchanged. Temperature and thresholds are refitted
on the validation split for the averaged logit.

Run: ``python -m models.ensemble .work/runs/a .work/runs/b --out models/shipped``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models import data
from models.train import MODEL_FILE, TrainConfig, export


def _load(model_dir: Path):
    import keras

    import models.architectures  # noqa: F401  registers custom layers

    metadata = json.loads((model_dir / "metadata.json").read_text())
    model = keras.models.load_model(model_dir / metadata.get("model_file", MODEL_FILE), compile=False)
    return model, metadata


def build_ensemble(model_dirs: list[Path]):
    """One Keras model averaging the ``pneumonia`` and ``viral`` logits of each member."""
    import keras
    from keras import layers

    members, metas = zip(*(_load(Path(d)) for d in model_dirs), strict=True)
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


def validation_logits(model, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y, viral labels, pneumonia logits, viral logits) on the validation split."""
    from models.augment import standardise_tf

    samples = data.list_samples(data.DEFAULT_DATA_DIR)
    x_all = data.cached_arrays(samples, size)
    val = data.read_split()
    keep = [i for i, s in enumerate(samples) if s.patient in val]
    y, v = data.labels([samples[i] for i in keep])
    p_out, v_out = [], []
    for start in range(0, len(keep), 64):
        x = np.asarray(standardise_tf(x_all[keep[start : start + 64]]))
        out = model(x, training=False)
        p_out.append(np.asarray(out["pneumonia"])[:, 0])
        v_out.append(np.asarray(out["viral"])[:, 0])
    return y, v, np.concatenate(p_out), np.concatenate(v_out)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.time()
    model, metas = build_ensemble(args.model_dirs)
    size = metas[0]["input_size"]
    y, v, p, vl = validation_logits(model, size)
    arch = f"ens{len(metas)}-" + "-".join(m["architecture"] for m in metas)
    cfg = TrainConfig(arch=arch, size=size, epochs=max(m["epochs"] for m in metas), seed=metas[0]["seed"])
    history = [{"member": m["version"], "training_wall_seconds": m["training_wall_seconds"]} for m in metas]
    wall = sum(m["training_wall_seconds"] for m in metas) + (time.time() - started)
    metadata = export(model, cfg, args.out, y, v, p, vl, history, wall)
    metadata["members"] = [
        {k: m[k] for k in ("version", "architecture", "seed", "epochs", "training_command")} for m in metas
    ]
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata, indent=2))


if __name__ == "__main__":
    main()
