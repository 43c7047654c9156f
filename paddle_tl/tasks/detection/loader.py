"""Batches of a DetectionDataset for FasterRCNN, and predictions mapped back
to the original images' pixels for evaluate.py.

A batch is a list of images, not a stacked tensor: images of one batch
differ in size after the aspect-preserving resize, and FasterRCNN's
`batch_images` pads them (to a multiple of 32) itself. Each image is
normalised with its backbone's mean and std, read from the zoo's spec
through classification's Preprocess (paddle_tl/data/transforms.py), so
both tasks feed a backbone the statistics it was pretrained with.

Targets hold what FasterRCNN trains on: boxes (in the transformed image's
pixels) and labels, and for Mask R-CNN the objects' masks (masks.py).
COCO crowd regions are left out of them (they are ignored in training, as
Detectron2 does; evaluate.py ignores them in AP);
VOC difficult objects stay in (Detectron2 trains on them too; only AP
leaves them out).

Loading is in this process, one image after the other: enough for the
tests and the bench; worker processes belong with the training engine.
"""

import random
from dataclasses import dataclass

import numpy as np

from paddle_tl.data.transforms import Normalize, Preprocess
from paddle_tl.models.zoo import get_spec
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.masks import encode_rle, paste_masks
from paddle_tl.tasks.detection.transforms import to_original

paddle = import_paddle()


@dataclass
class Batch:
    images: list  # float32 [3, h, w] paddle tensors, normalised, each at its own size
    # per image {"boxes": float32 [N, 4] in the transformed image's pixels, "labels": int64 [N]}, and with
    # masks "masks": uint8 [N, h, w] in the transformed image's pixels
    targets: list
    # per image {"index": in the dataset, "original_size": (w, h), "scale": (x, y)}: enough for
    # transforms.to_original to map boxes predicted after an (unflipped) resize back to the original image
    records: list


def normalizer(arch):
    """uint8 RGB image -> float32 CHW normalised with `arch`'s mean and std."""
    return Normalize(Preprocess.from_spec(get_spec(arch)))


def batches(dataset, transform, batch_size, arch, shuffle=False, drop_last=False, masks=False):
    """Yield the Batches of `dataset` through `transform` (transforms.py:
    TrainTransform for training, EvalTransform for evaluation), normalised
    for `arch`. shuffle draws the order from Python's `random` (the trainer
    seeds it); otherwise the dataset's order. masks: targets get the
    objects' masks (the dataset must have been read with masks)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    normalize = normalizer(arch)
    order = random.sample(range(len(dataset)), len(dataset)) if shuffle else list(range(len(dataset)))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        images, targets, records = [], [], []
        for index in order[start:start + batch_size]:
            image, target = dataset.item(index, transform, masks=masks)
            images.append(paddle.to_tensor(normalize(image)))
            keep = ~np.asarray(target["iscrowd"], dtype=bool)
            targets.append({"boxes": np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)[keep],
                            "labels": np.asarray(target["labels"], dtype=np.int64)[keep]})
            if masks:
                targets[-1]["masks"] = np.asarray(target["masks"], dtype=np.uint8)[keep]
            # Without a resize in the transform the image keeps its size: scale 1.
            records.append({"index": index,
                            "original_size": tuple(target.get("original_size", dataset.samples[index].size)),
                            "scale": tuple(target.get("scale", (1.0, 1.0)))})
        yield Batch(images, targets, records)


def predict(model, dataset, transform, batch_size=1, arch=None):
    """The model's detections on every image of `dataset`, in the dataset's
    order, as evaluate.py takes them: {"boxes" float32 [M, 4] in the
    ORIGINAL image's pixels, "scores" float32 [M], "labels" int64 [M]},
    and from a Mask R-CNN "masks": M COCO RLE dicts, the mask
    probabilities pasted over the ORIGINAL boxes at the original size
    (threshold 0.5; pasted there rather than resized afterwards, so no
    second interpolation). `transform` must not flip (EvalTransform). arch
    defaults to the model's body's (FasterRCNN.body.arch). The model is put
    in eval mode and back."""
    arch = arch or model.body.arch
    was_training = model.training
    model.eval()
    predictions = []
    try:
        with paddle.no_grad():
            for batch in batches(dataset, transform, batch_size, arch):
                for found, record in zip(model(batch.images), batch.records):
                    found = {key: _numpy(value) for key, value in found.items()}
                    boxes = to_original(found["boxes"].reshape(-1, 4), record)
                    predictions.append({"boxes": boxes, "scores": found["scores"].astype(np.float32).reshape(-1),
                                        "labels": found["labels"].astype(np.int64).reshape(-1)})
                    if "mask_probs" in found:
                        width, height = record["original_size"]
                        predictions[-1]["masks"] = encode_rle(paste_masks(found["mask_probs"], boxes, height, width))
    finally:
        if was_training:
            model.train()
    return predictions


def _numpy(value):
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
