"""How a run is fitted: one chooser decides what hapi's loop trains and
evaluates on, and says why; one builder per mode prepares it.

- images: the network on images (augmented every epoch), the plain way.
- cached_features: no stage of the body trains, so its features are computed
  once (transfer/feature_cache.py) and only the head trains, on them.
- cached_activations: the bottom stages never train, so their output is
  computed once and the top stages and the head train on it.
- domain_pairs: every batch holds labeled source and unlabeled target images,
  and the loss adds a domain term (transfer/domain.py).

With a teacher (Distill.teacher, transfer/distill.py), images and the
cached modes also carry the teacher's logits of every training image view
to the loss, as a label beside the class label.

Which settings may not combine at all is combinations.py's business; here
every mode runs, and a fallback (features not cached under data-parallel,
say) is a choice with its reason, not a refusal.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from paddle_tl.data.mixing import MIXED_LABEL_SPEC, MixedAccuracy, MixedLoss, mixing_collate
from paddle_tl.models.features import feature_head
from paddle_tl.models.split import activation_bytes, activation_shape, split, why_not_split
from paddle_tl.runtime import available_memory, import_paddle
from paddle_tl.transfer.distill import DistillationLoss, LabelAccuracy, WithTeacher, build_teacher, teacher_runner
from paddle_tl.transfer.domain import DomainSchedule, LabeledAccuracy, pair_collate, setup_domain_adaptation
from paddle_tl.transfer.feature_cache import (ACTIVATION_DTYPE, HeadOnly, ProbeFirst, TopOrHead, ViewSwitcher,
                                              cached_activations, cached_datasets)
from paddle_tl.transfer.logistic import refit_head, solve_head

paddle = import_paddle()

LABEL_SPEC = paddle.static.InputSpec([None, 1], "int64", "label")


@dataclass
class Fit:
    """What paddle.Model fits, on what, with which loss and metric."""
    mode: str  # images, cached_features, cached_activations or domain_pairs
    reason: str
    network: object  # the whole network, its head alone, or the domain-adaptation wrapper
    train_data: object
    eval_data: object
    input_spec: object  # of one input batch
    loss: object
    metric: object
    workers: tuple  # loader workers (train, eval)
    val_data: object = None  # the validation split that chooses the best epoch, or None
    val_network: object = None  # what scores it: the classification network (or its head, on cached features)
    # scorer(network): what scores eval_data and val_data for a network of
    # this architecture (best_model read back): the network itself, or its
    # part after the cached cut
    scorer: Callable = lambda network: network
    collate: Optional[Callable] = None  # how a training batch is put together (paddle's default when None)
    callbacks: list = field(default_factory=list)  # what the mode needs told every epoch or step
    extra_layers: dict = field(default_factory=dict)  # trained beside the network and checkpointed: name -> layer
    record: dict = field(default_factory=dict)  # what metrics.json says about it
    label_specs: list = field(default_factory=lambda: [LABEL_SPEC])  # of what a training batch holds after its input
    distill: Optional[dict] = None  # metrics.json's `distill`: the teacher and the loss's settings
    solved_start: Optional["SolvedStart"] = None  # a linear probe's solved head, the epoch the others must beat


def choose_fit_mode(cfg, plan, network, spec, processes, images):
    """(mode, reason). `images`: how many images (training, validation and
    Eval) a cache would hold."""
    transfer = cfg.Transfer
    if transfer.domain_adaptation != "none":
        return "domain_pairs", (f"Transfer.domain_adaptation={transfer.domain_adaptation}: every step trains on "
                                "labeled source and unlabeled target images")
    boundary = plan.always_frozen
    cut = "features" if boundary == plan.num_stages else "activations"
    if cut == "features":
        not_cached = _why_not_cached(cfg, boundary, processes) or _why_no_feature_head(network, spec)
    else:
        not_cached = why_not_cached_below(cfg, network, spec, boundary, processes, images)
    if not_cached:
        return "images", f"{cut} not cached: {not_cached}"
    if cut == "features":
        return "cached_features", ("no stage of the body trains: its features are computed once and the head "
                                   "trains on them")
    return "cached_activations", (f"the bottom {boundary} of {plan.num_stages} stages never train: their output "
                                  "is computed once and the top stages train on it")


def _why_no_feature_head(network, spec):
    if feature_head(network, spec) is None:
        return f"the head of {spec.name} is not a single Linear layer (or Arch.head mlp)"
    return None


def why_not_cached_below(cfg, network, spec, boundary, processes, images):
    """Why the activations below stage `boundary` of `images` (training,
    others) would not be cached for this config, or None."""
    return _why_not_cached(cfg, boundary, processes) or why_not_split(network, spec, boundary) or \
        _why_not_in_memory(cfg, network, spec, boundary, images)


def _why_not_cached(cfg, frozen, processes):
    """Why no cache at all, with `frozen` stages never training, or None."""
    augment = cfg.DataLoader.Train.augment
    if frozen == 0:
        return "every stage of the body trains"
    if not cfg.Transfer.cache_features:
        return "turned off (Transfer.cache_features=false)"
    if augment.mixup or augment.cutmix:
        return "mixup/CutMix (DataLoader.Train.augment) mix the images themselves"
    if processes > 1:
        return "data-parallel training"
    if cfg.Transfer.bn != "freeze":
        return "Transfer.bn=train keeps updating BatchNorm statistics"
    return None


# Cached activations may take at most this share of the memory available now:
# the rest is for the network, its gradients and the loaders.
MEMORY_SHARE = 0.5


def _why_not_in_memory(cfg, network, spec, boundary, images):
    shape = activation_shape(split(network, spec, boundary)[0], cfg.Arch.input_size or spec.input_size)
    train, plain = images
    needed = activation_bytes(shape, train * cfg.Transfer.cache_views + plain, 2)  # float16
    available = available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        return (f"{train} training images x {cfg.Transfer.cache_views} views + {plain} others at "
                f"{'x'.join(map(str, shape))} need {_size(needed)}, more than half the {_size(available)} "
                "available (lower Transfer.cache_views or Arch.input_size, or freeze more stages)")
    return None


def prepare_fit(cfg, run, net, data, state, plan, mode, reason, loss, metric):
    """The Fit of `mode` (from choose_fit_mode); with the run's teacher
    (distill.Teacher), the distillation loss on its logits and the labels."""
    if run.teacher is None:
        return _BUILDERS[mode](cfg, run, net, data, state, plan, reason, loss, metric)
    teacher, distill = run.teacher, cfg.Distill
    teacher_network = build_teacher(teacher, data.pre)
    fit = _DISTILLED[mode](cfg, run, net, data, state, plan, reason,
                           DistillationLoss(loss, distill.temperature, distill.alpha), LabelAccuracy(topk=metric.topk),
                           teacher_network)
    fit.distill = {"teacher": str(teacher.folder), "teacher_arch": teacher.record["arch"],
                   "teacher_top1": teacher.top1, "teacher_params": teacher_network.parameters,
                   "temperature": distill.temperature, "alpha": distill.alpha,
                   "teacher_logits": _TEACHER_LOGITS[mode]}
    print(f"distilling from {teacher.folder} ({teacher.record['arch']}, {teacher_network.parameters:,} parameters, "
          f"Eval top-1 {teacher.top1}): temperature {distill.temperature:g}, alpha {distill.alpha:g}; teacher "
          f"logits {_TEACHER_LOGITS[mode]}")
    return fit


def _image_spec(pre):
    return paddle.static.InputSpec([None, 3, pre.input_size, pre.input_size], "float32", "image")


def _images(cfg, run, net, data, state, plan, reason, loss, metric):
    loaders = cfg.DataLoader
    fit = Fit("images", reason, net.layer, data.train, data.eval, _image_spec(data.pre), loss, metric,
              workers=(loaders.Train.num_workers, loaders.Eval.num_workers), val_data=data.val, val_network=net.layer)
    augment = loaders.Train.augment
    if augment.mixup or augment.cutmix:  # combinations.py refuses it with a teacher and with domain adaptation
        fit.collate, fit.label_specs = mixing_collate(augment.mixup, augment.cutmix), [MIXED_LABEL_SPEC]
        fit.loss, fit.metric = MixedLoss(loss), MixedAccuracy(topk=metric.topk)
    return fit


def _distilled_images(cfg, run, net, data, state, plan, reason, loss, metric, teacher_network):
    fit = _images(cfg, run, net, data, state, plan, reason, loss, metric)
    fit.network = WithTeacher(net.layer, teacher_network)  # the teacher scores each step's augmented batch
    return fit


@contextlib.contextmanager
def _teacher(teacher_network, batch_size, device):
    """The teacher's runner (run(images) -> logits) for the cache, or None."""
    if teacher_network is None:
        yield None
    else:
        with teacher_runner(teacher_network, batch_size, device) as run:
            yield run


