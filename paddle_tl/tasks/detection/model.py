"""The detector a config describes, and the record a detection checkpoint
keeps of it, so that eval, export and the predictor rebuild what trained
(as classification's runs/run_folder.describe_model does for its networks).

The record (state.json's `model`):
    task "detection", arch, num_classes, class_names,
    detector: Arch.detector as trained (sizes, anchors, thresholds),
    mask: Arch.mask (Mask R-CNN, its branch Arch.detector.mask_channels wide),
    preprocess: mean, std, channel_order (the body's, from the zoo),
                short_side and max_size (the evaluation resize)
"""

import dataclasses
from pathlib import Path

from paddle_tl.data.transforms import Preprocess
from paddle_tl.errors import ConfigError
from paddle_tl.models.zoo import get_spec
from paddle_tl.runs.checkpoint import STATE_SUFFIX, load_weights, read_record
from paddle_tl.runs.run_folder import checkpoint_prefix
from paddle_tl.tasks.detection.faster_rcnn import FasterRCNN

TASK = "detection"


def describe_detector(cfg, class_names):
    """The model record of a detection run configured by `cfg`."""
    detector = dataclasses.asdict(cfg.Arch.detector)
    pre = Preprocess.from_spec(get_spec(cfg.Arch.name))
    return {"task": TASK, "arch": cfg.Arch.name, "num_classes": len(class_names), "class_names": list(class_names),
            "detector": detector, "mask": bool(cfg.Arch.mask),
            "preprocess": {"mean": list(pre.mean), "std": list(pre.std), "channel_order": pre.channel_order,
                           "short_side": detector["short_side"], "max_size": detector["max_size"]}}


def build_detector(record, pretrained=None, frozen_stages=0):
    """A FasterRCNN (a Mask R-CNN where record["mask"]) as `record`
    describes it; the body from `pretrained`
    (models/weights.py's sources; None: random) with its bottom
    `frozen_stages` stages frozen (backbone.py)."""
    d = record["detector"]
    anchors = None if d["anchor_sizes"] is None else [(int(size),) for size in d["anchor_sizes"]]
    train_pre, test_pre = d["rpn_pre_nms_top_n"]
    train_post, test_post = d["rpn_post_nms_top_n"]
    return FasterRCNN(
        record["num_classes"], arch=record["arch"], pretrained=pretrained, frozen_stages=frozen_stages,
        fpn_channels=d["fpn_channels"], representation_size=d["representation_size"], anchor_sizes=anchors,
        aspect_ratios=tuple(d["aspect_ratios"]),
        rpn_kwargs={"pre_nms_top_n": {"train": train_pre, "test": test_pre},
                    "post_nms_top_n": {"train": train_post, "test": test_post}},
        roi_kwargs={"batch_size_per_image": d["rois_per_image"], "score_thresh": d["score_threshold"],
                    "nms_thresh": d["nms_threshold"], "detections_per_img": d["detections_per_image"]},
        # Records written before Mask R-CNN have no mask_channels, and no mask.
        **({"mask": True, "mask_channels": d["mask_channels"]} if record.get("mask") else {}))


def is_detection_record(record):
    return isinstance(record, dict) and record.get("task") == TASK


def trained_detector(cfg):
    """(model in eval mode with Global.pretrained_model's weights, its
    record): the network the checkpoint records, whatever the config says
    of sizes and thresholds."""
    if not cfg.Global.pretrained_model:
        raise ConfigError("Global.pretrained_model: required; point it at a run's best_model "
                          "(e.g. -o Global.pretrained_model=output/run/best_model)")
    prefix = checkpoint_prefix(cfg.Global.pretrained_model)
    state_file = Path(prefix + STATE_SUFFIX)
    if not state_file.is_file():
        raise ConfigError(f"Global.pretrained_model: {state_file} not found; expected a checkpoint "
                          "written by paddle_tl training (e.g. RUN/best_model)")
    record = read_record(state_file).get("model")
    if not is_detection_record(record):
        raise ConfigError(f"Global.pretrained_model: {prefix} is a classification checkpoint, and "
                          "Global.task is detection; give a detection run's best_model")
    model = build_detector(record)
    load_weights(model, prefix)
    model.eval()
    return model, record
