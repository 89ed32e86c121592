"""Run-time checks of the pixels a model is given: the errors that stop a confident wrong answer.

Every zoo model takes raw RGB pixels in [0, 255]. The encoding layer (the first layer of
every network) calls :func:`check_pixels` on its input, so the checks travel with the model
(``model.predict``, ``model(x)``, ``fit`` / ``evaluate``, a saved and reloaded model) and need
no wrapper. A batch is refused with ``tf.errors.InvalidArgumentError`` whose message starts
with ``glt_keras:`` and says what is wrong when it

- holds NaN or inf;
- looks normalised: every value <= 1 and some value not a whole number (images in [0, 1]
  or [-1, 1]; an all-black uint8 frame, all 0 or 1, is still accepted);
- lies outside [-1, 256] (standardised or mean-subtracted data, uint16 pixels; one level of
  slack for resampling);
- has another height / width than the model was built for. Keras checks the shape itself
  when it is known while tracing, but ``model.predict`` retraces with relaxed shapes
  ``(None, None, None, 3)`` after a first call, and a fully convolutional network then
  answers any size: the check compares the runtime shape with the built one.

They cost a few element-wise reductions per batch (nothing next to the first convolution)
and vanish from exports: the LCE / TFLite converter drops ``Assert`` ops and the code that
only feeds them, and with the fixed input shape of a converted model the size check is
decided while tracing. ``GLT_KERAS_SKIP_PIXEL_CHECKS=1`` turns them off (benchmarks of the
raw graph).
"""
from __future__ import annotations

import os

import tensorflow as tf

PIXEL_MAX = 255.0
#: Values outside [LOW, HIGH] are not raw pixels (one level of slack for resampling).
LOW, HIGH = -1.0, PIXEL_MAX + 1.0


def check_pixels(x: tf.Tensor, built_shape=None, name: str = "encoding") -> tf.Tensor:
    """``x`` (float32 NHWC pixels), after asserting that they are raw pixels of the right size.

    ``built_shape``: the input shape the layer was built for; its height and width are
    enforced at run time when the traced shape leaves them open.
    """
    if os.environ.get("GLT_KERAS_SKIP_PIXEL_CHECKS") == "1":
        return x
    checks = []
    hw = _runtime_hw_check(x, built_shape, name)
    if hw is not None:
        checks.append(hw)
    finite = tf.reduce_all(tf.math.is_finite(x))
    checks.append(tf.debugging.Assert(
        finite, [f"glt_keras: {name} got NaN or inf pixels; zoo models take raw RGB pixels in [0, 255]."],
        name="pixels_finite"))
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    fractional = tf.reduce_any(tf.not_equal(x, tf.round(x)))
    normalised = tf.logical_and(hi <= 1.0, fractional)
    checks.append(tf.debugging.Assert(
        tf.logical_not(normalised),
        [f"glt_keras: {name} got pixels that look normalised (all <= 1 with fractions, e.g. images in "
         "[0, 1]); zoo models take raw RGB pixels in [0, 255]: pass the uint8 image, or multiply by 255. "
         "Batch min / max:", lo, hi], name="pixels_not_normalised"))
    checks.append(tf.debugging.Assert(
        tf.logical_and(lo >= LOW, hi <= HIGH),
        [f"glt_keras: {name} got pixels outside [0, 255] (standardised or mean-subtracted images?); zoo "
         "models take raw RGB pixels in [0, 255], never normalised. Batch min / max:", lo, hi],
        name="pixels_in_range"))
    with tf.control_dependencies(checks):
        return tf.identity(x)


def _runtime_hw_check(x, built_shape, name):
    if built_shape is None:
        return None
    try:
        built = tf.TensorShape(built_shape).as_list()
    except (TypeError, ValueError):
        return None
    if len(built) != 4 or built[1] is None or built[2] is None:
        return None  # built for any size
    static = x.shape.as_list() if x.shape.rank == 4 else [None] * 4
    if static[1] is not None and static[2] is not None:
        return None  # known while tracing: Keras' own input check applies
    size = tf.shape(x)[1:3]
    return tf.debugging.Assert(
        tf.reduce_all(tf.equal(size, [built[1], built[2]])),
        [f"glt_keras: {name} was built for {built[1]}x{built[2]} images, got height x width", size,
         "; resize the images (or load the model with input_shape=...)."], name="pixels_size")
