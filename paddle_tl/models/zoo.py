"""Model zoo: one table entry per architecture.

Like fastai's `model_meta` or timm's `pretrained_cfg`, each entry is the single
source of truth for an architecture: which parameters form the classifier head,
how the body splits into stages (bottom -> top, for freezing and per-stage
learning rates), the eval resolution and normalisation, and where the official
ImageNet weights live.

Table conventions, shared by every entry:
  * head   = only the layer(s) whose shapes depend on the number of classes;
             they are rebuilt for the new task and never loaded from ImageNet.
  * stages = the body grouped by output resolution: a stage ends where the
             feature map shrinks, so downsampling layers open the next stage
             (ResNet's layer2.0, DenseNet's transitions). Layers that run after
             the global pool but before the head (VGG/AlexNet fc6+fc7,
             MobileNetV3 and PP-LCNet pre-logits) form one extra, last stage.
  * prefixes name sublayers (see `match_prefix`); stages + head cover every
    parameter exactly once (tests/test_zoo.py checks all of this per entry).
  * forward = the network's forward as its top-level sublayers in call order
    (FLATTEN for `paddle.flatten(x, 1)`), where it is that simple: the network
    can then be cut at any stage boundary (models/split.py). None elsewhere.

paddle.vision entries and paddle_tl's own networks (EfficientNet-Lite) are
always available; paddleclas entries only when the optional `paddleclas`
package imports (`pip install -e ".[clas]"`). A name of entries joined with
"+" is their concatenation (models/concat.py).
"""

import contextlib
import difflib
import functools
import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from paddle_tl.errors import ConfigError
from paddle_tl.runtime import import_paddle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLAS_HINT = 'paddleclas architectures need the optional extra: pip install -e ".[clas]"'


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of paddle_tl needs to know about one architecture.

    imagenet_url/imagenet_md5 are for the constructor's default arguments: a
    non-default width (e.g. `scale=0.25`) has no official weights. Networks
    paddle has no weights for get them from a pip package instead:
    imagenet_package is the `pkg:` source `Arch.pretrained=imagenet` then
    reads (offline; models/weights.py), imagenet_sha256 that file's digest.
    """

    name: str
    source: str  # "paddle.vision", "paddleclas" or "paddle_tl" (models/efficientnet_lite.py)
    head: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    input_size: int = 224
    resize_short: int = 256  # eval: resize the short side, then center-crop input_size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    imagenet_url: str | None = None
    imagenet_md5: str | None = None
    forward: tuple[str, ...] | None = None
    imagenet_package: str | None = None
    imagenet_sha256: str | None = None


FLATTEN = "flatten"


def match_prefix(name: str, prefixes) -> bool:
    """True if `name` is one of `prefixes` or lies under one ("fc" does not match "fc1.weight")."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_index(spec: ArchSpec, param_name: str) -> int | None:
    """Index into spec.stages of a parameter, None for a head parameter."""
    if match_prefix(param_name, spec.head):
        return None
    for index, stage in enumerate(spec.stages):
        if match_prefix(param_name, stage):
            return index
    raise ValueError(f"parameter {param_name!r} is in no stage and not in the head of {spec.name}")


@dataclass(frozen=True)
class _Entry:
    spec: ArchSpec
    ctor: Callable[..., Any]
    classes_arg: str  # paddle.vision says num_classes, paddleclas class_num
    preset: tuple[tuple[str, Any], ...] = ()  # kwargs implied by the name (vgg16_bn -> batch_norm=True)
    # paddleclas constructors take **kwargs and silently swallow unknown ones, so the
    # extra keywords they may forward are listed explicitly.
    extra_kwargs: tuple[str, ...] = ()


# Never forwarded from build_model: the class count is its own argument, and
# weights are loaded elsewhere, never downloaded while building.
_RESERVED_KWARGS = {"pretrained", "use_ssld", "num_classes", "class_num"}

