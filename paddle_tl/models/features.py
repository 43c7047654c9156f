"""The head's input features: the one place that knows where a network's
head is and the one way to tap what flows into it (the network with its head
swapped for Identity outputs exactly the head's input). Cached features,
the similarity probe and domain adaptation all go through `headless`."""

import contextlib

from paddle_tl.models.heads import MLPHead
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def feature_head(network, spec):
    """The head as one sublayer fed with feature vectors (a Linear, or
    models.heads' MLP head), or None when it is anything else."""
    if len(spec.head) != 1:
        return None
    layer = dict(network.named_sublayers()).get(spec.head[0])
    return layer if isinstance(layer, (paddle.nn.Linear, MLPHead)) else None


def feature_size(head):
    """The width of the features a feature_head takes."""
    return head.in_features if isinstance(head, MLPHead) else head.weight.shape[0]


@contextlib.contextmanager
def headless(network, spec):
    """Within the context the network outputs its head's input (the head is
    swapped for Identity); yields the head layer. Needs a feature_head,
    which is the network's last operation."""
    parent_path, _, attr = spec.head[0].rpartition(".")
    parent = dict(network.named_sublayers())[parent_path] if parent_path else network
    head = getattr(parent, attr)
    setattr(parent, attr, paddle.nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def features_and_logits(network, spec, images):
    """(head input, logits) of one forward pass."""
    with headless(network, spec) as head:
        features = network(images)
    return features, head(features)
