"""Export a detection run as a static Paddle Inference model (`paddle-tl
export` with Global.task=detection): the graph of inference_graph.py,
inference.yml for the predictor (tasks/detection/predictor.py), and a
parity check of the exported model against the trained network before the
folder is published (all or nothing, as classification's deploy/export.py).

Parity: a few Eval images (else random ones) go through loader.predict (what
`paddle-tl eval` scores) and through the exported folder's predictor, as
deployed (Paddle Inference, oneDNN on CPU). Each trained detection must
have an exported one of the same class with the box within `tolerance`
pixels and the score within SCORE_TOLERANCE, and no exported detection may
be left over. Matched regardless of order: detections whose scores differ by
less than float rounding may swap places, which changes nothing an AP or a
user sees. (A network with random weights, whose scores all but tie, can
flip NMS and top-k choices under oneDNN's rounding; a trained one does not.)
"""

import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from paddle_tl.deploy.export import check_target, file_records
from paddle_tl.errors import DataError, ExportError
from paddle_tl.files import publish_folder
from paddle_tl.models.static import PARAMS_FILE, save_program
from paddle_tl.predict.predictor import META_FILE
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.data import DetectionDataset, DetectionSample, read_dataset
from paddle_tl.tasks.detection.faster_rcnn import SIZE_DIVISOR
from paddle_tl.tasks.detection.inference_graph import INPUT_NAMES, OUTPUT_NAMES, InferenceDetector
from paddle_tl.tasks.detection.loader import predict
from paddle_tl.tasks.detection.model import trained_detector
from paddle_tl.tasks.detection.predictor import DetectionPredictor
from paddle_tl.tasks.detection.transforms import EvalTransform

paddle = import_paddle()

SCORE_TOLERANCE = 1e-4
RESIZE_RULE = "short_side_max_size"

META_HEADER = """\
# Written by paddle_tl export (detection: Faster R-CNN + FPN). Preprocessing, in order:
# decode to 8-bit RGB (upright per EXIF); resize (bilinear) by one factor for both sides,
# min(short_side / shorter side, max_size / longer side), each new side rounded to whole
# pixels; multiply by scale, subtract mean and divide by std per channel (channel_order);
# HWC -> CHW float32; zero-pad at the bottom and right to multiples of size_divisor.
# Inputs (one image per run, batch 1): image [1, 3, H, W] (padded), im_shape [1, 2] =
# (height, width) of the resized image before padding, scale_factor [1, 2] = (resized /
# original height, resized / original width). Outputs: boxes [D, 4] = x1, y1, x2, y2 in the
# ORIGINAL image's pixels (continuous: the image spans [0, width] x [0, height]), scores [D],
# label_ids [D] (int64 indices into class_names), after per-class NMS, best first; D is at
# most detector.detections_per_image, only scores above detector.score_threshold.
# files: the size and sha256 of each model file as exported; infer and serve refuse a
# folder whose files differ (torn, or from another export).
"""


def export_detector(cfg, parity_images=4, tolerance=1e-2):
    """Write Global.save_inference_dir from Global.pretrained_model (a
    detection checkpoint) and return the folder. Unless parity_images is 0,
    that many Eval images are checked (module docstring); a mismatch
    raises ExportError and leaves the target as it was."""
    paddle.set_device("cpu")  # both sides in plain fp32 on CPU: the tolerance means the same everywhere
    model, record = trained_detector(cfg)
    if record.get("mask"):
        # The exported graph ends at the boxes; a mask model deployed without its masks would look whole.
        raise ExportError(f"{cfg.Global.pretrained_model} is a Mask R-CNN (Arch.mask: true); exporting its masks "
                          "is not built yet, and its boxes alone are not exported in their place")
    out_dir = check_target(cfg.Global.save_inference_dir)
    with tempfile.TemporaryDirectory(prefix="paddle_tl_parity_") as scratch:
        dataset, source = parity_dataset(cfg, record, parity_images)
        if dataset is None and parity_images > 0:
            dataset, source = random_dataset(scratch, record, parity_images)

        def write(folder):
            model_file = save_program(InferenceDetector(model), InferenceDetector.input_spec(), folder)
            meta = inference_meta(cfg, record, model_file)
            meta["files"] = file_records(folder, [model_file, PARAMS_FILE])
            (folder / META_FILE).write_text(META_HEADER + yaml.safe_dump(meta, sort_keys=False))
            if dataset is not None:  # checked where it was written: only a folder that passes is published
                check_parity(model, record, DetectionPredictor(folder), dataset, tolerance, source, out_dir)

        publish_folder(out_dir, write, what="Global.save_inference_dir")
    count = record["num_classes"]
    print(f"exported {record['arch']} Faster R-CNN ({count} class{'' if count == 1 else 'es'}) to {out_dir}")
    return out_dir


