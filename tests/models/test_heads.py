"""Arch.head: the MLP head in place of the architecture's Linear head, from
the config through cached-feature training to an export with parity, and
rebuilt from the checkpoint's record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from paddle_tl.config import load_config
from paddle_tl.deploy.export import export
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.models.heads import MLPHead, build_network
from paddle_tl.models.zoo import get_spec, stage_index
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_builds_the_classic_frozen_resnet50_with_an_mlp_head():
    cfg = load_config(REPO / "configs" / "resnet50_mlp_head.yaml", ["Arch.pretrained=false"])
    spec = get_spec(cfg.Arch.name)
    network = build_network(spec, 3, cfg.Arch.kwargs, vars(cfg.Arch.head))
    head = network.fc
    assert isinstance(head, MLPHead) and cfg.Transfer.strategy == "linear_probe"
    layers = list(head.children())
    assert [type(layer).__name__ for layer in layers] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert layers[0].weight.shape == [2048, 512] and layers[3].weight.shape == [512, 3] and layers[2].p == 0.5
    # Every head parameter belongs to the head (never frozen, never loaded from ImageNet).
    assert all(stage_index(spec, name) is None for name, _ in head.named_parameters(prefix="fc"))


def test_head_settings_are_checked():
    with pytest.raises(ConfigError, match="Arch.head.dropout: must be in"):
        load_config(None, ["Arch.head.dropout=1.5"])
    with pytest.raises(ConfigError, match="Arch.head.hidden: must be a non-empty list"):
        load_config(None, ["Arch.head.hidden=[]"])
    # Users are refused this pair before a network is built (combinations.py, tests/test_combinations.py);
    # build_network itself only guards against a caller that skipped the check.
    with pytest.raises(ValueError, match="an mlp head replaces a single Linear head, and the head of squeezenet1_0 "
                                         "is _conv9"):
        build_network(get_spec("squeezenet1_0"), 3, {}, {"type": "mlp", "hidden": [8], "activation": "relu",
                                                       "dropout": 0.0})


@pytest.mark.slow
def test_mlp_head_trains_on_cached_features_exports_with_parity_and_is_rebuilt(colour_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
    train_root, val_root = colour_folder(tmp_path / "train", 8, 0), colour_folder(tmp_path / "val", 3, 1)
    run = tmp_path / "run"
    metrics = train(load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=2", "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}",
        "Arch.input_size=32", "Arch.pretrained=false", "Arch.head.type=mlp", "Arch.head.hidden=[16]",
        "Transfer.strategy=linear_probe", f"DataLoader.Train.dataset.root={train_root}",
        f"DataLoader.Eval.dataset.root={val_root}", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.num_workers=0"]))
    assert metrics["strategy"]["cached_features"] and metrics["trainable_params"] == 256 * 16 + 16 + 16 * 3 + 3
    # Export from the run folder alone: the record rebuilds the MLP head; parity is checked inside.
    out = tmp_path / "inference"
    cfg = load_config(run / "config.yaml", [f"Global.pretrained_model={run / 'best_model'}",
                                            f"Global.save_inference_dir={out}"])
    export(cfg)
    assert yaml.safe_load((out / "inference.yml").read_text())["num_classes"] == 3
    result = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), str(run)], capture_output=True,
                            text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(metrics["best_top1"])
    with pytest.raises(ConfigError, match="Arch.head: .* contradicts the run"):
        export(load_config(run / "config.yaml", [f"Global.pretrained_model={run / 'best_model'}",
                                                 f"Global.save_inference_dir={tmp_path / 'other'}",
                                                 "Arch.head.type=linear"]))
