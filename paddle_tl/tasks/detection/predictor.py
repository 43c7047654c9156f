"""Prediction from a detection inference folder (tasks/detection/export.py)
with Paddle Inference: boxes in the original image's pixels, scores and
class ids, for `paddle-tl infer` (predict/predictor.py's main hands a
detection folder here), the HTTP service and export's parity check.

The image is prepared as evaluation prepares it (loader.py: the resize of
EvalTransform, the body's normalisation, zero padding to a multiple of 32)
and the graph does the rest, the mapping back to original pixels included
(inference_graph.py). One image per run: the graph takes batch 1.
"""

import json
import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from paddle_tl.data.datasets import load_rgb
from paddle_tl.data.transforms import Normalize
from paddle_tl.errors import DataError, ExportError, UserError
from paddle_tl.models.static import inference_config
from paddle_tl.predict.predictor import DRAW_THRESHOLD, META_FILE, list_inputs, read_meta, require_task
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.inference_graph import INPUT_NAMES
from paddle_tl.tasks.detection.model import TASK
from paddle_tl.tasks.detection.transforms import resize

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

PREPROCESS_KEYS = ("mean", "std", "short_side", "max_size", "size_divisor")
ONEDNN_PLACEMENT_PASS = "onednn_placement_pass"
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


class DetectionPredictor:
    """A loaded detection inference folder, reusable for any number of
    images. device "cpu" (oneDNN unless use_mkldnn is false) or "gpu"."""

    def __init__(self, model_dir, device="cpu", cpu_threads=None, use_mkldnn=True, gpu_mem=None):
        self.model_dir = model_dir = Path(model_dir)
        self.meta = meta = read_meta(model_dir)
        require_task(model_dir, meta, TASK)
        where = model_dir / META_FILE
        pre = meta["preprocess"]
        missing = [key for key in PREPROCESS_KEYS if key not in pre]
        if missing:
            raise ExportError(f"{where}: preprocess lacks {', '.join(missing)}; re-export the model")
        self.short_side, self.max_size = int(pre["short_side"]), int(pre["max_size"])
        self.size_divisor = int(pre["size_divisor"])
        self.normalize = Normalize(SimpleNamespace(mean=pre["mean"], std=pre["std"]))
        self.class_names = list(meta["class_names"])
        self.model_file = model_dir / meta["model_file"]
        self.backend = "paddle"  # no ONNX export of the detector yet
        try:
            config = inference_config(self.model_file, model_dir / meta["params_file"], device, cpu_threads,
                                      use_mkldnn, gpu_mem)
            if device == "cpu" and use_mkldnn:
                # oneDNN's clip, softmax and stack kernels throw (a bare std::exception, Paddle 3.3.1) on the
                # empty tensors of an image without detections. Without this pass only the fused convolution
                # passes put oneDNN kernels in: as fast here (0.45 s on a 512 x 704 input, 2 threads; 0.61 s
                # with it, 1.5 s without oneDNN), and every op runs on empty tensors.
                config.delete_pass(ONEDNN_PLACEMENT_PASS)
            self._predictor = paddle.inference.create_predictor(config)
            names = tuple(self._predictor.get_input_names())
            if names != INPUT_NAMES:
                raise ExportError(f"{self.model_file.name} takes inputs {', '.join(names)}, not a detection "
                                  f"model's {', '.join(INPUT_NAMES)}; re-export the model")
            # The first run builds kernels (oneDNN primitives); pay that here, not on image one.
            self.detect(Image.new("RGB", (self.short_side, self.short_side)))
        except UserError:
            raise
        except Exception as exc:  # a torn or foreign file in a folder without a `files` record
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"Paddle Inference cannot load {self.model_file} with {meta['params_file']} "
                              f"({reason}); re-export the model") from exc

    def prepare(self, image):
        """The graph's inputs for a PIL image: {"image" [1, 3, H, W] resized
        (transforms.resize), normalised and zero-padded to multiples of
        size_divisor, "im_shape" [[h, w]] before padding, "scale_factor"
        [[y, x]] resized / original}."""
        resized, target = resize(image, {"boxes": np.zeros((0, 4), np.float32)}, self.short_side, self.max_size)
        array = self.normalize(resized)
        height, width = array.shape[1:]
        padded = np.zeros((1, 3, math.ceil(height / self.size_divisor) * self.size_divisor,
                           math.ceil(width / self.size_divisor) * self.size_divisor), np.float32)
        padded[0, :, :height, :width] = array
        scale_x, scale_y = target["scale"]
        return {"image": padded, "im_shape": np.array([[height, width]], np.float32),
                "scale_factor": np.array([[scale_y, scale_x]], np.float32)}

    def detect(self, image):
        """{"boxes" float32 [D, 4] x1y1x2y2 in `image`'s pixels, "scores"
        float32 [D], "labels" int64 [D]} of a PIL image, best first."""
        return self.run(self.prepare(image))

    def preprocess(self, path, reduced=False):
        """The graph's inputs (prepare) for an image file; raises DataError
        when it cannot be decoded. Always decoded in full (`reduced` is the
        classification service's choice): the boxes are in the decoded
        image's pixels, which must be the file's."""
        return self.prepare(load_rgb(path))

    @staticmethod
    def draft_size(width, height):
        """The decode size the service budgets pixels by: the full image (preprocess)."""
        return width, height

    def run(self, inputs):
        """detect() of prepared inputs (prepare)."""
        for name, value in inputs.items():
            handle = self._predictor.get_input_handle(name)
            handle.reshape(list(value.shape))
            handle.copy_from_cpu(value)
        self._predictor.run()
        boxes, scores, labels = (self._predictor.get_output_handle(name).copy_to_cpu()
                                 for name in self._predictor.get_output_names())
        return {"boxes": boxes.reshape(-1, 4).astype(np.float32), "scores": scores.reshape(-1).astype(np.float32),
                "labels": labels.reshape(-1).astype(np.int64)}

    def row(self, found):
        """The JSON fields of one image's detections (the contract's infer.py row)."""
        return {"boxes": [[float(v) for v in box] for box in found["boxes"]],
                "scores": [float(s) for s in found["scores"]],
                "label_ids": [int(i) for i in found["labels"]],
                "label_names": [self.class_names[int(i)] for i in found["labels"]]}

    def predict_paths(self, paths):
        """One record per path, in order: {"file", "boxes", "scores",
        "label_ids", "label_names"}, or {"file", "error"} for an image that
        cannot be read."""
        for path in paths:
            try:
                image = load_rgb(path)
            except DataError as exc:
                log.warning("skipping: %s", exc)
                yield {"file": str(path), "error": str(exc)}
                continue
            yield {"file": str(path), **self.row(self.detect(image))}


