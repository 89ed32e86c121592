"""Behaviour of training.precision: mixed_bfloat16 training with a float32 thermometer and
head, the straight-through gradient as a multiply, and the float32 path as it was."""
import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from larq import quantizers

from glt_keras import _cpu
from glt_keras.layers.encoding import FixedThermometer, LearnedThermometer
from glt_keras.models import for_export, glt_net
from glt_keras.recipe import Recipe, RecipeError
from glt_keras.training import precision
from glt_keras.training.schedule import make_optimizer

SHAPE = (32, 32, 3)
#: Thresholds that bfloat16 cannot hold: half-integers above 128 after the snap, values on and
#: just below whole pixels (the snap band), and one near each end of the range.
HARD_THRESHOLDS = [[3.2, 60.0, 128.0, 129.6, 170.0, 199.9995, 231.4, 254.0],
                   [0.9, 100.5, 140.2, 160.0, 181.7, 203.0, 222.25, 245.6],
                   [12.0, 33.3, 131.0, 150.99, 190.5, 201.2, 240.0, 250.1]]


def all_pixels():
    """Every uint8 value in every channel: (1, 16, 16, 3) float pixels, 0..255."""
    return np.tile(np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1), (1, 1, 1, 3))


def tiny(**kwargs):
    return glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", classifier_activation=None, **kwargs)


def one_step(model, seed=0):
    """One training step with the recipe's optimizer (larq CaseOptimizer) and loss."""
    optimizer = make_optimizer({"binary_lr": 1e-2, "real_lr": 1e-2}, 10, 1, model)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (16,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    model.train_on_batch(x, y)
    return optimizer


@pytest.mark.parametrize("cls", [LearnedThermometer, FixedThermometer])
def test_thermometer_under_bfloat16_encodes_all_256_pixels_as_float32(cls):
    pixels = all_pixels()
    reference = cls(levels=8)
    reference(pixels)
    if cls is LearnedThermometer:
        reference.set_thresholds(HARD_THRESHOLDS)
    with precision.policy("mixed_bfloat16"):
        layer = cls(levels=8)
        layer(pixels)
    layer.set_weights(reference.get_weights())
    assert layer.dtype_policy.name == "float32" and layer.threshold_logits.dtype == tf.float32
    expected = reference(pixels).numpy()
    got = layer(pixels).numpy()
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == {-1.0, 1.0}
    # ... and the thresholds it compares with are the float32 half-integers.
    np.testing.assert_array_equal(layer.effective_thresholds(), reference.effective_thresholds())


def test_thermometer_computed_in_bfloat16_would_get_pixels_wrong():
    # Why the encoding keeps float32: in bfloat16 the half-integer thresholds above 128 round
    # to whole values, which pixels then equal, and the code changes.
    layer = LearnedThermometer(levels=8)
    layer(all_pixels())
    layer.set_thresholds(HARD_THRESHOLDS)
    t = layer.effective_thresholds()
    t16 = tf.cast(tf.cast(t, tf.bfloat16), tf.float32).numpy()
    assert np.any(t16 != t)
    p = np.arange(256, dtype=np.float32)[:, None, None]
    assert np.any((p >= t16) != (p >= t))


def test_bfloat16_model_keeps_float32_variables_encoding_and_head():
    with precision.policy("mixed_bfloat16"):
        model = tiny()
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # restored
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["encoding"] == "float32"
    assert policies["head_conv"] == policies["head_bn"] == policies["head_pool"] == "float32"
    assert policies["block1_conv"] == policies["block1_bn"] == "mixed_bfloat16"
    assert model.get_layer("head_conv").input_quantizer.dtype_policy.name == "float32"
    assert all(v.dtype == tf.float32 for v in model.variables)
    assert model.output.dtype == tf.float32
    # larq's CaseOptimizer finds the same latent binary weights as in float32.
    is_binary = lq.optimizers.Bop.is_binary_variable
    binary = [v.name for v in model.trainable_variables if is_binary(v)]
    assert len(binary) == len([v for v in tiny().trainable_variables if is_binary(v)]) == 3


def test_model_trained_under_bfloat16_converts_and_lce_matches_keras(tmp_path):
    from glt_keras.convert import to_tflite

    tf.keras.utils.set_random_seed(0)
    with precision.policy("mixed_bfloat16"):
        model = glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", widths=(64, 64), groups=(1, 2),
                        classifier_activation=None)
        before = [w.copy() for w in model.get_weights()]
        one_step(model)
    assert any(np.any(a != b) for a, b in zip(before, model.get_weights()))  # it trained
    exported = for_export(model)
    assert {layer.dtype_policy.name for layer in exported.layers} == {"float32"}
    images = np.random.default_rng(3).integers(0, 256, (6,) + SHAPE).astype(np.uint8)
    result = to_tflite(model, tmp_path / "bf16.tflite", verify_images=images)
    assert result.report.all_binary and result.report.op_counts["LceBconv2d"] == 3
    # to_tflite verifies against the float32 copy; check against the rebuilt float32 network too.
    float_model = glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", widths=(64, 64), groups=(1, 2),
                          classifier_activation=None)
    float_model.set_weights(model.get_weights())
    from glt_keras.convert import verify_tflite

    check = verify_tflite(tmp_path / "bf16.tflite", float_model, images)
    assert check.passed and check.argmax_agreement == 1.0


