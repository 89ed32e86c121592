"""Behaviour of the input encodings, binary convolutions and blocks."""
import numpy as np
import pytest
import tensorflow as tf

import larq_compute_engine as lce
from glt_keras import models
from glt_keras.layers.binary import BinaryConv2D, ChannelShuffle
from glt_keras.layers.encoding import (
    SNAP_BAND,
    BinaryPlanes,
    FixedThermometer,
    LearnedThermometer,
    plot_transfer_curve,
)


def pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype("float32")


# ----------------------------------------------------------------------------- thermometer
def test_thermometer_output_matches_threshold_comparison():
    enc = LearnedThermometer(levels=4, initial_thresholds=[[10.2, 50.7, 100.4, 200.9]] * 3)
    x = pixels((2, 5, 5, 3))
    out = enc(x).numpy()
    t = enc.thresholds()
    expected = np.where(x[..., :, None] >= t[None, None, None], 1.0, -1.0).reshape(2, 5, 5, 12)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(t, [[10.2, 50.7, 100.4, 200.9]] * 3, atol=1e-3)
    np.testing.assert_array_equal(enc.effective_thresholds(), [[10.5, 50.5, 100.5, 200.5]] * 3)


ALL_PIXELS = np.arange(256, dtype="float32")


def encode_all_pixels(enc, channels=3):
    """The layer's +-1 planes for every uint8 value: (256, channels, levels) booleans."""
    x = np.repeat(ALL_PIXELS[:, None], channels, 1)[None, None]
    return enc(x).numpy()[0, 0].reshape(256, channels, -1) > 0


@pytest.mark.parametrize("cls", [LearnedThermometer, FixedThermometer])
def test_integer_pixels_never_sit_on_a_threshold(cls):
    # On a whole value, within float error of one (85.0000076 is 255*3/9 in float32 without
    # oneDNN, 85.0 with it), and far from one: the effective thresholds are half-integers
    # and every uint8 pixel encodes as p > t + 2**-10, whatever float32 made of t.
    near = [[0.75, 85.0, 85.0000076, 120.9995, 170.000015, 200.0009, 230.3, 254.0]]
    enc = cls(levels=8, initial_thresholds=near * 3, min_gap=0.0)
    planes = encode_all_pixels(enc)
    t_eff = enc.effective_thresholds()
    assert np.all(t_eff % 1.0 == 0.5), t_eff
    np.testing.assert_array_equal(t_eff[0], [0.5, 85.5, 85.5, 121.5, 170.5, 200.5, 230.5, 254.5])
    np.testing.assert_array_equal(planes, ALL_PIXELS[:, None, None] >= t_eff[None])
    # Pixel - threshold is never zero or tiny for an integer pixel: no rounding can flip it.
    assert np.abs(ALL_PIXELS[:, None, None] - t_eff[None]).min() == 0.5
    # The rule on the latent thresholds (float64): p > t + 2**-10.
    t64 = np.asarray(near[0], "float64")
    np.testing.assert_array_equal(planes[:, 0], ALL_PIXELS[:, None] > t64[None] + SNAP_BAND)


def test_default_uniform_thresholds_85_and_170_act_as_half_integers():
    # 255 * k / 9 for k = 3, 6 are whole numbers: the pixels 85 and 170 used to encode one way
    # with oneDNN and the other without. Now they are below their thresholds on every CPU.
    for enc in (FixedThermometer(), LearnedThermometer()):
        planes = encode_all_pixels(enc)
        t_eff = enc.effective_thresholds()
        assert 85.5 in t_eff[0] and 170.5 in t_eff[0], t_eff
        k = list(t_eff[0]).index(85.5)
        assert not planes[85, :, k].any() and planes[86, :, k].all()


def test_gradient_reaches_the_latent_thresholds_straight_through_the_snap():
    enc = LearnedThermometer(levels=4, initial_thresholds=[[20.3, 85.0, 140.7, 200.2]] * 3)
    enc(tf.zeros((1, 1, 1, 3)))
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 4)).astype("float32"))
    grads = []
    for thresholds in (enc._thresholds_tensor, enc._effective_thresholds_tensor):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(thresholds() * w)
        grads.append(tape.gradient(loss, enc.threshold_logits).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)
    assert np.abs(grads[0]).sum() > 0


def _float64_thresholds(enc):
    logits = enc.threshold_logits.numpy().astype("float64") * enc.threshold_lr_multiplier
    shares = np.exp(logits - logits.max(-1, keepdims=True))
    shares /= shares.sum(-1, keepdims=True)
    increments = enc.min_gap + (255.0 - (enc.levels + 1) * enc.min_gap) * shares
    t = np.cumsum(increments, -1)[:, : enc.levels]
    return np.tile(t, (enc.channels, 1)) if t.shape[0] == 1 else t


