"""Knowledge distillation (the Distill section; Hinton, Vinyals & Dean 2015):
the run's own network (the student) learns from a finished run's network
(the teacher) as well as from the labels:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

T^2 keeps the soft term's gradients at the scale of the cross-entropy's as T
grows; the cross-entropy is the Loss section's (label smoothing, class
weights).

The teacher's logits travel to the loss as a label, beside the class label,
and always belong to the very image the student sees:

- cached features or activations (engine/fit.py): the teacher runs in the
  same pass as the frozen layers, over the same batches of the same seeded
  views, so its logits are computed once per view (transfer/feature_cache.py),
  not every epoch.
- images: augmentation draws a new view of every image every epoch, so the
  teacher runs beside the student in each training step (WithTeacher), on
  that step's batch: once per view here too. Precomputed plain-view logits
  would pair the teacher's view of one crop with the student's of another.

Evaluation batches carry no teacher logits: there the loss is the
cross-entropy alone and the numbers are the plain ones. The teacher is not
part of the student's network: checkpoints, the run folder and the export are
the student's alone.
"""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paddle_tl.errors import ConfigError
from paddle_tl.models.static import fastest_runner
from paddle_tl.runs import BEST_MODEL, METRICS_FILE
from paddle_tl.runs.checkpoint import STATE_SUFFIX, read_record
from paddle_tl.runs.run_folder import rebuild_model
from paddle_tl.runtime import import_paddle, rng_kept
from paddle_tl.transfer.freezing import running_statistics

paddle = import_paddle()
F = paddle.nn.functional


@dataclass
class Teacher:
    """A finished run to distill from, as its folder describes it."""
    folder: Path
    record: dict  # best_model's model record (run_folder.describe_model)
    top1: float  # its Eval top-1 (metrics.json best_top1)

    @property
    def prefix(self):
        return self.folder / BEST_MODEL

    def check_classes(self, class_names, num_classes):
        """The teacher's outputs must mean the student's classes, in the same order."""
        taught, outputs = list(self.record["class_names"]), self.record["num_classes"]
        if taught != list(class_names) or outputs != num_classes:
            raise ConfigError(f"Distill.teacher: {self.folder} was trained on classes {taught} ({outputs} outputs); "
                              f"the student's training data has {list(class_names)} ({num_classes} outputs)")


def find_teacher(distill_cfg):
    """The finished run Distill.teacher names, read (not built) before any
    work; None without one. A run that stopped early has no metrics.json."""
    if distill_cfg.teacher is None:
        return None
    folder = Path(distill_cfg.teacher)
    if not folder.is_dir():
        raise ConfigError(f"Distill.teacher: {folder} {'is not a folder' if folder.exists() else 'does not exist'}; "
                          "give the folder of a finished paddle-tl train run")
    state_file, metrics_file = folder / f"{BEST_MODEL}{STATE_SUFFIX}", folder / METRICS_FILE
    missing = [path.name for path in (state_file, metrics_file) if not path.is_file()]
    if missing:
        raise ConfigError(f"Distill.teacher: {folder} is not a finished run folder (no {' or '.join(missing)}); "
                          "train the teacher to the end first")
    record = read_record(state_file).get("model")
    if not record:
        raise ConfigError(f"Distill.teacher: {state_file} does not record its network (written by an older "
                          "paddle_tl); retrain the teacher")
    return Teacher(folder, record, json.loads(metrics_file.read_text()).get("best_top1"))


@dataclass
class TeacherNetwork:
    """The teacher built, and how the student's batches reach it."""
    network: object  # in eval mode, its weights the run's best_model
    input_size: int
    adapt: object  # the student's input batch -> the teacher's
    parameters: int


def build_teacher(teacher, student_pre):
    """The teacher's network with its best_model weights, in eval mode."""
    # Building it initialises a network before its weights load, which draws
    # from the random generators: the student trains on the same draws as
    # without a teacher.
    with rng_kept():
        network, _, teacher_pre, _ = rebuild_model(teacher.record, teacher.prefix)
    statistics = {id(p) for p in running_statistics(network)}  # counted as the student's are (freezing.py)
    count = sum(int(p.size) for p in network.parameters() if id(p) not in statistics)
    return TeacherNetwork(network, teacher_pre.input_size, input_adapter(student_pre, teacher_pre), count)


def input_adapter(student_pre, teacher_pre):
    """images -> the same images as the teacher's preprocessing has them:
    renormalised with its mean and std, resized to its input size. The
    teacher sees the student's crop, not a crop of its own."""
    if (student_pre.input_size, student_pre.mean, student_pre.std) == \
            (teacher_pre.input_size, teacher_pre.mean, teacher_pre.std):
        return lambda images: images
    s_mean, s_std, t_mean, t_std = (np.array(v, dtype="float32").reshape(1, 3, 1, 1) for v in (
        student_pre.mean, student_pre.std, teacher_pre.mean, teacher_pre.std))
    scale, shift = paddle.to_tensor(s_std / t_std), paddle.to_tensor((s_mean - t_mean) / t_std)
    size = teacher_pre.input_size

    def adapt(images):
        images = images.astype("float32") * scale + shift
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=[size, size], mode="bilinear", align_corners=False)
        return images

    return adapt


@contextlib.contextmanager
def teacher_runner(teacher_network, batch_size, device):
    """Yields run(student images) -> the teacher's logits as numpy, the
    fastest way (models.static.fastest_runner): for computing them once."""
    with fastest_runner(teacher_network.network, teacher_network.input_size, batch_size, device) as run:
        yield lambda images: run(teacher_network.adapt(images))


class WithTeacher(paddle.nn.Layer):
    """What trains on images: the student, and beside it the teacher on the
    same batch. Training returns (student logits, teacher logits);
    evaluation the student's logits alone. The teacher is held as a function,
    not a sub-layer: never trained, saved, or switched to train mode."""

    def __init__(self, student, teacher_network):
        super().__init__()
        self.student = student
        teacher_network.network.eval()

        def teacher_logits(images):
            with paddle.no_grad(), paddle.amp.auto_cast(enable=False):
                return teacher_network.network(teacher_network.adapt(images.astype("float32")))

        self.teacher_logits = teacher_logits

    def forward(self, images):
        logits = self.student(images)
        if not self.training:
            return logits
        return logits, self.teacher_logits(images)


def soft_target_kl(student_logits, teacher_logits, temperature):
    """KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    teacher_log_probs = F.log_softmax(teacher_logits.astype("float32") / temperature, axis=-1)
    student_log_probs = F.log_softmax(student_logits.astype("float32") / temperature, axis=-1)
    return (paddle.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs)).sum(axis=-1).mean()


class DistillationLoss(paddle.nn.Layer):
    """forward(logits, teacher logits, labels) in training; forward(logits,
    labels) in evaluation, which has no teacher logits: the labels' loss alone."""

    def __init__(self, label_loss, temperature, alpha):
        super().__init__()
        self.label_loss, self.temperature, self.alpha = label_loss, temperature, alpha

    def forward(self, logits, *targets):
        label_loss = self.label_loss(logits, targets[-1])
        if len(targets) == 1:
            return label_loss
        soft = soft_target_kl(logits, targets[0], self.temperature)
        return (1 - self.alpha) * label_loss + (self.alpha * self.temperature ** 2) * soft


class LabelAccuracy(paddle.metric.Accuracy):
    """hapi's Accuracy against the class labels, the last of the targets
    (the teacher's logits, when there, come before them)."""

    def compute(self, pred, *targets):
        return super().compute(pred, targets[-1])