def test_straight_through_gradient_as_multiply_keeps_float32_training_identical():
    # Same initial weights, one step with larq's tf.where gradient and one with the multiply.
    original = quantizers._larq_clipped_gradient
    fast = quantizers._clipped_gradient
    assert fast is not original
    results = []
    for grad in (original, fast):
        quantizers._clipped_gradient = grad
        try:
            tf.keras.utils.set_random_seed(0)
            model = tiny()
            one_step(model)
            results.append(model.get_weights())
        finally:
            quantizers._clipped_gradient = fast
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_clipped_gradient_values():
    from glt_keras.layers.ste import clipped_gradient

    x = tf.constant([-2.0, -1.0, -0.5, 0.0, 1.0, 1.5])
    dy = tf.constant([1.0, -2.0, 3.0, -4.0, 5.0, 6.0])
    np.testing.assert_array_equal(clipped_gradient(x, dy, 1.0).numpy(), [0, -2, 3, -4, 5, 0])
    assert clipped_gradient(x, dy, None) is dy
    bf = clipped_gradient(tf.cast(x, tf.bfloat16), tf.cast(dy, tf.bfloat16), 1.0)
    assert bf.dtype == tf.bfloat16 and bf.numpy().astype(np.float32).tolist() == [0, -2, 3, -4, 5, 0]


def test_float32_model_keeps_split_groups_and_its_config():
    model = tiny()
    conv = model.get_layer("block2_conv")
    assert conv.groups == 2 and conv.split_groups and not conv._fuse_groups()
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    with precision.policy("mixed_bfloat16"):
        fused = tiny().get_layer("block2_conv")
    assert fused._fuse_groups() == _cpu.onednn_enabled()


def test_resolve_and_recipe_key(monkeypatch):
    assert precision.resolve(None) == "float32" == precision.resolve("float32")
    assert precision.resolve("mixed_bfloat16") == "mixed_bfloat16"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda: False)
    assert precision.resolve("auto") == "float32"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda: True)
    assert precision.resolve("auto") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve("float16")
    base = dict(name="r", model={"topology": "tiny"}, input_shape=SHAPE, classes=list("abcdefghij"))
    assert Recipe(**base).training["precision"] == "float32"
    assert Recipe(**base, training={"precision": "auto"}).training["precision"] == "auto"
    with pytest.raises(RecipeError, match="training.precision"):
        Recipe(**base, training={"precision": "bf16"})


def test_auto_needs_the_cpu_flags_and_onednn(monkeypatch):
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert not _cpu.bf16_is_fast()
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(_cpu, "onednn_enabled", lambda: False)
    assert not _cpu.bf16_is_fast()
    monkeypatch.setattr(_cpu, "onednn_enabled", lambda: True)
    assert _cpu.bf16_is_fast()


def test_bfloat16_run_trains_resumes_in_float32_and_its_weights_load_float32(tmp_path, image_folder):
    from test_training import tiny_recipe

    from glt_keras.models import load_weights
    from glt_keras.training import train

    run = tmp_path / "run"
    summary = train(tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, precision="mixed_bfloat16")
    assert summary["epochs"] == 3 and summary["best_val_accuracy"] >= 0.75, summary  # dark vs bright
    assert "precision: mixed_bfloat16" in (run / "recipe.yaml").read_text()
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    # Checkpoints hold float32 variables: a float32 session continues the run.
    summary = train(tiny_recipe(image_folder, epochs=4), out_dir=run, verbose=0, resume=True, precision="float32")
    assert summary["epochs"] == 4
    model = tiny_recipe(image_folder).build_model()
    load_weights(model, run / "best_weights.h5")
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
