"""tf.data input pipelines with batched augmentation, and person pasting.

:func:`make_dataset` turns uint8 arrays into a batched, prefetched ``tf.data.Dataset`` of
``(float32 images in raw pixel units [0, 255], int32 labels)``. Images are NOT normalised: the
models' first layer (the learned thermometer) sees raw pixel values.

The pipeline shuffles indices (cheap), batches them, gathers the uint8 images of a batch, and
augments the whole batch with vectorised ops (one ``map`` call per batch), which keeps a 2-core
machine fed. Random numbers come from stateless ops seeded by a ``tf.data.Dataset.random``
stream, so a pipeline is reproducible for a given ``seed`` and differs from epoch to epoch.

Fixed views (for cached teacher targets, :mod:`glt_keras.training.view_cache`): with
``view_targets`` each image ``i`` has ``K`` views whose parameters (:func:`view_params`) are a
hash of ``(seed, i, k)``; the pipeline samples images as always, draws ``k``, and builds view
``(i, k)`` with the same ops as live augmentation. :func:`make_views` builds any list of views
in order: the same pixels, to label them ahead of training.

Mixup for distillation (``mixup=p``): a fraction ``p`` of the views are blends
``lam * a + (1 - lam) * b`` of two images' augmented views, ``lam`` uniform in [0, 1), labelled
``-1`` (no hard label: the teachers, who see the blend, decide what it shows). Beyer et al.
(2022, "Knowledge distillation: a good teacher is patient and consistent") found such blends
the most useful augmentation for matching a teacher on a small image set. Live views blend
with another image of the batch; fixed view ``(i, k)`` with view ``k`` of an image drawn from
its hash.

Mosaic for distillation (``mosaic=p``): a fraction ``p`` of the views are 2x2 mosaics of four
images' augmented views, each shrunk to a quadrant, labelled ``-1`` like blends. Everything in
a mosaic is half as tall as in its source view, so people become as small as the smallest ones a
person detector must see (a Visual Wake Words person may cover 0.5% of the image), in cluttered
scenes: the zoom-out that a crop, which only zooms in, cannot give (YOLOv4's mosaic). A mosaic is
never also a blend. Live views take the next three images of the batch; fixed view ``(i, k)``
takes view ``k`` of three images drawn from its hash.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

__all__ = ["make_dataset", "make_views", "paste_augment", "random_subset", "resize_uint8", "view_params",
           "view_uniforms"]

from .image_files import ImageSize, as_hw  # noqa: E402  (one definition of image sizes)

CROPS = ("none", "pad", "random_resized")


def make_dataset(x, y, *, batch_size: int, training: bool, image_size: Optional[ImageSize] = None,
                 crop: str = "none", pad: int = 4, flip: bool = True,
                 scale: Tuple[float, float] = (0.35, 1.0), brightness: float = 0.0,
                 contrast: float = 0.0, balance: bool = False, shuffle_buffer: Optional[int] = None,
                 seed: int = 0, num_classes: Optional[int] = None, drop_remainder: bool = False,
                 balance_by=None, view_targets=None, mixup: float = 0.0, mosaic: float = 0.0):
    """A batched, prefetched ``tf.data.Dataset`` of ``(images float32 [0, 255], labels int32)``.

    Args:
        x: uint8 images ``(N, H, W, 3)``.
        y: integer labels ``(N,)``.
        batch_size: images per batch.
        training: False: images in order, only resized (antialiased) to ``image_size`` if that
            differs; no shuffling, no augmentation. True: shuffled every epoch and augmented.
        image_size: int or (height, width) of the output; default: the input size.
        crop: (training) ``"none"``; ``"pad"``: reflect-pad by ``pad`` pixels and crop back at a
            random offset (CIFAR style); ``"random_resized"``: a random box covering a fraction
            ``scale`` of the image area, aspect ratio jittered in [3/4, 4/3], resized to
            ``image_size`` (scene style).
        pad: padding for ``crop="pad"``.
        flip: (training) random horizontal flips.
        scale: area fraction range for ``crop="random_resized"``.
        brightness: (training) add a per-image offset uniform in [-brightness, brightness]
            pixel units (e.g. 32).
        contrast: (training) scale each image's deviation from its mean by a factor uniform in
            [1 - contrast, 1 + contrast] (e.g. 0.3). Results are clipped to [0, 255].
        balance: (training) class-balanced sampling: each class is drawn with equal probability
            (sampling with replacement from per-class shuffled, repeated streams); an epoch is
            still ``len(x)`` images.
        shuffle_buffer: shuffle buffer size, in indices; default (None): the whole set, a full
            permutation every epoch. A smaller buffer only shuffles locally: on a class-sorted
            array (CIFAR-10 as decoded) every batch would hold two or three classes, and
            BatchNorm would train on class-specific batch statistics.
        seed: seed for shuffling, sampling and augmentation.
        num_classes: number of classes for ``balance`` (default ``max(y) + 1``); classes without
            images are left out of the sampling.
        balance_by: (with ``balance``) the class of each image to balance on, when it is not
            ``y`` (e.g. the teachers' label of images whose ``y`` is -1, unlabelled).
        drop_remainder: drop the last incomplete batch.
        view_targets: (training) fixed views with cached targets, an array ``(N, K, classes)``:
            image ``i`` has ``K`` fixed augmented views, view ``(i, k)`` made by
            :func:`view_params` (a pure function of ``seed``, ``i``, ``k`` and the settings
            above); each sampled image (shuffled or balanced as without) gets a uniformly drawn
            ``k``, and the pipeline yields ``(images, (labels, view_targets[i, k]))``
            (:mod:`glt_keras.training.view_cache`). None: live random views, as always.
        mixup: (training) the fraction of views that are blends of two images (see the module
            docstring), labelled ``-1``: for distillation from teachers that label each view.
        mosaic: (training) the fraction of views that are 2x2 mosaics of four images (see the
            module docstring), labelled ``-1`` like blends.
    """
    import tensorflow as tf

    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"x must have shape (N, H, W, 3), got {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"x must be uint8 pixels in [0, 255], got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
    if len(x) == 0:
        raise ValueError("make_dataset: no images")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= float(mixup) <= 1.0:
        raise ValueError(f"mixup must be a fraction in [0, 1], got {mixup}")
    if not 0.0 <= float(mosaic) <= 1.0:
        raise ValueError(f"mosaic must be a fraction in [0, 1], got {mosaic}")
    n = len(x)
    if training and mixup and n < 2:
        raise ValueError("mixup needs at least 2 images to blend")
    if training and mosaic and n < 2:
        raise ValueError("mosaic needs at least 2 images to tile")
    in_hw = (int(x.shape[1]), int(x.shape[2]))
    out_hw = as_hw(image_size) or in_hw
    if training and crop == "pad" and not 0 <= pad < min(in_hw):
        raise ValueError(f"pad must be in [0, {min(in_hw)}) for {in_hw} images, got {pad}")
    lo, hi = float(scale[0]), float(scale[1])
    if training and crop == "random_resized" and not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}")

    autotune = tf.data.AUTOTUNE
    images_t = tf.constant(x)
    labels_t = tf.constant(y.astype(np.int32))
    resize = _resizer(out_hw)

    if not training:
        if view_targets is not None:
            raise ValueError("make_dataset: view_targets is for training pipelines (training=True).")

        def load(idx):
            images = resize(tf.cast(tf.gather(images_t, idx), tf.float32))
            return tf.clip_by_value(images, 0.0, 255.0), tf.gather(labels_t, idx)

        ds = tf.data.Dataset.range(n).batch(batch_size, drop_remainder=drop_remainder)
        return ds.map(load, num_parallel_calls=autotune).prefetch(autotune)

    if balance:
        groups = y if balance_by is None else np.asarray(balance_by)
        if groups.shape != y.shape:
            raise ValueError(f"balance_by must have shape {y.shape}, got {groups.shape}")
        k = int(num_classes) if num_classes is not None else int(groups.max()) + 1
        per_class = []
        for c in range(k):
            idx = np.flatnonzero(groups == c).astype(np.int64)
            if len(idx):
                per_class.append(tf.data.Dataset.from_tensor_slices(idx)
                                 .shuffle(len(idx), seed=seed + 1 + c, reshuffle_each_iteration=True)
                                 .repeat())
        if not per_class:
            raise ValueError(f"balance=True: no labels in range [0, {k})")
        idx_ds = tf.data.Dataset.sample_from_datasets(
            per_class, weights=[1.0 / len(per_class)] * len(per_class), seed=seed,
            rerandomize_each_iteration=True).take(n)
    else:
        buffer = n if shuffle_buffer is None else max(1, min(int(shuffle_buffer), n))
        idx_ds = tf.data.Dataset.range(n).shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    idx_ds = idx_ds.batch(batch_size, drop_remainder=drop_remainder)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
    apply = _pixel_ops(in_hw, out_hw, crop=crop, pad=pad, brightness=brightness, contrast=contrast)

    if view_targets is not None:
        targets = np.asarray(view_targets, np.float32)
        if targets.ndim != 3 or len(targets) != n or targets.shape[1] < 1:
            raise ValueError(f"view_targets must have shape ({n}, views, classes), got {targets.shape}")
        views = int(targets.shape[1])
        table = view_params(seed, np.repeat(np.arange(n), views), np.tile(np.arange(views), n), crop=crop,
                            pad=pad, flip=flip, scale=(lo, hi), brightness=brightness, contrast=contrast,
                            mixup=mixup, mosaic=mosaic, n_images=n)
        params_t = tf.constant(table)
        targets_t = tf.constant(targets.reshape(n * views, -1))

        def augment_view(idx, seed_pair):
            # The index sampling and the seeds are today's; s[7] (unused by live views) picks k.
            s = tf.random.experimental.stateless_split(seed_pair, num=8)
            k = tf.random.stateless_uniform(tf.shape(idx), s[7], 0, views, dtype=tf.int64)
            row = tf.cast(idx, tf.int64) * views + k
            params = tf.gather(params_t, row)
            images = apply(tf.cast(tf.gather(images_t, idx), tf.float32), _draws(params, crop))
            labels = tf.gather(labels_t, idx)

            def partner_view(column, rows=None):
                # View k of the partner image each row names in this column (of the given rows only).
                p, kk = (params, k) if rows is None else (tf.gather(params, rows), tf.gather(k, rows))
                partner = tf.cast(p[:, column], tf.int64)
                return apply(tf.cast(tf.gather(images_t, partner), tf.float32),
                             _draws(tf.gather(params_t, partner * views + kk), crop))

            if mixup:
                # Only the blends need their partner's view (a view's pixels do not depend on the
                # batch it is made in, so these are the same pixels as made with the whole batch).
                mixed = params[:, MIX_FLAG] > 0.5
                rows = tf.where(mixed)[:, 0]
                others = tf.scatter_nd(rows[:, None], partner_view(MIX_PARTNER, rows),
                                       tf.shape(images, out_type=tf.int64))
                images, labels = _blend(images, others, params[:, MIX_LAMBDA], mixed, labels)
            if mosaic:
                quads = [images] + [partner_view(c) for c in MOSAIC_PARTNERS]
                images, labels = _tile(quads, params[:, MOSAIC_FLAG] > 0.5, labels)
            return images, (labels, tf.gather(targets_t, row))

        ds = tf.data.Dataset.zip((idx_ds, seeds)).map(augment_view, num_parallel_calls=autotune)
        return ds.prefetch(autotune)

    def augment(idx, seed_pair):
        s = tf.random.experimental.stateless_split(seed_pair, num=8)
        labels = tf.gather(labels_t, idx)
        images = tf.cast(tf.gather(images_t, idx), tf.float32)
        b = tf.shape(images)[0]
        draws = {"flip": (tf.random.stateless_uniform([b], s[0]) < 0.5) if flip else tf.zeros([b], tf.bool)}
        if crop == "pad":
            p = int(pad)
            draws["oy"] = tf.random.stateless_uniform([b], s[1], 0, 2 * p + 1, dtype=tf.int32)
            draws["ox"] = tf.random.stateless_uniform([b], s[2], 0, 2 * p + 1, dtype=tf.int32)
        elif crop == "random_resized":
            draws["area"] = tf.random.stateless_uniform([b], s[1], lo, hi)
            draws["log_ratio"] = tf.random.stateless_uniform([b], s[2], math.log(3 / 4), math.log(4 / 3))
            draws["y"] = tf.random.stateless_uniform([b], s[3])
            draws["x"] = tf.random.stateless_uniform([b], s[4])
        if brightness:
            draws["delta"] = tf.random.stateless_uniform([b], s[5], -float(brightness), float(brightness))
        if contrast:
            draws["factor"] = tf.random.stateless_uniform([b], s[6], 1.0 - float(contrast), 1.0 + float(contrast))
        views = apply(images, draws)
        images = views
        # s[7] (unused by the draws above) for the blends, and folded with 1 for the mosaics
        if mosaic:
            tiled = tf.random.stateless_uniform([b], tf.random.experimental.stateless_fold_in(s[7], 1)) < float(mosaic)
        if mixup:  # blended with the next image of the batch; a mosaic is never also a blend
            m = tf.random.experimental.stateless_split(s[7], num=2)
            mixed = tf.random.stateless_uniform([b], m[0]) < float(mixup)
            lam = tf.random.stateless_uniform([b], m[1])
            images, labels = _blend(views, tf.roll(views, 1, axis=0), lam, mixed & ~tiled if mosaic else mixed, labels)
        if mosaic:  # tiled with the next three images of the batch
            images, labels = _tile([images] + [tf.roll(views, r, axis=0) for r in (1, 2, 3)], tiled, labels)
        return images, labels

    ds = tf.data.Dataset.zip((idx_ds, seeds)).map(augment, num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def _blend(images, others, lam, mixed, labels):
    """``lam * images + (1 - lam) * others`` where ``mixed``, with label -1 there (no hard label)."""
    import tensorflow as tf

    lam = tf.cast(lam, images.dtype)[:, None, None, None]
    blended = lam * images + (1.0 - lam) * others
    images = tf.where(mixed[:, None, None, None], blended, images)
    return images, tf.where(mixed, tf.constant(-1, labels.dtype), labels)


def _tile(quads, tiled, labels):
    """The 2x2 mosaic of four batches of views (each shrunk to its quadrant, area-averaged)
    where ``tiled``, the first batch elsewhere; label -1 (no hard label) on the mosaics."""
    import tensorflow as tf

    h, w = int(quads[0].shape[1]), int(quads[0].shape[2])
    rows, cols = (h // 2, h - h // 2), (w // 2, w - w // 2)
    small = [tf.image.resize(q, (rows[j // 2], cols[j % 2]), method="area") for j, q in enumerate(quads)]
    mosaic = tf.concat([tf.concat(small[:2], axis=2), tf.concat(small[2:], axis=2)], axis=1)
    images = tf.where(tiled[:, None, None, None], tf.cast(mosaic, quads[0].dtype), quads[0])
    return images, tf.where(tiled, tf.constant(-1, labels.dtype), labels)


def _resizer(out_hw):
    """``resize(images)``: float images to ``out_hw`` (area averaging down, bilinear up)."""
    import tensorflow as tf

    def resize(images):
        in_size = tuple(images.shape[1:3])
        if in_size == out_hw:
            return images
        if out_hw[0] <= in_size[0] and out_hw[1] <= in_size[1]:
            # Downscale: area averaging is antialiased and ~7x faster than antialias=True bilinear.
            return tf.image.resize(images, out_hw, method="area")
        return tf.image.resize(images, out_hw, method="bilinear")

    return resize


def _pixel_ops(in_hw, out_hw, *, crop, pad, brightness, contrast):
    """``apply(images, draws)``: the augmentation of a float batch given its random draws
    (``flip``; ``oy, ox`` for ``pad``; ``area, log_ratio, y, x``, or the ``box`` they make,
    for ``random_resized``; ``delta``, ``factor``), clipped to [0, 255]. One definition for
    live and fixed views. Fixed views pass the box: TensorFlow's vectorised ``exp`` and
    ``sqrt`` round a value differently by its position in the batch, and a view must have the
    same pixels in any batch."""
    import tensorflow as tf

    resize = _resizer(out_hw)
    h, w = in_hw

    def apply(images, draws):
        b = tf.shape(images)[0]
        do_flip = draws["flip"]
        if crop == "pad":
            p = int(pad)
            if p > 0:
                images = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")
            oy, ox = draws["oy"], draws["ox"]
            rows = oy[:, None] + tf.range(h)[None, :]
            cols = tf.where(do_flip[:, None], ox[:, None] + (w - 1 - tf.range(w))[None, :],
                            ox[:, None] + tf.range(w)[None, :])
            images = tf.gather(images, rows, axis=1, batch_dims=1)
            images = tf.gather(images, cols, axis=2, batch_dims=1)
            images = resize(images)
        elif crop == "random_resized":
            if "box" in draws:  # fixed views: the box computed ahead (view_params)
                y1, x1, hf, wf = tf.unstack(draws["box"], axis=1)
            else:
                area = draws["area"]
                ratio = tf.exp(draws["log_ratio"])
                hf = tf.minimum(tf.sqrt(area / ratio), 1.0)
                wf = tf.minimum(tf.sqrt(area * ratio), 1.0)
                y1 = draws["y"] * (1.0 - hf)
                x1 = draws["x"] * (1.0 - wf)
            x2 = x1 + wf
            # crop_and_resize flips a box whose x1 > x2.
            left, right = tf.where(do_flip, x2, x1), tf.where(do_flip, x1, x2)
            boxes = tf.stack([y1, left, y1 + hf, right], axis=1)
            images = tf.image.crop_and_resize(images, boxes, tf.range(b), out_hw, method="bilinear")
        else:
            images = tf.where(do_flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
            images = resize(images)
        if brightness:
            images = images + draws["delta"][:, None, None, None]
        if contrast:
            factor = draws["factor"]
            mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
            images = (images - mean) * factor[:, None, None, None] + mean
        images = tf.clip_by_value(images, 0.0, 255.0)
        return tf.ensure_shape(images, [None, out_hw[0], out_hw[1], 3])

    return apply


# ----------------------------------------------------------------------------- fixed views
#: Random draws of one view, in this order: flip, four for the crop, brightness, contrast, and
#: for mixup: blended or not, the blend weight, the partner image; for mosaic: tiled or not, the
#: three partner images. Each draw is hashed on its own index, so adding draws left the first ones
#: (and every view cache made before) unchanged.
VIEW_DRAWS = 14
#: view_params columns of mixup: 1 if the view is a blend, its weight lam, the partner's index.
MIX_FLAG, MIX_LAMBDA, MIX_PARTNER = 7, 8, 9
#: view_params columns of mosaic: 1 if the view is a mosaic, the three partners' indices.
MOSAIC_FLAG, MOSAIC_PARTNERS = 10, (11, 12, 13)
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(z):
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def view_uniforms(seed: int, i, k) -> np.ndarray:
    """Uniform numbers in [0, 1), ``(len(i), VIEW_DRAWS)`` float64, of the views ``(i[j], k[j])``:
    a hash of ``(seed, i, k, draw)``, so a pure function of them, whatever the number of images
    or views (view ``(i, k)`` of a set with 4 views per image is the same in one with 8).

        >>> u = view_uniforms(0, [3, 3, 5], [0, 1, 0])
        >>> u.shape, bool(((0 <= u) & (u < 1)).all()), bool((u[0] != u[1]).all())
        ((3, 14), True, True)
        >>> bool((view_uniforms(0, [5], [0]) == u[2]).all())
        True
    """
    i = np.asarray(i, np.int64).astype(np.uint64).reshape(-1, 1)
    k = np.asarray(k, np.int64).astype(np.uint64).reshape(-1, 1)
    draw = np.arange(VIEW_DRAWS, dtype=np.uint64)[None, :]
    golden = np.uint64(_GOLDEN)
    with np.errstate(over="ignore"):
        z = _mix(np.full((1, 1), int(seed) & (2 ** 64 - 1), np.uint64) + golden)
        z = _mix((z ^ i) + golden)
        z = _mix((z ^ k) + golden)
        z = _mix((z ^ draw) + golden)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def view_params(seed: int, i, k, *, crop: str = "none", pad: int = 4, flip: bool = True,
                scale: Tuple[float, float] = (0.35, 1.0), brightness: float = 0.0,
                contrast: float = 0.0, mixup: float = 0.0, mosaic: float = 0.0,
                n_images: Optional[int] = None) -> np.ndarray:
    """The augmentation parameters of the fixed views ``(i[j], k[j])``: float32
    ``(len(i), VIEW_DRAWS)`` columns flip (0 / 1), crop (``pad``: row and column offsets;
    ``random_resized``: the box's top, left, height and width as fractions of the image),
    brightness offset, contrast factor; drawn as :func:`make_dataset`'s live views are; then
    (``mixup`` > 0, columns ``MIX_FLAG``, ``MIX_LAMBDA``, ``MIX_PARTNER``) whether the view is a
    blend (probability ``mixup``), its weight, and the partner image (another of the
    ``n_images``), whose view ``k`` it is blended with; zeros without mixup; then (``mosaic`` > 0,
    columns ``MOSAIC_FLAG``, ``MOSAIC_PARTNERS``) whether the view is a mosaic (probability
    ``mosaic``; then it is not a blend) and the three partner images whose views ``k`` fill the
    other quadrants.
    :func:`make_dataset` (``view_targets``) and :func:`make_views` build view ``(i, k)`` from
    its row with the live pipeline's own ops."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if (mixup or mosaic) and (n_images is None or n_images < 2):
        raise ValueError(f"mixup and mosaic need n_images >= 2 to pick partner images, got {n_images}")
    u = view_uniforms(seed, i, k)
    out = np.zeros_like(u)
    out[:, 0] = (u[:, 0] < 0.5) if flip else 0.0
    if crop == "pad":
        out[:, 1:3] = np.minimum(np.floor(u[:, 1:3] * (2 * int(pad) + 1)), 2 * int(pad))
    elif crop == "random_resized":
        lo, hi = float(scale[0]), float(scale[1])
        area = lo + u[:, 1] * (hi - lo)
        ratio = np.exp(math.log(3 / 4) + u[:, 2] * (math.log(4 / 3) - math.log(3 / 4)))
        hf, wf = np.minimum(np.sqrt(area / ratio), 1.0), np.minimum(np.sqrt(area * ratio), 1.0)
        out[:, 1:5] = np.stack([u[:, 3] * (1.0 - hf), u[:, 4] * (1.0 - wf), hf, wf], axis=1)
    out[:, 5] = float(brightness) * (2.0 * u[:, 5] - 1.0)
    out[:, 6] = 1.0 + float(contrast) * (2.0 * u[:, 6] - 1.0)
    own = np.asarray(i, np.int64).reshape(-1)

    def partner(column):  # any image but the view's own (float32 holds indices exactly up to 2 ** 24)
        other = np.minimum(np.floor(u[:, column] * (n_images - 1)), n_images - 2).astype(np.int64)
        return other + (other >= own)

    tiled = (u[:, MOSAIC_FLAG] < float(mosaic)) if mosaic else np.zeros(len(u), bool)
    if mixup:
        out[:, MIX_FLAG] = (u[:, MIX_FLAG] < float(mixup)) & ~tiled
        out[:, MIX_LAMBDA] = u[:, MIX_LAMBDA]
        out[:, MIX_PARTNER] = partner(MIX_PARTNER)
    if mosaic:
        out[:, MOSAIC_FLAG] = tiled
        for column in MOSAIC_PARTNERS:
            out[:, column] = partner(column)
    return out.astype(np.float32)


def _draws(params, crop: str) -> dict:
    """A batch of :func:`view_params` rows (a tensor) -> the draws ``_pixel_ops`` applies."""
    import tensorflow as tf

    draws = {"flip": params[:, 0] > 0.5, "delta": params[:, 5], "factor": params[:, 6]}
    if crop == "pad":
        draws["oy"], draws["ox"] = tf.cast(params[:, 1], tf.int32), tf.cast(params[:, 2], tf.int32)
    elif crop == "random_resized":
        draws["box"] = params[:, 1:5]
    return draws


def make_views(x, i, k, *, batch_size: int, seed: int = 0, image_size: Optional[ImageSize] = None,
               crop: str = "none", pad: int = 4, flip: bool = True,
               scale: Tuple[float, float] = (0.35, 1.0), brightness: float = 0.0, contrast: float = 0.0,
               mixup: float = 0.0, mosaic: float = 0.0):
    """A ``tf.data.Dataset`` of float32 batches: the fixed views ``(i[j], k[j])`` of the uint8
    images ``x``, in order, ``batch_size`` at a time; pixel for pixel the views that
    :func:`make_dataset` with ``view_targets`` (same ``x``, ``seed`` and settings) yields.

        >>> x = np.zeros((2, 8, 8, 3), np.uint8)
        >>> next(iter(make_views(x, [0, 1], [0, 0], batch_size=2, image_size=4))).shape.as_list()
        [2, 4, 4, 3]
    """
    import tensorflow as tf

    x = np.asarray(x)
    i = np.asarray(i, np.int64)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"x must be uint8 images (N, H, W, 3), got {x.dtype} {x.shape}")
    in_hw = (int(x.shape[1]), int(x.shape[2]))
    out_hw = as_hw(image_size) or in_hw
    images_t = tf.constant(x)
    idx_t = tf.constant(i)
    settings = dict(crop=crop, pad=pad, flip=flip, scale=scale, brightness=brightness, contrast=contrast)
    params = view_params(seed, i, k, mixup=mixup, mosaic=mosaic, n_images=len(x), **settings)
    params_t = tf.constant(params)
    partners = {}  # column -> (partner indices, their own view k's un-blended parameters)
    for column in ((MIX_PARTNER,) if mixup else ()) + (MOSAIC_PARTNERS if mosaic else ()):
        partner = params[:, column].astype(np.int64)
        partners[column] = (tf.constant(partner), tf.constant(view_params(seed, partner, k, **settings)))
    apply = _pixel_ops(in_hw, out_hw, crop=crop, pad=pad, brightness=brightness, contrast=contrast)

    def build(rows):
        params = tf.gather(params_t, rows)
        images = apply(tf.cast(tf.gather(images_t, tf.gather(idx_t, rows)), tf.float32), _draws(params, crop))
        no_labels = tf.zeros(tf.shape(rows), tf.int32)

        def partner_view(column):
            partner_t, partner_params_t = partners[column]
            return apply(tf.cast(tf.gather(images_t, tf.gather(partner_t, rows)), tf.float32),
                         _draws(tf.gather(partner_params_t, rows), crop))

        if mixup:
            images, _ = _blend(images, partner_view(MIX_PARTNER), params[:, MIX_LAMBDA],
                               params[:, MIX_FLAG] > 0.5, no_labels)
        if mosaic:
            images, _ = _tile([images] + [partner_view(c) for c in MOSAIC_PARTNERS],
                              params[:, MOSAIC_FLAG] > 0.5, no_labels)
        return images

    ds = tf.data.Dataset.range(len(i)).batch(int(batch_size))
    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE).prefetch(1)


