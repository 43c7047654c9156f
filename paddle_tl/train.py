"""Fine-tuning: config -> model + data -> `paddle.Model.fit` -> run folder."""

import logging
import sys
import time

from paddle_tl.backend import import_paddle, select_device
from paddle_tl.callbacks import (Checkpointer, EpochRecorder, RunState, VisualDLLogger,
                                 metric_names, seed_everything)
from paddle_tl.checkpoint import load_state, load_weights, resolve_resume, restore_optimizer
from paddle_tl.config import ConfigError
from paddle_tl.data import build_dataset, make_loader
from paddle_tl.losses import build_loss
from paddle_tl.optim import build_optimizer
from paddle_tl.run_folder import prepare_output_dir, write_json
from paddle_tl.transfer import apply_plan, plan_transfer, trainable_parameters
from paddle_tl.transforms import Preprocess, eval_transform, train_transform
from paddle_tl.weights import load_pretrained
from paddle_tl.zoo import build_model, get_spec

paddle = import_paddle()
log = logging.getLogger("paddle_tl")


def build_datasets(cfg, pre):
    loaders = cfg.DataLoader
    train_set = build_dataset(loaders.Train.dataset, "train", train_transform(pre, loaders.Train.augment))
    eval_set = build_dataset(loaders.Eval.dataset, "eval", eval_transform(pre),
                             class_names=train_set.class_names)
    return train_set, eval_set


def train(cfg):
    """Run a fine-tuning as configured; returns the metrics written to metrics.json."""
    g = cfg.Global
    device = select_device(g.device)
    if g.amp and device != "gpu":
        raise ConfigError("Global.amp: mixed precision needs Global.device=gpu")
    resume_prefix = resolve_resume(g.resume) if g.resume else None
    run_dir = prepare_output_dir(g.output_dir, resuming=resume_prefix is not None)
    seed_everything(g.seed)

    spec = get_spec(cfg.Arch.name)
    pre = Preprocess.from_spec(spec, cfg.Arch.input_size)
    train_set, eval_set = build_datasets(cfg, pre)
    class_names = train_set.class_names
    num_classes = cfg.Arch.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ConfigError(f"Arch.num_classes: {num_classes} is fewer than the {len(class_names)} "
                          "classes in the training data")
    cfg.Arch.num_classes = num_classes
    cfg.save(run_dir / "config.yaml")

    network = build_model(spec.name, num_classes, **cfg.Arch.kwargs)
    pretrained = cfg.Arch.pretrained is not False
    if pretrained and resume_prefix is None:
        report = load_pretrained(network, cfg.Arch.pretrained, spec.head, imagenet_url=spec.imagenet_url,
                                 imagenet_md5=spec.imagenet_md5, sha256=cfg.Arch.pretrained_sha256,
                                 arch=spec.name)
        print(report.summary())
    plan = plan_transfer(cfg.Transfer, len(spec.stages), train_set.class_counts(), pretrained)
    counts = apply_plan(network, spec, plan)
    print(f"strategy: {plan.strategy} ({plan.reason}); {plan.frozen_stages}/{plan.num_stages} stages "
          f"frozen; {counts['trainable_params']:,} trainable parameters")

    train_cfg = cfg.DataLoader.Train
    train_loader = make_loader(train_set, train_cfg.batch_size, shuffle=True,
                               num_workers=train_cfg.num_workers,
                               drop_last=len(train_set) % train_cfg.batch_size == 1)  # no BatchNorm on 1 image
    eval_loader = make_loader(eval_set, cfg.DataLoader.Eval.batch_size, shuffle=False,
                              num_workers=cfg.DataLoader.Eval.num_workers)
    optimizer = build_optimizer(cfg.Optimizer, trainable_parameters(network, spec, plan),
                                len(train_loader), g.epochs)

    topk = sorted({k for k in cfg.Metric.topk if k <= num_classes} | {1})
    model = paddle.Model(
        network,
        inputs=[paddle.static.InputSpec([None, 3, pre.input_size, pre.input_size], "float32", "image")],
        labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(optimizer, build_loss(cfg.Loss),
                  paddle.metric.Accuracy(topk=topk), amp_configs="O1" if g.amp else None)

    state = RunState(seed=g.seed, class_names=class_names)
    if resume_prefix is not None:
        state = _resume(resume_prefix, network, optimizer, class_names)
    if state.start_epoch >= g.epochs:
        raise ConfigError(f"Global.resume: the run already finished {state.start_epoch} of "
                          f"{g.epochs} epochs; raise Global.epochs to train further")

    names = metric_names(topk)
    evaluates = lambda local_epoch: local_epoch % g.eval_interval == 0  # hapi's own eval rule
    checkpointer = Checkpointer(run_dir, state, g.early_stopping_patience)
    vdl = VisualDLLogger(run_dir / "vdl", state, names, g.log_interval, len(train_loader))
    recorder = EpochRecorder(state, names, evaluates, listeners=[vdl, checkpointer])

    started = time.time()
    model.fit(train_loader, eval_loader, epochs=g.epochs - state.start_epoch, eval_freq=g.eval_interval,
              log_freq=g.log_interval, verbose=1 if sys.stdout.isatty() else 2,  # bar on a terminal
              callbacks=[recorder, vdl, checkpointer])
    train_seconds = time.time() - started

    last = state.history[-1]
    final_top1 = last.get("eval_top1")
    if final_top1 is None:  # the last epoch fell between evaluations
        final_top1 = float(model.evaluate(eval_loader, verbose=0)[next(iter(names))])
    metrics = {
        "best_top1": state.best_top1, "best_epoch": state.best_epoch, "final_top1": final_top1,
        "epochs_run": state.epochs_done, "train_seconds": round(train_seconds, 2),
        "num_classes": num_classes, "class_names": class_names,
        "train_images": len(train_set), "eval_images": len(eval_set),
        "skipped_files": [path for path, _ in train_set.skipped + eval_set.skipped],
        "strategy": plan.to_dict(), **counts,
        "device": device, "history": state.history,
    }
    write_json(run_dir / "metrics.json", metrics)
    print(f"done: best eval top-1 {state.best_top1:.4f} (epoch {state.best_epoch}), final "
          f"{final_top1:.4f}, {train_seconds:.0f} s; run folder {run_dir}")
    return metrics


def _resume(prefix, network, optimizer, class_names):
    record = load_state(prefix)
    if record["class_names"] != class_names:
        raise ConfigError(f"Global.resume: {prefix} was trained on classes {record['class_names']}, "
                          f"the data now has {class_names}")
    load_weights(network, prefix)
    restore_optimizer(network, optimizer, f"{prefix}.pdopt")
    record.pop("files")
    state = RunState(**record)
    state.start_epoch = state.epochs_done
    print(f"resumed from {prefix} after epoch {state.epochs_done}")
    return state
