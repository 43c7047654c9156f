"""Detection training: config -> VOC/COCO datasets -> Faster R-CNN (Mask
R-CNN with Arch.mask) on a zoo body -> epochs -> run folder (`paddle-tl
train` with Global.task=detection).

The run folder is classification's (paddle_tl/runs): opened only once the
data is read (a refusal before the first epoch leaves it as it was),
config.yaml, atomic checkpoints (`latest` every epoch for resuming,
`best_model` when the validation AP improves, both with the model record
eval and export rebuild from: model.py), metrics.json, vdl/. What differs
is the step: a list of images of their own sizes and per-image box
targets, where classification's engine feeds `paddle.Model.fit` stacked
tensors, so the loop is this module's, in plain Paddle.

Selection: the best epoch is chosen on the validation split's box AP50
(its AP breaks ties), held out of the training images as classification
does (DataLoader.Train.val_fraction, seeded); bbox_ap and bbox_ap50 in
metrics.json are that epoch's on the Eval split. With val_fraction 0 the
Eval split chooses, and metrics.json says so. A Mask R-CNN is chosen the
same way (on boxes), and metrics.json adds its mask_ap and mask_ap50.
"""

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paddle_tl.combinations import Facts, check_combinations
from paddle_tl.engine.optim import build_optimizer
from paddle_tl.errors import DataError
from paddle_tl.files import write_json
from paddle_tl.models.zoo import get_spec
from paddle_tl.runs import BEST_MODEL, CONFIG_FILE, LATEST, METRICS_FILE, VDL_DIR
from paddle_tl.runs.checkpoint import load_state, load_weights, resolve_resume, restore_optimizer, save_checkpoint
from paddle_tl.runs.run_folder import check_output_dir, opened_run_folder
from paddle_tl.runtime import import_paddle, progress, seed_everything, select_device
from paddle_tl.tasks.detection.data import DetectionDataset, read_dataset
from paddle_tl.tasks.detection.evaluate import evaluate, import_cocoeval
from paddle_tl.tasks.detection.loader import batches, predict
from paddle_tl.tasks.detection.model import build_detector, describe_detector
from paddle_tl.tasks.detection.report import write_detection_report
from paddle_tl.tasks.detection.transforms import EvalTransform, TrainTransform

paddle = import_paddle()

SELECTION_METRIC = "bbox_ap50"
SCORES = ("bbox_ap", "bbox_ap50", "mask_ap", "mask_ap50")  # in the history, where the model has them
# Bottom stages frozen by default (Transfer.strategy auto or partial without
# freeze_stages): stride 2 and 4, as torchvision's trainable_backbone_layers=3
# for ResNet-50; the high-resolution stages cost most and gain least.
DEFAULT_FROZEN_STAGES = 2


@dataclass
class DetectionData:
    train: DetectionDataset
    val: DetectionDataset  # held out of the training images; None with val_fraction 0
    eval: DetectionDataset

    @property
    def choosing(self):
        """The split that chooses the best epoch."""
        return self.val if self.val is not None else self.eval


def train(cfg):
    """Train a detector as configured; returns what metrics.json holds."""
    check_combinations(Facts(cfg, device=select_device(cfg.Global.device),
                             processes=paddle.distributed.get_world_size(),
                             stages=len(get_spec(cfg.Arch.name).stages)))
    import_cocoeval()  # a missing pycocotools is said before any work
    folder = check_output_dir(cfg.Global.output_dir)
    resume = resolve_resume(cfg.Global.resume) if cfg.Global.resume else None
    seed_everything(cfg.Global.seed)
    data = load_data(cfg)
    started = time.time()
    with opened_run_folder(folder, resuming=resume is not None):
        cfg.save(folder / CONFIG_FILE)
        record = describe_detector(cfg, data.train.class_names)
        state = start_state(cfg, record, resume)
        model = build_detector(record, pretrained=cfg.Arch.pretrained or None, frozen_stages=state["frozen_stages"])
        steps = len(data.train) // cfg.DataLoader.Train.batch_size
        # Built for the epochs the run schedules: Global.epochs, or fewer where the budget cut them (a resume).
        optimizer = build_optimizer(cfg.Optimizer, [p for p in model.parameters() if not p.stop_gradient],
                                    steps, state["epochs"])
        if resume is not None:
            load_weights(model, resume)
            restore_optimizer(model, optimizer, str(resume) + ".pdopt")
            print(f"resuming from {resume} after epoch {state['epochs_done']} of {state['epochs']}")
    fit(cfg, folder, model, optimizer, state, data, steps, started)
    return record_run(cfg, folder, model, state, data, time.time() - started)


