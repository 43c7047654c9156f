"""Mask R-CNN on the synthetic shapes (issue 23's goal, a benchmark, not a
timed test: box AP50 >= 0.95 and mask AP50 >= 0.90 in under a minute at a
small input size), through the same entry point as `paddle-tl train`: the
shipped configs/mask_rcnn_mobilenet_v2_coco.yaml with small sizes, on a
synthetic COCO set (polygon segmentations) and a held-out synthetic Eval
set of other seeds. Prints one JSON line: Eval box and mask AP50 and AP
of the model selected on the validation split, training and wall seconds.

    python bench/mask_rcnn_synthetic.py
    python bench/mask_rcnn_synthetic.py --images 96 -o Global.epochs=8 ...

Needs pycocotools (the `detect` extra) and ImageNet weights for the body
(default ../shared/weights/mobilenet_v2_imagenet.pdparams).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.tasks.detection.train import train  # noqa: E402
from synthetic_detection import write_coco  # noqa: E402

CONFIG = ROOT / "configs" / "mask_rcnn_mobilenet_v2_coco.yaml"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"
SIZE = (128, 96)
# Small: the images at their own size (96 px shorter side), anchors 16..128 px
# for 12-64 px objects, a narrow FPN and heads, few proposals.
SMALL = ["Arch.detector.short_side=96", "Arch.detector.max_size=128", "Arch.detector.train_short_sides=[96]",
         "Arch.detector.fpn_channels=64", "Arch.detector.representation_size=256",
         "Arch.detector.anchor_sizes=[16, 32, 64, 128]", "Arch.detector.rpn_pre_nms_top_n=[300, 300]",
         "Arch.detector.rpn_post_nms_top_n=[200, 100]", "Arch.detector.rois_per_image=128",
         "Arch.detector.mask_channels=32", "Global.epochs=6", "Global.eval_interval=2", "Global.device=cpu",
         "Optimizer.lr.learning_rate=0.005", "Optimizer.lr.warmup_epochs=1", "Optimizer.lr.warmup_start_lr=0.0001",
         "DataLoader.Train.batch_size=2",
         "DataLoader.Train.val_fraction=0.1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="synthetic training images (less the validation)")
    parser.add_argument("--eval_images", type=int, default=24)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_mask_rcnn_"))
    train_images, train_json, _ = write_coco(folder / "train", args.images, seed=0, size=SIZE)
    eval_images, eval_json, _ = write_coco(folder / "eval", args.eval_images, seed=1000, size=SIZE)
    cfg = load_config(str(CONFIG), [
        *SMALL, f"Arch.pretrained={args.weights}", f"Global.output_dir={folder}/run",
        f"DataLoader.Train.dataset.root={train_images}", f"DataLoader.Train.dataset.annotation_file={train_json}",
        f"DataLoader.Eval.dataset.root={eval_images}", f"DataLoader.Eval.dataset.annotation_file={eval_json}",
        *args.override])
    started = time.time()
    metrics = train(cfg)
    print(json.dumps({"bbox_AP50": round(metrics["bbox_ap50"], 4), "mask_AP50": round(metrics["mask_ap50"], 4),
                      "bbox_AP": round(metrics["bbox_ap"], 4), "mask_AP": round(metrics["mask_ap"], 4),
                      "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs_run"],
                      "train_seconds": round(sum(row["train_seconds"] for row in metrics["history"]), 1),
                      "wall_seconds": round(time.time() - started, 1), "images": metrics["images"],
                      "overrides": args.override, "run": f"{folder}/run"}))


if __name__ == "__main__":
    main()