#: Zoo thresholds whose encoding of integer pixels differs from ``pixel >= t`` with the
#: float64 thresholds (model -> [(channel, level)]): a threshold within SNAP_BAND below a whole
#: value, which the snap puts above it. The forward pass always used the snapped threshold, so the
#: model was trained and verified (Keras, LCE, C) with it. vww_binary_pruned (session 18): red
#: level 4 at 126.99983 acts as 127.5, so pixel 127 is below it.
ZOO_ENCODING_CHANGES = {"vww_binary_pruned": [(0, 4)]}


def test_zoo_models_keep_their_encoding_of_every_uint8_value():
    from glt_keras import zoo

    names = zoo.list_models(pretrained=True)
    assert names, "no published zoo model to check"
    changed = {}
    for name in names:
        enc = zoo.load(name).get_layer("encoding")
        planes = encode_all_pixels(enc, enc.channels)
        want = ALL_PIXELS[:, None, None] >= _float64_thresholds(enc)[None]
        diff = sorted({(int(c), int(k)) for c, k in np.argwhere((planes != want).any(0))})
        if diff:
            changed[name] = diff
    assert changed == ZOO_ENCODING_CHANGES


def test_thresholds_stay_ordered_and_in_range_under_large_steps():
    enc = LearnedThermometer(levels=8, threshold_lr_multiplier=10.0)
    x = tf.constant(pixels((8, 6, 6, 3)))
    enc(x)
    opt = tf.keras.optimizers.SGD(learning_rate=1e4)
    target = tf.constant(np.random.default_rng(1).choice([-1.0, 1.0], (8, 6, 6, 24)).astype("float32"))
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(enc(x) * target)
        grads = tape.gradient(loss, enc.trainable_variables)
        opt.apply_gradients(zip(grads, enc.trainable_variables))
        t = enc.thresholds()
        assert np.all(np.diff(t, axis=1) > 0), t
        assert np.all(t > 0) and np.all(t < 255), t


def test_thresholds_receive_nonzero_gradient():
    enc = LearnedThermometer(levels=8)
    x = tf.constant(pixels((4, 8, 8, 3)))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(enc(x) * tf.range(24, dtype=tf.float32))
    (grad,) = tape.gradient(loss, enc.trainable_variables)
    assert grad is not None
    assert np.abs(grad.numpy()).sum() > 0


def test_fixed_thermometer_is_not_trainable_and_uniform():
    enc = FixedThermometer(levels=3)
    enc(tf.zeros((1, 1, 1, 3)))
    assert enc.trainable_variables == []
    np.testing.assert_allclose(enc.thresholds()[0], [63.75, 127.5, 191.25], atol=1e-3)


def test_quantile_initialisation_matches_data_quantiles():
    rng = np.random.default_rng(0)
    # Different distributions per channel: per-channel thresholds must follow them.
    x = np.stack([rng.normal(60, 10, (50, 16, 16)), rng.uniform(0, 255, (50, 16, 16)),
                  rng.normal(200, 15, (50, 16, 16))], -1).clip(0, 255).astype("float32")
    enc = LearnedThermometer(levels=4)
    t = enc.init_from_data(x)
    qs = np.quantile(x.reshape(-1, 3), [0.2, 0.4, 0.6, 0.8], axis=0).T
    np.testing.assert_allclose(t, qs, atol=0.05)
    # Each level then holds about the same share of pixels.
    counts = (x.reshape(-1, 3)[:, :, None] >= t[None]).mean(0)
    np.testing.assert_allclose(counts, [[0.8, 0.6, 0.4, 0.2]] * 3, atol=0.01)


def test_quantile_initialisation_handles_ties():
    x = np.zeros((10, 4, 4, 3), "float32")  # all black: every quantile ties at 0
    t = LearnedThermometer(levels=4).init_from_data(x)
    assert np.all(np.diff(t, axis=1) > 0) and np.all(t > 0) and np.all(t < 255)


def test_shared_thresholds():
    enc = LearnedThermometer(levels=4, per_channel=False)
    enc(tf.zeros((1, 1, 1, 3)))
    assert enc.threshold_logits.shape == (1, 5)
    assert enc.thresholds().shape == (3, 4)


def test_invalid_initial_thresholds_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        LearnedThermometer(levels=3, initial_thresholds=[50, 40, 100])(tf.zeros((1, 1, 1, 1)))


def test_binary_planes_are_the_bits():
    x = np.array([0, 1, 128, 255, 77], "float32").reshape(1, 1, 5, 1)
    out = BinaryPlanes()(x).numpy().reshape(5, 8)
    bits = np.unpackbits(np.array([0, 1, 128, 255, 77], np.uint8)).reshape(5, 8)
    np.testing.assert_array_equal(out, np.where(bits == 1, 1.0, -1.0))


