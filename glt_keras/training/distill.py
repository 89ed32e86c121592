"""Knowledge distillation from a real-valued teacher into a binary student."""
from __future__ import annotations

import tensorflow as tf


def distillation_loss(labels, student_logits, teacher_logits, *, alpha=0.5, temperature=4.0):
    """``alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    ``labels`` are integer class ids. With ``alpha=1`` this is plain cross-entropy.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    student_logits = tf.cast(student_logits, tf.float32)
    ce = tf.keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
    t = float(temperature)
    p_teacher = tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / t)
    log_p_teacher = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / t)
    log_p_student = tf.nn.log_softmax(student_logits / t)
    kl = tf.reduce_sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)
    return tf.reduce_mean(alpha * ce + (1.0 - alpha) * t * t * kl)


class _LossAndMetrics:
    """The loss tracker and compiled metrics shared by the distillers' train and test steps."""

    def _update_metrics(self, loss, y, logits):
        self.loss_tracker.update_state(loss)
        self.compiled_metrics.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        base = [self.loss_tracker]
        if self.compiled_metrics is not None:
            base += self.compiled_metrics.metrics
        return base


class Distiller(_LossAndMetrics, tf.keras.Model):
    """Wraps a student and a frozen teacher; ``compile`` / ``fit`` / ``evaluate`` as usual.

    Both models must output logits (build them with ``classifier_activation=None``).
    ``feature_pairs`` optionally adds attention matching (Zagoruyko & Komodakis): for
    each ``(student_layer, teacher_layer)`` name pair with equal spatial size, the L2
    distance between the normalised spatial attention maps ``mean_c(a^2)``, weighted by
    ``feature_weight``.

    Example:
        >>> distiller = Distiller(student, teacher, alpha=0.5, temperature=4.0)
        >>> distiller.compile(optimizer="adam", metrics=["accuracy"])
        >>> distiller.fit(dataset, epochs=1)  # doctest: +SKIP
    """

    def __init__(self, student, teacher, *, alpha=0.5, temperature=4.0, feature_pairs=(), feature_weight=1.0):
        super().__init__(name="distiller")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.feature_weight = float(feature_weight)
        self.feature_pairs = list(feature_pairs)
        if self.feature_pairs:
            s_out = [student.get_layer(s).output for s, _ in self.feature_pairs]
            t_out = [teacher.get_layer(t).output for _, t in self.feature_pairs]
            self._student_features = tf.keras.Model(student.inputs, [student.output] + s_out)
            self._teacher_features = tf.keras.Model(teacher.inputs, [teacher.output] + t_out)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    @staticmethod
    def _attention(a):
        att = tf.reduce_mean(tf.square(tf.cast(a, tf.float32)), axis=-1)
        att = tf.reshape(att, [tf.shape(att)[0], -1])
        return tf.math.l2_normalize(att, axis=-1)

    def _forward(self, x, training):
        if self.feature_pairs:
            s = self._student_features(x, training=training)
            t = self._teacher_features(x, training=False)
            feature_loss = tf.add_n(
                [tf.reduce_mean(tf.reduce_sum(tf.square(self._attention(a) - self._attention(b)), -1))
                 for a, b in zip(s[1:], t[1:])]
            )
            return s[0], t[0], self.feature_weight * feature_loss
        return self.student(x, training=training), self.teacher(x, training=False), 0.0

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            s, t, extra = self._forward(x, True)
            loss = distillation_loss(y, s, t, alpha=self.alpha, temperature=self.temperature) + extra
            loss += tf.add_n(self.student.losses) if self.student.losses else 0.0
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._update_metrics(loss, y, s)

    def test_step(self, data):
        x, y = data[0], data[1]
        s = self.student(x, training=False)
        loss = tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True)
        )
        return self._update_metrics(loss, y, s)


def soft_target_loss(labels, student_logits, teacher_probs, *, alpha=0.5, temperature=1.0):
    """Per-image ``alpha * CE(label) + (1 - alpha) * T^2 * KL(teacher_T || softmax(s / T))``, batch mean.

    ``teacher_probs`` are probabilities (from teacher files, :mod:`glt_keras.training.teachers`);
    ``teacher_T`` is them sharpened or softened as ``softmax(log(p) / T)``. Images without a hard
    label carry ``-1`` and add only the teacher term.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    student_logits = tf.cast(student_logits, tf.float32)
    has_label = labels >= 0
    ce = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(labels, 0), student_logits, from_logits=True)
    ce = tf.where(has_label, ce, 0.0)
    t = float(temperature)
    log_p_teacher = tf.nn.log_softmax(tf.math.log(tf.maximum(tf.cast(teacher_probs, tf.float32), 1e-7)) / t)
    log_p_student = tf.nn.log_softmax(student_logits / t)
    kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return tf.reduce_mean(alpha * ce + (1.0 - alpha) * t * t * kl)


class TargetDistiller(_LossAndMetrics, tf.keras.Model):
    """Distillation from teacher probabilities that come with the data.

    Training batches are ``(images, (labels, teacher_probs))``, as
    :func:`glt_keras.training.teachers.with_teacher_targets` makes them (label ``-1``: the
    image has none); the loss is :func:`soft_target_loss`. The training ``accuracy`` is the
    student's agreement with the teachers' top class; evaluation batches are ``(images,
    labels)`` and score the student alone.

    Example:
        >>> distiller = TargetDistiller(student, alpha=0.2, temperature=1.0)
        >>> distiller.compile(optimizer="adam", metrics=["accuracy"])
        >>> distiller.fit(with_teacher_targets(dataset, ensemble), epochs=1)  # doctest: +SKIP
    """

    def __init__(self, student, *, alpha=0.5, temperature=1.0):
        super().__init__(name="target_distiller")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.student = student
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def train_step(self, data):
        x, (y, teacher_probs) = data
        with tf.GradientTape() as tape:
            s = self.student(x, training=True)
            loss = soft_target_loss(y, s, teacher_probs, alpha=self.alpha, temperature=self.temperature)
            loss += tf.add_n(self.student.losses) if self.student.losses else 0.0
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._update_metrics(loss, tf.argmax(teacher_probs, axis=-1), s)

    def test_step(self, data):
        x, y = data[0], data[1]
        s = self.student(x, training=False)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True))
        return self._update_metrics(loss, y, s)
