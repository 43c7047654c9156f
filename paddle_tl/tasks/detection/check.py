"""The data check of a detection run, before any training (the detection
side of `paddle-tl check-data`, paddle_tl/data/check.py): per split the
images, objects per class, images without objects, and what reading
clipped, dropped or left out; images found in both splits; classes with no
evaluation objects. The splits are read by the same readers training uses
(data.py), so this report and a training run cannot disagree; what they
refuse (bad XML, unknown classes, missing files) stops the check with the
same one line.
"""

import json
from pathlib import Path

from paddle_tl.tasks.detection.data import DEFAULT_SPLITS, read_dataset, read_voc

# Examples of each kind printed by format_table; data_check.json has them all.
EXAMPLES = 3


def check_voc(train_root, eval_root=None, out_dir=None, splits=DEFAULT_SPLITS):
    """Read the training and evaluation splits of VOC folders (the same
    root for both by default, as the contract's configs use) and report;
    written to out_dir/data_check.json when out_dir is given."""
    train = read_voc(train_root, splits["train"], where="DataLoader.Train.dataset.root")
    evaluation = read_voc(eval_root or train_root, splits["eval"], class_names=train.class_names,
                          where="DataLoader.Eval.dataset.root")
    return check_datasets(train, evaluation, out_dir)


def check_config(cfg, out_dir=None):
    """`paddle-tl check-data` of a detection config: its Train and Eval
    datasets (VOC or COCO), with their masks where Arch.mask trains them."""
    masks = cfg.Arch.mask
    train = read_dataset(cfg.DataLoader.Train.dataset, "Train", masks=masks)
    return check_datasets(train, read_dataset(cfg.DataLoader.Eval.dataset, "Eval", train.class_names, masks=masks),
                          out_dir)


def check_datasets(train, evaluation, out_dir=None):
    """The report of two DetectionDatasets (evaluation read with the
    training set's class names)."""
    summaries = {"train": train.summary(), "eval": evaluation.summary()}
    train_images = {sample.image for sample in train.samples}
    in_both = [sample.image for sample in evaluation.samples if sample.image in train_images]
    problems = []
    for split, summary in summaries.items():
        for kind, what in (("unreadable", "unreadable images (left out)"), ("dropped", "boxes of no area dropped"),
                           ("clipped", "boxes clipped to their image"),
                           ("size_mismatches", "annotations whose image size differs from the image's")):
            if summary[kind]:
                problems.append(f"{split}: {len(summary[kind])} {what}")
    if in_both:
        problems.append(f"{len(in_both)} images are in both splits, e.g. {in_both[0]} "
                        "(evaluation would overrate the model)")
    missing = [name for name, count in summaries["eval"]["objects_per_class"].items() if count == 0]
    if missing:
        problems.append(f"classes with no evaluation objects: {', '.join(missing)}")
    report = {"task": "detection", "class_names": train.class_names, "splits": summaries,
              "in_both_splits": in_both, "problems": problems}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "data_check.json").write_text(json.dumps(report, indent=1))
    return report


def format_table(report):
    """Objects per class and split, then image counts and the problems, with
    a few examples of each box that was dropped."""
    names = report["class_names"]
    train, evaluation = report["splits"]["train"], report["splits"]["eval"]
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'train':>7}  {'eval':>7}   (objects)"]
    for name in names:
        counts = train["objects_per_class"][name], evaluation["objects_per_class"][name]
        lines.append(f"{name:<{width}}  {counts[0]:>7}  {counts[1]:>7}")
    lines.append(f"{'images':<{width}}  {train['images']:>7}  {evaluation['images']:>7}")
    lines.append(f"{'no objects':<{width}}  {train['images_without_objects']:>7}  "
                 f"{evaluation['images_without_objects']:>7}")
    lines += [f"problem: {p}" for p in report["problems"]] or ["no problems found"]
    for split, summary in (("train", train), ("eval", evaluation)):
        for dropped in summary["dropped"][:EXAMPLES]:
            lines.append(f"  {split} dropped: {dropped['file']}: {dropped['class']!r} box {dropped['box']} "
                         f"({dropped['reason']})")
    return "\n".join(lines)
