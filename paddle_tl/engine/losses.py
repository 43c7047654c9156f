"""The Loss section: cross-entropy with optional label smoothing and class
weights. Paddle's own `CrossEntropyLoss(label_smoothing=...)` has no kernel
for integer class labels on CPU, so the loss is written out here, once."""

import numpy as np

from paddle_tl.data.datasets import IMBALANCE_RATIO, imbalance_ratio
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
F = paddle.nn.functional


class CrossEntropy(paddle.nn.Layer):
    """Per sample (1 - eps) * NLL of the true class + eps * mean NLL over all
    classes; with class weights, each sample counts by its class's weight and
    the mean is taken over those weights (paddle's convention for weighted
    cross-entropy)."""

    def __init__(self, smoothing=0.0, class_weights=None):
        super().__init__()
        self.smoothing = smoothing
        self.class_weights = None if class_weights is None else paddle.to_tensor(
            np.asarray(class_weights, dtype="float32"))

    def forward(self, logits, label):
        label = label.reshape([-1])
        log_probs = F.log_softmax(logits, axis=-1)
        per_sample = -paddle.take_along_axis(log_probs, label.unsqueeze(-1), axis=-1).squeeze(-1)
        if self.smoothing:
            per_sample = (1 - self.smoothing) * per_sample - self.smoothing * log_probs.mean(axis=-1)
        if self.class_weights is None:
            return per_sample.mean()
        weights = paddle.gather(self.class_weights, label)
        return (weights * per_sample).sum() / weights.sum()


def class_weights(loss_cfg, class_counts, num_classes):
    """Inverse-frequency weights N / (K * n_c), or None. `auto` weights only
    data whose largest class exceeds IMBALANCE_RATIO times the smallest."""
    if loss_cfg.class_weights == "none" or not class_counts:
        return None
    if loss_cfg.class_weights == "auto" and imbalance_ratio(class_counts) <= IMBALANCE_RATIO:
        return None
    total, present = sum(class_counts), sum(1 for c in class_counts if c)
    weights = [total / (present * c) if c else 0.0 for c in class_counts]
    return weights + [1.0] * (num_classes - len(weights))  # outputs beyond the data's classes


def selection_metric(weights):
    """What chooses the best epoch and `auto`'s candidates: balanced accuracy
    where the loss is class-weighted (the run asked for every class to count
    alike, which top-1 does not measure), else top-1."""
    return "top1" if weights is None else "balanced_accuracy"


def build_loss(loss_cfg, weights=None):
    return CrossEntropy(loss_cfg.label_smoothing, weights)
