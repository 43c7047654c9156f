"""paddle_tl's linear probe beside the textbook one, on every data set at
hand, in one run (issue 22 item 1).

Per data set:
- paddle_tl: `train()` with the shipped config and
  Transfer.strategy=linear_probe, as a user runs it; Eval top-1 of
  best_model (metrics' best_top1) and the epoch it comes from.
- textbook: the probe transfer studies report (Kornblith et al., CVPR 2019)
  on the same frozen network's features: the plain evaluation view (resize
  the short side to 256, centre crop 224: MobileNetV2's spec, the same
  crop) of every training image (paddle_tl's training + validation split),
  pooled by the network and computed by paddle_tl's own feature cache in
  the run above (captured, not recomputed); standardised; scikit-learn's
  LogisticRegression with C chosen from {0.001, 0.003, 0.01, 0.03, 0.1} on
  a stratified 10% split (random_state 0), then refit on all training
  images.
- with --ablate: paddle_tl's solve (transfer/logistic.py) on the same
  captured features, one change at a time, to show where a difference goes.

Data sets: ants/bees (configs/mobilenet_v2_imagefolder.yaml), elpv binary
and four-class (configs/quickstart.yaml), and scikit-learn's 8x8 digits
(1,797 images, 10 classes, written as an image folder, 70/30 stratified
train/Eval split, random_state 0; configs/mobilenet_v2_imagefolder.yaml).

    python bench/probe_vs_sklearn.py [--data ants elpv elpv4 digits] [--ablate]

About 8 minutes on 2 CPU cores, nearly all of it the four runs' feature
caches. The result: docs/strategies.md#the-linear-probe-against-the-textbook-one.
"""

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine import fit as fit_module  # noqa: E402
from paddle_tl.engine import train as train_module  # noqa: E402
from paddle_tl.engine.train import train  # noqa: E402
from paddle_tl.transfer import logistic  # noqa: E402

ANTS = REPO.parent / "shared" / "datasets" / "hymenoptera"
GRID = (0.001, 0.003, 0.01, 0.03, 0.1)  # the textbook probe's C
ELPV = "configs/quickstart.yaml"
FOLDER = "configs/mobilenet_v2_imagefolder.yaml"


def _digits_folder(root):
    """scikit-learn's digits as an image folder (8x8 grey, 0..16, upscaled
    to 64 px by nearest neighbour): train/ and eval/, stratified 70/30."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    split = train_test_split(np.arange(len(digits.target)), test_size=0.3, stratify=digits.target, random_state=0)
    for side, indices in zip(("train", "eval"), split):
        for i in indices:
            folder = root / side / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype("uint8")
            Image.fromarray(pixels).resize((64, 64), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
    return [f"DataLoader.Train.dataset.root={root / 'train'}", f"DataLoader.Eval.dataset.root={root / 'eval'}"]


DATA = {
    "ants": (FOLDER, lambda tmp: [f"DataLoader.Train.dataset.root={ANTS / 'train'}",
                                  f"DataLoader.Eval.dataset.root={ANTS / 'val'}"]),
    "elpv": (ELPV, lambda tmp: []),
    "elpv4": (ELPV, lambda tmp: ["DataLoader.Train.dataset={name: elpv, label_mode: four_class}",
                                 "DataLoader.Eval.dataset={name: elpv, label_mode: four_class}"]),
    "digits": (FOLDER, lambda tmp: _digits_folder(tmp / "digits-images")),
}


def paddle_probe(name, tmp, extra):
    """(metrics, captured): paddle_tl's linear probe as a user runs it, and
    the features its cache computed (training views, validation, Eval)."""
    config, overrides = DATA[name]
    captured = {}
    original = fit_module.cached_datasets

    def capturing(*args, **kwargs):
        train_data, plain, head, size = original(*args, **kwargs)
        captured.update(train=train_data, eval=plain[0], val=plain[1] if len(plain) > 1 else None)
        return train_data, plain, head, size

    fit_module.cached_datasets = capturing
    train_module.write_report = lambda run_dir: run_dir  # the HTML report is not measured
    try:
        cfg = load_config(REPO / config, [f"Global.output_dir={tmp / name}", "Transfer.strategy=linear_probe",
                                          *overrides(tmp), *extra])
        metrics = train(cfg)
    finally:
        fit_module.cached_datasets = original
    return metrics, captured


def _xy(features):
    return features.views[0].astype("float32"), np.asarray(features.labels).reshape(-1)


def textbook(x, y, ex, ey, scale=True):
    """(Eval top-1, chosen C) of the textbook probe on all training images (x, y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c):
        return make_pipeline(*([StandardScaler()] if scale else []), LogisticRegression(C=c, max_iter=5000))

    tx, vx, ty, vy = train_test_split(x, y, test_size=0.1, stratify=y, random_state=0)
    scores = [model(c).fit(tx, ty).score(vx, vy) for c in GRID]
    c = GRID[int(np.argmax(scores))]  # the first of equals: the strongest penalty
    return model(c).fit(x, y).score(ex, ey), c


