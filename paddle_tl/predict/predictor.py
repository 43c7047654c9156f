"""Prediction from an exported inference folder (`paddle-tl infer`,
`tools/infer.py`) with Paddle Inference or, for a folder exported with
`--onnx`, onnxruntime; plus accuracy on a labelled folder and a latency
benchmark.

The folder holds the static model and `inference.yml`; preprocessing is rebuilt
from the yml with the very transform evaluation uses, so a deployed prediction
matches `paddle-tl eval` image for image, whichever backend runs the model.
"""

import argparse
import csv
import importlib
import json
import logging
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import yaml

from paddle_tl.calibration import UNKNOWN_LABEL, softmax
from paddle_tl.config import DatasetConfig
from paddle_tl.data.datasets import build_dataset, find_images, load_rgb, read_lines
from paddle_tl.data.transforms import Preprocess, eval_transform, reduced_size
from paddle_tl.errors import ConfigError, DataError, ExportError, UserError
from paddle_tl.files import file_digest
from paddle_tl.flags import check_flags
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import GPU_MEMORY_POOL_MB, TRT_PRECISIONS, StaticModel, _BatchedModel
from paddle_tl.runtime import import_paddle
from paddle_tl.tta import MODES as TTA_MODES
from paddle_tl.tta import tta_input, with_tta

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

META_FILE = "inference.yml"
CLASSIFICATION = "classification"
# What EvalTransform does beyond Preprocess's own fields; written into
# inference.yml for deployers, and refused when a yml asks for anything else.
FIXED_PREPROCESS = {"interpolation": "bilinear", "scale": 1 / 255}
BACKENDS = {"paddle": "Paddle Inference", "onnx": "onnxruntime"}
# --benchmark preprocesses at most this many inputs: enough distinct images for
# the timed batches, without holding a whole large folder in memory.
BENCHMARK_MAX_IMAGES = 256
DEFAULT_TOP_K = 5
DRAW_THRESHOLD = 0.5  # --draw's default: the boxes a person would call found