def frozen_stages(cfg):
    given = cfg.Transfer.freeze_stages
    if cfg.Transfer.strategy == "full":
        return 0
    return DEFAULT_FROZEN_STAGES if given is None else given


def load_data(cfg):
    """Train (less its validation share), validation and Eval datasets,
    refused in one line where they cannot be read (data.py's readers)."""
    loaders, masks = cfg.DataLoader, cfg.Arch.mask
    train = read_dataset(loaders.Train.dataset, "Train", masks=masks)
    evaluation = read_dataset(loaders.Eval.dataset, "Eval", train.class_names, masks=masks)
    train, val = split_validation(train, loaders.Train.val_fraction, cfg.Global.seed)
    if len(train) < loaders.Train.batch_size:
        raise DataError(f"DataLoader.Train: {len(train)} training images, fewer than one batch "
                        f"(DataLoader.Train.batch_size={loaders.Train.batch_size})")
    print(f"detection data: {len(train)} training images ({sum(len(s) for s in train.samples)} objects), "
          f"{0 if val is None else len(val)} validation, {len(evaluation)} Eval; "
          f"classes {', '.join(train.class_names)}")
    return DetectionData(train, val, evaluation)


def split_validation(dataset, fraction, seed):
    """(train, val): a seeded share of the images held out (at least one),
    or (dataset, None) with fraction 0."""
    if fraction <= 0:
        return dataset, None
    order = np.random.RandomState(seed).permutation(len(dataset))
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise DataError(f"DataLoader.Train.val_fraction={fraction} leaves no training images of {len(dataset)}; "
                        "lower it")
    held = set(order[:count].tolist())

    def part(keep):
        samples = [s for i, s in enumerate(dataset.samples) if (i in held) != keep]
        return DetectionDataset(samples, dataset.class_names, issues=dataset.issues, source=dataset.source)
    return part(True), part(False)


def start_state(cfg, record, resume):
    """A fresh state, or the one `resume` recorded."""
    if resume is None:
        return {"seed": cfg.Global.seed, "class_names": record["class_names"], "epochs": cfg.Global.epochs,
                "epochs_done": 0, "frozen_stages": frozen_stages(cfg), "selection_metric": SELECTION_METRIC,
                "best_epoch": -1, "best_score": None, "epochs_without_improvement": 0, "skipped_batches": 0,
                "history": [], "model": record}
    state = load_state(resume)
    if state.get("model", {}).get("task") != "detection":
        raise DataError(f"Global.resume: {resume} is not a detection run's checkpoint")
    return state


def fit_budget(cfg, state, optimizer, steps, run_started, epoch_seconds):
    """Global.budget_minutes: after an epoch, the epochs that still fit at
    its pace (with one more evaluation of the Eval split's size to end the
    run); where Global.epochs do not, the schedule is shortened to end
    with the last epoch that fits (cosine decays fully by then)."""
    budget = cfg.Global.budget_minutes
    if budget is None:
        return
    left = budget * 60 - (time.time() - run_started) - epoch_seconds * 0.25
    fit = state["epochs_done"] + max(0, math.floor(left / epoch_seconds))
    if fit >= state["epochs"]:
        return
    fit = max(fit, state["epochs_done"])
    print(f"Global.budget_minutes={budget:g}: at {epoch_seconds:.0f} s an epoch, {fit} of the {state['epochs']} "
          f"scheduled epochs fit; the learning-rate schedule now ends after epoch {fit}")
    state["epochs"] = fit
    shorten_schedule(optimizer, steps * fit)


