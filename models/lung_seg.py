"""Lung-field segmentation: a small U-Net trained from scratch on adult films with lung masks.

Data: a folder laid out like ``lung-masks`` (``manifest.csv`` with ``image``, ``mask``, ``source``
and ``ieee8023_file`` columns; ``images/*.jpg`` and ``masks/*.png`` of the same size, 255 = lung).
Films are read as 8-bit grey and squashed to a
square, exactly as :mod:`pipeline.lungs` sees them at serving time.

Hold-out: every film of one *source* (by default the NLM Shenzhen/Montgomery films) is never
trained on, so its Dice says how the model does on an acquisition it never saw; a further seeded
10 % of the remaining films (grouped by the ieee8023 film, which two annotators may share) is
the in-source validation part.

Run: ``python -m models.lung_seg DATA_DIR --out .work/runs/lungseg`` (``--help`` lists the options).
The folder it writes holds ``lungs.keras``, ``lungs.tflite`` and ``lungs.json`` (Dice per part).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.augment import SHIFT, augment_tf, draw_params, standardise_tf
from pipeline.lungs import LUNG_INPUT_SIZE, LUNG_KERAS_FILE, LUNG_LITE_FILE, LUNG_METADATA_FILE
from pipeline.normalise import resize_square

#: Sources whose films are never trained on (NLM: Shenzhen and Montgomery County).
HELD_OUT_SOURCES = ("Shenzhen", "Montgomery")


@dataclass
class SegConfig:
    """Everything that defines a segmentation training run."""

    size: int = LUNG_INPUT_SIZE
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    base_filters: int = 16
    seed: int = 7
    val_fraction: float = 0.1


@dataclass(frozen=True)
class Film:
    """One film of the manifest."""

    image: Path
    mask: Path
    source: str
    group: str


def read_manifest(data_dir: str | Path) -> list[Film]:
    """The films of a lung-mask folder, in manifest order."""
    data_dir = Path(data_dir)
    films = []
    with (data_dir / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            group = row.get("ieee8023_file") or row["image"]
            films.append(Film(data_dir / row["image"], data_dir / row["mask"], row["source"], group))
    if not films:
        raise FileNotFoundError(f"no films listed in {data_dir / 'manifest.csv'}")
    return films


def split(films: list[Film], cfg: SegConfig) -> dict[str, list[int]]:
    """Indices of the ``train``, ``val`` (in-source) and ``unseen`` (held-out source) parts."""
    unseen = [i for i, f in enumerate(films) if f.source in HELD_OUT_SOURCES]
    rest = [i for i, f in enumerate(films) if f.source not in HELD_OUT_SOURCES]
    groups = sorted({films[i].group for i in rest})
    rng = np.random.default_rng(cfg.seed)
    rng.shuffle(groups)
    val_groups = set(groups[: round(len(groups) * cfg.val_fraction)])
    val = [i for i in rest if films[i].group in val_groups]
    train = [i for i in rest if films[i].group not in val_groups]
    return {"train": train, "val": val, "unseen": unseen}


def read_grey(path: Path) -> np.ndarray:
    """An 8-bit grey JPEG or PNG as float32 in [0, 1] (some of these films are below the serving
    decode's minimum side, which guards clinical input, not training data)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def load_arrays(films: list[Film], size: int, cache_dir: str | Path | None = None) -> tuple[np.ndarray, ...]:
    """(grey, mask): (N, size, size) float32 grey levels in [0, 1] and binary lung masks."""
    names = "\n".join(str(f.image) for f in films)
    key = hashlib.sha256(f"{size}\n{names}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"lungs_{size}_{key}.npz" if cache_dir else None
    if cache and cache.exists():
        stored = np.load(cache)
        return stored["grey"], stored["mask"]
    grey = np.empty((len(films), size, size), np.float32)
    mask = np.empty((len(films), size, size), np.float32)
    for i, film in enumerate(films):
        grey[i] = resize_square(read_grey(film.image), size)
        mask[i] = resize_square(read_grey(film.mask), size) > 0.5
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, grey=grey, mask=mask)
    return grey, mask


def build_unet(size: int = LUNG_INPUT_SIZE, base: int = 16):
    """A small U-Net: four down-sampling stages, one logit channel (lung vs not)."""
    import keras
    from keras import layers

    def block(x, filters, name):
        for k in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{k}")(x)
            x = layers.BatchNormalization(name=f"{name}_bn{k}")(x)
            x = layers.Activation("relu", name=f"{name}_relu{k}")(x)
        return x

    inputs = keras.Input((size, size, 1), name="image")
    skips, x = [], inputs
    for level in range(4):
        x = block(x, base * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = block(x, base * 16, "bottom")
    for level in reversed(range(4)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"cat{level}")([x, skips[level]])
        x = block(x, base * 2**level, f"dec{level}")
    logits = layers.Conv2D(1, 1, name="lung_logit")(x)
    return keras.Model(inputs, logits, name="lung_unet")


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice per film of binary (N, H, W) masks (1.0 where both are empty)."""
    inter = (pred * truth).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1e-6), 1.0)


def _augment_pair(grey, mask, params):
    """Augment films and move their masks with the same geometry (intensity changes: film only)."""
    import tensorflow as tf

    images = augment_tf(grey, params)
    masks = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(mask, tf.float32)[..., tf.newaxis],
        transforms=params["transform"],
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return images, tf.cast(masks > 0.5, tf.float32)


def train(data_dir: str | Path, out_dir: str | Path, cfg: SegConfig, cache_dir: str | None = None) -> dict:
    """Train, evaluate Dice on the held-out parts, export Keras and LiteRT models into ``out_dir``."""
    import keras
    import tensorflow as tf

    started = time.time()
    keras.utils.set_random_seed(cfg.seed)
    films = read_manifest(data_dir)
    parts = split(films, cfg)
    grey, mask = load_arrays(films, cfg.size, cache_dir)
    model = build_unet(cfg.size, cfg.base_filters)
    train_idx = np.array(parts["train"])
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=1e-4)
    rng = np.random.default_rng(cfg.seed)

    @tf.function(reduce_retracing=True)
    def step(x, y, lr):
        optimizer.learning_rate.assign(lr)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
            prob = tf.sigmoid(logits)
            inter = tf.reduce_sum(prob * y, axis=[1, 2, 3])
            soft_dice = (2 * inter + 1) / (tf.reduce_sum(prob + y, axis=[1, 2, 3]) + 1)
            loss = bce + tf.reduce_mean(1 - soft_dice)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(train_idx)
        losses = []
        for b in range(steps_per_epoch):
            batch = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            params = draw_params(rng, len(batch), cfg.size, SHIFT)
            images, masks = _augment_pair(grey[batch], mask[batch], params)
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + b) / total))
            losses.append(float(step(standardise_tf(images), masks, tf.constant(lr, tf.float32))))
        val_dice = float(evaluate(model, grey[parts["val"]], mask[parts["val"]]).mean())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice})
        print(json.dumps(history[-1]), flush=True)
    report = {
        "config": asdict(cfg),
        "parts": {name: len(idx) for name, idx in parts.items()},
        "held_out_sources": list(HELD_OUT_SOURCES),
        "dice": {
            name: _summary(evaluate(model, grey[idx], mask[idx])) for name, idx in parts.items() if idx
        },
        "history": history,
        "training_wall_seconds": round(time.time() - started, 1),
    }
    save(model, out_dir, report)
    return report


def _summary(values: np.ndarray) -> dict:
    return {
        "mean": round(float(values.mean()), 4),
        "median": round(float(np.median(values)), 4),
        "p10": round(float(np.percentile(values, 10)), 4),
        "n": int(values.size),
    }


def evaluate(model, grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dice per film of the thresholded prediction."""
    logits = np.concatenate(
        [np.asarray(model(standardise_tf(grey[i : i + 64]), training=False)) for i in range(0, len(grey), 64)]
    )
    return dice((logits[..., 0] > 0).astype(np.float32), mask)


def save(model, out_dir: str | Path, report: dict) -> None:
    """Write the Keras model, its LiteRT export (checked against it) and the report."""
    import tensorflow as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / LUNG_KERAS_FILE)
    size = report["config"]["size"]
    fn = tf.function(lambda x: tf.sigmoid(model(x, training=False)))
    concrete = fn.get_concrete_function(tf.TensorSpec([None, size, size, 1], tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    probe = np.random.default_rng(0).standard_normal((4, size, size, 1)).astype(np.float32)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, probe.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, probe)
    interpreter.invoke()
    lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    gap = float(np.abs(lite - np.asarray(fn(probe))).max())
    if gap > 1e-3:
        raise RuntimeError(f"LiteRT export of the lung model differs from Keras by {gap}")
    (out / LUNG_LITE_FILE).write_bytes(flatbuffer)
    report = report | {"lite_max_abs_difference": gap}
    (out / LUNG_METADATA_FILE).write_text(json.dumps(report, indent=2) + "\n")


def geometry(lung_model: str | Path, films: list[Path]) -> dict:
    """The lung model's geometry over films without masks (e.g. the paediatric training films):
    the share with two lung fields, and the spread of lung area and centroid."""
    from pipeline.decode import decode_file
    from pipeline.lungs import LungModel

    lungs = LungModel(lung_model)
    found = [lungs.fields(decode_file(path).pixels)[0] for path in films]
    area = np.array([f.area for f in found])
    rows = np.array([f.centroid[0] for f in found if f.centroid])
    cols = np.array([f.centroid[1] for f in found if f.centroid])

    def spread(values: np.ndarray) -> list[float]:
        return [round(float(v), 3) for v in np.percentile(values, [5, 50, 95])] if values.size else []

    return {
        "films": len(found),
        "two_lung_fields": round(float(np.mean([f.two_fields for f in found])), 4),
        "lung_area_share_p5_p50_p95": spread(area),
        "centroid_row_p5_p50_p95": spread(rows),
        "centroid_col_p5_p50_p95": spread(cols),
    }


def contact_sheet(lung_model: str | Path, films: list[Path], out_png: str | Path, columns: int = 8) -> None:
    """A sheet of films (160 px tiles) with the lung outline in red and the crop box in yellow."""
    from PIL import Image, ImageDraw

    from pipeline.decode import decode_file
    from pipeline.lungs import LUNG_PROBABILITY, LungModel, crop_box

    tile = 160
    lungs = LungModel(lung_model)
    rows = math.ceil(len(films) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), "black")
    for i, path in enumerate(films):
        grey = decode_file(path).pixels
        fields, prob = lungs.fields(grey)
        film = Image.fromarray((resize_square(grey, tile) * 255).astype(np.uint8)).convert("RGB")
        mask = resize_square(prob, tile) >= LUNG_PROBABILITY
        inner = np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        edge = mask & ~inner
        pixels = np.asarray(film).copy()
        pixels[edge] = (255, 40, 40)
        film = Image.fromarray(pixels)
        top, left, bottom, right = crop_box(fields)
        ImageDraw.Draw(film).rectangle(
            (left * tile, top * tile, right * tile - 1, bottom * tile - 1), outline=(255, 220, 0)
        )
        sheet.paste(film, ((i % columns) * tile, (i // columns) * tile))
    sheet.save(out_png)


def main(argv: list[str] | None = None) -> None:
    """Command line: train the lung-field model on a lung-mask folder."""
    parser = argparse.ArgumentParser(prog="python -m models.lung_seg", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="folder with manifest.csv, images/ and masks/ (lung-masks)")
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--epochs", type=int, default=SegConfig.epochs)
    parser.add_argument("--base-filters", type=int, default=SegConfig.base_filters)
    parser.add_argument("--cache-dir", default=None, help="where the resized arrays are cached")
    args = parser.parse_args(argv)
    cfg = SegConfig(epochs=args.epochs, base_filters=args.base_filters)
    report = train(args.data_dir, args.out, cfg, args.cache_dir)
    print(json.dumps(report["dice"], indent=2))


if __name__ == "__main__":
    main()
