"""CPU training speed options, each measured before/after in one run, the
two arms alternating (A, B, A, B, ...) so that other load falls on both:

1. decoding for training augmentation: full decode vs reduced-size JPEG
   decoding (`Image.draft`, what paddle_tl's training transform asks for),
   on the hymenoptera images as they are and on copies enlarged to 12 MP
   phone-photo size; and PIL vs OpenCV full decoding when cv2 imports.
2. threads: a training step with OMP_NUM_THREADS=1 vs the core count
   (paddle_tl's default; `import paddle` alone would set 1).
3. FLAGS_use_mkldnn=1 (oneDNN kernels) in the dynamic graph vs off.
4. `paddle.jit.to_static` for the training step vs the dynamic graph.
5. channels-last (NHWC) vs NCHW for MobileNetV2-style blocks, and whether
   this paddle and CPU offer bfloat16.

Model steps: forward, cross-entropy, backward, Momentum step on a fixed
random batch (random weights; speed does not depend on their values).

    python bench/cpu_speed.py [--arch mobilenet_v2] [--input-size 112] [--batch-size 16] [--steps 4]
        [--repeats 3] [--root ../shared/datasets/hymenoptera]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
PHONE_PHOTO = (4032, 3024)  # 12 MP
LARGE_IMAGES = 24


# ---------------------------------------------------------------- model steps

def step_speed(make_network, shape, steps, static=False):
    """Median images/s of training steps on a fixed batch of `shape` after
    one warm-up step, and the last loss."""
    import numpy as np
    from paddle_tl.runtime import import_paddle
    paddle = import_paddle()
    paddle.seed(0)
    network = make_network()
    if static:
        network = paddle.jit.to_static(network, full_graph=True)
    optimizer = paddle.optimizer.Momentum(0.01, parameters=network.parameters(), momentum=0.9)
    images = paddle.to_tensor(np.random.RandomState(0).standard_normal(shape).astype("float32"))
    labels = paddle.to_tensor(np.zeros((shape[0], 1), "int64"))
    network.train()
    seconds = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = paddle.nn.functional.cross_entropy(network(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        value = float(loss)
        seconds.append(time.perf_counter() - started)
    return shape[0] / statistics.median(seconds[1:]), value


def vision_model(arch):
    from paddle_tl.runtime import import_paddle
    return lambda: getattr(import_paddle().vision.models, arch)(num_classes=2)


def inverted_residuals(data_format):
    """A stride-4 stem, four MobileNetV2 blocks (expand 1x1, depthwise 3x3,
    project 1x1, with BatchNorm and ReLU6) and a classifier, in either
    layout (paddle.vision's models are NCHW only)."""
    from paddle_tl.runtime import import_paddle
    nn = import_paddle().nn

    def conv_bn(cin, cout, kernel, groups=1, act=True, stride=1):
        layers = [nn.Conv2D(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias_attr=False,
                            data_format=data_format), nn.BatchNorm2D(cout, data_format=data_format)]
        return layers + [nn.ReLU6()] if act else layers

    layers = conv_bn(3, 32, 3, stride=4)
    for _ in range(4):
        layers += conv_bn(32, 192, 1) + conv_bn(192, 192, 3, groups=192) + conv_bn(192, 32, 1, act=False)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2D(1, data_format=data_format), nn.Flatten(), nn.Linear(32, 2))


