"""The detector's body: a zoo classification network tapped at stage
boundaries, returning the feature maps FPN builds on (by default the ends of
stages 2, 3 and 4: strides 8, 16 and 32 for mobilenet_v2, the ResNet family
and efficientnet_lite0 alike, as the zoo's stages end where the map shrinks).

One way to tap a network: models/split.py's forward chain (the zoo's
`forward` opened into steps, each tagged with its stage), run up to the
global pool, keeping the output of the last step of each requested stage.
An architecture without a plain forward chain in the zoo cannot be a body.

BatchNorm: every BatchNorm of the body is frozen, as Detectron2's FrozenBN
and torchvision's FrozenBatchNorm2d do: its running statistics are used in
training too (`use_global_stats=True`, which also keeps them from being
updated) and its scale and shift do not train. Detectors train on 1-4 large
images per batch, too few to estimate batch statistics, so the ImageNet
statistics are kept throughout; the convolutions of the stages above
`frozen_stages` still train.
"""

from paddle_tl.models.split import forward_steps
from paddle_tl.models.weights import load_pretrained
from paddle_tl.models.zoo import build_model, get_spec
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.freezing import is_batch_norm

paddle = import_paddle()

# Steps that end the convolutional body: from the global pool on, the chain
# is the classifier's (and MobileNetV3's pre-logits stage).
_POOLS = (paddle.nn.AdaptiveAvgPool2D, paddle.nn.AdaptiveMaxPool2D, paddle.nn.Flatten)


class DetectionBody(paddle.nn.Layer):
    """`arch`'s body returning [feature map at the end of each of
    `return_stages`], bottom first. `pretrained`: None (random weights),
    "imagenet" or a weights file (models/weights.load_pretrained's sources).
    `frozen_stages`: the bottom stages whose weights do not train (2 freezes
    stride 2 and 4 as torchvision's trainable_backbone_layers=3 does for
    ResNet-50). `out_channels` and `strides` are measured on a dummy image."""

    def __init__(self, arch="mobilenet_v2", return_stages=(2, 3, 4), pretrained=None, frozen_stages=2):
        super().__init__()
        spec = get_spec(arch)
        network = build_model(arch, 1)  # the 1-way head is cut off below
        if pretrained:
            self.load_report = load_pretrained(
                network, pretrained, spec.head, imagenet_url=spec.imagenet_url, imagenet_md5=spec.imagenet_md5,
                arch=spec.name, imagenet_package=spec.imagenet_package, imagenet_sha256=spec.imagenet_sha256)
        steps = forward_steps(network, spec)
        if steps is None:
            raise ValueError(f"{arch} has no plain forward chain in the zoo to tap for detection features")
        body = []
        for stage, layer in steps:
            if isinstance(layer, _POOLS):
                break
            body.append((stage, layer))
        stages = [stage for stage, _ in body]
        if stages != sorted(stages):
            raise ValueError(f"the forward of {arch} does not run its stages in order")
        missing = sorted(set(return_stages) - set(stages))
        if missing or list(return_stages) != sorted(set(return_stages)):
            raise ValueError(f"return_stages {tuple(return_stages)} must be increasing stages of {arch}'s "
                             f"convolutional body, stages {sorted(set(stages))}")
        last = max(return_stages)
        body = [(stage, layer) for stage, layer in body if stage <= last]
        self.arch, self.return_stages, self.frozen_stages = arch, tuple(return_stages), frozen_stages
        self.step_stages = [stage for stage, _ in body]
        self.steps = paddle.nn.LayerList([layer for _, layer in body])
        # The output of a stage is that of its last step.
        self._taps = {max(i for i, s in enumerate(self.step_stages) if s == stage) for stage in return_stages}
        self._freeze()
        self.out_channels, self.strides = self._measure()

    def _freeze(self):
        for stage, layer in zip(self.step_stages, self.steps):
            for param in layer.parameters():
                if stage < self.frozen_stages:
                    param.stop_gradient = True
        for layer in self.sublayers():
            if is_batch_norm(layer):
                layer._use_global_stats = True  # normalise with, and keep, the stored statistics
                for param in (layer.weight, layer.bias):
                    if param is not None:
                        param.stop_gradient = True

    def _measure(self, size=128):
        was_training = self.training
        self.eval()
        with paddle.no_grad():
            maps = self(paddle.zeros([1, 3, size, size], "float32"))
        if was_training:
            self.train()
        return [m.shape[1] for m in maps], [size // m.shape[2] for m in maps]

    def forward(self, images):
        features, x = [], images
        for index, layer in enumerate(self.steps):
            x = layer(x)
            if index in self._taps:
                features.append(x)
        return features
