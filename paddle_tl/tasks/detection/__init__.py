"""Object detection (Faster R-CNN + FPN on the zoo's backbones, issue 23).
So far the data and box layer and the network (docs/detection.md):

- data.py: PASCAL VOC and COCO readers, the DetectionDataset, the data check
  and the refusal of a class-folder dataset;
- boxes.py: IoU, box coder, anchors, matcher, sampler, NMS (paddle tensors);
- transforms.py: augmentation that moves boxes (flip, scale jitter) and the
  evaluation resize with its inverse back to original pixels;
- backbone.py, fpn.py, rpn.py, roi_heads.py, losses.py, faster_rcnn.py:
  the Faster R-CNN + FPN network and its losses on a zoo body.
"""
