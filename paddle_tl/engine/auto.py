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
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

from paddle_tl.config import apply_override, from_dict
from paddle_tl.errors import ConfigError
from paddle_tl.transfer.plan import SMALL_PER_CLASS, probe_epochs

# A trial trains the run's recipe, its learning-rate schedule included, and
# stops early only where the rest would be expensive. A head on cached
# features trains all of Global.epochs: seconds in all, and a head cut short
# loses to recipes that merely converge sooner (on elpv binary the linear
# probe's trial scored 0.772 after 4 epochs, 0.833 after 10). LP-FT probes
# for the run's lp_epochs (on features, as cheap), then fine-tunes for this
# many epochs, the part that costs, at the rates the run's would have.
TRIAL_FINE_TUNING_EPOCHS = 2
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
    head_only: bool = False  # trains a head on the frozen features (else LP-FT)

    def trial_epochs(self, cfg):
        """How many of the run's epochs its trial trains: all of them for a
        head on features; LP-FT's probe, then TRIAL_FINE_TUNING_EPOCHS."""
        if self.head_only:
            return cfg.Global.epochs
        probe = min(cfg.Global.epochs, probe_epochs(cfg.Transfer, cfg.Global.epochs))
        return probe + min(TRIAL_FINE_TUNING_EPOCHS, cfg.Global.epochs - probe)  # none where the run has none


def candidates(cfg, num_stages, class_counts):
    """The recipes to measure, in the order the four-quadrant rule prefers
    them for this data size."""
    top, two = num_stages - 1, max(1, num_stages - 2)
    probe = Candidate("linear_probe", ("Transfer.strategy=linear_probe",), "the frozen features, a new head",
                      num_stages, head_only=True)
    mlp = Candidate("mlp_head", ("Transfer.strategy=linear_probe", "Arch.head.type=mlp"),
                    "the frozen features, an MLP head (Arch.head)", num_stages, head_only=True)
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
    """What a candidate's brief training measured. The paces are seconds an
    epoch of the run itself would take (every training image trained on,
    every split scored) at the trial's pace."""
    val_top1: float
    val_loss: float
    head_epoch_seconds: float  # an epoch that trains the head alone (LP-FT's probe, a linear probe)
    epoch_seconds: float  # an epoch that trains stages too (the same as the above where none does)
    val_balanced_accuracy: Optional[float] = None  # of the best epoch, where it chose (class-weighted loss)
    # It trained the run's whole schedule on all its training images (a head on
    # features, no class capped): it is what the run would train, already trained.
    complete: bool = False
    weights: Optional[dict] = None  # the network's state dict at its best epoch (callbacks.BestWeights)
    history: Optional[list] = None  # its epochs' rows (its "eval" columns are the validation split's)
    best_epoch: Optional[int] = None