def step_in_subprocess(args, env):
    """step_speed in a fresh interpreter (thread counts and flags are read at start-up)."""
    command = [sys.executable, __file__, "--step-worker", args.arch, str(args.input_size),
               str(args.batch_size), str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(arms, repeats):
    """{name: [result per repeat]}, calling the arms in turn, repeat after repeat."""
    results = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            results[name].append(run())
    return results


# ---------------------------------------------------------------- decoding

def large_copies(paths, folder):
    """Copies of `paths` enlarged to phone-photo size (JPEG, quality 90)."""
    from PIL import Image
    copies = []
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            target = folder / f"{i}.jpg"
            image.convert("RGB").resize(PHONE_PHOTO, Image.BICUBIC).save(target, quality=90)
            copies.append(target)
    return copies


def decode_arms(paths, transform):
    """name -> run(): seconds per image of decode + training transform."""
    from paddle_tl.data.datasets import load_rgb

    def timed(load):
        def run():
            started = time.perf_counter()
            for path in paths:
                transform(load(path))
            return (time.perf_counter() - started) / len(paths)
        return run

    return {"full decode": timed(load_rgb),
            "reduced decode (draft)": timed(lambda path: load_rgb(path, transform.draft_size))}


def decoder_arms(paths):
    """PIL vs OpenCV full decoding alone, when cv2 imports."""
    from PIL import Image
    try:
        import cv2
    except ImportError:
        return None

    def timed(decode):
        def run():
            started = time.perf_counter()
            for path in paths:
                decode(path)
            return (time.perf_counter() - started) / len(paths)
        return run

    def pil(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    def opencv(path):
        return Image.fromarray(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))

    return {"PIL": timed(pil), f"OpenCV {cv2.__version__}": timed(opencv)}


# ---------------------------------------------------------------- report

def row(option, results, before, after, unit, higher_is_better):
    a, b = statistics.median(results[before]), statistics.median(results[after])
    gain = b / a if higher_is_better else a / b
    runs = "; ".join(", ".join(f"{v:.3g}" for v in results[name]) for name in (before, after))
    return f"| {option} | {before}: {a:.3g} {unit} | {after}: {b:.3g} {unit} | {gain:.2f}x | {runs} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--train-input-size", type=int, default=224, help="input size for the decoding test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "hymenoptera")
    parser.add_argument("--step-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_worker:  # a child of step_in_subprocess
        arch, size, batch, steps = args.step_worker
        speed, loss = step_speed(vision_model(arch), (int(batch), 3, int(size), int(size)), int(steps))
        print(json.dumps({"images_per_second": speed, "loss": loss}))
        return

    from paddle_tl.config import AugmentConfig
    from paddle_tl.data.datasets import find_images
    from paddle_tl.data.transforms import Preprocess, TrainTransform
    from paddle_tl.models.zoo import get_spec

    started, load = time.time(), os.getloadavg()[0]
    rows, notes = [], []
    transform = TrainTransform(Preprocess.from_spec(get_spec(args.arch), args.train_input_size), AugmentConfig())
    paths = sorted(find_images(args.root / "train"))
    with tempfile.TemporaryDirectory() as tmp:
        large = large_copies(paths[::max(1, len(paths) // LARGE_IMAGES)][:LARGE_IMAGES], Path(tmp))
        for name, images in ((f"hymenoptera train ({len(paths)} JPEGs, median 500x375)", paths),
                             (f"{len(large)} JPEGs of {PHONE_PHOTO[0]}x{PHONE_PHOTO[1]}", large)):
            arms = decode_arms(images, transform)
            results = alternate(arms, args.repeats)
            rows.append(row(f"decode + augment, {name}, {args.train_input_size} px", results, *arms, "s/img",
                            higher_is_better=False))
            decoders = decoder_arms(images)
            if decoders is None:
                notes.append("OpenCV: not measured, cv2 does not import here")
            else:
                rows.append(row(f"full JPEG decode only, {name}", alternate(decoders, args.repeats), *decoders,
                                "s/img", higher_is_better=False))
        print("\n".join(rows), flush=True)

    what = f"training step, {args.arch} {args.input_size} px, batch {args.batch_size}"
    cores = str(os.cpu_count() or 1)
    threads = alternate({"OMP_NUM_THREADS=1": lambda: step_in_subprocess(args, {"OMP_NUM_THREADS": "1"}),
                         f"OMP_NUM_THREADS={cores}": lambda: step_in_subprocess(args, {"OMP_NUM_THREADS": cores})},
                        args.repeats)
    speeds = {name: [r["images_per_second"] for r in runs] for name, runs in threads.items()}
    rows.append(row(what, speeds, *speeds, "img/s", higher_is_better=True))

    onednn = alternate({"FLAGS_use_mkldnn=0": lambda: step_in_subprocess(args, {"FLAGS_use_mkldnn": "0"}),
                        "FLAGS_use_mkldnn=1": lambda: step_in_subprocess(args, {"FLAGS_use_mkldnn": "1"})},
                       args.repeats)
    speeds = {name: [r["images_per_second"] for r in runs] for name, runs in onednn.items()}
    rows.append(row(what, speeds, *speeds, "img/s", higher_is_better=True))
    same = {round(r["loss"], 9) for runs in onednn.values() for r in runs}
    notes.append(f"FLAGS_use_mkldnn: losses of all runs {'identical' if len(same) == 1 else 'differ'} "
                 f"({', '.join(f'{v:.9f}' for v in sorted(same))})")
    print("\n".join(rows[-2:]), flush=True)

    nchw = (args.batch_size, 3, args.input_size, args.input_size)
    try:
        graph = alternate({"dynamic graph": lambda: step_speed(vision_model(args.arch), nchw, args.steps)[0],
                           "to_static": lambda: step_speed(vision_model(args.arch), nchw, args.steps, static=True)[0]},
                          args.repeats)
        rows.append(row(what, graph, *graph, "img/s", higher_is_better=True))
    except Exception as exc:  # report and go on: the other measurements stand
        notes.append(f"to_static: failed: {type(exc).__name__}: {str(exc)[:200]}")

    nhwc = (args.batch_size, args.input_size, args.input_size, 3)
    layouts = alternate({"NCHW": lambda: step_speed(lambda: inverted_residuals("NCHW"), nchw, args.steps)[0],
                         "NHWC": lambda: step_speed(lambda: inverted_residuals("NHWC"), nhwc, args.steps)[0]},
                        args.repeats)
    rows.append(row(f"training step, 4 inverted-residual blocks, {args.input_size} px, batch {args.batch_size}",
                    layouts, *layouts, "img/s", higher_is_better=True))
    from paddle_tl.runtime import import_paddle
    paddle = import_paddle()
    notes.append(f"bfloat16 on this CPU: paddle.amp.is_bfloat16_supported('cpu') = "
                 f"{paddle.amp.is_bfloat16_supported('cpu')}; float16: {paddle.amp.is_float16_supported('cpu')}")

    print(f"\n{os.cpu_count()} cores, paddle {paddle.__version__}; {args.repeats} alternating repeats; load average "
          f"{load:.2f} at start, {os.getloadavg()[0]:.2f} at end; {time.time() - started:.0f} s\n")
    print("| option | before | after | gain | runs (before; after) |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
