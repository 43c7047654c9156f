"""Transforms that move boxes (paddle_tl/tasks/detection/transforms.py): the
boxes land on the moved pixels, and the inverse of the evaluation resize
maps back to the original pixels."""

import random

import numpy as np
import pytest
from PIL import Image

from paddle_tl.tasks.detection.transforms import (EvalTransform, TrainTransform, hflip, resize, resized_size,
                                                  to_original)
from synthetic_detection import make_images


def white_box_image(size, box):
    """Black image with the pixels of the continuous box `box` white."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return Image.fromarray(pixels)


def bright_box(image, level=128):
    """The continuous box of the pixels brighter than `level`."""
    bright = np.asarray(image.convert("L")) > level
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def target_of(boxes, **extra):
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": np.arange(len(boxes), dtype=np.int64), **extra}


def test_hflip_moves_boxes_onto_the_mirrored_pixels():
    box = [10, 5, 30, 25]
    image, target = hflip(white_box_image((100, 40), box), target_of([box]))
    np.testing.assert_array_equal(target["boxes"], [[70, 5, 90, 25]])
    assert bright_box(image) == [70, 5, 90, 25]
    again = hflip(image, target)[1]
    np.testing.assert_array_equal(again["boxes"], [box])
    assert target["labels"].tolist() == [0]  # per-object entries stay


def test_hflip_and_resize_keep_an_image_without_objects_empty():
    image = Image.new("RGB", (60, 30))
    for moved in (hflip(image, target_of([]))[1], resize(image, target_of([]), 15)[1]):
        assert moved["boxes"].shape == (0, 4)


@pytest.mark.parametrize("size, short, max_size, expected", [
    ((200, 100), 50, 1000, (100, 50)),
    ((100, 200), 50, 1000, (50, 100)),
    ((400, 100), 100, 200, (200, 50)),  # the longer side capped: 400 -> 200, not 400
    ((333, 97), 50, None, (172, 50)),  # 333 x 50 / 97 = 171.6
])
def test_resized_size(size, short, max_size, expected):
    assert resized_size(*size, short, max_size) == expected


def test_resize_moves_boxes_onto_the_resized_pixels():
    box = [40, 20, 120, 60]
    image, target = resize(white_box_image((200, 100), box), target_of([box]), 50)
    assert image.size == (100, 50)
    np.testing.assert_array_equal(target["boxes"], [[20, 10, 60, 30]])
    assert bright_box(image) == [20, 10, 60, 30]  # halving lands on whole pixels here
    assert target["original_size"] == (200, 100) and target["scale"] == (0.5, 0.5)


@pytest.mark.parametrize("short, max_size", [(50, None), (800, 1333), (97, 200), (33, 60)])
def test_the_inverse_maps_back_to_the_original_pixels(short, max_size):
    boxes = [[0, 0, 333, 97], [12.5, 3.25, 100, 96], [200, 40, 201, 41]]
    image, target = resize(Image.new("RGB", (333, 97)), target_of(boxes), short, max_size)
    assert image.size == resized_size(333, 97, short, max_size)
    # x and y scale by the exact ratio of the rounded sizes, so the whole image stays the whole image
    np.testing.assert_allclose(target["boxes"][0], [0, 0, *image.size], rtol=1e-6)
    np.testing.assert_allclose(to_original(target["boxes"], target), boxes, atol=1e-4)


def test_to_original_clips_to_the_original_image():
    _, target = resize(Image.new("RGB", (200, 100)), target_of([]), 50)
    np.testing.assert_allclose(to_original([[-4, 10, 120, 30]], target), [[0, 20, 200, 60]])


def test_masks_move_with_the_boxes():
    image = make_images(1, seed=5, size=(96, 72))[0]
    target = target_of(image["boxes"], masks=image["masks"])
    flipped_image, flipped = hflip(image["image"], target)
    resized_image, resized = resize(flipped_image, flipped, 36)
    assert resized["masks"].shape == (len(image["boxes"]), 36, 48)
    assert set(np.unique(resized["masks"])) <= {0, 1}  # still binary
    for mask, box in zip(resized["masks"], resized["boxes"]):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # nearest-neighbour resampling is exact to a pixel
        np.testing.assert_allclose([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], box, atol=1.0)


def test_train_transform_jitters_scale_and_flips_under_the_seed():
    transform = TrainTransform(short_sides=(20, 30, 40), max_size=100, flip_prob=0.5)
    box = [10, 5, 30, 25]
    image = white_box_image((100, 40), box)
    random.seed(0)
    seen = set()
    for _ in range(30):
        moved_image, moved = transform(image, target_of([box]))
        short = min(moved_image.size)
        scale = short / 40
        flipped = moved["boxes"][0][0] > 50 * scale
        seen.add((short, bool(flipped)))
        assert short in (20, 30, 40) and max(moved_image.size) <= 100
        expected = [70, 5, 90, 25] if flipped else box
        np.testing.assert_allclose(moved["boxes"][0], np.array(expected) * scale, atol=1e-4)
        np.testing.assert_allclose(to_original(moved["boxes"], moved), [expected], atol=1e-4)
    assert len(seen) == 6  # every size, flipped and not
    random.seed(0)
    first = [transform(image, target_of([box]))[1]["boxes"].tolist() for _ in range(5)]
    random.seed(0)
    assert first == [transform(image, target_of([box]))[1]["boxes"].tolist() for _ in range(5)]


def test_eval_transform_then_inverse():
    box = [[40, 20, 120, 60]]
    image, target = EvalTransform(800, 1333)(white_box_image((200, 100), box[0]), target_of(box))
    assert image.size == (1333, 666)  # 1600 x 800 would exceed the cap: 200 x 6.665
    np.testing.assert_allclose(to_original(target["boxes"], target), box, atol=1e-4)
