"""`paddle-tl cv`: stratified, seeded k-fold cross-validation of the
configured recipe over the training images.

Fold k's run trains on the other folds (its own validation split, as usual,
held out of them) and is scored on fold k, in `Global.output_dir/cv/fold_k`,
through the ordinary `engine.train.train`: each fold's data is a pair of
PaddleClas list files written beside it (`cv/lists/fold_k/`), so every fold
folder is a complete run folder. The per-fold top-1 scores give a mean, a
standard deviation and a 95% t-interval for the mean; `cv/cv.json` and
`cv/cv.png` record them.
"""

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np

from paddle_tl.combinations import Facts, check_combinations
from paddle_tl.errors import ConfigError, DataError

CV_DIR = "cv"
# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964


def t_quantile_975(df):
    """t_{0.975, df}: the table for df <= 30, beyond it the Cornish-Fisher
    expansion around the normal quantile (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(scores):
    """(mean, sample standard deviation, (low, high)): the 95% t-interval
    for the mean of `scores` (one per fold)."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = float(scores.mean())
    if len(scores) < 2:
        return mean, 0.0, (mean, mean)
    std = float(scores.std(ddof=1))
    half = t_quantile_975(len(scores) - 1) * std / math.sqrt(len(scores))
    return mean, std, (mean - half, mean + half)


def stratified_folds(labels, k, seed):
    """The fold (0..k-1) of every sample: each class's members, in an order
    drawn from `seed`, are dealt to the folds in turn, continuing where the
    previous class stopped, so every class and the folds' sizes differ by at
    most one between folds. The same seed gives the same folds."""
    labels = np.asarray(labels)
    if k < 2:
        raise ConfigError(f"--folds must be at least 2, got {k}")
    if k > len(labels):
        raise ConfigError(f"--folds {k} is more than the {len(labels)} training images")
    rng = np.random.RandomState(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (offset + np.arange(len(members))) % k
        offset += len(members)
    return fold


def cross_validate(cfg, folds=5):
    """Train and score every fold; returns (and writes to cv/cv.json) the
    result whose JSON the command prints."""
    from paddle_tl.data.datasets import build_dataset
    from paddle_tl.engine.train import train
    from paddle_tl.runs.run_folder import prepare_output_dir

    # Global.resume and Distill.teacher are refused for cv, before any work.
    check_combinations(Facts.of_config(cfg, command="cv"))
    train_set = build_dataset(cfg.DataLoader.Train.dataset, "train", None)
    labels = [label for _, label in train_set.samples]
    counts = train_set.class_counts()
    small = [name for name, count in zip(train_set.class_names, counts) if count < 2]
    if small:
        raise DataError(f"classes {small} have fewer than 2 images: the fold that holds one out "
                        "would train without it")
    fold_of = stratified_folds(labels, folds, cfg.Global.seed)
    # Absolute: the list files and each fold's config.yaml must work from any folder.
    out = prepare_output_dir(Path(cfg.Global.output_dir) / CV_DIR, resuming=False)[0].resolve()
    names_file = out / "lists" / "label_names.txt"
    names_file.parent.mkdir(parents=True, exist_ok=True)
    # "<index> <name>" lines: read back as such whatever the names look like.
    names_file.write_text("".join(f"{i} {name}\n" for i, name in enumerate(train_set.class_names)),
                          encoding="utf-8")
    started = time.time()
    rows = []
    for k in range(folds):
        print(f"cross-validation: fold {k + 1}/{folds}: {int((fold_of != k).sum())} training images, "
              f"{int((fold_of == k).sum())} held out")
        lists = out / "lists" / f"fold_{k + 1}"
        lists.mkdir(parents=True, exist_ok=True)
        train_list, eval_list = lists / "train.txt", lists / "eval.txt"
        _write_list(train_list, [s for s, f in zip(train_set.samples, fold_of) if f != k])
        _write_list(eval_list, [s for s, f in zip(train_set.samples, fold_of) if f == k])
        metrics = train(fold_config(cfg, out / f"fold_{k + 1}", train_list, eval_list, names_file))
        strategy = metrics.get("strategy") or {}
        rows.append({"fold": k + 1, "top1": metrics["best_top1"], "final_top1": metrics["final_top1"],
                     "val_top1": metrics.get("val_top1"), "best_epoch": metrics.get("best_epoch"),
                     "train_images": metrics["train_images"], "eval_images": metrics["eval_images"],
                     "strategy": strategy.get("strategy"), "train_seconds": metrics["train_seconds"],
                     "run": str(out / f"fold_{k + 1}")})
    scores = [row["top1"] for row in rows]
    mean, std, (low, high) = mean_interval(scores)
    result = {"folds": scores, "mean": round(mean, 6), "std": round(std, 6), "ci95": [round(low, 6), round(high, 6)],
              "k": folds, "seed": cfg.Global.seed, "images": len(labels), "class_names": train_set.class_names,
              "strategy": cfg.Transfer.strategy, "seconds": round(time.time() - started, 1),
              "per_fold": rows, "output": str(out)}
    from paddle_tl.files import write_json
    write_json(out / "cv.json", result)
    plot_cv(result, out / "cv.png")
    print(f"cross-validation: top-1 {mean:.4f} ± {std:.4f} (std over {folds} folds), 95% CI for the mean "
          f"[{low:.4f}, {high:.4f}]; {out / 'cv.json'}, {out / 'cv.png'}")
    return result


def fold_config(cfg, folder, train_list, eval_list, names_file):
    """cfg with the fold's list files as Train and Eval data and `folder` as
    its run folder; everything else (strategy, validation split, epochs) as
    configured."""
    from paddle_tl.config import DatasetConfig
    loaders = cfg.DataLoader

    def listed(path):
        return DatasetConfig(name="ListFile", list_file=str(path), label_names_file=str(names_file))

    loaders = dataclasses.replace(loaders, Train=dataclasses.replace(loaders.Train, dataset=listed(train_list)),
                                  Eval=dataclasses.replace(loaders.Eval, dataset=listed(eval_list)))
    return dataclasses.replace(cfg, DataLoader=loaders,
                               Global=dataclasses.replace(cfg.Global, output_dir=str(folder), pretrained_model=None))


def _write_list(path, samples):
    lines = []
    for image, label in samples:
        image = os.path.abspath(image)
        if "\n" in image or image != image.strip():
            raise DataError(f"{image!r}: a path with a line break or surrounding spaces cannot go "
                            "into a list file")
        lines.append(f"{image} {label}\n")
    path.write_text("".join(lines), encoding="utf-8")


def plot_cv(result, path):
    """Per-fold top-1 bars, the mean as a line and its 95% interval as a band."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    scores = result["folds"]
    low, high = result["ci95"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(scores) + 2), 3.2), dpi=100)
    xs = np.arange(1, len(scores) + 1)
    ax.bar(xs, scores, color="#6a9fd4", label="fold top-1")
    ax.axhspan(low, high, color="#f0a030", alpha=0.25, label=f"95% CI [{low:.3f}, {high:.3f}]")
    ax.axhline(result["mean"], color="#c05000", label=f"mean {result['mean']:.3f}")
    for x, score in zip(xs, scores):
        ax.text(x, score, f"{score:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("fold")
    ax.set_ylabel("top-1 on the held-out fold")
    bottom = max(0.0, min(min(scores), low) - 0.1)
    ax.set_ylim(bottom, min(1.0, max(max(scores), high)) + 0.05 * (1.05 - bottom))
    ax.set_title(f"{len(scores)}-fold cross-validation ({result['images']} images)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
