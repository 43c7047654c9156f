"""INT8 export (`paddle-tl export ... --int8`): post-training static
quantization calibrated on Train images, run by Paddle Inference with oneDNN
INT8, and published only when its Eval top-1 stays within `--max_drop` of the
fp32 model's.

Why Paddle Inference with oneDNN rather than onnxruntime's QDQ quantization:
on the 2-core CPU here (AVX-512 VNNI) it ran the quantized MobileNetV2 two to
three times as fast as onnxruntime ran its own, at the same top-1 and about
the same size (docs/deploy.md, "INT8").

The whole folder is written beside the target under a temporary name and
takes its place only when the gate passes (files.publish_folder, as for any
export), so a refused model, a failure or a kill leaves nothing behind and an
existing folder untouched.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.transforms import eval_transform
from paddle_tl.deploy.export import check_target, file_records, inference_meta
from paddle_tl.errors import ConfigError, DataError, ExportError
from paddle_tl.files import publish_folder
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import PARAMS_FILE, PREFIX, StaticModel, save_static
from paddle_tl.predict.predictor import META_FILE
from paddle_tl.runs.run_folder import trained_model
from paddle_tl.runtime import import_paddle, stderr_lines_dropped

paddle = import_paddle()

QUANTIZATION_FILE = "quantization.json"
# paddle's post-training quantization reads and writes the legacy program format only.
LEGACY_MODEL_FILE = f"{PREFIX}.pdmodel"
# "avg": the mean over calibration batches of each activation's largest |value|.
# It calibrated MobileNetV2 in about a minute on 2 cores; "KL" had not finished after ten.
CALIBRATION_ALGO = "avg"
CALIBRATION_BATCH = 16
# Weights per output channel, activations per tensor; convolutions and the classifier's matmul.
QUANTIZABLE_OPS = ["conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2"]
# Images per batch, for top-1 and the timed images/s; the same for fp32 and INT8, as is the thread count.
EVAL_BATCH = 8
TIMED_BATCHES = 16

META_HEADER = """\
# Written by paddle_tl export --int8. Preprocessing as for any paddle_tl export:
# decode to 8-bit RGB (upright per EXIF), resize the short side to resize_short
# (bilinear), center-crop input_size x input_size, multiply by scale, subtract mean
# and divide by std per channel (channel_order), HWC -> CHW float32. Input "image":
# [N, 3, input_size, input_size] float32; output: logits [N, num_classes].
# precision int8: the model holds quantize/dequantize ops with INT8 weights; run it
# with Paddle Inference on CPU with oneDNN INT8 (Config.enable_mkldnn_int8()).
# quantization.json: fp32 and INT8 accuracy, speed and size, and how it was calibrated.
# files: the size and sha256 of each model file as exported; infer and serve refuse a
# folder whose files differ (torn, or from another export).
"""


def export_int8(cfg, calib_images=200, max_drop=0.01):
    """Write an INT8 inference folder to Global.save_inference_dir and return
    it; raise ExportError, leaving any existing folder as it was, when the
    Eval top-1 drops by more than max_drop."""
    if calib_images < 1:
        raise ConfigError(f"--calib_images must be >= 1, got {calib_images}")
    paddle.set_device("cpu")
    out_dir = check_target(cfg.Global.save_inference_dir)
    network, spec, pre, class_names = trained_model(cfg)
    transform = eval_transform(pre)
    calibration = calibration_images(cfg, transform, class_names, calib_images)
    eval_set = eval_dataset(cfg, transform, class_names)

    def write(staging):
        with tempfile.TemporaryDirectory(prefix="paddle_tl_fp32_") as fp32_dir:
            fp32_dir = Path(fp32_dir)
            _save_legacy_static(network, pre.input_size, fp32_dir)
            started = time.perf_counter()
            _quantize(fp32_dir, staging, calibration)
            calibration_seconds = time.perf_counter() - started
            report = _compare(fp32_dir, staging, eval_set, class_names)
            report["fp32_size_bytes"] = _model_bytes(fp32_dir)
        report.update({
            "int8_size_bytes": _model_bytes(staging),
            "backend": "paddle",
            "runtime": f"Paddle Inference {paddle.__version__}, CPU, oneDNN INT8",
            "method": f"post-training static quantization (paddle.static.quantization.PostTrainingQuantization, "
                      f"algo {CALIBRATION_ALGO}; weights INT8 per output channel, activations INT8 per tensor; "
                      f"ops {', '.join(QUANTIZABLE_OPS)})",
            "calibration_images": len(calibration),
            "calibration_source": "Train split, evenly spaced over the sorted samples, eval preprocessing",
            "calibration_seconds": round(calibration_seconds, 1),
            "max_drop": max_drop,
            "exported_from": str(cfg.Global.pretrained_model),
        })
        if report["drop"] > max_drop + 1e-9:
            raise ExportError(f"INT8 top-1 {report['int8_top1']:.4f} against fp32 top-1 {report['fp32_top1']:.4f} "
                              f"on {report['eval_images']} Eval images: a drop of {report['drop']:.4f} exceeds "
                              f"--max_drop {max_drop}; nothing was written to {out_dir}")
        meta = {**inference_meta(cfg, spec, pre, class_names, LEGACY_MODEL_FILE),
                "precision": "int8", "backend": "paddle", "quantization_file": QUANTIZATION_FILE,
                "files": file_records(staging, [LEGACY_MODEL_FILE, PARAMS_FILE])}
        (staging / META_FILE).write_text(META_HEADER + yaml.safe_dump(meta, sort_keys=False))
        (staging / QUANTIZATION_FILE).write_text(json.dumps(report, indent=1) + "\n")
        return report

    report = publish_folder(out_dir, write, what="Global.save_inference_dir")
    print(f"INT8 top-1 {report['int8_top1']:.4f} (fp32 {report['fp32_top1']:.4f}, drop {report['drop']:.4f} "
          f"<= {max_drop}); {report['int8_images_per_second']:.1f} images/s (fp32 "
          f"{report['fp32_images_per_second']:.1f}); {report['int8_size_bytes']:,} bytes (fp32 "
          f"{report['fp32_size_bytes']:,})")
    print(f"exported {spec.name} INT8 ({len(class_names)} classes) to {out_dir}")
    return out_dir


def calibration_images(cfg, transform, class_names, count):
    """Up to `count` Train images [N, 3, S, S], evenly spaced over the sorted
    samples (so over the classes), preprocessed as for evaluation."""
    dataset = _split(cfg.DataLoader.Train.dataset, "train", transform, class_names, "calibrates on the Train split")
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    return np.stack([dataset[int(i)][0] for i in picks])


def eval_dataset(cfg, transform, class_names):
    """The Eval split the gate measures top-1 on."""
    return _split(cfg.DataLoader.Eval.dataset, "eval", transform, class_names,
                  "measures the accuracy drop on the Eval split")


def _split(dataset_cfg, side, transform, class_names, use):
    try:
        dataset = build_dataset(dataset_cfg, side, transform, class_names=class_names)
    except DataError as exc:
        raise ExportError(f"--int8 {use}, which is unavailable: {exc}") from exc
    if not len(dataset):
        raise ExportError(f"--int8 {use}, which has no readable images")
    return dataset


def _save_legacy_static(network, input_size, folder):
    """The fp32 network as a legacy program (inference.pdmodel), the only form
    paddle's post-training quantization reads."""
    from paddle.pir_utils import DygraphOldIrGuard
    with DygraphOldIrGuard(), stderr_lines_dropped(EXECUTOR_START):
        model_file = save_static(network, input_size, folder)
    if model_file != LEGACY_MODEL_FILE:
        raise ExportError(f"paddle {paddle.__version__} saved {model_file}, not the legacy {LEGACY_MODEL_FILE} "
                          "that post-training quantization needs")


