"""The run configuration: YAML with PaddleClas-style sections, `-o` overrides,
validated into typed dataclasses before any work starts.

Every key a user can write is a dataclass field below, so the schema, its
defaults and its documentation live in one place. Validation refuses unknown
keys (naming the closest valid one), wrong types and impossible values.
"""

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from paddle_tl.combinations import Facts, check_combinations
from paddle_tl.errors import ConfigError


@dataclass
class GlobalConfig:
    # classification: one label per image; detection: boxes (Faster R-CNN +
    # FPN on the zoo's bodies, paddle_tl/tasks/detection), VOC or COCO data
    task: Literal["classification", "detection"] = "classification"
    output_dir: str = "output/run"
    epochs: int = 10
    device: Literal["auto", "cpu", "gpu"] = "auto"
    seed: int = 42
    pretrained_model: Optional[str] = None  # weights of a finished run (eval/export)
    save_inference_dir: str = "inference"
    resume: Optional[str] = None  # a run folder or checkpoint prefix
    # GPU mixed precision: false; O1 (true means O1): float16 compute in
    # white-listed ops (conv, matmul), float32 weights; O2: float16 weights
    # too, with float32 master copies in the optimizer (BatchNorm stays float32)
    amp: Union[bool, Literal["O1", "O2"]] = False
    to_static: bool = False  # train the network as a static graph (paddle.jit.to_static)
    eval_interval: int = 1  # evaluate every N epochs
    early_stopping_patience: int = 0  # epochs without a better eval top-1; 0 = off
    log_interval: int = 10  # steps between progress-bar/VisualDL training points
    # A batch whose loss or gradients are NaN/Inf never updates the model; stop:
    # the run stops there; skip: the batch is skipped and counted, and the run
    # stops only when an epoch's worth of batches in a row was skipped.
    nan_policy: Literal["stop", "skip"] = "stop"
    # An exponential moving average of the weights (engine/ema.py), updated
    # after every step: ema = d * ema + (1 - d) * weights, d ramping up to
    # decay over the first steps (min(decay, (1 + t) / (10 + t))). Epoch
    # evaluation, the best epoch, best_model, calibration and export use the
    # average; training goes on from the raw weights. 0 or null: off.
    ema_decay: Optional[float] = None
    # Detection: the run ends within this many minutes (null: no limit). After
    # the first epoch, where Global.epochs at its pace would not fit, the
    # learning-rate schedule is shortened to the epochs that do
    # (tasks/detection/train.py); classification's is Transfer.auto_budget_minutes.
    budget_minutes: Optional[float] = None

    def validate(self, at):
        _require(self.budget_minutes is None or self.budget_minutes > 0, f"{at}.budget_minutes", "must be > 0")
        _require(self.ema_decay is None or 0 <= self.ema_decay < 1, f"{at}.ema_decay", "must be in [0, 1)")
        _require(self.epochs >= 1, f"{at}.epochs", "must be >= 1")
        _require(self.eval_interval >= 1, f"{at}.eval_interval", "must be >= 1")
        _require(self.early_stopping_patience >= 0, f"{at}.early_stopping_patience", "must be >= 0")
        _require(self.log_interval >= 1, f"{at}.log_interval", "must be >= 1")

    @property
    def amp_level(self):
        """None (float32), "O1" or "O2": what paddle.Model.prepare takes."""
        return "O1" if self.amp is True else self.amp or None


@dataclass
class HeadConfig:
    """What is built for the task in place of the ImageNet classifier: the
    architecture's own Linear layer, or an MLP (hidden widths, activation,
    dropout after each hidden layer) in its place."""
    type: Literal["linear", "mlp"] = "linear"
    hidden: list = field(default_factory=lambda: [512])  # mlp
    activation: Literal["relu", "gelu"] = "relu"  # mlp
    dropout: float = 0.5  # mlp

    def validate(self, at):
        _require(bool(self.hidden) and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                           for h in self.hidden), f"{at}.hidden",
                 "must be a non-empty list of positive integers")
        _require(0 <= self.dropout < 1, f"{at}.dropout", "must be in [0, 1)")


