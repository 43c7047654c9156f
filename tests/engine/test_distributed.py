"""Data-parallel training with `paddle.distributed.launch` on CPU (gloo):
two processes with batch B each train like one process with batch 2B."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine.train import train
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # two training processes


def test_two_processes_train_like_one_with_the_global_batch(colour_folder, tmp_path, shared_dir):
    # 11 per class: one of each is held out for validation, 30 train in one batch or two halves.
    train_root, val_root = colour_folder(tmp_path / "train", 11, 0), colour_folder(tmp_path / "val", 4, 1)
    pretrained = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"  # features that learn

    def overrides(run, batch_size, learning_rate):
        # Linear probe on images with deterministic preprocessing: frozen BatchNorm and
        # no random crops make a batch's gradient independent of how it is split.
        return [f"Global.output_dir={run}", "Global.epochs=3", "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}",
                "Arch.input_size=64", f"Arch.pretrained={pretrained}", "Transfer.strategy=linear_probe",
                "Transfer.cache_features=false", f"DataLoader.Train.dataset.root={train_root}",
                f"DataLoader.Eval.dataset.root={val_root}", f"DataLoader.Train.batch_size={batch_size}",
                "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0", "DataLoader.Eval.batch_size=8",
                "DataLoader.Train.augment.crop_scale=[1.0, 1.0]", "DataLoader.Train.augment.hflip=false",
                f"Optimizer.lr.learning_rate={learning_rate}"]

    single = train(load_config(None, overrides(tmp_path / "single", 30, 0.002)))

    config = tmp_path / "parallel.yaml"
    load_config(None, overrides(tmp_path / "parallel", 15, 0.001)).save(config)  # lr x2 by the scaling rule
    launch = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
         str(tmp_path / "logs"), str(REPO / "tools" / "train.py"), "-c", str(config)],
        capture_output=True, text=True, env=dict(os.environ, HOME=str(tmp_path)), timeout=300)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("workerlog.*")}
    assert launch.returncode == 0, launch.stdout[-2000:] + "".join(logs.values())[-3000:]
    assert sorted(logs) == ["workerlog.0", "workerlog.1"]
    assert "learning rate scaled 2x to 0.002" in logs["workerlog.0"] and "done:" in logs["workerlog.0"]
    assert "Traceback" not in logs["workerlog.1"] and "done:" not in logs["workerlog.1"]  # rank 1 writes nothing

    parallel = json.loads((tmp_path / "parallel" / "metrics.json").read_text())
    assert parallel["processes"] == 2 and parallel["epochs_run"] == 3
    assert [r["eval_top1"] for r in parallel["history"]] == [r["eval_top1"] for r in single["history"]]
    assert single["history"][-1]["train_loss"] < 0.9 * single["history"][0]["train_loss"]  # it did learn
    a = paddle.load(str(tmp_path / "single" / "latest.pdparams"))
    b = paddle.load(str(tmp_path / "parallel" / "latest.pdparams"))
    for key in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    assert not any(p.is_dir() and p.name.startswith("parallel.") for p in tmp_path.iterdir())  # none moved aside
