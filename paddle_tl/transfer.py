"""Transfer strategies: which stages of the pretrained body train, when, how
fast, and freezing that really freezes.

The architecture table (zoo.ArchSpec) splits every parameter into stages
(bottom to top) and a head. A strategy reduces to how many bottom stages are
frozen at each epoch and a learning-rate multiplier per stage, so every
strategy shares one mechanism.
"""

import logging
import statistics
from dataclasses import asdict, dataclass, field

from paddle_tl.backend import import_paddle
from paddle_tl.config import ConfigError
from paddle_tl.zoo import match_prefix, stage_index

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

# `auto` follows the four-quadrant rule of transfer learning: dataset size
# (median training images per class) against similarity to ImageNet, measured
# as how well the frozen features separate the classes (similarity.py).
SMALL_PER_CLASS = 500
SIMILAR_SEPARABILITY = 0.6


@dataclass
class TransferPlan:
    strategy: str  # the one used: linear_probe, partial, full or gradual
    requested: str  # as configured (auto or one of the above)
    frozen_stages: int  # bottom stages frozen at the start
    num_stages: int
    stage_lr_mults: list  # learning-rate multiplier per stage, bottom to top (the head's is 1)
    bn: str
    reason: str
    figures: dict = field(default_factory=dict)  # what an `auto` choice was based on
    unfreeze_every: int = 1  # gradual: epochs between unfreezing one more stage
    min_frozen_stages: int = 0  # gradual: bottom stages that never unfreeze
    l2sp_alpha: float = 0.0

    def frozen_stages_at(self, epoch):
        """Bottom stages frozen during `epoch` (0-based). Gradual unfreezing
        trains the head alone first, then opens one stage from the top every
        `unfreeze_every` epochs."""
        if self.strategy != "gradual":
            return self.frozen_stages
        return max(self.min_frozen_stages, self.num_stages - epoch // self.unfreeze_every)

    @property
    def always_frozen(self):
        return self.min_frozen_stages if self.strategy == "gradual" else self.frozen_stages

    def to_dict(self):
        return asdict(self)


def plan_transfer(transfer_cfg, num_stages, class_counts, pretrained, similarity=None):
    """Turn Transfer.* into a plan; `auto` chooses from the measured data size
    and, when given, the measured similarity (a dict from similarity.py).
    Domain adaptation moves the body's features, so it needs a body that trains."""
    figures = {"images_per_class_median": statistics.median(class_counts) if class_counts else 0,
               "images_per_class_min": min(class_counts, default=0), "num_classes": len(class_counts)}
    if similarity:
        figures.update(similarity)
    strategy, frozen = transfer_cfg.strategy, transfer_cfg.freeze_stages
    adapting = transfer_cfg.domain_adaptation != "none"
    if strategy == "auto":
        strategy, frozen, reason = _choose(figures, num_stages, pretrained)
        if adapting and strategy == "linear_probe":
            strategy, frozen = "partial", num_stages // 2
            reason += "; but domain adaptation must move the features -> fine-tune the top stages"
    else:
        reason = "set in the config"
        if not pretrained and strategy != "full":
            log.warning("Transfer.strategy=%s freezes layers but Arch.pretrained is false: "
                        "the frozen layers keep their random initialisation", strategy)
    if frozen is not None and frozen > num_stages:
        raise ConfigError(f"Transfer.freeze_stages: {frozen} is more than the {num_stages} stages "
                          "of this architecture")
    start = {"linear_probe": num_stages, "full": 0, "gradual": num_stages}.get(strategy)
    if strategy == "partial":
        start = num_stages // 2 if frozen is None else frozen
    return TransferPlan(strategy=strategy, requested=transfer_cfg.strategy, frozen_stages=start,
                        num_stages=num_stages, stage_lr_mults=_stage_lr_mults(transfer_cfg, num_stages),
                        bn=transfer_cfg.bn, reason=reason, figures=figures,
                        unfreeze_every=transfer_cfg.unfreeze_every,
                        min_frozen_stages=(frozen or 0) if strategy == "gradual" else 0,
                        l2sp_alpha=transfer_cfg.l2sp_alpha)


def _choose(figures, num_stages, pretrained):
    """(strategy, frozen stages or None for the default, reason)."""
    if not pretrained:
        return "full", 0, "no pretrained weights: every layer must train"
    per_class = figures["images_per_class_median"]
    small = per_class < SMALL_PER_CLASS
    size = f"median {per_class:g} training images per class ({'<' if small else '>='} {SMALL_PER_CLASS}: " \
           f"{'small' if small else 'large'})"
    if "separability" not in figures:
        similar, likeness = True, "similarity to ImageNet not measurable for this head: assumed similar"
    else:
        similar = figures["separability"] >= SIMILAR_SEPARABILITY
        likeness = (f"frozen ImageNet features separate the classes with separability "
                    f"{figures['separability']:.2f} ({'>=' if similar else '<'} {SIMILAR_SEPARABILITY}: "
                    f"{'similar' if similar else 'different'})")
    if small and similar:
        return "linear_probe", None, f"{size}, {likeness} -> keep the features, train the head"
    if small:
        return "partial", 1, f"{size}, {likeness} -> fine-tune all but the stem, with augmentation"
    if similar:
        return "partial", num_stages // 2, f"{size}, {likeness} -> fine-tune the top stages"
    return "full", 0, f"{size}, {likeness} -> fine-tune everything"


def _stage_lr_mults(transfer_cfg, num_stages):
    """Per-stage multipliers, bottom to top: explicit `stage_lr_mults`, or
    `body_lr_mult` scaled by `layer_decay` once more for each stage further
    from the head (discriminative fine-tuning), or `body_lr_mult` for all."""
    if transfer_cfg.stage_lr_mults is not None:
        if len(transfer_cfg.stage_lr_mults) != num_stages:
            raise ConfigError(f"Transfer.stage_lr_mults: {len(transfer_cfg.stage_lr_mults)} values given, this "
                              f"architecture has {num_stages} stages (bottom to top)")
        return [float(m) for m in transfer_cfg.stage_lr_mults]
    decay = transfer_cfg.layer_decay or 1.0
    return [transfer_cfg.body_lr_mult * decay ** (num_stages - 1 - i) for i in range(num_stages)]


def running_statistics(model):
    """BatchNorm running means and variances, which paddle lists among a
    model's parameters (with stop_gradient set) although no gradient moves them."""
    return [p for layer in model.sublayers() if _is_batch_norm(layer) for p in (layer._mean, layer._variance)]


def _is_batch_norm(layer):
    return isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))


