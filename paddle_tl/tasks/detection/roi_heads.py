"""The box head of Faster R-CNN over FPN, as torchvision's RoIHeads:
multi-scale RoIAlign, a two-layer MLP, the class and box predictor, the
head's training targets and losses, and the postprocessing into detections;
with a mask branch (mask_head.py), Mask R-CNN's masks on the same boxes.

Classes: the data's labels are 0..K-1; the head predicts K + 1 classes with
0 the background, so class c of the data is the head's c + 1 (and
detections are given back as 0..K-1).
"""

import math

import numpy as np

from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.boxes import (BalancedSampler, BoxCoder, Matcher, batched_nms, box_iou, clip_boxes,
                                             remove_small_boxes)
from paddle_tl.tasks.detection.losses import smooth_l1
from paddle_tl.tasks.detection.mask_head import maskrcnn_loss, own_class, project_masks_on_boxes

paddle = import_paddle()
F = paddle.nn.functional


def assign_levels(boxes, k_min, k_max, canonical_size=224, canonical_level=4):
    """The FPN level of each box (FPN paper, eq. 1): k = floor(k0 + log2(
    sqrt(w h) / 224)), k0 = 4, clamped to [k_min, k_max]; int64 [N] of k - k_min
    (an index into the levels given). The 1e-6 is torchvision's: a box of
    exactly 448 px is level 5, not 4.99999."""
    scale = paddle.sqrt(paddle.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), min=1e-12))
    levels = paddle.floor(canonical_level + paddle.log2(scale / canonical_size) + 1e-6)
    return (paddle.clip(levels, k_min, k_max) - k_min).astype("int64")


class MultiScaleRoIAlign(paddle.nn.Layer):
    """RoIAlign of each box on the FPN level its size picks (assign_levels),
    with paddle.vision.ops.roi_align (aligned=True: pixel centres at +0.5, as
    torchvision's v2 heads and Detectron2; sampling_ratio 2 as torchvision).
    `strides` are those of the levels pooled from, finest first (P6 is not
    one of them)."""

    def __init__(self, strides, output_size=7, sampling_ratio=2):
        super().__init__()
        self.strides, self.output_size, self.sampling_ratio = list(strides), output_size, sampling_ratio
        self.k_min, self.k_max = int(math.log2(self.strides[0])), int(math.log2(self.strides[-1]))

    def forward(self, features, boxes):
        """features: [B, C, H_l, W_l] per level; boxes: [N_i, 4] per image ->
        [sum N_i, C, output_size, output_size], in the boxes' order."""
        features = features[:len(self.strides)]
        all_boxes = paddle.concat(boxes)
        images = paddle.concat([paddle.full_like(b[:, 0], i, dtype="int64") for i, b in enumerate(boxes)])
        levels = assign_levels(all_boxes, self.k_min, self.k_max)
        pooled, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            # nonzero keeps ascending order, so a level's boxes stay grouped by image as boxes_num expects
            index = paddle.nonzero(levels == level).flatten()
            if index.shape[0] == 0:
                continue
            boxes_num = paddle.bincount(images[index], minlength=len(boxes)).astype("int32")
            pooled.append(paddle.vision.ops.roi_align(
                feature, all_boxes[index], boxes_num, self.output_size, spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio, aligned=True))
            order.append(index)
        if not pooled:
            channels = features[0].shape[1]
            return paddle.zeros([0, channels, self.output_size, self.output_size], features[0].dtype)
        pooled, order = paddle.concat(pooled), paddle.concat(order)
        return pooled[paddle.argsort(order)]  # back to the boxes' order


def _linear(in_features, out_features, std=None):
    """A Linear layer initialised as torchvision's box head: N(0, std) with
    zero bias for the predictor, else torch's nn.Linear default U(+-1 /
    sqrt(fan_in)) (KaimingUniform with a = sqrt(5)), not paddle's Xavier,
    which is about twice as wide on the 7 x 7 x C input. Measured: with
    paddle's defaults the first class loss was 4.8 rather than log(K + 1)
    and 30 SGD steps on the synthetic shapes diverged for 1 seed of 3."""
    if std is None:
        weight = paddle.nn.initializer.KaimingUniform(negative_slope=math.sqrt(5))
    else:
        weight = paddle.nn.initializer.Normal(std=std)
    return paddle.nn.Linear(in_features, out_features, weight_attr=weight,
                            bias_attr=paddle.nn.initializer.Constant(0.0))


