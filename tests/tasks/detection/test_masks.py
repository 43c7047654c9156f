"""Instance masks outside the network (paddle_tl/tasks/detection/masks.py)
and their way through the readers, the loader and mask AP: rasterising
COCO polygons and RLE, VOC SegmentationObject PNGs, the projection onto a
box and the paste back, the refusals, and mask AP."""

import json

import numpy as np
import pytest

from paddle_tl.errors import DataError
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.data import read_coco, read_voc
from paddle_tl.tasks.detection.loader import batches, predict
from paddle_tl.tasks.detection.mask_head import project_masks_on_boxes
from paddle_tl.tasks.detection.masks import encode_rle, paste_masks, rasterize, sample_masks
from paddle_tl.tasks.detection.transforms import EvalTransform
from synthetic_detection import make_images, write_coco, write_voc

paddle = import_paddle()
pytest.importorskip("pycocotools", reason="masks need pycocotools (the `detect` extra)")

SIZE = (96, 72)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_polygons_and_rle_rasterise_in_continuous_pixels():
    # The rectangle (2, 1)-(6, 4) covers the pixels whose centres it holds: columns 2..5, rows 1..3.
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 2:6] = 1
    np.testing.assert_array_equal(rasterize([[2, 1, 6, 1, 6, 4, 2, 4]], 6, 8), expected)
    compressed = encode_rle(expected[None])[0]
    assert isinstance(compressed["counts"], str) and compressed["size"] == [6, 8]
    np.testing.assert_array_equal(rasterize(compressed, 6, 8), expected)
    # uncompressed RLE (COCO's crowd regions): run lengths column by column, starting with zeros
    column_major = expected.flatten(order="F")
    runs, current, length = [], 0, 0
    for value in column_major:
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    np.testing.assert_array_equal(rasterize({"size": [6, 8], "counts": runs}, 6, 8), expected)
    # Two polygons of one object are one mask; a 2-point "polygon" (COCO 2017 has a few) adds nothing.
    both = rasterize([[0, 0, 2, 0, 2, 2, 0, 2], [6, 4, 8, 4, 8, 6, 6, 6], [1, 1, 5, 5]], 6, 8)
    assert both.sum() == 8 and both[0, 0] == 1 and both[5, 7] == 1


def test_coco_polygons_rasterise_to_the_drawn_shapes(tmp_path):
    images_dir, annotations, images = write_coco(tmp_path, 4, seed=2, size=SIZE)
    dataset = read_coco(images_dir, annotations, masks=True)
    for sample, image in zip(dataset.samples, images):
        masks = sample_masks(sample)
        assert masks.shape == (len(image["labels"]), SIZE[1], SIZE[0]) and masks.dtype == np.uint8
        # PIL draws each polygon over the later-covered parts too; the json keeps the whole outline.
        for mask, drawn in zip(masks, image["masks"]):
            assert drawn.sum() == 0 or (mask.astype(bool) & drawn.astype(bool)).sum() / drawn.sum() > 0.85


def test_voc_instance_pngs_give_each_xml_object_its_mask(tmp_path):
    written = write_voc(tmp_path, {"val": 5}, seed=4, size=SIZE, empty_every=3, masks=True)["val"]
    dataset = read_voc(tmp_path, "val", masks=True)
    assert [s.mask_file is not None for s in dataset.samples] == [len(i["labels"]) > 0 for i in written]
    for sample, image in zip(dataset.samples, written):
        masks = sample_masks(sample)
        assert masks.shape == (len(image["labels"]), SIZE[1], SIZE[0])
        for mask, drawn in zip(masks, image["masks"]):
            # the void border (255) belongs to no object: the mask is the drawn one less its outline
            assert not (mask & ~drawn.astype(bool)).any() and mask.sum() > 0.5 * drawn.sum()
    # The transforms move them with the boxes.
    _, target = dataset.item(0, EvalTransform(short_side=36), masks=True)
    assert target["masks"].shape[1:] == (36, 48)


def test_objects_without_masks_are_refused_naming_the_file(tmp_path):
    write_voc(tmp_path / "voc", {"val": 2}, seed=4, size=SIZE)
    with pytest.raises(DataError, match=r"val_img_000\.xml: its objects have no masks: .*SegmentationObject"):
        read_voc(tmp_path / "voc", "val", masks=True)
    read_voc(tmp_path / "voc", "val")  # boxes alone need none

    images_dir, annotations, _ = write_coco(tmp_path / "coco", 2, seed=2, size=SIZE)
    data = json.loads(annotations.read_text())
    del data["annotations"][1]["segmentation"]
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\.json: annotation 2 .*no usable segmentation"):
        read_coco(images_dir, annotations, masks=True)
    read_coco(images_dir, annotations)

    data["annotations"][1]["segmentation"] = [[1, 1, 5, 5]]  # a line: no area
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation 2 .*no usable segmentation"):
        read_coco(images_dir, annotations, masks=True)

    data["annotations"][1]["segmentation"] = {"size": [10, 10], "counts": "abc"}
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"RLE segmentation is of size \[10, 10\].*the image is 96x72"):
        read_coco(images_dir, annotations, masks=True)


