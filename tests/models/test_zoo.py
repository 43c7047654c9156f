"""paddle_tl.zoo: every table entry checked against the model it describes (no network)."""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_tl.models import zoo
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

ALL = zoo.list_architectures()
# Full spec-size input where the model needs it (AlexNet flattens a fixed 6x6 map;
# InceptionV3 shrinks to 1x1 at 64 px) plus the two everyday models; 64 px keeps
# the other forward passes cheap.
FULL_SIZE = {"alexnet", "inception_v3", "mobilenet_v2", "resnet18"}
# Not pytest.importorskip: importing paddleclas here, outside zoo's logging
# containment, would reconfigure this process's logging.
HAS_CLAS = importlib.util.find_spec("paddleclas") is not None
needs_clas = pytest.mark.skipif(not HAS_CLAS, reason="optional paddleclas not installed")


@pytest.fixture(scope="module")
def cheap_init():
    """Constant default initialisers: drawing random weights (100M for VGG's fc6)
    dominates build time, and these tests only look at names and shapes."""
    from paddle.nn.initializer import Constant, set_global_initializer

    set_global_initializer(Constant(0.01), Constant(0.0))
    yield
    set_global_initializer(None, None)


@pytest.mark.parametrize("name", ALL)
def test_entry_matches_model(name, cheap_init):
    spec = zoo.get_spec(name)
    model = zoo.build_model(name, 7)
    model.eval()
    params = dict(model.named_parameters())
    sublayers = dict(model.named_sublayers())
    groups = [*spec.stages, spec.head]

    # Every prefix is a real sublayer that owns parameters (no stale or empty entry).
    for prefix in (p for group in groups for p in group):
        assert prefix in sublayers, f"{name}: {prefix!r} is not a sublayer"
        assert any(zoo.match_prefix(n, prefix) for n in params), f"{name}: {prefix!r} has no parameters"

    # Stages + head partition the parameters, and stage_index agrees.
    for param_name in params:
        hits = [i for i, group in enumerate(groups) if zoo.match_prefix(param_name, group)]
        assert len(hits) == 1, f"{name}: {param_name} is in groups {hits}"
        expected = None if hits[0] == len(spec.stages) else hits[0]
        assert zoo.stage_index(spec, param_name) == expected

    # The head is exactly the parameters whose shapes depend on the class count
    # (a lazy build allocates nothing, so the second build is cheap).
    with paddle.LazyGuard():
        other = zoo.build_model(name, 9)
    changed = {n for n, p in other.named_parameters() if list(p.shape) != list(params[n].shape)}
    head = {n for n in params if zoo.match_prefix(n, spec.head)}
    assert changed == head, f"{name}: class-dependent {sorted(changed)} != head {sorted(head)}"

    # One forward pass; hooks record each stage's output resolution.
    sizes = [[] for _ in spec.stages]
    for index, stage in enumerate(spec.stages):
        for prefix in stage:
            sublayers[prefix].register_forward_post_hook(
                lambda layer, inputs, out, index=index: sizes[index].append(out.shape[2] if out.ndim == 4 else 1)
            )
    size = spec.input_size if name in FULL_SIZE else 64
    with paddle.no_grad():
        logits = model(paddle.rand([2, 3, size, size]))
    assert list(logits.shape) == [2, 7]

    # Stages follow resolution: one resolution per stage (valid padding may trim a
    # few pixels), strictly coarser than the stage below; pooled pre-logits last.
    for index, stage_sizes in enumerate(sizes):
        assert max(stage_sizes) < 2 * min(stage_sizes), f"{name}: stage {index} spans a downsampling: {stage_sizes}"
    for index in range(1, len(sizes)):
        assert max(sizes[index]) < min(sizes[index - 1]), f"{name}: stage {index} is not coarser: {sizes}"


def test_covers_every_paddle_vision_factory():
    factories = [n for n, f in inspect.getmembers(paddle.vision.models, inspect.isfunction) if not n.startswith("_")]
    assert len(factories) > 30
    for factory in factories:
        if factory not in ALL:
            with pytest.raises(ValueError, match="not supported"):
                zoo.get_spec(factory)


def test_list_is_sorted_and_specs_are_consistent():
    assert ALL == sorted(ALL, key=str.lower)
    for name in ALL:
        spec = zoo.get_spec(name)
        assert spec.name == name
        assert spec.source in ("paddle.vision", "paddleclas", "paddle_tl")
        assert spec.stages and all(spec.stages) and spec.head
        assert spec.imagenet_url is None or spec.imagenet_url.startswith("https://")
        if spec.imagenet_md5 is not None:
            assert len(spec.imagenet_md5) == 32


def test_spec_metadata():
    from paddle.vision.models import mobilenetv1, resnet

    spec = zoo.get_spec("resnet50")
    assert (spec.imagenet_url, spec.imagenet_md5) == resnet.model_urls["resnet50"]
    assert spec.stages[0] == ("conv1", "bn1") and spec.head == ("fc",)
    assert (zoo.get_spec("mobilenet_v1").imagenet_url, zoo.get_spec("mobilenet_v1").imagenet_md5) == (
        mobilenetv1.model_urls["mobilenetv1_1.0"]
    )
    inception = zoo.get_spec("inception_v3")
    assert (inception.input_size, inception.resize_short) == (299, 342)
    assert (spec.input_size, spec.resize_short, spec.mean, spec.std) == (
        224, 256, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD
    )
    assert zoo.get_spec("vgg11").imagenet_url is None  # paddle.vision ships only vgg16/vgg19
    assert zoo.get_spec("vgg16_bn").imagenet_url is None


