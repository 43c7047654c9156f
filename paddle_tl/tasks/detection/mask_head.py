"""Mask R-CNN's mask branch (He et al. 2017) as torchvision's
(roi_heads.py: maskrcnn_loss, project_masks_on_boxes, maskrcnn_inference;
mask_rcnn.py: MaskRCNNHeads, MaskRCNNPredictor): 14 x 14 multi-scale
RoIAlign of each box, four 3x3 convolutions with ReLU, a 2x transposed
convolution with ReLU and a 1x1 convolution to one 28 x 28 mask logit map
per class. RoIHeads (roi_heads.py) runs it on the positive proposals in
training and on the final detections in evaluation.

Classes: one map per data class 0..K-1 (torchvision keeps an unused
background map as well); a box's mask is the map of its class.
"""

from paddle_tl.runtime import import_paddle

paddle = import_paddle()
F = paddle.nn.functional

MASK_POOL_SIZE = 14  # the pooled features; the predicted masks are twice that
CONVS = 4


def _kaiming_normal(fan_out):
    # torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / fan_out).
    return paddle.ParamAttr(initializer=paddle.nn.initializer.Normal(std=(2.0 / fan_out) ** 0.5))


def _zero():
    return paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0))


class MaskRCNNHeads(paddle.nn.Layer):
    """Four 3x3 convolutions (`channels` each; torchvision 256, fewer for
    CPU), each followed by ReLU."""

    def __init__(self, in_channels, channels, convs=CONVS):
        super().__init__()
        layers = []
        for number in range(convs):
            layers += [paddle.nn.Conv2D(in_channels if number == 0 else channels, channels, 3, padding=1,
                                        weight_attr=_kaiming_normal(channels * 9), bias_attr=_zero()),
                       paddle.nn.ReLU()]
        self.convs = paddle.nn.Sequential(*layers)

    def forward(self, x):
        return self.convs(x)


class MaskRCNNPredictor(paddle.nn.Layer):
    """2x2 transposed convolution, stride 2 (14 -> 28) with ReLU, then a
    1x1 convolution to num_classes mask logits. That last one starts at
    N(0, 0.001), as Detectron2's mask head, not torchvision's He normal over
    fan_out = num_classes: with a few classes that std is ~0.8 (torchvision
    has 91); measured on the synthetic shapes, the first mask losses were
    1.3-1.9 instead of log 2 and 16 SGD steps at 0.01 ended in NaN."""

    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        # torch's fan_out of a transposed convolution's weight [in, out, k, k] is in * k * k.
        self.conv5_mask = paddle.nn.Conv2DTranspose(in_channels, channels, 2, stride=2,
                                                    weight_attr=_kaiming_normal(in_channels * 4), bias_attr=_zero())
        self.mask_fcn_logits = paddle.nn.Conv2D(
            channels, num_classes, 1, weight_attr=paddle.ParamAttr(initializer=paddle.nn.initializer.Normal(std=0.001)),
            bias_attr=_zero())

    def forward(self, x):
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


class MaskBranch(paddle.nn.Layer):
    """RoIAlign -> MaskRCNNHeads -> MaskRCNNPredictor: boxes per image ->
    mask logits [sum of boxes, num_classes, 28, 28]."""

    def __init__(self, roi_pool, in_channels, channels, num_classes):
        super().__init__()
        self.roi_pool = roi_pool
        self.head = MaskRCNNHeads(in_channels, channels)
        self.predictor = MaskRCNNPredictor(channels, channels, num_classes)

    def forward(self, features, boxes):
        return self.predictor(self.head(self.roi_pool(features, boxes)))


def project_masks_on_boxes(gt_masks, boxes, matched, size):
    """The ground-truth masks [G, H, W] (float, 0/1) seen through boxes
    [P, 4] (x1y1x2y2 pixels), box p through mask matched[p]: RoIAlign of
    the mask onto the box at size x size -> [P, size, size] in [0, 1]
    (torchvision's soft targets). aligned=True, as the features are pooled
    and masks pasted back (masks.paste_masks): cell centres at
    x1 + (i + 0.5) (x2 - x1) / size; sampling adaptive (ceil of the box's
    size / `size` points per cell), as torchvision."""
    if boxes.shape[0] == 0:
        return paddle.zeros([0, size, size], "float32")
    matched = matched.astype("int64")
    # roi_align wants the boxes grouped by the "image" (here: the mask) they pool from.
    order = paddle.argsort(matched)
    boxes_num = paddle.bincount(matched, minlength=gt_masks.shape[0]).astype("int32")
    projected = paddle.vision.ops.roi_align(gt_masks.unsqueeze(1), boxes[order], boxes_num, size,
                                            spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return projected[paddle.argsort(order)][:, 0]


def own_class(mask_logits, labels):
    """Each box's map of its own class: [N, K, M, M], labels int64 [N] in
    0..K-1 -> [N, M, M]."""
    index = labels.astype("int64").reshape([-1, 1, 1, 1]).expand([-1, 1, *mask_logits.shape[2:]])
    return paddle.take_along_axis(mask_logits, index, axis=1)[:, 0]


def maskrcnn_loss(mask_logits, labels, mask_targets):
    """Binary cross-entropy between each positive box's logits of its
    ground-truth class (labels 0..K-1) and its projected mask
    (project_masks_on_boxes), averaged over every cell of every box
    (torchvision's maskrcnn_loss)."""
    if mask_logits.shape[0] == 0:
        return paddle.to_tensor(0.0)
    return F.binary_cross_entropy_with_logits(own_class(mask_logits, labels), mask_targets)
