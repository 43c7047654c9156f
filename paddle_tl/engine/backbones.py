"""`auto` that also picks the backbone: before its recipes, it measures
Arch.name against the backbones of Transfer.auto_backbones, each alone and
the best of them concatenated with Arch.name (models/concat.py), and the
recipes are then measured on the winner (engine/auto.py).

Measured the cheap way, and on the same footing for every candidate: one
pass of each frozen body over the training and validation images (cached
features, shared with the run after it), the logistic regression on them
solved to convergence (transfer/logistic.py, the probe transfer studies
rank backbones by, Kornblith et al., CVPR 2019), scored on the validation
split. A concatenation's features are its bodies' features side by side,
so it costs no pass of its own. The winner is chosen by auto's
one-standard-error rule: candidates within one standard error of the best
are tied, and the first of them in the order Arch.name, the others as
listed, the concatenation wins: a lead inside the split's noise does not
buy a second network or a larger one.

Training code (features, the probe's network) is train.py's; this module
decides what to measure, how it scored and what won.
"""

import importlib.util
import time
from dataclasses import dataclass

import numpy as np

from paddle_tl.engine.auto import score_key, standard_error
from paddle_tl.errors import ConfigError, WeightsError
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.concat import concatenation_name
from paddle_tl.models.zoo import get_spec, list_architectures
from paddle_tl.transfer.logistic import solve_head

# The backbones' passes get this share of Transfer.auto_budget_minutes of
# their own, on top of what the recipes and the run get (engine/auto.py
# counts its budget from after them): counted inside it, they starved the
# recipes on elpv binary (1,970 images: 114 s of backbones, then one recipe
# measured of four, the rest skipped for the budget).
BACKBONE_SHARE = 0.25

RULE = ("one-standard-error rule: the candidates within one standard error of the best validation score of a "
        "solved linear probe on their frozen features are tied, and the first of them wins (Arch.name, then the "
        "others as listed, then the concatenation)")


def backbone_names(cfg):
    """The architectures measured beside Arch.name (Transfer.auto_backbones),
    each refused at once where the zoo does not know it."""
    setting = cfg.Transfer.auto_backbones
    if setting == "none":
        return []
    names = installed_backbones() if setting == "installed" else list(setting)
    for name in names:
        try:
            get_spec(name)
        except ConfigError as exc:
            raise ConfigError(f"Transfer.auto_backbones: {exc}") from None
    return [name for name in names if name != cfg.Arch.name]


def installed_backbones():
    """Architectures whose ImageNet weights an installed package ships
    (`Arch.pretrained=imagenet` works offline for them)."""
    names = []
    for name in list_architectures():
        package = get_spec(name).imagenet_package
        if package and importlib.util.find_spec(package[len("pkg:"):].partition("/")[0]) is not None:
            names.append(name)
    return names


def why_not_measured(cfg, feature_head, teacher):
    """Why `auto` measures Arch.name's recipes alone, or None."""
    if not backbone_names(cfg):
        return "Transfer.auto_backbones=none" if cfg.Transfer.auto_backbones == "none" else None
    if not cfg.Transfer.cache_features:
        return "Transfer.cache_features=false (backbones are measured on cached features)"
    if cfg.Arch.kwargs:
        return "Arch.kwargs (the other backbones are built as their names say)"
    if not feature_head:
        return f"the head of {cfg.Arch.name} is not one Linear layer (a probe on its features cannot replace it)"
    if teacher:
        return "distillation (the teacher's logits belong to Arch.name's training views)"
    return None


@dataclass
class Features:
    """A backbone's frozen features of the training (plain view) and validation images."""
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray


def overrides(cfg, name, concatenated=False):
    """The config changes that make `name` the run's backbone: its ImageNet
    weights (Arch.pretrained stays the first body's for a concatenation),
    and a concatenation's training on the plain view alone, unless
    Transfer.cache_views was set: its probe is solved on that view, and an
    augmented one costs a pass of every body."""
    if name == cfg.Arch.name:
        return ()
    if concatenated:
        views = () if "Transfer.cache_views" in cfg.given else ("Transfer.cache_views=1",)
        return (f"Arch.name={name}", *views)
    return (f"Arch.name={name}", "Arch.pretrained=imagenet", "Arch.pretrained_sha256=null")


