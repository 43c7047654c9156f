"""Transforms that move boxes with the image: horizontal flip and scale
jitter for training, the evaluation resize, and the inverse that maps
predictions on the resized image back to the original image's pixels.

Each transform takes and returns (PIL image, target dict). The target's
"boxes" (float32 [N, 4], x1, y1, x2, y2, continuous pixels: boxes.py) move
with the image, and so do "masks" (uint8 [N, H, W]) where present; the other
entries (labels, difficult, iscrowd) are per object and stay. The resize
records in the target what the inverse needs: "original_size" (width,
height) and "scale" (x, y), both as the first resize found them.

Randomness comes from Python's `random` module, as classification's
transforms (paddle_tl/data/transforms.py): the trainer seeds it, and
paddle's DataLoader re-seeds it in each worker.
"""

import random

import numpy as np
from PIL import Image

# torchvision's and Detectron2's Faster R-CNN input size: shorter side 800,
# longer side at most 1333.
EVAL_SHORT_SIDE = 800
MAX_SIZE = 1333


def resized_size(width, height, short_side, max_size):
    """(width, height) with the shorter side `short_side`, scaled down
    further where the longer side would exceed `max_size` (the aspect ratio
    kept, rounded to whole pixels)."""
    scale = short_side / min(width, height)
    if max_size is not None and max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image, target, short_side, max_size=MAX_SIZE):
    """The image resized (resized_size) and its boxes scaled with it, per
    axis by the exact ratio of the new to the old size (rounding makes the
    x and y ratios differ slightly)."""
    width, height = image.size
    new_width, new_height = resized_size(width, height, short_side, max_size)
    target = dict(target)
    scale_x, scale_y = new_width / width, new_height / height
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
        target["boxes"] = (np.asarray(target["boxes"], dtype=np.float64) * [scale_x, scale_y, scale_x, scale_y]
                           ).astype(np.float32)
        if "masks" in target:
            target["masks"] = _resize_masks(target["masks"], new_width, new_height)
    # Recorded once: a second resize (there is none in these pipelines) would otherwise lose the original size.
    if "original_size" not in target:
        target["original_size"] = (width, height)
        target["scale"] = (scale_x, scale_y)
    return image, target


def _resize_masks(masks, width, height):
    masks = np.asarray(masks)
    # Nearest neighbour keeps a mask binary.
    return np.stack([np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST)) for m in masks]) \
        if len(masks) else np.zeros((0, height, width), dtype=masks.dtype)


def hflip(image, target):
    """Mirror left-right: x1, x2 become width - x2, width - x1."""
    width = image.size[0]
    target = dict(target)
    boxes = np.asarray(target["boxes"], dtype=np.float32)
    target["boxes"] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1) \
        if len(boxes) else boxes.reshape(0, 4)
    if "masks" in target:
        target["masks"] = np.ascontiguousarray(np.asarray(target["masks"])[:, :, ::-1])
    return image.transpose(Image.FLIP_LEFT_RIGHT), target


def to_original(boxes, target):
    """Boxes predicted on the resized image, in the original image's pixels
    (the inverse of `resize`, from what it recorded in `target`), clipped
    to that image."""
    scale_x, scale_y = target["scale"]
    width, height = target["original_size"]
    boxes = np.asarray(boxes, dtype=np.float64) / [scale_x, scale_y, scale_x, scale_y]
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


class TrainTransform:
    """Scale jitter (the shorter side a random choice of `short_sides`, the
    longer at most `max_size`), then a horizontal flip with probability
    `flip_prob`."""

    def __init__(self, short_sides=(640, 672, 704, 736, 768, 800), max_size=MAX_SIZE, flip_prob=0.5):
        if not short_sides or min(short_sides) < 1:
            raise ValueError(f"short_sides must be positive sizes, got {short_sides}")
        self.short_sides = tuple(short_sides)
        self.max_size = max_size
        self.flip_prob = flip_prob

    def __call__(self, image, target):
        image, target = resize(image, target, random.choice(self.short_sides), self.max_size)
        if random.random() < self.flip_prob:
            image, target = hflip(image, target)
        return image, target


class EvalTransform:
    """The fixed resize of evaluation and inference; `to_original` maps its
    predictions back."""

    def __init__(self, short_side=EVAL_SHORT_SIDE, max_size=MAX_SIZE):
        self.short_side = short_side
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, self.short_side, self.max_size)
