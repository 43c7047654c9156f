"""Fine-tuning: config -> model + data -> `paddle.Model.fit` -> run folder."""

import dataclasses
import sys
import time
from pathlib import Path

from paddle_tl.data.check import duplicates_across_splits, duplicates_problem
from paddle_tl.data.datasets import build_dataset, build_target_dataset, imbalance_ratio
from paddle_tl.data.loaders import make_loader
from paddle_tl.data.transforms import Preprocess, eval_transform, train_transform
from paddle_tl.engine.callbacks import (Checkpointer, EpochRecorder, EvalSchedule, RunState, SamplerEpoch,
                                        VisualDLLogger, metric_names)
from paddle_tl.engine.checkpoint import load_state, load_weights, resolve_resume, restore_optimizer
from paddle_tl.engine.losses import build_loss, class_weights
from paddle_tl.engine.model import GuardedModel
from paddle_tl.engine.optim import build_optimizer
from paddle_tl.engine.report import write_report
from paddle_tl.engine.run_folder import describe_model, prepare_output_dir, require_free_space
from paddle_tl.errors import ConfigError, OutOfMemoryError
from paddle_tl.files import write_json
from paddle_tl.models.features import head_linear
from paddle_tl.models.weights import load_pretrained
from paddle_tl.models.zoo import build_model, get_spec
from paddle_tl.runtime import import_paddle, seed_everything, select_device
from paddle_tl.transfer.domain import DomainSchedule, LabeledAccuracy, pair_collate, setup_domain_adaptation
from paddle_tl.transfer.feature_cache import ViewSwitcher, cached_datasets, why_not_cached
from paddle_tl.transfer.freezing import GradualUnfreezer, add_l2sp, set_frozen_stages, trainable_parameters
from paddle_tl.transfer.plan import plan_transfer
from paddle_tl.transfer.similarity import measure_similarity

paddle = import_paddle()