def too_costly(name, cfg, images, pace, spent, input_size):
    """Why the backbone `name` is not measured, or None: its pass over
    `images` would end past BACKBONE_SHARE of the budget, `spent` seconds
    of it gone on backbones. Its
    pace is estimated from `pace`, the seconds an image took in the pass
    of Arch.name (at `input_size`) that auto makes anyway, scaled by the
    pixels of its own input: a rough guess (EfficientNet-Lite2 at 260 px
    measured twice MobileNetV2's time, not 1.35 times), and measuring goes
    on where there is none."""
    if pace is None:
        return None
    estimate = pace * images * (get_spec(name).input_size / input_size) ** 2
    budget = cfg.Transfer.auto_budget_minutes * 60
    if spent + estimate <= BACKBONE_SHARE * budget:
        return None
    return (f"budget: its pass over {images} images would take about {estimate:.0f} s, past the "
            f"{BACKBONE_SHARE:.0%} of Transfer.auto_budget_minutes={cfg.Transfer.auto_budget_minutes:g} the "
            f"backbones get, with {spent:.0f} s spent")


def measure(cfg, features_of, class_names, class_weights, val_counts, metric="top1", skip=lambda name: None):
    """(the winning backbone's overrides, the rows for auto's record, the
    rule's record). `features_of(name)` returns a Features of that backbone
    (a single architecture); `skip(name)` says why one is not measured (or
    None). The concatenation of Arch.name with the best other backbone
    measured is measured on both side by side."""
    rows, features = [], {}
    for name in [cfg.Arch.name, *backbone_names(cfg)]:
        why_not = skip(name) if rows else None  # Arch.name's features are there already
        started = time.time()
        if not why_not:
            print(f"auto: measuring the backbone {name} (a solved linear probe on its frozen features)")
            try:
                features[name] = features_of(name)
            except WeightsError as exc:  # its weights package not installed, say: the others are still measured
                if not rows:
                    raise
                why_not = str(exc)
        if why_not:
            print(f"auto: backbone {name} not measured ({why_not})")
            rows.append({"name": f"backbone:{name}", "kind": "backbone", "arch": name,
                         "what": f"{name}'s frozen features, a solved linear probe", "skipped": why_not})
            continue
        rows.append(_probed(name, f"{name}'s frozen features, a solved linear probe", features[name], class_names,
                            class_weights, time.time() - started, overrides(cfg, name), metric))
    key = score_key(metric)
    others = [row for row in rows[1:] if key in row]
    if others:
        best_other = max(others, key=lambda row: row[key])["arch"]
        joined = concatenation_name([cfg.Arch.name, best_other])
        started = time.time()
        first, second = features[cfg.Arch.name], features[best_other]
        side_by_side = Features(np.concatenate([first.train, second.train], axis=1), first.train_labels,
                                np.concatenate([first.val, second.val], axis=1), first.val_labels)
        rows.append(_probed(joined, f"{cfg.Arch.name} and {best_other}'s features concatenated, a solved linear "
                            "probe", side_by_side, class_names, class_weights, time.time() - started,
                            overrides(cfg, joined, concatenated=True), metric))
    measured = [row for row in rows if key in row]
    top = max(row[key] for row in measured)
    se = standard_error(top, val_counts, metric)
    tied = [row for row in measured if row[key] >= top - se]
    best = tied[0]
    why = (f"{len(tied)} within one standard error ({se:.4f}, {sum(val_counts)} validation images) of the best "
           f"{top:.4f}: {', '.join(row['arch'] for row in tied)}")
    print(f"auto: the backbone {best['arch']} won ({why})")
    return list(best["overrides"]), rows, {"rule": RULE, "metric": metric, "standard_error": round(se, 6),
                                           "best_score": top, "tied": [row["name"] for row in tied],
                                           "winner": best["name"], "why": why}


def _probed(name, what, features, class_names, class_weights, seconds, changes, metric):
    """A candidate's row: its solved probe's validation scores, and the
    seconds its features and the solve took."""
    started = time.time()
    weight, bias, solved = solve_head(features.train, features.train_labels, features.val, features.val_labels,
                                      len(class_names), class_weights)
    scores = classification_metrics(features.val @ weight + bias, features.val_labels, class_names, topk=(1,))
    row = {"name": f"backbone:{name}", "kind": "backbone", "arch": name, "what": what,
           "overrides": list(changes), "val_top1": scores["top1"], "val_loss": scores["loss"],
           "features": int(features.train.shape[1]), "probe_strength": solved["strength"],
           "seconds": round(seconds + time.time() - started, 2)}
    if metric == "balanced_accuracy":
        row["val_balanced_accuracy"] = scores["balanced_accuracy"]
    shown = "" if metric == "top1" else f", balanced accuracy {row['val_balanced_accuracy']:.4f}"
    print(f"auto: backbone {name}: validation top-1 {row['val_top1']:.4f}{shown} ({row['features']} features), "
          f"{row['seconds']:.0f} s")
    return row
