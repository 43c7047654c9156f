"""Inference speed of one network under each runner paddle_tl offers, in one
run: the dynamic graph (what `paddle-tl eval` uses), Paddle Inference with
oneDNN on and off, and onnxruntime on CPU (`infer --backend onnx`); images/s
at each batch size, as a Markdown table with ratios to the dynamic graph.

The networks get random weights (paddle_tl.zoo.build_model, nothing to
download): speed does not depend on the weights' values. All runners use every
core.

    python bench/inference.py [--archs mobilenet_v2 resnet50] [--batch_sizes 1 32] [--seconds 3]
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paddle_tl.runtime import import_paddle  # noqa: E402
from paddle_tl.deploy.export import save_onnx  # noqa: E402
from paddle_tl.models.static import PARAMS_FILE, save_static
from paddle_tl.models.static import StaticModel  # noqa: E402
from paddle_tl.predict.predictor import OnnxModel, import_onnx_package, time_batches
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402

paddle = import_paddle()
NUM_CLASSES = 10  # a fine-tuned head; its size does not matter for speed
MIN_RUNS, MAX_RUNS = 3, 200


def runners(arch, folder, max_batch):
    """(name, run(batch) -> logits) for each way of running `arch`."""
    network = build_model(arch, NUM_CLASSES)
    network.eval()
    size = get_spec(arch).input_size
    model_file = save_static(network, size, folder)
    onnx_file = save_onnx(folder, model_file)

    def dynamic(batch):
        with paddle.no_grad():
            return network(paddle.to_tensor(batch)).numpy()

    static = [StaticModel(folder / model_file, folder / PARAMS_FILE, use_mkldnn=mkldnn, batch_size=max_batch)
              for mkldnn in (True, False)]
    onnx = OnnxModel(folder / onnx_file, batch_size=max_batch)
    return size, [("dynamic graph", dynamic), ("Paddle Inference, oneDNN", static[0].run),
                  ("Paddle Inference, no oneDNN", static[1].run), ("onnxruntime (CPU)", onnx.run)]


def images_per_second(run, batch, seconds):
    """Median speed over as many runs as fit in about `seconds` (at least
    MIN_RUNS), after one warm-up run; the first timed run sets the count."""
    first = time_batches(run, [batch], warmup=1)
    more = min(MAX_RUNS, max(MIN_RUNS, math.ceil(seconds / first[0]))) - 1
    seconds_per_run = np.concatenate([first, time_batches(run, [batch] * more, warmup=0)])
    return len(batch) / float(np.median(seconds_per_run))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (about)")
    args = parser.parse_args()
    ort = import_onnx_package("onnxruntime")
    started, load = time.time(), os.getloadavg()[0]
    rows = []
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as tmp:
            size, ways = runners(arch, Path(tmp), max(args.batch_sizes))
            for batch_size in args.batch_sizes:
                batch = np.random.RandomState(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
                speeds = [images_per_second(run, batch, args.seconds) for _, run in ways]
                for (name, _), speed in zip(ways, speeds):
                    rows.append(f"| {arch} | {batch_size} | {name} | {speed:.1f} | {speed / speeds[0]:.2f}x |")
                print("\n".join(rows[-len(ways):]), flush=True)
    print(f"\n{os.cpu_count()} cores, paddle {paddle.__version__}, onnxruntime {ort.__version__}, random weights, "
          f"{NUM_CLASSES} classes; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{time.time() - started:.0f} s\n")
    print("| network | batch | runner | images/s | vs dynamic graph |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