def import_onnx_package(name):
    """paddle2onnx or onnxruntime, which are optional (the `onnx` extra); a
    missing one is a one-line error saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ExportError(f"{name} is not installed ({exc}); ONNX export and the onnx backend need the "
                          "`onnx` extra: pip install -e \".[onnx]\"") from None


def read_meta(model_dir):
    """inference.yml of an inference folder, checked for what prediction needs."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"inference folder {model_dir} does not exist; write one with tools/export_model.py")
    path = model_dir / META_FILE
    if not path.is_file():
        raise ExportError(f"{model_dir} has no {META_FILE}: not an inference folder written by "
                          "tools/export_model.py")
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ExportError(f"{path}: not valid YAML: {exc}") from exc
    missing = [key for key in ("class_names", "num_classes", "preprocess", "model_file", "params_file")
               if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ExportError(f"{path}: missing {', '.join(missing)}; re-export the model")
    for key in ("model_file", "params_file"):
        if not (model_dir / meta[key]).is_file():
            raise ExportError(f"{path}: {key} {meta[key]} is not in {model_dir}; re-export the model")
    num_classes = meta["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < len(meta["class_names"]):
        raise ExportError(f"{path}: num_classes {num_classes!r} is not a whole number of at least the "
                          f"{len(meta['class_names'])} class_names; re-export the model")
    # Folders exported before the record have no `files`: their files are not checked.
    if not isinstance(meta.get("files", {}), dict):
        raise ExportError(f"{path}: files is not a mapping of file names to their bytes and sha256; "
                          "re-export the model")
    for key in ("model_file", "params_file"):
        check_file(model_dir, meta, meta[key])
    temperature = meta.get("temperature", 1.0)  # folders exported before calibration have none
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ExportError(f"{path}: temperature {temperature!r} is not a positive number; re-export the model")
    if meta.get("tta", "none") not in TTA_MODES:  # folders exported before TTA have none
        raise ExportError(f"{path}: tta {meta['tta']!r} is not one of {', '.join(TTA_MODES)}; re-export the model")
    return meta


def task_of(meta):
    """What an inference folder's model does: "classification" (folders
    exported before detection say nothing) or "detection"."""
    return meta.get("task", CLASSIFICATION)


def require_task(model_dir, meta, task):
    """Refuse a folder exported for another task than the predictor's, in one line."""
    found = task_of(meta)
    if found != task:
        raise ExportError(f"{model_dir} holds a {found} model ({META_FILE}: task {found}), not a {task} one; "
                          f"give it to the {found} predictor (paddle-tl infer chooses by itself) or export a "
                          f"{task} run")


def check_file(model_dir, meta, name):
    """Refuse a model file that is not the one inference.yml was exported
    with (its `files` record: bytes, then sha256), so that a torn or mixed
    folder (a killed re-export, files copied from another export) is one
    line, not a traceback or wrong predictions. No record, no check."""
    record = meta.get("files", {}).get(name)
    if record is None:
        return
    where = model_dir / META_FILE
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or \
            not isinstance(record.get("sha256"), str):
        raise ExportError(f"{where}: files.{name} should give its bytes and sha256; re-export the model")
    path = model_dir / name
    size = path.stat().st_size
    if size != record["bytes"]:
        cause = "cut short, or from another export" if size < record["bytes"] else "from another export"
        raise ExportError(f"{path} is {size} bytes, but {META_FILE} records {record['bytes']} ({cause}); "
                          "re-export the model")
    digest = file_digest(path)
    if digest != record["sha256"]:
        raise ExportError(f"{path} has sha256 {digest[:16]}..., but {META_FILE} records {record['sha256'][:16]}... "
                          "(from another export, or changed since); re-export the model")


def _onnx_file(model_dir, meta):
    name = meta.get("onnx_file")
    if name is None:
        raise ExportError(f"{model_dir} has no ONNX model; export it with --onnx (tools/export_model.py ... --onnx)")
    if not (model_dir / name).is_file():
        raise ExportError(f"{model_dir / META_FILE}: onnx_file {name} is not in {model_dir}; re-export with --onnx")
    check_file(model_dir, meta, name)
    return model_dir / name


def preprocess_from_meta(preprocess, where):
    """The Preprocess an inference.yml describes (its documentation-only keys
    checked against what the transform really does)."""
    fields = dict(preprocess)
    for key, value in FIXED_PREPROCESS.items():
        given = fields.pop(key, value)
        if given != value and not (isinstance(value, float) and isinstance(given, (int, float))
                                   and math.isclose(given, value)):
            raise ExportError(f"{where}: preprocess.{key} {given!r} is not supported (only {value!r})")
    try:
        return Preprocess.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: invalid preprocess: {exc}") from exc


class OnnxModel(_BatchedModel):
    """An ONNX model run by onnxruntime on CPU (CPUExecutionProvider); the
    same interface as StaticModel."""

    def __init__(self, onnx_file, cpu_threads=None, batch_size=8):
        super().__init__(batch_size)
        ort = import_onnx_package("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads or os.cpu_count() or 1
        # Errors only: the default level warns about every unused initializer paddle2onnx leaves.
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def input_shape(self):
        """[N, 3, H, W] as the ONNX model declares its input (-1: a dimension it leaves open)."""
        return [dim if isinstance(dim, int) and dim > 0 else -1 for dim in self._session.get_inputs()[0].shape]

    def _run(self, chunk):
        return self._session.run(None, {self._input: chunk})[0]


class Predictor:
    """A loaded inference folder, reusable for any number of predictions.
    backend "paddle" runs the static model with Paddle Inference, "onnx" runs
    inference.onnx (export --onnx) with onnxruntime on CPU; None: the one the
    folder's inference.yml names (an INT8 folder's), else "paddle"."""

    def __init__(self, model_dir, device="cpu", cpu_threads=None, use_mkldnn=True, batch_size=8, *,
                 backend=None, gpu_mem=None, trt=None):
        self.model_dir = model_dir = Path(model_dir)
        self.meta = meta = read_meta(model_dir)
        require_task(model_dir, meta, CLASSIFICATION)
        self.batch_size = batch_size
        self.precision = meta.get("precision", "fp32")
        if self.precision not in ("fp32", "int8"):
            raise ExportError(f"{model_dir / META_FILE}: precision {self.precision!r} is not supported (fp32 or int8)")
        self.backend = backend = backend or meta.get("backend", "paddle")
        if self.precision == "int8" and backend != meta.get("backend", "paddle"):
            raise ConfigError(f"{model_dir} holds an INT8 model for the {meta.get('backend', 'paddle')} backend "
                              f"(export --int8); leave out --backend {backend}")
        self.pre = preprocess_from_meta(meta["preprocess"], model_dir / META_FILE)
        # Test-time augmentation as exported (tta.py): logits() averages the views' calibrated probabilities.
        self.tta = meta.get("tta", "none")
        self.input_pre = tta_input(self.pre, self.tta)  # what preprocess() prepares, and logits() takes
        self.transform = eval_transform(self.input_pre)
        # Outputs beyond the named classes (Arch.num_classes above the data's) keep their index as name.
        names = list(meta["class_names"])
        self.class_names = names + [str(i) for i in range(len(names), meta["num_classes"])]
        # Scores are softmax(logits / T): calibrated probabilities (T from training's validation split).
        self.temperature = float(meta.get("temperature", 1.0))
        if backend == "paddle":
            self.model_file = model_dir / meta["model_file"]
        elif backend == "onnx":
            if device != "cpu" or gpu_mem or trt:  # refused to users as flags (flags.py); a caller's bug here
                raise ValueError("the onnx backend runs on CPU (onnxruntime's CPUExecutionProvider); device gpu, "
                                 "gpu_mem and trt are for the paddle backend")
            self.model_file = _onnx_file(model_dir, meta)
        else:
            raise ConfigError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        size = self.pre.input_size
        try:
            if backend == "paddle":
                self._model = StaticModel(self.model_file, model_dir / meta["params_file"], device, cpu_threads,
                                          use_mkldnn, batch_size, gpu_mem=gpu_mem, trt=trt, image_size=size,
                                          int8=self.precision == "int8")
            else:
                self._model = OnnxModel(self.model_file, cpu_threads, batch_size)
            declared = self._model.input_shape()
            self._check_input_size(declared)
            # The first run builds kernels (oneDNN primitives, CUDA contexts); pay that here, not on image one.
            outputs = self.predict_arrays(np.zeros((1, 3, size, size), np.float32)).shape[-1]
        except UserError:
            raise
        except Exception as exc:  # a torn or foreign file in a folder without a `files` record (older exports)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            files = f"{self.model_file} with {meta['params_file']}" if backend == "paddle" else self.model_file
            raise ExportError(f"{BACKENDS[backend]} cannot load {files} ({reason}); re-export the model") from exc
        # A wider output than num_classes would rank classes with no name (an IndexError per request).
        if outputs != meta["num_classes"]:
            raise ExportError(f"{model_dir / META_FILE}: num_classes {meta['num_classes']} does not match the "
                              f"{outputs} outputs of {self.model_file.name} (edited, or the files come from another "
                              "export); re-export the model")

    def _check_input_size(self, declared):
        """Refuse a preprocess.input_size other than the one the model was
        exported for: a smaller image runs through a network with global
        pooling all the same, with other scores."""
        size = self.pre.input_size
        if declared is None or len(declared) != 4:
            return
        height, width = declared[2:]
        if (height > 0 and height != size) or (width > 0 and width != size):
            raise ExportError(f"{self.model_dir / META_FILE}: preprocess.input_size {size} does not match the "
                              f"input {height}x{width} of {self.model_file.name}; set it back to {height} or "
                              "re-export the model")

    def preprocess(self, path, reduced=False):
        """float32 CHW of one image file, exactly as evaluation prepares it
        (with tta flip_crops the larger square its views crop: input_pre).
        reduced=True lets a large JPEG decode at a fraction of its size
        (draft_size), which changes its pixels slightly: the service's choice,
        not evaluation's. Raises DataError when the file cannot be decoded."""
        return self.transform(load_rgb(path, self.draft_size if reduced else None))

    def draft_size(self, width, height):
        """The smallest JPEG decode preprocess(reduced=True) asks for: the
        short side stays at least twice resize_short, so the resize to
        resize_short still shrinks it by 2 or more, as the full image's
        resize does (a 4000x3000 photo for a 224 px model decodes at 1/4)."""
        return reduced_size(width, height, min(width, height), 2 * self.input_pre.resize_short)

    def predict_arrays(self, batch):
        """Logits [N, num_classes] of preprocessed images [N, 3, S, S]."""
        _require_shape(batch, self.pre.input_size)
        return self._model.run(batch)

    def logits(self, batch):
        """What the folder predicts for preprocessed images (preprocess()):
        predict_arrays' logits, or with the yml's tta, logits whose
        softmax(logits / temperature) is the average over its views (tta.py)."""
        _require_shape(batch, self.input_pre.input_size)
        return with_tta(self.predict_arrays, self.tta, self.pre.input_size, self.temperature)(batch)

    def predict_paths(self, paths, top_k=5, reject_below=None):
        """One record per path, in order: {"file", "class_ids", "scores",
        "label_names"} best first (scores are the calibrated probabilities
        softmax(logits / temperature)), or {"file", "error"} for an image that
        cannot be read. With `reject_below` P, an image whose top score is
        below P gets "unknown" as its first label name; its class_ids and
        scores stay those of the ranked classes (class_ids[0] is still the
        most probable class, label_names[1:] still name class_ids[1:])."""
        paths = list(paths)
        for start in range(0, len(paths), self.batch_size):
            arrays, records = [], []
            for path in paths[start:start + self.batch_size]:
                try:
                    arrays.append(self.preprocess(path))
                    records.append({"file": str(path)})
                except DataError as exc:
                    log.warning("skipping: %s", exc)
                    records.append({"file": str(path), "error": str(exc)})
            rows = iter(self.rank(np.stack(arrays), top_k, reject_below)) if arrays else None
            for record in records:
                if "error" not in record:
                    record.update(next(rows))
                yield record

    def rank(self, batch, top_k=5, reject_below=None):
        """{"class_ids", "scores", "label_names"} of each preprocessed image
        in `batch` [N, 3, S, S]: the calibrated probabilities, best first
        (what predict_paths and the HTTP service answer)."""
        top_k = min(top_k, len(self.class_names))
        return [self._ranked(row, top_k, reject_below)
                for row in softmax(self.logits(batch), self.temperature)]

    def _ranked(self, probabilities, top_k, reject_below=None):
        ids = np.argsort(-probabilities, kind="stable")[:top_k]
        names = [self.class_names[i] for i in ids]
        if reject_below is not None and probabilities[ids[0]] < reject_below:
            names[0] = UNKNOWN_LABEL
        return {"class_ids": [int(i) for i in ids], "scores": [float(probabilities[i]) for i in ids],
                "label_names": names}


def _require_shape(batch, size):
    if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
        raise ValueError(f"expected a batch of shape [N, 3, {size}, {size}], got {list(batch.shape)}")


def list_inputs(path):
    """Image paths named by --input: one image, a folder (recursively, in sorted
    order, image extensions only) or a .txt list of paths, one per line and
    optionally followed by a label (ignored); relative paths in a list are
    relative to the list's folder, as for ListFile datasets."""
    path = Path(path)
    if path.is_dir():
        images = list(find_images(path))
        if not images:
            raise DataError(f"--input {path}: no images in this folder or below")
        return images
    if not path.exists():
        raise DataError(f"--input {path} does not exist")
    if path.suffix.lower() != ".txt":
        return [str(path)]
    images = []
    for _, line in read_lines(path):
        parts = line.rsplit(maxsplit=1)
        # A trailing integer is a label, unless the whole line names a file (a path with a space).
        if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not (path.parent / line).exists():
            line = parts[0]
        images.append(str(path.parent / line))
    if not images:
        raise DataError(f"--input {path}: the list names no images")
    return images


def evaluate_folder(predictor, root, topk=(1, 5)):
    """Accuracy of the exported model on a labelled ImageFolder: the metrics
    `paddle-tl eval` prints for the same folder (same decoding, preprocessing,
    class mapping through the yml's class names, and metric code)."""
    logits, labels = folder_logits(predictor, root)
    return dict(classification_metrics(logits, labels, predictor.meta["class_names"], topk), tta=predictor.tta)


def folder_logits(predictor, root):
    """(logits [N, num_classes], labels [N]) of a labelled ImageFolder, as
    Predictor.logits gives them (test-time augmentation included); a class
    folder whose name is not one of the model's classes is a DataError."""
    dataset = build_dataset(DatasetConfig(name="ImageFolder", root=str(root)), "eval", predictor.transform,
                            class_names=predictor.meta["class_names"])
    if not len(dataset):
        raise DataError(f"--input {root}: no readable images to evaluate")
    batches = np.array_split(np.arange(len(dataset)), math.ceil(len(dataset) / predictor.batch_size))
    logits = [predictor.logits(np.stack([dataset[int(i)][0] for i in batch])) for batch in batches]
    return np.concatenate(logits), np.array([label for _, label in dataset.samples])


def time_batches(run, batches, warmup=2):
    """Seconds each call run(batch) takes, over `batches` in order, after
    `warmup` untimed calls on the first: the first calls of a shape pick
    kernels and allocate (oneDNN primitives, onnxruntime arenas)."""
    for _ in range(warmup):
        run(batches[0])
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - started)
    return np.array(seconds)


def benchmark(predictor, paths, runs=20):
    """Model latency (p50/p95 ms) and throughput (images/s) at batch 1 and at
    the predictor's batch size, over the readable inputs, repeated when there
    are fewer than a batch. Decoding and preprocessing are not in the latency;
    their cost per image is reported beside it."""
    wanted = min(len(paths), BENCHMARK_MAX_IMAGES, runs * predictor.batch_size)
    started, arrays = time.perf_counter(), []
    for path in paths[:wanted]:
        try:
            arrays.append(predictor.preprocess(path))
        except DataError as exc:
            log.warning("skipping: %s", exc)
    if not arrays:
        raise DataError(f"--benchmark: none of the {wanted} inputs could be read")
    preprocess_ms = 1000 * (time.perf_counter() - started) / len(arrays)
    images = np.stack(arrays)
    result = {"backend": predictor.backend, "model_dir": str(predictor.model_dir), "tta": predictor.tta,
              "images": len(images),
              "preprocess_ms_per_image": round(preprocess_ms, 2)}
    for size in sorted({1, predictor.batch_size}):
        # Cycle through the images so that each timed batch holds different ones.
        pool = np.resize(images, (max(len(images), size * runs), *images.shape[1:]))
        # logits: with the folder's tta, every view of an image counts in its time.
        seconds = time_batches(predictor.logits, [pool[i * size:(i + 1) * size] for i in range(runs)])
        result[f"batch_{size}"] = {"runs": runs, "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 3),
                                   "p95_ms": round(1000 * float(np.percentile(seconds, 95)), 3),
                                   "images_per_s": round(size * runs / float(seconds.sum()), 2)}
    return result


def open_predictor(model_dir, backend=None, cpu_threads=None):
    """The predictor of an inference folder's task, for the HTTP service:
    Predictor, or tasks/detection/predictor.py's DetectionPredictor."""
    if task_of(read_meta(model_dir)) == CLASSIFICATION:
        return Predictor(model_dir, backend=backend, cpu_threads=cpu_threads)
    if backend not in (None, "paddle"):
        raise ConfigError(f"{model_dir} holds a detection model, which runs with Paddle Inference only; leave out "
                          f"--backend {backend}")
    from paddle_tl.tasks.detection.predictor import DetectionPredictor
    return DetectionPredictor(model_dir, cpu_threads=cpu_threads)


def _parser():
    parser = argparse.ArgumentParser(prog="paddle-tl infer",
                                     description="Predict with an exported inference model (Paddle Inference "
                                                 "or onnxruntime).")
    parser.add_argument("--model_dir", required=True, help="inference folder written by export")
    parser.add_argument("--input", required=True,
                        help="an image, a folder (searched recursively) or a .txt list; with --eval, a folder of "
                             "class sub-folders (a detection model: a VOC folder, or COCO's image folder)")
    parser.add_argument("--top_k", type=positive_int, default=DEFAULT_TOP_K,
                        help=f"classes per image (default {DEFAULT_TOP_K})")
    parser.add_argument("--output", help="also write the JSON lines to this .jsonl file")
    parser.add_argument("--csv", help="also write file, top class, score (and any error) to this .csv file")
    parser.add_argument("--reject_below", type=_probability, metavar="P",
                        help="answer \"unknown\" as the first label name of an image whose top probability "
                             "(calibrated: softmax(logits / temperature)) is below P; above 1 rejects every image")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default=None,
                        help="paddle: Paddle Inference; onnx: onnxruntime on CPU (needs export --onnx); "
                             "default: the folder's (paddle, or what an INT8 folder's inference.yml names)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--cpu_threads", type=positive_int, default=None, help="default: all cores")
    parser.add_argument("--no_mkldnn", action="store_true", help="run without oneDNN on CPU (paddle backend)")
    parser.add_argument("--gpu_mem", type=positive_int, metavar="MB",
                        help=f"--device gpu: initial GPU memory pool (default {GPU_MEMORY_POOL_MB})")
    parser.add_argument("--trt", choices=TRT_PRECISIONS, help="--device gpu: TensorRT subgraphs at this precision")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true",
                      help="evaluate on the labelled folder --input; print top-1, top-k and per-class accuracy "
                           "as one JSON line (a detection model: box AP on a VOC folder's --image_set, or on COCO "
                           "images with --annotation_file, as paddle-tl eval prints it)")
    mode.add_argument("--benchmark", action="store_true",
                      help="time the model at batch 1 and --batch_size; print latency and throughput as one JSON line")
    parser.add_argument("--benchmark_runs", type=positive_int, default=20, help="timed batches per batch size")
    parser.add_argument("--cam", metavar="DIR",
                        help="also write DIR/<image stem>_cam.png: the Grad-CAM heat map of each image's top class "
                             "over it (needs the checkpoint the folder was exported from, or --run)")
    parser.add_argument("--run", metavar="RUN_DIR", help="--cam: the run folder whose best_model was exported "
                                                         "(default: inference.yml's exported_from)")
    detection = parser.add_argument_group("detection models")
    detection.add_argument("--draw", metavar="DIR", help="also write each image with its boxes, class names and "
                                                         "scores drawn to DIR/<its path below --input>.png")
    detection.add_argument("--draw_threshold", type=_probability, default=DRAW_THRESHOLD, metavar="P",
                           help=f"--draw: boxes of score >= P (default {DRAW_THRESHOLD})")
    detection.add_argument("--image_set", default="val",
                           help="--eval on a VOC folder: the split, ImageSets/Main/<split>.txt (default val)")
    detection.add_argument("--annotation_file", metavar="JSON",
                           help="--eval on COCO: the instances json; --input is then its image folder")
    return parser


