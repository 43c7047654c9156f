"""COCO box AP of predictions on a DetectionDataset, with pycocotools'
COCOeval: AP (IoU 0.50:0.95), AP50, AP75 and AP per class, as the
contract's metrics.json names them (`bbox_ap`, `bbox_ap50`); and, for
predictions with masks (Mask R-CNN), mask AP the same way (COCOeval's
iouType "segm": `mask_ap`, `mask_ap50`).

Ground truth. Any DetectionDataset (VOC or COCO) becomes a COCO
ground-truth dict in memory: image ids 1..N in the dataset's order,
category ids label + 1 (COCO reserves no id 0, but 1-based ids keep the
json conventional), `bbox` [x, y, w, h] from the sample's continuous
x1y1x2y2 boxes, `area` the box's w * h (there are no segmentation areas for
VOC; the area only picks small/medium/large, which are not reported).

VOC's `difficult` objects are written as COCO crowd regions (iscrowd=1), so
that, as in VOC's own evaluation, they are neither misses nor, when
detected, false positives. Why iscrowd and not an `ignore` flag: COCOeval
(pycocotools 2.0.x, `_prepare`) overwrites every ground truth's `ignore`
with its `iscrowd`, so `ignore` alone does nothing. The one difference from
VOC's rule that this brings: a detection's overlap with a crowd region is
intersection / the detection's own area (not / the union), so a detection
lying mostly inside a difficult box is ignored even when it is much smaller
than the box (VOC would count it a false positive). COCO's own crowd
annotations stay crowd regions.

Mask ground truth: COCO's segmentations as written (polygons or RLE);
VOC's from its SegmentationObject PNGs, as RLE (masks.py). The dataset must
have been read with masks.

Predictions: one dict per dataset image, in the dataset's order, with
`boxes` [M, 4] x1y1x2y2 in the ORIGINAL image's pixels (loader.predict maps
them back), `scores` [M] and `labels` [M] (0..K-1), and optionally `masks`:
M COCO RLE dicts of the original image's size (loader.predict pastes them).
"""

import contextlib
import io
import logging

import numpy as np

from paddle_tl.errors import DataError, UserError
from paddle_tl.tasks.detection.masks import sample_segmentations

log = logging.getLogger("paddle_tl")


class PycocotoolsMissingError(UserError, ImportError):
    """pycocotools is not installed; the message says how to install it."""


