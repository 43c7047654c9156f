"""Region Proposal Network (Ren et al., 2015) over the FPN levels, as
torchvision's RPNHead and RegionProposalNetwork: one head shared by every
level, proposals from the best anchors of each level, and the RPN's training
targets and losses.

Layouts follow boxes.AnchorGenerator: on a level of H x W cells with A
anchors per cell, anchor a of cell (row, col) is row * (W * A) + col * A + a,
so the head's [B, A, H, W] objectness is permuted to [B, H, W, A] before
flattening (and its [B, 4A, H, W] deltas to [B, H, W, A, 4]).
"""

from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.boxes import (BalancedSampler, BoxCoder, Matcher, batched_nms, box_iou,
                                             clip_boxes, remove_small_boxes)
from paddle_tl.tasks.detection.losses import smooth_l1

paddle = import_paddle()
F = paddle.nn.functional


def _normal_conv(in_channels, out_channels, kernel):
    # torchvision's RPNHead: weights N(0, 0.01), zero bias.
    return paddle.nn.Conv2D(in_channels, out_channels, kernel, padding=kernel // 2,
                            weight_attr=paddle.nn.initializer.Normal(std=0.01),
                            bias_attr=paddle.nn.initializer.Constant(0.0))


class RPNHead(paddle.nn.Layer):
    """A shared 3x3 conv + ReLU, then per anchor an objectness logit (1x1
    conv, A outputs) and box deltas (1x1 conv, 4A outputs)."""

    def __init__(self, in_channels, num_anchors):
        super().__init__()
        self.conv = _normal_conv(in_channels, in_channels, 3)
        self.objectness = _normal_conv(in_channels, num_anchors, 1)
        self.deltas = _normal_conv(in_channels, 4 * num_anchors, 1)

    def forward(self, features):
        """-> ([B, H*W*A] objectness per level], [[B, H*W*A, 4] deltas per level])."""
        objectness, deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature))
            logits, offsets = self.objectness(hidden), self.deltas(hidden)
            anchors = logits.shape[1]
            # 0 copies the batch size and H x W cells go as one axis (row-major: the same order), as an
            # exported graph (inference_graph.py) knows neither size before it runs
            objectness.append(logits.transpose([0, 2, 3, 1]).reshape([0, -1]))
            deltas.append(offsets.reshape([0, anchors, 4, -1]).transpose([0, 3, 1, 2]).reshape([0, -1, 4]))
        return objectness, deltas


class RegionProposalNetwork(paddle.nn.Layer):
    """features -> (proposals per image [N_i, 4], losses). torchvision's
    defaults: per level the pre_nms_top_n best anchors, decoded, clipped to
    the image, boxes under min_size removed, NMS at nms_thresh per level, the
    post_nms_top_n best kept per image (each a {"train", "test"} pair).
    Targets: IoU >= 0.7 positive, < 0.3 negative, plus each box's best
    anchors (low-quality matches); 256 anchors per image, up to half
    positive. Proposals and their scores carry no gradient (the box head's
    loss does not train the RPN through them)."""

    def __init__(self, anchor_generator, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
                 positive_fraction=0.5, pre_nms_top_n=None, post_nms_top_n=None, nms_thresh=0.7,
                 score_thresh=0.0, min_size=1e-3):
        super().__init__()
        self.anchor_generator, self.head = anchor_generator, head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = pre_nms_top_n or {"train": 2000, "test": 1000}
        self.post_nms_top_n = post_nms_top_n or {"train": 2000, "test": 1000}
        self.nms_thresh, self.score_thresh, self.min_size = nms_thresh, score_thresh, min_size

    def _mode(self):
        return "train" if self.training else "test"

    def forward(self, features, image_sizes, targets=None):
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features])
        proposals = self.filter_proposals(anchors, [o.detach() for o in objectness], [d.detach() for d in deltas],
                                          image_sizes)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training")
            all_anchors = paddle.concat(anchors)
            labels, matched = zip(*(self.assign_targets(all_anchors, t["boxes"]) for t in targets))
            losses = self.loss(paddle.concat(objectness, axis=1), paddle.concat(deltas, axis=1), all_anchors,
                               list(labels), list(matched))
        return proposals, losses

    def filter_proposals(self, anchors, objectness, deltas, image_sizes):
        """Per image: the top-scoring anchors of each level, decoded, clipped,
        small boxes removed, NMS within each level, the best post_nms_top_n."""
        pre_n, post_n = self.pre_nms_top_n[self._mode()], self.post_nms_top_n[self._mode()]
        proposals = []
        for image, (height, width) in enumerate(image_sizes):
            boxes, scores, levels = [], [], []
            for level, level_anchors in enumerate(anchors):
                logits = objectness[level][image]
                # k as a tensor: the number of anchors is known only when an exported graph runs
                count = paddle.shape(logits)[0]
                k = paddle.minimum(count, paddle.full([], pre_n, count.dtype))
                top = paddle.topk(logits, k=k)[1]  # choose before decoding: cheaper
                decoded = self.box_coder.decode(deltas[level][image][top], level_anchors[top])
                boxes.append(clip_boxes(decoded, height, width))
                scores.append(F.sigmoid(logits[top]))
                levels.append(paddle.full_like(top, level, dtype="int64"))
            boxes, scores, levels = paddle.concat(boxes), paddle.concat(scores), paddle.concat(levels)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = paddle.nonzero(scores >= self.score_thresh).flatten()
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, self.nms_thresh, num_classes=len(anchors))[:post_n]
            proposals.append(boxes[keep])
        return proposals

    def assign_targets(self, anchors, gt_boxes):
        """-> (labels float32 [A]: 1 object, 0 background, -1 ignored;
        the matched box of each anchor [A, 4], zeros where unmatched)."""
        count = anchors.shape[0]
        if gt_boxes.shape[0] == 0:
            return paddle.zeros([count], "float32"), paddle.zeros([count, 4], "float32")
        matches = self.matcher(box_iou(gt_boxes, anchors))
        matched = gt_boxes[paddle.clip(matches, min=0)]
        labels = paddle.where(matches >= 0, paddle.ones([count]), paddle.zeros([count]))
        labels = paddle.where(matches == Matcher.BETWEEN_THRESHOLDS, paddle.full([count], -1.0), labels)
        return labels, matched

    def loss(self, objectness, deltas, anchors, labels, matched):
        """Binary cross-entropy of the sampled anchors' objectness (mean),
        smooth L1 of the positives' deltas summed over the batch and divided
        by the number of sampled anchors, as torchvision."""
        logits, targets, offsets, references, goals = [], [], [], [], []
        for image, (image_labels, image_matched) in enumerate(zip(labels, matched)):
            pos, neg = self.sampler(image_labels.astype("int64"))
            chosen = paddle.nonzero(pos | neg).flatten()
            pos_index = paddle.nonzero(pos).flatten()
            logits.append(objectness[image][chosen])
            targets.append(image_labels[chosen])
            offsets.append(deltas[image][pos_index])
            references.append(anchors[pos_index])
            goals.append(image_matched[pos_index])
        logits, targets = paddle.concat(logits), paddle.concat(targets)
        box_targets = self.box_coder.encode(paddle.concat(goals), paddle.concat(references))
        box_loss = smooth_l1(paddle.concat(offsets), box_targets) / max(logits.shape[0], 1)
        return {"loss_objectness": F.binary_cross_entropy_with_logits(logits, targets),
                "loss_rpn_box_reg": box_loss}
