"""A network cut at a stage boundary computes what the whole network does,
at every boundary, with either head; architectures without a plain forward
chain are refused with the reason."""

import numpy as np
import pytest

from paddle_tl.models.heads import build_network
from paddle_tl.models.split import activation_shape, forward_steps, split, why_not_split
from paddle_tl.models.zoo import get_spec
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
MLP = {"type": "mlp", "hidden": [8], "dropout": 0.5, "activation": "relu"}


@pytest.mark.parametrize("name, kwargs, head", [
    ("resnet18", {}, {"type": "linear"}), ("resnet50", {}, MLP), ("mobilenet_v1", {"scale": 0.25}, MLP),
    ("mobilenet_v2", {"scale": 0.5}, {"type": "linear"}), ("mobilenet_v3_small", {"scale": 0.5}, {"type": "linear"}),
    ("mobilenet_v3_large", {"scale": 0.5}, {"type": "linear"}),
    ("efficientnet_lite0", {}, {"type": "linear"}), ("efficientnet_lite2", {}, MLP),
])
def test_top_of_bottom_is_the_network_at_every_boundary(name, kwargs, head):
    spec = get_spec(name)
    paddle.seed(0)
    network = build_network(spec, 3, kwargs, head)
    network.eval()  # dropout off, BatchNorm on its statistics: deterministic
    images = paddle.randn([2, 3, 64, 64])
    whole = network(images).numpy()
    stages = [stage for stage, _ in forward_steps(network, spec)]
    assert stages == sorted(stages) and stages[-1] == len(spec.stages)  # in order, ending with the head
    for boundary in range(1, len(spec.stages)):
        assert why_not_split(network, spec, boundary) is None
        bottom, top = split(network, spec, boundary)
        activations = bottom(images)
        assert tuple(activations.shape[1:]) == activation_shape(bottom, 64)
        np.testing.assert_allclose(top(activations).numpy(), whole, rtol=1e-5, atol=1e-5, err_msg=str(boundary))
        # Both halves hold the network's own parameters: training the top trains the network.
        assert {id(p) for p in top.parameters()} <= {id(p) for p in network.parameters()}


def test_architectures_without_a_forward_chain_and_boundaries_outside_the_body_are_refused():
    spec = get_spec("densenet121")
    network = build_network(spec, 3, {}, {"type": "linear"})
    assert why_not_split(network, spec, 2) == "densenet121 has no plain forward chain in the zoo to cut"
    spec = get_spec("mobilenet_v1")
    network = build_network(spec, 3, {"scale": 0.25}, {"type": "linear"})
    assert why_not_split(network, spec, 5) == "stage boundary 5 is not inside the body's 5 stages"