def test_snapped_thresholds_convert_to_a_small_sub_and_encode_like_keras():
    # The bare encoding, thresholds on / near whole values: LCE folds the effective thresholds
    # into one (C*levels,) constant feeding SUB -> LceQuantize and encodes all 256 values as Keras.
    near = [[0.75, 85.0, 85.0000076, 120.9995, 170.000015, 200.0009, 230.3, 254.0]]
    inputs = tf.keras.Input((16, 16, 3))
    enc = LearnedThermometer(levels=8, initial_thresholds=near * 3, min_gap=0.0, name="encoding")
    model = tf.keras.Model(inputs, enc(inputs))
    flatbuffer = lce.convert_keras_model(model)
    ops = _census(flatbuffer)
    assert "SUB" in ops and "LceQuantize" in ops, ops
    from tensorflow.lite.python import schema_py_generated as schema

    fb = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sizes = sorted(len(b.data) for b in fb.buffers if b.data is not None)
    assert sizes[-1] == 24 * 4, sizes  # the (24,) float32 thresholds are the largest constant
    sub = next(op for op in fb.subgraphs[0].operators
               if fb.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.SUB)
    consts = [np.frombuffer(bytes(fb.buffers[fb.subgraphs[0].tensors[i].buffer].data), "float32")
              for i in sub.inputs if fb.buffers[fb.subgraphs[0].tensors[i].buffer].data is not None]
    np.testing.assert_array_equal(consts[0], enc.effective_thresholds().reshape(-1))
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    x = np.zeros((1, 16, 16, 3), "float32")
    x.reshape(-1, 3)[:] = ALL_PIXELS[:, None]
    got = Interpreter(flatbuffer, num_threads=1).predict(x)
    np.testing.assert_array_equal(got, model.predict(x, verbose=0))


def test_transfer_curve_plot(tmp_path):
    enc = LearnedThermometer(levels=8)
    enc(tf.zeros((1, 1, 1, 3)))
    path = plot_transfer_curve(enc, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert str(path).endswith("curve.png")


# ----------------------------------------------------------------------------- binary conv
def test_split_and_native_grouped_give_identical_outputs():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 7, 7, 128)).astype("float32"))
    split = BinaryConv2D(64, 3, groups=4, split_groups=True)
    native = BinaryConv2D(64, 3, groups=4, split_groups=False)
    split(x), native(x)
    native.set_weights(split.get_weights())
    np.testing.assert_array_equal(split(x).numpy(), native(x).numpy())


def test_split_conv_gradients_match_native():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 5, 64)).astype("float32"))
    split = BinaryConv2D(64, 3, groups=2, split_groups=True)
    native = BinaryConv2D(64, 3, groups=2, split_groups=False)
    split(x), native(x)
    native.set_weights(split.get_weights())
    grads = []
    for layer in (split, native):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        grads.append(tape.gradient(loss, layer.trainable_variables)[0].numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-4)


def test_invalid_group_width_raises_at_construction_naming_layer():
    inputs = tf.keras.Input((8, 8, 32))
    with pytest.raises(ValueError, match=r"bad_conv.*16 input channels.*multiple of 32"):
        BinaryConv2D(32, 3, groups=2, name="bad_conv")(inputs)
    with pytest.raises(ValueError, match="multiple of groups"):
        BinaryConv2D(30, 3, groups=4)
    # The explicit opt-out builds.
    BinaryConv2D(32, 3, groups=2, lce_check=False)(inputs)


def test_padding_is_plus_one():
    conv = BinaryConv2D(1, 3, kernel_initializer="ones", input_quantizer=None, kernel_quantizer=None)
    out = conv(tf.zeros((1, 3, 3, 1))).numpy()[0, :, :, 0]
    # Zero input, +1 padding: corners see 5 padded ones, edges 3, the centre none.
    np.testing.assert_array_equal(out, [[5, 3, 5], [3, 0, 3], [5, 3, 5]])


def test_channel_shuffle_is_a_permutation():
    x = tf.reshape(tf.range(12.0), (1, 1, 1, 12))
    out = ChannelShuffle(3)(x).numpy().ravel()
    assert sorted(out) == list(range(12))
    np.testing.assert_array_equal(out, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])


# ----------------------------------------------------------------------------- whole nets
def _census(flatbuffer):
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    names = []
    for op in model.subgraphs[0].operators:
        code = model.operatorCodes[op.opcodeIndex]
        if code.customCode:
            names.append(code.customCode.decode())
        else:
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            names.append(next(k for k, v in vars(schema.BuiltinOperator).items() if v == builtin))
    return names


