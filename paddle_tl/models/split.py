"""A network cut at a stage boundary: its bottom `k` stages and the rest (the
top stages and the head). When the bottom stages are frozen, their output
for an image never changes, so cached activations (transfer/feature_cache.py)
run the bottom once per image view and train the top on what it produced.

Only an architecture whose forward is a plain chain of top-level sublayers
(the zoo's `forward`) can be cut; a container whose parameters span several
stages (MobileNetV2's `features`) is opened into its children. Both halves
share the network's own sublayers, so training the top trains the network.
"""

import math

from paddle_tl.models.zoo import FLATTEN, stage_index
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def forward_steps(network, spec):
    """[(stage, layer)] in forward order, a parameterless step taking the
    stage of the step before it and the head counting as stage
    len(spec.stages); None when the architecture cannot be cut."""
    if spec.forward is None:
        return None
    sublayers = dict(network.named_sublayers())
    steps = []

    def add(path, layer):
        stages = {_stage(spec, name) for name, _ in layer.named_parameters(prefix=path)}
        if len(stages) > 1 and isinstance(layer, (paddle.nn.Sequential, paddle.nn.LayerList)):
            for name, child in layer.named_children():
                add(f"{path}.{name}", child)
        else:
            steps.append((max(stages) if stages else steps[-1][0] if steps else 0, layer))

    for path in spec.forward:
        if path == FLATTEN:
            steps.append((steps[-1][0], paddle.nn.Flatten(start_axis=1)))
        else:
            add(path, sublayers[path])
    return steps


def _stage(spec, name):
    index = stage_index(spec, name)
    return len(spec.stages) if index is None else index


def why_not_split(network, spec, boundary):
    """Why the network cannot be cut below stage `boundary`, or None."""
    steps = forward_steps(network, spec)
    if steps is None:
        return f"{spec.name} has no plain forward chain in the zoo to cut"
    stages = [stage for stage, _ in steps]
    if stages != sorted(stages):  # a step of a lower stage after a higher one: no clean boundary
        return f"the forward of {spec.name} does not run its stages in order"
    if not 0 < boundary < len(spec.stages):
        return f"stage boundary {boundary} is not inside the body's {len(spec.stages)} stages"
    return None


def split(network, spec, boundary):
    """(bottom, top): Sequentials of the network's own layers; top(bottom(x))
    equals network(x). The caller has checked why_not_split."""
    steps = forward_steps(network, spec)
    bottom = [layer for stage, layer in steps if stage < boundary]
    top = [layer for stage, layer in steps if stage >= boundary]
    return paddle.nn.Sequential(*bottom), paddle.nn.Sequential(*top)


def activation_shape(bottom, input_size):
    """The shape of one image's activations at the cut (C, H, W)."""
    bottom.eval()
    with paddle.no_grad():
        return tuple(bottom(paddle.zeros([1, 3, input_size, input_size], "float32")).shape[1:])


def activation_bytes(shape, images, itemsize):
    return math.prod(shape) * images * itemsize
