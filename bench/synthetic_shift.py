"""Domain adaptation on a synthetic shift (tests/synthetic_shapes.py: shapes
on black as the labeled source, shapes blended into colour textures as the
unlabeled target), over several seeds: source-only training against MMD and
DANN with the same data, seed and budget. The CI test
(tests/test_domain.py::test_adaptation_beats_source_only_on_a_synthetic_shift)
is the seed-0 column. Needs ../shared/weights beside the checkout.

    python bench/synthetic_shift.py [--seeds 0 1 2] [--epochs 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from paddle_tl.engine import train as train_module  # noqa: E402
from paddle_tl.config import load_config  # noqa: E402
from synthetic_shapes import shift_folders, shift_overrides  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"
METHODS = ("none", "mmd", "dann")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        sys.exit(f"needs {WEIGHTS} (../shared beside the checkout)")
    train_module.write_report = lambda run_dir: run_dir  # the report is not measured here
    scores, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = shift_folders(Path(tmp) / "data")
        for seed in args.seeds:
            for method in METHODS:
                run = Path(tmp) / f"{method}_{seed}"
                started = time.time()
                metrics = train_module.train(load_config(None, shift_overrides(
                    folders, run, method, WEIGHTS, seed, args.epochs)))
                scores[method, seed], seconds[method, seed] = metrics["final_top1"], time.time() - started
                print(f"seed {seed} {method}: target top-1 {scores[method, seed]:.4f} "
                      f"({seconds[method, seed]:.0f} s)", flush=True)
    print(f"\nsynthetic shift, mobilenet_v2 partial (2 stages frozen), {args.epochs} epochs, 64 px; target top-1 "
          f"of the last epoch's model on 60 labeled target images (chance 0.333):")
    print("| method | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " | mean gain over source only |")
    print("| --- |" + " --- |" * (len(args.seeds) + 1))
    for method in METHODS:
        gain = sum(scores[method, s] - scores["none", s] for s in args.seeds) / len(args.seeds)
        print(f"| {'source only' if method == 'none' else method} | "
              + " | ".join(f"{scores[method, s]:.4f}" for s in args.seeds)
              + (" | |" if method == "none" else f" | {gain:+.4f} |"))


if __name__ == "__main__":
    main()
