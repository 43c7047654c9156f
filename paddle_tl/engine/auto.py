"""`Transfer.strategy=auto` that measures: a few candidate recipes, each
trained briefly and scored on the validation split (never on Eval), then
the best one trained for the run.

Why measure: the four-quadrant rule (transfer/plan.py) is a good prior, but
its thresholds (500 images per class, separability 0.6) are guesses, and it
never sees what fine-tuning the top stages would gain on this data. The
rule orders the candidates (fine-tuning first on large data, the linear
probe first on small data), and the budget decides how many are measured;
the winner then trains on all the training images for what is left of the
budget: Global.epochs, or fewer where their pace, measured in its trial,
says they would not fit.
Measuring is affordable because the candidates and the run after them
share one pass of the frozen layers over the images (feature_cache's
shared caches): after it, an epoch of a linear probe or of top-stage
fine-tuning costs a fraction of an epoch on images.

The training itself is the engine's (engine/train.py passes `trial`, which
trains a config briefly without writing a run folder); this module decides
what to try, in which order, for how long, and what won.
"""

import dataclasses
import statistics
import time
from dataclasses import dataclass

from paddle_tl.config import apply_override, from_dict
from paddle_tl.errors import ConfigError
from paddle_tl.transfer.plan import SMALL_PER_CLASS

# Epochs each candidate trains (fewer when Global.epochs is smaller): enough
# for the linear probe to settle and for LP-FT to probe and then fine-tune.
TRIAL_EPOCHS = 4
# Candidates train on at most this many images of each class (seeded): on a
# few thousand images, measuring four recipes on all of them would cost more
# than training the winner; the validation split that scores them is whole.
TRIAL_IMAGES_PER_CLASS = 200
# No candidate starts that, at the pace of the one before it, would end past
# this share of the budget; the rest is for training the winner.
MEASURING_SHARE = 0.5


@dataclass
class Candidate:
    name: str
    overrides: tuple  # "Section.key=value", applied to the run's config
    what: str
    cut: int  # the stages its cache sits above (all of them for a linear probe)


def candidates(cfg, num_stages, class_counts):
    """The recipes to measure, in the order the four-quadrant rule prefers
    them for this data size."""
    top, two = num_stages - 1, max(1, num_stages - 2)
    probe = Candidate("linear_probe", ("Transfer.strategy=linear_probe",), "the frozen features, a new head",
                      num_stages)
    mlp = Candidate("mlp_head", ("Transfer.strategy=linear_probe", "Arch.head.type=mlp"),
                    "the frozen features, an MLP head (Arch.head)", num_stages)
    lp_ft_top = Candidate("lp_ft_top", ("Transfer.strategy=lp_ft", f"Transfer.freeze_stages={top}"),
                          "a linear probe, then the top stage fine-tuned", top)
    lp_ft_two = Candidate("lp_ft_two", ("Transfer.strategy=lp_ft", f"Transfer.freeze_stages={two}"),
                          "a linear probe, then the top two stages fine-tuned", two)
    chosen_head = any(key.startswith("Arch.head") for key in cfg.given)  # the user's head stays
    probes = [probe] if chosen_head else [probe, mlp]
    tuned = [lp_ft_top] + ([lp_ft_two] if two < top else [])
    large = bool(class_counts) and statistics.median(class_counts) >= SMALL_PER_CLASS
    return tuned + probes if large else probes + tuned


def configured(cfg, overrides):
    """The config with `overrides` applied (validated as any config is)."""
    raw = cfg.to_dict()
    for override in overrides:
        apply_override(raw, override)
    variant = from_dict(raw)
    variant.given = cfg.given | {override.partition("=")[0] for override in overrides}
    return variant


def why_not_measured(cfg, processes, has_validation, pretrained):
    """Why `auto` falls back to the four-quadrant rule alone, or None."""
    transfer = cfg.Transfer
    if not transfer.auto_budget_minutes:
        return "Transfer.auto_budget_minutes=0"
    if not pretrained:
        return "no pretrained weights (every layer must train)"
    if not has_validation:
        return "no validation split to measure on (DataLoader.Train.val_fraction)"
    if transfer.domain_adaptation != "none":
        return "domain adaptation"
    if processes > 1:
        return "data-parallel training"
    return None