class TwoMLPHead(paddle.nn.Layer):
    """Flatten, then two fully connected layers with ReLU (torchvision's
    TwoMLPHead; representation_size 1024 there, smaller for CPU)."""

    def __init__(self, in_features, representation_size=1024):
        super().__init__()
        self.fc6 = _linear(in_features, representation_size)
        self.fc7 = _linear(representation_size, representation_size)

    def forward(self, x):
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_axis=1)))))


class FastRCNNPredictor(paddle.nn.Layer):
    """Class logits (num_classes including the background) and
    class-specific box deltas [N, 4 * num_classes]; weights N(0, 0.01) and
    N(0, 0.001) as Detectron2's FastRCNNOutputLayers: the first logits near
    zero (a loss of log(num_classes)), the first boxes the proposals."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.cls_score = _linear(in_features, num_classes, std=0.01)
        self.bbox_pred = _linear(in_features, 4 * num_classes, std=0.001)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(paddle.nn.Layer):
    """proposals -> losses (training) or detections (evaluation).
    torchvision's defaults: proposals with IoU >= 0.5 to a box are that
    box's class, below 0.5 background; 512 per image, up to a quarter
    positive; box weights (10, 10, 5, 5). Detections: softmax, per-class
    decoding, clipped, score > score_thresh, boxes under min_size removed,
    NMS at nms_thresh per class, the detections_per_img best.
    mask_branch (mask_head.MaskBranch, optional): Mask R-CNN. Training adds
    "loss_mask" on the sampled positive proposals (targets then need
    "masks" float [N, H, W]); each detection gets "mask_probs" [M, M], the
    sigmoid of its class's mask over its box (masks.paste_masks puts it
    into an image)."""

    def __init__(self, box_roi_pool, box_head, box_predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
                 batch_size_per_image=512, positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=100, min_size=1e-2, mask_branch=None):
        super().__init__()
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.mask_branch = mask_branch
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.min_size = detections_per_img, min_size

    def forward(self, features, proposals, image_sizes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("the box head needs targets in training")
            proposals, labels, regression_targets, matched = self.select_training_samples(proposals, targets)
        logits, deltas = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals)))
        if self.training:
            losses = fastrcnn_loss(logits, deltas, labels, regression_targets)
            if self.mask_branch is not None:
                losses["loss_mask"] = self.mask_loss(features, proposals, labels, matched, targets)
            return [], losses
        detections = self.postprocess(logits, deltas, proposals, image_sizes)
        if self.mask_branch is not None:
            self.add_masks(features, detections)
        return detections, {}

    def mask_loss(self, features, proposals, labels, matched, targets):
        """Mask R-CNN's loss on the sampled positive proposals, each against
        the mask of the box it was matched to (mask_head.maskrcnn_loss)."""
        boxes, classes, mask_targets, start = [], [], [], 0
        for image_proposals, image_matched, target in zip(proposals, matched, targets):
            image_labels = labels[start:start + image_proposals.shape[0]]
            start += image_proposals.shape[0]
            positive = paddle.nonzero(image_labels > 0).flatten()
            if positive.shape[0] == 0:
                boxes.append(paddle.zeros([0, 4], "float32"))
                continue
            boxes.append(image_proposals[positive])
            classes.append(image_labels[positive] - 1)
            mask_targets.append(project_masks_on_boxes(target["masks"], boxes[-1], image_matched[positive],
                                                       2 * self.mask_branch.roi_pool.output_size))
        if not classes:
            return paddle.to_tensor(0.0)
        return maskrcnn_loss(self.mask_branch(features, boxes), paddle.concat(classes), paddle.concat(mask_targets))

    def add_masks(self, features, detections):
        """Each detection's "mask_probs" [D, M, M]: the sigmoid of its own
        class's mask logits over its box."""
        counts = [d["boxes"].shape[0] for d in detections]
        size = 2 * self.mask_branch.roi_pool.output_size
        if sum(counts) == 0:
            for found in detections:
                found["mask_probs"] = paddle.zeros([0, size, size], "float32")
            return
        logits = self.mask_branch(features, [d["boxes"] for d in detections])
        probabilities = F.sigmoid(own_class(logits, paddle.concat([d["labels"] for d in detections])))
        start = 0
        for count, found in zip(counts, detections):
            found["mask_probs"] = probabilities[start:start + count]
            start += count

    def select_training_samples(self, proposals, targets):
        """Per image: the proposals with the ground-truth boxes added (so
        that every box has positives from the start), matched and sampled ->
        (sampled proposals per image, head labels int64 [sum], encoded box
        targets [sum, 4], per image the index of the box each sampled
        proposal was matched to (0 for the background ones): the mask loss's)."""
        sampled, labels, regression, matched_index = [], [], [], []
        for image_proposals, target in zip(proposals, targets):
            gt_boxes = target["boxes"]
            candidates = paddle.concat([image_proposals, gt_boxes]) if gt_boxes.shape[0] else image_proposals
            count = candidates.shape[0]
            if gt_boxes.shape[0]:
                matches = self.matcher(box_iou(gt_boxes, candidates))
                index = paddle.clip(matches, min=0)
                image_labels = paddle.where(matches >= 0, target["labels"].astype("int64")[index] + 1,
                                            paddle.zeros([count], "int64"))
                matched = gt_boxes[index]
            else:
                image_labels, matched = paddle.zeros([count], "int64"), paddle.zeros([count, 4], "float32")
                index = paddle.zeros([count], "int64")
            pos, neg = self.sampler(image_labels)
            chosen = paddle.nonzero(pos | neg).flatten()
            sampled.append(candidates[chosen])
            labels.append(image_labels[chosen])
            regression.append(self.box_coder.encode(matched[chosen], candidates[chosen]))
            matched_index.append(index[chosen])
        return sampled, paddle.concat(labels), paddle.concat(regression), matched_index

    def postprocess(self, logits, deltas, proposals, image_sizes):
        """-> per image {"boxes" [D, 4], "scores" [D], "labels" int64 [D] in 0..K-1}."""
        num_classes = logits.shape[1]
        scores = F.softmax(logits, axis=-1)
        boxes = self.box_coder.decode(deltas, paddle.concat(proposals)).reshape([-1, num_classes, 4])
        if len(proposals) == 1:  # no counts read: one image traces for export, where its count is unknown
            per_image = [(boxes, scores)]
        else:
            ends = np.cumsum([0] + [p.shape[0] for p in proposals]).tolist()
            per_image = [(boxes[start:end], scores[start:end]) for start, end in zip(ends, ends[1:])]
        return [self._detections(image_boxes, image_scores, height, width)
                for (image_boxes, image_scores), (height, width) in zip(per_image, image_sizes)]

    def _detections(self, boxes, scores, height, width):
        """One image's boxes [N, K + 1, 4] and scores [N, K + 1] -> its detections."""
        num_classes = scores.shape[1] - 1
        boxes = clip_boxes(boxes, height, width)[:, 1:].reshape([-1, 4])  # drop the background
        scores = scores[:, 1:]
        labels = (paddle.zeros_like(scores, dtype="int64") + paddle.arange(num_classes, dtype="int64")).flatten()
        scores = scores.flatten()
        keep = paddle.nonzero(scores > self.score_thresh).flatten()
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, self.min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh, num_classes=num_classes)[:self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def fastrcnn_loss(logits, deltas, labels, regression_targets):
    """Cross-entropy over the sampled proposals (mean), and smooth L1 of the
    positives' deltas for their own class, summed and divided by the number
    of sampled proposals (torchvision's fastrcnn_loss)."""
    classification = F.cross_entropy(logits, labels)
    positive = paddle.nonzero(labels > 0).flatten()
    count = labels.shape[0]
    if positive.shape[0] == 0:
        return {"loss_classifier": classification, "loss_box_reg": deltas.sum() * 0.0}
    per_class = deltas.reshape([count, -1, 4])[positive]
    own = paddle.take_along_axis(per_class, labels[positive].reshape([-1, 1, 1]).expand([-1, 1, 4]), axis=1)
    box_loss = smooth_l1(own.squeeze(1), regression_targets[positive]) / count
    return {"loss_classifier": classification, "loss_box_reg": box_loss}
