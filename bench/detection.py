"""Faster R-CNN transfer on a VOC folder (issue 23's goal: raccoon val AP50
>= 0.80 from ImageNet weights within 30 minutes on 2 CPU cores), through
the same entry point as `paddle-tl train`: the shipped detection config,
with any `-o` overrides. Prints one JSON line: Eval AP50 and AP of the
model selected on the validation split, wall seconds of the whole run,
training images per second.

    python bench/detection.py                              # raccoon, the shipped config
    python bench/detection.py -o Global.epochs=4 -o Arch.detector.short_side=384 ...

Needs pycocotools (the `detect` extra) and ../shared/datasets/raccoon.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.tasks.detection.train import train  # noqa: E402

CONFIG = ROOT / "configs" / "faster_rcnn_mobilenet_v2_voc.yaml"
RACCOON = ROOT.parent / "shared" / "datasets" / "raccoon"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=str(CONFIG))
    parser.add_argument("--root", default=str(RACCOON), help="the VOC folder (train and val splits)")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    output = tempfile.mkdtemp(prefix="bench_detection_")
    cfg = load_config(args.config, [f"DataLoader.Train.dataset.root={args.root}",
                                    f"DataLoader.Eval.dataset.root={args.root}",
                                    f"Global.output_dir={output}/run", *args.override])
    started = time.time()
    metrics = train(cfg)
    print(json.dumps({"AP50": round(metrics["bbox_ap50"], 4), "AP": round(metrics["bbox_ap"], 4),
                      "val_AP50": round(metrics.get("val_bbox_ap50", float("nan")), 4),
                      "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs_run"],
                      "wall_seconds": round(time.time() - started, 1),
                      "train_images_per_second": metrics["train_images_per_second"],
                      "config": str(args.config), "overrides": args.override, "run": f"{output}/run"}))


if __name__ == "__main__":
    main()
