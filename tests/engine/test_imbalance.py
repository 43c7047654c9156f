"""Class imbalance: weighted loss, balanced sampler, macro metrics."""

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.data.datasets import imbalance_ratio
from paddle_tl.data.loaders import BalancedBatchSampler, make_loader
from paddle_tl.engine.losses import CrossEntropy, class_weights
from paddle_tl.metrics import classification_metrics
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def loss_cfg(mode):
    return load_config(None, [f"Loss.class_weights={mode}"]).Loss


def test_class_weights_by_mode():
    assert class_weights(loss_cfg("auto"), [100, 40], 2) is None  # 2.5x: below the threshold
    assert class_weights(loss_cfg("auto"), [100, 20], 2) == pytest.approx([0.6, 3.0])  # N / (K * n_c)
    assert class_weights(loss_cfg("balanced"), [10, 10], 3) == pytest.approx([1.0, 1.0, 1.0])
    assert class_weights(loss_cfg("none"), [100, 1], 2) is None
    assert imbalance_ratio([100, 0, 20]) == 5.0


def test_class_weights_are_off_by_default_and_weighted_runs_choose_on_balanced_accuracy():
    """Issue 22: `auto` weights cost top-1 silently (0.815 -> 0.754 on a
    7.1x-imbalanced product set); off by default, as PaddleClas, timm and
    fastai; where on, epochs are chosen on validation balanced accuracy."""
    from paddle_tl.engine.callbacks import choosing_key
    from paddle_tl.engine.losses import selection_metric
    assert load_config(None, []).Loss.class_weights == "none"
    assert class_weights(load_config(None, []).Loss, [100, 10], 2) is None
    assert selection_metric(None) == "top1" and selection_metric([0.6, 3.0]) == "balanced_accuracy"
    row = {"val_top1": 0.9, "val_balanced_accuracy": 0.6, "val_loss": 0.3, "eval_top1": 0.8}
    assert choosing_key(row) == choosing_key(row, "top1") == "val_top1"
    assert choosing_key(row, "balanced_accuracy") == "val_balanced_accuracy"
    assert choosing_key({"eval_top1": 0.8}, "balanced_accuracy") == "eval_top1"  # no validation split


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
    labels = [0] * 90 + [1] * 10
    sampler = BalancedBatchSampler(labels, batch_size=8)
    sampler.set_epoch(42)
    batches = list(sampler)
    drawn = np.array(labels)[np.concatenate(batches)]
    assert len(drawn) == 100 and 35 <= (drawn == 1).sum() <= 65
    assert len(batches) == len(sampler) == 13 and len(batches[-1]) == 4
    assert list(sampler) == batches  # the same epoch draws the same
    sampler.set_epoch(43)
    assert list(sampler) != batches


def test_balanced_sampler_shards_for_data_parallel(monkeypatch):
    """Two simulated processes: equally long shards that never share a draw,
    each balanced, and together, batch by batch, exactly what one process
    draws with twice the batch size."""
    labels = np.array([0] * 90 + [1] * 11)  # 101: the shards need one more draw to be equally long
    one = BalancedBatchSampler(labels, batch_size=8)
    ranks = [BalancedBatchSampler(labels, batch_size=4, num_replicas=2, rank=rank) for rank in (0, 1)]
    for sampler in (one, *ranks):
        sampler.set_epoch(7)
    shards = [list(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 13
    assert sum(map(len, shards[0])) == sum(map(len, shards[1])) == 51
    for shard in shards:
        assert 15 <= (labels[np.concatenate(shard)] == 1).sum() <= 36  # about half of 51, not a tenth
    # Interleaved, the shards are one process's sequence (disjoint positions,
    # nothing left out), plus one extra draw to even them up.
    interleaved = [index for batch_0, batch_1 in zip(*shards) for pair in zip(batch_0, batch_1) for index in pair]
    sequence = [index for batch in one for index in batch]
    assert len(sequence) == 101 and interleaved[:101] == sequence and len(interleaved) == 102
    one_batches = list(one)
    for batch, batch_0, batch_1 in zip(one_batches[:-1], *shards):  # the last holds the extra draw
        assert sorted(batch) == sorted(batch_0 + batch_1)

    # make_loader builds this process's shard under paddle.distributed.launch
    monkeypatch.setattr(paddle.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(paddle.distributed, "get_rank", lambda: 1)
    loader = make_loader(list(range(101)), 4, shuffle=True, num_workers=0, balanced_labels=labels, distributed=True)
    assert (loader.batch_sampler.num_replicas, loader.batch_sampler.rank) == (2, 1)


def test_macro_metrics_see_what_top1_hides():
    labels = np.array([0] * 9 + [1])
    logits = np.zeros((10, 2))
    logits[:, 0] = 1.0  # always the majority class
    metrics = classification_metrics(logits, labels, ["many", "few"])
    assert metrics["top1"] == 0.9
    assert metrics["balanced_accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 * 0.9 * 1.0 / 1.9 + 0.0) / 2)
