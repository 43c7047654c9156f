"""Recipes side by side on ants/bees and elpv (binary and four-class), at
224 px, in one run: `auto` that measures its candidates (the default),
`auto` by the four-quadrant rule alone (Transfer.auto_budget_minutes=0),
and a cached linear probe, all from the shipped
configs/mobilenet_v2_imagefolder.yaml (MobileNetV2, torchvision's ImageNet
weights from the pip package install.sh installs, 10 epochs, val_fraction
0.1).

Prints, per dataset and recipe: what trained, Eval top-1 of the selected
model, its validation top-1, wall seconds of the whole run (measuring,
caching, training, calibration and report included), trainable
parameters, and what auto measured.

    python bench/recipes.py [--data ants elpv elpv4] [--only auto rule linear_probe]
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
ANTS = REPO.parent / "shared" / "datasets" / "hymenoptera"
DATA = {
    "ants": [f"DataLoader.Train.dataset.root={ANTS / 'train'}", f"DataLoader.Eval.dataset.root={ANTS / 'val'}"],
    "elpv": ["DataLoader.Train.dataset={name: elpv, label_mode: binary}",
             "DataLoader.Eval.dataset={name: elpv, label_mode: binary}"],
    "elpv4": ["DataLoader.Train.dataset={name: elpv, label_mode: four_class}",
              "DataLoader.Eval.dataset={name: elpv, label_mode: four_class}"],
}
RECIPES = {
    "auto": ["Transfer.strategy=auto"],
    "rule": ["Transfer.strategy=auto", "Transfer.auto_budget_minutes=0"],
    "linear_probe": ["Transfer.strategy=linear_probe"],
}


def run(data, recipe, folder, extra):
    cfg = load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={folder / f'{data}-{recipe}'}", "Arch.input_size=224", *DATA[data], *RECIPES[recipe],
        *extra])
    started = time.time()
    metrics = train(cfg)
    return metrics, time.time() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="*", choices=list(DATA), default=list(DATA))
    parser.add_argument("--only", nargs="*", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("-o", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for recipe in args.only:
                metrics, seconds = run(data, recipe, Path(tmp), args.overrides)
                rows.append((data, recipe, metrics, seconds))
                _print(rows)


def _print(rows):
    print("\n| data | recipe | trained | epochs | Eval top-1 | val top-1 | wall s | trainable params | auto measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for data, recipe, m, seconds in rows:
        strategy = m["strategy"]
        trained = strategy["strategy"] + (" (cached features)" if strategy["cached_features"] else "") + (
            f" (cached activations at stage {strategy['cached_activations']['boundary']})"
            if strategy["cached_activations"] else "")
        measured = ", ".join(f"{c['name']} {c['val_top1']:.3f} ({c['epochs']} epochs, {c['seconds']:.0f} s)"
                             if "val_top1" in c else
                             f"{c['name']} skipped" for c in strategy.get("candidates") or [])
        val = f"{m['val_top1']:.4f}" if m.get("val_top1") is not None else "–"
        print(f"| {data} | {recipe} | {trained} | {m['epochs_run']} | {m['best_top1']:.4f} | {val} | {seconds:.0f} | "
              f"{m['trainable_params']:,} | {measured or '–'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
