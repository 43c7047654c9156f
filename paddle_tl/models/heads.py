"""Heads: what is built for the new task in place of the ImageNet
classifier (Arch.head). `linear` keeps the architecture's own Linear head;
`mlp` puts Linear(in, hidden) - activation - Dropout (per hidden width) -
Linear(hidden, classes) in its place, the "dense hidden layer with dropout"
of classic transfer-learning recipes. Either trains on cached features,
exports, and is recorded in checkpoints so that eval and export rebuild it."""

from paddle_tl.models.zoo import build_model
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

ACTIVATIONS = {"relu": paddle.nn.ReLU, "gelu": paddle.nn.GELU}


class MLPHead(paddle.nn.Sequential):
    def __init__(self, in_features, hidden, num_classes, dropout, activation):
        layers, width = [], in_features
        for size in hidden:
            layers += [paddle.nn.Linear(width, size), ACTIVATIONS[activation](), paddle.nn.Dropout(dropout)]
            width = size
        super().__init__(*layers, paddle.nn.Linear(width, num_classes))
        self.in_features = in_features


LINEAR = {"type": "linear"}


def build_network(spec, num_classes, kwargs, head):
    """A randomly initialised network of the architecture `spec` with
    constructor `kwargs` (Arch.kwargs) and the head `head` (Arch.head as a
    dict) for `num_classes` outputs."""
    return build_head(build_model(spec.name, num_classes, **kwargs), spec, head)


def build_head(network, spec, head):
    """Put the head `head` (Arch.head as a dict) into the network built from
    the architecture's table; `linear` leaves the network as built."""
    if head["type"] == "linear":
        return network
    parent_path, _, attr = spec.head[0].rpartition(".")
    parent = dict(network.named_sublayers())[parent_path] if parent_path else network
    linear = getattr(parent, attr, None)
    if len(spec.head) != 1 or not isinstance(linear, paddle.nn.Linear):
        # Users are refused this pair before a network is built (combinations.py:
        # Arch.head.type x Arch.name); reaching here is a caller's bug.
        raise ValueError(f"an {head['type']} head replaces a single Linear head, and the head of {spec.name} is "
                         f"{', '.join(spec.head)}")
    in_features, num_classes = linear.weight.shape
    setattr(parent, attr, MLPHead(in_features, list(head["hidden"]), num_classes, head["dropout"],
                                  head["activation"]))
    return network