def import_cocoeval():
    """pycocotools' (COCO, COCOeval), or one line saying how to install it."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise PycocotoolsMissingError("detection AP needs the pycocotools package: pip install pycocotools "
                                      "(or this project's `detect` extra: pip install -e \".[detect]\")") from None
    return COCO, COCOeval


def coco_ground_truth(dataset, masks=False):
    """The COCO ground-truth dict (images, annotations, categories) of a
    DetectionDataset; difficult objects become crowd regions (module
    docstring). masks: each annotation gets its `segmentation`."""
    data = {"images": [], "annotations": [],
            "categories": [{"id": label + 1, "name": name} for label, name in enumerate(dataset.class_names)]}
    for image_id, sample in enumerate(dataset.samples, 1):
        width, height = sample.size
        data["images"].append({"id": image_id, "file_name": sample.image, "width": width, "height": height})
        segmentations = sample_segmentations(sample) if masks else [None] * len(sample)
        for box, label, difficult, crowd, segmentation in zip(sample.boxes, sample.labels, sample.difficult,
                                                              sample.iscrowd, segmentations):
            x1, y1, x2, y2 = (float(v) for v in box)
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(bool(difficult) or bool(crowd)),
                **({"segmentation": segmentation} if masks else {})})
    return data


def coco_results(predictions, num_classes, masks=False):
    """COCO's detection results list ([x, y, w, h] boxes, 1-based category
    ids) of per-image predictions in the dataset's order; masks: the
    results of the masks instead (`segmentation` and no `bbox`, which would
    make pycocotools' loadRes take them for box results)."""
    results = []
    for image_id, found in enumerate(predictions, 1):
        boxes = np.asarray(found["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(found["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(found["labels"]).reshape(-1).astype(np.int64)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {image_id}: labels must be 0..{num_classes - 1}, got {sorted(set(labels))}")
        if masks:
            if len(found.get("masks", ())) != len(labels):
                raise ValueError(f"image {image_id}: {len(found.get('masks', ()))} masks for {len(labels)} boxes")
            results += [{"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                         "segmentation": rle} for score, label, rle in zip(scores, labels, found["masks"])]
            continue
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    return results


def evaluate(dataset, predictions):
    """{"bbox_ap", "bbox_ap50", "bbox_ap75", "per_class": {name: ap}} of
    `predictions` (one dict per image of `dataset`, module docstring), and
    where they hold masks "mask_ap", "mask_ap50", "mask_ap75",
    "mask_per_class". A class without ground truth in the dataset has AP
    None (undefined, and left out of the means, as COCOeval does). No
    predictions at all score 0."""
    import_cocoeval()  # before any work
    predictions = list(predictions)
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for the {len(dataset)} images of {dataset.source}")
    masks = any("masks" in found for found in predictions)
    truth = coco_ground_truth(dataset, masks=masks)
    counted = sum(1 for ann in truth["annotations"] if not ann["iscrowd"])
    if counted == 0:
        # AP is undefined without a single object to find; a number here would be made up.
        raise DataError(f"{dataset.source}: no objects to evaluate against (every image is empty, or every "
                        "object difficult or crowd)")
    found = _coco_ap(truth, coco_results(predictions, len(dataset.class_names)), "bbox", dataset.class_names)
    scores = {"bbox_ap": found["ap"], "bbox_ap50": found["ap50"], "bbox_ap75": found["ap75"],
              "per_class": found["per_class"]}
    if masks:
        found = _coco_ap(truth, coco_results(predictions, len(dataset.class_names), masks=True), "segm",
                         dataset.class_names)
        scores.update({"mask_ap": found["ap"], "mask_ap50": found["ap50"], "mask_ap75": found["ap75"],
                       "mask_per_class": found["per_class"]})
    return scores


def _coco_ap(truth, results, iou_type, class_names):
    """COCOeval's AP, AP50, AP75 and AP per class of `results` against
    the ground-truth dict `truth`, for iou_type "bbox" or "segm"."""
    if not results:
        # loadRes cannot take an empty list; nothing found is AP 0 for every class that has objects.
        present = {ann["category_id"] - 1 for ann in truth["annotations"] if not ann["iscrowd"]}
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0,
                "per_class": {name: (0.0 if label in present else None) for label, name in enumerate(class_names)}}
    evaluation = _run_cocoeval(truth, results, iou_type)
    stats = evaluation.stats
    return {"ap": float(stats[0]), "ap50": float(stats[1]), "ap75": float(stats[2]),
            "per_class": _per_class(evaluation, class_names)}


def coco_evaluation(dataset, predictions):
    """The accumulated COCOeval of `predictions` (its precision array, for
    the report's curves and table); None where nothing was predicted."""
    import_cocoeval()
    results = coco_results(list(predictions), len(dataset.class_names))
    return _run_cocoeval(coco_ground_truth(dataset), results) if results else None


def _run_cocoeval(truth, results, iou_type="bbox"):
    COCO, COCOeval = import_cocoeval()
    # COCO() and COCOeval print progress and the summary table to stdout; the
    # numbers are kept, the text goes to the debug log.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_truth = COCO()
        coco_truth.dataset = truth
        coco_truth.createIndex()
        evaluation = COCOeval(coco_truth, coco_truth.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    log.debug("COCOeval (%s):\n%s", iou_type, printed.getvalue())
    return evaluation


def _per_class(evaluation, class_names):
    """AP (IoU 0.50:0.95, all areas, 100 detections) per class, in the
    class names' order, from COCOeval's precision array [T, R, K, A, M]
    (-1 where a class has no ground truth), as Detectron2's COCOEvaluator."""
    precision = evaluation.eval["precision"]
    area_all = evaluation.params.areaRngLbl.index("all")
    per_class = {}
    for k, name in enumerate(class_names):
        values = precision[:, :, k, area_all, -1]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else None
    return per_class


def evaluate_checkpoint(cfg):
    """`paddle-tl eval` of a detection run: Global.pretrained_model's box AP
    (and mask AP, for a Mask R-CNN) on the Eval split, at the evaluation
    size the checkpoint records."""
    import_cocoeval()
    predictions, dataset = predict_eval(cfg)
    return ap_summary(dataset, predictions)


def predict_eval(cfg):
    """(predictions in original pixels, dataset) of Global.pretrained_model
    on the Eval split, at the evaluation size the checkpoint records (eval
    and the report)."""
    from paddle_tl.tasks.detection.data import read_dataset
    from paddle_tl.tasks.detection.loader import predict
    from paddle_tl.tasks.detection.model import trained_detector
    from paddle_tl.tasks.detection.transforms import EvalTransform
    model, record = trained_detector(cfg)
    dataset = read_dataset(cfg.DataLoader.Eval.dataset, "Eval", record["class_names"], masks=model.mask)
    pre = record["preprocess"]
    return predict(model, dataset, EvalTransform(pre["short_side"], pre["max_size"])), dataset


def ap_summary(dataset, predictions):
    """What `paddle-tl eval` prints of a detection model (and `paddle-tl
    infer --eval` of its export): box AP, AP50, AP75, per class (and mask
    AP where the predictions hold masks), images."""
    found = evaluate(dataset, predictions)
    scores = {"task": "detection", "bbox_ap": found["bbox_ap"], "bbox_ap50": found["bbox_ap50"],
              "bbox_ap75": found["bbox_ap75"], "per_class_ap": found["per_class"]}
    if "mask_ap" in found:
        scores.update({"mask_ap": found["mask_ap"], "mask_ap50": found["mask_ap50"],
                       "mask_ap75": found["mask_ap75"], "per_class_mask_ap": found["mask_per_class"]})
    return {**scores, "images": len(dataset)}
