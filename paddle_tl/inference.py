"""Prediction with Paddle Inference from an exported inference folder
(`paddle-tl infer`, `tools/infer.py`).

The folder holds the static model and `inference.yml`; preprocessing is rebuilt
from the yml with the very transform evaluation uses, so a deployed prediction
matches `paddle-tl eval` image for image.
"""

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import yaml

from paddle_tl.backend import import_paddle
from paddle_tl.config import ConfigError
from paddle_tl.data import DataError, _find_images, _read_lines, load_rgb
from paddle_tl.errors import UserError
from paddle_tl.transforms import Preprocess, eval_transform

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

META_FILE = "inference.yml"
# What EvalTransform does beyond Preprocess's own fields; written into
# inference.yml for deployers, and refused when a yml asks for anything else.
FIXED_PREPROCESS = {"interpolation": "bilinear", "scale": 1 / 255}
# Initial GPU memory pool; Paddle Inference grows it on demand.
GPU_MEMORY_POOL_MB = 256


class ExportError(UserError, RuntimeError):
    """An inference folder that cannot be written, verified or read. Defined
    here rather than in export.py, which imports this module."""


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
    return meta


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


def softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class StaticModel:
    """A static model run by Paddle Inference: float32 batches in, outputs out.
    Loaded once and reusable; oneDNN on CPU by default."""

    def __init__(self, model_file, params_file, device="cpu", cpu_threads=None, use_mkldnn=True, batch_size=8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        config = paddle.inference.Config(str(model_file), str(params_file))
        if device == "gpu":
            if not paddle.device.is_compiled_with_cuda():
                raise ConfigError("device gpu: this paddle build has no CUDA support (install paddlepaddle-gpu, "
                                  "or use --device cpu)")
            config.enable_use_gpu(GPU_MEMORY_POOL_MB, 0)
        elif device == "cpu":
            config.disable_gpu()
            if use_mkldnn:
                config.enable_mkldnn()
            else:
                config.disable_mkldnn()
            config.set_cpu_math_library_num_threads(cpu_threads or os.cpu_count() or 1)
        else:
            raise ConfigError(f"device {device!r}: expected cpu or gpu")
        config.disable_glog_info()
        self._predictor = paddle.inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def run(self, batch):
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = np.ascontiguousarray(batch[start:start + self.batch_size], dtype=np.float32)
            self._input.reshape(list(chunk.shape))
            self._input.copy_from_cpu(chunk)
            self._predictor.run()
            outputs.append(self._output.copy_to_cpu())
        return np.concatenate(outputs)


class Predictor:
    """A loaded inference folder, reusable for any number of predictions."""

    def __init__(self, model_dir, device="cpu", cpu_threads=None, use_mkldnn=True, batch_size=8):
        self.model_dir = model_dir = Path(model_dir)
        self.meta = meta = read_meta(model_dir)
        self.batch_size = batch_size
        self.pre = preprocess_from_meta(meta["preprocess"], model_dir / META_FILE)
        self.transform = eval_transform(self.pre)
        # Outputs beyond the named classes (Arch.num_classes above the data's) keep their index as name.
        names = list(meta["class_names"])
        self.class_names = names + [str(i) for i in range(len(names), meta["num_classes"])]
        self._model = StaticModel(model_dir / meta["model_file"], model_dir / meta["params_file"], device,
                                  cpu_threads, use_mkldnn, batch_size)
        # The first run builds kernels (oneDNN primitives, CUDA contexts); pay that here, not on image one.
        size = self.pre.input_size
        self.predict_arrays(np.zeros((1, 3, size, size), np.float32))

    def preprocess(self, path):
        """float32 CHW of one image file, exactly as evaluation prepares it.
        Raises DataError when the file cannot be decoded."""
        return self.transform(load_rgb(path))

    def predict_arrays(self, batch):
        """Logits [N, num_classes] of preprocessed images [N, 3, S, S]."""
        size = self.pre.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ValueError(f"expected a batch of shape [N, 3, {size}, {size}], got {list(batch.shape)}")
        return self._model.run(batch)

    def predict_paths(self, paths, top_k=5):
        """One record per path, in order: {"file", "class_ids", "scores",
        "label_names"} best first (scores are softmax probabilities), or
        {"file", "error"} for an image that cannot be read."""
        top_k = min(top_k, len(self.class_names))
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
            probabilities = iter(softmax(self.predict_arrays(np.stack(arrays)))) if arrays else None
            for record in records:
                if "error" not in record:
                    record.update(self._ranked(next(probabilities), top_k))
                yield record

    def _ranked(self, probabilities, top_k):
        ids = np.argsort(-probabilities, kind="stable")[:top_k]
        return {"class_ids": [int(i) for i in ids], "scores": [float(probabilities[i]) for i in ids],
                "label_names": [self.class_names[i] for i in ids]}


def list_inputs(path):
    """Image paths named by --input: one image, a folder (recursively, in sorted
    order, image extensions only) or a .txt list of paths, one per line and
    optionally followed by a label (ignored); relative paths in a list are
    relative to the list's folder, as for ListFile datasets."""
    path = Path(path)
    if path.is_dir():
        images = list(_find_images(path))
        if not images:
            raise DataError(f"--input {path}: no images in this folder or below")
        return images
    if not path.exists():
        raise DataError(f"--input {path} does not exist")
    if path.suffix.lower() != ".txt":
        return [str(path)]
    images = []
    for _, line in _read_lines(path):
        parts = line.rsplit(maxsplit=1)
        # A trailing integer is a label, unless the whole line names a file (a path with a space).
        if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not (path.parent / line).exists():
            line = parts[0]
        images.append(str(path.parent / line))
    if not images:
        raise DataError(f"--input {path}: the list names no images")
    return images


def _parser():
    parser = argparse.ArgumentParser(prog="paddle-tl infer",
                                     description="Predict with an exported inference model (Paddle Inference).")
    parser.add_argument("--model_dir", required=True, help="inference folder written by export")
    parser.add_argument("--input", required=True, help="an image, a folder (searched recursively) or a .txt list")
    parser.add_argument("--top_k", type=_positive_int, default=5, help="classes per image (default 5)")
    parser.add_argument("--output", help="also write the JSON lines to this .jsonl file")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch_size", type=_positive_int, default=8)
    parser.add_argument("--cpu_threads", type=_positive_int, default=None, help="default: all cores")
    parser.add_argument("--no_mkldnn", action="store_true", help="run without oneDNN on CPU")
    return parser


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None):
    """One JSON line per image on stdout (and in --output); unreadable images
    are reported on stderr and get an "error" line; the run goes on."""
    args = _parser().parse_args(argv)
    predictor = Predictor(args.model_dir, device=args.device, cpu_threads=args.cpu_threads,
                          use_mkldnn=not args.no_mkldnn, batch_size=args.batch_size)
    paths = list_inputs(args.input)
    output = None
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        output = open(args.output, "w", encoding="utf-8")
    started, failed = time.perf_counter(), 0
    try:
        for record in predictor.predict_paths(paths, args.top_k):
            failed += "error" in record
            line = json.dumps(record)
            print(line)
            if output:
                output.write(line + "\n")  # line by line: an interrupted run keeps what it predicted
    finally:
        if output:
            output.close()
    log.info("predicted %d images, %d unreadable, in %.1f s", len(paths) - failed, failed,
             time.perf_counter() - started)