def _label_specs(data, teacher_network):
    """Of a training batch after its input: the teacher's logits (when
    distilling), then the class label."""
    return [LABEL_SPEC] if teacher_network is None else [
        paddle.static.InputSpec([None, data.num_classes], "float32", "teacher_logits"), LABEL_SPEC]


def _cached_features(cfg, run, net, data, state, plan, reason, loss, metric, teacher_network=None):
    network, spec = net.layer, net.spec  # the whole network, and its architecture's table entry
    views = cfg.Transfer.cache_views
    print(f"frozen body: computing its features once, then training the head on them "
          f"({views} view(s) per training image: the plain one + {views - 1} augmented)")
    with _teacher(teacher_network, cfg.DataLoader.Eval.batch_size, run.device) as teacher:
        train_data, plain, head, feature_size = cached_datasets(
            network, spec, data.pre.input_size, data.train, _plain_sets(data), data.eval_tf, data.train_tf, views,
            cfg.DataLoader.Eval, cfg.Global.seed, run.device, teacher)
    solved = _start_head(cfg, state, data, head.head, train_data, plain[1] if data.val is not None else None)
    fit = _on_cached("cached_features", reason, head, train_data, plain,
                     paddle.static.InputSpec([None, feature_size], "float32", "features"), loss, metric, state,
                     _label_specs(data, teacher_network), scorer=lambda network: HeadOnly(feature_head(network, spec)),
                     record={"cache_views": views, "head_init": solved and solved.record})
    fit.solved_start = solved
    return fit