class _CalibrationBatches:
    """What PostTrainingQuantization iterates: feed dicts, with a length."""

    def __init__(self, images):
        self.images = images

    def __call__(self):
        for start in range(0, len(self.images), CALIBRATION_BATCH):
            yield {"image": self.images[start:start + CALIBRATION_BATCH]}

    def __len__(self):
        return -(-len(self.images) // CALIBRATION_BATCH)


# What the legacy save and the calibration print on stderr: the old-IR
# executor's start (a glog INFO line) and PostTrainingQuantization's tqdm
# bars, redrawn with carriage returns into a log too.
EXECUTOR_START = "New Executor is Running"
PTQ_BARS = ("Sampling stage, Run batch:", "Adding quant op with weight:", "Adding quant activation op:")


def _quantize(fp32_dir, out_dir, images):
    """Calibrate the fp32 model in fp32_dir on `images` and write the INT8
    model (quantize/dequantize ops, INT8 weights) to out_dir."""
    from paddle.pir_utils import OldIrGuard
    from paddle.static.quantization import PostTrainingQuantization
    scope = paddle.static.Scope()
    # On a terminal the bars show calibration's progress (held back, they would not).
    dropped = () if sys.stderr.isatty() else (EXECUTOR_START, *PTQ_BARS)
    with OldIrGuard(), paddle.static.scope_guard(scope), stderr_lines_dropped(*dropped):
        ptq = PostTrainingQuantization(
            executor=paddle.static.Executor(paddle.CPUPlace()), scope=scope, model_dir=str(fp32_dir),
            model_filename=LEGACY_MODEL_FILE, params_filename=PARAMS_FILE,
            data_loader=_CalibrationBatches(images), batch_size=CALIBRATION_BATCH, algo=CALIBRATION_ALGO,
            quantizable_op_type=QUANTIZABLE_OPS, weight_quantize_type="channel_wise_abs_max",
            onnx_format=True)  # quantize_linear/dequantize_linear with INT8 weights: a quarter of the size
        ptq.quantize()
        ptq.save_quantized_model(str(out_dir), model_filename=LEGACY_MODEL_FILE, params_filename=PARAMS_FILE)


def _compare(fp32_dir, int8_dir, dataset, class_names):
    """Top-1 of both models on the Eval images, and their throughput (images/s,
    model only) at the same batch size and thread count."""
    threads = os.cpu_count() or 1
    models = {"fp32": StaticModel(fp32_dir / LEGACY_MODEL_FILE, fp32_dir / PARAMS_FILE, cpu_threads=threads,
                                  batch_size=EVAL_BATCH),
              "int8": StaticModel(int8_dir / LEGACY_MODEL_FILE, int8_dir / PARAMS_FILE, cpu_threads=threads,
                                  batch_size=EVAL_BATCH, int8=True)}
    logits = {name: [] for name in models}
    timing_pool = []
    for start in range(0, len(dataset), EVAL_BATCH):
        batch = np.stack([dataset[i][0] for i in range(start, min(start + EVAL_BATCH, len(dataset)))])
        if len(timing_pool) < TIMED_BATCHES:  # the images to time: up to the number of timed batches
            timing_pool.append(batch)
        for name, model in models.items():
            logits[name].append(model.run(batch))
    labels = np.array([label for _, label in dataset.samples])
    top1 = {name: classification_metrics(np.concatenate(chunks), labels, class_names, (1,))["top1"]
            for name, chunks in logits.items()}
    correct = {name: int(round(value * len(labels))) for name, value in top1.items()}
    report = {"fp32_top1": top1["fp32"], "int8_top1": top1["int8"],
              "drop": (correct["fp32"] - correct["int8"]) / len(labels), "eval_images": len(labels),
              "top1_agreement": float(np.mean(np.concatenate(logits["fp32"]).argmax(1)
                                              == np.concatenate(logits["int8"]).argmax(1)))}
    report.update(throughput({name: model.run for name, model in models.items()}, np.concatenate(timing_pool)))
    report.update({"batch_size": EVAL_BATCH, "cpu_threads": threads, "timed_images": TIMED_BATCHES * EVAL_BATCH})
    return report


def throughput(runs, images):
    """{name}_images_per_second of each runs[name](batch) over TIMED_BATCHES full batches of Eval images
    (cycled when there are fewer), after one untimed batch that builds the
    oneDNN primitives; the models take turns batch by batch, so that a change
    in the machine's load hits all alike."""
    pool = np.resize(images, (max(len(images), TIMED_BATCHES * EVAL_BATCH), *images.shape[1:]))
    batches = [pool[i * EVAL_BATCH:(i + 1) * EVAL_BATCH] for i in range(TIMED_BATCHES)]
    seconds = dict.fromkeys(runs, 0.0)
    for run in runs.values():
        run(batches[0])
    for batch in batches:
        for name, run in runs.items():
            began = time.perf_counter()
            run(batch)
            seconds[name] += time.perf_counter() - began
    return {f"{name}_images_per_second": round(TIMED_BATCHES * EVAL_BATCH / seconds[name], 2) for name in runs}


def _model_bytes(folder):
    return sum((folder / name).stat().st_size for name in (LEGACY_MODEL_FILE, PARAMS_FILE))
