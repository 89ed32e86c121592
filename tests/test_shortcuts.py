"""Real-valued shortcuts around binary blocks (``model.shortcuts``, Bi-Real Net): free in
weights, converted to LceBconv2d + ADD, LCE output equal to Keras, the C export refuses them."""
import numpy as np
import pytest
import tensorflow as tf

from glt_keras.convert import to_tflite
from glt_keras.layers.blocks import conv_block, shortcut_fits
from glt_keras.mcu import UnsupportedLayerError, export_c
from glt_keras.models import for_export, glt_net

SHAPE = (32, 32, 3)
# 64 -> 64 (same width: plain add), 64 -> 128 (doubled: the input repeated), 128 -> 96 (no fit).
WIDTHS, GROUPS, POOLS = (64, 64, 128, 96), (1, 2, 2, 1), (True, False, True, False)


def net(shortcuts, **kwargs):
    tf.keras.utils.set_random_seed(0)
    return glt_net(input_shape=SHAPE, num_classes=10, topology=None, widths=WIDTHS, groups=GROUPS,
                   pools=POOLS, shuffle=True, shortcuts=shortcuts, **kwargs)


def randomize_batchnorm(model, seed=0):
    # Trained-looking BN statistics, so that shortcut and conv both move the signs.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n),
                               rng.normal(0, 2.0, n), rng.uniform(1.0, 4.0, n)])


def pixels(n=6, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + SHAPE).astype(np.uint8)


def test_shortcuts_add_no_weights_and_join_the_blocks_that_fit():
    plain, residual = net(False), net(True)
    assert residual.count_params() == plain.count_params()
    adds = sorted(layer.name for layer in residual.layers if isinstance(layer, tf.keras.layers.Add))
    # block1 reads the thermometer; block4 narrows 128 -> 96, which no weight-free shortcut fits.
    assert adds == ["block2_add", "block3_add"]
    widen = residual.get_layer("block3_widen")
    assert widen.output.shape[-1] == 128 and widen.input[0].shape[-1] == 64
    assert not any(isinstance(layer, tf.keras.layers.Add) for layer in plain.layers)


def test_shortcut_carries_the_block_input():
    model = net(True, classifier_activation=None)
    randomize_batchnorm(model)
    x = pixels(2).astype(np.float32)
    probe = tf.keras.Model(model.input, [model.get_layer("block2_bn").output,
                                         model.get_layer("block1_pool").output,
                                         model.get_layer("block2_add").output])
    bn, block_input, added = (t.numpy() for t in probe(x, training=False))
    np.testing.assert_allclose(added, bn + block_input, rtol=1e-6, atol=1e-5)
    probe = tf.keras.Model(model.input, [model.get_layer("block3_bn").output,
                                         model.get_layer("block2_shuffle").output,
                                         model.get_layer("block3_add").output])
    bn, block_input, added = (t.numpy() for t in probe(x, training=False))
    np.testing.assert_allclose(added, bn + np.concatenate([block_input, block_input], -1), rtol=1e-6, atol=1e-5)


def test_gradient_reaches_the_first_block_through_the_shortcut():
    model = net(True, classifier_activation=None)
    x = tf.constant(pixels(4).astype(np.float32))
    target = tf.constant(np.random.default_rng(2).normal(size=(4, 10)), tf.float32)
    with tf.GradientTape() as tape:  # not a plain sum of logits: training-mode BN would zero it
        loss = tf.reduce_sum(tf.square(model(x, training=True) - target))
    bn_gamma = model.get_layer("block1_bn").gamma
    grad = tape.gradient(loss, bn_gamma)
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0


def test_residual_model_converts_fully_binary_and_matches_keras(tmp_path):
    model = net(True)
    randomize_batchnorm(model)
    result = to_tflite(model, tmp_path / "residual.tflite", verify_images=pixels(8))
    report = result.report
    assert report.all_binary and report.float_convs == []
    assert report.op_counts["LceBconv2d"] == 5  # four blocks and the head
    assert report.op_counts["ADD"] >= 2  # the two shortcuts (the thermometer may add one more)
    assert result.verification.passed and result.verification.n_images == 8


def test_export_form_keeps_the_shortcuts():
    model = net(True)
    randomize_batchnorm(model)
    exported = for_export(model)
    assert [l.name for l in exported.layers if isinstance(l, tf.keras.layers.Add)] == ["block2_add", "block3_add"]
    x = pixels(3).astype(np.float32)
    np.testing.assert_allclose(exported(x, training=False), model(x, training=False), atol=1e-5)


def test_impossible_shortcut_is_a_clear_error():
    assert shortcut_fits(64, 128) and shortcut_fits(64, 64)
    assert not shortcut_fits(128, 96) and not shortcut_fits(64, 64, strides=2)
    x = tf.keras.Input((8, 8, 64))
    with pytest.raises(ValueError, match=r"blockX: no weight-free shortcut from 64 channels to 96"):
        conv_block(x, 96, name="blockX", shortcut=True)


def test_c_export_refuses_a_residual_model(tmp_path):
    with pytest.raises(UnsupportedLayerError, match="no branches or merges"):
        export_c(net(True), tmp_path / "residual")


def test_block_pruning_leaves_blocks_with_a_shortcut_whole():
    from glt_keras.training.pruning.structure import block_structure

    structures = {s.name: s for s in block_structure(net(True))}
    # block1 feeds block2's conv and its shortcut; blocks 2-3 feed their ADD: two consumers each.
    assert [name for name, s in structures.items() if s.prunable] == ["block4"]
    assert "does not feed exactly one conv" in structures["block2"].reason
    assert sum(s.prunable for s in block_structure(net(False))) > 1
