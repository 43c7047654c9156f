"""Fine-tuning: config -> model + data -> `paddle.Model.fit` -> run folder.

`train()` is the recipe; each step is a named part below it (or in the
module its idea lives in). Features join as parts: a fit mode (engine/fit.py),
a callback, a rule in combinations.py; not as branches in the recipe.
"""

import contextlib
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from paddle_tl.calibration import calibrate
from paddle_tl.combinations import Facts, check_combinations
from paddle_tl.data.check import duplicates_across_splits, duplicates_problem
from paddle_tl.data.datasets import (IMBALANCE_RATIO, build_dataset, build_target_dataset, imbalance_ratio,
                                     split_validation, subsample)
from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.data.transforms import Preprocess, eval_transform, train_transform
from paddle_tl.engine import auto, backbones
from paddle_tl.engine.callbacks import (BestWeights, Checkpointer, EpochClock, EpochRecorder, EvalSchedule, RunState,
                                        SamplerEpoch, StopAfter, ValidationScore, VisualDLLogger, choosing_key,
                                        metric_names)
from paddle_tl.engine.ema import WeightAverage
from paddle_tl.engine.fit import choose_fit_mode, prepare_fit, why_not_cached_below
from paddle_tl.engine.losses import build_loss, class_weights, selection_metric
from paddle_tl.engine.model import GuardedModel
from paddle_tl.engine.optim import build_optimizer
from paddle_tl.engine.parts import Network, Run, TrainingData
from paddle_tl.engine.report import write_report
from paddle_tl.errors import ConfigError, OutOfMemoryError
from paddle_tl.files import write_json
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.concat import body_names, load_pretrained_bodies
from paddle_tl.models.features import feature_head
from paddle_tl.models.heads import build_head
from paddle_tl.models.static import dynamic_runner
from paddle_tl.models.weights import load_pretrained
from paddle_tl.models.zoo import build_model, get_spec
from paddle_tl.runs import AUTO_RECORD, BEST_MODEL, CONFIG_FILE, LATEST, METRICS_FILE, VDL_DIR
from paddle_tl.runs.checkpoint import load_state, load_weights, resolve_resume, restore_optimizer, save_checkpoint
from paddle_tl.runs.run_folder import (check_output_dir, describe_model, opened_run_folder, rebuild_model,
                                       record_temperature, require_free_space)
from paddle_tl.runtime import import_paddle, rng_kept, seed_everything, select_device
from paddle_tl.transfer.distill import find_teacher
from paddle_tl.transfer.feature_cache import cached_activations, cached_datasets, share_features, shared_caches, unkept
from paddle_tl.transfer.freezing import GradualUnfreezer, add_l2sp, set_frozen_stages, trainable_parameters
from paddle_tl.transfer.plan import plan_transfer
from paddle_tl.transfer.similarity import measure_similarity

paddle = import_paddle()


def train(cfg):
    """Run a fine-tuning as configured; returns the metrics written to metrics.json."""
    run = start_run(cfg)  # device, processes, the settings checked against them, seeds
    data = load_data(cfg, run)  # datasets and classes; duplicate warning
    started = time.time()  # training time includes auto's measuring and computing cached outputs
    with open_run_folder(cfg, run):  # config.yaml; a refusal before the first epoch leaves the folder as it was
        with shared_caches():  # auto's candidates and the run share one pass of frozen layers over the images
            # auto measures backbones, then recipes, on the validation split (the data then is the winner's)
            cfg, data, chosen, kept = choose_auto(cfg, run, data)
            net = load_network(cfg, run, data)  # the architecture for these classes, with its pretrained weights
            plan = plan_strategy(cfg, run, net, data, chosen)  # which stages train when
            state = start_state(cfg, run, net, plan, data, kept)  # fresh, resumed, or auto's trial already done
            fit = choose_fit(cfg, run, net, plan, data, state)  # what the loop trains on, and why
        trainer = prepare_trainer(cfg, run, net, plan, fit, data, state)  # loaders, optimizer, paddle.Model
    if kept is not None and kept.installed:
        book_trial(cfg, run, net, fit, trainer, state)  # nothing to train: the trial's epochs are the run's
    else:
        fit_epochs(cfg, run, trainer, state)
    shipped = keep_best_measured(cfg, run, state, kept)  # auto never ships less than it measured
    train_seconds = time.time() - started
    logits = best_model_logits(cfg, run, net, fit, state, shipped)  # of what best_model now holds
    calibration = calibrate_best_model(cfg, run, fit, logits)  # a temperature for its probabilities
    return record_run(cfg, run, net, plan, data, fit, trainer, state, train_seconds, calibration, logits, shipped)


def start_run(cfg):
    """Device and processes, the settings checked against them (before any
    work), and the seeds. The run folder is checked, not yet touched."""
    g = cfg.Global
    device = select_device(g.device)
    processes, rank = paddle.distributed.get_world_size(), paddle.distributed.get_rank()
    check_combinations(Facts(cfg, device=device, processes=processes, stages=len(get_spec(cfg.Arch.name).stages)))
    if cfg.Transfer.strategy == "auto":
        backbones.backbone_names(cfg)  # an unknown one is refused before any work
    resume = resolve_resume(g.resume) if g.resume else None
    teacher = find_teacher(cfg.Distill)
    folder = check_output_dir(g.output_dir)
    seed_everything(g.seed)
    # Under `paddle.distributed.launch` every process trains on its shard;
    # rank 0 alone writes the run folder.
    return Run(device, processes, rank == 0, folder, resume, teacher)


@contextlib.contextmanager
def open_run_folder(cfg, run):
    """The run folder opened once the data has been read (a run already
    there moved aside), with config.yaml, the resolved config; a refusal
    inside, before the first epoch, leaves the output folder as it was
    (runs/run_folder.py opened_run_folder)."""
    if not run.is_main:
        yield
        return
    with opened_run_folder(run.folder, resuming=run.resume is not None):
        cfg.save(run.folder / CONFIG_FILE)
        yield


