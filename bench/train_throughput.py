"""Training throughput of paddle_tl against a plain hand-written paddle loop,
in one run, plus the data pipeline alone.

- paddle_tl: `paddle_tl.train.train`, its real path (paddle.Model.fit with
  paddle_tl's callbacks, loaders, datasets, transforms and frozen stages);
  the figure is the epoch's own `train_images_per_second` from metrics.json
  (training steps only, data loading included, evaluation not).
- CPU: the same span on the main process's CPU clock (time.process_time:
  every thread of the training process, not the loader's worker
  processes), as images per CPU-second. On a machine shared with other work
  the wall clock of each run moves with their load; the CPU seconds the
  training process itself spends move less (OpenMP threads that wait for
  a descheduled partner still count), so its ratio is the one to read when
  the wall-clock runs spread more than the gap between the arms.
- plain loop: the same network, weights, trainable parameters and optimizer
  (Momentum, cosine schedule, the same per-stage learning rates), the same
  transform, batch size and num_workers, driven by a bare dynamic-graph loop
  (paddle.io.DataLoader over a minimal PIL dataset, which decodes every image
  in full; forward, cross-entropy, backward, step, clear_grad, schedule step;
  the loss read once per step),
  timed over the same span: one epoch, from creating the loader's iterator
  to the last step.
- full = every layer trains; linear_probe = the body frozen (its BatchNorm
  statistics included) and only the head trains. paddle_tl's default for a
  frozen body caches its features, which is another algorithm; the
  comparison runs paddle_tl with Transfer.cache_features=false, and the
  cached path's own figures are printed separately.
- data pipeline: paddle_tl's training loader (decode + augmentation +
  normalisation, the same num_workers) iterated with no model.

Each run trains `--warmup-epochs` unmeasured epochs, then one measured
epoch of `--steps` batches; one unmeasured run of each arm goes first. The arms alternate (paddle_tl, plain, plain,
paddle_tl, ...) `--repeats` times, so load from other processes falls on
both; the table gives medians and their ratio, and beside them the spread
of each arm's runs ((max - min) / median): a ratio's distance from 1 means
something only when it is larger than those spreads (with 3 steps per
measured epoch the runs spread by 15 % on a shared 2-core machine; the
defaults, 8 steps and 3 repeats, took 8-10.5 minutes there at a load
average of 2-4 and 20-23 at 7-9).

    python bench/train_throughput.py [--arch mobilenet_v2 resnet50] [--mode full linear_probe]
        [--input-size 112] [--steps 8] [--batch-size 8] [--num-workers 2] [--repeats 3]
        [--device cpu|gpu] [--amp [O1|O2]] [--to_static]

--amp (GPU only; alone it means O1) and --to_static apply to both arms:
paddle_tl gets Global.amp and Global.to_static, the plain loop does what
hapi does for them (auto_cast at the level, a GradScaler, paddle.amp.decorate
for O2; paddle.jit.to_static on the network).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paddle_tl.runtime import import_paddle, select_device  # noqa: E402
from paddle_tl.runtime import seed_everything  # noqa: E402
from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.errors import ConfigError
from paddle_tl.data.datasets import build_dataset, find_images  # noqa: E402
from paddle_tl.data.loaders import make_loader
from paddle_tl.engine import callbacks  # noqa: E402
from paddle_tl.engine.optim import build_optimizer  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402
from paddle_tl.transfer.freezing import is_batch_norm, set_frozen_stages, trainable_parameters  # noqa: E402
from paddle_tl.transfer.plan import plan_transfer
from paddle_tl.data.transforms import Preprocess, train_transform  # noqa: E402
from paddle_tl.models.weights import load_pretrained  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec, match_prefix  # noqa: E402

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Speed does not depend on the weights' values; these make the MobileNetV2
# runs a real transfer (there is no ResNet50 file in ../shared: random weights).
WEIGHTS = {"mobilenet_v2": SHARED / "weights" / "mobilenet_v2_imagenet.pdparams"}
EVAL_IMAGES_PER_CLASS = 2  # evaluation is not measured; keep it short


def bench_folders(root, images, tmp):
    """A training folder of `images` images (spread over the classes, by
    symbolic links) and a tiny eval folder, from the ImageFolder `root`."""
    train_root, eval_root = tmp / "train", tmp / "val"
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for name in classes:
        (train_root / name).mkdir(parents=True)
        (eval_root / name).mkdir(parents=True)
        for path in list(find_images(root / "val" / name))[:EVAL_IMAGES_PER_CLASS]:
            (eval_root / name / Path(path).name).symlink_to(path)
    per_class = [list(find_images(root / "train" / name)) for name in classes]
    for i in range(images):
        paths = per_class[i % len(classes)]
        path = Path(paths[(i // len(classes)) % len(paths)])
        (train_root / classes[i % len(classes)] / f"{i}{path.suffix}").symlink_to(path)
    return train_root, eval_root


def config(args, arch, mode, folders, out, cached=False):
    weights = WEIGHTS.get(arch)
    pretrained = str(weights) if weights is not None and weights.is_file() else "false"
    return load_config(None, [
        f"Global.output_dir={out}", f"Global.epochs={args.warmup_epochs + 1}", f"Global.device={args.device}",
        f"Global.amp={args.amp or 'false'}", f"Global.to_static={str(args.to_static).lower()}",
        "Global.log_interval=10",
        f"Arch.name={arch}", f"Arch.pretrained={pretrained}", f"Arch.input_size={args.input_size}",
        f"Transfer.strategy={mode}", f"Transfer.cache_features={str(cached).lower()}",
        f"DataLoader.Train.dataset.root={folders[0]}", f"DataLoader.Eval.dataset.root={folders[1]}",
        f"DataLoader.Train.batch_size={args.batch_size}", f"DataLoader.Train.num_workers={args.num_workers}",
        f"DataLoader.Eval.batch_size={args.batch_size}", f"DataLoader.Eval.num_workers={args.num_workers}",
        "Optimizer.lr.warmup_epochs=0", "Metric.topk=[1]"])


class EpochCPUClock:
    """The main process's CPU seconds of paddle_tl's last epoch, between the
    points where EpochRecorder starts and stops `train_seconds`."""
    seconds = started = None

    def __enter__(self):
        self.recorder = callbacks.EpochRecorder
        begin, end = self.recorder.on_epoch_begin, self.recorder.on_epoch_end

        def on_epoch_begin(recorder, epoch, logs=None):
            begin(recorder, epoch, logs)
            self.started = time.process_time()

        def on_epoch_end(recorder, epoch, logs=None):
            self.seconds = time.process_time() - self.started
            end(recorder, epoch, logs)

        self.saved = begin, end
        self.recorder.on_epoch_begin, self.recorder.on_epoch_end = on_epoch_begin, on_epoch_end
        return self

    def __exit__(self, *exc):
        self.recorder.on_epoch_begin, self.recorder.on_epoch_end = self.saved


def paddle_tl_run(cfg):
    """(images/s, images per CPU-second) of paddle_tl's last (measured)
    epoch, and its metrics."""
    with EpochCPUClock() as clock:
        metrics = train(cfg)
    row = metrics["history"][-1]
    images = row["train_images_per_second"] * row["train_seconds"]
    return (row["train_images_per_second"], images / clock.seconds), metrics


class PlainImages(paddle.io.Dataset):
    """What a hand-written loop would use: PIL decode, the transform, the label."""

    def __init__(self, samples, transform):
        super().__init__()
        self.samples, self.transform = samples, transform

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), np.array([label], dtype=np.int64)

    def __len__(self):
        return len(self.samples)


def plain_run(cfg):
    """(images/s, images per CPU-second) of the last epoch of a bare
    dynamic-graph loop doing what `cfg` asks paddle_tl to do."""
    seed_everything(cfg.Global.seed)
    spec = get_spec(cfg.Arch.name)
    pre = Preprocess.from_spec(spec, cfg.Arch.input_size)
    loader_cfg = cfg.DataLoader.Train
    dataset = build_dataset(loader_cfg.dataset, "train", None)
    network = build_model(spec.name, len(dataset.class_names))
    if cfg.Arch.pretrained is not False:
        load_pretrained(network, cfg.Arch.pretrained, spec.head)
    plan = plan_transfer(cfg.Transfer, len(spec.stages), dataset.class_counts(), cfg.Arch.pretrained is not False)
    set_frozen_stages(network, spec, plan.frozen_stages, plan.bn)  # the same trainable parameters
    body_bn = [layer for name, layer in network.named_sublayers()
                 if not match_prefix(name, spec.head) and is_batch_norm(layer)]
    for layer in body_bn:
        layer._use_global_stats = None  # paddle's default: this loop freezes statistics with eval() instead
    loader = paddle.io.DataLoader(PlainImages(dataset.samples, train_transform(pre, loader_cfg.augment)),
                                  batch_size=loader_cfg.batch_size, shuffle=True, num_workers=loader_cfg.num_workers)
    epochs = cfg.Global.epochs
    optimizer = build_optimizer(cfg.Optimizer, trainable_parameters(network, spec, plan), len(loader), epochs)
    amp = cfg.Global.amp_level
    if amp == "O2":  # float16 weights, float32 master copies in the optimizer (what hapi's prepare does)
        network, optimizer = paddle.amp.decorate(models=network, optimizers=optimizer, level="O2")
    if cfg.Global.to_static:
        image_spec = paddle.static.InputSpec([None, 3, pre.input_size, pre.input_size], "float32", "image")
        network = paddle.jit.to_static(network, input_spec=[image_spec], full_graph=True)
    scaler = paddle.amp.GradScaler() if amp else None
    network.train()
    if plan.strategy == "linear_probe":
        for layer in body_bn:
            layer.eval()  # the frozen body keeps its BatchNorm statistics
    for _ in range(epochs):
        images_seen, started, cpu_started = 0, time.perf_counter(), time.process_time()
        for images, labels in loader:
            with paddle.amp.auto_cast(enable=amp is not None, level=amp or "O1"):
                loss = paddle.nn.functional.cross_entropy(network(images), labels)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.clear_grad()
            optimizer._learning_rate.step()
            float(loss)  # what any loop does to log progress; waits for the step to finish
            images_seen += len(labels)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return images_seen / seconds, images_seen / cpu_seconds


def pipeline_run(cfg, epochs):
    """images/s of paddle_tl's training loader alone (decode + augment +
    normalise), the median over its epochs after the first."""
    spec = get_spec(cfg.Arch.name)
    loader_cfg = cfg.DataLoader.Train
    transform = train_transform(Preprocess.from_spec(spec, cfg.Arch.input_size), loader_cfg.augment)
    dataset = build_dataset(loader_cfg.dataset, "train", transform)
    loader = make_loader(dataset, loader_cfg.batch_size, shuffle=True, num_workers=loader_cfg.num_workers)
    rates = []
    for _ in range(epochs):
        count, started = 0, time.perf_counter()
        for images, _labels in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates[1:])  # the first epoch also reads the files into the page cache


def spread(runs):
    """(max - min) / median of one arm's runs."""
    return (max(runs) - min(runs)) / statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--mode", nargs="+", choices=["full", "linear_probe"], default=["full", "linear_probe"])
    parser.add_argument("--input-size", type=int, default=112,
                        help="pixels (224 is the ImageNet size; smaller keeps the default run short on a CPU)")
    parser.add_argument("--steps", type=int, default=8, help="training steps in the measured epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each arm, interleaved")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--amp", nargs="?", const="O1", choices=["O1", "O2"],
                        help="mixed precision at this level (GPU only; --amp alone: O1)")
    parser.add_argument("--to_static", action="store_true", help="train static graphs (paddle.jit.to_static)")
    parser.add_argument("--root", type=Path, default=SHARED / "datasets" / "hymenoptera",
                        help="an ImageFolder root with train/ and val/")
    args = parser.parse_args()
    try:
        if args.amp and args.device != "gpu":
            raise ConfigError("--amp: mixed precision needs --device gpu")
        select_device(args.device)
    except ConfigError as exc:
        parser.exit(2, f"train_throughput: {exc}\n")
    if not (args.root / "train").is_dir():
        parser.exit(2, f"train_throughput: no training images at {args.root / 'train'}\n")

    started, load = time.time(), os.getloadavg()[0]
    rows, cached_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = bench_folders(args.root, args.steps * args.batch_size, tmp / "data")
        pipeline = pipeline_run(config(args, args.arch[0], "full", folders, tmp / "unused"), epochs=4)
        # The first training in a process runs slower (one-time set-up in paddle
        # and the allocator); one unmeasured run of each arm takes that.
        warmup = config(args, args.arch[0], args.mode[0], folders, tmp / "warmup")
        paddle_tl_run(warmup)
        plain_run(warmup)
        for arch in args.arch:
            for mode in args.mode:
                ours, plain = [], []
                for repeat in range(args.repeats):
                    cfg = config(args, arch, mode, folders, tmp / f"{arch}_{mode}_{repeat}")
                    # A B, then B A: neither arm always runs first (or right after the other)
                    for arm in (("ours", "plain") if repeat % 2 == 0 else ("plain", "ours")):
                        if arm == "ours":
                            ours.append(paddle_tl_run(cfg)[0])
                        else:
                            plain.append(plain_run(cfg))
                    print(f"[{arch} {mode} repeat {repeat + 1}] paddle_tl {ours[-1][0]:.2f} img/s "
                          f"({ours[-1][1]:.2f} per CPU-s), plain {plain[-1][0]:.2f} img/s "
                          f"({plain[-1][1]:.2f} per CPU-s)", flush=True)
                rows.append((arch, mode, ours, plain))
                if mode == "linear_probe":
                    cfg = config(args, arch, mode, folders, tmp / f"{arch}_cached", cached=True)
                    (speed, _), metrics = paddle_tl_run(cfg)
                    cached_rows.append((arch, speed, metrics["train_seconds"], metrics["epochs_run"]))

    images = args.steps * args.batch_size
    print(f"\n{os.cpu_count()} cores, paddle {paddle.__version__}, device {args.device}"
          f"{f' AMP {args.amp}' if args.amp else ''}{' to_static' if args.to_static else ''}; "
          f"input {args.input_size} px, batch {args.batch_size}, "
          f"{args.steps} steps ({images} images) per measured epoch after {args.warmup_epochs} warm-up epoch(s), "
          f"num_workers {args.num_workers}, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}; "
          f"{args.repeats} interleaved repeats; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{time.time() - started:.0f} s\n")
    for clock, unit, index in (("wall clock", "img/s", 0), ("CPU clock of the training process", "img/CPU-s", 1)):
        print(f"{clock}:\n")
        print(f"| network | training | paddle_tl {unit} | plain loop {unit} | paddle_tl / plain "
              "| spread paddle_tl; plain | runs (paddle_tl; plain) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for arch, mode, ours, plain in rows:
            ours, plain = [run[index] for run in ours], [run[index] for run in plain]
            a, b = statistics.median(ours), statistics.median(plain)
            runs = f"{', '.join(f'{v:.2f}' for v in ours)}; {', '.join(f'{v:.2f}' for v in plain)}"
            print(f"| {arch} | {mode} | {a:.2f} | {b:.2f} | {a / b:.3f}x "
                  f"| {spread(ours):.1%}; {spread(plain):.1%} | {runs} |")
        print()
    slowest = min(statistics.median(run[0] for run in plain) for *_, plain in rows)
    print(f"data pipeline alone (paddle_tl's training loader, no model, {args.num_workers} workers): "
          f"{pipeline:.1f} img/s, {pipeline / slowest:.1f}x the slowest and "
          f"{pipeline / max(statistics.median(run[0] for run in p) for *_, p in rows):.1f}x the fastest "
          "training speed above")
    for arch, speed, total_seconds, epochs in cached_rows:
        print(f"cached linear probe, {arch} (paddle_tl's default for a frozen body): {speed:.0f} img/s per epoch "
              f"on stored features; {total_seconds:.1f} s for all {epochs} epochs including computing the features")


if __name__ == "__main__":
    main()
