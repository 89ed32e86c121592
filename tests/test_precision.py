"""Behaviour of training.precision: mixed_bfloat16 training with a float32 thermometer and
head, the straight-through gradient as a multiply, and the float32 path as it was."""
import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from larq import quantizers

from glt_keras import _cpu
from glt_keras.layers.binary import BinaryConv2D
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


def test_fast_approx_sign_gives_larqs_values_and_gradients():
    from glt_keras.layers.ste import approx_sign

    assert quantizers.approx_sign is approx_sign  # installed: ApproxSign layers train with it
    x = tf.constant([-2.0, -1.0, -0.75, -0.3, 0.0, 0.3, 0.999, 1.0, 1.5])
    dy = tf.constant([1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 8.0, 9.0])
    for dtype in (tf.float32, tf.bfloat16):
        xs, dys = tf.cast(x, dtype), tf.cast(dy, dtype)
        grads = []
        for fn in (quantizers._larq_approx_sign, approx_sign):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                y = fn(xs)
            grads.append(tape.gradient(y, xs, output_gradients=dys).numpy().astype(np.float32))
            np.testing.assert_array_equal(y.numpy().astype(np.float32), [-1, -1, -1, -1, 1, 1, 1, 1, 1])
        np.testing.assert_array_equal(grads[0], grads[1])
        assert grads[1][[0, 1, 7, 8]].tolist() == [0, 0, 0, 0] and grads[1][4] == 10.0


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


# --- a float32-trained model under mixed_bfloat16: the same +-1 activations in every layer ---
#
# With AMX, oneDNN's bfloat16 conv of TensorFlow 2.16 gets some stride >= 4 convs with fewer
# than 32 input channels wrong (glt96's 4x4 stride-4 conv on the thermometer's 24 planes: ~97 %
# of the sums); BinaryConv2D checks its shape once and computes such a conv in float32.
# Everything else is exact in bfloat16: +-1 products, sums of +-1 terms with the parity of
# K = kh * kw * cin / groups (bfloat16 holds every even integer up to 512), BatchNorm
# computed in float32 and rounded (sign kept), max-pooling and shuffles of rounded values.

#: A glt96-like network at 48x48: the 4x4 stride-4 patchify conv on 24 planes (K = 384),
#: grouped 3x3 convs and channel shuffles, every K <= 512.
GLT96_LIKE = dict(widths=(32, 64, 64, 128), groups=(1, 1, 2, 2), pools=(False, True, False, False),
                  kernels=(4, 3, 3, 3), strides=(4, 1, 1, 1), shuffle=True)
TOPOLOGY_CASES = {"tiny": ((32, 32, 3), dict(topology="tiny")),
                  "glt96_like": ((48, 48, 3), dict(topology=None, **GLT96_LIKE))}