def load_data(cfg, run):
    """The Train, Eval (and Target) datasets with the architecture's
    transforms; the config resolved with the class count. Copies of
    training images among the evaluation images are warned about. Nothing
    is written yet: a refusal here leaves the output folder untouched."""
    loaders = cfg.DataLoader
    pre = Preprocess.from_spec(get_spec(cfg.Arch.name), cfg.Arch.input_size)
    train_tf, eval_tf = train_transform(pre, loaders.Train.augment), eval_transform(pre)
    train_set = all_train = build_dataset(loaders.Train.dataset, "train", train_tf)
    val_set = None
    if loaders.Train.val_fraction:
        train_set, val_set = split_validation(all_train, loaders.Train.val_fraction, cfg.Global.seed, eval_tf)
        if not len(val_set):
            print(f"DataLoader.Train.val_fraction={loaders.Train.val_fraction:g} holds out no image of classes "
                  "this small: the best epoch is chosen on the Eval split")
            val_set = None
    eval_set = build_dataset(loaders.Eval.dataset, "eval", eval_tf, class_names=train_set.class_names)
    adapting = cfg.Transfer.domain_adaptation != "none"
    target_set = build_target_dataset(loaders.Target.dataset, train_tf) if adapting else None
    class_names = train_set.class_names
    num_classes = cfg.Arch.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ConfigError(f"Arch.num_classes: {num_classes} is fewer than the {len(class_names)} "
                          "classes in the training data")
    cfg.Arch.num_classes = num_classes
    if run.teacher is not None:
        run.teacher.check_classes(class_names, num_classes)
    counts = train_set.class_counts()
    weights = class_weights(cfg.Loss, counts, num_classes)
    if weights:
        print(f"class imbalance {imbalance_ratio(counts):.1f}x: class-weighted loss "
              f"(Loss.class_weights={cfg.Loss.class_weights})")
    duplicates = []
    if run.is_main:
        duplicates = _warn_about_duplicates(all_train, eval_set)  # validation images are training images too
    return TrainingData(pre, train_tf, eval_tf, train_set, val_set, eval_set, target_set, class_names, num_classes,
                        weights, duplicates)


def load_network(cfg, run, data):
    """The network for the data's classes, with its pretrained weights (also
    when resuming: L2-SP and the similarity probe need them)."""
    spec = get_spec(cfg.Arch.name)
    layer = build_model(spec.name, data.num_classes, **cfg.Arch.kwargs)
    # The rules about the architecture's head (Arch.head's MLP takes the place
    # of a single Linear layer only), before any training work.
    check_combinations(Facts(cfg, device=run.device, processes=run.processes, stages=len(spec.stages),
                             feature_head=feature_head(layer, spec) is not None))
    layer = build_head(layer, spec, dataclasses.asdict(cfg.Arch.head))
    if run.is_main:
        require_free_space(run.folder, layer, master_weights=cfg.Global.amp_level == "O2")
    pretrained = cfg.Arch.pretrained is not False
    if pretrained and spec.source == "concat":
        for report in load_pretrained_bodies(layer, cfg.Arch.pretrained, cfg.Arch.pretrained_sha256):
            print(report.summary())
    elif pretrained:
        report = load_pretrained(layer, cfg.Arch.pretrained, spec.head, imagenet_url=spec.imagenet_url,
                                 imagenet_md5=spec.imagenet_md5, sha256=cfg.Arch.pretrained_sha256, arch=spec.name,
                                 imagenet_package=spec.imagenet_package, imagenet_sha256=spec.imagenet_sha256)
        print(report.summary())
    return Network(spec, layer, pretrained)


@dataclass
class Measured:
    """A candidate `auto` measured, as it could ship: its trial's best-epoch
    weights in its own network, scored on the validation and Eval splits."""
    name: str
    cfg: object  # its config (its head, its strategy): config.yaml when it ships
    layer: object  # the network holding its weights
    model: dict  # describe_model's record of that network
    score: float  # the validation score auto compared it on (its trial's)
    trial: auto.Trial
    logits: tuple  # (validation logits, labels, Eval logits, labels)


@dataclass
class Kept:
    """What `auto` keeps in memory of its measuring for the run."""
    winner: auto.Trial  # the winner's trial
    installed: bool  # the winner completed its schedule in its trial: the run is that trial, not trained again
    best: Measured  # the best measured candidate, shipped where the run ends below it on validation
    record: dict  # auto.json


def choose_auto(cfg, run, data):
    """(the config to train, its data, auto's record or None, Kept or
    None). `auto` with a budget measures its backbones
    (engine/backbones.py), then its recipes on the winning one
    (engine/auto.py), and returns the winner's config, with the data in its
    backbone's preprocessing; a resumed run reads what was chosen
    (RUN/auto.json)."""
    if cfg.Transfer.strategy != "auto":
        return cfg, data, None, None
    chosen = run.folder / AUTO_RECORD
    if run.resume is not None and chosen.is_file():
        record = json.loads(chosen.read_text())
        print(f"auto: resuming with {record['chosen']}, chosen before ({chosen})")
        winner = _resolved(run, auto.restore(record, cfg))
        return winner, _preprocessed_for(winner, data), record, None
    why_not = "resuming a run that measured nothing (no auto.json)" if run.resume is not None else \
        auto.why_not_measured(cfg, run.processes, data.val is not None, cfg.Arch.pretrained is not False)
    if why_not:
        print(f"auto: the four-quadrant rule alone decides ({why_not})")
        return cfg, data, None, None
    candidates = auto.candidates(cfg, len(get_spec(cfg.Arch.name).stages), data.train.class_counts())
    metric = selection_metric(data.class_weights)  # the run's weights, not a capped trial's
    started = time.time()
    with rng_kept():  # the run draws as it would have without the trials
        pace = _cache_below(cfg, run, data, min(candidate.cut for candidate in candidates))
        cfg, data, measured_backbones = _choose_backbone(cfg, run, data, metric, pace)
        if measured_backbones is not None:
            started += measured_backbones["seconds"]  # the backbones' share is their own (backbones.BACKBONE_SHARE)
            candidates = auto.candidates(cfg, len(get_spec(cfg.Arch.name).stages), data.train.class_counts())
            if measured_backbones["overrides"]:  # another backbone won: its own pass below the candidates' cuts
                _cache_below(cfg, run, data, min(candidate.cut for candidate in candidates))
        winner, record, trials = auto.measure(cfg, lambda variant, epochs: _trial(variant, run, data, epochs, metric),
                                              candidates, data.val.class_counts(), started, metric)
        best = _best_measured(record, metric)
        kept = Kept(trials[record["chosen"]], record["complete"],
                    _measured(auto.configured(cfg, best["overrides"]), run, data, best["name"],
                              best[auto.score_key(metric)], trials[best["name"]]), record)
        if measured_backbones is not None:
            _record_backbones(record, measured_backbones)
    if run.is_main:
        write_json(chosen, record)
    return _resolved(run, winner), data, record, kept


