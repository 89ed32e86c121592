"""An exponential moving average of a network's weights (Polyak averaging), the run's weights
when a recipe sets ``training.ema_momentum``.

On a small validation set a binary network's accuracy swings by points from epoch to epoch:
its latent weights keep crossing zero, and every crossing flips a binary weight. The average
of the latent weights over the last few hundred steps flips far less often; its signs are a
network that no single step produced but that the steps agree on. Every float variable is
averaged, BatchNorm's moving statistics and the thermometer's thresholds included (a convex
combination keeps the thresholds ordered and the latent weights inside their clip range).

Keras names it like its optimizers' ``use_ema`` / ``ema_momentum``: after every training step
``average = m * average + (1 - m) * weight``, with ``m`` ramped up as ``min(m, (1 + n) / (10 + n))``
over the first steps ``n`` (as ``tf.train.ExponentialMovingAverage(num_updates=n)``), so the
average does not hold the initial weights for the first thousand steps.

Example:
    >>> import tensorflow as tf
    >>> model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    >>> average = WeightAverage(model, momentum=0.99)
    >>> average.update()
    >>> with average.applied():  # the model holds the averaged weights inside the block
    ...     _ = model(tf.ones((1, 2)))
"""
from __future__ import annotations

import contextlib

import tensorflow as tf

from ..models import save_weights
from .checkpoints import CheckpointError


class WeightAverage:
    """Averaged copies of ``model``'s float variables; ``state`` goes into the run's checkpoint
    (a resumed run continues its average), ``applied()`` swaps them into the model.

    ``constraint``: called on the model each time the averages are swapped in. A pruning run
    re-applies its masks there: the average of weights from before and after a block was masked
    is not a masked network until the mask is applied to it too."""

    def __init__(self, model: tf.keras.Model, *, momentum: float, constraint=None):
        if not 0.0 < float(momentum) < 1.0:
            raise ValueError(f"training.ema_momentum must be in (0, 1), got {momentum}.")
        self.momentum = float(momentum)
        self.model = model
        self.constraint = constraint
        self._variables = [v for v in model.weights if v.dtype.is_floating]
        # A tf.Module of its own so the checkpoint does not reach the model's variables twice.
        self.state = tf.Module(name="weight_average")
        self.state.averages = [tf.Variable(tf.cast(v, tf.float32), trainable=False, name=_short(v))
                               for v in self._variables]
        self.state.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")

    @tf.function
    def update(self):
        n = tf.cast(self.state.updates, tf.float32)
        m = tf.minimum(tf.constant(self.momentum), (1.0 + n) / (10.0 + n))
        for average, variable in zip(self.state.averages, self._variables):
            average.assign(m * average + (1.0 - m) * tf.cast(variable, tf.float32))
        self.state.updates.assign_add(1)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the ``with`` block, its own after it
        (also when the block raises)."""
        kept = [tf.identity(v) for v in self._variables]
        try:
            for variable, average in zip(self._variables, self.state.averages):
                variable.assign(tf.cast(average, variable.dtype))
            if self.constraint is not None:
                self.constraint()
            yield self.model
        finally:
            for variable, value in zip(self._variables, kept):
                variable.assign(value)

    def save_weights(self, path):
        """The averaged network's weight file (the same format as ``models.save_weights``)."""
        with self.applied():
            save_weights(self.model, path)


def check_resumable(checkpoint_dir, recipe_name: str) -> None:
    """``CheckpointError`` when a run resumed with ``training.ema_momentum`` has no average in its
    checkpoint (the key was added after the run started): the average cannot be made up."""
    names = [name for name, _ in tf.train.list_variables(str(checkpoint_dir) + "/ckpt")]
    if not any(name.startswith("weight_average/") for name in names):
        raise CheckpointError(
            f"cannot resume {recipe_name} with training.ema_momentum: its checkpoint {checkpoint_dir} holds no "
            "weight average (the run started without one); remove ema_momentum to continue it, or start a new run.")


def _short(variable) -> str:
    return variable.name.replace("/", "_").replace(":", "_")


class WeightAverageCallback(tf.keras.callbacks.Callback):
    """Updates the average after every training step; after every epoch evaluates the averaged
    network on ``validation_data`` and adds ``val_loss_ema`` / ``val_accuracy_ema`` to the
    epoch's logs (for the callbacks after it: the run's logger selects on them)."""

    def __init__(self, average: WeightAverage, validation_data=None):
        super().__init__()
        self.average = average
        self.validation_data = validation_data
        self._supports_tf_logs = True  # no per-step conversion of the logs to numpy

    def on_train_batch_end(self, batch, logs=None):
        self.average.update()

    def on_epoch_end(self, epoch, logs=None):
        if self.validation_data is None or logs is None:
            return
        with self.average.applied():
            scores = self.model.evaluate(self.validation_data, verbose=0, return_dict=True)
        for key in ("loss", "accuracy"):
            if key in scores:
                logs[f"val_{key}_ema"] = float(scores[key])
