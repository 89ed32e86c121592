"""Model surgery for mixed precision: switch layers to real-valued convs, the gated layer
that is binary and real at once (:class:`MixBinGatedConv2D`), and BatchNorm re-estimation."""
from __future__ import annotations

from typing import Optional

import numpy as np
import larq as lq
import tensorflow as tf

from ... import models
from ...layers.binary import BinaryConv2D
from .costs import candidates, resolve_layers


def _consumers(config) -> dict:
    out: dict = {}
    for layer in config["layers"]:
        for node in layer.get("inbound_nodes", ()):
            for inbound in node:
                out.setdefault(inbound[0], []).append(layer["name"])
    return out


def _clone(model, config, extra_objects=None):
    with tf.keras.utils.custom_object_scope({**models.custom_objects(), **(extra_objects or {})}):
        return model.__class__.from_config(config)


def _real_conv_config(conf: dict) -> None:
    conf.update(input_quantizer=None, kernel_quantizer=None, kernel_constraint=None,
                pad_values=0.0, lce_check=False, binary_input=False)


def with_real_layers(model: tf.keras.Model, real_layers) -> tf.keras.Model:
    """The same network and weights with ``real_layers`` switched to real-valued convs.

    Changes only those convolutions' configs (no quantizers, zero padding, no clip), as
    ``glt_net(real_layers=...)`` does for a real layer that feeds a binary one; it adds no
    ReLU between two consecutive real layers (build those with ``glt_net``).
    """
    cands = candidates(model)
    convs = {c.conv for c in cands if c.name in set(resolve_layers(cands, real_layers))}
    config = model.get_config()
    for layer in config["layers"]:
        if layer["name"] in convs:
            _real_conv_config(layer["config"])
    clone = _clone(model, config)
    clone.set_weights(model.get_weights())
    return clone


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class MixBinGatedConv2D(BinaryConv2D):
    """A conv that is binary and real at once, from one latent kernel, mixed by a learned gate.

    ``y = g * BN_real(conv(x, W)) + (1 - g) * BN_bin(conv(sign(x), sign(W)))`` with
    ``g = sigmoid(gate_logit)``; ``W`` is the shared latent kernel (clipped to [-1, 1]),
    the binary path pads with +1 and the real path with 0, as the two precisions do in
    ``glt_net``. Each path has its own BatchNorm, so both are normalised before mixing
    (their raw scales differ by orders of magnitude). ``force_gate(v)`` pins ``g`` to
    ``v`` (``None``: the learned value) without retracing.
    """

    def __init__(self, *args, gate_init: float = 0.5, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_init = float(gate_init)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_binary = tf.keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                                            name="bn_binary")
        self.bn_real = tf.keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                                          name="bn_real")

    def build(self, input_shape):
        super().build(input_shape)
        g = min(max(self.gate_init, 1e-3), 1 - 1e-3)
        self.gate_logit = self.add_weight(
            name="gate_logit", shape=(), initializer=tf.keras.initializers.Constant(np.log(g / (1 - g))),
            trainable=True)
        self.gate_forced = self.add_weight(
            name="gate_forced", shape=(), initializer=tf.keras.initializers.Constant(-1.0), trainable=False)
        out_shape = self.compute_output_shape(input_shape)
        self.bn_binary.build(out_shape)
        self.bn_real.build(out_shape)

    def gate(self):
        return tf.where(self.gate_forced >= 0.0, self.gate_forced, tf.sigmoid(self.gate_logit))

    def force_gate(self, value: Optional[float]) -> None:
        self.gate_forced.assign(-1.0 if value is None else float(value))

    def paths(self, inputs):
        """The two convolutions before their BatchNorms: ``(binary, real)``."""
        y_binary = super().call(inputs)  # sign(x), sign(W), +1 padding
        with lq.context.quantized_scope(False):  # the latent W, the real x, zero padding
            y_real = tf.keras.layers.Conv2D.call(self, inputs)
        return y_binary, y_real

    def call(self, inputs, training=None):
        y_binary, y_real = self.paths(inputs)
        g = tf.cast(self.gate(), y_real.dtype)
        return (g * self.bn_real(y_real, training=training)
                + (1.0 - g) * self.bn_binary(y_binary, training=training))

    def get_config(self):
        return {**super().get_config(), "gate_init": self.gate_init, "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon}


def gated_model(model: tf.keras.Model, *, gate_init: float = 0.5, layers=None) -> tf.keras.Model:
    """The network with each candidate ``conv -> BN`` replaced by a :class:`MixBinGatedConv2D`.

    The BatchNorm layer becomes an identity (its job moves inside the gated conv: one BN per
    path); weights are copied (the conv kernel to the shared kernel, the BN to both paths).
    ``layers``: the candidates to gate (default all).
    """
    cands = candidates(model)
    names = set(resolve_layers(cands, layers)) if layers is not None else {c.name for c in cands}
    convs = {c.conv: c for c in cands if c.name in names}
    config = model.get_config()
    consumers = _consumers(config)
    by_name = {layer["name"]: layer for layer in config["layers"]}
    bn_of = {}
    for conv in convs:
        after = consumers.get(conv, [])
        if len(after) != 1 or by_name[after[0]]["class_name"] != "BatchNormalization":
            raise ValueError(f"{conv}: a gated layer needs the conv to feed exactly one BatchNormalization.")
        bn = by_name[after[0]]
        bn_of[conv] = bn["name"]
        conf = by_name[conv]
        conf["class_name"] = "MixBinGatedConv2D"
        conf["registered_name"] = "glt_keras>MixBinGatedConv2D"
        conf["config"].update(gate_init=float(gate_init), bn_momentum=float(bn["config"].get("momentum", 0.9)),
                              bn_epsilon=float(bn["config"].get("epsilon", 1e-5)))
        conf["config"].pop("build_config", None)
        bn.update(class_name="Activation", module="keras.layers", registered_name=None,
                  config={"name": bn["name"], "trainable": True, "dtype": bn["config"].get("dtype", "float32"),
                          "activation": "linear"})
        bn.pop("build_config", None)
    gated = _clone(model, config, {"glt_keras>MixBinGatedConv2D": MixBinGatedConv2D})
    for layer in model.layers:
        target = gated.get_layer(layer.name)
        if layer.name in convs:
            target.kernel.assign(layer.kernel)
        elif layer.name in bn_of.values():
            continue
        elif layer.weights:
            target.set_weights(layer.get_weights())
    for conv, bn in bn_of.items():
        target = gated.get_layer(conv)
        target.bn_binary.set_weights(model.get_layer(bn).get_weights())
        target.bn_real.set_weights(model.get_layer(bn).get_weights())
    return gated


def _at_size(images, size_hw) -> np.ndarray:
    """Raw pixels as float32 at ``size_hw`` (training images may be stored larger)."""
    images = np.asarray(images)
    if tuple(images.shape[1:3]) == tuple(size_hw):
        return images.astype(np.float32)
    return tf.image.resize(images, tuple(size_hw), antialias=True).numpy()


def _bn_after(model, conv_name: str, consumers: Optional[dict] = None):
    """The BatchNormalization layer that alone consumes ``conv_name``'s output, else None."""
    after = (consumers if consumers is not None else _consumers(model.get_config())).get(conv_name, [])
    bn = model.get_layer(after[0]) if len(after) == 1 else None
    return bn if isinstance(bn, tf.keras.layers.BatchNormalization) else None


def _recalibrate_bn(model, conv_name: str, x) -> None:
    """Set the moving statistics of the BatchNorm after ``conv_name`` to those of ``x``."""
    bn = _bn_after(model, conv_name)
    if bn is None:
        return
    probe = tf.keras.Model(model.inputs, model.get_layer(conv_name).output)
    out = tf.concat([probe(tf.constant(x[i:i + 64], tf.float32), training=False)
                     for i in range(0, len(x), 64)], axis=0)
    mean, var = tf.nn.moments(out, axes=[0, 1, 2])
    bn.moving_mean.assign(mean)
    bn.moving_variance.assign(var)


def _batchnorms(model) -> list:
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            found.append(layer)
        found += [bn for bn in (getattr(layer, "bn_binary", None), getattr(layer, "bn_real", None)) if bn is not None]
    return found


def _recalibrate_all(model, x, batch_size: int = 256) -> None:
    """Every BatchNorm's moving statistics := those of ``x`` through the network as it now is.

    One forward pass in training mode with momentum 0: each BatchNorm normalises with, and
    stores, its batch statistics, which is what recalibrating the layers one by one in
    network order on the same batch gives, at the cost of one pass instead of one per
    layer. ``x``: at most ``batch_size`` images are used (one batch).
    """
    bns = _batchnorms(model)
    saved = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
        model(tf.constant(np.asarray(x[:batch_size]), tf.float32), training=True)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def _binarize_kernel(conv, bn=None) -> None:
    """``conv.kernel := alpha * sign(W)`` (``alpha``: mean ``|W|`` per output channel) and
    the BatchNorm ``bn`` after it (if any) rescaled to match, so that a real path started this way
    computes what the binary conv does (exactly, for +-1 inputs). The binary function of
    the layer is unchanged: ``sign(alpha * sign(W)) == sign(W)``."""
    w = conv.kernel.numpy()
    alpha = np.mean(np.abs(w), axis=tuple(range(w.ndim - 1)))
    conv.kernel.assign(np.where(w >= 0, 1.0, -1.0).astype(w.dtype) * alpha)
    if bn is not None:  # the conv's output is now alpha times as large
        bn.moving_mean.assign(bn.moving_mean * alpha)
        eps = bn.epsilon  # alpha * sqrt(var + eps) == sqrt(new_var + eps)
        bn.moving_variance.assign(tf.maximum(alpha ** 2 * (bn.moving_variance + eps) - eps, 0.0))