def shorten_schedule(optimizer, total_steps):
    """Make the (warmed-up) schedule end at total_steps: cosine's T_max
    counts the steps after warmup."""
    schedule = optimizer._learning_rate
    inner = getattr(schedule, "learning_rate", schedule)  # LinearWarmup wraps the decay
    warmup = getattr(schedule, "warmup_steps", 0)
    if isinstance(inner, paddle.optimizer.lr.CosineAnnealingDecay):
        inner.T_max = max(1, total_steps - warmup)


def fit(cfg, folder, model, optimizer, state, data, steps, run_started):
    """The epochs from where the state is, each evaluated on the choosing
    split every Global.eval_interval epochs (and the last), `latest` saved
    after every epoch, best_model when the choosing score improved."""
    g, det = cfg.Global, cfg.Arch.detector
    from visualdl import LogWriter
    writer = LogWriter(logdir=str(folder / VDL_DIR))
    train_tf = TrainTransform(det.train_short_sides, det.max_size, flip_prob=0.5 if det.hflip else 0.0)
    eval_tf = EvalTransform(det.short_side, det.max_size)
    arch = model.body.arch
    try:
        epoch = state["epochs_done"]
        while epoch < state["epochs"]:
            # Seeded per epoch: a resumed run draws the batches the killed one would have.
            random.seed(g.seed * 1000 + epoch)
            paddle.seed(g.seed * 1000 + epoch)
            started = time.time()
            sums, stopped = train_epoch(cfg, model, optimizer, state, data, train_tf, arch, epoch, steps, writer)
            row = {"epoch": epoch, "lr": optimizer.get_lr(), **{f"train_{k}": v for k, v in sums.items()},
                   "train_seconds": round(time.time() - started, 1)}
            last = stopped or epoch == state["epochs"] - 1
            improved = False
            if (epoch + 1) % g.eval_interval == 0 or last:
                found = evaluate(data.choosing, predict(model, data.choosing, eval_tf, arch=arch))
                split = "val" if data.val is not None else "eval"
                row.update({f"{split}_{key}": found[key] for key in SCORES if key in found})
                score = [found["bbox_ap50"], found["bbox_ap"]]
                improved = state["best_score"] is None or score > state["best_score"]
                if improved:
                    state.update(best_score=score, best_epoch=epoch, epochs_without_improvement=0)
                else:
                    state["epochs_without_improvement"] += 1
            state["history"].append(row)
            state["epochs_done"] = epoch + 1
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            writer.flush()
            print(epoch_line(row, state["epochs"]), flush=True)
            fit_budget(cfg, state, optimizer, steps, run_started, time.time() - started)
            if improved:
                save_checkpoint(folder / BEST_MODEL, model, state=state)
            save_checkpoint(folder / LATEST, model, optimizer, state)
            patience = g.early_stopping_patience
            if stopped or (patience and state["epochs_without_improvement"] >= patience):
                break
            epoch += 1
    finally:
        writer.close()
    if state["best_epoch"] < 0:
        raise DataError("training stopped before any epoch was evaluated (non-finite losses from the start: "
                        "lower Optimizer.lr.learning_rate)")


def train_epoch(cfg, model, optimizer, state, data, transform, arch, epoch, steps, writer):
    """One pass over the training images; returns (mean of each loss,
    whether training must stop). A batch whose loss or gradients are not
    finite never updates the model (Global.nan_policy)."""
    g = cfg.Global
    model.train()
    # The losses are whatever the model returns (Mask R-CNN adds loss_mask).
    sums, counted, skipped_in_a_row, stopped = {}, 0, 0, False
    batch_size = cfg.DataLoader.Train.batch_size
    loader = batches(data.train, transform, batch_size, arch, shuffle=True, drop_last=True, masks=model.mask)
    for step, batch in enumerate(progress(loader, f"epoch {epoch + 1}/{state['epochs']}", total=steps,
                                          unit="batches")):
        losses = model(batch.images, batch.targets)
        loss = sum(losses.values())
        if math.isfinite(float(loss)):
            loss.backward()
        if not math.isfinite(float(loss)) or not _finite_gradients(model):
            optimizer.clear_grad()
            state["skipped_batches"] += 1
            skipped_in_a_row += 1
            if g.nan_policy == "stop" or skipped_in_a_row >= steps:
                print(f"epoch {epoch + 1}: a non-finite loss or gradient at step {step + 1}; training stops "
                      f"(Global.nan_policy={g.nan_policy}); the best epoch so far is kept")
                stopped = True
                break
            continue
        skipped_in_a_row = 0
        optimizer.step()
        optimizer.clear_grad()
        optimizer._learning_rate.step()
        counted += 1
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        if (step + 1) % g.log_interval == 0:
            at = epoch * steps + step + 1
            writer.add_scalar("train_step/loss", float(loss), at)
            writer.add_scalar("train_step/lr", optimizer.get_lr(), at)
    means = {name: round(value / max(counted, 1), 5) for name, value in sums.items()}
    means["loss"] = round(sum(means.values()), 5)
    return means, stopped


