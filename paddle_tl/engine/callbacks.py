"""Training features as `paddle.Model` callbacks: epoch records, early
stopping, the NaN policy (with engine/model.py's GuardedModel), VisualDL and
checkpoints. The loop stays hapi's own, and callbacks are the one way to
follow it.

hapi numbers epochs from 0 in every `fit` call; a resumed run starts `fit`
part-way, so `RunState.run_epoch` turns hapi's epoch into the run's.
EpochRecorder books each epoch (after its evaluation, when it has one);
callbacks that act on a booked epoch (checkpoints, VisualDL) derive from
AfterEpoch and come after it in the list.
"""

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Optional

from paddle_tl.data.loaders import map_batches
from paddle_tl.errors import NonFiniteError
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import dynamic_runner
from paddle_tl.runs import BEST_MODEL, LATEST
from paddle_tl.runs.checkpoint import float32_state, save_checkpoint
from paddle_tl.runtime import import_paddle, seed_everything

paddle = import_paddle()
Callback = paddle.callbacks.Callback


@dataclass
class RunState:
    """What the callbacks share and what a checkpoint records to resume."""
    seed: int
    class_names: list
    epochs: int  # Global.epochs the learning-rate schedule was built for
    frozen_stages: int = -1  # bottom stages frozen in the current epoch
    start_epoch: int = 0
    epochs_done: int = 0
    best_top1: float = -1.0  # the choosing score of the best epoch: validation top-1 (eval top-1 without one)
    # What the choosing score is: "top1", or "balanced_accuracy" where the loss
    # is class-weighted (validation split only: hapi's Eval metric has no recall per class).
    selection_metric: str = "top1"
    best_epoch: int = -1
    best_loss: Optional[float] = None  # its loss on the same split, which breaks ties of top-1
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)  # one dict per finished epoch
    # The network and its preprocessing (run_folder.describe_model), so that
    # eval and export rebuild what trained rather than what a config says.
    model: dict = field(default_factory=dict)
    # The row of the epoch being trained; callbacks may add columns (not saved).
    row = None

    def run_epoch(self, local_epoch):
        """The run's epoch (from 0) of hapi's epoch in this `fit` call."""
        return self.start_epoch + local_epoch

    def to_dict(self):
        return asdict(self)


def metric_names(topk):
    """hapi's Accuracy names its results acc (one k) or acc_topK; ours are topK."""
    if len(topk) == 1:
        return {"acc": f"top{topk[0]}"}
    return {f"acc_top{k}": f"top{k}" for k in topk}


class EvalSchedule:
    """Which epochs are evaluated (Global.eval_interval): every interval-th
    epoch of the run, counted from 1 as the history counts them, and always
    the last one, so the final model is scored and can be the best.

    hapi's fit evaluates after its local epoch e (from 0, restarting at a
    resume) when `e % eval_freq == 0`, which with eval_freq=N scores epochs
    1, N+1, 2N+1, ... and may skip the last. Passed as eval_freq, this object
    answers that test itself (__rmod__: 0 means evaluate)."""

    def __init__(self, interval, state, epochs):
        self.interval, self.state, self.epochs = interval, state, epochs

    def evaluates(self, local_epoch):
        epoch = self.state.run_epoch(local_epoch) + 1
        return epoch % self.interval == 0 or epoch == self.epochs

    def __rmod__(self, local_epoch):
        return 0 if self.evaluates(local_epoch) else 1


