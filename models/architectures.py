"""CNN definitions built from scratch (Keras 3), input ``(size, size, 1)``, two logit outputs.

Outputs (dict, in this order):

* ``pneumonia``: logit of pneumonia vs normal (the triage score);
* ``viral``: logit of viral vs bacterial, trained on pneumonia images only.

Both heads read the same pooled features; the viral head has its own small dense layer and
its gradient is scaled down before it reaches the shared trunk, so that it cannot take
capacity from the main task.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

OUTPUTS = ("pneumonia", "viral")
ARCHITECTURES = ("baseline", "resnet", "mobilenet")


@keras.saving.register_keras_serializable(package="cxr")
class GradientScale(layers.Layer):
    """Identity forward; multiplies the backward gradient by ``scale``."""

    def __init__(self, scale: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        """Return ``inputs`` with a scaled gradient."""
        stopped = keras.ops.stop_gradient(inputs)
        return stopped + self.scale * (inputs - stopped)

    def get_config(self) -> dict:
        """Serialisable config."""
        return {**super().get_config(), "scale": self.scale}


def load_trained(model_dir: str | Path) -> tuple[keras.Model, dict]:
    """(Keras model, metadata) with the real training layers registered by this module.

    The training tools (ensemble building, Grad-CAM, comparison) use this; serving uses the same
    loader, :func:`pipeline.inference.load_keras_model`, with inference stand-ins instead.
    """
    from pipeline.inference import load_keras_model

    return load_keras_model(model_dir, custom_objects={})


def _heads(features, dropout: float, viral_grad_scale: float = 0.3) -> dict:
    main = layers.Dropout(dropout, name="head_dropout")(features)
    pneumonia = layers.Dense(1, name="pneumonia")(main)
    side = GradientScale(viral_grad_scale, name="viral_grad_scale")(features)
    side = layers.Dense(64, activation="relu", name="viral_hidden")(side)
    side = layers.Dropout(dropout, name="viral_dropout")(side)
    viral = layers.Dense(1, name="viral")(side)
    return {"pneumonia": pneumonia, "viral": viral}


def _conv_bn(x, filters: int, kernel: int = 3, strides: int = 1, act: bool = True, name: str = ""):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}conv")(x)
    x = layers.BatchNormalization(name=f"{name}bn")(x)
    return layers.Activation("relu", name=f"{name}relu")(x) if act else x


def baseline_cnn(size: int = 128) -> keras.Model:
    """Plain notebook-style CNN: conv/pool stacks, flatten, one dense layer."""
    inputs = keras.Input((size, size, 1), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"b{i}_conv")(x)
        x = layers.BatchNormalization(name=f"b{i}_bn")(x)
        x = layers.MaxPooling2D(2, name=f"b{i}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.3, name="flat_dropout")(x)
    x = layers.Dense(128, activation="relu", name="dense")(x)
    return keras.Model(inputs, _heads(x, 0.3), name="baseline")


def _basic_block(x, filters: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, act=False, name=f"{name}_proj_")
    y = _conv_bn(x, filters, 3, strides, name=f"{name}_a_")
    y = _conv_bn(y, filters, 3, 1, act=False, name=f"{name}_b_")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def resnet_small(size: int = 128, widths: tuple[int, ...] = (32, 64, 128, 192)) -> keras.Model:
    """Small ResNet: strided stem, one basic block per stage, global average pooling."""
    inputs = keras.Input((size, size, 1), name="image")
    x = _conv_bn(inputs, 24, 3, 2, name="stem1_")
    x = _conv_bn(x, widths[0], 3, 1, name="stem2_")
    for i, filters in enumerate(widths):
        x = _basic_block(x, filters, 2, name=f"s{i}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, _heads(x, 0.3), name="resnet")


def _inverted_residual(x, filters: int, strides: int, expand: int, name: str):
    channels = x.shape[-1]
    y = _conv_bn(x, channels * expand, 1, 1, name=f"{name}_expand_") if expand != 1 else x
    y = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(y)
    y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = _conv_bn(y, filters, 1, 1, act=False, name=f"{name}_project_")
    if strides == 1 and channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_small(size: int = 128, weights: str | None = None) -> keras.Model:
    """MobileNetV2-style net from scratch (inverted residuals, depthwise convolutions).

    ``weights`` may name a local ``.weights.h5`` file saved from this same architecture;
    nothing is ever downloaded.
    """
    inputs = keras.Input((size, size, 1), name="image")
    x = _conv_bn(inputs, 24, 3, 2, name="stem_")
    # (expansion, filters, repeats, first stride)
    config = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 40, 2, 2), (4, 80, 3, 2), (4, 112, 2, 1), (4, 160, 2, 2))
    for stage, (expand, filters, repeats, strides) in enumerate(config):
        for r in range(repeats):
            x = _inverted_residual(x, filters, strides if r == 0 else 1, expand, name=f"ir{stage}_{r}")
    x = _conv_bn(x, 384, 1, 1, name="top_")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, _heads(x, 0.3), name="mobilenet")
    if weights:
        model.load_weights(weights)
    return model


BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "baseline": baseline_cnn,
    "resnet": resnet_small,
    "mobilenet": mobilenet_small,
}


def build(arch: str, size: int = 128) -> keras.Model:
    """Build architecture ``arch`` (one of :data:`ARCHITECTURES`) for ``size`` x ``size`` input."""
    try:
        builder = BUILDERS[arch]
    except KeyError as exc:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}") from exc
    return builder(size=size)
