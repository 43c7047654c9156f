"""Mixup and CutMix: training batches whose images, and labels, mix two
images each.

mixup (Zhang et al., ICLR 2018) blends two whole images; CutMix (Yun et
al., ICCV 2019) pastes a random box of one into the other. A batch is mixed
with itself in a shuffled order, with one weight per batch drawn from
Beta(a, a); the mix's label is both labels, weighted by how much of each
image it holds. The mixing happens in the loader's collate, so it draws
from python's `random` as augmentation does (seeded by the trainer, per
worker by paddle's DataLoader), and the labels travel to MixedLoss as rows
(label a, label b, weight of a). Evaluation batches keep plain labels.
"""

import math
import random

import numpy as np

from paddle_tl.runtime import import_paddle

paddle = import_paddle()

# The label of a mixed batch: [label a, label b, weight of a] per image.
MIXED_LABEL_SPEC = paddle.static.InputSpec([None, 3], "float32", "mixed_label")


def mixing_collate(mixup, cutmix):
    """A collate_fn for (image, label) samples that mixes every batch: with
    both alphas set, CutMix or mixup with even odds per batch."""
    def collate(samples):
        images = np.stack([image for image, _ in samples]).astype("float32")
        labels = np.array([int(np.asarray(label).reshape(-1)[0]) for _, label in samples], dtype="float32")
        order = list(range(len(samples)))
        random.shuffle(order)
        use_cutmix = cutmix > 0 and (mixup <= 0 or random.random() < 0.5)
        weight = random.betavariate(*(2 * [cutmix if use_cutmix else mixup]))
        if use_cutmix:
            images, weight = _paste_box(images, images[order], weight)
        else:
            images = weight * images + (1 - weight) * images[order]
        mixed = np.stack([labels, labels[order], np.full(len(labels), weight, dtype="float32")], axis=1)
        return images.astype("float32"), mixed.astype("float32")

    return collate


def _paste_box(images, others, weight):
    """CutMix: a box of area (1 - weight) of the image, centred at a random
    point and clipped to the image, taken from `others`; returns the images
    and the share of each image left unpasted (the weight of its label)."""
    height, width = images.shape[2:]
    side = math.sqrt(1 - weight)
    box_h, box_w = round(height * side), round(width * side)
    cy, cx = random.randrange(height), random.randrange(width)
    top, bottom = max(0, cy - box_h // 2), min(height, cy + box_h - box_h // 2)
    left, right = max(0, cx - box_w // 2), min(width, cx + box_w - box_w // 2)
    mixed = images.copy()
    mixed[:, :, top:bottom, left:right] = others[:, :, top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)


class MixedLoss(paddle.nn.Layer):
    """weight * loss(label a) + (1 - weight) * loss(label b) on a mixed
    batch; the plain loss on a batch of plain labels (evaluation)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, logits, label):
        if label.shape[-1] == 1:
            return self.loss(logits, label)
        first, second = (label[:, i].astype("int64") for i in (0, 1))
        weight = label[:, 2].mean()
        return weight * self.loss(logits, first) + (1 - weight) * self.loss(logits, second)


class MixedAccuracy(paddle.metric.Accuracy):
    """Training accuracy of a mixed batch against the label of the larger
    part of each image (or the plain label, in evaluation)."""

    def compute(self, pred, label):
        if label.shape[-1] != 1:
            weight = label[:, 2:3]
            label = paddle.where(weight >= 0.5, label[:, 0:1], label[:, 1:2]).astype("int64")
        return super().compute(pred, label)
