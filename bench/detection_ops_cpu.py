"""Which paddle.vision.ops detection operators run on this paddle build's
CPU, and whether paddle's NMS agrees with a plain numpy NMS. The findings
for Paddle 3.3.1 (CPU build) are recorded in docs/detection.md and in
paddle_tl/tasks/detection/boxes.py; rerun this after a paddle upgrade.

    python bench/detection_ops_cpu.py

Prints one JSON object: per operator "ok" with its output shapes, or the
error's first line.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_tl.runtime import import_paddle  # noqa: E402

paddle = import_paddle()
paddle.set_device("cpu")


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(1, size * 0.3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _numpy_nms(boxes, scores, threshold):
    # The same greedy rule as tasks/detection/boxes.py's reference: a box is
    # suppressed by a kept, higher-scoring box with IoU > threshold.
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        lt = np.maximum(boxes[i, :2], boxes[:, :2])
        rb = np.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > threshold
    return np.array(keep, dtype=np.int64)


def _shapes(out):
    if isinstance(out, (list, tuple)):
        return [_shapes(o) for o in out]
    return list(out.shape) if hasattr(out, "shape") else repr(out)


def probe():
    ops = paddle.vision.ops
    rng = np.random.RandomState(0)
    results = {}

    def attempt(name, fn):
        try:
            results[name] = {"ok": True, "shapes": _shapes(fn())}
        except Exception as exc:  # any failure is a finding, recorded as such
            results[name] = {"ok": False, "error": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}

    boxes = _random_boxes(rng, 200)
    scores = rng.rand(200).astype(np.float32)
    attempt("nms", lambda: ops.nms(paddle.to_tensor(boxes), 0.5, paddle.to_tensor(scores)))
    if results["nms"]["ok"]:
        agree = []
        for seed in range(20):
            r = np.random.RandomState(seed)
            b, s = _random_boxes(r, 300), r.rand(300).astype(np.float32)
            for threshold in (0.3, 0.5, 0.7):
                got = ops.nms(paddle.to_tensor(b), threshold, paddle.to_tensor(s)).numpy()
                agree.append(np.array_equal(np.sort(got), np.sort(_numpy_nms(b, s, threshold))))
        results["nms"]["agrees_with_numpy"] = f"{sum(agree)}/{len(agree)}"
        categories = rng.randint(0, 3, 200).astype(np.int64)
        attempt("nms(category_idxs)", lambda: ops.nms(paddle.to_tensor(boxes), 0.5, paddle.to_tensor(scores),
                                                      paddle.to_tensor(categories), [0, 1, 2]))

    feature = paddle.to_tensor(rng.rand(1, 8, 32, 32).astype(np.float32))
    rois = paddle.to_tensor(_random_boxes(rng, 10, 128.0))
    attempt("roi_align", lambda: ops.roi_align(feature, rois, paddle.to_tensor(np.array([10], np.int32)),
                                               output_size=7, spatial_scale=0.25, sampling_ratio=2, aligned=True))
    attempt("roi_pool", lambda: ops.roi_pool(feature, rois, paddle.to_tensor(np.array([10], np.int32)),
                                             output_size=7, spatial_scale=0.25))

    priors = paddle.to_tensor(_random_boxes(rng, 10))
    targets = paddle.to_tensor(_random_boxes(rng, 10))
    attempt("box_coder", lambda: ops.box_coder(priors, [0.1, 0.1, 0.2, 0.2], targets,
                                               code_type="encode_center_size", box_normalized=False))

    anchors = paddle.to_tensor(_random_boxes(rng, 4 * 8 * 8, 64.0).reshape(8, 8, 4, 4))
    attempt("generate_proposals", lambda: ops.generate_proposals(
        paddle.to_tensor(rng.rand(1, 4, 8, 8).astype(np.float32)),
        paddle.to_tensor(rng.randn(1, 16, 8, 8).astype(np.float32) * 0.1),
        paddle.to_tensor(np.array([[64, 64]], np.float32)), anchors,
        paddle.ones_like(anchors), pre_nms_top_n=100, post_nms_top_n=20, return_rois_num=True))

    fpn_rois = paddle.to_tensor(_random_boxes(rng, 30, 800.0))
    attempt("distribute_fpn_proposals", lambda: ops.distribute_fpn_proposals(
        fpn_rois, 2, 5, 4, 224, rois_num=paddle.to_tensor(np.array([30], np.int32))))
    return results


if __name__ == "__main__":
    print(json.dumps({"paddle": paddle.__version__, "ops": probe()}, indent=1))