def _below(spec, name, frozen_stages):
    index = stage_index(spec, name)
    return index is not None and index < frozen_stages


def set_frozen_stages(model, spec, frozen_stages, bn):
    """Freeze the bottom `frozen_stages` stages and unfreeze the rest.

    `paddle.Model.fit` calls `network.train()` every batch, which would put a
    frozen stage's BatchNorm back to updating its running statistics;
    `use_global_stats=True` makes it normalise with (and keep) its stored
    statistics in train mode too. Unfrozen layers get paddle's default back
    (None: batch statistics in training, stored ones in evaluation; False
    would mean batch statistics even in evaluation)."""
    frozen_params = trainable_params = 0
    statistics_ids = {id(p) for p in running_statistics(model)}
    for name, param in model.named_parameters():
        if id(param) in statistics_ids:
            continue  # never trained by the optimizer; frozen through use_global_stats below
        frozen = _below(spec, name, frozen_stages)
        param.stop_gradient = frozen
        if frozen:
            frozen_params += int(param.size)
        else:
            trainable_params += int(param.size)
    for name, layer in model.named_sublayers():
        if _is_batch_norm(layer):
            layer._use_global_stats = True if bn == "freeze" and _below(spec, name, frozen_stages) else None
    return {"trainable_params": trainable_params, "frozen_params": frozen_params}


def trainable_parameters(model, spec, plan):
    """Every parameter the optimizer may update during the run (gradual
    unfreezing included: paddle skips a parameter while its stop_gradient is
    set and creates its optimizer state when it first trains), each carrying
    its learning-rate multiplier in `optimize_attr` (what
    `ParamAttr(learning_rate=...)` sets; parameter-group dicts would break
    `paddle.Model`, whose `minimize` expects a flat list)."""
    statistics_ids = {id(p) for p in running_statistics(model)}
    params = []
    for name, param in model.named_parameters():
        if id(param) in statistics_ids or _below(spec, name, plan.always_frozen):
            continue
        index = stage_index(spec, name)
        param.optimize_attr["learning_rate"] = 1.0 if index is None else plan.stage_lr_mults[index]
        params.append(param)
    return params


def add_l2sp(model, spec, alpha, loss_scale=None):
    """L2-SP: pull every body weight toward its current (pretrained) value with
    the penalty alpha/2 * ||w - w0||^2, in place of weight decay toward zero.
    The penalty's gradient alpha * (w - w0) is added by a gradient hook, so the
    training loop needs no change; the head keeps ordinary weight decay.

    Under AMP the hook sees gradients of the loss times the loss scale, which
    the optimizer step divides out again: `loss_scale()` (None without AMP)
    scales the pull too, or it would shrink by that factor (65536 at first).
    Under O2 the weights and gradients are float16; the pull is computed
    against the float32 start and cast (an overflow there is skipped and
    lowers the scale, like any other)."""
    statistics_ids = {id(p) for p in running_statistics(model)}
    no_decay = paddle.regularizer.L2Decay(0.0)

    def pull(grad, param, start):
        term = alpha * (param.detach().astype(start.dtype) - start)
        scale = loss_scale() if loss_scale is not None else None
        if scale is not None:
            term = term * scale
        return grad + term.astype(grad.dtype)

    anchored = 0
    for name, param in model.named_parameters():
        if id(param) in statistics_ids or match_prefix(name, spec.head):
            continue
        start = param.detach().clone()
        param.register_hook(lambda grad, p=param, w0=start: pull(grad, p, w0))
        param.regularizer = no_decay
        anchored += int(param.size)
    return anchored


class GradualUnfreezer(paddle.callbacks.Callback):
    """Applies the plan's frozen stages at the start of every epoch."""

    def __init__(self, network, spec, plan, state):
        super().__init__()
        self.network, self.spec, self.plan, self.state = network, spec, plan, state

    def on_epoch_begin(self, epoch, logs=None):
        frozen = self.plan.frozen_stages_at(self.state.start_epoch + epoch)
        if frozen != self.state.frozen_stages:
            counts = set_frozen_stages(self.network, self.spec, frozen, self.plan.bn)
            print(f"epoch {self.state.start_epoch + epoch + 1}: {frozen}/{self.plan.num_stages} stages frozen, "
                  f"{counts['trainable_params']:,} trainable parameters")
            self.state.frozen_stages = frozen
