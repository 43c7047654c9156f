"""Transfer.head_init: a linear probe whose head starts as built (random)
against one that starts as the logistic regression solved on the cached
features (logistic), over seeds, in one run: the shipped image-folder
config (MobileNetV2, ImageNet weights, 10 epochs at learning rate 0.01,
two cached views), best epoch chosen on the validation split; Eval top-1
per seed and the mean training seconds, for ants/bees, elpv binary and
elpv four-class.

    python bench/head_init.py [--data ants elpv elpv4] [--seeds 0 1 2]
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recipes import DATA  # noqa: E402
from bench.seed_table import print_seed_table, train_over_seeds  # noqa: E402

RECIPES = {"random": ["Transfer.head_init=random"], "logistic": ["Transfer.head_init=logistic"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["ants", "elpv", "elpv4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for data in args.data:
        rows = train_over_seeds(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", RECIPES, args.seeds,
                                ["Transfer.strategy=linear_probe", *DATA[data]])
        print_seed_table(f"{data}: linear probe, seeds {args.seeds}, best epoch chosen on the validation split",
                         "head_init", rows, [("train s mean", ".0f")])


if __name__ == "__main__":
    main()
