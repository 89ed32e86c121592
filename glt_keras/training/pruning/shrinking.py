"""The physical shrink: rebuild a masked network without its masked channels (exactly the
same outputs, see "Masking scheme" in :mod:`glt_keras.training.pruning`), and the
before / after report."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .scores import masks_from_model
from .structure import _fresh, _is_conv, _new_input_order, _spatial, block_structure


def _quantized_kernel(conv) -> np.ndarray:
    kernel = tf.constant(conv.kernel.numpy())
    quantizer = getattr(conv, "kernel_quantizer", None)
    return (quantizer(kernel) if quantizer is not None else kernel).numpy().astype(np.float64)


def _masked_value(conv) -> float:
    quantizer = getattr(conv, "input_quantizer", None)
    return float(quantizer(tf.ones(())).numpy()) if quantizer is not None else 1.0


def _remap_inputs(kernel, groups, original_positions, old_in, new_in):
    """Reorder / slice a (kh, kw, cin/g, cout) kernel's input axis to the shrunk layout."""
    old_per, new_per = old_in // groups, new_in // groups
    cout_per = kernel.shape[-1] // groups
    out = np.empty(kernel.shape[:2] + (new_per, kernel.shape[-1]), kernel.dtype)
    for j in range(groups):
        local = original_positions[j * new_per:(j + 1) * new_per] - j * old_per
        cols = slice(j * cout_per, (j + 1) * cout_per)
        out[:, :, :, cols] = kernel[:, :, local, cols]
    return out


