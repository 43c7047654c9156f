"""Test-time augmentation's arithmetic (tta.py): the views, and logits whose
softmax over the temperature is the mean of the views' calibrated
probabilities."""

import numpy as np
import pytest

from paddle_tl.calibration import softmax
from paddle_tl.data.transforms import Preprocess
from paddle_tl.tta import tta_input, views, with_tta


def _linear_model(weights):
    """A 'network' whose logits depend on where in the image the values lie."""
    return lambda batch: batch.reshape(len(batch), -1) @ weights


def test_flip_views_are_the_batch_and_its_horizontal_mirror():
    batch = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    plain, mirrored = views(batch, "flip", 4)
    np.testing.assert_array_equal(plain, batch)
    np.testing.assert_array_equal(mirrored[..., 0], batch[..., 3])
    np.testing.assert_array_equal(mirrored[:, :, 1], batch[:, :, 1, ::-1])  # rows stay, columns reverse
    assert mirrored.flags.c_contiguous  # what a static model's input needs


def test_flip_crops_are_the_center_and_corners_of_the_square_each_mirrored():
    square = np.arange(2 * 3 * 7 * 7, dtype=np.float32).reshape(2, 3, 7, 7)
    crops = views(square, "flip_crops", 4)
    assert len(crops) == 10 and all(crop.shape == (2, 3, 4, 4) for crop in crops)
    boxes = [(1, 1), (0, 0), (0, 3), (3, 0), (3, 3)]  # (top, left): the center ((7 - 4) // 2), then the corners
    for (top, left), plain, mirrored in zip(boxes, crops[::2], crops[1::2]):
        np.testing.assert_array_equal(plain, square[..., top:top + 4, left:left + 4])
        np.testing.assert_array_equal(mirrored, plain[..., ::-1])


def test_flip_crops_takes_the_resize_short_square():
    pre = Preprocess(224, 256, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert tta_input(pre, "flip_crops") == Preprocess(256, 256, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert tta_input(pre, "flip") is tta_input(pre, "none") is pre


def test_none_is_the_run_itself():
    run = _linear_model(np.ones((24, 3), np.float32))
    assert with_tta(run, "none", 2, 2.0) is run


def test_flip_averages_the_calibrated_probabilities():
    rng = np.random.RandomState(0)
    run = _linear_model(rng.standard_normal((3 * 2 * 4, 5)).astype(np.float32))
    batch = rng.standard_normal((6, 3, 2, 4)).astype(np.float32)
    for temperature in (1.0, 2.5):
        expected = (softmax(run(batch), temperature) + softmax(run(batch[..., ::-1]), temperature)) / 2
        logits = with_tta(run, "flip", 4, temperature)(batch)
        assert logits.dtype == np.float32 and logits.shape == (6, 5)
        np.testing.assert_allclose(softmax(logits, temperature), expected, atol=1e-6)
        assert not np.allclose(expected, softmax(run(batch), temperature), atol=1e-3)  # the mirror counted


def test_a_probability_that_underflows_keeps_a_finite_logit():
    logits = with_tta(lambda batch: np.array([[0.0, -2000.0]], np.float32), "flip", 2)(np.zeros((1, 3, 2, 2)))
    assert np.isfinite(logits).all() and logits[0, 0] > logits[0, 1]


def test_tta_on_the_training_loader_is_refused():
    from paddle_tl.config import load_config
    from paddle_tl.errors import ConfigError

    with pytest.raises(ConfigError, match="^DataLoader.Train.tta: test-time augmentation applies to evaluation"):
        load_config(None, ["DataLoader.Train.tta=flip"])
    with pytest.raises(ConfigError, match="DataLoader.Eval.tta: 'crops' is not one of none, flip, flip_crops"):
        load_config(None, ["DataLoader.Eval.tta=crops"])