def _finite_gradients(model):
    grads = [p.grad for p in model.parameters() if not p.stop_gradient and p.grad is not None]
    return all(bool(paddle.isfinite(grad).all()) for grad in grads)


def epoch_line(row, epochs):
    scores = ", ".join(f"{key} {row[key]:.4f}" for key in row if key.endswith(SCORES))
    return (f"epoch {row['epoch'] + 1}/{epochs}: loss {row['train_loss']:.4f}"
            f"{', ' + scores if scores else ''}, lr {row['lr']:.5f}, {row['train_seconds']:.0f} s")


def record_run(cfg, folder, model, state, data, train_seconds):
    """Eval AP of best_model (and of the last epoch where it differs) into
    metrics.json; a Mask R-CNN's mask AP beside its box AP."""
    eval_tf = EvalTransform(cfg.Arch.detector.short_side, cfg.Arch.detector.max_size)
    found = predict(model, data.eval, eval_tf)
    last = evaluate(data.eval, found)
    if state["best_epoch"] == state["epochs_done"] - 1:
        best = last
    else:
        load_weights(model, folder / BEST_MODEL)
        found = predict(model, data.eval, eval_tf)
        best = evaluate(data.eval, found)
    images = state["epochs_done"] * (len(data.train) // cfg.DataLoader.Train.batch_size) \
        * cfg.DataLoader.Train.batch_size
    chooser = "val" if data.val is not None else "eval"
    metrics = {
        "task": "detection", "bbox_ap": best["bbox_ap"], "bbox_ap50": best["bbox_ap50"],
        "bbox_ap75": best["bbox_ap75"], "per_class_ap": best["per_class"],
        "final_bbox_ap": last["bbox_ap"], "final_bbox_ap50": last["bbox_ap50"],
        f"{chooser}_bbox_ap50": state["best_score"][0], f"{chooser}_bbox_ap": state["best_score"][1],
        "selection_metric": f"{chooser} {SELECTION_METRIC}", "best_epoch": state["best_epoch"],
        "epochs_run": state["epochs_done"], "train_seconds": round(train_seconds, 1),
        "train_images_per_second": round(images / max(sum(r["train_seconds"] for r in state["history"]), 1e-9), 3),
        "num_classes": len(data.train.class_names), "class_names": data.train.class_names,
        "images": {"train": len(data.train), "val": 0 if data.val is None else len(data.val), "eval": len(data.eval)},
        "strategy": {"name": "full" if state["frozen_stages"] == 0 else "partial",
                     "frozen_stages": state["frozen_stages"], "batch_norm": "frozen (every stage)"},
        "detector": dataclasses.asdict(cfg.Arch.detector), "skipped_batches": state["skipped_batches"],
        "history": state["history"],
    }
    if model.mask:
        metrics.update({"mask_ap": best["mask_ap"], "mask_ap50": best["mask_ap50"], "mask_ap75": best["mask_ap75"],
                        "per_class_mask_ap": best["mask_per_class"], "final_mask_ap": last["mask_ap"],
                        "final_mask_ap50": last["mask_ap50"]})
    write_json(Path(folder) / METRICS_FILE, metrics)
    print(f"report: {write_detection_report(folder, found, data.eval)}")
    print(json.dumps({key: metrics[key] for key in ("bbox_ap", "bbox_ap50", "mask_ap", "mask_ap50", "best_epoch",
                                                    "train_seconds") if key in metrics}))
    return metrics
