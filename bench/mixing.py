"""mixup and CutMix (DataLoader.Train.augment.mixup / .cutmix) against
plain augmentation, over seeds, in one run: MobileNetV2 (ImageNet weights)
with its top stage fine-tuned (`partial`, 4 of 5 stages frozen) on images
for all three, since mixing needs the images (nothing is cached); best
epoch chosen on the validation split; Eval top-1 and training seconds.

    python bench/mixing.py [--root ../shared/datasets/hymenoptera] [--seeds 0] [--epochs 6]
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.seed_table import print_seed_table, train_over_seeds  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"
RECIPES = {"crop + flip (default)": [], "+ mixup 0.2": ["DataLoader.Train.augment.mixup=0.2"],
           "+ CutMix 1.0": ["DataLoader.Train.augment.cutmix=1.0"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    rows = train_over_seeds(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", RECIPES, args.seeds, [
        f"Global.epochs={args.epochs}", f"Arch.pretrained={WEIGHTS}", "Transfer.strategy=partial",
        "Transfer.freeze_stages=4", "Transfer.cache_features=false", f"DataLoader.Train.dataset.root={args.root}/train",
        f"DataLoader.Eval.dataset.root={args.root}/val"])
    print_seed_table(f"MobileNetV2, top stage fine-tuned on images, {args.root}, seeds {args.seeds}, "
                     f"{args.epochs} epochs, best epoch chosen on the validation split", "augmentation", rows,
                     [("train s mean", ".0f")])


if __name__ == "__main__":
    main()