@dataclass
class SolvedStart:
    """A linear probe's solved head (_start_head), booked before the first
    epoch as the run's epoch 0 (train.py book_solved_start): the epochs
    replace it only where the validation split scores one of them higher.
    The head holds `held_out` (fitted on the training split alone, so the
    validation split scores it as fairly as it scores an epoch), which the
    epochs start from; `refit` (the same strength refitted on training +
    validation images) is what ships when no epoch beats it."""
    head: object  # the network's Linear head
    held_out: tuple  # (weight, bias)
    refit: tuple  # (weight, bias)
    record: dict


def _start_head(cfg, state, data, head, features, val_features):
    """A fresh linear probe's Linear head, about to train on the cached
    `features` (FeatureViews), starts as the logistic regression on them
    solved to convergence (transfer/logistic.py), where `val_features` (a
    validation split) can choose its L2 strength; returns the SolvedStart
    (None where the head starts as built). Only where the body never
    trains: a solved head can be large (a weak penalty), and what it would
    do to stages unfrozen under it (LP-FT, gradual) is not measured; in a
    test, at learning rate 0.05, their gradients overflowed."""
    if cfg.Transfer.head_init != "logistic" or state.start_epoch or val_features is None or \
            not isinstance(head, paddle.nn.Linear):
        return None
    # The plain view alone, as transfer studies fit a probe: the augmented
    # views (Transfer.cache_views) are what the epochs train on, and in the
    # solve they scored lower (docs/strategies.md#the-linear-probe-against-the-textbook-one).
    train_x, train_y = features.views[0].astype("float32"), np.asarray(features.labels).reshape(-1)
    val_x, val_y = val_features.views[0].astype("float32"), np.asarray(val_features.labels).reshape(-1)
    classes = head.weight.shape[1]
    weight, bias, solved = solve_head(train_x, train_y, val_x, val_y, classes, data.class_weights)
    if data.eval is data.val:
        # auto's trial, whose Eval is the validation split (train.py _trial): a head refitted on it would
        # score itself there, against candidates that never saw it.
        refit, solved["refit_samples"] = (weight, bias), None
    else:
        refit = refit_head(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), solved["C"],
                           classes, data.class_weights)  # the same C: the penalty per sample
        solved["refit_samples"] = len(train_y) + len(val_y)
    head.weight.set_value(weight)
    head.bias.set_value(bias)
    print(f"head: starts as the logistic regression on the cached features ({solved['samples']} samples), L2 "
          f"strength {solved['strength']:g} (C {solved['C']:g}) chosen on the validation split "
          f"(top-1 {solved['val_top1']:.4f}), "
          f"refitted on training + validation ({solved['refit_samples'] or 'not: a trial'}); it stays the head "
          f"unless an epoch scores higher on the validation split, {solved['seconds']:.1f} s")
    return SolvedStart(head, (weight, bias), refit, solved)