def _choose_backbone(cfg, run, data, metric, pace):
    """(the config with the winning backbone, its data, what was measured
    or None): engine/backbones.py measures Arch.name and the backbones of
    Transfer.auto_backbones on their cached features, those whose pass fits
    in the backbones' share of the budget (at `pace`, _cache_below's)."""
    spec = get_spec(cfg.Arch.name)
    has_feature_head = feature_head(build_model(spec.name, data.num_classes, **cfg.Arch.kwargs), spec) is not None
    why_not = backbones.why_not_measured(cfg, has_feature_head, run.teacher)
    if why_not or not backbones.backbone_names(cfg):
        if why_not:
            print(f"auto: the backbone is Arch.name's ({why_not})")
        return cfg, data, None
    datas, features, measuring = {}, {}, time.time()

    def features_of(name):
        variant = auto.configured(cfg, backbones.overrides(cfg, name))
        datas[name] = _preprocessed_for(variant, data)
        # Arch.name's stay out of the shared caches: its run computes them as it did before backbones were measured.
        with unkept() if name == cfg.Arch.name else contextlib.nullcontext():
            features[name] = _backbone_features(variant, run, datas[name])
        return features[name]

    def skip(name):
        return backbones.too_costly(name, cfg, len(data.train) + len(data.val), pace, time.time() - measuring,
                                    data.pre.input_size)

    changes, rows, rule = backbones.measure(cfg, features_of, data.class_names, data.class_weights,
                                            data.val.class_counts(), metric, skip)
    winner = auto.configured(cfg, changes)
    winner_data = datas.get(winner.Arch.name)
    if winner_data is None:  # the concatenation
        winner_data = _preprocessed_for(winner, data)
        _share_concatenated(winner, run, winner_data, datas, features)
    return winner, winner_data, {"overrides": changes, "rows": rows, "rule": rule,
                                 "seconds": round(time.time() - measuring, 2)}


def _backbone_features(variant, run, data):
    """The frozen features of `variant`'s backbone, of the plain view of the
    training images and of the validation split, through the shared caches
    (the run and auto's trials read them from there)."""
    net = load_network(variant, dataclasses.replace(run, is_main=False), data)
    train, (val,), _, _ = cached_datasets(net.layer, net.spec, data.pre.input_size, data.train,
                                          {"validation": data.val}, data.eval_tf, data.train_tf, 1,
                                          variant.DataLoader.Eval, variant.Global.seed, run.device)
    return backbones.Features(train.views[0], train.labels, val.views[0], val.labels)


def _share_concatenated(winner, run, data, datas, features):
    """A concatenation's features of the training (plain view) and
    validation images, as its bodies' side by side, into the shared caches
    as its own: where every body's native crop is the shared input's, they
    are what it computes (up to float rounding), and its trials and run need
    no pass of their own over those images. Elsewhere it computes them."""
    names = body_names(winner.Arch.name)
    if any(datas[name].pre.input_size != data.pre.input_size or
           datas[name].pre.resize_short != data.pre.resize_short for name in names):
        return
    net = load_network(winner, dataclasses.replace(run, is_main=False), data)
    bodies = [features[name] for name in names]
    share_features(net.layer, net.spec, [
        (data.train, data.eval_tf, 0, np.concatenate([body.train for body in bodies], axis=1)),
        (data.val, data.eval_tf, None, np.concatenate([body.val for body in bodies], axis=1))])


def _record_backbones(record, measured):
    """auto's record with the backbones measured before its recipes: their
    rows first among the candidates, the winner's changes first among the
    overrides (a resumed run restores both), the rule under `backbone`."""
    record["candidates"] = measured["rows"] + record["candidates"]
    record["overrides"] = measured["overrides"] + record["overrides"]
    record["backbone"] = dict(measured["rule"], seconds=measured["seconds"])
    record["reason"] = f"backbone {measured['rule']['winner'][len('backbone:'):]} ({measured['rule']['why']}); " \
        + record["reason"]


def _preprocessed_for(cfg, data):
    """The data in the preprocessing of cfg's architecture: the same
    objects where it is the data's already, else copies of the datasets
    with that architecture's transforms."""
    pre = Preprocess.from_spec(get_spec(cfg.Arch.name), cfg.Arch.input_size)
    if pre == data.pre:
        return data
    train_tf, eval_tf = train_transform(pre, cfg.DataLoader.Train.augment), eval_transform(pre)

    def viewed(dataset, transform):
        if dataset is None:
            return None
        view = copy.copy(dataset)
        view.transform = transform
        return view

    return dataclasses.replace(data, pre=pre, train_tf=train_tf, eval_tf=eval_tf, train=viewed(data.train, train_tf),
                               val=viewed(data.val, eval_tf), eval=viewed(data.eval, eval_tf),
                               target=viewed(data.target, train_tf))


def _best_measured(record, metric):
    """The measured candidate with the best validation score (a tie goes to
    the winner, then to the lower loss)."""
    key = auto.score_key(metric)
    rows = [row for row in record["candidates"] if "val_top1" in row and row.get("kind") != "backbone"]
    return min(rows, key=lambda row: (-row[key], row["name"] != record["chosen"], row["val_loss"]))


def _measured(variant, run, data, name, score, trial):
    """The candidate `name` (validation `score`) as it could ship: a network of its config with
    its trial's best weights, scored where the run would score it (on the
    cached outputs its own fit uses, from the shared caches)."""
    quiet = dataclasses.replace(run, is_main=False, resume=None)
    net = load_network(variant, quiet, data)
    plan = plan_strategy(variant, quiet, net, data)
    state = start_state(variant, quiet, net, plan, data)
    # Its weights replace the head a solve would start (a cost, no use here).
    fit = choose_fit(auto.configured(variant, ("Transfer.head_init=random",)), quiet, net, plan, data, state)
    net.layer.set_state_dict(trial.weights)
    # What the cached splits hold depends on whether the best epoch was probing (LP-FT).
    state.frozen_stages = next(r["frozen_stages"] for r in trial.history if r["epoch"] == trial.best_epoch)
    return Measured(name, variant, net.layer, state.model, score, trial, _logits(variant, fit, fit.scorer(net.layer)))


