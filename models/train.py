"""Seeded, reproducible training of the two-headed pneumonia model, calibration and export.

Recipe: AdamW with a warm-up + cosine learning-rate schedule, class-balanced binary
cross-entropy on the ``pneumonia`` logit, masked class-balanced cross-entropy on the ``viral``
logit (pneumonia images only), augmentation from :mod:`models.augment`, and an exponential
moving average (EMA) of the weights. The exported checkpoint is the EMA weights at the end of
the fixed schedule: it is *not* picked by the validation score, which keeps the validation
figures honest and the choice robust. Temperature and the two operating thresholds are then
fitted on the patient-wise validation split.

Run: ``cxr-triage model train DATA_DIR --arch resnet --epochs 30 --size 128 --out models/shipped``.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models import data
from models.augment import AugmentConfig, augment_tf, draw_params, standardise_tf
from models.metrics import fit_temperature, operating_thresholds, roc_auc
from pipeline.hashing import sha256_file
from pipeline.probability import sigmoid

MODEL_FILE = "model.keras"


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    arch: str = "resnet"
    size: int = 128
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    ema_decay: float = 0.997
    viral_loss_weight: float = 0.3
    label_smoothing: float = 0.05
    seed: int = 1337
    #: Folder with NORMAL/ and PNEUMONIA/ (no default: ``--data-dir`` / ``CXR_TRIAGE_DATA_DIR``).
    data_dir: str = ""
    #: Where resized training arrays are cached between runs (None: not cached).
    cache_dir: str | None = None
    split_file: str = str(data.SPLIT_FILE)
    #: A lung model (``lungs.tflite``): the classifier then reads each film cut to its lung box.
    lung_model: str | None = None
    #: With a lung model: also set what lies outside the lung fields to the lungs' median grey.
    suppress_outside: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def git_revision() -> str:
    """Short revision of the checkout this code runs from (``unknown`` when installed from a wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _balanced_weights(y: np.ndarray) -> tuple[float, float]:
    """(weight of negatives, weight of positives) so both classes count equally."""
    pos = float(np.sum(y == 1))
    neg = float(np.sum(y == 0))
    total = pos + neg
    return total / (2 * max(neg, 1.0)), total / (2 * max(pos, 1.0))


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Trainer:
    """Holds the model, optimiser, EMA copy and compiled step functions."""

    def __init__(self, cfg: TrainConfig, y_train: np.ndarray, v_train: np.ndarray) -> None:
        import keras
        import tensorflow as tf

        from models.architectures import build

        self.cfg = cfg
        self.model = build(cfg.arch, cfg.size)
        self.ema = build(cfg.arch, cfg.size)
        self.ema.set_weights(self.model.get_weights())
        self.optimizer = keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
        self.wn, self.wp = _balanced_weights(y_train)
        viral = v_train[v_train >= 0]
        self.vn, self.vp = _balanced_weights(viral)
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self._ema_pairs = [
            (e, w)
            for e, w in zip(self.ema.weights, self.model.weights, strict=True)
            if "float" in str(e.dtype)
        ]
        self._ema_step = tf.function(self._ema_update)
        self.eval_step = tf.function(lambda x: self.ema(x, training=False), reduce_retracing=True)

    def _loss(self, out, y, v):
        import tensorflow as tf

        cfg = self.cfg
        y_s = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        logit = tf.squeeze(out["pneumonia"], -1)
        w = tf.where(y > 0.5, self.wp, self.wn)
        main = tf.reduce_mean(w * tf.nn.sigmoid_cross_entropy_with_logits(labels=y_s, logits=logit))
        mask = tf.cast(v >= 0, tf.float32)
        v_t = tf.maximum(v, 0.0) * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        vlogit = tf.squeeze(out["viral"], -1)
        vw = mask * tf.where(v > 0.5, self.vp, self.vn)
        side = tf.reduce_sum(vw * tf.nn.sigmoid_cross_entropy_with_logits(labels=v_t, logits=vlogit))
        side = side / tf.maximum(tf.reduce_sum(mask), 1.0)
        return main, side

    def _train_step(self, grey, y, v, params, lr):
        import tensorflow as tf

        x = standardise_tf(augment_tf(grey, params))
        with tf.GradientTape() as tape:
            out = self.model(x, training=True)
            main, side = self._loss(out, y, v)
            loss = main + self.cfg.viral_loss_weight * side
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.learning_rate.assign(lr)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return main, side

    def update_ema(self, step: int) -> None:
        """EMA of all weights (including batch-norm statistics), with a warm-up on the decay."""
        decay = np.float32(min(self.cfg.ema_decay, (1 + step) / (10 + step)))
        self._ema_step(decay)

    def _ema_update(self, decay) -> None:
        for ema_w, w in self._ema_pairs:
            ema_w.assign(decay * ema_w + (1 - decay) * w)

    def predict(self, x: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """EMA model logits (pneumonia, viral) for standardised inputs."""
        outs_p, outs_v = [], []
        for start in range(0, len(x), batch):
            out = self.eval_step(x[start : start + batch])
            outs_p.append(np.asarray(out["pneumonia"])[:, 0])
            outs_v.append(np.asarray(out["viral"])[:, 0])
        return np.concatenate(outs_p), np.concatenate(outs_v)


def _standardised(grey: np.ndarray) -> np.ndarray:
    return np.asarray(standardise_tf(grey))


def train(cfg: TrainConfig, out_dir: str | Path, log=None) -> dict:
    """Train, calibrate on validation, write ``out_dir`` (model, metadata, history); return metadata."""
    import keras
    import tensorflow as tf

    log = log or (lambda line: print(line, flush=True))
    started = time.time()
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    if not cfg.data_dir:
        raise ValueError("no training data folder given (--data-dir or CXR_TRIAGE_DATA_DIR)")
    samples = data.list_samples(cfg.data_dir)
    val_patients = data.read_split(Path(cfg.split_file))
    train_s, val_s = data.partition(samples, val_patients)
    x_all = data.cached_arrays(samples, cfg.size, cfg.cache_dir, progress=True, lung_model=cfg.lung_model,
                               suppress=cfg.suppress_outside)
    index = {s.name: i for i, s in enumerate(samples)}
    x_train = x_all[[index[s.name] for s in train_s]]
    x_val = _standardised(x_all[[index[s.name] for s in val_s]])
    y_train, v_train = data.labels(train_s)
    y_val, v_val = data.labels(val_s)
    log(f"train {len(train_s)} images, val {len(val_s)} images ({len(val_patients)} patients)")

    trainer = _Trainer(cfg, y_train, v_train)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = len(train_s) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        t0 = time.time()
        order = rng.permutation(len(train_s))
        losses = []
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            params = draw_params(rng, len(idx), cfg.size, cfg.augment)
            lr = np.float32(_lr_at(step, total, warmup, cfg.lr))
            main, side = trainer.train_step(x_train[idx], y_train[idx], v_train[idx], params, lr)
            trainer.update_ema(step)
            losses.append((float(main), float(side)))
            step += 1
        p_logit, v_logit = trainer.predict(x_val)
        mask = v_val >= 0
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean([m for m, _ in losses])),
            "viral_loss": float(np.mean([s for _, s in losses])),
            "val_auc": roc_auc(y_val, p_logit),
            "val_viral_auc": roc_auc(v_val[mask], v_logit[mask]),
            "seconds": round(time.time() - t0, 1),
        }
        history.append(record)
        log(json.dumps(record))
    wall = time.time() - started
    p_logit, v_logit = trainer.predict(x_val)
    return export(trainer.ema, cfg, out_dir, y_val, v_val, p_logit, v_logit, history, wall)


