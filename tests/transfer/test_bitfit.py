"""Transfer.strategy=bitfit: of the body only the biases and normalisation
parameters train, beside the head; every other body weight stays exactly as
pretrained."""

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.models.zoo import build_model, get_spec, stage_index
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.freezing import body_weights_kept

paddle = import_paddle()


def test_bitfit_keeps_every_body_weight_but_biases_and_normalisation():
    spec = get_spec("mobilenet_v1")
    network = build_model("mobilenet_v1", 3, scale=0.25)
    kept = body_weights_kept(network, spec)
    names = [name for name, _ in network.named_parameters()]
    assert "conv1.0.weight" in kept and "conv1.1.weight" not in kept  # the stem's conv and its BatchNorm
    assert "conv1.1.bias" not in kept and not any(name.startswith("fc.") for name in kept)
    assert all(stage_index(spec, name) is not None for name in kept) and len(kept) < len(names)


@pytest.mark.slow
def test_bitfit_trains_exactly_the_parameters_it_names(colour_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
    paddle.seed(4)
    pretrained = tmp_path / "pretrained.pdparams"
    paddle.save(paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=1000).state_dict(), str(pretrained))
    run = tmp_path / "run"
    metrics = train(load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=2", "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}",
        "Arch.input_size=32", f"Arch.pretrained={pretrained}", "Transfer.strategy=bitfit",
        f"DataLoader.Train.dataset.root={colour_folder(tmp_path / 'train', 8, 0)}",
        f"DataLoader.Eval.dataset.root={colour_folder(tmp_path / 'val', 2, 1)}", "DataLoader.Train.batch_size=8",
        "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0", "Optimizer.lr.learning_rate=0.1"]))
    assert metrics["strategy"]["strategy"] == "bitfit"
    before = {k: v.numpy() for k, v in paddle.load(str(pretrained)).items()}
    after = {k: v.numpy() for k, v in paddle.load(str(run / "latest.pdparams")).items()}
    spec = get_spec("mobilenet_v1")
    network = build_model("mobilenet_v1", 3, scale=0.25)
    kept = body_weights_kept(network, spec)
    for name in kept:
        assert np.array_equal(before[name], after[name]), f"{name} trained"
    statistics = {name for name in after if name.endswith(("._mean", "._variance"))}
    trained = [name for name, param in network.named_parameters() if name not in kept and name not in statistics]
    body_trained = [name for name in trained if stage_index(spec, name) is not None]
    changed = [name for name in body_trained if not np.array_equal(before[name], after[name])]
    assert body_trained and len(changed) >= 0.9 * len(body_trained)
    assert metrics["trainable_params"] == sum(int(np.prod(after[name].shape)) for name in trained)
    assert metrics["frozen_params"] == sum(int(np.prod(after[name].shape)) for name in kept)