def _top1(weight, bias, x, y):
    return float(((x @ weight + bias).argmax(axis=1) == y).mean())


OLD_STRENGTHS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)  # main's, on the mean loss, any n


def ablations(captured, num_classes):
    """{arm: (Eval top-1, C chosen)}: paddle_tl's solve on the captured
    features, each arm one change from the arm above it."""
    views = [view.astype("float32") for view in captured["train"].views]
    ty = np.asarray(captured["train"].labels).reshape(-1)
    vx, vy = _xy(captured["val"])
    ex, ey = _xy(captured["eval"])
    all_x, all_y = np.concatenate([views[0], vx]), np.concatenate([ty, vy])
    arms = {}

    def solve(x, y, weights=None, strengths=OLD_STRENGTHS, refit=False, iterations=logistic.ITERATIONS):
        w, b, record = logistic.solve_head(x, y, vx, vy, num_classes, weights, strengths=strengths,
                                           iterations=iterations)
        c = 1 / (len(x) * record["strength"])  # per sample of what it was fitted on
        if refit:
            w, b = logistic.refit_head(all_x, all_y, c, num_classes, weights)
        return _top1(w, b, ex, ey), c

    n = len(ty)
    arms["solved start alone: every cached view, 90%, strengths 1..1e-4 (main's start)"] = solve(
        np.concatenate(views), np.tile(ty, len(views)))
    arms["plain view only"] = solve(views[0], ty)
    arms["plain view only, 1000 L-BFGS iterations per strength (not 100)"] = solve(views[0], ty, iterations=1000)
    arms["plain view, refit on train+val at the chosen C"] = solve(views[0], ty, refit=True)
    counts = np.bincount(all_y, minlength=num_classes)
    inverse = (len(all_y) / (num_classes * np.maximum(counts, 1))).tolist()  # Loss.class_weights=balanced's
    arms["... + inverse-frequency class weights"] = solve(views[0], ty, inverse, refit=True)
    arms["plain, refit, strengths = the textbook's C grid 0.001..0.1"] = solve(
        views[0], ty, strengths=logistic.strengths_for(n, GRID), refit=True)
    if hasattr(logistic, "C_GRID"):
        arms["plain, refit, strengths = C_GRID 0.0003..0.3 (the fix)"] = solve(
            views[0], ty, strengths=logistic.strengths_for(n), refit=True)
    arms["textbook without standardising"] = (textbook(all_x, all_y, ex, ey, scale=False)[0], None)
    return arms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=list(DATA), default=list(DATA))
    parser.add_argument("--ablate", action="store_true", help="paddle_tl's solve one change at a time")
    parser.add_argument("-o", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    if args.ablate and "strengths_for" not in dir(logistic):
        parser.error("--ablate needs transfer/logistic.py's strengths_for and refit_head")
    print(f"solve_head{inspect.signature(logistic.solve_head)}")
    rows, tables = [], {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for name in args.data:
            started = time.time()
            metrics, captured = paddle_probe(name, tmp, args.overrides)
            seconds = time.time() - started
            all_x = np.concatenate([_xy(captured["train"])[0], _xy(captured["val"])[0]])
            all_y = np.concatenate([_xy(captured["train"])[1], _xy(captured["val"])[1]])
            ex, ey = _xy(captured["eval"])
            ours = metrics["best_top1"]
            theirs, c = textbook(all_x, all_y, ex, ey)
            init = metrics["strategy"].get("head_init") or {}
            rows.append((name, len(all_y), len(ey), ours, metrics["best_epoch"], init.get("C"), theirs, c, seconds))
            if args.ablate:
                classes = int(max(all_y.max(), ey.max()) + 1)
                tables[name] = {"paddle_tl as run (best epoch)": (ours, init.get("C")),
                                **ablations(captured, classes), "textbook": (theirs, c)}
            print(f"[{name}] paddle_tl {ours:.4f} (epoch {metrics['best_epoch']}), textbook {theirs:.4f} "
                  f"(C {c:g}), {seconds:.0f} s", flush=True)
    print("\n| data | training images | Eval images | paddle_tl linear probe | best epoch | "
          "its C | textbook probe | its C | paddle_tl - textbook (points) | run s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, n, m, ours, epoch, strength, theirs, c, seconds in rows:
        print(f"| {name} | {n} | {m} | {ours:.4f} | {epoch} | {'' if strength is None else f'{strength:.3g}'} | "
              f"{theirs:.4f} | {c:g} | {100 * (ours - theirs):+.1f} | {seconds:.0f} |")
    if tables:
        names = list(tables)
        print("\n| arm (Eval top-1; C chosen) | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for arm in tables[names[0]]:
            cells = []
            for name in names:
                top1, chosen = tables[name].get(arm, (None, None))
                cells.append("" if top1 is None else f"{top1:.4f}" + ("" if chosen is None else f" ({chosen:.3g})"))
            print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
