"""Linear head against the MLP head (Arch.head) on a frozen body's cached
features, over seeds, in one run: Eval top-1 of the epoch chosen on the
validation split, and seconds.

    python bench/heads.py [--root ../shared/datasets/hymenoptera] [--seeds 0 1 2] [--epochs 10]
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.seed_table import print_seed_table  # noqa: E402
from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine import train as train_module  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    train_module.write_report = lambda run_dir: run_dir  # the report is not measured
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for head in ("linear", "mlp"):
            for seed in args.seeds:
                metrics = train_module.train(load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
                    f"Global.output_dir={out}/{head}{seed}", f"Global.seed={seed}", f"Global.epochs={args.epochs}",
                    "Transfer.strategy=linear_probe", f"Arch.head.type={head}",
                    f"DataLoader.Train.dataset.root={args.root}/train", f"DataLoader.Eval.dataset.root={args.root}/val"]))
                rows.setdefault(head, []).append((metrics["best_top1"], metrics["val_top1"], metrics["train_seconds"]))
    print_seed_table(f"MobileNetV2 linear probe on cached features, {args.root}, seeds {args.seeds}, "
                     f"{args.epochs} epochs", "head", rows, [("val top-1 mean", ".4f"), ("seconds mean", ".0f")])


if __name__ == "__main__":
    main()
