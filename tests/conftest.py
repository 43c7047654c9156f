"""Shared fixtures: the ../shared data folder, tiny generated datasets, and a
private HOME (paddle and VisualDL write caches under it)."""

from pathlib import Path
from types import SimpleNamespace

import shutil

import numpy as np
import pytest
from PIL import Image

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_dir():
    """../shared beside the checkout (weights and datasets); skips without it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder {SHARED_DIR} is absent (it sits beside the checkout in CI)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def chromium():
    """The path of a Chromium (or Chrome) binary for the page tests; skips
    without one (.ci/run installs Debian's `chromium`, so CI runs them)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium binary on PATH (Debian: apt-get install chromium)")


@pytest.fixture
def tiny_image_folder(tmp_path):
    """Factory: make_folder(name="data", classes=("cat", "dog", "fox"), per_class=6,
    size=(48, 40)) -> Path of root/<class>/<images>, alternating PNG and JPEG,
    each image one random colour (the same for the same arguments)."""

    def make_folder(name="data", classes=("cat", "dog", "fox"), per_class=6, size=(48, 40)):
        rng = np.random.RandomState(0)
        root = tmp_path / name
        for class_name in classes:
            (root / class_name).mkdir(parents=True)
            for i in range(per_class):
                colour = tuple(int(v) for v in rng.randint(0, 256, size=3))
                suffix = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", size, colour).save(root / class_name / f"{class_name}_{i}.{suffix}")
        return root

    return make_folder


def colour_images(root, per_class, seed, classes=("red", "green", "blue")):
    """Square images, each class a noisy version of its own colour: learnable
    in a few steps."""
    rng = np.random.RandomState(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.full((72, 72, 3), 40, dtype=np.float64)
            base[..., index] = 200
            noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def colour_folder():
    """colour_folder(root, per_class, seed) -> root of red/green/blue class folders."""
    return colour_images


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


@pytest.fixture
def train_killed_after():
    """train_killed_after(cfg, epoch): train `cfg`, dying right after the
    checkpoint of `epoch` is written (a resume then continues from it)."""
    from paddle_tl.engine import callbacks
    from paddle_tl.engine.train import train

    def run(cfg, epoch):
        save = callbacks.Checkpointer.on_recorded

        def save_then_die(self, row, improved):
            save(self, row, improved)
            if row["epoch"] == epoch:
                raise Killed

        # A patch of its own: undoing the test's monkeypatch would also undo its private HOME.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(callbacks.Checkpointer, "on_recorded", save_then_die)
            with pytest.raises(Killed):
                train(cfg)

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real 1-epoch run (random mobilenet_v1 x0.25 at 64 px, red/green/blue
    images), trained once for the session: its folder, Eval images and
    config.yaml, for the tests of eval and export from a run folder."""
    from paddle_tl.config import load_config
    from paddle_tl.engine.train import train

    base = tmp_path_factory.mktemp("trained_run")
    val = colour_images(base / "val", 4, 1)
    overrides = [
        f"Global.output_dir={base / 'run'}", "Global.epochs=1", "Global.seed=5", "Global.device=cpu",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64", "Arch.pretrained=false",
        "Transfer.strategy=full", f"DataLoader.Train.dataset.root={colour_images(base / 'train', 6, 0)}",
        f"DataLoader.Eval.dataset.root={val}", "DataLoader.Train.batch_size=6", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.batch_size=6", "DataLoader.Eval.num_workers=0", "Optimizer.lr.learning_rate=0.05"]
    # Session fixtures run before the per-test private HOME: give training its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        metrics = train(load_config(None, overrides))
    run = base / "run"
    return SimpleNamespace(dir=run, val=val, config=run / "config.yaml", best=run / "best_model", metrics=metrics,
                           input_size=64)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, colour_folder):
    """Train/val folders and an 'ImageNet' mobilenet_v1 x0.25 checkpoint whose
    BatchNorm statistics are far from (0, 1), so any drift shows (the
    engine's tests: tests/engine/test_train.py make_cfg)."""
    from paddle_tl.runtime import import_paddle
    paddle = import_paddle()
    base = tmp_path_factory.mktemp("train")
    paddle.seed(1)
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=1000)
    rng = np.random.RandomState(1)
    for layer in network.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._mean.set_value(rng.uniform(-0.2, 0.2, layer._mean.shape).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, layer._variance.shape).astype("float32"))
    pretrained = base / "pretrained.pdparams"
    paddle.save(network.state_dict(), str(pretrained))
    return {"train": colour_folder(base / "train", 10, 0), "val": colour_folder(base / "val", 4, 1),
            "pretrained": pretrained, "base": base}
