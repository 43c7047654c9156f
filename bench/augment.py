"""TrivialAugment (DataLoader.Train.augment.policy=trivial) against the
default augmentation, over seeds, in one run: MobileNetV2 (ImageNet weights)
linear probe on cached features with 4 cached views per training image (the
plain one + 3 augmented, so the policy shapes 3 of them), best epoch chosen
on the validation split; Eval top-1 and training seconds.

    python bench/augment.py [--root ../shared/datasets/hymenoptera] [--seeds 0 1 2] [--epochs 10]
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.seed_table import print_seed_table, train_over_seeds  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"
RECIPES = {"crop + flip (default)": [], "crop + flip + trivial": ["DataLoader.Train.augment.policy=trivial"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args()
    rows = train_over_seeds(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", RECIPES, args.seeds, [
        f"Global.epochs={args.epochs}", f"Arch.pretrained={WEIGHTS}", "Transfer.strategy=linear_probe",
        f"Transfer.cache_views={args.views}", f"DataLoader.Train.dataset.root={args.root}/train",
        f"DataLoader.Eval.dataset.root={args.root}/val"])
    print_seed_table(f"MobileNetV2 linear probe on cached features, {args.views} views, {args.root}, seeds "
                     f"{args.seeds}, {args.epochs} epochs, best epoch chosen on the validation split", "augmentation",
                     rows, [("train s mean", ".0f")])


if __name__ == "__main__":
    main()
