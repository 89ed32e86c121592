"""Binarized (grouped) convolutions that train fast on CPU and export natively for LCE."""
from __future__ import annotations

import larq as lq
import numpy as np
import tensorflow as tf
from larq import utils as lq_utils

from .._cpu import onednn_enabled

#: LCE binarizes a grouped convolution only when each group has a multiple of this many
#: input channels; otherwise the converter silently leaves it a float CONV_2D.
LCE_GROUP_CHANNELS = 32

#: Per convolution configuration: does this machine's bfloat16 convolution give the exact
#: (rounded) result? Filled by :meth:`BinaryConv2D._bf16_conv_is_exact`, once per process.
_BF16_CONV_EXACT: dict = {}


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class BinaryConv2D(lq.layers.QuantConv2D):
    """Binarized (optionally grouped) convolution with LCE-friendly defaults.

    A larq ``QuantConv2D`` with ``ste_sign`` input and kernel quantizers, a weight clip
    at 1 and ``pad_values=1`` (LCE pads binary convolutions with +1), whose grouped
    path can run two ways with the *same* kernel ``(kh, kw, cin / groups, cout)``:

    - ``split_groups=True`` (training): ``groups`` ordinary convolutions on channel
      slices, concatenated. About 13x faster to train on CPU than TensorFlow's
      grouped convolution, which has no fast CPU kernel. Under a bfloat16 policy with
      oneDNN the grouped conv runs fused instead (see ``_fuse_groups``).
    - ``split_groups=False`` (export): one native grouped convolution, which Larq
      Compute Engine turns into a single ``LceBconv2d`` (with BatchNorm fused).

    :func:`glt_keras.models.for_export` switches a whole model to the export form.

    Under ``mixed_bfloat16`` each conv checks once, when built, that this machine's bfloat16
    convolution of its shape gives the exact result on +-1 data (:meth:`_bf16_conv_is_exact`),
    and computes in float32 where it does not. With AMX, oneDNN's bfloat16 convolution of
    TensorFlow 2.16 is wrong for some stride >= 4 convs with fewer than 32 input channels:
    the 4x4 stride-4 "patchify" conv of glt96 on the thermometer's 24 planes gave ~97 %
    wrong sums, and a float32-trained vww_binary fell from 75.8 % to chance.

    Construction checks LCE's rules and raises, naming the layer, when a group has a
    number of input channels that is not a multiple of 32 (checked at build, when the
    input width is known) or when ``filters`` does not divide by ``groups``. Pass
    ``lce_check=False`` for a layer that you accept will not be accelerated.

    Example:
        >>> conv = BinaryConv2D(64, 3, groups=2)
        >>> conv(tf.ones((1, 8, 8, 64))).shape
        TensorShape([1, 8, 8, 64])
    """

    #: Fuse the groups under bfloat16 (``_fuse_groups``); benchmarks turn it off to compare.
    fuse_bf16_groups = True

    def __init__(
        self,
        filters,
        kernel_size,
        *,
        groups: int = 1,
        split_groups: bool = True,
        lce_check: bool = True,
        binary_input: bool = False,
        padding="same",
        pad_values=1.0,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
        **kwargs,
    ):
        if groups < 1 or filters % groups:
            raise ValueError(
                f"{kwargs.get('name', 'BinaryConv2D')}: filters={filters} must be a positive "
                f"multiple of groups={groups}."
            )
        super().__init__(
            filters,
            kernel_size,
            groups=groups,
            padding=padding,
            pad_values=pad_values,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            kernel_constraint=kernel_constraint,
            use_bias=use_bias,
            **kwargs,
        )
        self.split_groups = bool(split_groups)
        self.lce_check = bool(lce_check)
        #: The input is exactly +-1 (a thermometer's planes): see :meth:`call`.
        self.binary_input = bool(binary_input)
        # larq builds its quantizer layers under the global precision policy; a conv given
        # its own dtype (the float32 head of a mixed_bfloat16 model) must quantize in it too.
        for quantizer in (self.input_quantizer, self.kernel_quantizer):
            if isinstance(quantizer, tf.keras.layers.Layer) and quantizer.dtype_policy.name != self.dtype_policy.name:
                quantizer._set_dtype_policy(self.dtype_policy)
        #: False: the bfloat16 conv of this shape is wrong here; compute it in float32.
        self.bf16_conv_exact = True

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and channels % self.groups:
            raise ValueError(
                f"{self.name}: {channels} input channels do not divide into groups={self.groups}."
            )
        if self.lce_check and self.groups > 1 and channels is not None:
            per_group = channels // self.groups
            if per_group % LCE_GROUP_CHANNELS:
                raise ValueError(
                    f"{self.name}: each of its {self.groups} groups has {per_group} input "
                    f"channels; Larq Compute Engine binarizes a grouped convolution only with a "
                    f"multiple of {LCE_GROUP_CHANNELS} per group (it would stay a float CONV_2D). "
                    "Change the width or groups, or pass lce_check=False to accept that."
                )
        super().build(input_shape)
        if self.compute_dtype == "bfloat16":
            self.bf16_conv_exact = self._bf16_conv_is_exact(input_shape)

    def _maybe_cast_inputs(self, inputs, input_list=None):
        if self.binary_input:  # call() picks the dtype itself
            return inputs
        return super()._maybe_cast_inputs(inputs, input_list)

    def call(self, inputs, training=None):
        """The larq conv; with ``binary_input`` (the input is exactly +-1, as the thermometer's
        planes are), training skips the input sign: on +-1 it is an identity, and so is its
        straight-through gradient (``|x| <= 1`` everywhere). On glt96 that sign, its gradient and
        their casts were about a third of a training step (the largest tensor of the network).
        A float32 input that this conv computes in float32 anyway (``bf16_conv_exact`` False)
        is then not cast to bfloat16 and back, and its gradient is not rounded to bfloat16 on
        the way to the thermometer. Inference, and so LCE conversion, keeps the sign (LCE
        needs it to see a binary conv)."""
        if not self.binary_input:
            return super().call(inputs)
        if not (training and self.input_quantizer is not None):
            return super().call(tf.cast(inputs, self.compute_dtype))
        if self.compute_dtype == "bfloat16" and self.bf16_conv_exact:
            inputs = tf.cast(inputs, tf.bfloat16)
        with lq_utils.patch_object(self, "input_quantizer", None):
            return super().call(inputs)

    def convolution_op(self, inputs, kernel):
        if self.compute_dtype == "bfloat16" and not self.bf16_conv_exact:
            # The sums of +-1 products in float32 (exact), rounded once to bfloat16 like a
            # correct bfloat16 conv; gradients flow through the casts. (A float32 input, see
            # call(), is used as it is.)
            outputs = self._convolution(tf.cast(inputs, tf.float32), tf.cast(kernel, tf.float32))
            return tf.cast(outputs, tf.bfloat16)
        return self._convolution(inputs, kernel)

    def _convolution(self, inputs, kernel):
        fused = inputs.dtype == tf.bfloat16 and self._fuse_groups()
        if self.groups == 1 or not self.split_groups or fused:
            return super().convolution_op(inputs, kernel)
        return self._split_convolution(inputs, kernel)

    def _split_convolution(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        input_slices = tf.split(inputs, self.groups, axis=-1)
        kernel_slices = tf.split(kernel, self.groups, axis=-1)
        outputs = [super(BinaryConv2D, self).convolution_op(x, k) for x, k in zip(input_slices, kernel_slices)]
        return tf.concat(outputs, axis=-1)

    def _bf16_conv_is_exact(self, input_shape) -> bool:
        """Whether this machine's bfloat16 conv of this layer's shape (padding, strides,
        groups, fused or split as it trains) gives, on random +-1 inputs and kernels, the
        float32 sums rounded to bfloat16 (exact: every partial sum is an integer that float32
        holds), both eagerly and in a ``tf.function``. Cached per configuration.

        oneDNN picks its kernel by shape and ISA, so the check runs on the layer's own shape
        (batch 2; 2 ms-50 ms once per shape). The backward convs were found exact; the
        float32 fallback covers them too. Native grouped convs (``split_groups=False``, the
        export form) run through XLA, not oneDNN: not checked."""
        if self.groups > 1 and not self.split_groups:
            return True
        shape = tf.TensorShape(input_shape).as_list()
        spatial = [d if d is not None else 2 * k * s + k
                   for d, k, s in zip(shape[1:-1], self.kernel_size, self.strides)]
        key = (tuple(spatial), shape[-1], tuple(self.kernel.shape), tuple(self.strides),
               tuple(self.dilation_rate), self.groups, self.padding, self._is_native_padding,
               float(self.pad_values), self.split_groups, self._fuse_groups())
        if key not in _BF16_CONV_EXACT:
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")  # one tf.function per probe: not the retracing it warns of
            try:
                with tf.init_scope():
                    _BF16_CONV_EXACT[key] = self._probe_bf16_conv([2, *spatial, shape[-1]])
            finally:
                logger.setLevel(level)
        return _BF16_CONV_EXACT[key]

    def _probe_bf16_conv(self, shape) -> bool:
        rng = np.random.default_rng(0)
        x = np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
        k = np.where(rng.random(self.kernel.shape) < 0.5, -1.0, 1.0).astype(np.float32)

        def conv(x, k, op=self._convolution):  # what call() does: larq's +-1 padding, the conv
            if self._is_native_padding:
                return op(x, k)
            x = tf.pad(x, self._get_padding_same(x), constant_values=self.pad_values)
            with lq_utils.patch_object(self, "padding", "valid"):
                return op(x, k)

        exact = conv(tf.constant(x), tf.constant(k), self._split_convolution)  # float32 per group
        expected = tf.cast(tf.cast(exact, tf.bfloat16), tf.float32).numpy()
        xb, kb = tf.constant(x, tf.bfloat16), tf.constant(k, tf.bfloat16)
        for run in (conv, tf.function(conv)):
            if not np.array_equal(tf.cast(run(xb, kb), tf.float32).numpy(), expected):
                return False
        return True

    def _fuse_groups(self) -> bool:
        """Train a grouped conv as one oneDNN grouped convolution (no XLA) when computing in
        bfloat16: with AMX the per-group convs' slices, concatenations and small GEMMs cost
        about as much as their arithmetic, and the fused form made the cifar10_binary step
        ~1.1x faster (bench_training_throughput.py --recipe, mixed_bfloat16+split vs
        mixed_bfloat16). float32 keeps the split form (the fused one is no faster there, and
        float32 results stay as they were); so does a TensorFlow without oneDNN, whose CPU
        Conv2D has no grouped kernel."""
        return self.fuse_bf16_groups and self.compute_dtype == "bfloat16" and onednn_enabled()

    def _jit_compiled_convolution_op(self, inputs, kernel):
        # tf-keras routes grouped convs through XLA on CPU; the split path needs none.
        if self.split_groups:
            return self.convolution_op(inputs, kernel)
        return super()._jit_compiled_convolution_op(inputs, kernel)

    def get_config(self):
        config = super().get_config()
        config.update(split_groups=self.split_groups, lce_check=self.lce_check, binary_input=self.binary_input)
        return config


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class ChannelShuffle(tf.keras.layers.Layer):
    """ShuffleNet channel shuffle: lets consecutive grouped convolutions mix groups.

    Example:
        >>> ChannelShuffle(2)(tf.reshape(tf.range(4.0), (1, 1, 1, 4))).numpy().ravel().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """

    def __init__(self, groups: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)

    def call(self, inputs):
        shape = tf.shape(inputs)
        channels = inputs.shape[-1]
        x = tf.reshape(inputs, [shape[0], shape[1], shape[2], self.groups, channels // self.groups])
        x = tf.transpose(x, [0, 1, 2, 4, 3])
        return tf.reshape(x, [shape[0], shape[1], shape[2], channels])

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}
