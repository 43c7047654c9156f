"""Grad-CAM (Selvaraju et al. 2017): where in an image the evidence for a
class lies, for a dynamic paddle network, and that heat map blended over the
image.

The map is taken at the output of the architecture table's last convolutional
stage: the last entry of `spec.stages` whose output (the output of the last of
its layers to run, found by a forward hook) is a 4-D feature map larger than
1 x 1. For most entries that is the last stage; for VGG, AlexNet,
MobileNetV3 and PP-LCNet the last stage is the pre-logits layers after the
global pool (2-D, or PP-LCNet's 1 x 1 `last_conv`), so the stage before it is
used. Where a stage's last layer is a convolution or BatchNorm without its
activation (VGG, AlexNet list only the layers holding parameters), the map
is taken before that ReLU.

Weights are the spatial mean of the gradient of the class logit with respect
to that activation; the map is ReLU(sum over channels of weight x
activation), upsampled bilinearly to the input's size and divided by its
maximum (a map with no positive evidence stays all zero)."""

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from paddle_tl.data.datasets import load_rgb
from paddle_tl.data.transforms import eval_crop_box, eval_transform
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

# Outside the crop the network saw, the overlay shows the image at this brightness.
OUTSIDE_CROP_BRIGHTNESS = 0.4


def grad_cam(network, spec, images, classes=None):
    """(maps [N, H, W] float32 in [0, 1], classes [N], stage index) for
    preprocessed `images` [N, 3, H, W] (numpy or paddle): the Grad-CAM of
    `classes` (an int for every image, one per image, or None for each
    image's top logit) at the last stage with a spatial feature map.

    Runs in eval mode (BatchNorm with its running statistics, no dropout);
    the network's parameters, their gradients, BatchNorm statistics and the
    train/eval mode of every sublayer are as they were afterwards. Frozen
    stages (parameters with stop_gradient) need nothing: the activation is
    made to require a gradient itself, and only its gradient is computed."""
    images = paddle.to_tensor(images) if isinstance(images, np.ndarray) else images
    captured = {}
    with _eval_mode(network), _stage_outputs(network, spec, captured), paddle.set_grad_enabled(True):
        logits = network(images)
        stage = _last_spatial_stage(captured, spec)
        activation = captured[stage]
        chosen = _classes(classes, logits)
        score = paddle.take_along_axis(logits, paddle.to_tensor(chosen.reshape(-1, 1)), axis=1).sum()
        # Only the activation's gradient: parameters' .grad (and their hooks, such as L2-SP's) are untouched.
        gradient, = paddle.grad(score, activation)
        weights = gradient.mean(axis=(2, 3), keepdim=True)
        cam = paddle.nn.functional.relu((weights * activation).sum(axis=1, keepdim=True)).detach()
    cam = paddle.nn.functional.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)
    maps = cam.numpy()[:, 0].clip(min=0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    maps = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
    return maps.astype(np.float32), chosen, stage


def _classes(classes, logits):
    count = logits.shape[0]
    if classes is None:
        return logits.numpy().argmax(axis=1).astype(np.int64)
    chosen = np.broadcast_to(np.asarray(classes, dtype=np.int64), (count,)).copy()
    if chosen.min() < 0 or chosen.max() >= logits.shape[1]:
        raise ValueError(f"classes {chosen.tolist()} out of range for {logits.shape[1]} outputs")
    return chosen


@contextlib.contextmanager
def _eval_mode(network):
    """network.eval() for the context; then every sublayer's own `training`
    flag back (a frozen BatchNorm may be in eval inside a training network),
    and the dygraph tracer's train mode, which Layer.train/eval also set."""
    layers = [network, *network.sublayers()]
    flags = [layer.training for layer in layers]
    tracer = paddle.base.framework._dygraph_tracer()
    tracer_mode = tracer._train_mode
    network.eval()
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.training = flag
        tracer._train_mode = tracer_mode


@contextlib.contextmanager
def _stage_outputs(network, spec, captured):
    """Within the context, captured[i] is the output of the last layer of
    spec.stages[i] to run, made to require a gradient (it does not when every
    layer below it is frozen: paddle records no graph for those)."""
    layers = dict(network.named_sublayers())

    def hook_for(index):
        def hook(_layer, _inputs, output):
            if isinstance(output, paddle.Tensor):
                if output.stop_gradient:
                    output.stop_gradient = False
                captured[index] = output
        return hook

    handles = [layers[prefix].register_forward_post_hook(hook_for(index))
               for index, stage in enumerate(spec.stages) for prefix in stage if prefix in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _last_spatial_stage(captured, spec):
    for index in sorted(captured, reverse=True):
        shape = captured[index].shape
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            return index
    raise ValueError(f"{spec.name}: no stage of its table entry outputs a spatial feature map for Grad-CAM")


def overlay(image, heat, pre=None, alpha=0.5, colormap="jet"):
    """A PIL RGB image: `heat` ([h, w] in [0, 1], e.g. one map of grad_cam)
    as a colour map blended over `image` (PIL). With `pre` (the Preprocess
    the map was computed under), `image` is the original picture: the map
    covers the center crop the network saw, at the original resolution, and
    the rest is dimmed. Without it, the map is stretched over the whole image."""
    from matplotlib import colormaps

    image = image.convert("RGB")
    width, height = image.size
    box = eval_crop_box(width, height, pre) if pre is not None else (0, 0, width, height)
    left, top, right, bottom = (int(round(v)) for v in box)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    heat = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((right - left, bottom - top), Image.BILINEAR)
    colours = colormaps[colormap](np.clip(np.asarray(heat), 0, 1))[..., :3]
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    blended = pixels * OUTSIDE_CROP_BRIGHTNESS if pre is not None else pixels.copy()
    inside = pixels[top:bottom, left:right]
    blended[top:bottom, left:right] = (1 - alpha) * inside + alpha * colours[: inside.shape[0], : inside.shape[1]]
    return Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8))


class OverlayWriter:
    """Writes `out_dir/[subfolder/]<image stem>_cam.png`: the Grad-CAM of a
    class over an image file, preprocessed by `pre`'s eval transform,
    blended over the original picture (see overlay); images are gathered
    into batches of `batch_size`. A name already written gets a number
    (`<stem>_cam_2.png`), never overwrites. Use as a context manager, or call
    close() to write the rest."""

    def __init__(self, network, spec, pre, out_dir, batch_size=8):
        self.network, self.spec, self.pre, self.batch_size = network, spec, pre, batch_size
        self.transform = eval_transform(pre)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending = []
        self.targets = set()
        self.written = []

    def add(self, path, class_id, subfolder=""):
        stem = Path(subfolder) / f"{Path(path).stem}_cam"
        target, number = self.out_dir / f"{stem}.png", 1
        while target in self.targets:
            number += 1
            target = self.out_dir / f"{stem}_{number}.png"
        self.targets.add(target)
        self.pending.append((path, int(class_id), target))
        if len(self.pending) >= self.batch_size:
            self._write()

    def close(self):
        if self.pending:
            self._write()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self):
        pictures = [load_rgb(path) for path, _, _ in self.pending]
        images = np.stack([self.transform(picture) for picture in pictures])
        maps, _, _ = grad_cam(self.network, self.spec, images, [class_id for _, class_id, _ in self.pending])
        for (_, _, target), picture, heat in zip(self.pending, pictures, maps):
            target.parent.mkdir(parents=True, exist_ok=True)
            overlay(picture, heat, self.pre).save(target)
            self.written.append(target)
        self.pending = []
