"""INT8 against fp32, in one run: `export --int8` (paddle's post-training
quantization, Paddle Inference with oneDNN INT8) of two families trained on
ants/bees, MobileNetV2 and EfficientNet-Lite0 (made for integer inference:
ReLU6, no squeeze-excitation), and of ResNet50 with random weights (speed and
size only: its top-1 means nothing, and ResNet50 ImageNet weights are not
available offline). One Markdown table from each network's quantization.json
(top-1, drop, sizes, batch-8 images/s) with the INT8/fp32 ratios, and the
batch-1 latency of the fp32 export (`paddle-tl export`) against the INT8 one,
both through the Predictor, taking turns image by image so that a change in
the machine's load hits both alike.

Where onnxruntime's quantization tools import (they need `ml_dtypes`), a second
table puts the alternative beside it for MobileNetV2: onnxruntime static QDQ
quantization (per-channel weights) of the same model's inference.onnx,
calibrated on the same images, all four runners timed in turn at the same
batch size and threads.

    python bench/int8.py [--archs mobilenet_v2 efficientnet_lite0 resnet50] [--run ARCH=RUN_DIR ...]
                         [--epochs 3] [--calib_images 200] [--latency_runs 64]

The trained networks (configs/mobilenet_v2_imagefolder.yaml on
../shared/datasets/hymenoptera, RECIPES below): mobilenet_v2 with
Global.epochs=EPOCHS (the config's strategy `auto` picks how to train;
the table names what it picked); efficientnet_lite0 from its ImageNet
weights as a linear probe (the config's 10 epochs). --run reuses a finished
run folder of that network instead of training one.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.data.transforms import eval_transform  # noqa: E402
from paddle_tl.deploy import quantize  # noqa: E402
from paddle_tl.deploy.export import export  # noqa: E402
from paddle_tl.models.zoo import build_model  # noqa: E402
from paddle_tl.predict.predictor import OnnxModel, Predictor, time_batches  # noqa: E402
from paddle_tl.runs import METRICS_FILE  # noqa: E402
from paddle_tl.runs.checkpoint import save_checkpoint  # noqa: E402
from paddle_tl.runs.run_folder import run_config, trained_model  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402

paddle = import_paddle()
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
DATA = [f"DataLoader.Train.dataset.root={HYMENOPTERA / 'train'}", f"DataLoader.Eval.dataset.root={HYMENOPTERA / 'val'}"]


# How each trained network is trained (overrides of configs/mobilenet_v2_imagefolder.yaml);
# "{epochs}" is --epochs. Other networks get random weights.
RECIPES = {
    "mobilenet_v2": ["Global.epochs={epochs}"],
    "efficientnet_lite0": ["Arch.name=efficientnet_lite0", "Arch.pretrained=imagenet",
                           "Transfer.strategy=linear_probe"],
}


def trained_run(work, arch, epochs):
    from paddle_tl.engine.train import train
    out = work / f"{arch}_run"
    train(load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml",
                      [f"Global.output_dir={out}", *(o.format(epochs=epochs) for o in RECIPES[arch]), *DATA]))
    return out


def random_run(work, arch):
    """A run folder holding `arch` with random weights and an ants/bees head."""
    out = work / f"{arch}_random"
    out.mkdir()
    paddle.seed(0)
    network = build_model(arch, 2)
    save_checkpoint(out / "best_model", network, state={"class_names": ["ants", "bees"]})
    return out


def megabytes(size):
    return f"{size / 1e6:.2f}"


def onnxruntime_comparison(run, work, calib_images, int8_dir):
    """Rows (runner, top-1, MB, images/s) for Paddle Inference fp32/INT8 and
    onnxruntime fp32/QDQ INT8 of the same model, or the reason it cannot run."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        return f"onnxruntime.quantization does not import here ({exc})"
    fp32_dir = work / "fp32_onnx"
    cfg = run_config(run, [f"Global.save_inference_dir={fp32_dir}", *DATA])
    export(cfg, onnx=True)
    _, _, pre, class_names = trained_model(cfg)
    transform = eval_transform(pre)
    calibration = quantize.calibration_images(cfg, transform, class_names, calib_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, -(-len(calibration) // quantize.CALIBRATION_BATCH)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    ort_int8, prepared = work / "inference.int8.onnx", work / "inference.prepared.onnx"
    started = time.perf_counter()
    # onnxruntime's recommended preparation (graph optimisation, BatchNorm folded into the
    # convolutions): without it quantize_static left the weights in fp32 and ran slower than fp32.
    # Symbolic shape inference is skipped: it needs sympy, which is not installed.
    quant_pre_process(str(fp32_dir / "inference.onnx"), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(ort_int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    print(f"onnxruntime quantize_static: {time.perf_counter() - started:.0f} s")
    threads = os.cpu_count() or 1
    models = {"Paddle Inference fp32 (oneDNN)": Predictor(fp32_dir, cpu_threads=threads, batch_size=quantize.EVAL_BATCH),
              "Paddle Inference INT8 (oneDNN)": Predictor(int8_dir, cpu_threads=threads, batch_size=quantize.EVAL_BATCH),
              "onnxruntime fp32": OnnxModel(fp32_dir / "inference.onnx", threads, quantize.EVAL_BATCH),
              "onnxruntime INT8 (QDQ)": OnnxModel(ort_int8, threads, quantize.EVAL_BATCH)}
    runs = {name: (model.predict_arrays if isinstance(model, Predictor) else model.run)
            for name, model in models.items()}
    dataset = quantize.eval_dataset(cfg, transform, class_names)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    labels = np.array([label for _, label in dataset.samples])
    top1 = {name: float((run(images).argmax(1) == labels).mean()) for name, run in runs.items()}
    speed = quantize.throughput(runs, images)
    sizes = {"Paddle Inference fp32 (oneDNN)": sum((fp32_dir / f).stat().st_size
                                                   for f in ("inference.json", "inference.pdiparams")
                                                   if (fp32_dir / f).is_file()),
             "Paddle Inference INT8 (oneDNN)": json.loads((int8_dir / "quantization.json").read_text())["int8_size_bytes"],
             "onnxruntime fp32": (fp32_dir / "inference.onnx").stat().st_size,
             "onnxruntime INT8 (QDQ)": ort_int8.stat().st_size}
    return [(name, top1[name], sizes[name], speed[f"{name}_images_per_second"]) for name in models]


def trained_strategy(run):
    """What the run trained: its metrics.json's strategy (the config's `auto` picks one)."""
    return json.loads((Path(run) / METRICS_FILE).read_text())["strategy"]["strategy"]


def batch1_latency(run, overrides, int8_dir, work, arch, images, runs):
    """Median ms per image at batch 1 of the fp32 export and of the INT8
    folder, through the Predictor, after two untimed runs each; the two take
    turns image by image."""
    fp32_dir = work / f"{arch}_fp32"
    export(run_config(run, [*overrides, f"Global.save_inference_dir={fp32_dir}"]))
    threads = os.cpu_count() or 1
    models = {name: Predictor(folder, cpu_threads=threads, batch_size=1)
              for name, folder in (("fp32", fp32_dir), ("int8", int8_dir))}
    singles = [images[i % len(images)][None] for i in range(runs)]
    for model in models.values():
        time_batches(model.predict_arrays, singles[:1], warmup=2)
    seconds = {name: [] for name in models}
    for single in singles:
        for name, model in models.items():
            seconds[name].extend(time_batches(model.predict_arrays, [single], warmup=0))
    return {name: 1000 * float(np.median(values)) for name, values in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "efficientnet_lite0", "resnet50"])
    parser.add_argument("--run", action="append", default=[], metavar="ARCH=RUN_DIR",
                        help=f"a finished run folder of a trained network ({', '.join(RECIPES)}) "
                             "to use instead of training one; repeatable")
    parser.add_argument("--epochs", type=int, default=3, help="mobilenet_v2's training epochs")
    parser.add_argument("--calib_images", type=int, default=200)
    parser.add_argument("--max_drop", type=float, default=0.01, help="the gate for the trained networks")
    parser.add_argument("--latency_runs", type=int, default=64, help="timed batch-1 runs per model")
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        sys.exit(f"{HYMENOPTERA} is absent (../shared beside the checkout)")
    if any("=" not in item for item in args.run):
        sys.exit("--run takes ARCH=RUN_DIR, e.g. --run mobilenet_v2=output/run1")
    given = dict(item.split("=", 1) for item in args.run)
    if set(given) - set(RECIPES):
        sys.exit(f"--run names {', '.join(sorted(set(given) - set(RECIPES)))}: only {', '.join(RECIPES)} are trained")
    started, load = time.time(), os.getloadavg()
    rows, comparisons = [], []
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as work:
        work = Path(work)
        for arch in args.archs:
            trained = arch in RECIPES
            run = (Path(given[arch]) if arch in given else trained_run(work, arch, args.epochs)) if trained \
                else random_run(work, arch)
            int8_dir = work / f"{arch}_int8"
            # A random run's checkpoint records no network: the config names it.
            overrides = [f"Global.save_inference_dir={int8_dir}", *DATA, *([] if trained else [f"Arch.name={arch}"])]
            cfg = run_config(run, overrides)
            # Random weights: the gate would test nothing, so it is opened wide.
            quantize.export_int8(cfg, args.calib_images, args.max_drop if trained else 1.0)
            report = json.loads((int8_dir / "quantization.json").read_text())
            _, _, pre, class_names = trained_model(cfg)
            dataset = quantize.eval_dataset(cfg, eval_transform(pre), class_names)
            images = np.stack([dataset[i][0] for i in range(min(len(dataset), args.latency_runs))])
            latency = batch1_latency(run, overrides, int8_dir, work, arch, images, args.latency_runs)
            weights = f"ImageNet, {trained_strategy(run)}" if trained else "random (top-1 meaningless)"
            rows.append(f"| {arch} | {weights} | {report['fp32_top1']:.4f} | {report['int8_top1']:.4f} | "
                        f"{report['drop']:+.4f} | {megabytes(report['fp32_size_bytes'])} | "
                        f"{megabytes(report['int8_size_bytes'])} | "
                        f"{report['int8_size_bytes'] / report['fp32_size_bytes']:.2f}x | "
                        f"{report['fp32_images_per_second']:.1f} | {report['int8_images_per_second']:.1f} | "
                        f"{report['int8_images_per_second'] / report['fp32_images_per_second']:.2f}x | "
                        f"{latency['fp32']:.1f} | {latency['int8']:.1f} | "
                        f"{latency['int8'] / latency['fp32']:.2f}x |")
            print(rows[-1], flush=True)
            if arch == "mobilenet_v2":
                comparisons = onnxruntime_comparison(run, work, args.calib_images, int8_dir)
            shutil.rmtree(work / f"{arch}_fp32")  # what a ResNet50 leaves is about 200 MB
    print(f"\n{os.cpu_count()} cores, paddle {paddle.__version__}; batch {quantize.EVAL_BATCH} "
          f"({quantize.TIMED_BATCHES} timed batches) and batch 1 ({args.latency_runs} timed runs), "
          f"{args.calib_images} calibration images; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load)} at start, "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at end; {time.time() - started:.0f} s\n")
    print("| network | weights | fp32 top-1 | INT8 top-1 | drop | fp32 MB | INT8 MB | size INT8/fp32 | "
          "fp32 images/s, batch 8 | INT8 images/s, batch 8 | INT8/fp32 | fp32 ms, batch 1 | INT8 ms, batch 1 | "
          "latency INT8/fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if isinstance(comparisons, str):
        print(f"\nonnxruntime comparison skipped: {comparisons}")
    elif comparisons:
        print("\nmobilenet_v2, the same model and calibration images under both backends:\n")
        print("| runner | top-1 | MB | images/s |")
        print("| --- | --- | --- | --- |")
        for name, top1, size, speed in comparisons:
            print(f"| {name} | {top1:.4f} | {megabytes(size)} | {speed:.1f} |")


if __name__ == "__main__":
    main()
