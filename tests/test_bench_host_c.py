"""``glt-keras bench``'s host C rows: the exported C library, built for this machine, scored
and timed next to LCE on the same images, and its agreement with Keras counted."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from glt_keras.models import glt_net

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def model():
    """A tiny grouped binary network with trained-like (non-default) weights, logits out."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    model = glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", widths=(64, 64), groups=(1, 2),
                    classifier_activation=None)
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def test_bench_host_c_rows_agree_with_keras(model, monkeypatch):
    import glt_keras.data as data
    from glt_keras import bench

    x = np.random.default_rng(1).integers(0, 256, (24,) + SHAPE, dtype=np.uint8)
    y = np.random.default_rng(2).integers(0, 10, 24)
    monkeypatch.setitem(bench.TASKS, "fake", dict(input_shape=SHAPE, num_classes=10, dataset=("fake", "test"),
                                                  references=()))
    monkeypatch.setattr(data, "load_arrays", lambda name, split: SimpleNamespace(x=x, y=y))
    lce = bench.keras_entry(model, "toy")
    lce.keras_model = model
    host = bench.host_c_entry(model, "toy")
    assert host is not None and host.kind == bench.HOST_C and host.name == "toy (host C)"
    assert host.keras_model is model and host.runner.input_shape == (1,) + SHAPE
    assert host.runner.build["builtin_popcount"] and host.runner.build["cflags"] == list(bench.HOST_CFLAGS)
    lce.task = host.task = "fake"

    # The C library computes the Keras model: same scores (float head), same classes.
    keras = np.asarray(model(x.astype("float32"), training=False))
    scores = np.concatenate([host.runner.run_one(one) for one in host.runner.prepare(x)])
    np.testing.assert_allclose(scores, keras, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(host.runner.predict_classes(x), keras.argmax(1))

    result = bench.run_bench([lce, host], limit=None, warmup=1, repeats=2, rounds=1)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["toy (host C)"]["argmax_equal_keras"] == rows["toy (host C)"]["argmax_compared"] == len(x)
    assert rows["toy"]["argmax_compared"] == len(x)  # LCE's count too (not asserted equal: float path)
    assert rows["toy (host C)"]["accuracy"] == pytest.approx(np.mean(keras.argmax(1) == y))
    assert rows["toy (host C)"]["host_c"]["compiler"] and rows["toy (host C)"]["input"] == "uint8"
    assert "latency_ratio" in rows["toy (host C)"]  # timed in the same rounds as the LCE row
    table = bench.to_markdown(result)
    assert "| argmax = Keras |" in table and f"| {len(x)} / {len(x)} |" in table
    assert "-march=native" in table and "`__builtin_popcount`" in table


def test_bench_host_c_row_is_skipped_with_the_reason_when_the_model_cannot_be_exported(capsys):
    import tensorflow as tf

    from glt_keras import bench

    inputs = tf.keras.Input(SHAPE)
    float_model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(2, 3)(inputs))
    assert bench.host_c_entry(float_model, "float") is None
    err = capsys.readouterr().err
    assert err.startswith("bench: no host C row for float: ") and len(err.splitlines()) == 1