@dataclass
class DetectorConfig:
    """Faster R-CNN + FPN (Global.task=detection; docs/detection.md). Sizes are
    of the resized image: the shorter side to short_side, the longer at most
    max_size (the aspect ratio kept)."""
    short_side: int = 512  # evaluation, export and inference
    max_size: int = 853
    train_short_sides: list = field(default_factory=lambda: [448, 480, 512, 544, 576])  # scale jitter: one per image
    hflip: bool = True  # training: mirror half the images
    fpn_channels: int = 128
    representation_size: int = 1024  # the box head's two fully connected layers
    anchor_sizes: Optional[list] = None  # one per FPN level (strides 8..64); default 4x the stride: 32..256
    aspect_ratios: list = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n: list = field(default_factory=lambda: [1000, 500])  # per level: training, evaluation
    rpn_post_nms_top_n: list = field(default_factory=lambda: [500, 300])  # per image: training, evaluation
    rois_per_image: int = 256  # box-head training samples per image, up to a quarter objects
    score_threshold: float = 0.05  # detections kept above this score
    nms_threshold: float = 0.5  # per class
    detections_per_image: int = 100
    mask_channels: int = 64  # Arch.mask: width of the mask head's four 3x3 convolutions (torchvision 256; CPU)

    def validate(self, at):
        for key in ("short_side", "max_size", "fpn_channels", "representation_size", "rois_per_image",
                    "detections_per_image", "mask_channels"):
            _require(getattr(self, key) >= 1, f"{at}.{key}", "must be >= 1")
        _require(self.max_size >= self.short_side, f"{at}.max_size", "must be >= short_side")
        _require(_positive_ints(self.train_short_sides), f"{at}.train_short_sides",
                 "must be a non-empty list of positive integers")
        _require(self.anchor_sizes is None or (len(self.anchor_sizes) == 4 and _positive_ints(self.anchor_sizes)),
                 f"{at}.anchor_sizes", "must be null or 4 positive integers, one per FPN level (strides 8, 16, 32, 64)")
        _require(bool(self.aspect_ratios) and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
                                                  for r in self.aspect_ratios), f"{at}.aspect_ratios",
                 "must be a non-empty list of positive numbers")
        for key in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            _require(len(getattr(self, key)) == 2 and _positive_ints(getattr(self, key)), f"{at}.{key}",
                     "must be [training, evaluation], two positive integers")
        _require(0 <= self.score_threshold < 1, f"{at}.score_threshold", "must be in [0, 1)")
        _require(0 < self.nms_threshold <= 1, f"{at}.nms_threshold", "must be in (0, 1]")


def _positive_ints(values):
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)