# Constructors deliberately left out of the table, with the reason get_spec gives.
_UNSUPPORTED = {
    "googlenet": "googlenet returns (logits, aux1, aux2) from forward even in eval "
    "mode; the trainer expects a single logits tensor",
    "lenet": "LeNet is a 1-channel 28x28 MNIST model with no factory function and no "
    "ImageNet weights",
}


def _blocks(prefix, start, stop):
    return tuple(f"{prefix}.{i}" for i in range(start, stop))


def _split_blocks(prefix, depths, start=0):
    """Numbered blocks grouped by per-stage depth: ("blocks", [2, 1]) -> ((blocks.0, blocks.1), (blocks.2,))."""
    groups = []
    for depth in depths:
        groups.append(_blocks(prefix, start, start + depth))
        start += depth
    return tuple(groups)


def _vgg_stages(cfg, batch_norm):
    # Mirrors paddle.vision's vgg.make_layers: each conv appends (conv, [bn,] relu)
    # to `features` and each "M" one pool; a stage is the conv block before a pool.
    stages, block, index = [], [], 0
    for value in cfg:
        if value == "M":
            stages.append(tuple(block))
            block, index = [], index + 1
        else:
            block += [f"features.{index}"] + ([f"features.{index + 1}"] if batch_norm else [])
            index += 3 if batch_norm else 2
    return (*stages, ("classifier.0", "classifier.3"))  # fc6 + fc7: pretrained pre-logits


