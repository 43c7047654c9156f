"""`paddle-tl check-data -c CFG`: what the training and evaluation data hold,
before any training: images per class and split, image sizes and modes,
unreadable files, files under two classes at once (which training
refuses), files that appear in both splits, classes missing from the
evaluation split, and class imbalance. Writes `data_check.json` and a
class histogram PNG, and prints a short table.

Unreadable files, unknown evaluation classes and empty classes are found by
the same dataset builders training uses (data.build_dataset), so this
report and a training run cannot disagree about the data; training also
runs the same duplicate check (duplicates_across_splits) and warns.
"""

import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from paddle_tl.data.datasets import (IMBALANCE_RATIO, PROGRESS_MIN_FILES, build_dataset, describe_label_conflicts,
                                     imbalance_ratio, label_conflicts)
from paddle_tl.files import file_digest
from paddle_tl.runtime import progress


def duplicates_across_splits(train, evaluation):
    """Evaluation images whose file is byte-identical to a training image's,
    as {"train": path, "eval": path} pairs in evaluation order. Cheap enough
    for the start of every training run: it hashes the bytes, decodes nothing."""
    train_paths = [path for path, _ in train.samples]
    eval_paths = [path for path, _ in evaluation.samples]
    paths = train_paths + eval_paths
    # Hashing and reading release the GIL, so threads use all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        digests = list(progress(pool.map(file_digest, paths), "hashing images", total=len(paths), unit="file",
                                min_total=PROGRESS_MIN_FILES))
    train_by_digest = dict(zip(digests[:len(train_paths)], train_paths))
    return [{"train": train_by_digest[digest], "eval": path}
            for path, digest in zip(eval_paths, digests[len(train_paths):]) if digest in train_by_digest]


def duplicates_problem(duplicates):
    return (f"{len(duplicates)} evaluation images are byte-identical to training images "
            "(evaluation would overrate the model)")


def _inspect(path):
    """(width, height, mode) of one readable image file."""
    with Image.open(path) as image:  # header only: the builder already decoded it once
        return image.width, image.height, image.mode


def _split_summary(dataset):
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        infos = list(pool.map(_inspect, [path for path, _ in dataset.samples]))
    widths, heights = [i[0] for i in infos], [i[1] for i in infos]
    modes = {}
    for _, _, mode in infos:
        modes[mode] = modes.get(mode, 0) + 1

    def spread(values):
        return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}

    summary = {
        "images": len(dataset.samples),
        "per_class": dict(zip(dataset.class_names, dataset.class_counts())),
        "unreadable": [{"file": path, "reason": reason} for path, reason in dataset.skipped],
        "label_conflicts": label_conflicts(dataset.samples, dataset.class_names),
        "width": spread(widths), "height": spread(heights), "modes": modes,
    }
    return summary


def check_data(cfg, out_dir):
    """Build both splits as training would, summarise them, write the report
    into `out_dir`; returns the report."""
    loaders = cfg.DataLoader
    # Files under two classes would stop training; here they are kept, so
    # that the rest of the report is made and they are listed with it.
    train = build_dataset(loaders.Train.dataset, "train", transform=None, refuse_label_conflicts=False)
    evaluation = build_dataset(loaders.Eval.dataset, "eval", transform=None, class_names=train.class_names,
                               refuse_label_conflicts=False)
    train_summary, eval_summary = _split_summary(train), _split_summary(evaluation)
    duplicates = duplicates_across_splits(train, evaluation)
    missing = [name for name, count in eval_summary["per_class"].items() if count == 0]
    imbalance = imbalance_ratio(train.class_counts())
    problems = []
    for split, summary in (("training", train_summary), ("evaluation", eval_summary)):
        if summary["label_conflicts"]:
            problems.append(f"{split} data: {describe_label_conflicts(summary['label_conflicts'])} "
                            "(training refuses this)")
    if train_summary["unreadable"] or eval_summary["unreadable"]:
        problems.append(f"{len(train_summary['unreadable']) + len(eval_summary['unreadable'])} unreadable "
                        "files (left out of training)")
    if duplicates:
        problems.append(duplicates_problem(duplicates))
    if missing:
        problems.append(f"classes with no evaluation images: {', '.join(missing)}")
    if imbalance > IMBALANCE_RATIO:
        problems.append(f"class imbalance: the largest training class is {imbalance:.1f}x the smallest")
    report = {"class_names": train.class_names, "splits": {"train": train_summary, "eval": eval_summary},
              "duplicates_across_splits": duplicates, "imbalance_ratio": round(imbalance, 3),
              "problems": problems}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data_check.json").write_text(json.dumps(report, indent=1))
    _histogram(report, out_dir / "class_histogram.png")
    return report


def _histogram(report, path):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = report["class_names"]
    positions = range(len(names))
    figure, axes = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 4))
    for offset, split in ((-0.2, "train"), (0.2, "eval")):
        counts = [report["splits"][split]["per_class"][n] for n in names]
        axes.bar([p + offset for p in positions], counts, width=0.4, label=split)
    axes.set_xticks(list(positions), names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    axes.set_ylabel("images")
    axes.set_title("images per class")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_table(report):
    names = report["class_names"]
    width = max(len("class"), *(len(n) for n in names))
    train, evaluation = report["splits"]["train"], report["splits"]["eval"]
    lines = [f"{'class':<{width}}  {'train':>7}  {'eval':>7}"]
    for name in names:
        lines.append(f"{name:<{width}}  {train['per_class'][name]:>7}  {evaluation['per_class'][name]:>7}")
    lines.append(f"{'total':<{width}}  {train['images']:>7}  {evaluation['images']:>7}")
    for split, summary in (("train", train), ("eval", evaluation)):
        if summary["width"]:
            lines.append(f"{split}: {summary['width']['min']}-{summary['width']['max']} x "
                         f"{summary['height']['min']}-{summary['height']['max']} px, modes {summary['modes']}")
    lines += [f"problem: {p}" for p in report["problems"]] or ["no problems found"]
    return "\n".join(lines)