def blocky_images(shape, n=12, seed=0):
    """Images of uniform 4x4 patches (dark, bright and everything between), so that whole
    receptive fields see the same thermometer code and biased kernels sum above 256."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    patches = rng.choice([0, 255, 40, 128, 200], size=(n, h // 4, w // 4, c), p=[0.3, 0.3, 0.1, 0.15, 0.15])
    noise = rng.integers(0, 256, (n, h // 4, w // 4, c))
    patches = np.where(rng.random(patches.shape) < 0.2, noise, patches)
    return np.repeat(np.repeat(patches, 4, axis=1), 4, axis=2).astype(np.float32)


def binary_model(shape, spec, seed=0):
    """A float32 model with latent kernels biased per output channel (some all +1 / all -1)
    and BatchNorm statistics set block by block on ``blocky_images`` so that each channel's
    threshold sits between the conv sums it sees, many of them above 256 in magnitude."""
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = glt_net(input_shape=shape, num_classes=10, classifier_activation=None, **spec)
    x = blocky_images(shape)
    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    for conv in convs:
        kernel = conv.kernel.numpy()
        p = rng.uniform(0.02, 0.98, kernel.shape[-1])
        p[rng.random(p.size) < 0.3] = 1.0
        p[rng.random(p.size) < 0.1] = 0.0
        signs = np.where(rng.random(kernel.shape) < p, 1.0, -1.0)
        conv.kernel.assign((signs * rng.uniform(0.05, 1.0, kernel.shape)).astype(np.float32))
        bn = model.get_layer(conv.name[:-len("_conv")] + "_bn")
        sums = tf.keras.Model(model.input, conv.output).predict(x, verbose=0).reshape(-1, kernel.shape[-1])
        quantiles = rng.uniform(0.05, 0.95, sums.shape[1])
        mean = np.array([np.quantile(sums[:, i], q) for i, q in enumerate(quantiles)]) + 0.5
        for i in range(mean.size):  # where a channel sums above 256, half the time: a threshold there
            big = np.unique(sums[:, i][np.abs(sums[:, i]) > 256])
            if len(big) >= 2 and rng.random() < 0.5:
                j = rng.integers(len(big) - 1)
                mean[i] = (big[j] + big[j + 1]) / 2
        gamma = np.where(rng.random(mean.size) < 0.8, 1.0, -1.0) * rng.uniform(0.5, 2.0, mean.size)
        variance = rng.uniform(1.0, 400.0, mean.size)
        bn.set_weights([a.astype(np.float32) for a in (gamma, np.zeros_like(mean), mean, variance)])
    return model, x


def layer_outputs(model, x):
    layers = [layer for layer in model.layers if not isinstance(layer, tf.keras.layers.InputLayer)]
    outputs = tf.keras.Model(model.input, [layer.output for layer in layers])(x, training=False)
    return {layer.name: tf.cast(y, tf.float32).numpy() for layer, y in zip(layers, outputs)}


@pytest.mark.parametrize("direction", ["float32_weights_into_bf16", "bf16_weights_into_float32"])
@pytest.mark.parametrize("case", sorted(TOPOLOGY_CASES))
def test_bf16_build_gives_the_float32_signs_in_every_layer(case, direction, tmp_path):
    from glt_keras.models import load_weights, save_weights

    shape, spec = TOPOLOGY_CASES[case]
    reference, x = binary_model(shape, spec)
    with precision.policy("mixed_bfloat16"):
        bf16 = glt_net(input_shape=shape, num_classes=10, classifier_activation=None, **spec)
    if direction == "float32_weights_into_bf16":
        save_weights(reference, tmp_path / "f32.h5")
        load_weights(bf16, tmp_path / "f32.h5")
        loaded = bf16
    else:  # a model built (and e.g. trained) under bfloat16, loaded into the float32 network
        bf16.set_weights(reference.get_weights())
        save_weights(bf16, tmp_path / "bf16.h5")
        loaded = glt_net(input_shape=shape, num_classes=10, classifier_activation=None, **spec)
        load_weights(loaded, tmp_path / "bf16.h5")
        np.testing.assert_array_equal(loaded.get_weights()[0], reference.get_weights()[0])
    assert bf16.get_layer("block2_conv").compute_dtype == "bfloat16"
    want, got = layer_outputs(reference, x), layer_outputs(bf16, x)
    straddled_above_256 = 0
    for name, expected in want.items():
        if name.startswith("block") and name.endswith("_conv"):
            np.testing.assert_array_equal(got[name], expected, err_msg=name)  # the integer sums
        elif name.startswith("block"):  # BN, pool, shuffle: the next layer's +-1 input
            np.testing.assert_array_equal(got[name] >= 0, expected >= 0, err_msg=name)
            if name.endswith("_bn"):
                sums = want[name[:-3] + "_conv"]
                mean = reference.get_layer(name).moving_mean.numpy()
                big = np.abs(mean) > 256
                positive = (expected >= 0).reshape(-1, mean.size)[:, big].mean(axis=0)
                straddled_above_256 += int(np.sum((positive > 0) & (positive < 1)))
                assert np.abs(sums).max() <= 512
    if case == "glt96_like":  # sums above 256, and thresholds there with sums on both sides
        assert max(np.abs(v).max() for k, v in want.items() if k.startswith("block") and k.endswith("_conv")) > 256
        assert straddled_above_256 > 0
    np.testing.assert_array_equal(got["head_pool"], want["head_pool"])  # the logits, bit for bit
    if direction == "bf16_weights_into_float32":
        np.testing.assert_array_equal(layer_outputs(loaded, x)["head_pool"], want["head_pool"])


def test_bf16_conv_probe_matches_what_the_raw_bf16_conv_does():
    """The patchify conv that oneDNN + AMX gets wrong: the probe flags it exactly when the raw
    bfloat16 conv is wrong on this machine, and the layer's output is exact either way."""
    rng = np.random.default_rng(1)
    x = np.where(rng.random((4, 48, 48, 24)) < 0.5, -1.0, 1.0).astype(np.float32)
    k = np.where(rng.random((4, 4, 24, 32)) < 0.5, -1.0, 1.0).astype(np.float32)
    exact = tf.nn.conv2d(x, k, 4, "VALID").numpy()
    raw = tf.cast(tf.nn.conv2d(tf.cast(x, tf.bfloat16), tf.cast(k, tf.bfloat16), 4, "VALID"), tf.float32).numpy()
    with precision.policy("mixed_bfloat16"):
        layer = BinaryConv2D(32, 4, strides=4, padding="valid")
        layer.build((None, 48, 48, 24))
    layer.kernel.assign(k)
    assert layer.bf16_conv_exact == np.array_equal(raw, exact)
    np.testing.assert_array_equal(tf.cast(layer(x), tf.float32).numpy(), exact)
    if _cpu.bf16_is_fast() and "amx_bf16" in _cpu.cpu_flags():
        print("raw bfloat16 conv exact on this AMX machine:", np.array_equal(raw, exact))