@functools.cache
def _vision_entries():
    paddle = import_paddle()
    models = paddle.vision.models
    urls = {}  # factory-ish key -> (url, md5), from every module's model_urls
    for module in ("alexnet", "densenet", "inceptionv3", "mobilenetv1", "mobilenetv2",
                   "mobilenetv3", "resnet", "shufflenetv2", "squeezenet", "vgg"):
        urls.update(importlib.import_module(f"paddle.vision.models.{module}").model_urls)

    entries = {}

    def add(name, head, stages, url_key=None, ctor=None, preset=(), **spec_kwargs):
        url, md5 = urls.get(url_key or name, (None, None))
        spec = ArchSpec(name, "paddle.vision", head, stages,
                        imagenet_url=url, imagenet_md5=md5, **spec_kwargs)
        entries[name] = _Entry(spec, getattr(models, ctor or name), "num_classes", preset)

    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnext50_32x4d", "resnext50_64x4d", "resnext101_32x4d",
                 "resnext101_64x4d", "resnext152_32x4d", "resnext152_64x4d",
                 "wide_resnet50_2", "wide_resnet101_2"):
        add(name, ("fc",), (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
            forward=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                     FLATTEN, "fc"))

    for name in ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264"):
        # db_conv_N is dense block N-1; each transition (conv + 2x2 avg-pool) opens the next stage.
        add(name, ("out",), (("conv1_func",), ("db_conv_2",), ("tr_conv2_blk", "db_conv_3"),
                             ("tr_conv3_blk", "db_conv_4"), ("tr_conv4_blk", "db_conv_5", "batch_norm")))

    # Keys in model_urls name the default width (scale=1.0).
    v1_stages = (("conv1", "conv2_1"), ("conv2_2", "conv3_1"), ("conv3_2", "conv4_1"),
                 ("conv4_2", *(f"conv5_{i}" for i in range(1, 6))), ("conv5_6", "conv6"))
    add("mobilenet_v1", ("fc",), v1_stages, url_key="mobilenetv1_1.0",
        forward=(*(name for stage in v1_stages for name in stage), "pool2d_avg", FLATTEN, "fc"))
    add("mobilenet_v2", ("classifier.1",),  # classifier.0 is Dropout
        (_blocks("features", 0, 2), _blocks("features", 2, 4), _blocks("features", 4, 7),
         _blocks("features", 7, 14), _blocks("features", 14, 19)),
        url_key="mobilenetv2_1.0", forward=("features", "pool2d_avg", FLATTEN, "classifier"))
    v3_forward = ("conv", "blocks", "lastconv", "avgpool", FLATTEN, "classifier")
    # classifier = Linear(576|960 -> 1024|1280) pre-logits, Hardswish, Dropout, Linear head.
    add("mobilenet_v3_small", ("classifier.3",),
        (("conv",), ("blocks.0",), _blocks("blocks", 1, 3), _blocks("blocks", 3, 8),
         (*_blocks("blocks", 8, 11), "lastconv"), ("classifier.0",)),
        url_key="mobilenet_v3_small_x1.0", forward=v3_forward)
    add("mobilenet_v3_large", ("classifier.3",),
        (("conv", "blocks.0"), _blocks("blocks", 1, 3), _blocks("blocks", 3, 6), _blocks("blocks", 6, 12),
         (*_blocks("blocks", 12, 15), "lastconv"), ("classifier.0",)),
        url_key="mobilenet_v3_large_x1.0", forward=v3_forward)

    for name in ("shufflenet_v2_x0_25", "shufflenet_v2_x0_33", "shufflenet_v2_x0_5",
                 "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
                 "shufflenet_v2_swish"):
        # Blocks are top-level sublayers named "<stage>_<i>"; repeats are [4, 8, 4] at every width.
        add(name, ("_fc",), (("_conv1",), tuple(f"2_{i}" for i in range(1, 5)),
                             tuple(f"3_{i}" for i in range(1, 9)),
                             (*(f"4_{i}" for i in range(1, 5)), "_last_conv")))

    # SqueezeNet's head is the 1x1 conv _conv9 (512 -> classes); note its forward
    # applies ReLU after it, so the "logits" are non-negative (as in the original).
    fires = [f"_conv{i}" for i in range(1, 9)]
    add("squeezenet1_0", ("_conv9",), (("_conv",), tuple(fires[0:3]), tuple(fires[3:7]), tuple(fires[7:8])))
    add("squeezenet1_1", ("_conv9",), (("_conv",), tuple(fires[0:2]), tuple(fires[2:4]), tuple(fires[4:8])))

    # AlexNet flattens a fixed 6x6 map, so it only accepts 224x224 input.
    add("alexnet", ("_fc8",), (("_conv1",), ("_conv2", "_conv3", "_conv4"), ("_conv5",), ("_fc6", "_fc7")))

    stem = "inception_stem"
    add("inception_v3", ("fc",),
        ((f"{stem}.conv_1a_3x3", f"{stem}.conv_2a_3x3", f"{stem}.conv_2b_3x3"),
         (f"{stem}.conv_3b_1x1", f"{stem}.conv_4a_3x3"),
         _blocks("inception_block_list", 0, 3), _blocks("inception_block_list", 3, 8),
         _blocks("inception_block_list", 8, 11)),
        input_size=299, resize_short=342)

    # batch_norm renumbers `features`, so it is part of the name (torchvision's
    # vgg16_bn) rather than a kwarg; paddle.vision has no *_bn ImageNet weights.
    cfgs = importlib.import_module("paddle.vision.models.vgg").cfgs
    for name, cfg in (("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
        for batch_norm in (False, True):
            full_name = f"{name}_bn" if batch_norm else name
            add(full_name, ("classifier.6",), _vgg_stages(cfgs[cfg], batch_norm),
                ctor=name, preset=(("batch_norm", batch_norm),))
    return entries


def _lite_stages(groups):
    """EfficientNet-Lite's stages from its scaled block groups: the stem with
    the blocks at its resolution, then a new stage at every stride-2 group
    (it opens the next, coarser resolution); the head conv ends the last."""
    stages, index = [["_conv_stem", "_bn0"]], 0
    for group in groups:
        if group.stride == 2:
            stages.append([])
        stages[-1] += _blocks("_blocks", index, index + group.repeats)
        index += group.repeats
    stages[-1] += ["_conv_head", "_bn1"]
    return tuple(tuple(stage) for stage in stages)


@functools.cache
def _own_entries():
    """paddle_tl's own networks, with ImageNet weights from pip packages."""
    from paddle_tl.models import efficientnet_lite as lite

    entries = {}
    for name, variant in lite.VARIANTS.items():
        spec = ArchSpec(
            name, "paddle_tl", ("_fc",), _lite_stages(lite.block_groups(variant)),
            input_size=variant.input_size,
            # TensorFlow's eval crop (CROP_PADDING = 32): the center
            # input_size / (input_size + 32) of the short side; 256 for 224 px.
            resize_short=variant.input_size + 32, mean=lite.MEAN, std=lite.STD,
            forward=("_conv_stem", "_bn0", "_stem_act", "_blocks", "_conv_head", "_bn1", "_head_act",
                     "_avg_pooling", FLATTEN, "_dropout", "_fc"),
            imagenet_package=f"pkg:{variant.weights_package}/{variant.weights_file}",
            imagenet_sha256=variant.weights_sha256)
        entries[name] = _Entry(spec, getattr(lite, name), "num_classes")
    return entries


@contextlib.contextmanager
def _contain_paddleclas_logging():
    """Keep `import paddleclas` from reconfiguring the host's logging.

    At import time its deploy utilities call logging.basicConfig(level=INFO)
    and replace logging.Formatter.converter process-wide, and faiss (pulled in
    by them) logs INFO lines, which show because `import paddle` itself sets
    the root logger to INFO. Restore the former and mute the latter.
    """
    root = logging.getLogger()
    handlers, level, converter = root.handlers[:], root.level, logging.Formatter.converter
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.Formatter.converter = converter


@functools.cache
def _paddleclas_problem() -> str | None:
    """None once paddleclas is imported, else why it cannot be."""
    if importlib.util.find_spec("paddleclas") is None:
        return "paddleclas is not installed"
    import_paddle()  # paddleclas imports paddle itself; go through the thread-default setup first
    try:
        with _contain_paddleclas_logging():
            importlib.import_module("paddleclas")
    except Exception as exc:  # a broken optional extra must not break the paddle.vision zoo
        return f"paddleclas is installed but failed to import ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _clas_entries():
    if _paddleclas_problem():
        return {}
    entries = {}

    def add_family(module_name, stages_of, head=("fc",), extra_kwargs=(), keep=lambda name: True):
        """Register the constructors of legendary_models.<module_name> named in its MODEL_URLS.

        A new family is one more call: a (module, name) -> stages function, the
        head prefixes, and the extra kwargs its constructors may forward.
        """
        module = importlib.import_module(f"paddleclas.ppcls.arch.backbone.legendary_models.{module_name}")
        for name, url in module.MODEL_URLS.items():
            if keep(name):
                spec = ArchSpec(name, "paddleclas", head, stages_of(module, name), imagenet_url=url)
                entries[name] = _Entry(spec, getattr(module, name), "class_num", extra_kwargs=extra_kwargs)

    # PP-LCNet: blocks2 keeps conv1's stride; last_conv is a 1x1 conv after the pool (pre-logits).
    add_family("pp_lcnet",
               lambda module, name: (("conv1", "blocks2"), ("blocks3",), ("blocks4",), ("blocks5",),
                                     ("blocks6",), ("last_conv",)),
               extra_kwargs=("dropout_prob",))
    add_family("pp_lcnet_v2",
               lambda module, name: (("stem",), *((f"stages.{i}",) for i in range(4)), ("last_conv",)),
               extra_kwargs=("dropout_prob",))

    def resnet_stages(module, name):
        # "ResNet50_vd" -> NET_CONFIG["50"]["block_depth"] = [3, 4, 6, 3].
        depths = module.NET_CONFIG[name[len("ResNet"):-len("_vd")]]["block_depth"]
        return (("stem",), *_split_blocks("blocks", depths))

    add_family("resnet", resnet_stages, keep=lambda name: name.endswith("_vd"))

    def mobilenet_v3_stages(module, name):
        # conv is the stem, last_second_conv the 1x1 conv before the pool, last_conv
        # the 1x1 conv after it (pre-logits). Large's blocks.0 keeps the stem's stride.
        if "_large_" in name:
            body = (("conv", "blocks.0"), *_split_blocks("blocks", [2, 3, 6, 3], start=1))
        else:
            body = (("conv",), ("blocks.0",), *_split_blocks("blocks", [2, 5, 3], start=1))
        return (*body[:-1], (*body[-1], "last_second_conv"), ("last_conv",))

    add_family("mobilenet_v3", mobilenet_v3_stages, extra_kwargs=("dropout_prob",))
    return entries


def list_architectures() -> list[str]:
    """Names usable now, sorted case-insensitively (paddleclas ones only if it imports)."""
    return sorted({**_vision_entries(), **_own_entries(), **_clas_entries()}, key=str.lower)


def _entry(name: str) -> _Entry:
    # paddle.vision first: importing paddleclas takes seconds and is needed only for its names.
    for entries in (_vision_entries, _own_entries, _clas_entries):
        if name in entries():
            return entries()[name]
    if name in _UNSUPPORTED:
        raise ConfigError(f"architecture {name!r} is not supported: {_UNSUPPORTED[name]}")
    by_lower = {n.lower(): n for n in list_architectures()}
    close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), by_lower, n=5)]
    message = f"unknown architecture {name!r}"
    message += f"; closest matches: {', '.join(close)}" if close else "; see list_architectures()"
    # Every paddle.vision name is lower case; paddleclas names are CamelCase.
    clas_problem = _paddleclas_problem()
    if clas_problem and name != name.lower():
        message += f". {clas_problem}; {CLAS_HINT}"
    raise ConfigError(message)