def evaluate_dataset(predictor, dataset):
    """`paddle-tl eval`'s box AP (evaluate.ap_summary) of the exported model
    on a DetectionDataset, each image decoded as evaluation decodes it."""
    from paddle_tl.tasks.detection.evaluate import ap_summary, import_cocoeval
    import_cocoeval()
    if list(dataset.class_names) != predictor.class_names:
        raise DataError(f"{dataset.source}: classes {dataset.class_names}, but {predictor.model_dir} detects "
                        f"{predictor.class_names}")
    return ap_summary(dataset, [predictor.detect(dataset.item(i, None)[0]) for i in range(len(dataset))])


def read_eval_dataset(root, class_names, image_set="val", annotation_file=None):
    """--eval's labelled data: a VOC folder's split, or COCO images with
    their instances json, read with the model's class names."""
    from paddle_tl.tasks.detection.data import read_coco, read_voc
    if annotation_file is not None:
        return read_coco(root, annotation_file, class_names)
    return read_voc(root, image_set, class_names, where="--input")


def draw_detections(image, row, threshold=DRAW_THRESHOLD):
    """A copy of the PIL image with the row's boxes of score >= threshold
    drawn, each labelled with its class name and score, one colour per class."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for box, score, label, name in zip(row["boxes"], row["scores"], row["label_ids"], row["label_names"]):
        if score < threshold:
            continue
        colour = _COLOURS[label % len(_COLOURS)]
        draw.rectangle(box, outline=colour, width=max(1, round(min(image.size) / 200)))
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text)
        top_left = (box[0], max(0, box[1] - (bottom - top) - 2))
        draw.rectangle([top_left, (top_left[0] + right - left + 4, top_left[1] + bottom - top + 2)], fill=colour)
        draw.text((top_left[0] + 2, top_left[1]), text, fill=(255, 255, 255))
    return image


def drawn_path(draw_dir, file, input_root):
    """Where --draw writes an image: DIR/<its path below the --input folder>,
    as PNG (drawn lines blur in JPEG)."""
    file = Path(file)
    relative = file.relative_to(input_root) if input_root is not None else Path(file.name)
    return Path(draw_dir) / relative.with_suffix(".png")


def run(args):
    """`paddle-tl infer` on a detection folder (predict/predictor.main has
    refused the flags that do not apply): one JSON line per image, --output,
    --draw DIR; with --eval the box AP of the labelled folder --input."""
    predictor = DetectionPredictor(args.model_dir, device=args.device, cpu_threads=args.cpu_threads,
                                   use_mkldnn=not args.no_mkldnn, gpu_mem=args.gpu_mem)
    if args.eval:
        dataset = read_eval_dataset(args.input, predictor.class_names, args.image_set, args.annotation_file)
        print(json.dumps(evaluate_dataset(predictor, dataset)))
        return
    paths = list_inputs(args.input)
    input_root = Path(args.input) if Path(args.input).is_dir() else None
    started, failed = time.perf_counter(), 0
    with ExitStack() as files:
        jsonl = None
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            jsonl = files.enter_context(open(args.output, "w", encoding="utf-8"))
        for record in predictor.predict_paths(paths):
            failed += "error" in record
            line = json.dumps(record)
            print(line)
            if jsonl:
                jsonl.write(line + "\n")  # line by line: an interrupted run keeps what it predicted
            if args.draw and "error" not in record:
                target = drawn_path(args.draw, record["file"], input_root)
                target.parent.mkdir(parents=True, exist_ok=True)
                draw_detections(load_rgb(record["file"]), record, args.draw_threshold).save(target)
    seconds = time.perf_counter() - started
    log.info("detected objects in %d images, %d unreadable, in %.1f s (%.0f ms per image)", len(paths) - failed, failed,
             seconds, 1000 * seconds / max(1, len(paths)))