def _resolved(run, winner):
    """config.yaml is the resolved config: what trained (the winner's head
    among it), from which eval, export and the report rebuild the network."""
    if run.is_main:
        winner.save(run.folder / CONFIG_FILE)
    return winner


def _cache_below(cfg, run, data, boundary):
    """The activations of the bottom `boundary` stages, for every image view
    the candidates and the run will use, into the shared caches: one pass
    over the images, from which every candidate's cut (its own boundary or
    the features) is computed (transfer/feature_cache.py). Skipped, and each
    candidate caches for itself, where the run would not cache there (the
    fit chooser's own test), or with a teacher (whose training views are
    computed beside its logits, never shared). Returns the seconds the pass
    took an image (None where skipped): what a backbone's pass is paced by."""
    if run.teacher:
        return None
    net = load_network(cfg, dataclasses.replace(run, is_main=False), data)
    images = (len(data.train), len(data.eval) + len(data.val))
    if why_not_cached_below(cfg, net.layer, net.spec, boundary, run.processes, images):
        return None
    print(f"auto: computing the bottom {boundary} stages' output once for every candidate")
    started = time.time()
    cached_activations(net.layer, net.spec, boundary, data.pre.input_size, data.train,
                       {"eval": data.eval, "validation": data.val}, data.eval_tf, data.train_tf,
                       cfg.Transfer.cache_views, cfg.DataLoader.Eval, cfg.Global.seed, run.device)
    return (time.time() - started) / (images[0] * cfg.Transfer.cache_views + images[1])


def _trial(cfg, run, data, epochs, metric="top1"):
    """Train `cfg` for the first `epochs` of its Global.epochs (its schedule
    spans them all) without a run folder, on at most
    auto.TRIAL_IMAGES_PER_CLASS training images of each class, choosing and
    scoring on the validation split alone (it stands in for Eval, which a
    trial never sees), on `metric` (top1 or balanced_accuracy); an
    auto.Trial: validation scores of its best epoch and its weights then,
    and the seconds an epoch of the run would take at its pace."""
    seed_everything(cfg.Global.seed)
    trial = dataclasses.replace(run, is_main=False, resume=None)
    images = subsample(data.train, auto.TRIAL_IMAGES_PER_CLASS, cfg.Global.seed)
    # Capping every class changes the balance the loss's class weights answer.
    weights = class_weights(cfg.Loss, images.class_counts(), data.num_classes)
    # A linear probe's head starts as the solved logistic regression, its L2
    # strength chosen on the validation split (fit._start_head): its trial
    # keeps that split to choose on too, so that a trial that completes the
    # schedule is the run's recipe, shipped as is (auto.Trial.complete).
    solves = cfg.Transfer.strategy == "linear_probe" and cfg.Arch.head.type == "linear"
    trial_data = dataclasses.replace(data, train=images, eval=data.val, val=data.val if solves else None,
                                     duplicates=[], class_weights=weights)
    net = load_network(cfg, trial, trial_data)
    plan = plan_strategy(cfg, trial, net, trial_data)
    state = start_state(cfg, trial, net, plan, trial_data)
    state.selection_metric = metric
    fit = choose_fit(cfg, trial, net, plan, trial_data, state)
    trainer = prepare_trainer(cfg, trial, net, plan, fit, trial_data, state)
    clock, best_weights = EpochClock(), BestWeights(state, net.layer)
    if metric == "balanced_accuracy" and trial_data.val is None:  # hapi's metric has no recall per class
        trainer.callbacks.append(ValidationScore(state, fit.network, make_loader(
            fit.eval_data, cfg.DataLoader.Eval.batch_size, shuffle=False, num_workers=fit.workers[1]),
            trainer.eval_schedule.evaluates))
    trainer.callbacks += [best_weights, clock, StopAfter(epochs)]
    fit_epochs(cfg, trial, trainer, state)
    best = next(row for row in state.history if row["epoch"] == state.best_epoch)
    # An epoch of the run trains on every image and scores the validation and
    # Eval splits; the trial's trained on `images` and scored the validation
    # split (twice where it chose on it). Head-only epochs (LP-FT's probe) and
    # the others go at their own pace.
    paces, scored = defaultdict(list), len(data.val) * (2 if trial_data.val is not None else 1)
    for row, seconds in zip([row for row in state.history if row["epoch"]], clock.seconds):  # not epoch 0
        paces[row["frozen_stages"] == plan.num_stages].append(
            row["train_seconds"] * len(data.train) / len(images)
            + (seconds - row["train_seconds"]) * (len(data.val) + len(data.eval)) / scored)
    head, tuned = (statistics.mean(paces[kind] or paces[not kind]) for kind in (True, False))
    return auto.Trial(best["eval_top1"], best["eval_loss"], head, tuned, best.get("val_balanced_accuracy"),
                      complete=images is data.train and epochs == cfg.Global.epochs, weights=best_weights.weights,
                      history=[_as_validation(row) for row in state.history], best_epoch=state.best_epoch)


def _as_validation(row):
    """A trial's history row as the run's: what it calls eval is the validation split."""
    renamed = {key: value for key, value in row.items() if not key.startswith("eval_")}
    for key, value in row.items():
        if key.startswith("eval_"):
            renamed.setdefault("val_" + key[len("eval_"):], value)
    return renamed


