"""GuardedModel against the paddle it is built on: the private attributes of
paddle.Model it reads (a Paddle upgrade that moves one fails here, naming
it), the one module allowed to read them, the fused finiteness check, and
which running statistics a step copies."""

import re
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.engine import model as guarded
from paddle_tl.engine.model import GuardedModel
from paddle_tl.paddle_internals import PADDLE_MODEL_PRIVATES
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
PACKAGE = Path(__file__).resolve().parents[2] / "paddle_tl"


def tiny_model(network=None, amp=None):
    network = network or paddle.nn.Linear(4, 3)
    model = GuardedModel(network, inputs=[paddle.static.InputSpec([None, 4], "float32", "x")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    optimizer = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=network.parameters())
    model.prepare(optimizer, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(), amp_configs=amp)
    return model, optimizer


def _batch():
    return [np.ones((2, 4), "float32")], [np.zeros((2, 1), "int64")]


def test_the_private_attributes_of_paddle_model_guarded_model_reads_are_there():
    """engine/model.py reads `_optimizer`, `_metrics` and (under AMP)
    `_scaler` from hapi; if an upgrade renames or retypes one, this says which."""
    model, optimizer = tiny_model()
    expected = {"_optimizer": (paddle.optimizer.Optimizer, optimizer),
                "_metrics": (list, None)}
    assert set(PADDLE_MODEL_PRIVATES) == {*expected, "_scaler"}, "update this test with PADDLE_MODEL_PRIVATES"
    for name, (kind, value) in expected.items():
        assert hasattr(model, name), f"paddle.Model no longer sets {name} ({PADDLE_MODEL_PRIVATES[name]})"
        assert isinstance(getattr(model, name), kind), \
            f"paddle.Model.{name} is a {type(getattr(model, name)).__name__}, not {PADDLE_MODEL_PRIVATES[name]}"
        assert value is None or getattr(model, name) is value, f"paddle.Model.{name} is not what prepare was given"
    assert all(isinstance(metric, paddle.metric.Metric) for metric in model._metrics), \
        "paddle.Model._metrics no longer holds the metrics given to prepare"
    assert model._amp_scaler() is None and model.loss_scale() is None  # AMP off

    # Under AMP hapi sets `_scaler` at prepare (None) and makes a GradScaler at
    # the first training step (disabled on a CPU, but made all the same).
    model, _ = tiny_model(amp="O1")
    assert hasattr(model, "_scaler"), "paddle.Model.prepare under AMP no longer sets _scaler"
    model.train_batch(*_batch())
    assert isinstance(model._scaler, paddle.amp.GradScaler), \
        f"paddle.Model._scaler is a {type(model._scaler).__name__} after a step, not a paddle.amp.GradScaler"
    assert hasattr(model._scaler, "_scale"), "paddle.amp.GradScaler no longer keeps its scale in _scale"
    assert model.loss_scale() is None  # disabled on a CPU


def test_the_public_methods_answer_from_the_prepared_model():
    model, optimizer = tiny_model()
    assert model.optimizer() is optimizer
    assert model.learning_rate() == pytest.approx(0.1)
    assert [type(m) for m in model.metrics()] == [paddle.metric.Accuracy]


def test_only_engine_model_reads_paddle_models_private_attributes():
    pattern = re.compile(r"\.(" + "|".join(PADDLE_MODEL_PRIVATES) + r"|_amp_scaler|_adapter)\b")
    readers = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
               for path in sorted(PACKAGE.rglob("*.py")) if path != Path(guarded.__file__).resolve()
               for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not readers, "paddle.Model's private attributes are read outside engine/model.py:\n" + "\n".join(readers)


def test_one_fused_check_finds_a_nan_or_inf_in_any_gradient_and_leaves_finite_ones_alone(monkeypatch):
    paddle.seed(0)
    network = paddle.nn.Sequential(*[paddle.nn.Linear(4, 4) for _ in range(5)])
    model, _ = tiny_model(network)
    network(paddle.rand([2, 4])).sum().backward()
    grads = [p.grad for p in network.parameters()]
    before = [g.numpy().copy() for g in grads]

    def no_per_tensor_checks(*args, **kwargs):
        raise AssertionError("a per-tensor finiteness check")

    monkeypatch.setattr(paddle, "isfinite", no_per_tensor_checks)
    assert model._gradients_finite()
    assert all(np.array_equal(b, g.numpy()) for b, g in zip(before, grads))  # x * 1, bit for bit
    for index, bad in ((3, np.nan), (len(grads) - 1, np.inf), (0, -np.inf)):
        poisoned = before[index].copy()
        poisoned.flat[-1] = bad
        grads[index].set_value(poisoned)
        assert not model._gradients_finite(), (index, bad)
        for g, b in zip(grads, before):
            g.set_value(b)
    network.clear_gradients(set_to_zero=False)
    assert model._gradients_finite()  # no gradients at all: nothing to check


def test_frozen_batch_norm_statistics_are_not_copied_and_a_nan_batch_moves_no_statistic():
    """A frozen BatchNorm (`_use_global_stats` True) normalises with its stored
    statistics in train mode and never writes them, so the step copies only
    the statistics of the BatchNorm that learns; a NaN batch leaves both as
    they were, bit for bit."""
    paddle.seed(0)
    network = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Conv2D(4, 4, 3),
                                   paddle.nn.BatchNorm2D(4), paddle.nn.Flatten(), paddle.nn.Linear(4 * 4 * 4, 3))
    frozen, learning = network[1], network[3]
    frozen._use_global_stats = True
    rng = np.random.RandomState(0)
    for layer in (frozen, learning):
        layer._mean.set_value(rng.uniform(-0.2, 0.2, [4]).astype("float32"))
        layer._variance.set_value(rng.uniform(0.5, 1.5, [4]).astype("float32"))
    model = GuardedModel(network, inputs=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(paddle.optimizer.Momentum(0.1, parameters=network.parameters()), paddle.nn.CrossEntropyLoss(),
                  paddle.metric.Accuracy())
    moved = {id(t) for t in model._moved_by_forward()}
    assert moved == {id(learning._mean), id(learning._variance)}

    def statistics():
        return [t.numpy().copy() for layer in (frozen, learning) for t in (layer._mean, layer._variance)]

    images, labels = rng.rand(4, 3, 8, 8).astype("float32"), np.array([[0], [1], [2], [0]], dtype="int64")
    before = statistics()
    images[0, :, 0, 0] = np.nan
    model.train_batch([images], [labels])
    assert model.skipped_update == "training loss became nan"
    assert all(np.array_equal(a, b) for a, b in zip(before, statistics()))
    model.train_batch([np.nan_to_num(images)], [labels])
    assert model.skipped_update is None
    after = statistics()
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])  # frozen
    assert not np.array_equal(before[2], after[2])  # learning

    frozen._use_global_stats = None  # unfrozen (gradual unfreezing): copied from the next step on
    assert {id(t) for t in model._moved_by_forward()} == moved | {id(frozen._mean), id(frozen._variance)}