@dataclass
class Trial:
    """What a candidate's brief training measured."""
    val_top1: float
    val_loss: float
    # one epoch of the run itself (every training image trained on, every
    # scored split scored) at the pace the trial went
    epoch_seconds: float


def measure(cfg, trial, to_measure, started=None):
    """Measure the candidates `to_measure` (in order) within the budget,
    counted from `started` (now by default); returns (the winner's config,
    the record for metrics.json). `trial(cfg)` trains a config for its
    Global.epochs and returns a Trial."""
    budget = cfg.Transfer.auto_budget_minutes * 60
    started = time.time() if started is None else started
    epochs = min(TRIAL_EPOCHS, cfg.Global.epochs)
    rows, last = [], 0.0
    for candidate in to_measure:
        spent = time.time() - started
        if rows and spent + last > MEASURING_SHARE * budget:
            rows.append({"name": candidate.name, "what": candidate.what, "skipped": "budget"})
            continue
        print(f"auto: measuring {candidate.name} ({candidate.what}) for {epochs} epochs on the validation split")
        try:
            variant = configured(cfg, (*candidate.overrides, f"Global.epochs={epochs}"))
            t0 = time.time()
            measured = trial(variant)
        except ConfigError as exc:  # a recipe this architecture cannot run (an MLP head on a conv head, say)
            rows.append({"name": candidate.name, "what": candidate.what, "skipped": str(exc)})
            continue
        last = time.time() - t0
        rows.append({"name": candidate.name, "what": candidate.what, "overrides": list(candidate.overrides),
                     "val_top1": measured.val_top1, "val_loss": measured.val_loss, "seconds": round(last, 2),
                     "epoch_seconds": round(measured.epoch_seconds, 2)})
        print(f"auto: {candidate.name}: validation top-1 {measured.val_top1:.4f} (loss {measured.val_loss:.4f}), "
              f"{rows[-1]['seconds']:.0f} s")
    measured = [row for row in rows if "val_top1" in row]
    if not measured:
        raise ConfigError("Transfer.strategy=auto: no candidate could be measured: "
                          + "; ".join(f"{row['name']}: {row['skipped']}" for row in rows))
    # The best validation top-1; a tie goes to the lower loss, then to the earlier (the rule's preference).
    best = min(measured, key=lambda row: (-row["val_top1"], row["val_loss"], measured.index(row)))
    spent = time.time() - started
    run_epochs, why = epochs_left(cfg.Global.epochs, budget - spent, best["epoch_seconds"])
    overrides = [*best["overrides"], *([f"Global.epochs={run_epochs}"] if run_epochs < cfg.Global.epochs else [])]
    reason = (f"measured {len(measured)} candidates on the validation split in {spent:.0f} s; {best['name']} "
              f"({best['what']}) scored best, validation top-1 {best['val_top1']:.4f}; it trains {why}")
    print(f"auto: {reason}")
    return configured(cfg, overrides), {
        "candidates": rows, "chosen": best["name"], "overrides": overrides, "epochs": run_epochs, "reason": reason,
        "seconds": round(spent, 2), "trial_epochs": epochs, "budget_minutes": cfg.Transfer.auto_budget_minutes}


def epochs_left(epochs, seconds_left, epoch_seconds):
    """(how many of the run's `epochs` the winner trains, and why): all that
    fit in the budget's `seconds_left` at `epoch_seconds` each, at least one."""
    pace = f"about {epoch_seconds:.0f} s an epoch, {max(0, seconds_left):.0f} s of the budget left"
    fit = int(max(0, seconds_left) // epoch_seconds) if epoch_seconds > 0 else epochs
    if fit >= epochs:
        return epochs, f"Global.epochs={epochs} ({pace})"
    return max(1, fit), f"{max(1, fit)} of Global.epochs={epochs}, all that fit ({pace})"


def restore(record, cfg):
    """The winner's config from a record: a resumed run trains what was
    chosen, for as many epochs, without measuring again."""
    return configured(cfg, record["overrides"])


def chosen_plan(plan, record):
    """The plan of the winner, told as auto's choice."""
    return dataclasses.replace(plan, requested="auto", reason=record["reason"], candidates=record["candidates"])