def inference_meta(cfg, record, model_file):
    """What inference.yml records of an exported detector (META_HEADER says
    how to use it)."""
    pre, detector = record["preprocess"], record["detector"]
    return {
        "task": record["task"],
        "arch": record["arch"],
        "num_classes": record["num_classes"],
        "class_names": list(record["class_names"]),
        "preprocess": {"resize": RESIZE_RULE, "short_side": pre["short_side"], "max_size": pre["max_size"],
                       "interpolation": "bilinear", "scale": 1 / 255, "mean": list(pre["mean"]),
                       "std": list(pre["std"]), "channel_order": pre["channel_order"],
                       "size_divisor": SIZE_DIVISOR},
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "batch_size": 1,
        "detector": {key: detector[key] for key in ("score_threshold", "nms_threshold", "detections_per_image")},
        "model_file": model_file,
        "params_file": PARAMS_FILE,
        "paddle_version": paddle.__version__,
        "exported_from": str(cfg.Global.pretrained_model),
    }


def parity_dataset(cfg, record, count):
    """(DetectionDataset of up to `count` Eval images spread over the split,
    what they are), or (None, None) when the Eval data cannot be read or
    count is 0."""
    if count <= 0:
        return None, None
    try:
        dataset = read_dataset(cfg.DataLoader.Eval.dataset, "Eval", record["class_names"])
    except DataError:
        return None, None
    if not len(dataset):
        return None, None
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    samples = [dataset.samples[int(i)] for i in picks]
    return DetectionDataset(samples, dataset.class_names, source=dataset.source), f"{len(samples)} Eval images"


def random_dataset(folder, record, count):
    """`count` images of seeded noise written to `folder`, as a dataset
    without objects, for a parity check without Eval data."""
    rng, samples = np.random.RandomState(0), []
    for index in range(count):
        size = (int(rng.randint(200, 640)), int(rng.randint(200, 640)))
        path = Path(folder) / f"random_{index}.png"
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        samples.append(DetectionSample(image=str(path), boxes=np.zeros((0, 4), np.float32),
                                       labels=np.zeros(0, np.int64), difficult=np.zeros(0, bool),
                                       iscrowd=np.zeros(0, bool), size=size, annotation=""))
    return DetectionDataset(samples, record["class_names"], source="random images"), f"{count} random images"


def check_parity(model, record, predictor, dataset, tolerance, source="images", out_dir=None):
    """Compare the trained network (loader.predict) with the exported model
    on `dataset`'s images (module docstring); print one line, raise
    ExportError on a mismatch. Returns (max |box difference| in pixels, max
    |score difference|, detections compared)."""
    pre = record["preprocess"]
    expected = predict(model, dataset, EvalTransform(pre["short_side"], pre["max_size"]))
    box_diff = score_diff = 0.0
    compared, problems = 0, []
    for index, trained in enumerate(expected):
        exported = predictor.detect(dataset.item(index, None)[0])
        pairs, unmatched = match_detections(trained, exported, tolerance)
        compared += len(trained["scores"])
        for i, j in pairs:
            box_diff = max(box_diff, float(np.abs(trained["boxes"][i] - exported["boxes"][j]).max()))
            score_diff = max(score_diff, abs(float(trained["scores"][i]) - float(exported["scores"][j])))
        extra = len(exported["scores"]) - len(pairs)
        if unmatched or extra:
            problems.append(f"{Path(dataset.samples[index].image).name}: {unmatched} of {len(trained['scores'])} "
                            f"trained detections without an exported match, {extra} exported ones left over")
    vacuous = "" if compared else ": no detection above score_threshold on these images, only empty answers"
    print(f"Paddle Inference parity on {source}: {compared} detections, max |box difference| {box_diff:.2e} px "
          f"(allowed {tolerance:.0e}), max |score difference| {score_diff:.1e} (allowed {SCORE_TOLERANCE:.0e}), "
          f"{len(problems)} images differ{vacuous}")
    if problems:
        where = f"; nothing was written to {out_dir}" if out_dir is not None else ""
        raise ExportError(f"the exported model {predictor.model_file.name} does not reproduce the trained network "
                          f"({'; '.join(problems[:3])}); do not deploy it{where}")
    return box_diff, score_diff, compared


def match_detections(trained, exported, tolerance):
    """([(i, j)] trained detection i matched to exported detection j, the
    count of trained ones without a match): the same class, every box
    coordinate within `tolerance` px, the score within SCORE_TOLERANCE; each
    exported detection matched at most once, the closest in score first."""
    free = np.ones(len(exported["scores"]), bool)
    pairs, unmatched = [], 0
    for i, (box, score, label) in enumerate(zip(trained["boxes"], trained["scores"], trained["labels"])):
        fits = free & (exported["labels"] == label) & (np.abs(exported["scores"] - score) <= SCORE_TOLERANCE) \
            & (np.abs(exported["boxes"] - box).max(axis=1, initial=0) <= tolerance)
        if not fits.any():
            unmatched += 1
            continue
        candidates = np.flatnonzero(fits)
        j = int(candidates[np.argmin(np.abs(exported["scores"][candidates] - score))])
        free[j] = False
        pairs.append((i, j))
    return pairs, unmatched