def test_float32_fallback_of_a_bf16_conv_is_exact_and_trains(monkeypatch):
    # A conv whose probe failed computes in float32 (forced here, whatever this machine does),
    # returns the compute dtype, and passes gradients to its input and kernel.
    with precision.policy("mixed_bfloat16"):
        conv = BinaryConv2D(64, 3, groups=2)
        conv.build((None, 8, 8, 64))
    conv.bf16_conv_exact = False
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(-1, 1, (2, 8, 8, 64)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    assert y.dtype == tf.bfloat16
    dx, dk = tape.gradient(loss, [x, conv.kernel])
    assert dx is not None and dk is not None and np.any(dk.numpy() != 0)
    reference = BinaryConv2D(64, 3, groups=2)
    reference.build((None, 8, 8, 64))
    reference.kernel.assign(conv.kernel)
    np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), reference(x).numpy())


def test_zoo_vww_binary_under_bf16_agrees_with_float32():
    """The published vww_binary (trained in float32) under mixed_bfloat16: the same class on
    >= 99 % of the 500 vww_val500 images (identical on all of them since the fix). ~10 s."""
    from pathlib import Path

    from glt_keras.data import find_data_dir, load_arrays
    from glt_keras.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    try:
        data_dir = find_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"data not available ({e.args[0].splitlines()[0]})")
    if not (data_dir / "vww_val500.tar.gz").is_file():
        pytest.skip(f"vww_val500.tar.gz not in {data_dir}")
    recipe = load_recipe(root / "zoo/vww_binary/recipe.yaml")
    images = load_arrays("vww_val500", "val", data_dir=data_dir)
    logits = []
    for name in ("float32", "mixed_bfloat16"):
        with precision.policy(name):
            model = recipe.build_model(classifier_activation=None)
        model.load_weights(root / "zoo/vww_binary/vww_binary_weights.h5")
        logits.append(np.asarray(model.predict(images.x, batch_size=100, verbose=0), np.float32))
    agreement = np.mean(logits[0].argmax(-1) == logits[1].argmax(-1))
    assert agreement >= 0.99, agreement


def _step_with_binary_input(binary_input, *, policy="float32", seed=0):
    """The weights after one training step of tiny's glt network, block1 skipping its input sign
    in training (binary_input) or not; the same initial weights and batch either way."""
    with precision.policy(policy):
        tf.keras.utils.set_random_seed(seed)
        model = tiny()
        assert model.get_layer("block1_conv").binary_input  # glt_net marks the conv after the encoding
        model.get_layer("block1_conv").binary_input = binary_input
        one_step(model, seed=seed)
        return model.get_weights()


def test_skipping_the_sign_of_exact_planes_keeps_float32_training_identical():
    # On +-1 planes the sign and its straight-through gradient are identities: one float32
    # step gives bit-identical weights, thresholds included.
    for a, b in zip(_step_with_binary_input(False), _step_with_binary_input(True)):
        np.testing.assert_array_equal(a, b)


def test_skipping_the_sign_of_exact_planes_under_bfloat16_trains_the_same():
    # Under mixed_bfloat16 the thermometer's gradient is no longer rounded to bfloat16 on its
    # way back (block1 may compute in float32): equal up to that rounding.
    before, after = _step_with_binary_input(False, policy="mixed_bfloat16"), \
        _step_with_binary_input(True, policy="mixed_bfloat16")
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)


def test_binary_input_keeps_the_sign_at_inference_and_in_the_config():
    conv = BinaryConv2D(32, 3, binary_input=True, lce_check=False)
    x = tf.constant(np.random.default_rng(0).uniform(-2, 2, (1, 6, 6, 8)).astype(np.float32))
    reference = BinaryConv2D(32, 3, lce_check=False)
    reference.build(x.shape)
    conv.build(x.shape)
    reference.kernel.assign(conv.kernel)
    # Not +-1 here on purpose: at inference the sign runs, so both agree.
    np.testing.assert_array_equal(conv(x, training=False).numpy(), reference(x).numpy())
    assert not np.array_equal(conv(x, training=True).numpy(), reference(x).numpy())  # training skips it
    assert BinaryConv2D.from_config(conv.get_config()).binary_input
