"""Test-time augmentation (DataLoader.Eval.tta): a prediction averaged over
views of each image (numpy only).

- flip: the crop evaluation prepares, and its horizontal mirror (2 views).
- flip_crops: five crops of the network's input size, the center and the
  four corners, of the resize_short x resize_short square at the image's
  center (for ImageNet models 224 of 256, the classic ten-crop), each also
  mirrored (10 views). Its input is that larger square (tta_input), which
  the views crop.

Every view's probabilities are calibrated first, softmax(logits /
temperature), and then averaged (the usual choice: a confident view cannot
outvote the others by its logits' scale alone). The average goes on as
logits again, temperature * log(mean probability), so that whatever follows
unchanged, softmax(logits / temperature) in the Predictor, top-k and the
loss in evaluation, sees exactly the averaged probabilities. With `none`
the network's own logits pass through untouched.
"""

import dataclasses

import numpy as np

from paddle_tl.calibration import softmax


def _mirrored(batches):
    return [view for batch in batches for view in (batch, batch[..., ::-1])]


def _five_crops(batch, size):
    far = batch.shape[-1] - size
    corners = [(far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far)]  # (top, left), the center first
    return [batch[..., top:top + size, left:left + size] for top, left in corners]


# DataLoader.Eval.tta -> the views of a batch of tta_input images, given the network's input size
MODES = {
    "none": lambda batch, size: [batch],
    "flip": lambda batch, size: _mirrored([batch]),
    "flip_crops": lambda batch, size: _mirrored(_five_crops(batch, size)),
}


def tta_input(pre, mode):
    """The Preprocess of the images `mode` takes views of: evaluation's own,
    or for flip_crops the resize_short square its crops come from."""
    return dataclasses.replace(pre, input_size=pre.resize_short) if mode == "flip_crops" else pre


def views(batch, mode, size):
    """The batches [N, 3, size, size] the network runs on for `mode`, the
    plain (center) one first."""
    return [np.ascontiguousarray(view) for view in MODES[mode](np.asarray(batch), size)]


def with_tta(run, mode, size, temperature=1.0):
    """run(images [N, 3, size, size] numpy) -> logits, averaged over the
    views of `mode` of tta_input images as the module says; `run` itself
    when mode is none."""
    if mode == "none":
        return run

    def averaged(batch):
        probabilities = np.mean([softmax(run(view), temperature) for view in views(batch, mode, size)], axis=0)
        # The floor keeps a probability that underflowed to 0 a finite logit.
        logits = temperature * np.log(np.maximum(probabilities, np.finfo(np.float64).tiny))
        return logits.astype(np.float32)

    return averaged
