"""Which settings combine: every rule that refuses a pair of settings, in one
table that tests enumerate (tests/test_combinations.py).

A rule names two settings, when each of them is "on", and why the pair cannot
run. Most facts come from the config alone and are checked when it is read;
the rest (the device `auto` resolves to, the number of data-parallel
processes, how many stages the architecture has, what its head is, which
command runs: `paddle-tl cv` and `check-labels` refuse some settings that
training takes) only once the command starts, before any work. A rule whose
facts are not known yet is left for then.
Fallbacks that still run (features not cached under data-parallel, say) are
not refusals: engine/fit.py chooses those and says why. A setting refused on
its own (a value out of range, more frozen stages than the architecture has)
is refused where it is read (config.py, transfer/plan.py), not here. Pairs of
command-line flags (`--int8` with `--onnx`, ...) are in paddle_tl/flags.py.
"""

from dataclasses import dataclass
from typing import Callable, Optional

from paddle_tl.errors import ConfigError


@dataclass(frozen=True)
class Facts:
    """What the rules look at: the config, and what only training knows."""
    cfg: object
    device: Optional[str] = None  # "cpu" or "gpu" once resolved; None while Global.device is auto
    processes: Optional[int] = None  # data-parallel processes
    stages: Optional[int] = None  # body stages of the architecture
    # Whether the architecture's head, as built, is one layer fed with feature
    # vectors (models.features.feature_head): its own Linear layer (the only
    # head Arch.head's MLP can take the place of), or that MLP.
    feature_head: Optional[bool] = None
    command: Optional[str] = None  # the paddle-tl command about to run, where a rule depends on it ("cv", ...)

    @classmethod
    def of_config(cls, cfg, **known):
        device = cfg.Global.device
        return cls(cfg, device=None if device == "auto" else device, **known)


@dataclass(frozen=True)
class Setting:
    """One side of a rule: a key, a test of the facts (None: not known yet),
    and how to show its value."""
    key: str
    is_on: Callable[[Facts], Optional[bool]]
    shown: Callable[[Facts], str]


@dataclass(frozen=True)
class Rule:
    first: Setting
    second: Setting
    why: str  # the problem, and what to do instead

    def refuses(self, facts):
        return bool(self.first.is_on(facts) and self.second.is_on(facts))

    def message(self, facts):
        return (f"{self.first.key}={self.first.shown(facts)} cannot be combined with "
                f"{self.second.key}={self.second.shown(facts)}: {self.why}")


def _config_value(path):
    def value(facts):
        node = facts.cfg
        for part in path.split("."):
            node = getattr(node, part)
        return node
    return value


def _is(path, test):
    value = _config_value(path)
    return Setting(path, lambda facts: test(value(facts)), lambda facts: _yaml(value(facts)))