# Flags that mean something for one kind of model only: given for the other
# kind, they are refused rather than ignored.
DETECTION_ONLY = ("draw", "annotation_file")
CLASSIFICATION_ONLY = ("csv", "reject_below", "backend", "cam", "run", "benchmark", "trt")


def check_task_flags(args, task):
    """Refuse, in one line, the flags of the other task's models."""
    if task == CLASSIFICATION:
        named = [flag for flag in DETECTION_ONLY if getattr(args, flag)]
        named += ["image_set"] if args.image_set != "val" else []
    else:
        named = [flag for flag in CLASSIFICATION_ONLY if getattr(args, flag)]
        named += ["top_k"] if args.top_k != DEFAULT_TOP_K else []
    if named:
        flags = ", ".join(f"--{flag}" for flag in named)
        raise ConfigError(f"{args.model_dir} holds a {task} model ({META_FILE}: task {task}); {flags} "
                          f"{'does' if len(named) == 1 else 'do'} not apply to it")


def cam_network(model_dir, meta, run_dir=None):
    """(network, spec, preprocess) of the dynamic network an inference folder
    was exported from, for Grad-CAM: rebuilt from its checkpoint's record
    (inference.yml's exported_from, or RUN_DIR/best_model)."""
    from paddle_tl.runs import BEST_MODEL
    from paddle_tl.runs.checkpoint import STATE_SUFFIX, read_record
    from paddle_tl.runs.run_folder import rebuild_model

    prefix = str(Path(run_dir) / BEST_MODEL) if run_dir else str(meta.get("exported_from") or "")
    prefix = prefix[: -len(".pdparams")] if prefix.endswith(".pdparams") else prefix
    state_file = Path(prefix + STATE_SUFFIX)
    record = read_record(state_file).get("model") if prefix and state_file.is_file() else None
    if not record:
        problem = "has no network record" if prefix and state_file.is_file() else "is not there"
        raise ConfigError(f"--cam needs the dynamic network: the checkpoint {model_dir} was exported from "
                          f"({prefix or 'not recorded'}) {problem}; keep the run's best_model next to where it was "
                          "exported from, or name its run folder with --run RUN_DIR")
    if list(record["class_names"]) != list(meta["class_names"]):
        raise ConfigError(f"--cam: {prefix} has classes {record['class_names']}, {model_dir} "
                          f"{meta['class_names']}: not the checkpoint this folder was exported from")
    network, spec, pre, _ = rebuild_model(record, prefix)
    return network, spec, pre


