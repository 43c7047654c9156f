"""Transfer strategies: which stages of the pretrained body train, how fast,
and freezing that really freezes.

The architecture table (zoo.ArchSpec) splits every parameter into stages
(bottom to top) and a head. A strategy is reduced to two numbers, how many
bottom stages stay frozen and the body's learning-rate multiplier, so that all
strategies share one mechanism.
"""

import logging
import statistics
from dataclasses import asdict, dataclass, field

from paddle_tl.backend import import_paddle
from paddle_tl.config import ConfigError
from paddle_tl.zoo import match_prefix, stage_index

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

# `auto` thresholds on the median number of training images per class. Below
# SMALL the ImageNet features are kept as they are (fine-tuning that few
# images mostly overfits); up to LARGE the top half of the body adapts; above
# it there is enough data to move every layer.
SMALL_PER_CLASS = 250
LARGE_PER_CLASS = 1000


@dataclass
class TransferPlan:
    strategy: str  # the one used: linear_probe, partial or full
    requested: str  # as configured (auto or one of the above)
    frozen_stages: int
    num_stages: int
    body_lr_mult: float
    bn: str
    reason: str
    figures: dict = field(default_factory=dict)  # what the choice was based on

    def to_dict(self):
        return asdict(self)


def plan_transfer(transfer_cfg, num_stages, class_counts, pretrained):
    """Turn Transfer.* into a plan; `auto` chooses from the measured data size."""
    figures = {"images_per_class_median": statistics.median(class_counts) if class_counts else 0,
               "images_per_class_min": min(class_counts, default=0),
               "num_classes": len(class_counts)}
    strategy = transfer_cfg.strategy
    if strategy == "auto":
        strategy, reason = _choose(figures["images_per_class_median"], pretrained)
    else:
        reason = "set in the config"
        if not pretrained and strategy != "full":
            log.warning("Transfer.strategy=%s freezes layers but Arch.pretrained is false: "
                        "the frozen layers keep their random initialisation", strategy)
    frozen = {"linear_probe": num_stages, "full": 0}.get(strategy)
    if strategy == "partial":
        frozen = num_stages // 2 if transfer_cfg.freeze_stages is None else transfer_cfg.freeze_stages
        if frozen > num_stages:
            raise ConfigError(f"Transfer.freeze_stages: {frozen} is more than the {num_stages} stages "
                              "of this architecture")
    return TransferPlan(strategy=strategy, requested=transfer_cfg.strategy, frozen_stages=frozen,
                        num_stages=num_stages, body_lr_mult=transfer_cfg.body_lr_mult,
                        bn=transfer_cfg.bn, reason=reason, figures=figures)


def _choose(per_class, pretrained):
    if not pretrained:
        return "full", "no pretrained weights: every layer must train"
    size = f"median {per_class:g} training images per class"
    if per_class < SMALL_PER_CLASS:
        return "linear_probe", f"{size} (< {SMALL_PER_CLASS}): keep the ImageNet features, train the head"
    if per_class < LARGE_PER_CLASS:
        return "partial", f"{size} (< {LARGE_PER_CLASS}): fine-tune the top half of the body"
    return "full", f"{size} (>= {LARGE_PER_CLASS}): fine-tune every layer"


def is_frozen(spec, name, plan):
    """A parameter or sublayer name is frozen when it sits in a bottom stage."""
    index = stage_index(spec, name)
    return index is not None and index < plan.frozen_stages


def apply_plan(model, spec, plan):
    """Freeze parameters and BatchNorm statistics of the frozen stages.

    `paddle.Model.fit` calls `network.train()` every batch, which would put a
    frozen stage's BatchNorm back to updating its running statistics; forcing
    `use_global_stats` makes the layer normalise with (and keep) its stored
    statistics in train mode too.
    """
    frozen_params = trainable_params = 0
    bn_statistics = running_statistics(model)
    for name, param in model.named_parameters():
        if id(param) in bn_statistics:
            continue  # never trained by the optimizer; frozen through use_global_stats below
        frozen = is_frozen(spec, name, plan)
        param.stop_gradient = frozen
        if frozen:
            frozen_params += int(param.size)
        else:
            trainable_params += int(param.size)
    if plan.bn == "freeze":
        for name, layer in model.named_sublayers():
            if _is_batch_norm(layer) and is_frozen(spec, name, plan):
                layer._use_global_stats = True
    return {"trainable_params": trainable_params, "frozen_params": frozen_params}


def running_statistics(model):
    """ids of BatchNorm running means and variances, which paddle lists among
    a model's parameters (with stop_gradient set) although no gradient moves them."""
    return {id(p) for layer in model.sublayers() if _is_batch_norm(layer) for p in (layer._mean, layer._variance)}


def _is_batch_norm(layer):
    return isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))


def trainable_parameters(model, spec, plan):
    """The parameters the optimizer updates, each carrying its learning-rate
    multiplier: the head at the base rate, the trainable body at
    `body_lr_mult` times it. Paddle multiplies the scheduler's value by
    `optimize_attr["learning_rate"]` (what `ParamAttr(learning_rate=...)`
    sets); parameter-group dicts would break `paddle.Model`, whose
    `minimize` expects a flat list. Frozen parameters are left out, so that
    neither updates nor weight decay touch them."""
    params = []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        param.optimize_attr["learning_rate"] = 1.0 if match_prefix(name, spec.head) else plan.body_lr_mult
        params.append(param)
    return params
