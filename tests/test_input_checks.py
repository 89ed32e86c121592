"""Zoo models refuse inputs that are not raw pixels of their size, instead of answering (issue 15)."""
import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def tiny():
    from glt_keras.models import glt_net

    return glt_net(input_shape=(32, 32, 3), num_classes=2, topology="tiny")


def _pixels(shape=(4, 32, 32, 3)):
    return np.random.default_rng(0).integers(0, 256, shape).astype("float32")


@pytest.mark.parametrize("encoding", ["glt", "fixed", "binary_planes", "real"])
def test_raw_pixels_are_accepted(encoding):
    from glt_keras.models import glt_net

    model = glt_net(input_shape=(32, 32, 3), num_classes=2, topology="tiny", encoding=encoding)
    x = _pixels()
    for batch in (x, x.astype("uint8"), np.zeros_like(x), np.ones_like(x), x + 0.5 * (x < 255)):
        assert model.predict(batch, verbose=0).shape == (4, 2)


@pytest.mark.parametrize("bad, message", [
    (lambda x: x / 255.0, "look normalised"),
    (lambda x: x / 127.5 - 1.0, "look normalised"),
    (lambda x: (x - 120.0) / 60.0, "outside \\[0, 255\\]"),
    (lambda x: x * 257.0, "outside \\[0, 255\\]"),
    (lambda x: np.where(x > 250, np.nan, x), "NaN or inf"),
    (lambda x: np.where(x > 250, np.inf, x), "NaN or inf"),
])
def test_not_raw_pixels_raise_a_clear_error(tiny, bad, message):
    tiny.predict(_pixels(), verbose=0)
    for call in (lambda v: tiny.predict(v, verbose=0), lambda v: tiny(v)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="glt_keras: .*" + message):
            call(bad(_pixels()))


def test_wrong_image_size_is_refused_even_after_a_valid_call(tiny):
    tiny.predict(_pixels(), verbose=0)  # a valid call first: Keras then retraces with relaxed shapes
    for size in (16, 64):
        with pytest.raises(tf.errors.InvalidArgumentError, match="built for 32x32 images"):
            tiny.predict(_pixels((4, size, size, 3)), verbose=0)
    with pytest.raises(ValueError, match="incompatible"):
        tiny(_pixels((4, 16, 16, 3)))
    assert tiny.predict(_pixels(), verbose=0).shape == (4, 2)


def test_pixel_checks_leave_the_lce_flatbuffer_unchanged(tiny, monkeypatch):
    import larq_compute_engine as lce

    from glt_keras.convert.inspect import inspect_flatbuffer
    from glt_keras.models import for_export

    with_checks = inspect_flatbuffer(lce.convert_keras_model(for_export(tiny)))
    monkeypatch.setenv("GLT_KERAS_SKIP_PIXEL_CHECKS", "1")
    without = inspect_flatbuffer(lce.convert_keras_model(for_export(tiny)))
    assert with_checks.op_counts == without.op_counts
    assert with_checks.op_counts["LceBconv2d"] == 3 and "CONV_2D" not in with_checks.op_counts