#: Operating-point targets, and the stricter levels at which thresholds are fitted on
#: validation, leaving a margin for the shift between this validation split and new data.
SCREENING_TARGET, SCREENING_FIT = 0.98, 0.995  # sensitivity
HIGH_CONFIDENCE_TARGET, HIGH_CONFIDENCE_FIT = 0.95, 0.99  # specificity


def calibration(y_val: np.ndarray, p_logit: np.ndarray) -> dict:
    """Temperature of the pneumonia logit and both thresholds on the calibrated probability."""
    temperature = fit_temperature(y_val, p_logit)
    prob = sigmoid(p_logit, temperature)
    screening, high_conf = operating_thresholds(y_val, prob, SCREENING_FIT, HIGH_CONFIDENCE_FIT)
    return {
        "temperature": round(float(temperature), 4),
        "screening_threshold": round(float(screening), 4),
        "high_confidence_threshold": round(float(max(high_conf, screening)), 4),
        "threshold_targets": {
            "screening": f"sensitivity >= {SCREENING_TARGET}; fitted at >= {SCREENING_FIT} on validation",
            "high_confidence": (
                f"specificity >= {HIGH_CONFIDENCE_TARGET}; fitted at >= {HIGH_CONFIDENCE_FIT} on validation"
            ),
        },
    }


