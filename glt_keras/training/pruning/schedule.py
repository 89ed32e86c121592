"""Pruning during training: the :class:`BlockPruning` callback that grows the masks on a
tfmot schedule, and the schedule / callback of a recipe's ``pruning`` settings."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .scores import _score_fn, apply_masks, masks_from_model, pruned_fraction, select_masks
from .structure import _select, block_structure


def optimizer_iterations(optimizer) -> int | None:
    """An optimizer's step count; for larq's ``CaseOptimizer`` (whose own ``iterations``
    stays 0) the largest count of its inner optimizers."""
    if optimizer is None:
        return None
    inner = [o for o in (getattr(optimizer, "optimizers", None) or []) if o is not None]
    counts = [
        int(tf.keras.backend.get_value(o.iterations)) for o in inner if getattr(o, "iterations", None) is not None
    ]
    if counts:
        return max(counts)
    iterations = getattr(optimizer, "iterations", None)
    return None if iterations is None else int(tf.keras.backend.get_value(iterations))


def _as_float(value) -> float:
    return float(value.numpy()) if hasattr(value, "numpy") else float(value)


class BlockPruning(tf.keras.callbacks.Callback):
    """Gradual structured block pruning with exact +1 masks (see :mod:`glt_keras.training.pruning`).

    Args:
        model: the network to prune (the student, also when ``fit`` runs on a wrapper
            such as a distiller: masks always go to this model).
        target_ratio: fraction of blocks to remove at the end of the schedule: per layer
            with ``allocation="layer"`` (``floor(ratio * blocks_per_cell)`` blocks of every
            cell), of all pruned channels with ``"global"``; never exceeded. ``None`` takes
            the schedule's final sparsity.
        schedule: a tfmot ``PruningSchedule`` (``PolynomialDecay``, ``ConstantSparsity``)
            or any callable ``step -> (should_prune, sparsity)``. The ratio in effect is
            ``min(sparsity, target_ratio)``; masks are recomputed when ``should_prune``
            is true and also at the schedule's ``end_step``, so the target is reached there
            even when ``end_step - begin_step`` is not a multiple of ``frequency``.
            Default: ``ConstantSparsity(target_ratio, begin_step=0, frequency=1)`` on epochs,
            i.e. one-shot pruning at the first epoch, then fine-tuning with the masks.
        score: ``"bn"`` (BN scale), ``"l1"`` (latent weight L1) or a callable
            ``score(model, structure) -> per-channel scores``.
        block_size: the channel multiple kept at every consumer group (32 for LCE).
        layers: block names (``"block3"``), BN or conv names to prune; default every
            prunable block.
        allocation: ``"layer"`` (the same fraction in every layer) or ``"global"``.
        update: ``"batch"`` (schedule steps are training steps) or ``"epoch"`` (schedule
            steps are epoch indices).

    Steps are counted by the callback itself: ``epoch * steps_per_epoch + batch`` from
    ``fit``'s epoch index (``initial_epoch`` on a resume) and ``self.params["steps"]``.
    They do not depend on ``optimizer.iterations``, which larq's ``CaseOptimizer`` never
    increments (its inner optimizers count). Only when ``fit`` does not know the epoch
    length does the callback fall back to the optimizer's step counter (the inner
    optimizers' for a ``CaseOptimizer``), then to its own batch counter.

    Resuming: the masks live in the model (the BN marker), so a checkpoint restores
    them; at the first batch of every ``fit`` the callback re-derives the ratio in
    effect from the schedule (the ratio of its last update step at or before this one)
    and re-establishes the masks at that ratio (a no-op when they came back from a
    checkpoint), so a resumed run prunes exactly like an uninterrupted one. ``ratio`` is
    that ratio in effect; it is logged as ``pruning_ratio``, next to ``pruned_fraction``.

    Masks are applied at each update and again after every training batch (the
    optimizer moves the masked BN parameters), so ``fit`` must run with
    ``steps_per_execution=1``. ``history`` records ``(step, sparsity, fraction)`` at every
    update; ``fraction`` (:func:`pruned_fraction`) is the removed share of the pruned
    blocks' channels; it is also written into the epoch logs as ``pruned_fraction``
    (callbacks listed after this one see it).

    Example:
        >>> schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, 0, 1000, frequency=100)
        >>> pruning = BlockPruning(model, 0.5, schedule=schedule, score="bn")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=5, callbacks=[pruning])  # doctest: +SKIP
        >>> small = shrink(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        target_ratio: float | None = None,
        schedule=None,
        score="bn",
        block_size: int = 32,
        layers=None,
        *,
        allocation: str = "layer",
        update: str = "batch",
        verbose: int = 0,
    ):
        super().__init__()
        final = None
        if schedule is not None:
            final = getattr(schedule, "final_sparsity", getattr(schedule, "target_sparsity", None))
        if target_ratio is None:
            if final is None:
                raise ValueError("give target_ratio, or a schedule with a final sparsity.")
            target_ratio = float(final)
        elif final is not None and abs(float(final) - float(target_ratio)) > 1e-6:
            raise ValueError(
                f"the schedule ends at sparsity {final} but target_ratio is {target_ratio}."
            )
        if not 0.0 <= float(target_ratio) < 1.0:
            raise ValueError(f"target_ratio must be in [0, 1), got {target_ratio}.")
        if update not in ("batch", "epoch"):
            raise ValueError(f"update must be 'batch' or 'epoch', got {update!r}.")
        if schedule is None:
            import tensorflow_model_optimization as tfmot

            schedule = tfmot.sparsity.keras.ConstantSparsity(float(target_ratio), 0, frequency=1)
            update = "epoch" if update == "batch" else update
        self.pruned_model = model
        self.target_ratio = float(target_ratio)
        self.schedule = schedule
        self.score = score
        _score_fn(score)
        self.block_size = int(block_size)
        self.allocation = allocation
        self.update = update
        self.verbose = verbose
        self.structures = _select(block_structure(model, self.block_size), layers)
        self.masks = masks_from_model(model, self.structures)
        self.history: list[tuple[int, float, float]] = []
        self._counter = 0
        self._epoch = None
        self._synced = False
        self._ratio = 0.0

    # -- the schedule -------------------------------------------------------------
    def ratio_at(self, step: int) -> tuple[bool, float]:
        """``(update now?, ratio)`` at ``step``: the schedule's answer, capped at the target."""
        should, sparsity = self.schedule(tf.constant(int(step), tf.int64))
        should = bool(should.numpy()) if hasattr(should, "numpy") else bool(should)
        end = getattr(self.schedule, "end_step", None)
        if end is not None and end >= 0 and int(step) == int(end):
            should = True
        return should, min(_as_float(sparsity), self.target_ratio)

    def last_update_step(self, step: int) -> int | None:
        """The schedule's last update step at or before ``step`` (``None``: none yet).

        Computed from ``begin_step`` / ``end_step`` / ``frequency`` for tfmot schedules,
        by searching backwards (at most 100,000 steps) for any other callable.
        """
        step = int(step)
        begin = getattr(self.schedule, "begin_step", None)
        end = getattr(self.schedule, "end_step", None)
        frequency = getattr(self.schedule, "frequency", None)
        if begin is not None and end is not None and frequency:
            begin, end, frequency = int(begin), int(end), int(frequency)
            if step < begin:
                return None
            if end >= 0 and step >= end:
                return end
            return begin + ((step - begin) // frequency) * frequency
        for candidate in range(step, max(-1, step - 100_000), -1):
            if self.ratio_at(candidate)[0]:
                return candidate
        return None

    def ratio_in_effect(self, step: int) -> float:
        """The ratio the masks have after the schedule's updates up to ``step`` included."""
        last = self.last_update_step(step)
        return 0.0 if last is None else self.ratio_at(last)[1]

    @property
    def ratio(self) -> float:
        """The pruning ratio in effect (the schedule's ratio at the last update)."""
        return self._ratio

    @property
    def at_target(self) -> bool:
        """Whether the schedule has reached ``target_ratio`` (masks are final)."""
        return self._ratio >= self.target_ratio - 1e-6

    def update_masks(self, step: int | None = None, ratio: float | None = None) -> dict:
        """Recompute scores and masks (at ``ratio``, or the schedule's ratio at ``step``) and apply."""
        if ratio is None:
            _, ratio = self.ratio_at(step or 0)
        ratio = min(float(ratio), self.target_ratio)
        self._ratio = max(self._ratio, ratio)
        self.masks = select_masks(
            self.pruned_model,
            self.structures,
            ratio,
            self.score,
            allocation=self.allocation,
            previous=self.masks,
        )
        self.apply_masks()
        fraction = self.pruned_fraction
        self.history.append((int(step if step is not None else -1), ratio, fraction))
        if self.verbose:
            print(f"BlockPruning: step {step}: ratio {ratio:.3f}, pruned {fraction:.3f} of channels")
        return self.masks

    def apply_masks(self) -> None:
        apply_masks(self.pruned_model, self.masks)

    @property
    def pruned_fraction(self) -> float:
        return pruned_fraction(self.structures, self.masks)

    # -- Keras hooks --------------------------------------------------------------
    def _step(self, batch: int) -> int:
        steps = (self.params or {}).get("steps")
        if steps and self._epoch is not None:
            return int(self._epoch) * int(steps) + int(batch)
        for candidate in (self.model, self.pruned_model):
            iterations = optimizer_iterations(getattr(candidate, "optimizer", None))
            if iterations is not None:
                return iterations
        return self._counter

    def on_train_begin(self, logs=None):
        spe = getattr(self.model, "_steps_per_execution", None)
        if spe is not None and int(tf.keras.backend.get_value(spe)) != 1:
            raise ValueError("BlockPruning needs steps_per_execution=1 to re-apply masks every step.")
        # Resume: masks written into the model (BN marker) survive checkpoints.
        found = masks_from_model(self.pruned_model, self.structures)
        for name, masked in found.items():
            self.masks[name] = masked | self.masks.get(name, np.zeros_like(masked))
        self.apply_masks()
        self._synced = False

    def maybe_update(self, step: int) -> bool:
        """What the callback does at a schedule step: update the masks if the schedule says so."""
        should, ratio = self.ratio_at(step)
        if should:
            self.update_masks(step, ratio)
        elif not self._synced:
            # First step of this fit (a fresh start or a resume): the ratio in effect is the
            # one of the schedule's last update; re-establish it (masks only grow, so masks
            # restored from a checkpoint at that ratio stay exactly as they are).
            last = self.last_update_step(step)
            if last is not None:
                ratio = self.ratio_at(last)[1]
                if ratio > 0:
                    self.update_masks(last, ratio)
                self._ratio = max(self._ratio, ratio)
        self._synced = True
        return should

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        if self.update == "epoch":
            self.maybe_update(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.update == "batch":
            self.maybe_update(self._step(batch))

    def on_train_batch_end(self, batch, logs=None):
        self._counter += 1
        self.apply_masks()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["pruned_fraction"] = self.pruned_fraction
            logs["pruning_ratio"] = self.ratio

    def on_train_end(self, logs=None):
        self.apply_masks()



def make_schedule(settings: dict, steps_per_epoch: int, epochs: int, *, verbose: int = 1):
    """The tfmot schedule of a recipe's pruning block over ``epochs`` of ``steps_per_epoch``.

    ``PolynomialDecay(0 -> target_ratio)`` from the first step of ``start_epoch`` to the
    first step of ``end_epoch``, updating every ``frequency_steps``; ``ConstantSparsity``
    (one-shot) when they coincide. A schedule that would end after the last step (a
    run shortened with ``--epochs``) is clamped to it, with a warning.
    """
    import tensorflow_model_optimization as tfmot

    n, total = int(steps_per_epoch), int(steps_per_epoch) * int(epochs)
    begin = int(settings["start_epoch"]) * n
    end = int(settings["end_epoch"]) * n
    if end > total - 1:
        clamped_end, clamped_begin = total - 1, min(begin, total - 1)
        if verbose:
            print(
                f"pruning: the schedule (epochs {settings['start_epoch']}..{settings['end_epoch']}, steps "
                f"{begin}..{end}) does not fit {epochs} epochs of {n} steps: clamped to steps "
                f"{clamped_begin}..{clamped_end}."
            )
        begin, end = clamped_begin, clamped_end
    target = float(settings["target_ratio"])
    frequency = max(1, int(settings["frequency_steps"]))
    if end <= begin:
        return tfmot.sparsity.keras.ConstantSparsity(target, begin_step=begin, end_step=begin, frequency=1)
    return tfmot.sparsity.keras.PolynomialDecay(0.0, target, begin_step=begin, end_step=end, frequency=frequency)


def pruning_callback(model, settings: dict, steps_per_epoch: int, epochs: int, *, verbose: int = 1) -> BlockPruning:
    """The :class:`BlockPruning` callback of a recipe's pruning block."""
    return BlockPruning(
        model,
        float(settings["target_ratio"]),
        schedule=make_schedule(settings, steps_per_epoch, epochs, verbose=verbose),
        score=settings["score"],
        block_size=int(settings["block_size"]),
        layers=settings["layers"],
        allocation=settings["allocation"],
        update="batch",
        verbose=1 if verbose and verbose > 1 else 0,
    )