@pytest.mark.parametrize("encoding, input_quantizer",
                         [("glt", "ste_sign"), ("fixed", "ste_sign"), ("glt", "approx_sign")])
def test_small_network_converts_fully_binary_and_matches_keras(encoding, input_quantizer):
    model = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny",
                           encoding=encoding, input_quantizer=input_quantizer, classifier_activation=None)
    # Non-trivial BN statistics so the comparison is not of near-zero logits.
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 3, n), rng.uniform(1, 9, n)])
    export = models.for_export(model)
    flatbuffer = lce.convert_keras_model(export)
    ops = _census(flatbuffer)
    assert ops.count("LceBconv2d") == 3, ops  # two blocks + the head
    for float_op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        assert float_op not in ops, ops
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    x = pixels((8, 32, 32, 3), seed=3)
    got = Interpreter(flatbuffer, num_threads=1, use_indirect_bgemm=True).predict(x)
    want = model.predict(x, verbose=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def test_approx_sign_trains_every_binary_layer_but_the_first_and_thresholds_still_learn():
    model = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny",
                           input_quantizer="approx_sign", classifier_activation=None)
    quantizers = {layer.name: type(layer.input_quantizer).__name__ for layer in model.layers
                  if isinstance(layer, BinaryConv2D)}
    # block1 reads the thermometer's exact +-1, where approx_sign's gradient is 0.
    assert quantizers == {"block1_conv": "SteSign", "block2_conv": "ApproxSign", "head_conv": "ApproxSign"}
    x = tf.constant(pixels((4, 32, 32, 3), seed=1))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x, training=True)))
    encoding = model.get_layer("encoding")
    grads = tape.gradient(loss, encoding.trainable_weights)
    assert grads and all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    with pytest.raises(ValueError, match="input_quantizer must be one of"):
        models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny", input_quantizer="sign")


def test_two_step_training_real_kernels_first_then_the_binary_network_starts_from_them():
    step1 = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny", binary_weights=False)
    convs = [layer for layer in step1.layers if isinstance(layer, BinaryConv2D)]
    assert [c.name for c in convs] == ["block1_conv", "block2_conv", "head_conv"]
    assert all(c.kernel_quantizer is None and c.kernel_constraint is None for c in convs)
    assert all(c.input_quantizer is not None for c in convs)  # activations stay binary
    assert models.model_summary(step1)["binary_params"] == 0
    kernel = convs[1].kernel
    kernel.assign(tf.fill(kernel.shape, 1.5))  # outside [-1, 1]: a clip would show
    x = tf.constant(pixels((4, 32, 32, 3), seed=2))
    step1.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    step1.train_on_batch(x, tf.constant([0, 1, 2, 3]))
    assert float(tf.reduce_max(tf.abs(kernel))) > 1.0  # real kernels: no weight clip
    # Step 2: the fully binary network of the same recipe loads every weight of step 1.
    step2 = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny")
    step2.set_weights(step1.get_weights())
    assert models.model_summary(step2)["binary_params"] == models.model_summary(step1)["real_conv_weight_bytes_int8"]
    binary_out = step2.predict(x, verbose=0)
    assert binary_out.shape == (4, 10) and not np.allclose(binary_out, step1.predict(x, verbose=0))


def test_model_summary_counts_by_hand():
    model = models.glt_net(input_shape=(8, 8, 3), num_classes=2, widths=(32,), groups=(1,),
                           pools=(False,), topology=None, levels=2)
    summary = models.model_summary(model)
    conv = 3 * 3 * 6 * 32  # GLT gives 3 * 2 = 6 planes
    head = 32 * 2
    assert summary["binary_params"] == conv + head
    assert summary["macs"] == conv * 64 + head * 64
    thresholds = 3 * 3  # logits: (channels, levels + 1)
    bn = 4 * 32 + 4 * 2
    assert summary["real_params"] == thresholds + bn
    assert summary["binary_weight_bytes"] == (conv + head + 7) // 8


def test_real_layers_switch_exactly_those_layers():
    base = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny")
    mixed = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny", real_layers=["block2"])
    kinds = {c.name: c.precision for c in models.layer_costs(mixed)}
    assert kinds == {"block1_conv": "binary", "block2_conv": "real", "head_conv": "binary"}
    assert [c.params for c in models.layer_costs(base)] == [c.params for c in models.layer_costs(mixed)]


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_models_save_and_load_by_name(tmp_path, fmt):
    model = models.glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny")
    model.get_layer("encoding").set_thresholds(np.linspace(20, 230, 8))
    x = pixels((2, 32, 32, 3))
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "saved"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)  # no custom_objects: registered by name
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert type(loaded.get_layer("encoding")).__name__ == "LearnedThermometer"