def plan_strategy(cfg, run, net, data, auto_record=None):
    """Transfer.* as a plan; `auto` without measuring (auto_record None)
    first measures how well the frozen features separate the classes. L2-SP
    anchors the body at its pretrained weights now, before a resume loads
    others."""
    if auto_record is not None:
        plan = auto.chosen_plan(plan_transfer(cfg.Transfer, len(net.spec.stages), data.train.class_counts(),
                                              net.pretrained, epochs=cfg.Global.epochs), auto_record)
        return _anchored(plan, net)
    similarity = None
    if cfg.Transfer.strategy == "auto" and net.pretrained and feature_head(net.layer, net.spec) is not None:
        similarity = measure_similarity(net.layer, net.spec, data.train, data.eval_tf, data.pre.input_size,
                                        run.device, cfg.Global.seed, num_workers=cfg.DataLoader.Train.num_workers)
    plan = plan_transfer(cfg.Transfer, len(net.spec.stages), data.train.class_counts(), net.pretrained, similarity,
                         epochs=cfg.Global.epochs)
    return _anchored(plan, net)


def _anchored(plan, net):
    if plan.l2sp_alpha:
        net.l2sp = add_l2sp(net.layer, net.spec, plan.l2sp_alpha)
        print(f"L2-SP: {net.l2sp.anchored:,} body parameters pulled toward their pretrained values "
              f"(alpha {plan.l2sp_alpha:g})")
    return plan


def start_state(cfg, run, net, plan, data, kept=None):
    """The run's state: fresh, or a checkpoint's (its weights loaded; its
    optimizer state is restored once the optimizer exists), or, where
    `auto`'s winner completed its schedule in its trial (`kept`), that
    trial's: its best weights and its epochs, nothing left to train.
    Freezes the stages the plan has frozen at the starting epoch."""
    g = cfg.Global
    state = RunState(seed=g.seed, class_names=data.class_names, epochs=g.epochs,
                     selection_metric=selection_metric(data.class_weights))
    if run.resume is not None:
        state = _resumed_state(run.resume, net.layer, data.class_names, g.epochs)
    elif kept is not None and kept.installed:
        _install_trial(state, net.layer, kept.winner, g.epochs)
    # In every checkpoint, a resumed older one's too: what eval and export rebuild.
    state.model = describe_model(net.spec, data.num_classes, cfg.Arch.kwargs, dataclasses.asdict(cfg.Arch.head),
                                 data.pre, data.class_names)
    state.frozen_stages = plan.frozen_stages_at(state.start_epoch)
    counts = net.counts = set_frozen_stages(net.layer, net.spec, state.frozen_stages, plan.bn,
                                            bitfit=plan.strategy == "bitfit")
    print(f"strategy: {plan.strategy} ({plan.reason}); {state.frozen_stages}/{plan.num_stages} stages "
          f"frozen; {counts['trainable_params']:,} trainable parameters")
    return state


def _install_trial(state, network, trial, epochs):
    """The state of a run that is `trial` (auto.Trial.complete): its best
    weights in `network`, its epochs booked, none left (as a resumed
    finished run's)."""
    network.set_state_dict(trial.weights)
    state.history = [dict(row) for row in trial.history]
    best = next(row for row in state.history if row["epoch"] == trial.best_epoch)
    key = choosing_key(best, state.selection_metric)
    state.best_epoch, state.best_top1, state.best_loss = trial.best_epoch, best[key], best["val_loss"]
    state.epochs_done, state.start_epoch = state.history[-1]["epoch"], epochs
    print(f"auto: the winner's trial trained all {epochs} epochs of its schedule on every "
          f"training image: its best epoch ({trial.best_epoch}) is the run's, not trained again")


def choose_fit(cfg, run, net, plan, data, state):
    """The loss and metric, and the fit mode that trains with them."""
    topk = sorted({k for k in cfg.Metric.topk if k <= data.num_classes} | {1})
    plain_images = len(data.eval) + (len(data.val) if data.val is not None else 0)
    mode, reason = choose_fit_mode(cfg, plan, net.layer, net.spec, run.processes, (len(data.train), plain_images))
    if mode == "images" and plan.always_frozen:
        print(reason)  # frozen stages whose output could not be cached
    return prepare_fit(cfg, run, net, data, state, plan, mode, reason, build_loss(cfg.Loss, data.class_weights),
                       paddle.metric.Accuracy(topk=topk))


@dataclass
class Trainer:
    model: GuardedModel
    optimizer: object
    train_loader: object
    eval_loader: object
    callbacks: list
    eval_schedule: EvalSchedule
    book_start: Optional[Callable] = None  # books a linear probe's solved head as epoch 0 (book_solved_start)


