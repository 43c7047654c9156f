"""Class imbalance: weighted loss, balanced sampler, macro metrics."""

import numpy as np
import pytest

from paddle_tl.backend import import_paddle
from paddle_tl.config import load_config
from paddle_tl.data import balanced_sampler, imbalance_ratio
from paddle_tl.losses import CrossEntropy, class_weights
from paddle_tl.metrics import classification_metrics

paddle = import_paddle()


def loss_cfg(mode):
    return load_config(None, [f"Loss.class_weights={mode}"]).Loss


def test_class_weights_by_mode():
    assert class_weights(loss_cfg("auto"), [100, 40], 2) is None  # 2.5x: below the threshold
    assert class_weights(loss_cfg("auto"), [100, 20], 2) == pytest.approx([0.6, 3.0])  # N / (K * n_c)
    assert class_weights(loss_cfg("balanced"), [10, 10], 3) == pytest.approx([1.0, 1.0, 1.0])
    assert class_weights(loss_cfg("none"), [100, 1], 2) is None
    assert imbalance_ratio([100, 0, 20]) == 5.0


def test_weighted_loss_matches_paddles_weighted_cross_entropy():
    rng = np.random.RandomState(0)
    logits = paddle.to_tensor(rng.randn(6, 3).astype("float32"))
    labels = paddle.to_tensor(np.array([[0], [1], [2], [2], [1], [0]], dtype="int64"))
    weights = [0.5, 2.0, 1.5]
    ours = float(CrossEntropy(0.0, weights)(logits, labels))
    theirs = float(paddle.nn.CrossEntropyLoss(weight=paddle.to_tensor(weights))(logits, labels))
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert float(CrossEntropy()(logits, labels)) == pytest.approx(float(paddle.nn.CrossEntropyLoss()(logits, labels)),
                                                                  rel=1e-6)


def test_balanced_sampler_draws_classes_equally():
    np.random.seed(0)
    labels = [0] * 90 + [1] * 10
    drawn = np.array(labels)[list(iter(balanced_sampler(labels)))]
    assert len(drawn) == 100 and 35 <= (drawn == 1).sum() <= 65


def test_macro_metrics_see_what_top1_hides():
    labels = np.array([0] * 9 + [1])
    logits = np.zeros((10, 2))
    logits[:, 0] = 1.0  # always the majority class
    metrics = classification_metrics(logits, labels, ["many", "few"])
    assert metrics["top1"] == 0.9
    assert metrics["balanced_accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 * 0.9 * 1.0 / 1.9 + 0.0) / 2)