def _command_line() -> str:
    """The command that made the model, for its metadata (``cxr-triage model ...`` as typed)."""
    if not sys.argv or not sys.argv[0]:
        return "models.train.train()"
    return " ".join([Path(sys.argv[0]).name, *(shlex.quote(a) for a in sys.argv[1:])])


def export(model, cfg: TrainConfig, out_dir, y_val, v_val, p_logit, v_logit, history, wall) -> dict:
    """Calibrate on validation and write model file, metadata.json, history.json, val_logits.npz."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    model.save(model_path)
    digest = sha256_file(model_path)[:8]
    today = datetime.now(UTC).strftime("%Y%m%d")
    mask = v_val >= 0
    metadata = {
        "version": f"cxr-pneumonia-{cfg.arch}-{today}-{digest}",
        "architecture": cfg.arch,
        "model_file": MODEL_FILE,
        "input_size": cfg.size,
        "input": "pipeline.normalise.to_model_input(grey, input_size): (size, size, 1) float32",
        "outputs": {"pneumonia": "logit, normal vs pneumonia", "viral": "logit, bacterial vs viral"},
        "output_names": ["pneumonia", "viral"],
        **calibration(y_val, p_logit),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "split_file": "models/splits/val_patients.txt",
        "validation": {
            "roc_auc": round(roc_auc(y_val, p_logit), 4),
            "viral_roc_auc": round(roc_auc(v_val[mask], v_logit[mask]), 4),
            "images": len(y_val),
        },
        "training_command": _command_line(),
        "training_wall_seconds": round(wall, 1),
        "git_revision": git_revision(),
        "config": {
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("data_dir", "cache_dir", "split_file", "lung_model")
        },
    }
    if cfg.lung_model:
        metadata.update(_lung_crop_entries(Path(cfg.lung_model), out_dir, cfg.suppress_outside))
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    np.savez(out_dir / "val_logits.npz", y=y_val, v=v_val, p=p_logit, vl=v_logit)
    return metadata


def _lung_crop_entries(lung_model: Path, out_dir: Path, suppress: bool) -> dict:
    """Copy the lung model (and its report) into the model folder; the metadata entries that say
    the classifier reads the lung crop."""
    import shutil

    from pipeline.lungs import CROP_MARGIN, LUNG_LITE_FILE, LUNG_METADATA_FILE

    shutil.copyfile(lung_model, out_dir / LUNG_LITE_FILE)
    report = lung_model.with_name(LUNG_METADATA_FILE)
    if report.is_file():
        shutil.copyfile(report, out_dir / LUNG_METADATA_FILE)
    what = "the film cut to its lung box" + (", outside the lungs suppressed" if suppress else "")
    return {
        "input": f"pipeline.lungs.lung_model_input(grey, input_size, lungs, suppress): {what}",
        "crop": {"kind": "lungs", "lung_model": LUNG_LITE_FILE, "margin": CROP_MARGIN, "suppress": suppress,
                 "lung_model_sha256": sha256_file(lung_model)},
    }


def recalibrate(run_dir: str | Path) -> dict:
    """Refit temperature and thresholds of a run folder from its saved validation logits."""
    run_dir = Path(run_dir)
    metadata = json.loads((run_dir / "metadata.json").read_text())
    logits = np.load(run_dir / "val_logits.npz")
    metadata.update(calibration(logits["y"], logits["p"]))
    (run_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