@dataclass
class ArchConfig:
    name: str = "mobilenet_v2"
    # "imagenet", false, a .pdparams path or a torchvision .pth path
    pretrained: Union[bool, str] = "imagenet"
    pretrained_sha256: Optional[str] = None  # refuse a weights file that does not match
    num_classes: Optional[int] = None  # taken from the training data when not given
    input_size: Optional[int] = None  # overrides the architecture's table
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments, e.g. {scale: 0.25}
    head: HeadConfig = field(default_factory=HeadConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # Global.task=detection
    # Global.task=detection: Mask R-CNN, the mask head trained on the objects' masks (COCO segmentations or
    # VOC SegmentationObject PNGs; docs/detection.md)
    mask: bool = False

    def validate(self, at):
        _require(self.pretrained is not True, f"{at}.pretrained",
                 "true is ambiguous: write 'imagenet' or a weights file path")
        _require(self.num_classes is None or self.num_classes >= 2, f"{at}.num_classes", "must be >= 2")
        _require(self.input_size is None or self.input_size >= 32, f"{at}.input_size", "must be >= 32")


@dataclass
class TransferConfig:
    # bitfit: of the body only the biases and normalisation parameters train (and the head)
    # lp_ft: a linear probe first (lp_epochs), then the stages above
    # freeze_stages fine-tune (Kumar et al., ICLR 2022: the trained head keeps
    # fine-tuning from distorting the pretrained features)
    strategy: Literal["auto", "linear_probe", "partial", "full", "gradual", "bitfit", "lp_ft"] = "auto"
    # partial: bottom stages kept frozen (default: half); gradual: stages never
    # unfrozen (default 0); lp_ft: stages never unfrozen (default: all but the top one)
    freeze_stages: Optional[int] = None
    lp_epochs: Optional[int] = None  # lp_ft: epochs of the linear probe (default: half of Global.epochs)
    # auto: minutes for measuring candidate recipes on the validation split and
    # training the best (engine/auto.py); 0 = the four-quadrant rule alone
    auto_budget_minutes: float = 10.0
    # auto: backbones measured beside Arch.name before the recipes (engine/backbones.py):
    # each alone and the best of them concatenated with Arch.name, by a solved
    # linear probe on their frozen features. A list of Arch names; installed:
    # every architecture whose ImageNet weights an installed package ships;
    # none: Arch.name alone. EfficientNet-Lite0 by default: as cheap to run as
    # MobileNetV2 at the same 224 px crop (about one more pass over the images)
    auto_backbones: Union[list, Literal["installed", "none"]] = field(default_factory=lambda: ["efficientnet_lite0"])
    body_lr_mult: float = 0.1  # learning rate of trainable body stages relative to the head
    layer_decay: Optional[float] = None  # per stage further from the head, multiply by this again
    stage_lr_mults: Optional[list] = None  # explicit multiplier per stage, bottom to top
    unfreeze_every: int = 1  # gradual: epochs of training before the next stage unfreezes
    l2sp_alpha: float = 0.0  # L2-SP: pull the body toward its pretrained weights (replaces weight decay there)
    bn: Literal["freeze", "train"] = "freeze"  # BatchNorm statistics of frozen stages
    # With the whole body frozen, compute its features once and train the head
    # on them; cache_views views per training image (the plain one, then
    # random augmentations), epoch e training on view e mod cache_views.
    cache_features: bool = True
    cache_views: int = 2
    # logistic: a linear probe's Linear head (the body frozen, features
    # cached) starts as the logistic regression on the plain cached view
    # solved to convergence, its L2 strength chosen on the validation split,
    # refitted on training + validation, and stays the head (epoch 0) unless
    # an epoch scores higher on the validation split (transfer/logistic.py,
    # engine/fit.py SolvedStart); random: as built
    head_init: Literal["logistic", "random"] = "logistic"
    # Unsupervised domain adaptation toward the unlabeled DataLoader.Target
    # images: mmd (multi-kernel MMD between source and target features) or
    # dann (a domain classifier behind a gradient-reversal layer).
    domain_adaptation: Literal["none", "mmd", "dann"] = "none"
    domain_weight: float = 1.0  # mmd: weight of the MMD term; dann: weight of the domain classifier's loss

    def validate(self, at):
        _require(self.freeze_stages is None or self.freeze_stages >= 0, f"{at}.freeze_stages", "must be >= 0")
        _require(self.body_lr_mult > 0, f"{at}.body_lr_mult", "must be > 0")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1, f"{at}.layer_decay", "must be in (0, 1]")
        _require(self.stage_lr_mults is None or all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in self.stage_lr_mults),
            f"{at}.stage_lr_mults", "must be a list of positive numbers, one per stage")
        _require(self.unfreeze_every >= 1, f"{at}.unfreeze_every", "must be >= 1")
        _require(self.lp_epochs is None or self.lp_epochs >= 1, f"{at}.lp_epochs", "must be >= 1")
        _require(self.auto_budget_minutes >= 0, f"{at}.auto_budget_minutes", "must be >= 0")
        _require(isinstance(self.auto_backbones, str) or all(
            isinstance(name, str) and name and "+" not in name for name in self.auto_backbones)
            and len(set(self.auto_backbones)) == len(self.auto_backbones), f"{at}.auto_backbones",
            "must be installed, none, or a list of different architecture names (Arch.name values, without '+')")
        _require(self.l2sp_alpha >= 0, f"{at}.l2sp_alpha", "must be >= 0")
        _require(self.cache_views >= 1, f"{at}.cache_views", "must be >= 1")
        _require(self.domain_weight > 0, f"{at}.domain_weight", "must be > 0")


@dataclass
class LossConfig:
    name: Literal["CrossEntropy"] = "CrossEntropy"
    label_smoothing: float = 0.0
    # balanced: inverse-frequency class weights; auto: only when the largest
    # training class exceeds 3x the smallest
    # none by default, as PaddleClas, timm and fastai: on a 10-class product set
    # (7.1x imbalance) `auto` lowered Eval top-1 from 0.815 to 0.754 (issue 22). A run on
    # imbalanced data says so, with its balanced accuracy (train.py record_run).
    class_weights: Literal["auto", "balanced", "none"] = "none"

    def validate(self, at):
        _require(0 <= self.label_smoothing < 1, f"{at}.label_smoothing", "must be in [0, 1)")