def test_a_mask_projects_onto_its_box_as_the_expected_28_by_28_target():
    gt = np.zeros((2, 64, 64), np.float32)
    gt[0, 8:22, 8:36] = 1  # the top half of the box (8, 8)-(36, 36)
    gt[1, 8:36, 8:22] = 1  # the left half
    boxes = paddle.to_tensor([[8, 8, 36, 36], [8, 8, 36, 36], [8, 8, 64, 64]], dtype="float32")
    matched = paddle.to_tensor([1, 0, 0])  # not grouped by mask: the projection must keep the boxes' order
    targets = project_masks_on_boxes(paddle.to_tensor(gt), boxes, matched, 28).numpy()
    left, top, quarter = (np.zeros((28, 28), np.float32) for _ in range(3))
    left[:, :14] = 1
    top[:14, :] = 1
    quarter[:7, :14] = 1  # 2 px per cell: the 14 x 28 px region is 7 x 14 cells
    np.testing.assert_array_equal(targets, np.stack([left, top, quarter]))


def test_a_mask_pasted_back_over_its_box_is_the_mask_again():
    rectangle = np.zeros((1, 48, 64), np.uint8)
    rectangle[0, 10:30, 6:46] = 1  # 40 x 20 px over 28 x 28 cells: not a whole number of pixels per cell
    box = np.array([[6, 10, 46, 30]], np.float32)
    probabilities = project_masks_on_boxes(paddle.to_tensor(rectangle.astype(np.float32)), paddle.to_tensor(box),
                                           paddle.to_tensor([0]), 28).numpy()
    np.testing.assert_array_equal(paste_masks(probabilities, box, 48, 64), rectangle)
    image = make_images(1, seed=6, size=SIZE)[0]
    probabilities = project_masks_on_boxes(paddle.to_tensor(image["masks"].astype(np.float32)),
                                           paddle.to_tensor(image["boxes"]),
                                           paddle.arange(len(image["boxes"])), 28).numpy()
    pasted = paste_masks(probabilities, image["boxes"], SIZE[1], SIZE[0])
    for mask, back in zip(image["masks"].astype(bool), pasted.astype(bool)):
        assert _iou(mask, back) > 0.9
    assert paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), 5, 7).shape == (0, 5, 7)


class GroundTruthMaskModel:
    """Answers each (resized) image with its ground-truth boxes and their
    masks projected onto them, in the network's input pixels, as Mask
    R-CNN's "mask_probs"."""

    training = False

    def __init__(self, dataset, transform):
        self.dataset, self.transform, self.seen = dataset, transform, 0

    def eval(self):
        pass

    def __call__(self, images):
        out = []
        for _ in images:
            _, target = self.dataset.item(self.seen, self.transform, masks=True)
            self.seen += 1
            count = len(target["boxes"])
            probabilities = project_masks_on_boxes(
                paddle.to_tensor(target["masks"].astype(np.float32)), paddle.to_tensor(target["boxes"]),
                paddle.arange(count), 28) if count else paddle.zeros([0, 28, 28])
            out.append({"boxes": target["boxes"], "scores": np.linspace(1, 0.5, count), "labels": target["labels"],
                        "mask_probs": probabilities})
        return out


@pytest.mark.parametrize("kind", ["coco", "voc"])
def test_perfect_masks_score_mask_ap_one(tmp_path, kind):
    from paddle_tl.tasks.detection.evaluate import evaluate
    if kind == "coco":
        images_dir, annotations, _ = write_coco(tmp_path, 5, seed=1, size=SIZE, empty_every=4)
        dataset = read_coco(images_dir, annotations, masks=True)
    else:
        write_voc(tmp_path, {"val": 5}, seed=1, size=SIZE, empty_every=4, difficult_every=3, masks=True)
        dataset = read_voc(tmp_path, "val", masks=True)
    perfect = [{"boxes": s.boxes, "scores": np.ones(len(s)), "labels": s.labels, "masks": encode_rle(sample_masks(s))}
               for s in dataset.samples]
    result = evaluate(dataset, perfect)
    assert result["mask_ap"] == pytest.approx(1.0) and result["mask_ap50"] == pytest.approx(1.0)
    assert result["bbox_ap"] == pytest.approx(1.0)
    # Each mask on the wrong object of its image: boxes still perfect, masks not.
    swapped = [dict(found, masks=found["masks"][::-1]) for found in perfect]
    assert evaluate(dataset, swapped)["mask_ap"] < 0.9


def test_predicted_masks_come_back_in_original_pixels(tmp_path):
    from paddle_tl.tasks.detection.evaluate import evaluate
    images_dir, annotations, _ = write_coco(tmp_path, 4, seed=5, size=SIZE)
    dataset = read_coco(images_dir, annotations, masks=True)
    transform = EvalTransform(short_side=100)  # 72 -> 100 px: masks are pasted over the boxes mapped back
    predictions = predict(GroundTruthMaskModel(dataset, transform), dataset, transform, arch="mobilenet_v2")
    for found, sample in zip(predictions, dataset.samples):
        assert len(found["masks"]) == len(sample) and all(m["size"] == [SIZE[1], SIZE[0]] for m in found["masks"])
    result = evaluate(dataset, predictions)
    assert result["mask_ap50"] == pytest.approx(1.0) and result["mask_ap"] > 0.8
    batch = next(batches(dataset, transform, 2, "mobilenet_v2", masks=True))
    assert batch.targets[0]["masks"].shape[1:] == (100, round(96 * 100 / 72))
