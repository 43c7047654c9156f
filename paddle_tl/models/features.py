"""The head's input features: the one place that knows where a network's
head is and how to tap what flows into it."""

import contextlib

from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def head_linear(network, spec):
    """The head as one Linear sublayer, or None when it is anything else."""
    if len(spec.head) != 1:
        return None
    layer = dict(network.named_sublayers()).get(spec.head[0])
    return layer if isinstance(layer, paddle.nn.Linear) else None


@contextlib.contextmanager
def _head_as_identity(network, spec):
    """The head swapped for Identity, so that the network outputs the head's input."""
    parent_path, _, attr = spec.head[0].rpartition(".")
    parent = dict(network.named_sublayers())[parent_path] if parent_path else network
    head = getattr(parent, attr)
    setattr(parent, attr, paddle.nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attr, head)