def measure(cfg, trial, to_measure, val_counts, started=None, metric="top1"):
    """Measure the candidates `to_measure` (in order) within the budget,
    counted from `started` (now by default); returns (the winner's config,
    the record for metrics.json, the Trial of every measured candidate by
    name). `trial(cfg, epochs)` trains a config for the first `epochs` of
    its Global.epochs and returns a Trial; `val_counts`, the validation
    split's images per class, size its noise; `metric` (top1 or
    balanced_accuracy) is what the candidates are compared on."""
    budget = cfg.Transfer.auto_budget_minutes * 60
    started = time.time() if started is None else started
    rows, last, trials = [], 0.0, {}
    for candidate in to_measure:
        spent = time.time() - started
        if rows and spent + last > MEASURING_SHARE * budget:
            rows.append({"name": candidate.name, "what": candidate.what, "skipped": "budget"})
            continue
        try:
            variant, epochs = configured(cfg, candidate.overrides), candidate.trial_epochs(cfg)
            print(f"auto: measuring {candidate.name} ({candidate.what}) for {epochs} epochs on the validation split")
            t0 = time.time()
            measured = trial(variant, epochs)
        except ConfigError as exc:  # a recipe this architecture cannot run (an MLP head on a conv head, say)
            rows.append({"name": candidate.name, "what": candidate.what, "skipped": str(exc)})
            continue
        last = time.time() - t0
        trials[candidate.name] = measured
        rows.append({"name": candidate.name, "what": candidate.what, "overrides": list(candidate.overrides),
                     "val_top1": measured.val_top1, "val_loss": measured.val_loss, "epochs": epochs,
                     "seconds": round(last, 2), "head_epoch_seconds": round(measured.head_epoch_seconds, 2),
                     "epoch_seconds": round(measured.epoch_seconds, 2), "complete": measured.complete,
                     **({"val_balanced_accuracy": measured.val_balanced_accuracy}
                        if metric == "balanced_accuracy" else {})})
        shown = "" if metric == "top1" else f", balanced accuracy {measured.val_balanced_accuracy:.4f}"
        print(f"auto: {candidate.name}: validation top-1 {measured.val_top1:.4f}{shown} (loss "
              f"{measured.val_loss:.4f}), {rows[-1]['seconds']:.0f} s")
    measured = [row for row in rows if "val_top1" in row]
    if not measured:
        raise ConfigError("Transfer.strategy=auto: no candidate could be measured: "
                          + "; ".join(f"{row['name']}: {row['skipped']}" for row in rows))
    spent = time.time() - started
    best, rule = choose(cfg, measured, budget - spent, val_counts, metric)
    rule.update(winner=best["name"], complete=best["complete"])
    if best["complete"]:
        run_epochs, why = cfg.Global.epochs, "no more: its trial trained all of its schedule, and it ships as is"
        overrides = list(best["overrides"])
    else:
        run_epochs, why = epochs_left(configured(cfg, best["overrides"]), budget - spent, best["head_epoch_seconds"],
                                      best["epoch_seconds"])
        overrides = [*best["overrides"], *([f"Global.epochs={run_epochs}"] if run_epochs < cfg.Global.epochs else [])]
    reason = (f"measured {len(measured)} candidates on the validation split in {spent:.0f} s; {best['name']} "
              f"({best['what']}) won, validation {_named(metric)} {best[score_key(metric)]:.4f} ({rule['why']}); it "
              f"trains {why}")
    print(f"auto: {reason}")
    return configured(cfg, overrides), {
        "candidates": rows, "chosen": best["name"], "overrides": overrides, "epochs": run_epochs,
        "complete": best["complete"], "rule": rule, "reason": reason, "seconds": round(spent, 2),
        "budget_minutes": cfg.Transfer.auto_budget_minutes}, trials


# How `auto` picks its winner (recorded in auto.json and metrics.json's strategy.rule).
RULE = ("one-standard-error rule: among the candidates that can train their whole schedule in the budget left "
        "(or already did in their trial), those within one standard error of the best validation score are tied, "
        "and the one with the fewest seconds still to train wins (then the higher score, the lower loss, the "
        "earlier candidate)")


def standard_error(score, val_counts, metric):
    """One standard error of a validation `score` on a split of `val_counts`
    images per class, binomial, with the Agresti-Coull adjustment for one
    standard error (half a success added, n + 1 trials): the plain
    sqrt(p(1-p)/n) is 0 at a score of 1, which 24 validation images reach
    by chance (ants/bees). For top-1, p~ = (pn + 0.5) / (n + 1) and
    sqrt(p~(1-p~)/(n+1)); for balanced accuracy, the mean of K per-class
    recalls, each taken as binomial on its n_c images at the score:
    sqrt(sum over classes of p~c(1-p~c)/(n_c+1)) / K."""
    counts = [count for count in val_counts if count]
    if not counts:
        return 0.0

    def variance(n):
        adjusted = (score * n + 0.5) / (n + 1)
        return adjusted * (1 - adjusted) / (n + 1)

    if metric == "balanced_accuracy":
        return math.sqrt(sum(variance(count) for count in counts)) / len(counts)
    return math.sqrt(variance(sum(counts)))


def schedule_seconds(variant, epochs, head_epoch_seconds, epoch_seconds):
    """Seconds the `variant` config takes to train `epochs` epochs: LP-FT's
    probe epochs (probe_epochs of them) at `head_epoch_seconds`, the others
    at `epoch_seconds`."""
    lp_ft = variant.Transfer.strategy == "lp_ft"
    probe = min(epochs, probe_epochs(variant.Transfer, epochs)) if lp_ft else 0
    return probe * head_epoch_seconds + (epochs - probe) * epoch_seconds


