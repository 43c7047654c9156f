"""Batches for FasterRCNN and predictions back in original pixels
(paddle_tl/tasks/detection/loader.py), with evaluate.py closing the loop."""

import random

import numpy as np
import pytest

from paddle_tl.models.zoo import get_spec
from paddle_tl.tasks.detection.data import read_voc
from paddle_tl.tasks.detection.loader import batches, predict
from paddle_tl.tasks.detection.transforms import EvalTransform
from synthetic_detection import write_voc

SIZE = (96, 72)


@pytest.fixture
def voc(tmp_path):
    # an empty image every 4th, a difficult object every 3rd: both must survive the round trip
    write_voc(tmp_path, {"val": 7}, seed=3, size=SIZE, empty_every=4, difficult_every=3)
    return read_voc(tmp_path, "val")


def test_batches_are_normalised_chw_lists_with_targets_and_records(voc):
    transform = EvalTransform(short_side=60)
    found = list(batches(voc, transform, batch_size=3, arch="mobilenet_v2"))
    assert [len(b.images) for b in found] == [3, 3, 1]
    image, target = voc.item(4, transform)
    tensor = found[1].images[1]
    assert tensor.dtype.name == "FLOAT32" and tuple(tensor.shape) == (3, 60, 80)
    spec = get_spec("mobilenet_v2")
    expected = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255 - np.reshape(spec.mean, (3, 1, 1))) \
        / np.reshape(spec.std, (3, 1, 1))
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(found[1].targets[1]["boxes"], target["boxes"])
    assert found[1].targets[1]["labels"].dtype == np.int64
    assert found[1].records[1] == {"index": 4, "original_size": SIZE, "scale": (80 / 96, 60 / 72)}
    assert [len(b.images) for b in batches(voc, transform, 3, "mobilenet_v2", drop_last=True)] == [3, 3]


def test_shuffled_batches_visit_every_image_once_in_a_seeded_order(voc):
    def order():
        random.seed(5)
        return [r["index"] for b in batches(voc, None, 2, "mobilenet_v2", shuffle=True) for r in b.records]

    first = order()
    assert sorted(first) == list(range(len(voc))) and first != sorted(first)
    assert order() == first


def test_crowd_regions_are_left_out_of_the_targets(voc):
    index = next(i for i, s in enumerate(voc.samples) if len(s) >= 2)
    voc.samples[index].iscrowd[0] = True
    target = next(t for b in batches(voc, None, 1, "mobilenet_v2") for r, t in zip(b.records, b.targets)
                  if r["index"] == index)
    np.testing.assert_array_equal(target["boxes"], voc.samples[index].boxes[1:])
    np.testing.assert_array_equal(target["labels"], voc.samples[index].labels[1:])


class GroundTruthModel:
    """Answers each image with its ground-truth boxes as the transform moved
    them, i.e. in the network's input pixels, as FasterRCNN does."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform
        self.seen = 0
        self.training = True
        self.modes = []

    def eval(self):
        self.training = False
        self.modes.append("eval")

    def train(self):
        self.training = True
        self.modes.append("train")

    def __call__(self, images):
        out = []
        for image in images:
            resized, target = self.dataset.item(self.seen, self.transform)
            assert tuple(image.shape[1:]) == resized.size[::-1]  # the image it is given is the resized one
            self.seen += 1
            out.append({"boxes": target["boxes"], "scores": np.linspace(1, 0.5, len(target["boxes"])),
                        "labels": target["labels"]})
        return out


def test_ground_truth_predictions_round_trip_to_ap_one(voc):
    pytest.importorskip("pycocotools", reason="detection AP needs pycocotools (the `detect` extra)")
    from paddle_tl.tasks.detection.evaluate import evaluate

    # 72 -> 100 px: a scale of 1.39 that predictions must be divided by again
    transform = EvalTransform(short_side=100)
    model = GroundTruthModel(voc, transform)
    predictions = predict(model, voc, transform, batch_size=3, arch="mobilenet_v2")
    assert model.seen == len(voc) and model.modes == ["eval", "train"]
    for found, sample in zip(predictions, voc.samples):
        np.testing.assert_allclose(found["boxes"], sample.boxes, atol=1e-3)
    result = evaluate(voc, predictions)
    assert result["bbox_ap"] == pytest.approx(1.0)
    assert result["bbox_ap50"] == pytest.approx(1.0)
