"""Topology builders: fully binarized GLT networks, their real-valued teacher twins,
real-valued residual teachers (CIFAR ResNets), per-layer precision, the export form, and
size / MAC accounting. :func:`build_network` builds any named topology (what a recipe's
``model`` block names)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .layers.binary import BinaryConv2D, ChannelShuffle
from .layers.blocks import BN_MOMENTUM, binary_head, conv_block, shortcut_fits
from .layers.encoding import get_encoding

#: Named topologies. widths/groups/pools: one entry per conv block.
TOPOLOGIES = {
    # 96x96 input: a 4x4 stride-4 "patchify" first conv (valid padding) keeps training
    # cheap on CPU (~46 M MACs); 3x3 maps before the head; ~0.80 M binary weights.
    "glt96": dict(
        widths=(32, 64, 128, 128, 256, 256, 512, 512),
        groups=(1, 1, 2, 2, 4, 4, 8, 8),
        pools=(False, True, False, True, False, True, False, False),
        kernels=(4, 3, 3, 3, 3, 3, 3, 3),
        strides=(4, 1, 1, 1, 1, 1, 1, 1),
        shuffle=True,
    ),
    # 32x32 input -> 2x2 before the head; ~0.82 M binary weights, ~60 M MACs.
    "glt32": dict(
        widths=(64, 128, 256, 256, 512, 512),
        groups=(1, 1, 2, 4, 4, 16),
        pools=(True, True, False, True, False, True),
        shuffle=True,
    ),
    # A tiny network for tests and demos.
    "tiny": dict(widths=(64, 64), groups=(1, 2), pools=(True, True), shuffle=True),
}

#: Activation signs a binary layer may train with (larq names; the same sign forward, each its
#: own gradient), see :func:`glt_net`.
INPUT_QUANTIZERS = ("ste_sign", "approx_sign", "swish_sign")

#: Real-valued residual networks for small (32x32) inputs: teachers to distil from, never
#: binarized. CIFAR ResNet-(6n+2) of He et al. (2016): a 3x3 stem, three stages of
#: ``blocks_per_stage`` basic blocks at ``widths`` (times the recipe's ``width_multiplier``),
#: the 2nd and 3rd stage starting with stride 2, then global average pooling and a dense layer.
RESIDUAL_TOPOLOGIES = {
    "resnet20": dict(blocks_per_stage=3, widths=(16, 32, 64)),  # 0.27 M weights, 41 M MACs
    "resnet32": dict(blocks_per_stage=5, widths=(16, 32, 64)),  # 0.46 M weights, 69 M MACs
    "resnet56": dict(blocks_per_stage=9, widths=(16, 32, 64)),  # 0.85 M weights, 125 M MACs
    # A tiny residual network for tests.
    "resnet_tiny": dict(blocks_per_stage=1, widths=(8, 16, 32)),
}

#: ``model`` keys that only a residual topology takes, and the ones it takes as well.
RESIDUAL_KEYS = ("width_multiplier", "blocks_per_stage")
RESIDUAL_COMMON_KEYS = ("num_classes", "input_shape", "include_top", "classifier_activation", "name",
                        "teacher")


def build_network(*, topology: str | None = "glt96", **kwargs) -> tf.keras.Model:
    """The network a recipe's ``model`` block names: :func:`resnet_net` for a name in
    :data:`RESIDUAL_TOPOLOGIES`, :func:`glt_net` for everything else. A key that the chosen
    builder does not take is a ``ValueError`` naming it.

    Example:
        >>> build_network(topology="resnet_tiny", input_shape=(32, 32, 3), num_classes=10).name
        'resnet_tiny'
    """
    if topology in RESIDUAL_TOPOLOGIES:
        extra = sorted(set(kwargs) - set(RESIDUAL_KEYS) - set(RESIDUAL_COMMON_KEYS))
        if extra:
            raise ValueError(f"model.{extra[0]} does not apply to the residual topology {topology} "
                             f"(it takes {', '.join(RESIDUAL_KEYS + RESIDUAL_COMMON_KEYS[:-2])}).")
        kwargs.pop("teacher", None)  # real-valued anyway
        return resnet_net(topology=topology, **kwargs)
    extra = sorted(set(kwargs) & set(RESIDUAL_KEYS))
    if extra:
        raise ValueError(f"model.{extra[0]} applies only to the residual topologies "
                         f"({', '.join(sorted(RESIDUAL_TOPOLOGIES))}), not to {topology}.")
    return glt_net(topology=topology, **kwargs)


def resnet_net(
    *,
    input_shape=None,
    num_classes: int = 10,
    topology: str = "resnet20",
    blocks_per_stage: int | None = None,
    width_multiplier: float = 1.0,
    include_top: bool = True,
    classifier_activation="softmax",
    name: str | None = None,
) -> tf.keras.Model:
    """A real-valued CIFAR ResNet (a teacher): pixels 0..255 -> logits / probabilities.

    Pixels are scaled to [-1, 1] inside the model (:class:`~glt_keras.layers.encoding.RealInput`,
    float32). Each basic block is conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU; a
    block that changes width or resolution has a 1x1 conv + BN shortcut (option B), the others
    the identity. Convs are He-initialised without bias; the last BN of every block starts at
    zero (each block starts as the identity, which trains faster). Under ``mixed_bfloat16``
    everything from the stem to the last block computes in bfloat16; the pooling, the dense
    layer and the softmax stay float32 (float32 logits for the loss).

    Args:
        input_shape: ``(H, W, C)`` of raw pixels in [0, 255]; default ``(32, 32, 3)``.
        topology: a name in :data:`RESIDUAL_TOPOLOGIES`.
        blocks_per_stage: overrides the topology's (depth ``6 * blocks_per_stage + 2``).
        width_multiplier: scales the stage widths (16 / 32 / 64); 2.0 gives 32 / 64 / 128.
        classifier_activation: ``"softmax"`` (Keras convention) or ``None`` for logits.

    Example:
        >>> model = resnet_net(input_shape=(32, 32, 3), num_classes=10, topology="resnet20")
        >>> model.output_shape, model.count_params() < 300_000
        ((None, 10), True)
    """
    if topology not in RESIDUAL_TOPOLOGIES:
        raise ValueError(f"Unknown residual topology {topology!r}; choose one of {sorted(RESIDUAL_TOPOLOGIES)}.")
    spec = RESIDUAL_TOPOLOGIES[topology]
    n = int(blocks_per_stage or spec["blocks_per_stage"])
    if n < 1:
        raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}.")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}.")
    widths = [max(1, int(round(w * width_multiplier))) for w in spec["widths"]]
    input_shape = tuple(input_shape or (32, 32, 3))
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
    from .layers.encoding import RealInput

    def conv(x, filters, kernel, stride, conv_name):
        return tf.keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                      kernel_initializer="he_normal", name=conv_name)(x)

    def bn(x, bn_name, zero=False):
        return tf.keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=bn_name,
                                                  gamma_initializer="zeros" if zero else "ones")(x)

    inputs = tf.keras.Input(input_shape, name="pixels")
    x = RealInput(name="encoding")(inputs)
    x = conv(x, widths[0], 3, 1, "stem_conv")
    x = tf.keras.layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
    for s, width in enumerate(widths):
        for b in range(n):
            block = f"stage{s + 1}_block{b + 1}"
            stride = 2 if s > 0 and b == 0 else 1
            shortcut = x
            if stride != 1 or int(x.shape[-1]) != width:
                shortcut = bn(conv(x, width, 1, stride, f"{block}_proj"), f"{block}_proj_bn")
            y = conv(x, width, 3, stride, f"{block}_conv1")
            y = tf.keras.layers.ReLU(name=f"{block}_relu1")(bn(y, f"{block}_bn1"))
            y = bn(conv(y, width, 3, 1, f"{block}_conv2"), f"{block}_bn2", zero=True)
            x = tf.keras.layers.Add(name=f"{block}_add")([shortcut, y])
            x = tf.keras.layers.ReLU(name=f"{block}_relu2")(x)
    if include_top:
        x = tf.keras.layers.GlobalAveragePooling2D(dtype="float32", name="head_pool")(x)
        x = tf.keras.layers.Dense(num_classes, dtype="float32", name="head_dense")(x)
        if classifier_activation:
            x = tf.keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
    return tf.keras.Model(inputs, x, name=name or topology)


def _resolve_precisions(n_blocks: int, real_layers, default: str) -> list[str]:
    precisions = [default] * (n_blocks + 1)  # blocks + head
    for item in real_layers or ():
        if isinstance(item, str):
            if item == "head":
                index = n_blocks
            elif item.startswith("block") and item[5:].isdigit():
                index = int(item[5:]) - 1
            else:
                raise ValueError(f"Unknown layer {item!r}: use 'block<i>' (1-based) or 'head'.")
        else:
            index = int(item)
        if not 0 <= index <= n_blocks:
            raise ValueError(f"Layer index {item!r} out of range: the model has {n_blocks} blocks + head.")
        precisions[index] = "real"
    return precisions


def glt_net(
    *,
    input_shape=None,
    num_classes: int = 2,
    topology: str | None = "glt96",
    widths=None,
    groups=None,
    pools=None,
    strides=None,
    kernels=None,
    shuffle=None,
    kernel_size: int = 3,
    encoding: str = "glt",
    levels: int = 8,
    encoding_kwargs: dict | None = None,
    real_layers=(),
    teacher: bool = False,
    split_groups: bool = True,
    input_quantizer: str = "ste_sign",
    binary_weights: bool = True,
    shortcuts: bool = False,
    include_top: bool = True,
    classifier_activation="softmax",
    name: str | None = None,
) -> tf.keras.Model:
    """Build a GLT network (or its real-valued teacher twin).

    Args:
        input_shape: ``(H, W, C)`` of raw pixels in [0, 255]; default ``(96, 96, 3)``.
        topology: a name in :data:`TOPOLOGIES`; ``widths`` / ``groups`` / ``pools`` /
            ``shuffle`` override it.
        encoding: ``glt`` (learned thermometer), ``fixed``, ``binary_planes`` or ``real``.
        levels: planes per input channel (thermometers: thresholds; ``binary_planes``: the
            top ``min(levels, 8)`` bits).
        real_layers: blocks kept real-valued (``"block3"``, 1-based, ``"head"``, or
            0-based indices; index ``len(widths)`` is the head): MixBin-style partial
            binarization. Nothing else changes, except that a real block feeding a binary
            layer has no ReLU (that layer's sign is its non-linearity).
        teacher: the real-valued twin: real input and every layer real.
        split_groups: grouped convs as per-group convs (fast training); ``False`` gives
            the native grouped form that LCE converts (see :func:`for_export`).
        input_quantizer: the activation sign of every binary layer after the first, by its
            larq name: ``ste_sign`` (straight-through, the default), ``approx_sign`` (Bi-Real
            Net's piecewise-quadratic gradient) or ``swish_sign``. The forward pass, and so
            the converted model, is the same sign. The first block keeps ``ste_sign``: its
            input is the thermometer's exact +-1, where ``approx_sign``'s gradient is zero
            and the thresholds would learn nothing.
        binary_weights: ``False`` keeps every kernel real-valued while the activations stay
            binary: the first step of two-step training (Liu et al., ReActNet, 2020), whose
            weights a fully binary recipe then starts from (``training.init_weights``). Such a
            network does not convert to ``LceBconv2d``.
        shortcuts: real-valued shortcuts around the binary blocks (Bi-Real Net): each binary
            block after the first whose width is a multiple of its input width, at stride 1,
            adds its input to its output (see :func:`~glt_keras.layers.blocks.conv_block`).
            No weights; every conv stays an ``LceBconv2d``, whose output becomes real-valued.
        classifier_activation: ``"softmax"`` (Keras convention) or ``None`` for logits.

    Example:
        >>> model = glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny")
        >>> model.output_shape
        (None, 10)
    """
    if topology in RESIDUAL_TOPOLOGIES:
        raise ValueError(f"{topology} is a residual topology: build it with build_network or resnet_net.")
    if topology and topology not in TOPOLOGIES:
        raise ValueError(f"Unknown topology {topology!r}; choose one of "
                         f"{sorted(TOPOLOGIES) + sorted(RESIDUAL_TOPOLOGIES)}.")
    spec = dict(TOPOLOGIES[topology]) if topology else {}
    for key, value in dict(widths=widths, groups=groups, pools=pools, strides=strides, kernels=kernels, shuffle=shuffle).items():
        if value is not None:
            spec[key] = value
    widths = list(spec.get("widths", ()))
    groups = list(spec.get("groups", [1] * len(widths)))
    pools = list(spec.get("pools", [False] * len(widths)))
    strides = list(spec.get("strides", [1] * len(widths)))
    kernels = list(spec.get("kernels", [kernel_size] * len(widths)))
    if not widths or not (len(widths) == len(groups) == len(pools) == len(strides) == len(kernels)):
        raise ValueError(
            "widths, groups, pools, strides and kernels need one entry per block, got "
            f"{widths}, {groups}, {pools}, {strides}, {kernels}."
        )
    input_shape = tuple(input_shape or (96, 96, 3))
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
    if teacher:
        encoding = "real"
    precisions = _resolve_precisions(len(widths), real_layers, "real" if teacher else "binary")
    if input_quantizer not in INPUT_QUANTIZERS:
        raise ValueError(f"input_quantizer must be one of {INPUT_QUANTIZERS}, got {input_quantizer!r}.")

    inputs = tf.keras.Input(input_shape, name="pixels")
    if encoding == "binary_planes" and levels < 8:  # the top `levels` bits: a coarser ADC
        from .layers.bitplanes import TopBitPlanes

        x = TopBitPlanes(levels, name="encoding")(inputs)
    else:
        x = get_encoding(encoding, levels=levels, name="encoding", **(encoding_kwargs or {}))(inputs)
    for i, (width, group, pool, stride, kernel) in enumerate(zip(widths, groups, pools, strides, kernels)):
        # A real block whose output feeds a binary layer gets no ReLU: that layer's sign is
        # its non-linearity, and sign(ReLU(.)) would be +1 everywhere (no signal at all).
        has_next = i + 1 < len(widths) or include_top
        block, options = conv_block, {"binary_weights": binary_weights}
        if i == 0 and encoding != "real" and precisions[0] == "binary":  # the planes are exactly +-1
            options["binary_input"] = True
        if i > 0:  # block1 reads the thermometer's exact +-1 (see input_quantizer)
            options["input_quantizer"] = input_quantizer
            # Block 1's input is the thermometer's planes, not a feature map worth carrying.
            options["shortcut"] = (shortcuts and precisions[i] == "binary"
                                   and shortcut_fits(int(x.shape[-1]), width, stride))
        if precisions[i] == "real" and has_next and precisions[i + 1] == "binary":
            block, options = _real_block_before_binary, {}
        x = block(
            x,
            width,
            name=f"block{i + 1}",
            kernel_size=kernel,
            strides=stride,
            # A kernel that tiles its stride ("patchify") needs no padding.
            padding="valid" if kernel == stride and kernel > 1 else "same",
            groups=group,
            pool=pool,
            shuffle=bool(spec.get("shuffle")) and i + 1 < len(widths),
            precision=precisions[i],
            split_groups=split_groups,
            **options,
        )
    if include_top:
        x = binary_head(
            x, num_classes, precision=precisions[-1], classifier_activation=classifier_activation,
            input_quantizer=input_quantizer, binary_weights=binary_weights,
        )
    default_name = ("teacher_" if teacher else "") + (topology or "glt_net")
    return tf.keras.Model(inputs, x, name=name or default_name)


def _real_block_before_binary(x, filters, *, name, kernel_size, strides, padding, groups, pool,
                              shuffle, precision, split_groups):
    """``conv_block(precision="real")`` without the ReLU, for a real layer feeding a binary one
    (MixBin-style mixed networks): real conv -> BN [-> MaxPool] [-> shuffle], like a binary
    block with an unquantized conv."""
    conv = BinaryConv2D(
        filters, kernel_size, groups=groups, strides=strides, padding=padding,
        split_groups=split_groups, name=f"{name}_conv", input_quantizer=None,
        kernel_quantizer=None, kernel_constraint=None, pad_values=0.0, lce_check=False,
    )
    x = conv(x)
    x = tf.keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=f"{name}_bn")(x)
    if pool:
        x = tf.keras.layers.MaxPool2D(2, name=f"{name}_pool")(x)
    if shuffle and groups > 1:
        x = ChannelShuffle(groups, name=f"{name}_shuffle")(x)
    return x


def custom_objects() -> dict:
    """Every glt_keras / larq object a saved model may name."""
    import larq as lq

    from .layers import binary, bitplanes, encoding

    objects = {
        "TopBitPlanes": bitplanes.TopBitPlanes,
        "BinaryConv2D": binary.BinaryConv2D,
        "ChannelShuffle": binary.ChannelShuffle,
        "LearnedThermometer": encoding.LearnedThermometer,
        "FixedThermometer": encoding.FixedThermometer,
        "BinaryPlanes": encoding.BinaryPlanes,
        "RealInput": encoding.RealInput,
    }
    objects.update({f"glt_keras>{k}": v for k, v in list(objects.items())})
    objects.update(lq.layers.__dict__.get("custom_objects", {}) or {})
    return objects


def _with_layer_config(model: tf.keras.Model, update) -> tf.keras.Model:
    config = model.get_config()
    for layer in config["layers"]:
        update(layer)
    with tf.keras.utils.custom_object_scope(custom_objects()):
        clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def _float32_policies(config):
    """``config`` with every Keras mixed-precision policy (``mixed_bfloat16``) replaced by
    ``float32``, in place, nested configs (larq quantizers) included."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "dtype" and isinstance(value, dict) and \
                    str(value.get("config", {}).get("name", "")).startswith("mixed_"):
                config[key] = "float32"
            else:
                _float32_policies(value)
    elif isinstance(config, list):
        for item in config:
            _float32_policies(item)
    return config


def for_export(model: tf.keras.Model) -> tf.keras.Model:
    """The same model and weights with native grouped convolutions, for LCE conversion;
    a model trained under ``mixed_bfloat16`` comes back float32 (what LCE and the C export
    take; its variables are float32 already)."""

    def native(layer):
        _float32_policies(layer)
        if layer["class_name"].endswith("BinaryConv2D"):
            layer["config"]["split_groups"] = False

    return _with_layer_config(model, native)


def with_logits(model: tf.keras.Model) -> tf.keras.Model:
    """The same model without its final softmax (for distillation and calibrated losses)."""
    if model.layers[-1].name != "predictions":
        return model
    return tf.keras.Model(model.inputs, model.layers[-2].output, name=model.name)


@dataclass
class LayerCost:
    name: str
    precision: str
    params: int
    macs: int


def layer_costs(model: tf.keras.Model) -> list[LayerCost]:
    """Weights and multiply-accumulates of every convolution (binary or real)."""
    costs = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            params = int(np.prod(layer.kernel.shape))
            out_h, out_w = layer.output_shape[1:3]
            macs = params * int(out_h) * int(out_w)
            binary = isinstance(layer, BinaryConv2D) and layer.kernel_quantizer is not None
            costs.append(LayerCost(layer.name, "binary" if binary else "real", params, macs))
    return costs


def model_summary(model: tf.keras.Model) -> dict:
    """Binary / real parameter counts and bytes (1 bit vs 32 bit), MACs and binary MACs."""
    costs = layer_costs(model)
    kernels = {layer.kernel.ref() for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)}
    binary_params = sum(c.params for c in costs if c.precision == "binary")
    conv_real = sum(c.params for c in costs if c.precision == "real")
    other = sum(int(np.prod(w.shape)) for w in model.weights if w.ref() not in kernels)
    return {
        "params": binary_params + conv_real + other,
        "binary_params": binary_params,
        "real_params": conv_real + other,
        "binary_weight_bytes": (binary_params + 7) // 8,
        "real_conv_weight_bytes_int8": conv_real,
        "macs": sum(c.macs for c in costs),
        "binary_macs": sum(c.macs for c in costs if c.precision == "binary"),
        "real_macs": sum(c.macs for c in costs if c.precision == "real"),
    }


def save_weights(model: tf.keras.Model, path) -> Path:
    """Save weights in the HDF5 layout that loads by layer name (temp file, then rename).

    The name must not end in ``.weights.h5``: tf-keras sends such names to its Keras-v3
    format, which cannot load by name (a new head, ``include_top=False``).
    """
    path = Path(path)
    if path.name.endswith(".weights.h5") or path.suffix != ".h5":
        raise ValueError(f"{path}: use a name ending in '_weights.h5' (HDF5, loads by layer name).")
    tmp = path.with_name(path.stem + ".partial.h5")
    try:
        model.save_weights(str(tmp))
        _check_readable_h5(tmp)  # a full disk can leave a short file that h5py still wrote
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _check_readable_h5(path: Path) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
    except Exception as err:  # h5py raises several types for damaged files
        raise OSError(f"weight file {path} could not be read back after writing: "
                      f"{type(err).__name__}: {err}") from err


def load_weights(model: tf.keras.Model, path, *, by_name: bool = False) -> None:
    """Load an HDF5 weight file; ``by_name=True`` loads the layers whose names and shapes
    match and skips the rest. Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Weight file {path} does not exist.")
    try:
        if path.name.endswith(".weights.h5"):
            # Files of runs started before the rename: legacy layout under a v3 name.
            with tempfile.TemporaryDirectory() as tmp:
                link = Path(tmp) / "legacy.h5"
                os.symlink(path.resolve(), link)
                model.load_weights(str(link), by_name=by_name, skip_mismatch=by_name)
        else:
            model.load_weights(str(path), by_name=by_name, skip_mismatch=by_name)
    except Exception as err:  # h5py and Keras raise several types for bad files
        raise ValueError(
            f"Could not load weight file {path} into {model.name}: {type(err).__name__}: {err}. "
            "The file is truncated or corrupt, or it belongs to another architecture."
        ) from err
