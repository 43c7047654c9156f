"""Test-time augmentation (DataLoader.Eval.tta) and the weight average
(Global.ema_decay) against neither, over seeds, in one run: MobileNetV2
linear probe on cached features, best epoch chosen on the validation split
(the default val_fraction), Eval top-1 of best_model evaluated single-view,
with tta=flip and with tta=flip_crops, training and evaluation seconds.

    python bench/recipes_tta_ema.py [--root ../shared/datasets/hymenoptera] [--seeds 0 1 2] [--epochs 10]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.seed_table import print_seed_table  # noqa: E402
from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine import train as train_module  # noqa: E402
from paddle_tl.engine.evaluate import evaluate  # noqa: E402
from paddle_tl.runs.run_folder import run_config  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"
TRAININGS = {"raw weights": [], "ema 0.9": ["Global.ema_decay=0.9"], "ema 0.99": ["Global.ema_decay=0.99"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--weights", default=str(WEIGHTS), help="ImageNet MobileNetV2 .pdparams")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    train_module.write_report = lambda run_dir: run_dir  # the report is not measured
    rows = {}  # recipe -> [(Eval top-1, train seconds, eval seconds)] per seed
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in TRAININGS.items():
            for seed in args.seeds:
                run_dir = Path(out) / f"{name.replace(' ', '_')}{seed}"
                metrics = train_module.train(load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
                    f"Global.output_dir={run_dir}", f"Global.seed={seed}", f"Global.epochs={args.epochs}",
                    f"Arch.pretrained={args.weights}", "Transfer.strategy=linear_probe",
                    f"DataLoader.Train.dataset.root={args.root}/train",
                    f"DataLoader.Eval.dataset.root={args.root}/val", *overrides]))
                for tta in ("none", "flip", "flip_crops"):
                    started = time.perf_counter()
                    top1 = evaluate(run_config(run_dir, [f"DataLoader.Eval.tta={tta}"]))["top1"]
                    label = name if tta == "none" else f"{name} + tta {tta}"
                    rows.setdefault(label, []).append((top1, metrics["train_seconds"],
                                                       time.perf_counter() - started))
    print_seed_table(f"MobileNetV2 linear probe on cached features, {args.root}, seeds {args.seeds}, "
                     f"{args.epochs} epochs, best epoch chosen on the validation split", "recipe", rows,
                     [("train s mean", ".0f"), ("eval s mean", ".1f")])


if __name__ == "__main__":
    main()