def reject_threshold(text):
    """--reject_below P (infer.py and the service): a number >= 0 (above 1
    rejects every image); ValueError otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # NaN too
        raise ValueError(f"must be a probability >= 0, got {text}")
    return value


def _probability(text):
    try:
        return reject_threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None):
    """One JSON line per image on stdout (and in --output / --csv); unreadable
    images are reported on stderr and get an "error" line; the run goes on.
    --eval and --benchmark print one JSON object instead."""
    args = _parser().parse_args(argv)
    check_flags("infer", args)  # pairs of flags that cannot go together (flags.py)
    task = task_of(read_meta(args.model_dir))
    check_task_flags(args, task)
    if task != CLASSIFICATION:  # the one place that chooses the predictor by the folder's task
        from paddle_tl.tasks.detection.predictor import run as run_detection
        run_detection(args)
        return
    predictor = Predictor(args.model_dir, device=args.device, cpu_threads=args.cpu_threads,
                          use_mkldnn=not args.no_mkldnn, batch_size=args.batch_size, backend=args.backend,
                          gpu_mem=args.gpu_mem, trt=args.trt)
    if args.eval:
        print(json.dumps(evaluate_folder(predictor, args.input, (1, args.top_k))))
        return
    paths = list_inputs(args.input)
    if args.benchmark:
        print(json.dumps(benchmark(predictor, paths, args.benchmark_runs)))
        return
    if args.cam:  # before any row: a missing checkpoint is refused up front
        from paddle_tl.trust.gradcam import OverlayWriter
        cams = OverlayWriter(*cam_network(args.model_dir, predictor.meta, args.run), args.cam, args.batch_size)
    started, failed = time.perf_counter(), 0
    with ExitStack() as files:
        if args.cam:
            files.enter_context(cams)
        jsonl = _open_output(files, args.output)
        table = csv.writer(_open_output(files, args.csv, newline="")) if args.csv else None
        if table:
            table.writerow(["file", "label_name", "score", "error"])
        for record in predictor.predict_paths(paths, args.top_k, args.reject_below):
            failed += "error" in record
            line = json.dumps(record)
            print(line)
            if jsonl:
                jsonl.write(line + "\n")  # line by line: an interrupted run keeps what it predicted
            if table:
                table.writerow([record["file"], *(("", "", record["error"]) if "error" in record
                                                  else (record["label_names"][0], record["scores"][0], ""))])
            if args.cam and "error" not in record:
                # The class the deployed model ranks first; a folder's sub-folders are kept.
                cams.add(record["file"], record["class_ids"][0],
                         os.path.relpath(Path(record["file"]).parent, args.input) if Path(args.input).is_dir() else "")
    log.info("predicted %d images, %d unreadable, in %.1f s", len(paths) - failed, failed,
             time.perf_counter() - started)


def _open_output(files, path, newline=None):
    if not path:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return files.enter_context(open(path, "w", encoding="utf-8", newline=newline))
