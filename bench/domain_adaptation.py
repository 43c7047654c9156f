"""Unsupervised domain adaptation on elpv, in one run: source-only training
against MMD and DANN, from monocrystalline to polycrystalline cells and back
(configs/elpv_mono_to_poly.yaml and configs/elpv_poly_to_mono.yaml).
The target's labels are used only to score the final model (last epoch, not
the best: choosing an epoch by target labels is not possible in a real
unsupervised setting). Prints target top-1, balanced accuracy and macro-F1.

    python bench/domain_adaptation.py [--epochs 6] [--input_size 128] [--methods none mmd dann]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine.evaluate import evaluate  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = ("mono_to_poly", "poly_to_mono")  # configs/elpv_<direction>.yaml


def run(direction, method, args, folder):
    output = folder / f"{direction}_{method}"
    overrides = [
        f"Global.output_dir={output}", f"Global.epochs={args.epochs}", f"Global.seed={args.seed}",
        f"Arch.input_size={args.input_size}", f"Transfer.domain_adaptation={method}"]
    config = REPO / "configs" / f"elpv_{direction}.yaml"
    started = time.time()
    train(load_config(config, overrides))
    seconds = time.time() - started
    final = evaluate(load_config(config, overrides + [f"Global.pretrained_model={output / 'latest'}"]))
    return final, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--methods", nargs="*", choices=["none", "mmd", "dann"], default=["none", "mmd", "dann"])
    parser.add_argument("--directions", nargs="*", choices=DIRECTIONS, default=list(DIRECTIONS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for direction in args.directions:
            for method in args.methods:
                final, seconds = run(direction, method, args, Path(tmp))
                rows.append((direction, method, final, seconds))
                print(f"{direction} {method}: target top-1 {final['top1']:.4f}, macro-F1 {final['macro_f1']:.4f} "
                      f"({seconds:.0f} s)", flush=True)
    print(f"\nelpv binary, mobilenet_v2 partial (2 stages frozen), {args.epochs} epochs, input {args.input_size}, "
          f"seed {args.seed}; scores of the last epoch's model on the target's labeled eval split:")
    print("| direction | method | target top-1 | balanced acc. | macro-F1 | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for direction, method, final, seconds in rows:
        print(f"| {direction} | {'source only' if method == 'none' else method} | {final['top1']:.4f} | "
              f"{final['balanced_accuracy']:.4f} | {final['macro_f1']:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
