"""Natural binary coding with fewer planes: the top ``bits`` bit planes of each uint8 pixel.

What an ADC of ``bits`` bits gives, as ``bits`` +-1 planes per channel: the natural-binary
counterpart of a thermometer with ``levels = bits`` planes (same first-convolution cost). A
recipe asks for it with ``encoding: binary_planes`` and ``levels`` < 8 (``glt_net``); 8 levels
is :class:`~glt_keras.layers.encoding.BinaryPlanes`, every bit. Training and evaluation only: the
LCE / C export paths know the 8-plane form alone.
"""
from __future__ import annotations

import larq as lq
import tensorflow as tf

from .encoding import PIXEL_MAX, _as_pixels, _check_channels


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class TopBitPlanes(tf.keras.layers.Layer):
    """The ``bits`` most significant bit planes of each channel as +-1, MSB first.

    Output channel ``c * bits + k`` is bit ``7 - k`` of channel ``c``. Pixels are rounded and
    clipped to [0, 255] first.

    Example:
        >>> TopBitPlanes(2)(tf.constant([[[[192.0, 100.0]]]])).numpy().ravel().tolist()
        [1.0, 1.0, -1.0, 1.0]
    """

    def __init__(self, bits: int = 8, **kwargs):
        super().__init__(**kwargs)
        if int(bits) != bits or not 1 <= bits <= 8:
            raise ValueError(f"{self.name}: bits must be an integer in 1..8, got {bits!r}.")
        self.bits = int(bits)

    @property
    def levels(self):
        return self.bits

    def build(self, input_shape):
        self.channels = _check_channels(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        x = tf.clip_by_value(tf.round(_as_pixels(inputs, self)), 0.0, PIXEL_MAX)
        x = tf.repeat(x, self.bits, axis=-1)
        weights = tf.constant([2.0 ** (7 - k) for k in range(self.bits)] * self.channels)
        bits = tf.math.floormod(tf.math.floor(x / weights), 2.0)
        return lq.quantizers.ste_sign(tf.stop_gradient(bits) - 0.5)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[:-1]).concatenate([input_shape[-1] * self.bits])

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}
