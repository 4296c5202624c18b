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

A chest film turned 180 degrees or flipped upside down stays close to the cloud all the same
(its features are those of a chest film). A second check catches it: a logistic classifier on
the same features (:class:`OrientationCheck`), fitted on training films against their own
synthetic rotations (90, 180, 270 degrees), upside-down flips and grey-level inversions, with
its cut-off set on the validation films (>= 99.5 % of upright films kept). A film it flags is
rejected with :data:`ORIENTATION_REASON`, so the sender can fix and re-send it.

The parameters ship beside the model (``ood.npz``: class means, covariance eigenvectors and
inverse variances, cut-off, orientation weights and cut-off);
no outside data is needed. Without that file the guard is off and every film is scored as
before. Fitting: :func:`fit_guard` (``cxr-triage model fit-ood``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.probability import sigmoid

OOD_FILE = "ood.npz"
REASON = "does not look like a frontal chest radiograph (out of distribution)"
ORIENTATION_REASON = "film appears rotated, upside down or grey-inverted; re-send it upright"
FEATURES_OUTPUT = "features"
DEFAULT_KEEP = 0.995
DEFAULT_SHRINKAGE = 0.5
DEFAULT_MARGIN = 1.25
DEFAULT_RANK = 128
DEFAULT_ORIENTATION_L2 = 1.0


@dataclass
class OrientationCheck:
    """Logistic classifier "upright film" (low) vs "turned or inverted film" (high) on the features.

    ``weights`` and ``bias`` act on the raw features (the standardisation used in fitting is
    folded in); a film with a logit above ``cutoff`` is flagged.
    """

    weights: np.ndarray  # (dims,)
    bias: float
    cutoff: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        return (f[None] if f.ndim == 1 else f) @ self.weights + self.bias

    def graph_logits(self, features: Any) -> Any:
        """:meth:`logits` as TensorFlow ops (one matrix-vector product in the model's graph)."""
        import tensorflow as tf

        f = tf.cast(features, tf.float32)
        return tf.linalg.matvec(f, tf.constant(self.weights, tf.float32)) + float(self.bias)

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features) > self.cutoff


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = DEFAULT_ORIENTATION_L2, steps: int = 25):
    """L2-regularised logistic regression by Newton's method, classes weighted equally.

    ``x`` should be standardised. Returns (weights, bias). Newton on a few thousand dims
    converges in about ten steps; no optimiser library is needed.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    sample_w = np.where(y > 0.5, 0.5 / max(y.sum(), 1.0), 0.5 / max(n - y.sum(), 1.0)) * n
    design = np.hstack([x, np.ones((n, 1))])
    beta = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = sigmoid(design @ beta)
        grad = design.T @ (sample_w * (p - y)) + penalty * beta
        curvature = sample_w * p * (1.0 - p)
        hessian = (design * curvature[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-6:
            break
    return beta[:-1], float(beta[-1])


def fit_orientation(
    upright: np.ndarray,
    turned: np.ndarray,
    val_upright: np.ndarray,
    turned_kept: np.ndarray | None = None,
    *,
    keep: float = DEFAULT_KEEP,
    l2: float = DEFAULT_ORIENTATION_L2,
) -> tuple[OrientationCheck, dict]:
    """Fit upright (training films) vs turned (their rotations, flips, inversions); cut-off in the gap.

    The cut-off is the midpoint between the ``keep`` quantile of the upright validation films'
    logits (>= 99.5 % of them pass at that point already) and the ``1 - keep`` quantile of the
    turned training films that the density cut-off lets through (``turned_kept``; the films
    this check exists for). The margin keeps real films a little unlike this collection
    (adult films, tighter framing) from being called turned; measured in the model card.
    """
    upright = np.asarray(upright, dtype=np.float64)
    mean, scale = upright.mean(0), upright.std(0) + 1e-6
    x = (np.vstack([upright, turned]) - mean) / scale
    y = np.concatenate([np.zeros(len(upright)), np.ones(len(turned))])
    w, b = fit_logistic(x, y, l2)
    weights = w / scale
    check = OrientationCheck(weights, b - float(mean @ weights), float("inf"))
    val_logits = check.logits(val_upright)
    turned_logits = check.logits(turned if turned_kept is None else np.asarray(turned)[turned_kept])
    upright_edge = float(np.quantile(val_logits, keep, method="higher"))
    turned_edge = float(np.quantile(turned_logits, 1.0 - keep, method="lower"))
    check.cutoff = max(upright_edge, 0.5 * (upright_edge + turned_edge))
    info = {
        "orientation_upright_films": int(len(upright)),
        "orientation_turned_films": int(len(turned)),
        "orientation_turned_within_density": int(len(turned_logits)),
        "orientation_l2": l2,
        "orientation_val_upright_edge": upright_edge,
        "orientation_turned_edge": turned_edge,
        "orientation_cutoff": check.cutoff,
        "orientation_val_kept": float((val_logits <= check.cutoff).mean()),
        "orientation_train_turned_caught": float(check.flags(turned).mean()),
    }
    return check, info


def feature_model(model: Any) -> Any:
    """The same network with a third output, ``features``: each member's penultimate vector, and a
    fourth, ``cam``: the class activation map of the pneumonia logit (:mod:`pipeline.cam`), where a
    member pools its last feature map globally.

    The pneumonia and viral outputs are the members' logits averaged exactly as in
    :func:`models.ensemble.build_ensemble`; a single (non-ensemble) model is its own member.
    The penultimate vector is the input of the member's ``pneumonia`` dense layer (after an
    inference-time no-op dropout).
    """
    import keras
    from keras import layers

    from pipeline.cam import CAM_OUTPUT, ensemble_cam, member_cam

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    feats, pneumonia, viral, cams = [], [], [], []
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
        cams.append(member_cam(member, m))
    if len(members) > 1:
        outputs = {
            "pneumonia": layers.Average(name="pneumonia")(pneumonia),
            "viral": layers.Average(name="viral")(viral),
            FEATURES_OUTPUT: layers.Concatenate(name=FEATURES_OUTPUT)(feats),
        }
    else:
        outputs = {"pneumonia": pneumonia[0], "viral": viral[0], FEATURES_OUTPUT: feats[0]}
    pooled = [cam for cam in cams if cam is not None]  # members without global pooling have no CAM
    if pooled:
        outputs[CAM_OUTPUT] = ensemble_cam(pooled)
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
    #: Orientation check (rotated, upside-down, inverted films), or None (older ``ood.npz``).
    orientation: OrientationCheck | None = None

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
        """True where a film is beyond the cut-off (out of distribution) or appears turned."""
        flagged = self.distances(features) > self.cutoff
        if self.orientation is not None:
            flagged |= self.orientation.flags(features)
        return flagged

    def reason(self, distance: float, orientation_logit: float | None) -> str | None:
        """Why a film is rejected, or None when it passes.

        A film beyond the density cut-off is "not a chest film" even if it also looks turned
        (a photograph is not a rotated chest film); within it, a turned film gets the
        orientation reason.
        """
        if distance > self.cutoff:
            return REASON
        turned = self.orientation is not None and orientation_logit is not None
        if turned and orientation_logit > self.orientation.cutoff:
            return ORIENTATION_REASON
        return None

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            means=self.means.astype(np.float32),
            components=self.components.astype(np.float32),
            inv_var=self.inv_var.astype(np.float64),
            inv_rest=np.float64(self.inv_rest),
            cutoff=np.float64(self.cutoff),
            info=np.array(json.dumps(self.info)),
            **(
                {}
                if self.orientation is None
                else {
                    "orient_weights": self.orientation.weights.astype(np.float32),
                    "orient_bias": np.float64(self.orientation.bias),
                    "orient_cutoff": np.float64(self.orientation.cutoff),
                }
            ),
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
                orientation=(
                    OrientationCheck(
                        data["orient_weights"].astype(np.float64),
                        float(data["orient_bias"]),
                        float(data["orient_cutoff"]),
                    )
                    if "orient_weights" in data.files
                    else None
                ),
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
    *,
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
