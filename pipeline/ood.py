"""Is this a frontal chest film at all? A density guard on the CNN's penultimate features.

DICOM headers cannot decide alone: a PNG/JPEG carries none, and a DICOM without
BodyPartExamined says nothing. The model itself is the best judge of what it was trained on:
its penultimate features (the input of each member's ``pneumonia`` head, concatenated over
the ensemble) of real training films form a compact cloud. The guard is the Mahalanobis
distance (Lee et al., NeurIPS 2018) to the nearer of the two class means (normal, pneumonia)
under a shared, shrunk covariance fitted on the **training** films; the cut-off is set on the
**validation** films: 1.25 x the distance that keeps 99.5 % of them (so >= 99.5 % of real
chest films stay in, with room for other collections). A film beyond it is rejected, never
silently ranked. Orientation is kept in the features by adding each member's top-minus-bottom
and left-minus-right channel means of its last spatial feature map (global pooling alone
cannot tell a film from its upside-down copy).

The parameters ship beside the model (``ood.npz``: class means, covariance eigenvectors and
inverse variances, cut-off);
no outside data is needed. Without that file the guard is off and every film is scored as
before. Fitting: :func:`fit_guard` (``cxr-triage model fit-ood``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OOD_FILE = "ood.npz"
REASON = "does not look like a frontal chest radiograph (out of distribution)"
FEATURES_OUTPUT = "features"
DEFAULT_KEEP = 0.995
DEFAULT_SHRINKAGE = 0.5
DEFAULT_MARGIN = 1.25
DEFAULT_RANK = 128


def feature_model(model: Any) -> Any:
    """The same network with a third output, ``features``: each member's penultimate vector.

    The pneumonia and viral outputs are the members' logits averaged exactly as in
    :func:`models.ensemble.build_ensemble`; a single (non-ensemble) model is its own member.
    The penultimate vector is the input of the member's ``pneumonia`` dense layer (after an
    inference-time no-op dropout).
    """
    import keras
    from keras import layers

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    feats, pneumonia, viral = [], [], []
    for member in members:
        head = member.get_layer("pneumonia")
        grid = _last_feature_map(member)
        sub = keras.Model(
            member.inputs,
            [head.input, grid.output, head.output, member.get_layer("viral").output],
            name=f"{member.name}_features",
        )
        f, m, p, v = sub(inputs)
        feats.extend([f, layers.Lambda(_asymmetry, name=f"asymmetry_{len(feats)}")(m)])
        pneumonia.append(p)
        viral.append(v)
    if len(members) > 1:
        outputs = {
            "pneumonia": layers.Average(name="pneumonia")(pneumonia),
            "viral": layers.Average(name="viral")(viral),
            FEATURES_OUTPUT: layers.Concatenate(name=FEATURES_OUTPUT)(feats),
        }
    else:
        outputs = {"pneumonia": pneumonia[0], "viral": viral[0], FEATURES_OUTPUT: feats[0]}
    return keras.Model(inputs, outputs, name=f"{model.name}_with_features")


def _last_feature_map(member: Any) -> Any:
    """The last layer with a 4-D (spatial) output: the map that global pooling or flatten reads."""
    spatial = [layer for layer in member.layers if len(getattr(layer.output, "shape", ())) == 4]
    return spatial[-1]


def _asymmetry(grid: Any) -> Any:
    """Top-minus-bottom and left-minus-right channel means of a feature map.

    Global pooling makes the penultimate vector blind to orientation: a film upside down or
    mirrored pools to nearly the same vector. These differences keep where things are (the
    diaphragm at the bottom, the heart on one side), so a misoriented film moves away.
    """
    from keras import ops

    half_h, half_w = grid.shape[1] // 2, grid.shape[2] // 2
    top = ops.mean(grid[:, :half_h], axis=(1, 2)) - ops.mean(grid[:, grid.shape[1] - half_h :], axis=(1, 2))
    side = ops.mean(grid[:, :, :half_w], axis=(1, 2)) - ops.mean(
        grid[:, :, grid.shape[2] - half_w :], axis=(1, 2)
    )
    return ops.concatenate([top, side], axis=-1)


@dataclass
class OodGuard:
    """Class-conditional Mahalanobis density model of penultimate features, with its cut-off.

    The shared covariance is kept as its ``k`` leading eigenvectors (``components``, with
    the inverse variances along them) plus one inverse variance for every other direction
    (``inv_rest``): after shrinkage the trailing eigenvalues are all close to the shrinkage
    target, so this is nearly exact and keeps the shipped file near 1 MB instead of 18 MB.
    """

    means: np.ndarray  # (classes, dims)
    components: np.ndarray  # (dims, k), orthonormal columns
    inv_var: np.ndarray  # (k,)
    inv_rest: float
    cutoff: float
    info: dict

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` to the nearer class mean."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim == 1:
            f = f[None]
        projected = f @ self.components  # (n, k): one projection for both classes
        norms = np.einsum("ij,ij->i", f, f)
        best = np.full(len(f), np.inf)
        for mean, mean_projected in zip(self.means, self.means @ self.components, strict=True):
            along = projected - mean_projected
            inside = np.einsum("ij,ij->i", along, along)
            total = norms - 2.0 * (f @ mean) + float(mean @ mean)  # squared Euclidean distance to the mean
            squared = (along**2) @ self.inv_var + (total - inside) * self.inv_rest
            best = np.minimum(best, squared)
        return np.sqrt(np.maximum(best, 0.0))

    def graph_distances(self, features: Any) -> Any:
        """:meth:`distances` as TensorFlow ops, to run inside the model's graph.

        In NumPy the projection competes with TensorFlow's threads for the same cores (measured:
        inference 40 % slower on the 2-core machine); inside the graph it is one more small matmul.
        """
        import tensorflow as tf

        f = tf.cast(features, tf.float32)
        components = tf.constant(self.components, tf.float32)
        projected = tf.matmul(f, components)
        norms = tf.reduce_sum(f * f, axis=1)
        best = None
        for mean in self.means:
            along = projected - tf.constant(mean @ self.components, tf.float32)
            inside = tf.reduce_sum(along * along, axis=1)
            total = norms - 2.0 * tf.linalg.matvec(f, tf.constant(mean, tf.float32)) + float(mean @ mean)
            squared = tf.linalg.matvec(along * along, tf.constant(self.inv_var, tf.float32))
            squared += (total - inside) * float(self.inv_rest)
            best = squared if best is None else tf.minimum(best, squared)
        return tf.sqrt(tf.maximum(best, 0.0))

    def flags(self, features: np.ndarray) -> np.ndarray:
        """True where a film is beyond the cut-off (out of distribution)."""
        return self.distances(features) > self.cutoff

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            means=self.means.astype(np.float32),
            components=self.components.astype(np.float32),
            inv_var=self.inv_var.astype(np.float64),
            inv_rest=np.float64(self.inv_rest),
            cutoff=np.float64(self.cutoff),
            info=np.array(json.dumps(self.info)),
        )

    @classmethod
    def load(cls, path: str | Path) -> OodGuard:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                means=data["means"].astype(np.float64),
                components=data["components"].astype(np.float64),
                inv_var=data["inv_var"].astype(np.float64),
                inv_rest=float(data["inv_rest"]),
                cutoff=float(data["cutoff"]),
                info=json.loads(str(data["info"])),
            )

    @classmethod
    def for_model_dir(cls, model_dir: str | Path) -> OodGuard | None:
        """The guard shipped with a model, or None when the model has none."""
        path = Path(model_dir) / OOD_FILE
        return cls.load(path) if path.is_file() else None


def fit_density(
    features: np.ndarray, labels: np.ndarray, shrinkage: float = DEFAULT_SHRINKAGE, rank: int = DEFAULT_RANK
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(class means, components, inverse variances, inverse rest variance) of the shared covariance.

    The covariance is shrunk toward its mean variance: the features of a trained net lie close
    to a low-dimensional subspace, and the inverse of the raw covariance would amplify noise
    in the directions the training films never used.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    classes = sorted(set(y.tolist()))
    means = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(len(f) - len(classes), 1)
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    target = float(values.mean())
    shrunk = (1 - shrinkage) * np.maximum(values, 0.0) + shrinkage * target
    k = min(rank, len(values) - 1)
    rest = float(shrunk[k:].mean())
    return means, vectors[:, :k], 1.0 / shrunk[:k], 1.0 / rest


def fit_guard(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    keep: float = DEFAULT_KEEP,
    shrinkage: float = DEFAULT_SHRINKAGE,
    margin: float = DEFAULT_MARGIN,
    rank: int = DEFAULT_RANK,
    info: dict | None = None,
) -> OodGuard:
    """Fit on training films; cut-off = ``margin`` x the ``keep`` quantile of validation distances.

    The quantile alone keeps ``keep`` (99.5 %) of the validation films; the margin keeps real
    chest films from other collections and mild acquisition changes (see the model card).
    """
    means, components, inv_var, inv_rest = fit_density(train_features, train_labels, shrinkage, rank)
    guard = OodGuard(means, components, inv_var, inv_rest, float("inf"), {})
    val_d = guard.distances(val_features)
    quantile = float(np.quantile(val_d, keep, method="higher"))
    guard.cutoff = margin * quantile
    guard.info = {
        **(info or {}),
        "train_films": int(len(train_features)),
        "val_films": int(len(val_features)),
        "keep_quantile": keep,
        "val_quantile_distance": quantile,
        "margin": margin,
        "val_kept": float((val_d <= guard.cutoff).mean()),
        "shrinkage": shrinkage,
        "rank": int(components.shape[1]),
        "dims": int(means.shape[1]),
    }
    return guard