@dataclass
class LRConfig:
    name: Literal["Cosine", "Step", "Constant"] = "Cosine"
    learning_rate: float = 0.01
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    step_epochs: int = 10  # Step: decay every N epochs
    gamma: float = 0.1  # Step: decay factor

    def validate(self, at):
        _require(self.learning_rate > 0, f"{at}.learning_rate", "must be > 0")
        _require(self.warmup_epochs >= 0, f"{at}.warmup_epochs", "must be >= 0")
        _require(self.warmup_start_lr >= 0, f"{at}.warmup_start_lr", "must be >= 0")
        _require(self.step_epochs >= 1, f"{at}.step_epochs", "must be >= 1")
        _require(0 < self.gamma <= 1, f"{at}.gamma", "must be in (0, 1]")


@dataclass
class OptimizerConfig:
    name: Literal["Momentum", "SGD", "Adam", "AdamW"] = "Momentum"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr: LRConfig = field(default_factory=LRConfig)

    def validate(self, at):
        _require(0 <= self.momentum < 1, f"{at}.momentum", "must be in [0, 1)")
        _require(self.weight_decay >= 0, f"{at}.weight_decay", "must be >= 0")


@dataclass
class DatasetConfig:
    # Images: any folder of images, searched recursively, without labels (DataLoader.Target only)
    # VOC, COCO: detection (Global.task=detection)
    name: Literal["ImageFolder", "ListFile", "elpv", "Images", "VOC", "COCO"] = "ImageFolder"
    # ImageFolder: folder of class sub-folders; ListFile: base of relative paths; Images: the folder;
    # VOC: the folder holding JPEGImages/, Annotations/, ImageSets/Main/; COCO: the image folder
    root: Optional[str] = None
    image_set: Optional[str] = None  # VOC: ImageSets/Main/<image_set>.txt; default train (Train), val (Eval)
    annotation_file: Optional[str] = None  # COCO: the instances json
    list_file: Optional[str] = None  # ListFile: "relative/path.jpg label" per line
    label_names_file: Optional[str] = None  # ListFile: one class name per line, in label order
    split: Optional[Literal["train", "eval"]] = None  # elpv: side of the split; default: the loader's own
    label_mode: Literal["four_class", "binary"] = "four_class"  # elpv
    cell_type: Literal["all", "mono", "poly"] = "all"  # elpv
    eval_fraction: float = 0.25  # elpv
    split_seed: int = 0  # elpv: the split is deterministic for a given seed

    def validate(self, at):
        # root / list_file are checked when the dataset is built: eval and
        # export configs need not describe the training data.
        _require(0 < self.eval_fraction < 1, f"{at}.eval_fraction", "must be in (0, 1)")


