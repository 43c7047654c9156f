"""The records the training recipe (engine/train.py) hands from step to
step: where and how this process trains (Run), its data (TrainingData)
and its network (Network). In a module of their own so that the fit
builders (engine/fit.py), which train.py imports, take them whole."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from paddle_tl.data.transforms import Preprocess
from paddle_tl.transfer.distill import Teacher
from paddle_tl.transfer.freezing import L2SP


@dataclass
class Run:
    """Where and how this process trains."""
    device: str  # cpu or gpu
    processes: int  # data-parallel processes (paddle.distributed.launch)
    is_main: bool  # rank 0, which alone writes the run folder
    folder: Path  # Global.output_dir, written once open_run_folder has opened it
    resume: Optional[Path]  # the checkpoint prefix resumed from
    teacher: Optional[Teacher] = None  # the finished run distilled from (Distill.teacher)


@dataclass
class TrainingData:
    pre: Preprocess  # the architecture's preprocessing at Arch.input_size
    train_tf: object
    eval_tf: object
    train: object
    val: object  # held out of the training images to choose the best epoch, or None
    eval: object
    target: object  # unlabeled images to adapt to, or None
    class_names: list
    num_classes: int  # outputs of the head: Arch.num_classes, or the training data's classes
    class_weights: Optional[list]  # of the loss (Loss.class_weights), None when unweighted
    duplicates: list  # evaluation images that are copies of training images


@dataclass
class Network:
    spec: object  # the architecture's table entry (models/zoo.py)
    layer: object  # the paddle network
    pretrained: bool
    l2sp: Optional[L2SP] = None  # the body's anchors at its pretrained weights (Transfer.l2sp_alpha)
    counts: Optional[dict] = None  # trainable and frozen parameters when the most trained (gradual, lp_ft: later)
