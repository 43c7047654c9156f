"""Do a network's ImageNet weights work? hymenoptera's Eval ants and bees,
through the zoo's eval preprocessing, classified by the full ImageNet
network: the share landing in ImageNet's "ant" (310) and "bee" (309)
classes. A port with a wrong padding, normalisation or weight layout falls
far below what the weights give (docs/models.md has the numbers).

    python bench/imagenet_ants_bees.py [--archs efficientnet_lite0 ...] [--per_class 20] [--pretrained SOURCE]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paddle_tl.data.datasets import load_rgb  # noqa: E402
from paddle_tl.data.transforms import Preprocess, eval_transform  # noqa: E402
from paddle_tl.models.weights import load_pretrained  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[1]
CLASSES = (("ants", 310), ("bees", 309))  # folder, ImageNet class index


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1",
                                                       "efficientnet_lite2"])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"))
    parser.add_argument("--per_class", type=int, default=None, help="the first N files of each class (default all)")
    parser.add_argument("--pretrained", default="imagenet", help="Arch.pretrained for every arch (default imagenet)")
    args = parser.parse_args()
    print("| network | ants as ImageNet ant | bees as ImageNet bee | top-1 |\n| --- | --- | --- | --- |")
    for arch in args.archs:
        spec = get_spec(arch)
        network = build_model(arch, 1000)
        load_pretrained(network, args.pretrained, spec.head, imagenet_url=spec.imagenet_url,
                        imagenet_md5=spec.imagenet_md5, arch=arch, imagenet_package=spec.imagenet_package,
                        imagenet_sha256=spec.imagenet_sha256)
        network.eval()
        transform = eval_transform(Preprocess.from_spec(spec))
        cells, hits, total = [], 0, 0
        for folder, target in CLASSES:
            files = sorted((Path(args.root) / folder).iterdir())[:args.per_class]
            correct = 0
            for start in range(0, len(files), 16):
                images = np.stack([transform(load_rgb(path)) for path in files[start:start + 16]])
                with paddle.no_grad():
                    correct += int((network(paddle.to_tensor(images)).numpy().argmax(1) == target).sum())
            cells.append(f"{correct}/{len(files)}")
            hits, total = hits + correct, total + len(files)
        print(f"| {arch} | {cells[0]} | {cells[1]} | {hits / total:.3f} |", flush=True)


if __name__ == "__main__":
    main()
