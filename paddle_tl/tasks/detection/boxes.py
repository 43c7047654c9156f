"""Box arithmetic for Faster R-CNN + FPN, in paddle tensors so that the
training step can run it on the network's device: IoU, the box coder
(deltas), anchors for the FPN levels, the matcher, the balanced sampler, and
(class-aware) NMS.

Conventions (torchvision's detection models, which the zoo's backbones and
the published Faster R-CNN numbers follow):

- A box is [x1, y1, x2, y2] in continuous pixel coordinates: the image spans
  [0, W] x [0, H], a box's width is x2 - x1 (no "+ 1", unlike the legacy
  Detectron/PaddleDetection pixel-inclusive convention).
- Class labels are 0..K-1 here; the heads add the background class.

paddle.vision.ops on CPU, Paddle 3.3.1 (CPU build), measured with
bench/detection_ops_cpu.py: nms (plain and with category_idxs), roi_align,
roi_pool, box_coder, generate_proposals and distribute_fpn_proposals all run.
nms keeps exactly the boxes a numpy greedy NMS keeps, in the same order, on
60 of 60 random cases (IoU > threshold suppresses, continuous coordinates),
so `nms` below calls it, after sorting the scores itself with a stable
sort: with equal scores, paddle's own sort ordered the kept boxes
differently from the reference in 4 of 4 tie-heavy cases; here the lower
index wins, as in torchvision. (No CPU scatter kernel for bool tensors:
the sampler scatters int32.) Findings and conventions: docs/detection.md.
"""

import math

import numpy as np

from paddle_tl.runtime import import_paddle

paddle = import_paddle()

# torchvision's BoxCoder clamp: exp(dw) at most 1000/16, so a predicted box
# is at most 62.5x its anchor's size and exp() cannot overflow.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def as_tensor(values, dtype="float32"):
    """A paddle tensor of `dtype` from a tensor, an array or a list (a
    static graph's value passes as a tensor: export traces these helpers)."""
    if isinstance(values, (paddle.Tensor, paddle.pir.Value)):
        return values if values.dtype == getattr(paddle, dtype) else values.astype(dtype)
    return paddle.to_tensor(np.asarray(values, dtype=dtype))


# ---------------------------------------------------------------- areas, IoU

def box_area(boxes):
    """[N] areas of [N, 4] boxes (zero for degenerate ones)."""
    boxes = as_tensor(boxes)
    return paddle.clip(boxes[:, 2] - boxes[:, 0], min=0) * paddle.clip(boxes[:, 3] - boxes[:, 1], min=0)


def box_iou(boxes1, boxes2):
    """[N, M] intersection over union of [N, 4] and [M, 4] boxes. Two empty
    boxes (zero union) have IoU 0, not NaN: the matcher must not match them."""
    boxes1, boxes2 = as_tensor(boxes1), as_tensor(boxes2)
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return paddle.zeros([boxes1.shape[0], boxes2.shape[0]], dtype="float32")
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = paddle.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = paddle.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = paddle.clip(bottom_right - top_left, min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return paddle.where(union > 0, inter / paddle.clip(union, min=1e-12), paddle.zeros_like(inter))


def clip_boxes(boxes, height, width):
    """Boxes clipped to the image [0, width] x [0, height] (numbers, or
    0-D tensors in an exported graph, where the size is an input)."""
    boxes = as_tensor(boxes)
    x = paddle.clip(boxes[..., 0::2], 0, width)
    y = paddle.clip(boxes[..., 1::2], 0, height)
    return paddle.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def remove_small_boxes(boxes, min_size):
    """Indices of the boxes whose width and height are both >= min_size."""
    boxes = as_tensor(boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return paddle.nonzero(keep).flatten()


# ---------------------------------------------------------------- box coder

class BoxCoder:
    """Faster R-CNN box deltas (Girshick et al.; torchvision's BoxCoder):
    dx = wx (gx - px) / pw, dy = wy (gy - py) / ph, dw = ww log(gw / pw),
    dh = wh log(gh / ph), for centres (gx, gy), (px, py) and sizes of a
    target box g and its reference (anchor or proposal) p. The RPN uses
    weights (1, 1, 1, 1), the box head (10, 10, 5, 5). Decoding clamps
    dw, dh at `clip` before exp()."""

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), clip=BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, targets, references):
        """[N, 4] deltas that move `references` onto `targets` (both [N, 4])."""
        targets, references = as_tensor(targets), as_tensor(references)
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h
        gt_w = targets[:, 2] - targets[:, 0]
        gt_h = targets[:, 3] - targets[:, 1]
        gt_x = targets[:, 0] + 0.5 * gt_w
        gt_y = targets[:, 1] + 0.5 * gt_h
        return paddle.stack([wx * (gt_x - ref_x) / ref_w, wy * (gt_y - ref_y) / ref_h,
                             ww * paddle.log(gt_w / ref_w), wh * paddle.log(gt_h / ref_h)], axis=1)

    def decode(self, deltas, references):
        """Boxes from [N, 4k] deltas (k boxes per reference, e.g. one per
        class) and [N, 4] references: [N, 4k], the deltas' layout."""
        deltas, references = as_tensor(deltas), as_tensor(references)
        # Reshaped by the known width, not the count: the count is unknown (-1) when export traces this.
        width = deltas.shape[1]
        deltas = deltas.reshape([-1, width // 4, 4])
        wx, wy, ww, wh = self.weights
        widths = (references[:, 2] - references[:, 0])[:, None]
        heights = (references[:, 3] - references[:, 1])[:, None]
        ctr_x = references[:, 0][:, None] + 0.5 * widths
        ctr_y = references[:, 1][:, None] + 0.5 * heights
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = paddle.clip(deltas[..., 2] / ww, max=self.clip)
        dh = paddle.clip(deltas[..., 3] / wh, max=self.clip)
        pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
        half_w, half_h = 0.5 * paddle.exp(dw) * widths, 0.5 * paddle.exp(dh) * heights
        boxes = paddle.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h], axis=-1)
        return boxes.reshape([-1, width])