def choose(cfg, measured, seconds_left, val_counts, metric):
    """(the winning row of `measured`, the rule's record). RULE: the
    seconds still to train a candidate are 0 where its trial completed its
    schedule, else its whole schedule at its trial's paces; one that does
    not fit in `seconds_left` cannot win (where none fits, the cheapest
    trains what fits). Why ties: the validation split is a sample, and a
    lead inside its noise is not evidence (issue 22: a 0.17-point lead on
    578 images, SE 1.1 points, bought an undertrained model 12 points worse)."""
    key = score_key(metric)
    for row in measured:
        row["seconds_to_train"] = 0.0 if row["complete"] else round(schedule_seconds(
            configured(cfg, row["overrides"]), cfg.Global.epochs, row["head_epoch_seconds"],
            row["epoch_seconds"]), 2)
        row["fits"] = row["seconds_to_train"] <= max(0.0, seconds_left)
    cheapest = min(row["seconds_to_train"] for row in measured)
    eligible = [row for row in measured if row["fits"]] or \
        [row for row in measured if row["seconds_to_train"] == cheapest]
    top = max(row[key] for row in eligible)
    se = standard_error(top, val_counts, metric)
    tied = [row for row in eligible if row[key] >= top - se]
    order = {id(row): i for i, row in enumerate(measured)}
    best = min(tied, key=lambda row: (row["seconds_to_train"], -row[key], row["val_loss"], order[id(row)]))
    left_out = [row["name"] for row in measured if not row["fits"]]
    why = (f"{len(tied)} within one standard error ({se:.4f}, {sum(val_counts)} validation images) of the best "
           f"{top:.4f}, {best['seconds_to_train']:.0f} s still to train"
           + (f"; {', '.join(left_out)} could not train their schedule in the {max(0, seconds_left):.0f} s left"
              if left_out else ""))
    return best, {"rule": RULE, "metric": metric, "standard_error": round(se, 6), "val_images": sum(val_counts),
                  "best_score": top, "tied": [row["name"] for row in tied], "why": why}


def score_key(metric):
    return "val_top1" if metric == "top1" else "val_balanced_accuracy"


def _named(metric):
    return "top-1" if metric == "top1" else "balanced accuracy"


def epochs_left(winner, seconds_left, head_epoch_seconds, epoch_seconds):
    """(how many of Global.epochs the `winner` config trains, and why): all
    that fit in the budget's `seconds_left`, at least one. LP-FT's probe
    takes probe_epochs of them (at `head_epoch_seconds` each), the rest
    fine-tune (at `epoch_seconds`)."""
    epochs = winner.Global.epochs
    lp_ft = winner.Transfer.strategy == "lp_ft"

    def seconds(n):
        return schedule_seconds(winner, n, head_epoch_seconds, epoch_seconds)

    paces = f"{_s(head_epoch_seconds)} a probe epoch, {_s(epoch_seconds)} a fine-tuning one" if lp_ft else \
        f"{_s(epoch_seconds)} an epoch"
    pace = f"about {paces}, {max(0, seconds_left):.0f} s of the budget left"
    fit = max([n for n in range(1, epochs + 1) if seconds(n) <= seconds_left], default=1)
    if fit == epochs:
        return epochs, f"Global.epochs={epochs} ({pace})"
    return fit, f"{fit} of Global.epochs={epochs}, all that fit ({pace})"


def _s(seconds):
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def restore(record, cfg):
    """The winner's config from a record: a resumed run trains what was
    chosen, for as many epochs, without measuring again. (A record written
    before the winner's epochs were paced has the winner's row alone.)"""
    if "overrides" not in record:
        record = next(row for row in record["candidates"] if row["name"] == record["chosen"])
    return configured(cfg, record["overrides"])


def chosen_plan(plan, record):
    """The plan of the winner, told as auto's choice."""
    return dataclasses.replace(plan, requested="auto", reason=record["reason"], candidates=record["candidates"],
                               rule=record.get("rule"))  # a record from before the rule has none