def _size(count):
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _cached_activations(cfg, run, net, data, state, plan, reason, loss, metric, teacher_network=None):
    network, spec = net.layer, net.spec  # the whole network, and its architecture's table entry
    views, boundary = cfg.Transfer.cache_views, plan.always_frozen
    print(f"frozen bottom {boundary} stages: computing their output once, then training the top stages on it "
          f"({views} view(s) per training image: the plain one + {views - 1} augmented; stored as "
          f"{ACTIVATION_DTYPE})")
    with _teacher(teacher_network, cfg.DataLoader.Eval.batch_size, run.device) as teacher:
        train_data, plain = cached_activations(
            network, spec, boundary, data.pre.input_size, data.train, _plain_sets(data), data.eval_tf, data.train_tf,
            views, cfg.DataLoader.Eval, cfg.Global.seed, run.device, dtype=ACTIVATION_DTYPE, teacher=teacher)
    shape = list(train_data.views[0].shape[1:])
    top, scorer = split(network, spec, boundary)[1], lambda network: split(network, spec, boundary)[1]
    record = {"cache_views": views, "boundary": boundary, "shape": shape, "dtype": ACTIVATION_DTYPE,
              "probe_on_features": _probes_first(plan, network, spec, teacher_network)}
    if record["probe_on_features"]:
        print("the epochs that train the head alone train it on the features, computed once from these activations")
        features, plain_features, _, _ = cached_datasets(
            network, spec, data.pre.input_size, data.train, _plain_sets(data), data.eval_tf, data.train_tf, views,
            cfg.DataLoader.Eval, cfg.Global.seed, run.device)
        probing = lambda: state.frozen_stages == plan.num_stages  # noqa: E731
        train_data = ProbeFirst(train_data, features, probing)
        plain = [ProbeFirst(*outputs, probing) for outputs in zip(plain, plain_features)]
        top = TopOrHead(top, feature_head(network, spec))
        # what the splits hold when a run ends depends on whether it ended probing
        scorer = lambda network: TopOrHead(split(network, spec, boundary)[1], feature_head(network, spec))  # noqa
    return _on_cached("cached_activations", reason, top, train_data, plain,
                      paddle.static.InputSpec([None, *shape], "float32", "activations"), loss, metric, state,
                      _label_specs(data, teacher_network), scorer=scorer, record=record)


def _probes_first(plan, network, spec, teacher_network):
    """Whether the run's first epochs train the head alone on top of cached
    activations, and can do so on features computed from them: the features
    of a training view come from the shared caches (transfer/feature_cache.py)
    when the activations do, which a teacher's views do not (they are
    computed beside its logits)."""
    return plan.unfreezes and plan.frozen_stages_at(0) == plan.num_stages and teacher_network is None and \
        feature_head(network, spec) is not None


def _plain_sets(data):
    """The splits a cache holds in the evaluation view: Eval, and the
    validation split where there is one."""
    return {"eval": data.eval, **({"validation": data.val} if data.val is not None else {})}


def _on_cached(mode, reason, network, train_data, plain, input_spec, loss, metric, state, label_specs, scorer,
               record):
    """The Fit of a cached mode: `network` (the part after the cut) trains on
    the stored training views, one view an epoch, and scores the stored
    Eval (and validation) outputs `plain`."""
    eval_data, *val_data = plain
    return Fit(mode, reason, network, train_data, eval_data, input_spec, loss, metric,
               workers=(0, 0),  # in-memory arrays
               val_data=val_data[0] if val_data else None, val_network=network, scorer=scorer,
               callbacks=[ViewSwitcher(train_data, state)], record=record, label_specs=label_specs)


def _domain_pairs(cfg, run, net, data, state, plan, reason, loss, metric):
    transfer = cfg.Transfer
    domain = setup_domain_adaptation(transfer, net.layer, net.spec, data.train, data.target, loss, cfg.Global.seed)
    print(f"domain adaptation ({domain.method}, weight {transfer.domain_weight:g}): "
          f"{len(data.train)} labeled source and {len(data.target)} unlabeled target images; every step "
          f"takes {cfg.DataLoader.Train.batch_size} of each")
    return Fit("domain_pairs", reason, domain.network, domain.train_data, data.eval, _image_spec(data.pre), domain.loss,
               LabeledAccuracy(topk=metric.topk), collate=pair_collate,
               workers=(cfg.DataLoader.Train.num_workers, cfg.DataLoader.Eval.num_workers),
               val_data=data.val, val_network=net.layer, callbacks=[DomainSchedule(domain, state)],
               extra_layers=domain.extra_layers,
               record={"method": domain.method, "weight": transfer.domain_weight,
                       "target_images": len(data.target),
                       "target_skipped_files": [path for path, _ in data.target.skipped]})


_BUILDERS = {"images": _images, "cached_features": _cached_features, "cached_activations": _cached_activations,
             "domain_pairs": _domain_pairs}
# With a teacher (combinations.py refuses it with domain adaptation).
_DISTILLED = {"images": _distilled_images, "cached_features": _cached_features,
              "cached_activations": _cached_activations}
_TEACHER_LOGITS = {"images": "computed in every training step, on that step's augmented batch",
                   "cached_features": "computed once per cached view, with the features",
                   "cached_activations": "computed once per cached view, with the activations"}
