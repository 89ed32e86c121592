"""Mixed-precision export: real layers folded with their BatchNorm and wrapped in 8-bit
fake-quant nodes, so that LCE emits int8 ``CONV_2D`` ops in the binary graph."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ... import models
from ...layers.binary import BinaryConv2D
from .surgery import _clone, _consumers


#: BinaryConv2D settings an int8 folded conv fixes itself, so neither its config nor a folded
#: layer's carries them.
_BINARY_CONV_KEYS = ("input_quantizer", "kernel_quantizer", "kernel_constraint", "use_bias", "lce_check", "binary_input")


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class Int8FoldedConv2D(BinaryConv2D):
    """Export form of a real layer: BatchNorm folded into the conv, 8-bit fake quantization.

    ``fq8(conv(fq8(x; input_range), fq8_per_channel(W')) + b'; output_range)`` with ``W'``, ``b'``
    the BN-folded kernel and bias; the weights are symmetric per output channel (narrow
    range). LCE's converter turns the fake-quant nodes into an int8 ``CONV_2D`` (int8
    weights, int32 bias) with a ``QUANTIZE`` before it; the binary layers stay ``LceBconv2d``.
    """

    def __init__(self, *args, input_range=(-1.0, 1.0), output_range=(-1.0, 1.0), **kwargs):
        kwargs.update(input_quantizer=None, kernel_quantizer=None, kernel_constraint=None, use_bias=True,
                      lce_check=False, binary_input=False)
        kwargs.setdefault("pad_values", 0.0)
        super().__init__(*args, **kwargs)
        self.input_range = tuple(float(v) for v in input_range)
        self.output_range = tuple(float(v) for v in output_range)

    def call(self, inputs):
        lo, hi = self.input_range
        x = tf.quantization.fake_quant_with_min_max_args(inputs, min=lo, max=hi, num_bits=8)
        bound = tf.maximum(tf.reduce_max(tf.abs(self.kernel), axis=[0, 1, 2]), 1e-8)
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(self.kernel, -bound, bound, num_bits=8,
                                                                     narrow_range=True)
        y = self._jit_compiled_convolution_op(x, w) if self.groups > 1 else self.convolution_op(x, w)
        y = tf.nn.bias_add(y, self.bias)
        lo, hi = self.output_range
        return tf.quantization.fake_quant_with_min_max_args(y, min=lo, max=hi, num_bits=8)

    def get_config(self):
        config = super().get_config()
        for key in _BINARY_CONV_KEYS:
            config.pop(key, None)
        return {**config, "input_range": list(self.input_range), "output_range": list(self.output_range)}


def _int8_range(values, headroom: float = 1.0) -> tuple:
    lo = min(0.0, float(np.min(values)) * headroom)
    hi = max(0.0, float(np.max(values)) * headroom)
    if hi - lo < 1e-6:
        hi = lo + 1e-3
    return lo, hi


def int8_real_export(model: tf.keras.Model, calibration_images) -> tf.keras.Model:
    """The export form of a mixed model whose real layers convert to int8 ``CONV_2D``.

    Every real conv (no quantizers) that feeds one BatchNorm becomes an
    :class:`Int8FoldedConv2D` with the BN folded in and input / output ranges calibrated as
    min / max over ``calibration_images`` (raw pixels); native grouped convolutions
    (:func:`glt_keras.models.for_export`). Binary layers are unchanged.
    """
    model = models.for_export(model)
    config = model.get_config()
    consumers = _consumers(config)
    by_name = {layer["name"]: layer for layer in config["layers"]}
    folds = {}
    for layer in model.layers:
        if not isinstance(layer, tf.keras.layers.Conv2D) or getattr(layer, "kernel_quantizer", 1) is not None \
                or getattr(layer, "input_quantizer", 1) is not None:
            continue
        after = consumers.get(layer.name, [])
        if len(after) != 1 or not isinstance(model.get_layer(after[0]), tf.keras.layers.BatchNormalization):
            continue
        folds[layer.name] = after[0]
    if not folds:
        return model
    x = np.asarray(calibration_images, np.float32)
    probe = tf.keras.Model(model.inputs, [t for conv, bn in folds.items()
                                          for t in (model.get_layer(conv).input, model.get_layer(bn).output)])
    outs = probe.predict(x, batch_size=64, verbose=0)
    ranges = {conv: (_int8_range(outs[2 * i]), _int8_range(outs[2 * i + 1])) for i, conv in enumerate(folds)}
    for conv, bn in folds.items():
        conf = by_name[conv]
        conf["class_name"] = "Int8FoldedConv2D"
        conf["registered_name"] = "glt_keras>Int8FoldedConv2D"
        for key in _BINARY_CONV_KEYS:
            conf["config"].pop(key, None)
        conf["config"].update(input_range=list(ranges[conv][0]), output_range=list(ranges[conv][1]))
        conf["config"].pop("build_config", None)
        bn_conf = by_name[bn]
        bn_conf.update(class_name="Activation", module="keras.layers", registered_name=None,
                       config={"name": bn, "trainable": True, "dtype": "float32", "activation": "linear"})
        bn_conf.pop("build_config", None)
    exported = _clone(model, config, {"glt_keras>Int8FoldedConv2D": Int8FoldedConv2D})
    for layer in model.layers:
        if layer.name in folds.values() or not layer.weights:
            continue
        target = exported.get_layer(layer.name)
        if layer.name in folds:
            bn = model.get_layer(folds[layer.name])
            gamma, beta, mean, var = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
            scale = gamma / np.sqrt(var + bn.epsilon)
            target.kernel.assign(layer.kernel.numpy() * scale)
            target.bias.assign(beta - mean * scale)
        else:
            target.set_weights(layer.get_weights())
    return exported