class EpochRecorder(Callback):
    """Averages the training loss over the epoch and the eval loss over the eval
    set (hapi's own logs hold only the last batch's loss), and records one
    history row per epoch. Seeds each epoch from (seed, epoch) so a resumed
    run draws the same shuffles and augmentations as an uninterrupted one.

    Training throughput: `train_seconds` runs from the epoch's start to the
    end of its last training step (data loading included, evaluation and
    checkpoints not: hapi evaluates after on_epoch_end), and
    `train_images_per_second` divides the images trained on (skipped batches
    not counted) by it. hapi's batch_size already counts every data-parallel
    process's images, and a domain-adaptation batch's target images.

    Non-finite batches (GuardedModel made no update from them): with
    Global.nan_policy=stop the run stops at the first; with skip they are
    counted per epoch (`skipped_batches`, left out of the loss average) and
    the run stops once an epoch's worth of batches in a row was skipped (the
    weights no longer change, so nothing is learning)."""

    def __init__(self, state, names, evaluates, patience, nan_policy, steps_per_epoch):
        super().__init__()
        self.state, self.names, self.evaluates, self.patience = state, names, evaluates, patience
        self.nan_policy, self.steps_per_epoch = nan_policy, steps_per_epoch
        self._skipped_in_a_row = 0  # across epochs: consecutive batches that made no update

    def on_epoch_begin(self, epoch, logs=None):
        run_epoch = self.state.run_epoch(epoch)
        seed_everything(self.state.seed + run_epoch)
        self.row = self.state.row = {"epoch": run_epoch + 1, "lr": self.model.learning_rate()}
        self._sums = [0.0, 0]
        self.row["skipped_batches"], self._first_skip = 0, None
        self._started = perf_counter()  # last: seeding and get_lr are not training

    def on_train_batch_end(self, step, logs=None):
        reason = self.model.skipped_update
        if reason is not None:
            self._skipped(step, reason)
            return
        self._skipped_in_a_row = 0
        self._sums[0] += float(sum(logs["loss"])) * logs["batch_size"]  # a loss may come in parts
        self._sums[1] += logs["batch_size"]

    def _skipped(self, step, reason):
        where = f"{reason} at epoch {self.row['epoch']}, step {step + 1}"
        advice = ("the run stopped and its last checkpoint (latest.pdparams) is intact. Try a smaller "
                  "Optimizer.lr.learning_rate or add warm-up")
        if self.nan_policy == "stop":
            raise NonFiniteError(f"{where}; {advice}, or Global.nan_policy=skip to skip such batches.")
        self.row["skipped_batches"] += 1
        self._first_skip = self._first_skip or where
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= self.steps_per_epoch:
            raise NonFiniteError(f"{where}: {self._skipped_in_a_row} batches in a row (an epoch's worth) made "
                                 f"no update (Global.nan_policy=skip), so nothing is learning; {advice}.")

    def on_epoch_end(self, epoch, logs=None):
        seconds = perf_counter() - self._started
        self.row["train_seconds"] = round(seconds, 3)
        self.row["train_images_per_second"] = round(self._sums[1] / seconds, 2)
        if self.row["skipped_batches"]:
            print(f"epoch {self.row['epoch']}: skipped {self.row['skipped_batches']} of {self.steps_per_epoch} "
                  f"batches, which made no update (Global.nan_policy=skip); first: {self._first_skip}")
        self.row["frozen_stages"] = self.state.frozen_stages
        self.row["train_loss"] = self._sums[0] / max(1, self._sums[1])
        self.row.update({f"train_{ours}": float(logs[theirs]) for theirs, ours in self.names.items()})
        if not self.evaluates(epoch):
            self._finish()

    def on_eval_begin(self, logs=None):
        self._eval_sums = [0.0, 0]

    def on_eval_batch_end(self, step, logs=None):
        self._eval_sums[0] += float(sum(logs["loss"])) * logs["batch_size"]
        self._eval_sums[1] += logs["batch_size"]

    def on_eval_end(self, logs=None):
        self.row["eval_loss"] = self._eval_sums[0] / max(1, self._eval_sums[1])
        self.row.update({f"eval_{ours}": float(logs[theirs]) for theirs, ours in self.names.items()})
        self._finish()

    def _finish(self):
        """Book the epoch: best score, history, early stopping. This runs on
        every rank of a data-parallel run (eval metrics are gathered across
        ranks), so all ranks stop together; AfterEpoch callbacks may be rank
        0's only."""
        row, state = self.row, self.state
        key = choosing_key(row, state.selection_metric)
        loss = row.get(key.split("_")[0] + "_loss")
        # A tie of top-1 (frequent on a small split) goes to the lower loss.
        improved = key in row and (row[key] > state.best_top1 or (
            row[key] == state.best_top1 and state.best_loss is not None and loss < state.best_loss))
        if improved:
            state.best_top1, state.best_epoch, state.best_loss = row[key], row["epoch"], loss
            state.epochs_without_improvement = 0
        elif key in row:
            state.epochs_without_improvement += 1
        state.history.append(row)
        state.epochs_done = row["epoch"]
        if self.patience and state.epochs_without_improvement >= self.patience:
            print(f"early stopping: no better {key.replace('_', ' ')} for {self.patience} epochs "
                  f"(best {state.best_top1:.4f} at epoch {state.best_epoch})")
            self.model.stop_training = True


def choosing_key(row, metric="top1"):
    """The history column that chooses the best epoch: validation top-1 (or
    validation balanced accuracy, for `metric` balanced_accuracy) when the
    run holds out a validation split, else eval top-1."""
    if metric == "balanced_accuracy" and "val_balanced_accuracy" in row:
        return "val_balanced_accuracy"
    return "val_top1" if "val_top1" in row else "eval_top1"


class ValidationScore(Callback):
    """Scores the validation split (DataLoader.Train.val_fraction of the
    training images) after every evaluated epoch, into the epoch's row as
    val_loss and val_top1, which choose the best epoch and stop early. Placed
    after EpochRecorder, so its time is not training time. Every process of
    a data-parallel run scores the whole split, so all choose alike."""

    def __init__(self, state, network, loader, evaluates):
        super().__init__()
        self.state, self.network, self.loader, self.evaluates = state, network, loader, evaluates

    def on_epoch_end(self, epoch, logs=None):
        if not self.evaluates(epoch):
            return
        logits, labels = map_batches(dynamic_runner(self.network), self.loader)
        scores = classification_metrics(logits, labels, self.state.class_names, topk=(1,))
        self.state.row.update(val_loss=scores["loss"], val_top1=scores["top1"])
        if self.state.selection_metric == "balanced_accuracy":  # a column only where it chooses
            self.state.row["val_balanced_accuracy"] = scores["balanced_accuracy"]