def _yaml(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fact(key, name, test, shown):
    """A setting whose fact is known only once training starts."""
    def is_on(facts):
        value = getattr(facts, name)
        return None if value is None else test(value)
    return Setting(key, is_on, lambda facts: shown(getattr(facts, name), facts))


AMP = _is("Global.amp", bool)
TO_STATIC = _is("Global.to_static", bool)
ADAPTING = _is("Transfer.domain_adaptation", lambda method: method != "none")
UNFREEZING = _is("Transfer.strategy", lambda strategy: strategy in ("gradual", "lp_ft"))
LINEAR_PROBE = _is("Transfer.strategy", lambda strategy: strategy == "linear_probe")
LP_FT = _is("Transfer.strategy", lambda strategy: strategy == "lp_ft")
L2SP = _is("Transfer.l2sp_alpha", lambda alpha: alpha > 0)
LAYER_DECAY = _is("Transfer.layer_decay", lambda decay: decay is not None)
STAGE_LR_MULTS = _is("Transfer.stage_lr_mults", lambda mults: mults is not None)
MLP_HEAD = _is("Arch.head.type", lambda head: head == "mlp")
RESUMING = _is("Global.resume", bool)
DISTILLING = _is("Distill.teacher", lambda teacher: teacher is not None)
NOT_PRETRAINED = _is("Arch.pretrained", lambda pretrained: pretrained is False)
MIXUP = _is("DataLoader.Train.augment.mixup", lambda alpha: alpha > 0)
CUTMIX = _is("DataLoader.Train.augment.cutmix", lambda alpha: alpha > 0)
CONCATENATED = _is("Arch.name", lambda name: "+" in name)  # models/concat.py
BODY_TRAINS = _is("Transfer.strategy",
                  lambda strategy: strategy in ("partial", "full", "gradual", "bitfit", "lp_ft"))
CPU = _fact("Global.device", "device", lambda device: device == "cpu",
            lambda device, facts: device if facts.cfg.Global.device == device else f"auto (found {device} only)")
DATA_PARALLEL = _fact("data-parallel training", "processes", lambda processes: processes > 1,
                      lambda processes, facts: f"{processes} processes")


OTHER_HEAD = _fact("Arch.name", "feature_head", lambda takes_features: not takes_features,
                   lambda _takes_features, facts: f"{facts.cfg.Arch.name} (whose head is not one Linear layer)")


def _head_layers(facts):
    from paddle_tl.models.zoo import get_spec  # imports paddle: only when the message is written
    return ", ".join(get_spec(facts.cfg.Arch.name).head)


# The same fact, shown with the layers the architecture's head is made of.
HEAD_NOT_LINEAR = _fact("Arch.name", "feature_head", lambda takes_features: not takes_features,
                        lambda _takes_features, facts: f"{facts.cfg.Arch.name} (whose head is "
                                                       f"{_head_layers(facts)}, not one Linear layer)")
CROSS_VALIDATING = _fact("paddle-tl command", "command", lambda command: command == "cv", lambda command, _: command)
CHECKING_LABELS = _fact("paddle-tl command", "command", lambda command: command == "check-labels",
                        lambda command, _: command)


def _freezes_every_stage(facts):
    """partial, gradual or lp_ft with Transfer.freeze_stages covering the
    whole body: no stage of the body ever trains."""
    transfer = facts.cfg.Transfer
    if transfer.strategy not in ("partial", "gradual", "lp_ft") or transfer.freeze_stages is None:
        return False
    return None if facts.stages is None else transfer.freeze_stages >= facts.stages


def _shown_frozen(facts):
    return f"{facts.cfg.Transfer.freeze_stages} (all {facts.stages} stages of {facts.cfg.Arch.name})"


FROZEN_BODY = Setting("Transfer.freeze_stages", _freezes_every_stage, _shown_frozen)


def _freezes_exactly_every_stage(facts):
    """Transfer.freeze_stages equal to the body's stages (more than that is
    refused on its own, by transfer/plan.py)."""
    frozen = facts.cfg.Transfer.freeze_stages
    if frozen is None:
        return False
    return None if facts.stages is None else frozen == facts.stages


ALL_STAGES = Setting("Transfer.freeze_stages", _freezes_exactly_every_stage, _shown_frozen)

DETECTING = _is("Global.task", lambda task: task == "detection")
CLASSIFYING = _is("Global.task", lambda task: task == "classification")
TASK = _is("Global.task", lambda _task: True)
_DETECTION_DATA = ("VOC", "COCO")


def _other_task_data(side):
    """The dataset of DataLoader.<side> is of the other task: boxes (VOC,
    COCO) for classification, labelled images for detection."""
    name = _config_value(f"DataLoader.{side}.dataset.name")
    return Setting(f"DataLoader.{side}.dataset.name",
                   lambda facts: (name(facts) in _DETECTION_DATA) != (facts.cfg.Global.task == "detection"),
                   lambda facts: name(facts))


_TASK_DATA = ("detection reads boxes from a PASCAL VOC folder or a COCO json (dataset name VOC or COCO), "
              "classification labelled images (ImageFolder, ListFile, elpv); set Global.task to what the data "
              "holds (for detection, e.g. configs/faster_rcnn_mobilenet_v2_voc.yaml)")

# What classification's engine does and detection's loop (tasks/detection/train.py) does not.
_CLASSIFICATION_ONLY = (
    _is("Transfer.strategy", lambda strategy: strategy not in ("auto", "partial", "full")),
    _is("Transfer.bn", lambda bn: bn == "train"), _is("Arch.kwargs", bool), _is("Arch.input_size", bool),
    _is("Arch.num_classes", bool), MLP_HEAD, DISTILLING, ADAPTING, MIXUP, CUTMIX, AMP, TO_STATIC,
    L2SP, LAYER_DECAY, STAGE_LR_MULTS, _is("Global.ema_decay", bool),
    _is("DataLoader.Eval.tta", lambda tta: tta != "none"), _is("DataLoader.Train.sampler", lambda s: s != "random"),
    _is("Loss.class_weights", lambda weights: weights != "none"), _is("Loss.label_smoothing", bool),
    DATA_PARALLEL, _fact("paddle-tl command", "command", lambda command: command in ("cv", "check-labels"),
                         lambda command, _: command))

RULES = (
    Rule(LAYER_DECAY, STAGE_LR_MULTS, "give either layer_decay or stage_lr_mults, not both"),
    Rule(AMP, CPU, "mixed precision needs a GPU; set Global.amp=false or run on a GPU"),
    Rule(TO_STATIC, UNFREEZING, "stages unfrozen after the graph is traced would stay frozen; use partial or full, "
                                "or Global.to_static=false"),
    Rule(TO_STATIC, ADAPTING, "the per-step gradient-reversal and ramp coefficients would be traced as constants; "
                              "use Global.to_static=false"),
    Rule(ADAPTING, LINEAR_PROBE, "domain adaptation moves the body's features, which linear_probe keeps frozen; use "
                                 "strategy partial, full, gradual, lp_ft or auto"),
    Rule(ADAPTING, FROZEN_BODY, "domain adaptation moves the body's features, and no stage would train; lower "
                                "Transfer.freeze_stages"),
    Rule(MLP_HEAD, HEAD_NOT_LINEAR, "an MLP head replaces a single Linear head; use Arch.head.type=linear"),
    Rule(OTHER_HEAD, CHECKING_LABELS, "check-labels needs the features in front of the head, which this head does "
                                      "not expose; choose an architecture whose head is a single Linear layer"),
    Rule(ADAPTING, OTHER_HEAD, "domain adaptation works on the head's input features; choose an architecture "
                               "whose head is a single Linear layer"),
    Rule(ADAPTING, DATA_PARALLEL, "source/target pairs are not sharded across processes; train on one process"),
    Rule(DISTILLING, ADAPTING, "both change what every step trains on (soft targets of the labeled images vs "
                               "source/target pairs); distill first, then adapt the distilled run, or the reverse"),
    Rule(DISTILLING, TO_STATIC, "the teacher runs beside the student in every training step on images, outside "
                                "the traced graph; use Global.to_static=false"),
    Rule(MIXUP, ADAPTING, "domain adaptation pairs source and target images in its own batches, which are not mixed; "
                          "set the mixup alpha to 0"),
    Rule(CUTMIX, ADAPTING, "domain adaptation pairs source and target images in its own batches, which are not "
                           "mixed; set the cutmix alpha to 0"),
    Rule(MIXUP, DISTILLING, "the distillation loss takes one class label per image, and a mixed image has two; set "
                            "the mixup alpha to 0"),
    Rule(CUTMIX, DISTILLING, "the distillation loss takes one class label per image, and a mixed image has two; set "
                             "the cutmix alpha to 0"),
    Rule(L2SP, NOT_PRETRAINED, "L2-SP pulls the body toward its pretrained weights, and there are none; set "
                               "Arch.pretrained or Transfer.l2sp_alpha=0"),
    Rule(LP_FT, ALL_STAGES, "lp_ft fine-tunes the stages above Transfer.freeze_stages, and this leaves none; lower "
                            "it, or use Transfer.strategy=linear_probe"),
    Rule(CONCATENATED, BODY_TRAINS, "concatenated bodies stay frozen and only their head trains; use "
         "Transfer.strategy=linear_probe"),
    Rule(RESUMING, CROSS_VALIDATING, "cross-validation trains every fold afresh; leave it unset"),
    Rule(DISTILLING, CROSS_VALIDATING, "the teacher was trained on the images every fold holds out, so its soft "
                                       "targets would leak them into the folds' scores; cross-validate without it"),
    *(Rule(TASK, _other_task_data(side), _TASK_DATA) for side in ("Train", "Eval")),
    Rule(CLASSIFYING, _is("Global.budget_minutes", lambda minutes: minutes is not None),
         "the budget applies to detection; classification's is Transfer.auto_budget_minutes"),
    Rule(_is("Arch.mask", bool), CLASSIFYING,
         "the mask head is Mask R-CNN's, a detector; set Global.task=detection (e.g. "
         "configs/mask_rcnn_mobilenet_v2_coco.yaml) or Arch.mask=false"),
    *(Rule(DETECTING, setting, "detection's training (paddle_tl/tasks/detection) does not take it; leave it at "
                               "its default") for setting in _CLASSIFICATION_ONLY),
)


def check_combinations(facts):
    """Raise ConfigError for the first refused pair (its message names both
    settings); rules whose facts are not known yet pass."""
    for rule in RULES:
        if rule.refuses(facts):
            raise ConfigError(rule.message(facts))