@dataclass
class AugmentConfig:
    """Training-time augmentation; resize, crop and normalisation come from the
    architecture's table so that training, evaluation and export agree."""
    crop_scale: list = field(default_factory=lambda: [0.35, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    vflip: bool = False
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    # trivial: TrivialAugment (Wide), one random operation at a random
    # strength per image (Müller & Hutter, ICCV 2021); none = off
    policy: Literal["none", "trivial"] = "none"
    # Mixing whole batches (Beta(a, a) weights; 0 = off): mixup blends two
    # images, cutmix pastes a box of one into the other (both on: one or the
    # other per batch). They mix images, so features and activations are not
    # cached when either is on.
    mixup: float = 0.0
    cutmix: float = 0.0

    def validate(self, at):
        ok = (len(self.crop_scale) == 2 and all(isinstance(v, (int, float)) for v in self.crop_scale)
              and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1)
        _require(ok, f"{at}.crop_scale", "must be [low, high] with 0 < low <= high <= 1")
        _require(0 <= self.color_jitter <= 1, f"{at}.color_jitter", "must be in [0, 1]")
        _require(self.mixup >= 0, f"{at}.mixup", "must be >= 0 (0 = off)")
        _require(self.cutmix >= 0, f"{at}.cutmix", "must be >= 0 (0 = off)")


@dataclass
class LoaderConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    batch_size: int = 32
    # Loader worker processes; auto: 2 on CPU (the model uses the cores), on
    # GPU enough to keep it fed (data.loader_settings)
    num_workers: Union[int, Literal["auto"]] = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # used by Train only
    sampler: Literal["random", "balanced"] = "random"  # Train: balanced draws every class equally often
    # Train: the fraction of every class held out (stratified, from Global.seed)
    # to choose the best epoch and stop early; 0 chooses on the Eval split,
    # whose best score then overstates what new images would get.
    val_fraction: float = 0.1
    # Eval: test-time augmentation in `paddle-tl eval`, export (inference.yml)
    # and `paddle-tl infer`, averaging calibrated probabilities (tta.py):
    # flip over the center crop and its horizontal mirror; flip_crops over
    # ten-crop (center and corners of the resize_short square, each
    # mirrored); none: one view. Epoch evaluation in training is single-view.
    tta: Literal["none", "flip", "flip_crops"] = "none"

    def validate(self, at):
        _require(self.batch_size >= 1, f"{at}.batch_size", "must be >= 1")
        _require(0 <= self.val_fraction < 1, f"{at}.val_fraction", "must be in [0, 1)")
        _require(self.num_workers == "auto" or self.num_workers >= 0, f"{at}.num_workers", "must be >= 0 or auto")


@dataclass
class TargetDatasetConfig(DatasetConfig):
    name: Literal["Images", "ImageFolder", "ListFile", "elpv"] = "Images"


@dataclass
class TargetConfig:
    """Unlabeled images of the domain to adapt to (Transfer.domain_adaptation).
    Their labels, if the dataset has any, are never used: point DataLoader.Eval
    at a labeled split of the target domain to measure the adaptation."""
    dataset: TargetDatasetConfig = field(default_factory=TargetDatasetConfig)


@dataclass
class DataLoaderConfig:
    Train: LoaderConfig = field(default_factory=LoaderConfig)
    Eval: LoaderConfig = field(default_factory=LoaderConfig)
    Target: TargetConfig = field(default_factory=TargetConfig)

    def validate(self, at):
        _require(self.Train.tta == "none", f"{at}.Train.tta",
                 "test-time augmentation applies to evaluation; set DataLoader.Eval.tta")


@dataclass
class MetricConfig:
    topk: list = field(default_factory=lambda: [1, 5])

    def validate(self, at):
        ok = bool(self.topk) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.topk)
        _require(ok, f"{at}.topk", "must be a non-empty list of positive integers")


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015): the run's own Arch (the
    student) learns from a finished run's network (the teacher) as well as
    from the labels; loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) +
    (1 - alpha) * the Loss section's cross-entropy."""
    teacher: Optional[str] = None  # a finished run folder (its best_model); null: no distillation
    temperature: float = 4.0  # T: softens both networks' outputs
    alpha: float = 0.5  # weight of the soft-target term; the labels' cross-entropy gets 1 - alpha

    def validate(self, at):
        _require(self.temperature > 0, f"{at}.temperature", "must be > 0")
        _require(0 <= self.alpha <= 1, f"{at}.alpha", "must be in [0, 1]")


@dataclass
class Config:
    Global: GlobalConfig = field(default_factory=GlobalConfig)
    Arch: ArchConfig = field(default_factory=ArchConfig)
    Transfer: TransferConfig = field(default_factory=TransferConfig)
    Loss: LossConfig = field(default_factory=LossConfig)
    Optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    DataLoader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    Metric: MetricConfig = field(default_factory=MetricConfig)
    Distill: DistillConfig = field(default_factory=DistillConfig)

    # The dotted keys the user wrote (in the YAML or an `-o`), e.g.
    # "Arch.input_size": a value left at its default is no statement, so
    # only these can contradict what a checkpoint records
    # (run_folder.trained_model). Not a field: config.yaml never holds it.
    given = frozenset()

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _require(ok, key, problem):
    if not ok:
        raise ConfigError(f"{key}: {problem}")


# ---------------------------------------------------------------- loading