class AfterEpoch(Callback):
    """A callback that acts on each epoch EpochRecorder booked (placed after
    it): `on_recorded(row, improved)`, once per epoch, after the epoch's
    evaluation when it has one."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self._last = state.epochs_done  # a resumed run's booked epochs are not told again

    def on_epoch_end(self, epoch, logs=None):
        self._tell()

    def on_eval_end(self, logs=None):
        self._tell()

    def _tell(self):
        if self.state.epochs_done != self._last:
            self._last = self.state.epochs_done
            row = self.state.history[-1]
            self.on_recorded(row, improved=self.state.best_epoch == row["epoch"])

    def on_recorded(self, row, improved):
        raise NotImplementedError


class VisualDLLogger(AfterEpoch):
    """Into RUN/vdl: per epoch `train/*` and `eval/*` (loss, topK, lr), and
    every `log_interval` steps `train_step/*` (the batch's loss, the running
    accuracy, the learning rate)."""

    def __init__(self, logdir, state, names, log_interval, steps_per_epoch):
        super().__init__(state)
        from visualdl import LogWriter
        self.writer = LogWriter(logdir=str(logdir))
        self.names = names
        self.log_interval, self.steps_per_epoch = log_interval, steps_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = self.state.run_epoch(epoch)

    def on_train_batch_end(self, step, logs=None):
        if (step + 1) % self.log_interval:
            return
        global_step = self._epoch * self.steps_per_epoch + step + 1
        self.writer.add_scalar("train_step/loss", float(sum(logs["loss"])), global_step)
        self.writer.add_scalar("train_step/lr", self.model.learning_rate(), global_step)
        for theirs, ours in self.names.items():
            self.writer.add_scalar(f"train_step/{ours}", float(logs[theirs]), global_step)

    def on_recorded(self, row, improved):
        for key, value in row.items():
            if key in ("lr", "frozen_stages", "skipped_batches"):
                self.writer.add_scalar(f"train/{key}", value, row["epoch"])
            elif key != "epoch":
                split, _, name = key.partition("_")  # "eval_top1" -> eval/top1
                self.writer.add_scalar(f"{split}/{name}", value, row["epoch"])
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()


class Checkpointer(AfterEpoch):
    """After each epoch (and its evaluation): `latest` always, `best_model`
    when eval top-1 improved. With a weight average (engine/ema.py) the
    network holds the average after an evaluated epoch: best_model is the
    average, `latest` the raw weights, for resuming, with the average beside."""

    def __init__(self, run_dir, network, optimizer, state, extra_layers=None, average=None):
        # The whole network, which is more than the model being fit when only
        # the head trains on cached features. Layers trained only to train it
        # (a domain classifier) go to `latest`, for resuming.
        super().__init__(state)
        self.run_dir, self.network, self.optimizer = run_dir, network, optimizer
        self.extra_layers, self.average = extra_layers, average

    def on_recorded(self, row, improved):
        if improved:
            self.save_best()
        with self.average.raw_weights() if self.average else nullcontext():
            save_checkpoint(self.run_dir / LATEST, self.network, self.optimizer, self.state.to_dict(),
                            self.extra_layers, self.average.state() if self.average else None)

    def save_best(self):
        save_checkpoint(self.run_dir / BEST_MODEL, self.network, state=self.state.to_dict())


class BestWeights(AfterEpoch):
    """A copy, in memory, of the network's weights at the best epoch so far
    (as Checkpointer's best_model, without a run folder): what `auto` keeps
    of each candidate it measures, to ship it rather than train it again."""

    def __init__(self, state, network):
        super().__init__(state)
        self.network, self.weights = network, None

    def on_recorded(self, row, improved):
        if improved:
            self.weights = {name: tensor.numpy().copy() for name, tensor in float32_state(self.network).items()}


class EpochClock(Callback):
    """Wall seconds of every epoch, its scoring included: from its start to
    the next epoch's (or the end of training)."""

    def __init__(self):
        super().__init__()
        self.seconds, self._started = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._lap()
        self._started = perf_counter()

    def on_train_end(self, logs=None):
        self._lap()

    def _lap(self):
        if self._started is not None:
            self.seconds.append(perf_counter() - self._started)
            self._started = None


class StopAfter(Callback):
    """Ends the fit after `epochs` epochs (the last one's evaluation
    included), short of the Global.epochs its schedule spans."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


class SamplerEpoch(Callback):
    """The batch samplers that draw from the number given to set_epoch
    (DistributedBatchSampler, BalancedBatchSampler): hapi never advances it;
    give them (seed + epoch), like every other draw, so that every process
    of a data-parallel run, and a resumed run, draws the same."""

    def __init__(self, batch_sampler, state):
        super().__init__()
        self.batch_sampler, self.state = batch_sampler, state

    def on_epoch_begin(self, epoch, logs=None):
        self.batch_sampler.set_epoch(self.state.seed + self.state.run_epoch(epoch))
