"""COCO box AP (paddle_tl/tasks/detection/evaluate.py) on hand-made
datasets whose AP is known exactly."""

import sys

import numpy as np
import pytest

from paddle_tl.errors import DataError
from paddle_tl.tasks.detection.data import DetectionDataset, DetectionSample

pytest.importorskip("pycocotools", reason="detection AP needs pycocotools (the `detect` extra)")

from paddle_tl.tasks.detection.evaluate import (PycocotoolsMissingError, coco_ground_truth,  # noqa: E402
                                                evaluate)

CLASSES = ["zebra", "ant", "cat"]  # deliberately not sorted: per_class must keep this order


def sample(boxes, labels, difficult=None, size=(200, 150)):
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return DetectionSample(image="x.jpg", boxes=boxes, labels=np.array(labels, dtype=np.int64),
                           difficult=difficult, iscrowd=np.zeros(len(boxes), bool), size=size, annotation="x.xml")


def dataset(*samples):
    return DetectionDataset(samples, CLASSES, source="test set")


def found(boxes=(), scores=(), labels=()):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "labels": np.array(labels, np.int64)}


def perfect(data):
    return [found(s.boxes, np.ones(len(s)), s.labels) for s in data.samples]


def test_perfect_predictions_score_one_and_nothing_is_printed(capsys):
    data = dataset(sample([[10, 10, 60, 50], [100, 20, 180, 140]], [0, 1]), sample([[5, 5, 40, 90]], [0]))
    result = evaluate(data, perfect(data))
    assert result["bbox_ap"] == pytest.approx(1.0)
    assert result["bbox_ap50"] == pytest.approx(1.0)
    assert result["bbox_ap75"] == pytest.approx(1.0)
    assert result["per_class"] == {"zebra": pytest.approx(1.0), "ant": pytest.approx(1.0), "cat": None}
    assert capsys.readouterr().out == ""  # COCOeval's progress and table are captured


def test_a_shifted_box_counts_at_iou_050_but_not_at_075():
    data = dataset(sample([[0, 0, 100, 100]], [0]))
    # shifted 30 px: IoU = 70 * 100 / (2 * 10000 - 7000) = 0.538
    result = evaluate(data, [found([[30, 0, 130, 100]], [0.9], [0])])
    assert result["bbox_ap50"] == pytest.approx(1.0)
    assert result["bbox_ap75"] == pytest.approx(0.0)
    # a hit at 1 of the 10 thresholds 0.50, 0.55, ..., 0.95
    assert result["bbox_ap"] == pytest.approx(0.1)


def test_a_false_positive_ranked_first_halves_precision():
    # the second image has no objects: any detection there is a false positive
    data = dataset(sample([[10, 10, 60, 60]], [0]), sample([], []))
    hit = found([[10, 10, 60, 60]], [0.8], [0])
    assert evaluate(data, [hit, found([[0, 0, 30, 30]], [0.9], [0])])["bbox_ap50"] == pytest.approx(0.5)
    # ranked below the hit it costs nothing: precision is 1 up to full recall
    assert evaluate(data, [hit, found([[0, 0, 30, 30]], [0.7], [0])])["bbox_ap50"] == pytest.approx(1.0)


@pytest.mark.parametrize("detect_difficult", [True, False])
def test_difficult_objects_are_neither_misses_nor_false_positives(detect_difficult):
    easy, hard = [10, 10, 60, 60], [100, 50, 180, 140]
    data = dataset(sample([easy, hard], [0, 0], difficult=[False, True]))
    # the difficult object found with the higher score, or not found at all
    prediction = found([hard, easy], [0.9, 0.8], [0, 0]) if detect_difficult else found([easy], [0.8], [0])
    result = evaluate(data, [prediction])
    assert result["bbox_ap"] == pytest.approx(1.0)
    # the same objects without the flag: a detection of it is a hit, missing it halves recall
    plain = dataset(sample([easy, hard], [0, 0]))
    assert evaluate(plain, [prediction])["bbox_ap"] == pytest.approx(1.0 if detect_difficult else 0.5, abs=0.01)


def test_difficult_objects_are_crowd_regions_in_the_ground_truth():
    truth = coco_ground_truth(dataset(sample([[0, 0, 10, 20], [5, 5, 9, 9]], [2, 0], difficult=[False, True])))
    assert [a["iscrowd"] for a in truth["annotations"]] == [0, 1]
    assert truth["annotations"][0]["bbox"] == [0.0, 0.0, 10.0, 20.0]
    assert truth["annotations"][0]["area"] == 200.0
    assert truth["annotations"][0]["category_id"] == 3  # label 2 -> category 3
    assert [c["name"] for c in truth["categories"]] == CLASSES


def test_per_class_ap_follows_the_class_names():
    data = dataset(sample([[10, 10, 60, 60], [100, 50, 180, 140]], [0, 1]))
    # zebra found, ant missed, cat has no ground truth
    result = evaluate(data, [found([[10, 10, 60, 60]], [0.9], [0])])
    assert list(result["per_class"]) == CLASSES
    assert result["per_class"]["zebra"] == pytest.approx(1.0)
    assert result["per_class"]["ant"] == pytest.approx(0.0)
    assert result["per_class"]["cat"] is None
    assert result["bbox_ap"] == pytest.approx(0.5)  # the mean over the classes that have objects


def test_no_predictions_at_all_score_zero():
    data = dataset(sample([[10, 10, 60, 60]], [1]), sample([], []))
    result = evaluate(data, [found(), found()])
    assert result == {"bbox_ap": 0.0, "bbox_ap50": 0.0, "bbox_ap75": 0.0,
                      "per_class": {"zebra": None, "ant": 0.0, "cat": None}}


def test_a_dataset_without_objects_to_find_is_refused():
    data = dataset(sample([], []), sample([[0, 0, 5, 5]], [0], difficult=[True]))
    with pytest.raises(DataError, match="test set: no objects to evaluate against"):
        evaluate(data, [found(), found()])


def test_predictions_must_cover_every_image():
    data = dataset(sample([[10, 10, 60, 60]], [0]), sample([], []))
    with pytest.raises(ValueError, match="1 predictions for the 2 images"):
        evaluate(data, [found()])


def test_without_pycocotools_one_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # makes the import fail
    data = dataset(sample([[10, 10, 60, 60]], [0]))
    with pytest.raises(PycocotoolsMissingError, match=r"pip install pycocotools"):
        evaluate(data, [found()])
