"""A tiny overfit run of the Faster R-CNN network (paddle_tl/tasks/detection)
on the synthetic shapes: train on a few images, then score COCO AP on the
same images with pycocotools. A check that the network, its losses and its
postprocessing fit together (a model that cannot overfit 16 images has a
bug), not a measure of generalisation. Result recorded in docs/detection.md.

    python bench/frcnn_overfit.py --steps 300 --images 16 \
        --weights ../shared/weights/mobilenet_v2_imagenet.pdparams

Needs pycocotools (pip install pycocotools). Prints the losses every 25
steps, then one JSON line: AP, AP50, seconds.
"""

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from paddle_tl.models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402
from paddle_tl.tasks.detection.faster_rcnn import FasterRCNN  # noqa: E402
from synthetic_detection import CLASSES, coco_json, make_images  # noqa: E402

paddle = import_paddle()
paddle.set_device("cpu")

SIZE = (160, 128)


def normalised(image):
    array = np.asarray(image, dtype="float32").transpose(2, 0, 1) / 255
    mean = np.asarray(IMAGENET_MEAN, "float32")[:, None, None]
    return (array - mean) / np.asarray(IMAGENET_STD, "float32")[:, None, None]


def coco_ap(images, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO()
    truth.dataset = coco_json(images, SIZE)
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
    results = [{"image_id": number, "category_id": int(label) + 1, "score": float(score),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
               for number, found in enumerate(detections, 1)
               for (x1, y1, x2, y2), score, label in zip(found["boxes"], found["scores"], found["labels"])]
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.0025)  # torchvision's 0.02 per 16 images, for batch 2
    parser.add_argument("--weights", default=None, help="ImageNet weights for the body (default: random)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    paddle.seed(args.seed)
    model = FasterRCNN(len(CLASSES), pretrained=args.weights, fpn_channels=64, representation_size=256,
                       anchor_sizes=((16,), (32,), (64,), (128,)),
                       rpn_kwargs=dict(pre_nms_top_n={"train": 300, "test": 300},
                                       post_nms_top_n={"train": 200, "test": 100}),
                       roi_kwargs=dict(batch_size_per_image=128))
    images = make_images(args.images, seed=args.seed, size=SIZE)
    inputs = [normalised(i["image"]) for i in images]
    params = [p for p in model.parameters() if not p.stop_gradient]
    # a step decay at 3/4 of the run, as the reference schedules' last drop
    schedule = paddle.optimizer.lr.PiecewiseDecay([int(args.steps * 0.75)], [args.lr, args.lr / 10])
    optimizer = paddle.optimizer.Momentum(learning_rate=schedule, momentum=0.9, parameters=params, weight_decay=1e-4)
    start = time.time()
    model.train()
    for step in range(args.steps):
        chosen = [(args.batch * step + k) % len(images) for k in range(args.batch)]
        losses = model(paddle.to_tensor(np.stack([inputs[i] for i in chosen])), [images[i] for i in chosen])
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(step, round(float(total), 4), {k: round(float(v), 4) for k, v in losses.items()}, flush=True)
    trained = time.time() - start
    model.eval()
    detections = []
    with paddle.no_grad():
        for array in inputs:
            found = model(paddle.to_tensor(array[None]))[0]
            detections.append({key: value.numpy() for key, value in found.items()})
    ap, ap50 = coco_ap(images, detections)
    print(json.dumps({"AP": round(ap, 4), "AP50": round(ap50, 4), "steps": args.steps, "images": args.images,
                      "train_seconds": round(trained, 1), "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