def _constant(kernel_q, groups, removed_positions, old_in, value) -> np.ndarray:
    """Per output channel: the consumer's sum over removed inputs reading ``value``."""
    old_per = old_in // groups
    cout_per = kernel_q.shape[-1] // groups
    c = np.zeros(kernel_q.shape[-1])
    for j in range(groups):
        mine = removed_positions[removed_positions // old_per == j] - j * old_per
        cols = slice(j * cout_per, (j + 1) * cout_per)
        c[cols] = kernel_q[:, :, mine, cols].sum(axis=(0, 1, 2)) * value
    return c


def _strip_build_config(config):
    """Drop recorded input shapes: the widths change, so every layer must infer its own."""
    if isinstance(config, dict):
        return {k: _strip_build_config(v) for k, v in config.items() if k != "build_config"}
    if isinstance(config, list):
        return [_strip_build_config(v) for v in config]
    return config


def shrink(model: tf.keras.Model, masks: dict | None = None, *, channel_multiple: int = 32) -> tf.keras.Model:
    """A physically smaller copy of ``model`` without its masked channels, equal in output.

    ``masks``: ``{bn_name: bool array, True = removed}``; default: read from the model
    (channels whose BN has ``gamma == 0`` and ``beta == 1``, the callback's marker).
    For each block, the conv's output channels and its BN are sliced, the consumer's
    input channels are sliced and reordered through the (shrunk) shuffle, and the
    removed channels' constant contribution (+1 inputs times ``sign(W)``) is folded
    into the consumer's BN ``moving_mean`` (or added to its bias). The rebuilt model has
    the same layers, names, groups and flags (``split_groups``) as the original; only
    ``filters`` change, so it is what :func:`glt_keras.models.glt_net` builds with the
    new widths and :func:`glt_keras.models.for_export` converts as usual.

    Raises ``ValueError`` when a mask does not remove the same number of channels from
    every cell, or leaves a consumer group with a width that is not a multiple of
    ``channel_multiple``.

    Example:
        >>> small = shrink(masked_model)  # doctest: +SKIP
        >>> [l.filters for l in small.layers if hasattr(l, "filters")]  # doctest: +SKIP
        [64, 64, 64, 10]
    """
    structures = block_structure(model)
    if masks is None:
        masks = masks_from_model(model, structures)
    by_bn = {s.bn: s for s in structures}
    unknown = set(masks) - set(by_bn)
    if unknown:
        raise ValueError(f"masks name layers that are not blocks: {sorted(unknown)}.")

    plans = {}  # bn name -> (structure, keep, original input positions of the consumer)
    for bn_name, masked in masks.items():
        masked = np.asarray(masked, bool)
        if not masked.any():
            continue
        s = by_bn[bn_name]
        if s.cells is None or s.consumer is None:
            raise ValueError(f"{s.name} cannot be pruned: {s.reason}")
        per_cell = masked[s.cells].sum(-1)
        if len(set(per_cell.tolist())) != 1:
            raise ValueError(
                f"{s.name}: the mask removes {sorted(set(per_cell.tolist()))} channels from different "
                "cells; every cell (producer group x consumer group) must lose the same number."
            )
        kept_per_consumer_group = (s.cells.shape[1] - per_cell[0]) * s.cells_per_consumer_group
        if kept_per_consumer_group <= 0 or kept_per_consumer_group % channel_multiple:
            raise ValueError(
                f"{s.name}: {s.consumer} would keep {kept_per_consumer_group} inputs per group, "
                f"not a positive multiple of {channel_multiple}."
            )
        keep = np.flatnonzero(~masked)
        spatial = _spatial(model.get_layer(s.bn))
        path = [_fresh(model.get_layer(n)) for n in s.path]
        plans[bn_name] = (s, keep, _new_input_order(s, keep, path, spatial))

    out_keep = {by_bn[b].conv: plan[1] for b, plan in plans.items()}
    in_plan = {plan[0].consumer: plan for plan in plans.values()}

    config = _strip_build_config(model.get_config())
    for layer in config["layers"]:
        if layer["name"] in out_keep:
            layer["config"]["filters"] = int(len(out_keep[layer["name"]]))
    from ...models import custom_objects

    with tf.keras.utils.custom_object_scope(custom_objects()):
        small = model.__class__.from_config(config)

    # Constants folded into the consumers' BN (or bias), indexed by the consumer's original outputs.
    constants = {}
    for conv_name, (s, keep, _) in in_plan.items():
        consumer = model.get_layer(conv_name)
        removed = s.position[np.flatnonzero(~np.isin(np.arange(s.channels), keep))]
        c = _constant(_quantized_kernel(consumer), s.consumer_groups, removed, s.channels, _masked_value(consumer))
        constants[conv_name] = c

    consumer_bn_of = {plan[0].consumer: plan[0].consumer_bn for plan in plans.values()}
    bn_constant = {consumer_bn_of[c]: constants[c] for c in constants if consumer_bn_of[c]}
    bn_keep = {b: plan[1] for b, plan in plans.items()}

    for new in small.layers:
        old = model.get_layer(new.name)
        if not old.weights:
            continue
        if _is_conv(old):
            kernel = old.kernel.numpy()
            bias = old.bias.numpy() if old.use_bias else None
            if old.name in in_plan:
                s, keep, original = in_plan[old.name]
                kernel = _remap_inputs(kernel, s.consumer_groups, original, s.channels, len(keep))
                if bias is not None and s.consumer_bn is None:
                    bias = bias + constants[old.name]
            if old.name in out_keep:
                kernel = kernel[..., out_keep[old.name]]
                bias = bias[out_keep[old.name]] if bias is not None else None
            new.kernel.assign(kernel)
            if bias is not None:
                new.bias.assign(bias)
            extra = [w for w in old.weights if w is not old.kernel and (not old.use_bias or w is not old.bias)]
            if extra:
                raise ValueError(f"{old.name}: unexpected extra conv weights {[w.name for w in extra]}.")
        elif isinstance(old, tf.keras.layers.BatchNormalization):
            values = {
                "gamma": old.gamma.numpy(),
                "beta": old.beta.numpy(),
                "moving_mean": old.moving_mean.numpy().astype(np.float64),
                "moving_variance": old.moving_variance.numpy(),
            }
            if old.name in bn_constant:
                values["moving_mean"] = values["moving_mean"] - bn_constant[old.name]
            keep = bn_keep.get(old.name)
            for key, value in values.items():
                if keep is not None:
                    value = value[keep]
                getattr(new, key).assign(value.astype(np.float32))
        else:
            new.set_weights(old.get_weights())
    return small



def _summary(model_or_summary) -> dict:
    if isinstance(model_or_summary, dict):
        return dict(model_or_summary)
    from ...models import model_summary

    summary = model_summary(model_or_summary)
    summary["widths"] = {
        layer.name: int(layer.filters)
        for layer in model_or_summary.layers
        if _is_conv(layer)
    }
    return summary


def pruning_report(before, after, *, tflite_bytes=None) -> dict:
    """Parameters, binary-weight bytes and MACs before / after pruning, with a markdown table.

    ``before`` / ``after``: models or :func:`glt_keras.models.model_summary` dicts.
    ``tflite_bytes``: optional ``(before, after)`` flatbuffer sizes (measured by the
    convert room, which training does not import).

    Returns ``{"before": {...}, "after": {...}, "ratio": {metric: after / before},
    "widths": {conv: (before, after)}, "markdown": str}``.

    Example:
        >>> report = pruning_report(model, shrink(model))  # doctest: +SKIP
        >>> print(report["markdown"])  # doctest: +SKIP
        | metric | before | after | after / before |
        ...
    """
    b, a = _summary(before), _summary(after)
    metrics = ["params", "binary_params", "binary_weight_bytes", "real_params", "macs", "binary_macs"]
    if tflite_bytes is not None:
        b["tflite_bytes"], a["tflite_bytes"] = (int(v) for v in tflite_bytes)
        metrics.append("tflite_bytes")
    report = {
        "before": {m: b[m] for m in metrics if m in b},
        "after": {m: a[m] for m in metrics if m in a},
        "ratio": {m: (a[m] / b[m] if b.get(m) else None) for m in metrics if m in a and m in b},
    }
    widths_b, widths_a = b.get("widths", {}), a.get("widths", {})
    report["widths"] = {k: (widths_b[k], widths_a.get(k)) for k in widths_b}
    lines = ["| metric | before | after | after / before |", "|---|---:|---:|---:|"]
    for m in report["before"]:
        ratio = report["ratio"].get(m)
        lines.append(
            f"| {m} | {report['before'][m]:,} | {report['after'][m]:,} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    changed = [f"{k} {v[0]}->{v[1]}" for k, v in report["widths"].items() if v[0] != v[1]]
    if report["widths"]:
        lines.append("")
        lines.append("Widths: " + (", ".join(changed) if changed else "unchanged"))
    report["markdown"] = "\n".join(lines)
    return report