def prepare_trainer(cfg, run, net, plan, fit, data, state):
    """Loaders, the optimizer (its state restored on resume), the
    paddle.Model that fits `fit`, and the callbacks."""
    g, loaders = cfg.Global, cfg.DataLoader
    batch_size = loaders.Train.batch_size
    balanced_labels = [label for _, label in data.train.samples] if loaders.Train.sampler == "balanced" else None
    per_process = -(-len(fit.train_data) // run.processes)  # both distributed samplers give every process ceil(n/N)
    train_loader = make_loader(fit.train_data, batch_size, shuffle=True, num_workers=fit.workers[0],
                               balanced_labels=balanced_labels,
                               drop_last=per_process % batch_size == 1,  # no BatchNorm on 1 image
                               distributed=run.processes > 1, collate_fn=fit.collate)
    eval_loader = make_loader(fit.eval_data, loaders.Eval.batch_size, shuffle=False, num_workers=fit.workers[1],
                              distributed=run.processes > 1)

    # A resumed run continues its schedule where it stopped; when Global.epochs
    # changed, that schedule no longer fits, so a new one spans the epochs left.
    same_schedule = state.epochs == g.epochs
    schedule_epochs = g.epochs if same_schedule else g.epochs - state.start_epoch
    parameters = trainable_parameters(net.layer, net.spec, plan) + [
        p for layer in fit.extra_layers.values() for p in layer.parameters()]
    optimizer = build_optimizer(_scaled_for(cfg.Optimizer, run.processes, batch_size), parameters,
                                len(train_loader), schedule_epochs)
    if run.resume is not None:
        for name, layer in fit.extra_layers.items():
            load_weights(layer, f"{run.resume}.{name}")
        restore_optimizer(net.layer, optimizer, f"{run.resume}.pdopt", with_schedule=same_schedule,
                          extra_layers=fit.extra_layers)
        if not same_schedule:
            print(f"Global.epochs changed from {state.epochs} to {g.epochs}: the learning-rate schedule "
                  f"restarts over the {schedule_epochs} epochs left")
            state.epochs = g.epochs

    network = fit.network
    if g.to_static:
        # The network is traced into a static graph at its first step, with
        # the stages frozen now and BatchNorm as set now (combinations.py
        # refuses what would change them later). The converted layer is the
        # same object with the same parameters, so checkpoints, `net` and
        # export are unaffected.
        network = paddle.jit.to_static(network, input_spec=[fit.input_spec], full_graph=True)
    model = GuardedModel(network, inputs=[fit.input_spec], labels=fit.label_specs)
    model.prepare(optimizer, fit.loss, fit.metric, amp_configs=g.amp_level)
    if net.l2sp is not None:  # under AMP the gradients its hook sees are multiplied by the loss scale
        net.l2sp.loss_scale = model.loss_scale

    names = metric_names(fit.metric.topk)
    eval_schedule = EvalSchedule(g.eval_interval, state, g.epochs)
    # First: the average is in the network before anything scores an epoch.
    average = WeightAverage(net.layer, g.ema_decay, eval_schedule.evaluates, run.resume) if g.ema_decay else None
    callbacks = [average] if average else []
    callbacks += [EpochRecorder(state, names, eval_schedule.evaluates, g.early_stopping_patience,
                                nan_policy=g.nan_policy, steps_per_epoch=len(train_loader))]
    if fit.val_data is not None:
        val_loader = make_loader(fit.val_data, loaders.Eval.batch_size, shuffle=False, num_workers=fit.workers[1])
        callbacks.append(ValidationScore(state, fit.val_network, val_loader, eval_schedule.evaluates))
    if run.is_main:  # after the recorder: they act on the epoch it books
        callbacks += [VisualDLLogger(run.folder / VDL_DIR, state, names, g.log_interval, len(train_loader)),
                      Checkpointer(run.folder, net.layer, optimizer, state, fit.extra_layers, average)]
    if plan.unfreezes:
        callbacks.append(GradualUnfreezer(net.layer, net.spec, plan, state, net.counts))
    callbacks += fit.callbacks
    if run.processes > 1 or balanced_labels is not None:
        callbacks.append(SamplerEpoch(train_loader.batch_sampler, state))
    trainer = Trainer(model, optimizer, train_loader, eval_loader, callbacks, eval_schedule)
    if fit.solved_start is not None:
        trainer.book_start = lambda: book_solved_start(cfg, fit, trainer, state)
    return trainer


def book_solved_start(cfg, fit, trainer, state):
    """A linear probe's solved head (fit.SolvedStart) as the run's epoch 0,
    the best so far: its validation scores are the held-out fit's (the
    split was not fitted on), its Eval scores and best_model the refit's.
    An epoch then replaces it only as any epoch replaces a better one
    (higher on the validation split, or equal at a lower loss), so training
    epochs never move a probe off its optimum unless the split says they
    help. The epochs start from the held-out fit, so that what the split
    scores of them is fair against it."""
    solved = fit.solved_start
    head = solved.head
    val_logits, val_labels, _, _ = _logits(cfg, fit, fit.val_network)  # the held-out fit, in the head now
    val = classification_metrics(val_logits, val_labels, state.class_names, topk=(1,))
    head.weight.set_value(solved.refit[0])
    head.bias.set_value(solved.refit[1])
    *_, eval_logits, eval_labels = _logits(cfg, fit, fit.val_network)
    scores = classification_metrics(eval_logits, eval_labels, state.class_names, topk=fit.metric.topk)
    row = {"epoch": 0, "frozen_stages": state.frozen_stages, "train_seconds": solved.record["seconds"],
           "val_loss": val["loss"], "val_top1": val["top1"], "eval_loss": scores["loss"],
           **{f"eval_{name}": scores[name] for name in metric_names(fit.metric.topk).values()}}
    if state.selection_metric == "balanced_accuracy":  # a column only where it chooses, as ValidationScore's
        row["val_balanced_accuracy"] = val["balanced_accuracy"]
    key = choosing_key(row, state.selection_metric)
    state.history.append(row)
    state.best_top1, state.best_epoch, state.best_loss = row[key], 0, row["val_loss"]
    for callback in trainer.callbacks:  # what AfterEpoch callbacks do with an improved epoch
        if isinstance(callback, Checkpointer):
            callback.save_best()  # best_model; `latest` is the first epoch's, which resumes
        elif isinstance(callback, (BestWeights, VisualDLLogger)):
            callback.on_recorded(row, improved=True)
    head.weight.set_value(solved.held_out[0])
    head.bias.set_value(solved.held_out[1])
    print(f"epoch 0 (the solved head): validation top-1 {row['val_top1']:.4f}, Eval top-1 {row['eval_top1']:.4f}")


def _scaled_for(optimizer_cfg, processes, batch_size):
    """Linear scaling rule: N processes of batch B make a global batch of
    N*B, which takes N times the learning rate a batch of B was tuned for."""
    if processes == 1:
        return optimizer_cfg
    scaled = optimizer_cfg.lr.learning_rate * processes
    print(f"data-parallel on {processes} processes: global batch {processes} x {batch_size}; learning rate "
          f"scaled {processes}x to {scaled:g} (linear scaling rule)")
    return dataclasses.replace(optimizer_cfg, lr=dataclasses.replace(optimizer_cfg.lr, learning_rate=scaled))


def fit_epochs(cfg, run, trainer, state):
    """hapi's fit over the epochs left; running out of memory becomes advice."""
    g = cfg.Global
    if trainer.book_start is not None and not state.start_epoch:
        trainer.book_start()
    try:
        trainer.model.fit(trainer.train_loader, trainer.eval_loader, epochs=g.epochs - state.start_epoch,
                          eval_freq=trainer.eval_schedule, log_freq=g.log_interval,
                          verbose=1 if sys.stdout.isatty() else 2,  # a bar on a terminal
                          callbacks=trainer.callbacks)
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        gpu = run.device == "gpu"
        amp_hint = {None: ", turn on Global.amp (O1, or O2)", "O1": ", try Global.amp=O2"}.get(g.amp_level, "")
        raise OutOfMemoryError(
            f"out of {'GPU ' if gpu else ''}memory at epoch {state.epochs_done + 1}: lower "
            f"DataLoader.Train.batch_size (now {cfg.DataLoader.Train.batch_size}){amp_hint if gpu else ''}"
            f", or lower Arch.input_size; resume with -o Global.resume={run.folder}") from exc


def book_trial(cfg, run, net, fit, trainer, state):
    """For a run that is auto's completed trial (start_state installed it):
    its best epoch's Eval scores, best_model and latest (rank 0), and its
    epochs in VisualDL, as training would have written them."""
    best = next(row for row in state.history if row["epoch"] == state.best_epoch)
    *_, eval_logits, eval_labels = _logits(cfg, fit, fit.scorer(net.layer))
    scores = classification_metrics(eval_logits, eval_labels, state.class_names, topk=fit.metric.topk)
    best.update({f"eval_{name}": scores[name] for name in metric_names(fit.metric.topk).values()},
                eval_loss=scores["loss"])
    if not run.is_main:
        return
    save_checkpoint(run.folder / BEST_MODEL, net.layer, state=state.to_dict())
    # With the (unstepped) optimizer: resuming with more Global.epochs restores it as any run's.
    save_checkpoint(run.folder / LATEST, net.layer, trainer.optimizer, state.to_dict())
    logger = next(callback for callback in trainer.callbacks if isinstance(callback, VisualDLLogger))
    for row in state.history:
        logger.on_recorded(row, improved=row is best)
    logger.on_train_end()


def keep_best_measured(cfg, run, state, kept):
    """auto never ships less than it measured: where the run's best epoch
    scores below the best candidate auto measured, on the validation score
    both were chosen on, that candidate's trial weights become best_model
    (with their network's record) and config.yaml its config. Returns the
    Measured shipped, or None."""
    if kept is None or state.best_top1 >= kept.best.score:
        return None
    best = kept.best
    why = (f"the run's best epoch scored {state.best_top1:.4f} on the validation split, below the "
           f"{best.score:.4f} {best.name} reached in its trial: its trial's weights ship instead")
    print(f"auto: {why}")
    if run.is_main:
        shipped = RunState(seed=cfg.Global.seed, class_names=state.class_names, epochs=best.cfg.Global.epochs,
                           best_top1=best.score, best_epoch=best.trial.best_epoch, model=best.model,
                           selection_metric=state.selection_metric, history=best.trial.history)
        save_checkpoint(run.folder / BEST_MODEL, best.layer, state=shipped.to_dict())
        _resolved(run, best.cfg)
        kept.record["shipped"] = {"name": best.name, "why": why}
        write_json(run.folder / AUTO_RECORD, kept.record)
    return best


def best_model_logits(cfg, run, net, fit, state, shipped=None):
    """(validation logits, labels, Eval logits, labels) of best_model (the
    validation pair None without a split): a `shipped` candidate's, scored
    when auto measured it, else best_model read back from disk, as eval and
    export load it: the training network holds the last epoch's weights
    (float16 ones under Global.amp=O2), and a resumed run's best epoch may
    predate this process. Costs one pass over the validation and Eval splits
    (on cached features, of the head alone). Rank 0 only (else None)."""
    if not run.is_main:
        return None
    if shipped is not None:
        return shipped.logits
    network = rebuild_model(state.model, run.folder / BEST_MODEL)[0]
    # On cached features (activations) the splits are what the head (the top) alone scores.
    return _logits(cfg, fit, fit.scorer(network))


def _logits(cfg, fit, scorer):
    """(validation logits, labels, Eval logits, labels) of `scorer` on the
    fit's splits (the validation pair None without one)."""
    def logits_of(dataset):
        loader = make_loader(dataset, cfg.DataLoader.Eval.batch_size, shuffle=False, num_workers=fit.workers[1])
        return map_batches(dynamic_runner(scorer), loader)

    return (*(logits_of(fit.val_data) if fit.val_data is not None else (None, None)), *logits_of(fit.eval_data))


def calibrate_best_model(cfg, run, fit, logits):
    """Temperature scaling of best_model (calibration.py), from its
    `logits` (best_model_logits): T is fitted on the validation split's
    logits, never on Eval (T = 1, and the reason, without one), then written
    into best_model's model record, from which export puts it into
    inference.yml. Returns metrics.json's `calibration`. Rank 0 only."""
    if not run.is_main:
        return None
    fraction = cfg.DataLoader.Train.val_fraction
    no_val = None if fit.val_data is not None else (
        f"no validation split (DataLoader.Train.val_fraction={fraction:g}"
        f"{' held out no image' if fraction else ''}): a temperature is fitted on held-out training images "
        "only, never on Eval; T = 1")
    calibration = calibrate(*logits, no_val_reason=no_val)
    record_temperature(run.folder / BEST_MODEL, calibration["temperature"])
    if calibration["fitted"]:
        print(f"calibration: temperature {calibration['temperature']:.3f} fitted on {calibration['val_images']} "
              f"validation images; ECE there {calibration['val_ece_before']:.4f} -> "
              f"{calibration['val_ece_after']:.4f}, on Eval {calibration['eval_ece_before']:.4f} -> "
              f"{calibration['eval_ece_after']:.4f}")
    else:
        print(f"calibration: {calibration['reason']}")
    return calibration


def record_run(cfg, run, net, plan, data, fit, trainer, state, train_seconds, calibration=None, logits=None,
               shipped=None):
    """metrics.json and the report (rank 0); returns the metrics. `logits`:
    best_model's (best_model_logits); `shipped`: the candidate auto shipped
    in place of the run's best epoch (keep_best_measured), or None."""
    g, loaders = cfg.Global, cfg.DataLoader
    # The last epoch is always evaluated (EvalSchedule); not where the run is auto's
    # completed trial whose last epoch was not its best (only the best's weights are kept).
    final_top1 = state.history[-1].get("eval_top1")
    best = next(row for row in state.history if row["epoch"] == state.best_epoch)
    chosen_on = "validation" if "val_top1" in best else "eval"
    scores = None if logits is None else classification_metrics(logits[2], logits[3], data.class_names, topk=(1,))
    best_top1, val_top1, best_epoch = best["eval_top1"], best.get("val_top1"), state.best_epoch
    if shipped is not None:  # its trial's best epoch, scored when auto measured it
        best_top1, best_epoch = scores["top1"], shipped.trial.best_epoch
        val_top1 = classification_metrics(logits[0], logits[1], data.class_names, topk=(1,))["top1"]
    metrics = {
        # best_top1: the Eval top-1 of the epoch chosen (best_model), on the
        # validation split unless there is none.
        "best_top1": best_top1, "best_epoch": best_epoch, "final_top1": final_top1,
        "val_top1": val_top1,
        "selection": {"split": chosen_on, "val_images": len(data.val) if data.val is not None else 0,
                      "val_fraction": loaders.Train.val_fraction},
        # What chose the best epoch (and auto's candidates): top1, or balanced_accuracy with a weighted loss.
        "selection_metric": state.selection_metric if chosen_on == "validation" else "top1",
        # best_model's on Eval: the mean recall over the classes, which a majority class cannot carry.
        "balanced_accuracy": scores and scores["balanced_accuracy"],
        "epochs_run": state.epochs_done, "train_seconds": round(train_seconds, 2),
        "num_classes": data.num_classes, "class_names": data.class_names,
        "train_images": len(data.train), "eval_images": len(data.eval),
        "skipped_files": [path for path, _ in data.train.skipped + data.eval.skipped],
        "imbalance_ratio": round(imbalance_ratio(data.train.class_counts()), 3),
        "class_weights": data.class_weights, "sampler": loaders.Train.sampler,
        "domain_adaptation": fit.record if fit.mode == "domain_pairs" else None,
        "distill": fit.distill,
        "nan_policy": g.nan_policy, "skipped_batches": sum(row.get("skipped_batches", 0) for row in state.history),
        "data_warnings": {"duplicates_across_splits": {"count": len(data.duplicates),
                                                       "pairs": data.duplicates[:DUPLICATES_RECORDED]}},
        "calibration": calibration,
        # What scored the epochs (best_top1, final_top1, history): single views of the
        # weights, averaged (best_model holds the average) when ema_decay is on.
        "ema_decay": g.ema_decay or None,
        "tta": {"epoch_evaluation": "none", "eval_export_infer": loaders.Eval.tta},
        "strategy": dict(plan.to_dict(), cached_features=fit.mode == "cached_features",
                         cached_activations={key: fit.record[key] for key in
                                             ("boundary", "shape", "dtype", "probe_on_features")}
                         if fit.mode == "cached_activations" else None,
                         cache_views=fit.record.get("cache_views", 0), head_init=fit.record.get("head_init")),
        **net.counts,
        "device": run.device, "amp": g.amp_level, "to_static": g.to_static,
        "num_workers": {"train": trainer.train_loader.num_workers, "eval": trainer.eval_loader.num_workers},
        "history": state.history,
        "processes": run.processes,
    }
    if plan.rule is not None:  # auto measured: what ships, and why
        metrics["strategy"]["shipped"] = {"name": shipped.name, "source": "trial", "why": (
            f"the run's best epoch scored below the {shipped.score:.4f} it reached on validation in its trial")} \
            if shipped is not None else {"name": plan.rule.get("winner"), "source": "trial" if plan.rule["complete"]
                                         else "run", "why": "its trial completed its schedule" if
                                         plan.rule["complete"] else "the run's best epoch scored at least as well "
                                         "on validation as every candidate measured"}
    if not run.is_main:
        return metrics
    write_json(run.folder / METRICS_FILE, metrics)
    print(f"report: {write_report(run.folder)}")
    if shipped is not None:
        chosen = f"{shipped.name}'s trial, validation top-1 {val_top1:.4f}"
    elif chosen_on == "validation":
        chosen = f"chosen on validation {state.selection_metric.replace('top1', 'top-1').replace('_', ' ')} " \
                 f"{state.best_top1:.4f}"
    else:
        chosen = "chosen on the Eval split itself"
    final = "" if final_top1 is None else f", final {final_top1:.4f}"
    print(f"done: eval top-1 {best_top1:.4f} at epoch {best_epoch} ({chosen}){final}, {train_seconds:.0f} s of "
          f"training; run folder {run.folder}")
    ratio = metrics["imbalance_ratio"]
    if ratio > IMBALANCE_RATIO and scores is not None:
        print(f"class imbalance {ratio:.1f}x: Eval balanced accuracy {scores['balanced_accuracy']:.4f} (top-1 "
              + (f"{best_top1:.4f}); the loss is class-weighted (Loss.class_weights={cfg.Loss.class_weights}), "
                 "epochs chosen on balanced accuracy" if data.class_weights else
                 f"{best_top1:.4f}); the loss is unweighted: Loss.class_weights=auto weights it by inverse class "
                 "frequency and chooses epochs on balanced accuracy"))
    return metrics


# metrics.json keeps this many duplicate pairs (check-data lists them all).
DUPLICATES_RECORDED = 100
DUPLICATES_PRINTED = 3


def _warn_about_duplicates(train_set, eval_set):
    """Warn, without refusing, when evaluation images are copies of training images."""
    duplicates = duplicates_across_splits(train_set, eval_set)
    if duplicates:
        examples = "; ".join(f"{pair['eval']} = {pair['train']}" for pair in duplicates[:DUPLICATES_PRINTED])
        more = f"; and {len(duplicates) - DUPLICATES_PRINTED} more" if len(duplicates) > DUPLICATES_PRINTED else ""
        print(f"warning: {duplicates_problem(duplicates)}: {examples}{more} "
              "(`paddle-tl check-data` lists them all)")
    return duplicates


def _out_of_memory(exc):
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "resourceexhausted" in text


def _resumed_state(prefix, network, class_names, epochs):
    """Weights and run state of a checkpoint."""
    record = load_state(prefix)
    if record["class_names"] != class_names:
        raise ConfigError(f"Global.resume: {prefix} was trained on classes {record['class_names']}, "
                          f"the data now has {class_names}")
    load_weights(network, prefix)
    record.pop("files")
    state = RunState(**record)
    state.start_epoch = state.epochs_done
    if state.start_epoch >= epochs:
        raise ConfigError(f"Global.resume: the run already finished {state.start_epoch} of "
                          f"{epochs} epochs; raise Global.epochs to train further")
    print(f"resuming {prefix} after epoch {state.epochs_done}")
    return state