def test_match_prefix():
    assert zoo.match_prefix("fc.weight", ("fc",))
    assert zoo.match_prefix("fc", "fc")
    assert not zoo.match_prefix("fc1.weight", ("fc",))
    assert zoo.match_prefix("features.0.1._mean", ("features.0",))
    assert not zoo.match_prefix("features.01.weight", ("features.0",))
    assert not zoo.match_prefix("features.0.weight", ())


def test_stage_index():
    spec = zoo.get_spec("resnet18")
    assert zoo.stage_index(spec, "bn1.weight") == 0
    assert zoo.stage_index(spec, "layer4.1.conv2.weight") == 4
    assert zoo.stage_index(spec, "fc.bias") is None
    with pytest.raises(ValueError, match="layer5.0.weight"):
        zoo.stage_index(spec, "layer5.0.weight")


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'.*resnet18"):
        zoo.get_spec("resnet19")
    with pytest.raises(ValueError, match="mobilenet_v2"):  # case-insensitive matching
        zoo.get_spec("MobileNet_V2")


@pytest.mark.skipif(HAS_CLAS, reason="paddleclas is installed")
def test_paddleclas_name_hints_at_extra():
    with pytest.raises(ValueError, match=r'pip install -e "\.\[clas\]"'):
        zoo.get_spec("PPLCNet_x1_0")
    with pytest.raises(ValueError) as info:
        zoo.get_spec("resnet_18")
    assert "clas" not in str(info.value)


@pytest.mark.parametrize("name", ["googlenet", "lenet"])
def test_unsupported_architectures_say_why(name):
    with pytest.raises(ValueError, match=f"'{name}' is not supported"):
        zoo.get_spec(name)
    with pytest.raises(ValueError, match="not supported"):
        zoo.build_model(name, 3)


def test_bad_kwargs_name_the_accepted_ones():
    with pytest.raises(ValueError, match="resnet18 does not accept with_pol; accepted keyword arguments: none"):
        zoo.build_model("resnet18", 3, with_pol=False)
    with pytest.raises(ValueError, match="does not accept scal; accepted keyword arguments: scale"):
        zoo.build_model("mobilenet_v1", 3, scal=0.5)
    with pytest.raises(ValueError, match="never downloads"):
        zoo.build_model("resnet18", 3, pretrained=True)
    with pytest.raises(ValueError, match="vgg16_bn"):
        zoo.build_model("vgg16", 3, batch_norm=True)
    with pytest.raises(ValueError, match="does not accept class_num"):
        zoo.build_model("resnet18", 3, class_num=4)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            zoo.build_model("resnet18", bad)


def test_kwargs_are_forwarded():
    model = zoo.build_model("mobilenet_v1", 3, scale=0.25)
    assert list(model.fc.weight.shape) == [256, 3]


@pytest.mark.parametrize("name, file, kwargs", [
    ("mobilenet_v2", "mobilenet_v2_imagenet.pdparams", {}),
    ("mobilenet_v1", "mobilenet_v1_x0.25_imagenet.pdparams", {"scale": 0.25}),
])
def test_real_imagenet_weights_fit_all_but_the_head(shared_dir, name, file, kwargs):
    spec = zoo.get_spec(name)
    state = paddle.load(str(shared_dir / "weights" / file))
    own = zoo.build_model(name, 5, **kwargs).state_dict()
    assert set(state) == set(own)
    mismatched = {k for k in own if list(own[k].shape) != list(state[k].shape)}
    assert mismatched == {k for k in own if zoo.match_prefix(k, spec.head)}


# --- paddleclas (optional extra) ---------------------------------------------


@needs_clas
def test_paddleclas_families():
    for name in ("PPLCNet_x1_0", "PPLCNetV2_base", "ResNet50_vd", "MobileNetV3_large_x1_0", "MobileNetV3_small_x1_0"):
        spec = zoo.get_spec(name)
        assert spec.source == "paddleclas"
        assert spec.imagenet_url.endswith(f"/{name}_pretrained.pdparams")
    assert [len(s) for s in zoo.get_spec("ResNet50_vd").stages] == [1, 3, 4, 6, 3]


@needs_clas
def test_paddleclas_kwargs():
    model = zoo.build_model("PPLCNet_x0_25", 4, dropout_prob=0.1)
    assert list(model.fc.weight.shape)[-1] == 4
    # paddleclas constructors swallow unknown kwargs; return_stages would turn the output into a dict.
    with pytest.raises(ValueError, match="accepted keyword arguments: dropout_prob"):
        zoo.build_model("PPLCNet_x0_25", 4, return_stages=True)


@needs_clas
def test_paddleclas_import_leaves_host_logging_alone():
    # Compared with the state right after `import paddle`, which itself puts a
    # handler on the root logger at INFO level.
    code = (
        "import logging\n"
        "from paddle_tl.models import zoo\n"
        "from paddle_tl.runtime import import_paddle\n"
        "import_paddle()\n"
        "root = logging.getLogger()\n"
        "before = (root.handlers[:], root.level, logging.Formatter.converter)\n"
        "assert 'PPLCNet_x1_0' in zoo.list_architectures()\n"
        "assert (root.handlers, root.level, logging.Formatter.converter) == before\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "faiss" not in result.stdout + result.stderr