def _soft_ellipse(h: int, w: int, person_fraction: float, feather: float) -> np.ndarray:
    """A float32 (h, w) mask: 1 inside an upright ellipse around the window's person, soft edge."""
    yy = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    xx = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    ay = 0.5 * min(1.0, person_fraction * 1.1)
    ax = 0.36
    r = np.sqrt((yy[:, None] / ay) ** 2 + (xx[None, :] / ax) ** 2)
    t = np.clip((1.0 - r) / max(feather, 1e-3), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep


def paste_augment(scenes, persons, *, n: Optional[int] = None, seed: int = 0,
                  height_range: Tuple[float, float] = (0.2, 0.9), person_fraction: float = 0.75,
                  max_people: int = 1, feather: float = 0.35, flip: bool = True,
                  match_exposure: float = 0.5):
    """Synthesise ``person`` scenes by pasting people into no-person scenes.

    ``persons`` is either an array of person windows (e.g. INRIA 64x128 crops, where the person
    is ~``person_fraction`` of the window height), pasted with a soft elliptical mask, or a list
    of cut-outs ``(rgb (h, w, 3) uint8, alpha (h, w) float in [0, 1])`` as
    :func:`glt_keras.data.person_cutouts` gives, pasted with their own masks (the person fills
    the cut-out: ``person_fraction`` is 1 for them). Each output is a random scene with
    1..``max_people`` random people, scaled so the person is ``height_range`` (fraction of the
    scene height, VWW-like 20-90%) tall, at a random position that keeps the person inside the
    scene vertically, randomly mirrored, its exposure moved ``match_exposure`` of the way towards
    the scene's. Deterministic for a given ``seed``.

    Args:
        scenes: uint8 ``(N, H, W, 3)`` scenes without people.
        persons: uint8 ``(M, h, w, 3)`` person windows, or a list of cut-outs.
        n: number of images to make (default ``len(scenes)``).

    Returns:
        ``(images uint8 (n, H, W, 3), labels int32 (n,) all 1 = person)``.
    """
    from PIL import Image

    scenes = np.asarray(scenes)
    if isinstance(persons, (list, tuple)):
        cutouts = [(np.asarray(rgb), np.asarray(alpha, np.float32)) for rgb, alpha in persons]
        if not cutouts or any(rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8
                              or alpha.shape != rgb.shape[:2] for rgb, alpha in cutouts):
            raise ValueError("persons: cut-outs must be a non-empty list of (uint8 (h, w, 3), alpha (h, w)) pairs")
    else:
        windows = np.asarray(persons)
        if windows.ndim != 4 or windows.shape[-1] != 3 or windows.dtype != np.uint8 or len(windows) == 0:
            raise ValueError(f"persons must be a non-empty uint8 (N, H, W, 3) array, got {windows.dtype} {windows.shape}")
        ellipse = _soft_ellipse(*windows.shape[1:3], person_fraction, feather)
        cutouts = None
    if scenes.ndim != 4 or scenes.shape[-1] != 3 or scenes.dtype != np.uint8 or len(scenes) == 0:
        raise ValueError(f"scenes must be a non-empty uint8 (N, H, W, 3) array, got {scenes.dtype} {scenes.shape}")
    if not 0 < height_range[0] <= height_range[1]:
        raise ValueError(f"height_range must satisfy 0 < low <= high, got {height_range}")
    n = len(scenes) if n is None else int(n)
    rng = np.random.default_rng(seed)
    H, W = scenes.shape[1:3]
    out = np.empty((n,) + scenes.shape[1:], np.uint8)
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    for i in range(n):
        canvas = scenes[rng.integers(len(scenes))].astype(np.float32)
        for _ in range(int(rng.integers(1, max_people + 1))):
            if cutouts is None:
                person, alpha, fraction = windows[rng.integers(len(windows))], ellipse, person_fraction
            else:
                (person, alpha), fraction = cutouts[rng.integers(len(cutouts))], 1.0
            if flip and rng.random() < 0.5:
                person, alpha = person[:, ::-1], alpha[:, ::-1]
            ph0, pw0 = person.shape[:2]
            person_h = rng.uniform(*height_range) * H
            wh = max(2, int(round(person_h / fraction)))
            ww = max(2, int(round(wh * pw0 / ph0)))
            win = np.asarray(Image.fromarray(np.ascontiguousarray(person)).resize((ww, wh), Image.Resampling.LANCZOS),
                             np.float32)
            mask = np.asarray(Image.fromarray(np.ascontiguousarray(alpha, np.float32)).resize(
                (ww, wh), Image.Resampling.BILINEAR), np.float32)
            margin_y = (1.0 - fraction) / 2 * wh
            y0 = int(round(rng.uniform(-margin_y, max(-margin_y, H - wh + margin_y))))
            x0 = int(round(rng.uniform(-0.25 * ww, max(-0.25 * ww, W - 0.75 * ww))))
            ys, xs = max(0, y0), max(0, x0)
            ye, xe = min(H, y0 + wh), min(W, x0 + ww)
            if ye <= ys or xe <= xs:
                continue
            patch = win[ys - y0:ye - y0, xs - x0:xe - x0]
            m = np.clip(mask[ys - y0:ye - y0, xs - x0:xe - x0, None], 0.0, 1.0)
            region = canvas[ys:ye, xs:xe]
            if match_exposure:
                p_mean = float((patch @ luma * m[..., 0]).sum() / max(m.sum(), 1e-3))
                s_mean = float((canvas @ luma).mean())
                gain = np.clip((s_mean + 1.0) / (p_mean + 1.0), 0.5, 2.0) ** float(match_exposure)
                patch = np.clip(patch * gain, 0.0, 255.0)
            canvas[ys:ye, xs:xe] = region * (1.0 - m) + patch * m
        out[i] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return out, np.ones(n, np.int32)


def random_subset(n: int, *arrays, seed: int = 0):
    """At most ``n`` items of ``arrays`` (same length), drawn uniformly without replacement.

    For calibration and probe sets: the first ``n`` items of a class-sorted set (CIFAR-10,
    a class-stratified holdout) would all be of one class.

        >>> x, y = np.zeros((10, 2)), np.repeat([0, 1], 5)
        >>> sorted(set(random_subset(4, x, y)[1])) == [0, 1]
        True
    """
    if not arrays:
        raise ValueError("random_subset needs at least one array.")
    length = len(arrays[0])
    if any(len(a) != length for a in arrays):
        raise ValueError(f"random_subset: arrays of different lengths {[len(a) for a in arrays]}.")
    idx = np.sort(np.random.default_rng(seed).permutation(length)[: int(n)])
    picked = tuple(np.asarray(a)[idx] for a in arrays)
    return picked[0] if len(picked) == 1 else picked


def resize_uint8(x, size_hw) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` resized (antialiased bilinear, rounded) to ``size_hw``.

    The one resize of stored images to a recipe's input size: training, ``glt-keras eval``
    and the benchmark must feed a model the same pixels (Caltech-101 is stored at 112x112
    for 96x96 models).

        >>> resize_uint8(np.full((1, 8, 8, 3), 7, np.uint8), (4, 4))[0, 0, 0].tolist()
        [7, 7, 7]
    """
    import tensorflow as tf

    x = np.asarray(x)
    size_hw = as_hw(size_hw)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"resize_uint8 takes uint8 images (N, H, W, C), got {x.dtype} {x.shape}.")
    if x.shape[1:3] == tuple(size_hw):
        return x
    out = []
    for start in range(0, len(x), 512):
        chunk = tf.image.resize(x[start:start + 512], size_hw, antialias=True)
        out.append(tf.cast(tf.clip_by_value(tf.round(chunk), 0, 255), tf.uint8).numpy())
    return np.concatenate(out)