# ---------------------------------------------------------------- anchors

class AnchorGenerator:
    """Anchors for the FPN levels, torchvision's AnchorGenerator conventions:
    per level, base anchors centred on (0, 0) for every aspect ratio (h / w)
    and size (sqrt of the area), ratio-major, rounded to whole pixels
    (half to even, as torch.round); shifted to every feature-map cell's
    top-left pixel (x = column x stride, y = row x stride), cell-major:
    anchor a of cell (row, col) is row * (W * A) + col * A + a.

    The defaults are torchvision's fasterrcnn_resnet50_fpn: one size per
    level 32..512 on strides 4..64 (P2..P6), ratios 0.5, 1, 2."""

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5,
                 strides=(4, 8, 16, 32, 64)):
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError(f"one entry per level: {len(sizes)} sizes, {len(aspect_ratios)} aspect_ratios, "
                             f"{len(strides)} strides")
        self.sizes = [tuple(s) for s in sizes]
        self.aspect_ratios = [tuple(r) for r in aspect_ratios]
        self.strides = list(strides)
        self.cell_anchors = [self._base_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def _base_anchors(sizes, ratios):
        sizes = np.asarray(sizes, dtype=np.float32)
        h_ratios = np.sqrt(np.asarray(ratios, dtype=np.float32))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2).astype(np.float32)

    def num_anchors_per_location(self):
        return [len(cell) for cell in self.cell_anchors]

    def grid_anchors(self, level, height, width):
        """paddle float32 [height * width * A, 4]: the anchors of one level
        for a feature map of height x width cells (ints, or 0-D tensors in
        an exported graph, where the map's size is known only when it runs).
        Whole numbers throughout, so float32 holds them exactly."""
        stride = self.strides[level]
        shift_x = paddle.arange(width, dtype="float32") * stride
        shift_y = paddle.arange(height, dtype="float32") * stride
        y, x = paddle.meshgrid(shift_y, shift_x)
        x, y = x.flatten(), y.flatten()
        shifts = paddle.stack([x, y, x, y], axis=1)
        return (shifts[:, None, :] + paddle.to_tensor(self.cell_anchors[level])[None, :, :]).reshape([-1, 4])

    def __call__(self, feature_sizes):
        """[level anchors as paddle float32 [H_l * W_l * A_l, 4]] for the
        feature maps' (height, width), one per level."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"{len(feature_sizes)} feature maps for {len(self.strides)} anchor levels")
        return [self.grid_anchors(level, h, w) for level, (h, w) in enumerate(feature_sizes)]


# ---------------------------------------------------------------- matching

class Matcher:
    """Each prediction (anchor or proposal) gets the ground-truth box it
    overlaps most (torchvision's Matcher): its index when IoU >= high,
    BELOW_LOW_THRESHOLD (-1, background) when IoU < low, BETWEEN_THRESHOLDS
    (-2, ignored) in between. allow_low_quality_matches (the RPN) also keeps
    the predictions with the highest IoU for some ground-truth box, however
    low, so that every box has a positive; they are matched to their own
    best box, as in torchvision. Unlike torchvision, a box that overlaps no
    prediction at all gets none: otherwise every prediction at IoU 0 would
    tie for its "best" and become a positive."""

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
        self.high, self.low = high_threshold, low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality):
        """quality [G, P] (IoU of G ground-truth boxes and P predictions) ->
        int64 [P]: the matched box index, -1 or -2."""
        quality = as_tensor(quality)
        count = quality.shape[1]
        if quality.shape[0] == 0:  # an image without objects: all background
            return paddle.full([count], self.BELOW_LOW_THRESHOLD, dtype="int64")
        best, matches = quality.max(axis=0), quality.argmax(axis=0)
        all_matches = matches
        matches = paddle.where(best < self.low, paddle.full_like(matches, self.BELOW_LOW_THRESHOLD), matches)
        matches = paddle.where((best >= self.low) & (best < self.high),
                               paddle.full_like(matches, self.BETWEEN_THRESHOLDS), matches)
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(axis=1, keepdim=True)
            is_best = ((quality == best_per_gt) & (best_per_gt > 0)).any(axis=0)
            matches = paddle.where(is_best, all_matches, matches)
        return matches


class BalancedSampler:
    """Per image, at most batch_size_per_image predictions to train on, a
    positive_fraction of them positives where there are that many, the rest
    negatives (torchvision's BalancedPositiveNegativeSampler), drawn at
    random (paddle's generator: paddle.seed makes it repeatable)."""

    def __init__(self, batch_size_per_image, positive_fraction):
        if not 0 <= positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels):
        """labels int64 [P]: >= 1 positive, 0 negative, -1 ignored ->
        (positive, negative) bool masks [P]."""
        labels = as_tensor(labels, "int64")
        positive = paddle.nonzero(labels >= 1).flatten()
        negative = paddle.nonzero(labels == 0).flatten()
        num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.shape[0])
        num_neg = min(self.batch_size_per_image - num_pos, negative.shape[0])
        return self._mask(positive, num_pos, labels.shape[0]), self._mask(negative, num_neg, labels.shape[0])

    @staticmethod
    def _mask(candidates, count, size):
        if count == 0:
            return paddle.zeros([size], dtype="bool")
        chosen = candidates[paddle.randperm(candidates.shape[0])[:count]]
        # int32: paddle 3.3.1 has no bool scatter kernel on CPU
        return paddle.scatter(paddle.zeros([size], dtype="int32"), chosen,
                              paddle.ones([count], dtype="int32")).astype("bool")


# ---------------------------------------------------------------- NMS

def nms(boxes, scores, iou_threshold):
    """Indices (int64) of the boxes greedy NMS keeps, best score first: a box
    is dropped when a kept, higher-scoring box overlaps it with IoU >
    iou_threshold. Equal scores: the lower index counts as higher."""
    boxes, scores = as_tensor(boxes), as_tensor(scores)
    if boxes.shape[0] == 0:
        return paddle.zeros([0], dtype="int64")
    order = paddle.argsort(scores, descending=True, stable=True)
    # Without scores, paddle's op keeps the given order (bench/detection_ops_cpu.py).
    return order[paddle.vision.ops.nms(boxes[order], iou_threshold)]


def batched_nms(boxes, scores, classes, iou_threshold, num_classes=None):
    """NMS within each class (boxes of different classes never suppress one
    another), best score first over all classes. One NMS per class present
    rather than torchvision's coordinate-offset trick: offsets of
    class x (largest coordinate + 1) cost float32 precision in the IoU.
    With `num_classes`, one NMS per class 0..num_classes-1 whether present
    or not: the same result, without reading the classes' values, so that
    export can trace it."""
    boxes, scores, classes = as_tensor(boxes), as_tensor(scores), as_tensor(classes, "int64")
    if num_classes is None:
        if boxes.shape[0] == 0:
            return paddle.zeros([0], dtype="int64")
        each_class = np.unique(classes.numpy()).tolist()
    else:
        each_class = range(num_classes)
    kept = []
    for cls in each_class:
        members = paddle.nonzero(classes == int(cls)).flatten()
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    # Best score first; the lower index wins a tie here too, as in a single nms() call.
    kept = paddle.sort(paddle.concat(kept))
    return kept[paddle.argsort(scores[kept], descending=True, stable=True)]
