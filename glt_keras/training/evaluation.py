"""Evaluate a model on labelled arrays: accuracy, mean per-class accuracy, cross-entropy and
the confusion matrix (with a markdown rendering)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def evaluate(model, x, y, *, class_names, batch_size=128, image_size=None) -> dict:
    """Accuracy, mean per-class accuracy, cross-entropy and confusion matrix."""
    from ..data import make_dataset

    ds = make_dataset(x, y, batch_size=batch_size, training=False, image_size=image_size)
    scores = model.predict(ds, verbose=0)
    if not np.allclose(scores.sum(-1), 1.0, atol=1e-3) or scores.min() < 0:
        probs = tf.nn.softmax(scores).numpy()
    else:
        probs = scores
    pred = probs.argmax(-1)
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))
    return {
        "images": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "mean_per_class_accuracy": float(per_class[confusion.sum(1) > 0].mean()),
        "loss": loss,
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
    }


def confusion_markdown(result: dict, max_classes: int = 12) -> str:
    names = result["class_names"]
    cm = np.array(result["confusion"])
    if len(names) > max_classes:
        return f"(confusion matrix of {len(names)} classes omitted; see JSON)"
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, cm):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)