def load_config(path=None, overrides=()):
    """Read YAML (or start from defaults when path is None), apply `-o` overrides
    ("Section.key=value", value parsed as YAML) and validate."""
    raw = {}
    if path is not None:
        path = find_config(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _refuse_oversized(raw, str(path), "")
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


# The configs shipped inside the package (the checkout's configs/ links here).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs():
    return sorted(path.name for path in SHIPPED_CONFIGS.glob("*.yaml"))


def find_config(path):
    """`-c PATH`: the file when it exists; otherwise, for a bare name (or
    configs/NAME, as the README writes it), the config of that name shipped
    with the package, so an installed paddle_tl runs `-c quickstart.yaml`."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        name = path.name if path.suffix else f"{path.name}.yaml"
        if (SHIPPED_CONFIGS / name).is_file():
            return SHIPPED_CONFIGS / name
    raise ConfigError(f"config file not found: {path} (shipped configs, usable by name: "
                      f"{', '.join(shipped_configs()) or 'none'})")


def apply_override(raw, override):
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected Section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"override {key}: value nested too deeply to be a config") from None
    _refuse_oversized(value, f"override {key}", key)
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


# YAML aliases share one object when loaded, so a few lines of anchors that
# repeat anchors ("billion laughs": 9 aliases nested 9 deep are 387 million
# values) load at once, and then hang whatever walks the values: saving
# config.yaml (dataclasses.asdict copies every alias out), metrics, the
# network's constructor. The schema bounds what it checks, but a free-form
# value (Arch.kwargs) escapes it, so the values are counted as the aliases
# expand them, right after the YAML is read. Real configs are far inside
# both bounds (every key of the full default config is about 150 values);
# anchors and aliases themselves stay allowed, for configs that reuse a block.
MAX_CONFIG_VALUES = 10_000
# asdict and yaml.safe_dump recurse per level: config.save crashed on a
# value nested 330 deep, and on an alias inside its own anchor (which
# safe_load builds as a list that contains itself).
MAX_CONFIG_DEPTH = 50


def _oversized(value):
    """Whether `value`, its aliases expanded, holds more than MAX_CONFIG_VALUES
    values (mappings, lists, scalars) or nests deeper than MAX_CONFIG_DEPTH:
    "values", "depth" or None. Stops counting at the bound, so a bomb costs
    no more than a config of that size."""
    count, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return "values"
        if depth > MAX_CONFIG_DEPTH:
            return "depth"
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return None


def _refuse_oversized(value, where, at):
    """Refuse a YAML value read at `at` (a dotted key, "" for a whole file)
    that is _oversized, naming the deepest key whose value alone is."""
    problem = _oversized(value)
    if problem is None:
        return
    while isinstance(value, dict):
        inner = next(((key, child) for key, child in value.items() if _oversized(child)), None)
        if inner is None:
            break
        at, value = _join(at, str(inner[0])), inner[1]
        problem = _oversized(value)
    what = at or "the config"
    if problem == "values":
        detail = (f"holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are expanded "
                  "(aliases repeating aliases?); a config needs far fewer")
    else:
        detail = (f"is nested more than {MAX_CONFIG_DEPTH} levels deep (or a YAML alias refers to "
                  "the anchor it is in); a config needs far fewer")
    raise ConfigError(f"{where}: {what} {detail}")


def from_dict(raw):
    cfg = _build(Config, raw, "")
    # Pairs of settings that cannot run together, as far as the config alone tells.
    check_combinations(Facts.of_config(cfg))
    cfg.given = frozenset(_written_keys(Config, raw or {}, ""))
    return cfg


def _written_keys(cls, raw, at):
    """The dotted keys of the values in `raw` (already validated against
    `cls`): sections are walked into, a value that is a mapping (Arch.kwargs)
    is one key."""
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        key = _join(at, name)
        if dataclasses.is_dataclass(hints[name]):
            yield from _written_keys(hints[name], value or {}, key)
        else:
            yield key


def _build(cls, raw, at):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{at or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(_join(at, str(key)), str(key), names))
    # Sections left out are built from their defaults too, so that their
    # checks run (an ImageFolder without a root is refused, not crashed on).
    kwargs = {name: _convert(hints[name], raw.get(name, {}), _join(at, name)) for name in names
              if name in raw or dataclasses.is_dataclass(hints[name])}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(at)
    return obj


def _unknown_key_message(full_key, key, valid):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    section = full_key[: -len(key)]
    hint = f"; did you mean '{section}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key '{full_key}'{hint}"


def _join(at, name):
    return f"{at}.{name}" if at else name


def _describe(hint):
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return hint.__name__


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(hint, value, at):
    """Check `value` against the type hint, converting only where it is lossless
    (an int where a float is expected)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, at)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{at}: {value!r} is not one of {', '.join(map(str, choices))}{hint_text}")
        return value
    if origin is Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, at)
            except ConfigError:
                continue
        expected = " or ".join(_describe(option) for option in options)
        raise ConfigError(f"{at}: expected {expected}, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool, list, dict):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"config schema uses an unsupported type {hint} at {at}")
    raise ConfigError(f"{at}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
