"""Mixup and CutMix (paddle_tl/data/mixing.py): what a mixed batch holds,
the loss and accuracy on it, and TrivialAugment (data/transforms.py)."""

import random

import numpy as np
import pytest
from PIL import Image

from paddle_tl.config import load_config
from paddle_tl.data.mixing import MixedAccuracy, MixedLoss, mixing_collate
from paddle_tl.data.transforms import _TRIVIAL, Preprocess, augmentation_off, train_transform, trivial_augment
from paddle_tl.engine.losses import CrossEntropy
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def _samples(n=4, size=8):
    """Image i is the constant i + 1, label i % 2."""
    return [(np.full((3, size, size), i + 1.0, dtype="float32"), np.array([i % 2], dtype="int64")) for i in range(n)]


def test_mixup_blends_every_image_with_another_and_labels_the_blend():
    random.seed(3)
    images, labels = mixing_collate(mixup=0.4, cutmix=0.0)(_samples())
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4, 3) and labels.dtype == np.float32
    weight = labels[0, 2]
    assert 0 < weight < 1 and np.all(labels[:, 2] == weight)
    np.testing.assert_array_equal(labels[:, 0], [0, 1, 0, 1])  # each image's own label first
    partner = [int(round((image[0, 0, 0] - weight * (i + 1)) / (1 - weight))) - 1 for i, image in enumerate(images)]
    assert sorted(partner) == [0, 1, 2, 3]  # a shuffled order of the same batch
    np.testing.assert_array_equal(labels[:, 1], [p % 2 for p in partner])
    random.seed(3)
    again, _ = mixing_collate(mixup=0.4, cutmix=0.0)(_samples())
    np.testing.assert_array_equal(images, again)  # seeded: reproducible


def test_cutmix_pastes_a_box_whose_area_sets_the_weight():
    random.seed(0)
    for _ in range(20):
        images, labels = mixing_collate(mixup=0.0, cutmix=1.0)(_samples(size=16))
        for i, image in enumerate(images):
            own = np.mean(image[0] == i + 1)  # a pixel of its own image
            partner_is_self = labels[i, 0] == labels[i, 1] and np.all(image == i + 1)
            assert partner_is_self or own == pytest.approx(labels[i, 2])


def test_mixed_loss_weighs_both_labels_and_plain_labels_pass_through():
    logits = paddle.to_tensor(np.array([[2.0, 0.0], [0.0, 1.0]], dtype="float32"))
    base = CrossEntropy()
    mixed = paddle.to_tensor(np.array([[0, 1, 0.7], [1, 1, 0.7]], dtype="float32"))
    a, b = (paddle.to_tensor(np.array(v, dtype="int64")) for v in ([0, 1], [1, 1]))
    expected = 0.7 * float(base(logits, a)) + 0.3 * float(base(logits, b))
    assert float(MixedLoss(base)(logits, mixed)) == pytest.approx(expected, rel=1e-6)
    plain = paddle.to_tensor(np.array([[0], [1]], dtype="int64"))
    assert float(MixedLoss(base)(logits, plain)) == pytest.approx(float(base(logits, plain)), rel=1e-6)


def test_mixed_accuracy_counts_the_larger_part_of_each_image():
    metric = MixedAccuracy()
    logits = paddle.to_tensor(np.array([[2.0, 0.0], [0.0, 1.0]], dtype="float32"))
    mixed = paddle.to_tensor(np.array([[0, 1, 0.7], [0, 1, 0.3]], dtype="float32"))  # larger parts: 0, then 1
    metric.update(metric.compute(logits, mixed))
    assert metric.accumulate() == 1.0


def test_trivial_augment_keeps_size_and_mode_for_every_operation_and_is_seeded():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 24, 3)).astype(np.uint8))
    seen = set()
    random.seed(1)
    for _ in range(300):
        state = random.getstate()
        name = random.choice(_TRIVIAL)[0]
        random.setstate(state)
        out = trivial_augment(image)
        seen.add(name)
        assert out.size == image.size and out.mode == "RGB"
    assert seen == {name for name, _, _ in _TRIVIAL}
    random.seed(5)
    first = np.asarray(trivial_augment(image))
    random.seed(5)
    np.testing.assert_array_equal(first, np.asarray(trivial_augment(image)))


def test_trivial_policy_is_augmentation():
    augment = load_config(None, ["DataLoader.Train.augment.crop_scale=[1.0, 1.0]", "DataLoader.Train.augment.hflip=false",
                                 "DataLoader.Train.augment.policy=trivial"]).DataLoader.Train.augment
    assert not augmentation_off(augment)
    transform = train_transform(Preprocess(16, 18, (0.5,) * 3, (0.25,) * 3), augment)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 24, 3)).astype(np.uint8))
    random.seed(0)
    outputs = [transform(image) for _ in range(8)]
    assert outputs[0].shape == (3, 16, 16) and any(not np.array_equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.slow
def test_mixing_alphas_are_checked_and_mixing_trains_on_images(workspace, tmp_path):
    from paddle_tl.errors import ConfigError
    with pytest.raises(ConfigError, match=r"DataLoader.Train.augment.mixup: must be >= 0"):
        load_config(None, ["DataLoader.Train.augment.mixup=-1"])
    from paddle_tl.engine.train import train
    from tests.engine.test_train import make_cfg
    metrics = train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=linear_probe", "Global.epochs=1",
                             "DataLoader.Train.augment.mixup=0.4", "DataLoader.Train.augment.cutmix=1.0"))
    assert not metrics["strategy"]["cached_features"]  # mixing needs the images
    assert 0 <= metrics["history"][0]["eval_top1"] <= 1 and np.isfinite(metrics["history"][0]["train_loss"])
