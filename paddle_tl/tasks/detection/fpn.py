"""Feature Pyramid Network (Lin et al., 2017), as torchvision's
FeaturePyramidNetwork with LastLevelMaxPool: a 1x1 lateral conv per body
level, a top-down pathway adding each coarser merged map, upsampled (nearest)
to the finer one's size, and a 3x3 output conv per level; one extra, coarser
level (P6) by max-pooling the coarsest output with kernel 1 and stride 2,
which the RPN uses and the RoI heads do not. `out_channels` is one number
for every level (256 in the paper; 64-128 keeps CPU training fast)."""

from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def _conv(in_channels, out_channels, kernel):
    # torchvision: kaiming_uniform_(a=1), zero bias.
    return paddle.nn.Conv2D(in_channels, out_channels, kernel, padding=kernel // 2,
                            weight_attr=paddle.nn.initializer.KaimingUniform(negative_slope=1.0),
                            bias_attr=paddle.nn.initializer.Constant(0.0))


def upsample_nearest(x, like):
    """x [B, C, h, w] resized to like's H x W by nearest neighbour: what
    F.interpolate(x, size=(H, W), mode="nearest") computes (source row
    floor(r * h / H), here in integers), as two gathers. To a size, not by a
    factor of 2: an odd-sized finer map is not twice the coarser one. Not
    interpolate itself: with a size known only when an exported graph runs
    (inference_graph.py), Paddle Inference's oneDNN kernel cannot run it
    (Paddle 3.3.1: "ConvertPirAttribute2RuntimeAttribute not support")."""
    small, large = paddle.shape(x), paddle.shape(like)
    rows = paddle.arange(large[2]) * small[2] // large[2]
    cols = paddle.arange(large[3]) * small[3] // large[3]
    return paddle.gather(paddle.gather(x, rows, axis=2), cols, axis=3)


class FPN(paddle.nn.Layer):
    """[C_l maps, finest first] -> [P_l maps of out_channels] (+ P6 with
    `extra_max_pool`), finest first."""

    def __init__(self, in_channels, out_channels=128, extra_max_pool=True):
        super().__init__()
        self.lateral = paddle.nn.LayerList([_conv(c, out_channels, 1) for c in in_channels])
        self.output = paddle.nn.LayerList([_conv(out_channels, out_channels, 3) for _ in in_channels])
        self.out_channels, self.extra_max_pool = out_channels, extra_max_pool

    def forward(self, features):
        merged = self.lateral[-1](features[-1])
        outputs = [self.output[-1](merged)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral[index](features[index])
            merged = lateral + upsample_nearest(merged, lateral)
            outputs.insert(0, self.output[index](merged))
        if self.extra_max_pool:
            outputs.append(paddle.nn.functional.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
