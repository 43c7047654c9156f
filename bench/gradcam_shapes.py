"""Grad-CAM on the synthetic shapes (tests/synthetic_shapes.py: light
shapes on black): ImageNet mobilenet_v2 fine-tuned to tell ellipses,
rectangles and triangles apart, then the share of each Eval image's heat
map (its true class) that lies inside the shape, against the share of the
image the shape covers. The CI test
(tests/trust/test_gradcam.py::test_heat_map_mass_lies_on_the_shape) is the
seed-0 row at 224 px. Needs ../shared/weights beside the checkout.

    python bench/gradcam_shapes.py [--seeds 0 1 2] [--input_size 224] [--epochs 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine import train as train_module  # noqa: E402
from synthetic_shapes import CAM_INPUT_SIZE, cam_folders, cam_overrides, heat_on_shapes  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pdparams"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--input_size", type=int, default=CAM_INPUT_SIZE)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        sys.exit(f"needs {WEIGHTS} (../shared beside the checkout)")
    train_module.write_report = lambda run_dir: run_dir  # the report is not measured here
    print(f"mobilenet_v2 partial (2 stages frozen), {args.epochs} epochs, {args.input_size} px; "
          "30 Eval images, maps of the true class:")
    print("| seed | Eval top-1 | heat mass inside the shape | shape's area | ratio | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        folders = cam_folders(Path(tmp) / "data")
        for seed in args.seeds:
            run = Path(tmp) / f"run_{seed}"
            started = time.time()
            metrics = train_module.train(load_config(None, cam_overrides(
                folders, run, WEIGHTS, args.input_size, args.epochs, seed)))
            seconds = time.time() - started
            inside, area = heat_on_shapes(run)
            print(f"| {seed} | {metrics['final_top1']:.3f} | {inside:.3f} | {area:.3f} | {inside / area:.2f} "
                  f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