def get_spec(name: str) -> ArchSpec:
    from paddle_tl.models import concat  # it builds on this table

    if concat.is_concatenation(name):
        return concat.concatenation_spec(name)
    return _entry(name).spec


def _accepted_kwargs(entry: _Entry) -> list[str]:
    named = {p.name for p in inspect.signature(entry.ctor).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    fixed = _RESERVED_KWARGS | {key for key, _ in entry.preset}
    return sorted((named - fixed) | set(entry.extra_kwargs))


@contextlib.contextmanager
def _quiet_ppcls():
    # paddleclas ResNet/MobileNetV3 log a "init_res will be deprecated" warning
    # to stdout on every construction.
    logger = logging.getLogger("ppcls")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(name: str, num_classes: int, **kwargs):
    """A randomly initialised `name` with a `num_classes`-way head; never downloads weights.

    kwargs go to the constructor (e.g. scale=0.25 for mobilenet_v1).
    """
    from paddle_tl.models import concat

    if concat.is_concatenation(name):
        return concat.build_concatenation(name, num_classes, **kwargs)
    entry = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        # paddle.vision treats num_classes <= 0 as "drop the head", which the table cannot describe.
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    accepted = _accepted_kwargs(entry)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        message = (f"{name} does not accept {', '.join(unknown)}; "
                   f"accepted keyword arguments: {', '.join(accepted) or 'none'}")
        if "pretrained" in unknown:
            message += " (build_model never downloads; pretrained weights are loaded separately)"
        named_by_name = [key for key, _ in entry.preset if key in unknown]
        if named_by_name:
            message += f" ({', '.join(named_by_name)} is fixed by the name, e.g. vgg16 vs vgg16_bn)"
        raise ConfigError(message)
    with _quiet_ppcls():
        return entry.ctor(**dict(entry.preset), **kwargs, **{entry.classes_arg: num_classes})
