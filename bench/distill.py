"""Distillation into a small student, in one run: a MobileNetV2 teacher
(torchvision ImageNet weights from ../shared/weights, fine-tuned on ants/bees)
against a MobileNetV1 x0.25 student (../shared/weights), trained plainly and
distilled from that teacher with the same seed and settings. One Markdown
table: parameters, Eval top-1, training seconds, and exported (Paddle
Inference, oneDNN) images/s, the three models timed in turn as bench/int8.py
times them.

    python bench/distill.py [--teacher RUN_DIR] [--teacher_epochs 10] [--strategy linear_probe] [--epochs 30]
        [--lr 0.01] [--cache_views 8] [--temperature 4] [--alpha 0.9]

--teacher reuses a finished MobileNetV2 run folder instead of training one.
The goal of issue 14: a student with at most 1/5 of the teacher's parameters
within 2 points of its Eval top-1.

The student's defaults are a linear probe on cached features: the x0.25
weights come from a TFLite model whose BatchNorm is folded into the
convolutions (../shared/weights/SOURCES.md), so any strategy that trains a
stage, whose BatchNorm then normalises with batch statistics, starts from a
broken network (`--strategy full --lr 0.005 --epochs 10` measured 0.614).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.data.transforms import eval_transform  # noqa: E402
from paddle_tl.deploy import quantize  # noqa: E402
from paddle_tl.deploy.export import export  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402
from paddle_tl.predict.predictor import Predictor  # noqa: E402
from paddle_tl.runs.run_folder import run_config  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402

paddle = import_paddle()
SHARED = REPO.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
TEACHER_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pdparams"
STUDENT_WEIGHTS = SHARED / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
DATA = [f"DataLoader.Train.dataset.root={HYMENOPTERA / 'train'}",
        f"DataLoader.Eval.dataset.root={HYMENOPTERA / 'val'}"]


def train_teacher(work, epochs):
    """MobileNetV2 as configs/mobilenet_v2_imagefolder.yaml trains it (auto
    chooses a linear probe on cached features for ants/bees)."""
    out = work / "teacher"
    train(load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={out}", f"Global.epochs={epochs}", f"Arch.pretrained={TEACHER_WEIGHTS}", *DATA]))
    return out


def train_student(work, name, args, *distill):
    """MobileNetV1 x0.25, the same seed, data and settings whether distilled or not."""
    out = work / name
    train(load_config(REPO / "configs" / "mobilenet_v2_imagefolder.yaml", [
        f"Global.output_dir={out}", f"Global.epochs={args.epochs}", "Arch.name=mobilenet_v1",
        "Arch.kwargs={scale: 0.25}", f"Arch.pretrained={STUDENT_WEIGHTS}", f"Transfer.strategy={args.strategy}",
        f"Optimizer.lr.learning_rate={args.lr}", f"Transfer.cache_views={args.cache_views}", *DATA, *distill]))
    return out


def exported(run, work):
    out = work / f"{run.name}_inference"
    export(run_config(run, [f"Global.save_inference_dir={out}", *DATA]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="a finished MobileNetV2 ants/bees run folder (default: train one)")
    parser.add_argument("--teacher_epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30, help="the student's")
    parser.add_argument("--strategy", default="linear_probe", help="the student's Transfer.strategy")
    parser.add_argument("--lr", type=float, default=0.01, help="the student's learning rate")
    parser.add_argument("--cache_views", type=int, default=8, help="the student's, on cached features")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    args = parser.parse_args()
    for needed in (HYMENOPTERA, TEACHER_WEIGHTS, STUDENT_WEIGHTS):
        if not needed.exists():
            sys.exit(f"distill: {needed} is absent (../shared beside the checkout)")
    started, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as work:
        work = Path(work)
        teacher = Path(args.teacher) if args.teacher else train_teacher(work, args.teacher_epochs)
        runs = {"teacher: mobilenet_v2": teacher,
                "student: mobilenet_v1 x0.25, plain": train_student(work, "plain", args),
                "student: mobilenet_v1 x0.25, distilled": train_student(
                    work, "distilled", args, f"Distill.teacher={teacher}", f"Distill.temperature={args.temperature}",
                    f"Distill.alpha={args.alpha}")}
        metrics = {name: json.loads((run / "metrics.json").read_text()) for name, run in runs.items()}
        threads = os.cpu_count() or 1
        predictors = {name: Predictor(exported(run, work), cpu_threads=threads, batch_size=quantize.EVAL_BATCH)
                      for name, run in runs.items()}
        pre = {predictor.pre for predictor in predictors.values()}
        assert len(pre) == 1, f"the three models preprocess differently: {pre}"
        cfg = run_config(teacher, DATA)
        dataset = quantize.eval_dataset(cfg, eval_transform(pre.pop()), metrics["teacher: mobilenet_v2"]["class_names"])
        images = np.stack([dataset[i][0] for i in range(len(dataset))])
        speed = quantize.throughput({name: predictor.predict_arrays for name, predictor in predictors.items()}, images)

    teacher_row = metrics["teacher: mobilenet_v2"]
    teacher_params = teacher_row["trainable_params"] + teacher_row["frozen_params"]
    print(f"\n{os.cpu_count()} cores, paddle {paddle.__version__}; students: {args.strategy}, lr {args.lr:g}, "
          f"{args.epochs} epochs; distilled with temperature {args.temperature:g}, alpha {args.alpha:g}; "
          f"images/s: exported, batch {quantize.EVAL_BATCH}; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load)} at start, {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at end; "
          f"{time.time() - started:.0f} s\n")
    print("| network | strategy used | parameters | of the teacher's | Eval top-1 | vs teacher | training s | "
          "images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in metrics.items():
        params = row["trainable_params"] + row["frozen_params"]
        strategy = row["strategy"]["strategy"] + (" (cached)" if row["strategy"]["cached_features"] else "")
        print(f"| {name} | {strategy} | {params:,} | {params / teacher_params:.3f} | {row['best_top1']:.4f} | "
              f"{(row['best_top1'] - teacher_row['best_top1']) * 100:+.2f} pts | {row['train_seconds']:.0f} | "
              f"{speed[f'{name}_images_per_second']:.1f} |")


if __name__ == "__main__":
    main()