def train(cfg):
    """Run a fine-tuning as configured; returns the metrics written to metrics.json."""
    g, loaders = cfg.Global, cfg.DataLoader
    device = select_device(g.device)
    # hapi's O1 runs white-listed ops (conv, matmul) in float16 under a dynamic
    # loss scale; O2 also casts the weights to float16 when the model is
    # prepared, keeping float32 master copies in the optimizer (multi_precision)
    # and BatchNorm in float32. What paddle_tl does around it for O2:
    # checkpoints are saved as float32 (checkpoint.float32_state), evaluation
    # runs under auto_cast (GuardedModel.eval_batch), and L2-SP's pull is
    # scaled like the loss (transfer.add_l2sp).
    amp = g.amp_level
    if amp and device != "gpu":
        raise ConfigError("Global.amp: mixed precision needs Global.device=gpu")
    resume_prefix = resolve_resume(g.resume) if g.resume else None
    # Under `paddle.distributed.launch`: every process trains on its shard,
    # rank 0 alone writes the run folder.
    world = paddle.distributed.get_world_size()
    is_main = paddle.distributed.get_rank() == 0
    adapting = cfg.Transfer.domain_adaptation != "none"
    if world > 1 and adapting:
        raise ConfigError("Transfer.domain_adaptation is not supported in data-parallel training")
    run_dir = prepare_output_dir(g.output_dir, resuming=resume_prefix is not None) if is_main else Path(g.output_dir)
    seed_everything(g.seed)

    spec = get_spec(cfg.Arch.name)
    pre = Preprocess.from_spec(spec, cfg.Arch.input_size)
    train_tf, eval_tf = train_transform(pre, loaders.Train.augment), eval_transform(pre)
    train_set = build_dataset(loaders.Train.dataset, "train", train_tf)
    eval_set = build_dataset(loaders.Eval.dataset, "eval", eval_tf, class_names=train_set.class_names)
    target_set = build_target_dataset(loaders.Target.dataset, train_tf) if adapting else None
    class_names = train_set.class_names
    num_classes = cfg.Arch.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ConfigError(f"Arch.num_classes: {num_classes} is fewer than the {len(class_names)} "
                          "classes in the training data")
    cfg.Arch.num_classes = num_classes
    duplicates = []
    if is_main:
        cfg.save(run_dir / "config.yaml")
        duplicates = _warn_about_duplicates(train_set, eval_set)

    network = build_model(spec.name, num_classes, **cfg.Arch.kwargs)
    if is_main:
        require_free_space(run_dir, network, master_weights=amp == "O2")
    pretrained = cfg.Arch.pretrained is not False
    if pretrained:  # also when resuming: L2-SP and the similarity probe need the pretrained weights
        report = load_pretrained(network, cfg.Arch.pretrained, spec.head, imagenet_url=spec.imagenet_url,
                                 imagenet_md5=spec.imagenet_md5, sha256=cfg.Arch.pretrained_sha256,
                                 arch=spec.name)
        print(report.summary())
    similarity = None
    if cfg.Transfer.strategy == "auto" and pretrained and head_linear(network, spec) is not None:
        similarity = measure_similarity(network, spec, train_set, eval_tf, pre.input_size, device, g.seed,
                                        num_workers=loaders.Train.num_workers)
    plan = plan_transfer(cfg.Transfer, len(spec.stages), train_set.class_counts(), pretrained, similarity)
    if plan.l2sp_alpha:
        if not pretrained:
            raise ConfigError("Transfer.l2sp_alpha: L2-SP pulls toward pretrained weights, but Arch.pretrained is false")
        # `model` is created below, before the first backward calls the hook.
        anchored = add_l2sp(network, spec, plan.l2sp_alpha, loss_scale=lambda: model.loss_scale())
        print(f"L2-SP: {anchored:,} body parameters pulled toward their pretrained values "
              f"(alpha {plan.l2sp_alpha:g})")

    state = RunState(seed=g.seed, class_names=class_names, epochs=g.epochs)
    if resume_prefix is not None:
        state = _resume_weights(resume_prefix, network, class_names, g.epochs)
    state.model = describe_model(spec, num_classes, cfg.Arch.kwargs, pre, class_names)  # in every checkpoint
    # A resumed run continues its schedule where it stopped; when Global.epochs
    # changed, that schedule no longer fits, so a new one spans the epochs left.
    same_schedule = state.epochs == g.epochs
    schedule_epochs = g.epochs if same_schedule else g.epochs - state.start_epoch
    state.frozen_stages = plan.frozen_stages_at(state.start_epoch)
    counts = set_frozen_stages(network, spec, state.frozen_stages, plan.bn)
    print(f"strategy: {plan.strategy} ({plan.reason}); {state.frozen_stages}/{plan.num_stages} stages "
          f"frozen; {counts['trainable_params']:,} trainable parameters")

    started = time.time()  # training time includes computing cached features
    if world > 1:
        not_cached = "data-parallel training"
    else:
        not_cached = why_not_cached(plan, network, spec) if cfg.Transfer.cache_features else "turned off"
    extra_callbacks = [GradualUnfreezer(network, spec, plan, state)] if plan.strategy == "gradual" else []
    if not_cached is None:
        views = cfg.Transfer.cache_views
        print(f"frozen body: computing its features once, then training the head on them "
              f"({views} view(s) per training image: the plain one + {views - 1} augmented)")
        train_data, eval_data, fit_network, feature_size = cached_datasets(
            network, spec, pre.input_size, train_set, eval_set, eval_tf, train_tf, views, loaders.Eval, g.seed,
            device)
        input_spec = paddle.static.InputSpec([None, feature_size], "float32", "features")
        train_workers = eval_workers = 0  # in-memory arrays
        extra_callbacks.append(ViewSwitcher(train_data, state))
    else:
        if state.frozen_stages == plan.num_stages:
            print(f"features not cached: {not_cached}")
        train_data, eval_data, fit_network = train_set, eval_set, network
        input_spec = paddle.static.InputSpec([None, 3, pre.input_size, pre.input_size], "float32", "image")
        train_workers, eval_workers = loaders.Train.num_workers, loaders.Eval.num_workers

    counts_per_class = train_set.class_counts()
    weights = class_weights(cfg.Loss, counts_per_class, num_classes)
    if weights:
        print(f"class imbalance {imbalance_ratio(counts_per_class):.1f}x: class-weighted loss "
              f"(Loss.class_weights={cfg.Loss.class_weights})")
    topk = sorted({k for k in cfg.Metric.topk if k <= num_classes} | {1})
    loss, metric, collate, domain = build_loss(cfg.Loss, weights), paddle.metric.Accuracy(topk=topk), None, None
    if adapting:
        domain = setup_domain_adaptation(cfg.Transfer, network, spec, train_set, target_set, loss, g.seed)
        train_data, fit_network, loss, collate = domain.train_data, domain.network, domain.loss, pair_collate
        metric = LabeledAccuracy(topk=topk)
        print(f"domain adaptation ({domain.method}, weight {cfg.Transfer.domain_weight:g}): "
              f"{len(train_set)} labeled source and {len(target_set)} unlabeled target images; every step "
              f"takes {loaders.Train.batch_size} of each")
    balanced_labels = [label for _, label in train_set.samples] if loaders.Train.sampler == "balanced" else None
    batch_size = loaders.Train.batch_size
    per_process = -(-len(train_data) // world)  # both distributed samplers give every process ceil(n / N)
    train_loader = make_loader(train_data, batch_size, shuffle=True, num_workers=train_workers,
                               balanced_labels=balanced_labels,
                               drop_last=per_process % batch_size == 1,  # no BatchNorm on 1 image
                               distributed=world > 1, collate_fn=collate)
    eval_loader = make_loader(eval_data, loaders.Eval.batch_size, shuffle=False, num_workers=eval_workers,
                              distributed=world > 1)
    optimizer_cfg = cfg.Optimizer
    if world > 1 or balanced_labels is not None:
        extra_callbacks.append(SamplerEpoch(train_loader.batch_sampler, state))
    if world > 1:
        # Linear scaling rule: N processes of batch B make a global batch of N*B,
        # which takes N times the learning rate a batch of B was tuned for.
        scaled = optimizer_cfg.lr.learning_rate * world
        optimizer_cfg = dataclasses.replace(optimizer_cfg, lr=dataclasses.replace(optimizer_cfg.lr,
                                                                                  learning_rate=scaled))
        print(f"data-parallel on {world} processes: global batch {world} x {batch_size}; learning rate scaled "
              f"{world}x to {scaled:g} (linear scaling rule)")
    extra_layers = domain.extra_layers if domain else {}
    optimizer = build_optimizer(optimizer_cfg, trainable_parameters(network, spec, plan) +
                                [p for layer in extra_layers.values() for p in layer.parameters()],
                                len(train_loader), schedule_epochs)
    if resume_prefix is not None:
        for name, layer in extra_layers.items():
            load_weights(layer, f"{resume_prefix}.{name}")
        restore_optimizer(network, optimizer, f"{resume_prefix}.pdopt", with_schedule=same_schedule,
                          extra_layers=extra_layers)
        if not same_schedule:
            print(f"Global.epochs changed from {state.epochs} to {g.epochs}: the learning-rate schedule "
                  f"restarts over the {schedule_epochs} epochs left")
            state.epochs = g.epochs

    if g.to_static:
        # The network is traced into a static graph at its first step, with
        # the stages frozen now and BatchNorm as set now (Global.to_static
        # refuses gradual unfreezing, which would change them later). The
        # converted layer is the same object with the same parameters, so
        # checkpoints, `network` and export are unaffected.
        fit_network = paddle.jit.to_static(fit_network, input_spec=[input_spec], full_graph=True)
    model = GuardedModel(fit_network, inputs=[input_spec],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(optimizer, loss, metric, amp_configs=amp)

    names = metric_names(topk)
    writers, step_loggers = [], []  # rank 0's: per epoch, and per training step
    if is_main:
        vdl = VisualDLLogger(run_dir / "vdl", state, names, g.log_interval, len(train_loader))
        writers, step_loggers = [vdl, Checkpointer(run_dir, network, optimizer, state, extra_layers)], [vdl]
    schedule = DomainSchedule(domain, state, len(train_loader)) if domain else None
    if schedule:
        extra_callbacks.append(schedule)
    eval_schedule = EvalSchedule(g.eval_interval, state.start_epoch, g.epochs)
    recorder = EpochRecorder(state, names, eval_schedule.evaluates,
                             g.early_stopping_patience, listeners=writers, nan_policy=g.nan_policy,
                             steps_per_epoch=len(train_loader),
                             extra_figures=schedule.epoch_figures if schedule else None)

    try:
        model.fit(train_loader, eval_loader, epochs=g.epochs - state.start_epoch, eval_freq=eval_schedule,
                  log_freq=g.log_interval, verbose=1 if sys.stdout.isatty() else 2,  # bar on a terminal
                  callbacks=[recorder, *step_loggers, *extra_callbacks])
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        amp_hint = {None: ", turn on Global.amp (O1, or O2)", "O1": ", try Global.amp=O2"}.get(amp, "")
        raise OutOfMemoryError(
            f"out of {'GPU ' if device == 'gpu' else ''}memory at epoch {state.epochs_done + 1}: lower "
            f"DataLoader.Train.batch_size (now {batch_size}){amp_hint if device == 'gpu' else ''}"
            f", or lower Arch.input_size; resume with -o Global.resume={run_dir}") from exc
    train_seconds = time.time() - started

    final_top1 = state.history[-1]["eval_top1"]  # the last epoch is always evaluated (EvalSchedule)
    metrics = {
        "best_top1": state.best_top1, "best_epoch": state.best_epoch, "final_top1": final_top1,
        "epochs_run": state.epochs_done, "train_seconds": round(train_seconds, 2),
        "num_classes": num_classes, "class_names": class_names,
        "train_images": len(train_set), "eval_images": len(eval_set),
        "skipped_files": [path for path, _ in train_set.skipped + eval_set.skipped],
        "imbalance_ratio": round(imbalance_ratio(counts_per_class), 3), "class_weights": weights,
        "sampler": loaders.Train.sampler,
        "domain_adaptation": None if not domain else {
            "method": domain.method, "weight": cfg.Transfer.domain_weight, "target_images": len(target_set),
            "target_skipped_files": [path for path, _ in target_set.skipped]},
        "nan_policy": g.nan_policy, "skipped_batches": sum(row.get("skipped_batches", 0) for row in state.history),
        "data_warnings": {"duplicates_across_splits": {"count": len(duplicates),
                                                       "pairs": duplicates[:DUPLICATES_RECORDED]}},
        "strategy": dict(plan.to_dict(), cached_features=not_cached is None,
                         cache_views=cfg.Transfer.cache_views if not_cached is None else 0),
        **counts, "device": device, "amp": amp, "to_static": g.to_static,
        "num_workers": {"train": train_loader.num_workers, "eval": eval_loader.num_workers},
        "history": state.history,
    }
    metrics["processes"] = world
    if not is_main:
        return metrics
    write_json(run_dir / "metrics.json", metrics)
    print(f"report: {write_report(run_dir)}")
    print(f"done: best eval top-1 {state.best_top1:.4f} (epoch {state.best_epoch}), final "
          f"{final_top1:.4f}, {train_seconds:.0f} s of training; run folder {run_dir}")
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


def _resume_weights(prefix, network, class_names, epochs):
    """Weights and run state of a checkpoint (its optimizer state is restored
    once the optimizer exists)."""
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
