"""Learning-rate schedules (in optimizer steps, warm-up included) and the
label-smoothed loss."""

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine.losses import CrossEntropy
from paddle_tl.engine.optim import build_scheduler
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def lrs(steps_per_epoch, epochs, *overrides):
    schedule = build_scheduler(load_config(None, list(overrides)).Optimizer.lr, steps_per_epoch, epochs)
    values = []
    for _ in range(steps_per_epoch * epochs):
        values.append(schedule.last_lr)
        schedule.step()
    return values


def test_cosine_with_linear_warmup():
    values = lrs(2, 3, "Optimizer.lr.learning_rate=0.1", "Optimizer.lr.warmup_epochs=1")
    assert values[:2] == pytest.approx([0.0, 0.05])  # warm-up: 2 steps from 0 to 0.1
    assert values[2] == pytest.approx(0.1)
    assert values[2:] == sorted(values[2:], reverse=True) and values[-1] < 0.02


def test_step_decay_counts_epochs():
    values = lrs(3, 4, "Optimizer.lr.name=Step", "Optimizer.lr.learning_rate=1.0", "Optimizer.lr.step_epochs=2",
                 "Optimizer.lr.gamma=0.5")
    assert values == pytest.approx([1.0] * 6 + [0.5] * 6)


def test_constant():
    assert lrs(2, 2, "Optimizer.lr.name=Constant", "Optimizer.lr.learning_rate=0.3") == pytest.approx([0.3] * 4)


def test_label_smoothing_matches_its_formula():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype="float32")
    labels = np.array([[0], [2]], dtype="int64")
    loss = float(CrossEntropy(0.1)(paddle.to_tensor(logits), paddle.to_tensor(labels)))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = np.full((2, 3), 0.1 / 3)
    target[0, 0] += 0.9
    target[1, 2] += 0.9
    assert loss == pytest.approx(float(-(target * log_p).sum(axis=1).mean()), rel=1e-5)
