"""Faster R-CNN with FPN (Ren et al. 2015, Lin et al. 2017) on a zoo body:
body (backbone.py) -> FPN (fpn.py) -> RPN (rpn.py) -> box head
(roi_heads.py), as torchvision's FasterRCNN minus its transform: images come
in normalised and resized, boxes in their pixels.

Sizes: the body's stages 2-4 (strides 8, 16, 32) plus FPN's max-pooled P6
(stride 64); the RPN sees all four levels, RoIAlign the first three.
Anchors default to one size per level, 4x the level's stride (32..256 px),
ratios 0.5, 1, 2; small inputs want smaller ones (`anchor_sizes`).

With `mask=True` it is Mask R-CNN (He et al. 2017): a mask branch
(mask_head.py) on the same RoIAlign levels, 14 x 14 -> 28 x 28 masks.
"""

import math

from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.backbone import DetectionBody
from paddle_tl.tasks.detection.boxes import AnchorGenerator
from paddle_tl.tasks.detection.fpn import FPN
from paddle_tl.tasks.detection.mask_head import MASK_POOL_SIZE, MaskBranch
from paddle_tl.tasks.detection.roi_heads import FastRCNNPredictor, MultiScaleRoIAlign, RoIHeads, TwoMLPHead
from paddle_tl.tasks.detection.rpn import RegionProposalNetwork, RPNHead

paddle = import_paddle()

SIZE_DIVISOR = 32  # the coarsest body stride: padded sizes keep every level's cells aligned


def batch_images(images, size_divisor=SIZE_DIVISOR):
    """A [B, 3, H, W] tensor (sizes as they are) or a list of [3, h_i, w_i]
    tensors, zero-padded at the bottom and right to a common size divisible
    by size_divisor -> (batch, [(h_i, w_i)] of the images before padding).
    Zero is the mean colour once normalised."""
    if isinstance(images, paddle.Tensor):
        return images, [tuple(images.shape[-2:])] * images.shape[0]
    sizes = [tuple(image.shape[-2:]) for image in images]
    height = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    width = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    batch = paddle.stack([paddle.nn.functional.pad(image[None], [0, width - w, 0, height - h])[0]
                          for image, (h, w) in zip(images, sizes)])
    return batch, sizes


class FasterRCNN(paddle.nn.Layer):
    """num_classes: the data's classes (the head adds the background).
    Training (`model.train()`): forward(images, targets) with targets
    [{"boxes" float32 [N, 4] x1y1x2y2 pixels, "labels" int64 [N] 0..K-1}]
    -> {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
    "loss_box_reg"}. Evaluation: forward(images) -> per image {"boxes",
    "scores", "labels"} in the input's pixels. rpn_kwargs and roi_kwargs go
    to RegionProposalNetwork and RoIHeads (their torchvision defaults).
    mask: Mask R-CNN, its branch `mask_channels` wide (torchvision 256):
    targets then also hold "masks" [N, H, W] (0/1, the image's pixels),
    training adds "loss_mask", and each detection gets "mask_probs"
    [D, 28, 28] over its box (masks.paste_masks)."""

    def __init__(self, num_classes, arch="mobilenet_v2", pretrained=None, frozen_stages=2,
                 return_stages=(2, 3, 4), fpn_channels=128, representation_size=1024, anchor_sizes=None,
                 aspect_ratios=(0.5, 1.0, 2.0), rpn_kwargs=None, roi_kwargs=None, mask=False, mask_channels=256):
        super().__init__()
        self.body = DetectionBody(arch, return_stages, pretrained, frozen_stages)
        self.fpn = FPN(self.body.out_channels, fpn_channels, extra_max_pool=True)
        strides = [*self.body.strides, self.body.strides[-1] * 2]  # + P6
        if anchor_sizes is None:
            anchor_sizes = [(4 * stride,) for stride in strides]
        anchor_generator = AnchorGenerator(anchor_sizes, (tuple(aspect_ratios),) * len(strides), strides)
        num_anchors = anchor_generator.num_anchors_per_location()
        if len(set(num_anchors)) != 1:
            raise ValueError(f"the shared RPN head needs as many anchors on every level, got {num_anchors}")
        self.rpn = RegionProposalNetwork(anchor_generator, RPNHead(fpn_channels, num_anchors[0]),
                                         **(rpn_kwargs or {}))
        pool = MultiScaleRoIAlign(self.body.strides, output_size=7, sampling_ratio=2)
        mask_branch = MaskBranch(MultiScaleRoIAlign(self.body.strides, MASK_POOL_SIZE, sampling_ratio=2),
                                 fpn_channels, mask_channels, num_classes) if mask else None
        self.roi_heads = RoIHeads(pool, TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                                  FastRCNNPredictor(representation_size, num_classes + 1), **(roi_kwargs or {}),
                                  mask_branch=mask_branch)
        self.num_classes, self.mask = num_classes, mask

    def forward(self, images, targets=None):
        images, image_sizes = batch_images(images)
        if self.training:
            if targets is None:
                raise ValueError("FasterRCNN needs targets in training")
            if self.mask and not all("masks" in t for t in targets):
                raise ValueError("Mask R-CNN needs targets with masks in training")
            targets = [{"boxes": paddle.to_tensor(t["boxes"], dtype="float32").reshape([-1, 4]),
                        "labels": paddle.to_tensor(t["labels"], dtype="int64").reshape([-1]),
                        **({"masks": paddle.to_tensor(t["masks"], dtype="float32")} if self.mask else {})}
                       for t in targets]
        features = self.fpn(self.body(images))
        proposals, rpn_losses = self.rpn(features, image_sizes, targets)
        detections, head_losses = self.roi_heads(features, proposals, image_sizes, targets)
        return {**rpn_losses, **head_losses} if self.training else detections
