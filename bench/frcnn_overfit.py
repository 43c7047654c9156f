"""A tiny overfit run of the Faster R-CNN network (paddle_tl/tasks/detection)
on the synthetic shapes: train on a few images, then score COCO AP on the
same images (detection's loader.predict and evaluate.py, pycocotools'
COCOeval). A check that the network, its losses and its postprocessing fit
together (a model that cannot overfit 16 images has a bug), not a measure
of generalisation. Result recorded in docs/detection.md.

    python bench/frcnn_overfit.py --steps 300 --images 16 \
        --weights ../shared/weights/mobilenet_v2_imagenet.pdparams

Needs pycocotools (the `detect` extra). Prints the losses every 25 steps,
then one JSON line: AP, AP50, AP75, AP per class, seconds.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from paddle_tl.runtime import import_paddle  # noqa: E402
from paddle_tl.tasks.detection.data import read_coco  # noqa: E402
from paddle_tl.tasks.detection.evaluate import evaluate  # noqa: E402
from paddle_tl.tasks.detection.faster_rcnn import FasterRCNN  # noqa: E402
from paddle_tl.tasks.detection.loader import batches, predict  # noqa: E402
from synthetic_detection import CLASSES, write_coco  # noqa: E402

paddle = import_paddle()
paddle.set_device("cpu")

SIZE = (160, 128)


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
    # Written as COCO (PNG: lossless, so the pixels are make_images' own) and
    # read back, to go through the readers, the loader and evaluate.py as
    # detection training will.
    folder = Path(tempfile.mkdtemp(prefix="frcnn_overfit_"))
    image_root, annotations, _ = write_coco(folder, args.images, seed=args.seed, size=SIZE)
    dataset = read_coco(image_root, annotations)
    # The images stay at their size (no transform): one epoch of batches in the dataset's order, cycled.
    epoch = list(batches(dataset, None, args.batch, model.body.arch))
    params = [p for p in model.parameters() if not p.stop_gradient]
    # a step decay at 3/4 of the run, as the reference schedules' last drop
    schedule = paddle.optimizer.lr.PiecewiseDecay([int(args.steps * 0.75)], [args.lr, args.lr / 10])
    optimizer = paddle.optimizer.Momentum(learning_rate=schedule, momentum=0.9, parameters=params, weight_decay=1e-4)
    start = time.time()
    model.train()
    for step in range(args.steps):
        batch = epoch[step % len(epoch)]
        losses = model(batch.images, batch.targets)
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(step, round(float(total), 4), {k: round(float(v), 4) for k, v in losses.items()}, flush=True)
    trained = time.time() - start
    result = evaluate(dataset, predict(model, dataset, None, batch_size=1))
    shutil.rmtree(folder, ignore_errors=True)
    per_class = {name: None if ap is None else round(ap, 4) for name, ap in result["per_class"].items()}
    print(json.dumps({"AP": round(result["bbox_ap"], 4), "AP50": round(result["bbox_ap50"], 4),
                      "AP75": round(result["bbox_ap75"], 4), "per_class": per_class,
                      "steps": args.steps, "images": args.images,
                      "train_seconds": round(trained, 1), "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
