"""What a backbone candidate of `auto` costs (Transfer.auto_backbones,
engine/backbones.py): images per second of feature extraction, as the
feature cache computes it (the headless body exported and run by Paddle
Inference on CPU), at each backbone's native eval size, on a folder of
images (JPEG decoding and resizing included). One warm-up pass, then one
timed pass.

    python bench/backbone_speed.py [--root ../shared/datasets/hymenoptera/train] \
        [--arch mobilenet_v2 efficientnet_lite0 efficientnet_lite2] [--workers 2]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import DatasetConfig  # noqa: E402
from paddle_tl.data.datasets import build_dataset  # noqa: E402
from paddle_tl.data.transforms import Preprocess, eval_transform  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402
from paddle_tl.runtime import select_device  # noqa: E402
from paddle_tl.transfer.feature_cache import feature_extractor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera" / "train"))
    parser.add_argument("--arch", nargs="+", default=["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    device = select_device("cpu")
    for name in args.arch:
        spec, pre = get_spec(name), Preprocess.from_spec(get_spec(name))
        # Random weights: the speed of a body does not depend on its values.
        network = build_model(name, 2)
        network.eval()
        dataset = build_dataset(DatasetConfig(name="ImageFolder", root=args.root), "train", eval_transform(pre))
        with feature_extractor(network, spec, pre.input_size, args.batch_size, device) as extract:
            extract(dataset, eval_transform(pre), args.workers, f"{name} warm-up")
            started = time.time()
            features = extract(dataset, eval_transform(pre), args.workers, name)
            seconds = time.time() - started
        print(f"{name}: {pre.input_size} px, {features.shape[1]} features, {len(dataset)} images in {seconds:.1f} s: "
              f"{len(dataset) / seconds:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
