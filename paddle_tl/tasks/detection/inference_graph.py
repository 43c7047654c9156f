"""The trained FasterRCNN as one function of a prepared image that export
can trace into a static graph (paddle.jit.save), the way PaddleDetection's
exported detectors work: inputs `image`, `im_shape` and `scale_factor`,
outputs boxes in the ORIGINAL image's pixels, scores and class ids after
NMS, so a deployment needs no Python of ours past the resize.

Inputs (one image: batch 1):
- image float32 [1, 3, H, W]: the image resized as EvalTransform does
  (the shorter side to short_side, the longer at most max_size), normalised
  with the body's mean and std, zero-padded at the bottom and right to H, W
  multiples of 32 (faster_rcnn.batch_images' padding);
- im_shape float32 [1, 2]: (height, width) of the resized image before
  padding, which proposals and detections are clipped to;
- scale_factor float32 [1, 2]: (y, x) resized / original size, which the
  boxes are divided by on the way out (transforms.to_original).

The graph runs the network's own layers and its own postprocessing code
(rpn.filter_proposals, RoIHeads.postprocess): those are written so that
they trace, with no Python branch on a tensor's value or size, so the
dynamic network and the exported graph compute the same numbers.
"""

from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.boxes import clip_boxes

paddle = import_paddle()

INPUT_NAMES = ("image", "im_shape", "scale_factor")
OUTPUT_NAMES = ("boxes", "scores", "label_ids")


class InferenceDetector(paddle.nn.Layer):
    """forward(image, im_shape, scale_factor) -> (boxes float32 [D, 4] x1y1x2y2
    in the original image's pixels, scores float32 [D], label ids int64 [D]
    in 0..K-1), best first, D <= detections_per_image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    # Traced as plain Python, not rewritten by dy2static: no branch here or
    # below depends on a tensor's value, and dy2static would turn those on
    # shapes (a count of -1 while tracing) into graph conditionals.
    @paddle.jit.not_to_static
    def forward(self, image, im_shape, scale_factor):
        model = self.model
        features = model.fpn(model.body(image))
        size = (im_shape[0, 0], im_shape[0, 1])
        objectness, deltas = model.rpn.head(features)
        shapes = [paddle.shape(feature) for feature in features]
        anchors = model.rpn.anchor_generator([(shape[2], shape[3]) for shape in shapes])
        proposals = model.rpn.filter_proposals(anchors, objectness, deltas, [size])
        found = model.roi_heads(features, proposals, [size])[0][0]
        return to_original(found["boxes"], im_shape, scale_factor), found["scores"], found["labels"]

    @staticmethod
    def input_spec():
        """The inputs as paddle.jit.save declares them: one image of any size."""
        spec = paddle.static.InputSpec
        return [spec([1, 3, None, None], "float32", INPUT_NAMES[0]), spec([1, 2], "float32", INPUT_NAMES[1]),
                spec([1, 2], "float32", INPUT_NAMES[2])]


def to_original(boxes, im_shape, scale_factor):
    """transforms.to_original in graph ops: boxes divided by the scale, then
    clipped to the original image, whose size is the resized size over the
    scale, rounded (the resize rounded the other way)."""
    scale_x, scale_y = scale_factor[:, 1:], scale_factor[:, :1]
    # [1, 4] from slices: oneDNN mis-broadcasts a stack of 0-D tensors (Paddle 3.3.1)
    boxes = boxes / paddle.concat([scale_x, scale_y, scale_x, scale_y], axis=1)
    original = paddle.round(im_shape[0] / scale_factor[0])
    return clip_boxes(boxes, original[0], original[1])
