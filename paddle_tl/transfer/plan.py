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

from paddle_tl.errors import ConfigError
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

# `auto` follows the four-quadrant rule of transfer learning: dataset size
# (median training images per class) against similarity to ImageNet, measured
# as how well the frozen features separate the classes (similarity.py).
SMALL_PER_CLASS = 500
SIMILAR_SEPARABILITY = 0.6


@dataclass
class TransferPlan:
    strategy: str  # the one used: linear_probe, partial, full, gradual, bitfit or lp_ft
    requested: str  # as configured (auto or one of the above)
    frozen_stages: int  # bottom stages frozen at the start
    num_stages: int
    stage_lr_mults: list  # learning-rate multiplier per stage, bottom to top (the head's is 1)
    bn: str
    reason: str
    figures: dict = field(default_factory=dict)  # what an `auto` choice was based on
    unfreeze_every: int = 1  # gradual: epochs between unfreezing one more stage
    min_frozen_stages: int = 0  # gradual, lp_ft: bottom stages that never unfreeze
    lp_epochs: int = 0  # lp_ft: epochs of the linear probe before the top stages unfreeze
    candidates: list = None  # auto that measured: each candidate's validation top-1 and seconds
    rule: dict = None  # auto that measured: how the winner was chosen (engine/auto.py choose)
    l2sp_alpha: float = 0.0

    def frozen_stages_at(self, epoch):
        """Bottom stages frozen during `epoch` (0-based). Gradual unfreezing
        trains the head alone first, then opens one stage from the top every
        `unfreeze_every` epochs; LP-FT trains the head alone for `lp_epochs`,
        then the stages above `min_frozen_stages` too."""
        if self.strategy == "gradual":
            return max(self.min_frozen_stages, self.num_stages - epoch // self.unfreeze_every)
        if self.strategy == "lp_ft":
            return self.num_stages if epoch < self.lp_epochs else self.min_frozen_stages
        return self.frozen_stages

    @property
    def unfreezes(self):
        """Whether the frozen stages change during the run."""
        return self.strategy in ("gradual", "lp_ft")

    @property
    def always_frozen(self):
        return self.min_frozen_stages if self.unfreezes else self.frozen_stages

    def to_dict(self):
        return asdict(self)


def plan_transfer(transfer_cfg, num_stages, class_counts, pretrained, similarity=None, epochs=1):
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
    start = {"linear_probe": num_stages, "full": 0, "gradual": num_stages, "bitfit": 0, "lp_ft": num_stages}.get(
        strategy)
    if strategy == "partial":
        start = num_stages // 2 if frozen is None else frozen
    # lp_ft with every stage frozen is refused before any work (combinations.py).
    never_unfrozen = {"gradual": frozen or 0, "lp_ft": num_stages - 1 if frozen is None else frozen}.get(strategy, 0)
    return TransferPlan(strategy=strategy, requested=transfer_cfg.strategy, frozen_stages=start,
                        num_stages=num_stages, stage_lr_mults=_stage_lr_mults(transfer_cfg, num_stages),
                        bn=transfer_cfg.bn, reason=reason, figures=figures,
                        unfreeze_every=transfer_cfg.unfreeze_every,
                        min_frozen_stages=never_unfrozen,
                        lp_epochs=probe_epochs(transfer_cfg, epochs) if strategy == "lp_ft" else 0,
                        l2sp_alpha=transfer_cfg.l2sp_alpha)


def probe_epochs(transfer_cfg, epochs):
    """LP-FT's linear-probe epochs: Transfer.lp_epochs, by default half the run's."""
    return transfer_cfg.lp_epochs or max(1, epochs // 2)


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


