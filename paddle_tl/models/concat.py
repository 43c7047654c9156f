"""Concatenated backbones: several pretrained bodies read one shared input,
their pooled features are concatenated, and one Linear head classifies them.

The architecture is named by its bodies joined with "+" (`Arch.name:
mobilenet_v2+efficientnet_lite0`), so that the zoo, the checkpoint's model
record (runs/run_folder.py describe_model/rebuild_model), export and
inference treat it as any other architecture.

Why one shared input: a static model has one image input and inference.yml
one preprocessing. The shared input is the first body's crop (its
input_size and resize_short) scaled to [0, 1] (mean 0, std 1); each body
then applies its own normalisation and, where its native size differs,
resizes to it inside the network. Where the bodies share their geometry
(MobileNetV2 and EfficientNet-Lite0: 224 px from a 256 px short side)
every body sees exactly its native preprocessing.

The bodies never train (combinations.py refuses a strategy that would):
only the head does, which is what makes measuring them cheap
(engine/backbones.py) and what `auto` offers them for.
"""

import numpy as np

from paddle_tl.errors import ConfigError
from paddle_tl.models.features import feature_head, feature_size
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

SEPARATOR = "+"
# The shared input is scaled to [0, 1] only; each body normalises it itself.
SHARED_MEAN = (0.0, 0.0, 0.0)
SHARED_STD = (1.0, 1.0, 1.0)


def is_concatenation(name):
    return SEPARATOR in name


def concatenation_name(names):
    return SEPARATOR.join(names)


def body_names(name):
    """The bodies of a concatenation's name, refused where it cannot be one."""
    names = name.split(SEPARATOR)
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"Arch.name: {name!r} is not a concatenation of different architectures "
                          "(name them joined with '+', e.g. mobilenet_v2+efficientnet_lite0)")
    return names


def concatenation_spec(name):
    """The zoo's table entry of a concatenation: one stage per body (all
    frozen while it trains), the shared head, the first body's crop."""
    from paddle_tl.models.zoo import ArchSpec, get_spec

    specs = [get_spec(body) for body in body_names(name)]
    first = specs[0]
    return ArchSpec(name, "concat", ("head",), tuple((f"bodies.{index}",) for index in range(len(specs))),
                    input_size=first.input_size, resize_short=first.resize_short, mean=SHARED_MEAN, std=SHARED_STD)


class ConcatenatedBodies(paddle.nn.Layer):
    """Bodies (each a zoo network whose head is removed) over one shared
    [0, 1] input, their pooled features concatenated into one Linear head."""

    def __init__(self, names, num_classes):
        super().__init__()
        from paddle_tl.models.zoo import build_model, get_spec

        self.names, self.sizes = list(names), []
        bodies, widths = [], []
        for name in names:
            spec = get_spec(name)
            body = build_model(name, 1)
            head = feature_head(body, spec)
            if not isinstance(head, paddle.nn.Linear):
                raise ConfigError(f"Arch.name: {name} cannot be concatenated: its head is not one Linear layer")
            widths.append(feature_size(head))
            _drop_head(body, spec)
            bodies.append(body)
            self.sizes.append(spec.input_size)
            scale = paddle.to_tensor([1 / s for s in spec.std], dtype="float32").reshape([1, 3, 1, 1])
            shift = paddle.to_tensor([-m / s for m, s in zip(spec.mean, spec.std)], dtype="float32")
            # Constants of the architecture, not weights: kept out of the state dict.
            self.register_buffer(f"scale{len(bodies) - 1}", scale, persistable=False)
            self.register_buffer(f"shift{len(bodies) - 1}", shift.reshape([1, 3, 1, 1]), persistable=False)
        self.bodies = paddle.nn.LayerList(bodies)
        self.head = paddle.nn.Linear(sum(widths), num_classes)

    def forward(self, images):
        features = []
        for index, (body, size) in enumerate(zip(self.bodies, self.sizes)):
            x = images * getattr(self, f"scale{index}") + getattr(self, f"shift{index}")
            if size != images.shape[-1]:
                x = _resized(x, size)
            features.append(body(x))
        return self.head(paddle.concat(features, axis=1))

    def train(self):
        # The bodies never train: their Dropout (and BatchNorm) stay as in evaluation.
        super().train()
        self.bodies.eval()
        return self


def _resized(images, size):
    """Bilinear resize (half-pixel centres, as interpolate's align_corners=False)
    as two matrix products: Paddle Inference's oneDNN cannot run the
    bilinear_interp op of a static model (PIR's double-array attribute)."""
    rows = paddle.to_tensor(_bilinear_matrix(images.shape[-2], size))
    columns = paddle.to_tensor(_bilinear_matrix(images.shape[-1], size).T.copy())
    return paddle.matmul(paddle.matmul(rows, images), columns)


def _bilinear_matrix(source, target):
    """[target, source]: each output pixel's weights over the input pixels."""
    matrix = np.zeros((target, source), dtype="float32")
    for index in range(target):
        position = max((index + 0.5) * source / target - 0.5, 0.0)
        low = min(int(position), source - 1)
        high, weight = min(low + 1, source - 1), position - low
        matrix[index, low] += 1 - weight
        matrix[index, high] += weight
    return matrix


def build_concatenation(name, num_classes, **kwargs):
    if kwargs:
        raise ConfigError(f"Arch.kwargs: a concatenation ({name}) takes no constructor arguments, got "
                          f"{', '.join(sorted(kwargs))}")
    return ConcatenatedBodies(body_names(name), num_classes)


def _drop_head(network, spec):
    """The network outputs its head's input from now on (models.features.headless, for good)."""
    parent_path, _, attr = spec.head[0].rpartition(".")
    parent = dict(network.named_sublayers())[parent_path] if parent_path else network
    setattr(parent, attr, paddle.nn.Identity())


def load_pretrained_bodies(network, pretrained, sha256=None):
    """Each body's pretrained weights: `pretrained` (Arch.pretrained) into the
    first, whose architecture the config named before `auto` concatenated
    others to it; ImageNet's into the others. Returns the load reports."""
    from paddle_tl.models.weights import load_pretrained
    from paddle_tl.models.zoo import get_spec

    reports = []
    for index, (name, body) in enumerate(zip(network.names, network.bodies)):
        spec = get_spec(name)
        source, digest = (pretrained, sha256) if index == 0 else ("imagenet", None)
        reports.append(load_pretrained(body, source, spec.head, imagenet_url=spec.imagenet_url,
                                       imagenet_md5=spec.imagenet_md5, sha256=digest, arch=spec.name,
                                       imagenet_package=spec.imagenet_package,
                                       imagenet_sha256=spec.imagenet_sha256))
    return reports
