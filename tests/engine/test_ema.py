"""The weight average (Global.ema_decay, engine/ema.py): the hand-computed
average of a few real steps, what evaluation and the checkpoints hold, and a
resume that continues the same average."""

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine.ema import WeightAverage
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
Callback = paddle.callbacks.Callback


def _numpy(network):
    return {key: value.numpy().copy() for key, value in network.state_dict().items()}


class _Snapshots(Callback):
    """The network's weights after every step, and at the end of the epoch."""

    def __init__(self, network):
        super().__init__()
        self.network, self.steps, self.at_epoch_end = network, [], None

    def on_train_batch_end(self, step, logs=None):
        self.steps.append(_numpy(self.network))

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end = _numpy(self.network)


def _fit_tiny(decay):
    """A Linear + BatchNorm network fitted for 4 steps with a WeightAverage
    first, as training places it; returns (network, average, snapshots, start)."""
    paddle.seed(0)
    network = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3))
    start = _numpy(network)
    rng = np.random.RandomState(0)
    data = paddle.io.TensorDataset([paddle.to_tensor(rng.standard_normal((16, 4)).astype("float32")),
                                    paddle.to_tensor(rng.randint(0, 3, (16, 1)).astype("int64"))])
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.SGD(0.5, parameters=network.parameters()), paddle.nn.CrossEntropyLoss())
    average, snapshots = WeightAverage(network, decay, evaluates=lambda epoch: True), _Snapshots(network)
    model.fit(data, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[average, snapshots])
    return network, average, snapshots, start


def test_the_average_is_the_hand_computed_one_and_evaluation_sees_it():
    decay = 0.25
    network, average, snapshots, start = _fit_tiny(decay)
    assert len(snapshots.steps) == 4
    expected = dict(start)
    for t, weights in enumerate(snapshots.steps):
        d = min(decay, (1 + t) / (10 + t))  # the ramp 0.1, 0.18, then the decay 0.25, 0.25
        expected = {key: d * expected[key] + (1 - d) * weights[key] for key in expected}
    assert average.updates == 4
    # The BatchNorm statistics are averaged too: they moved, and with them the average.
    assert not np.allclose(snapshots.steps[-1]["1._mean"], start["1._mean"])
    for key, value in expected.items():
        np.testing.assert_allclose(average.average[key].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=key)
        # From the epoch's end the network holds the average (what is scored and saved as best_model) ...
        np.testing.assert_allclose(snapshots.at_epoch_end[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        # ... and once training ends, the raw weights again.
        np.testing.assert_array_equal(network.state_dict()[key].numpy(), snapshots.steps[-1][key])


def test_decay_zero_averages_nothing():
    network, average, snapshots, _ = _fit_tiny(0.0)
    for key, value in snapshots.steps[-1].items():
        np.testing.assert_array_equal(snapshots.at_epoch_end[key], value)
        np.testing.assert_array_equal(average.average[key].numpy(), value)


def test_decay_must_be_below_one():
    with pytest.raises(ConfigError, match=r"^Global.ema_decay: must be in \[0, 1\)"):
        load_config(None, ["Global.ema_decay=1"])
    assert load_config(None, ["Global.ema_decay=0"]).Global.ema_decay == 0


# ---------------------------------------------------------------- in training

@pytest.fixture(scope="module")
def folders(tmp_path_factory, colour_folder):
    base = tmp_path_factory.mktemp("ema")
    return colour_folder(base / "train", 8, 0), colour_folder(base / "val", 3, 1)


def _cfg(folders, run, *overrides):
    train_root, val_root = folders
    return load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=3", "Global.seed=3", "Global.device=cpu",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64", "Arch.pretrained=false",
        "Transfer.strategy=full", f"DataLoader.Train.dataset.root={train_root}",
        f"DataLoader.Eval.dataset.root={val_root}", "DataLoader.Train.batch_size=8",
        "DataLoader.Train.num_workers=0", "DataLoader.Eval.batch_size=8", "DataLoader.Eval.num_workers=0",
        "Optimizer.lr.learning_rate=0.05", *overrides])


def _weights(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.mark.slow
def test_decay_zero_is_off(folders, tmp_path, monkeypatch):
    """0 is off: training builds no average at all, so it runs exactly as
    without the key (two CPU runs cannot be compared bit for bit: oneDNN's
    float sums are not reproducible)."""
    from paddle_tl.engine import train as training

    def refuse(*args, **kwargs):
        raise AssertionError("an average was built for ema_decay=0")

    monkeypatch.setattr(training, "WeightAverage", refuse)
    metrics = train(_cfg(folders, tmp_path / "zero", "Global.epochs=1", "Global.ema_decay=0"))
    assert metrics["ema_decay"] is None
    assert not (tmp_path / "zero" / "latest.ema.pdparams").exists()


@pytest.mark.slow
def test_resume_continues_the_same_average(folders, tmp_path, train_killed_after):
    ema = "Global.ema_decay=0.8"
    straight = train(_cfg(folders, tmp_path / "straight", ema))
    train_killed_after(_cfg(folders, tmp_path / "killed", ema), epoch=2)
    resumed = train(_cfg(folders, tmp_path / "killed", ema, f"Global.resume={tmp_path / 'killed'}"))
    assert straight["ema_decay"] == resumed["ema_decay"] == 0.8
    assert [row["eval_top1"] for row in resumed["history"]] == [row["eval_top1"] for row in straight["history"]]
    for name in ("latest.pdparams", "latest.ema.pdparams", "best_model.pdparams"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "killed" / name)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    # latest holds the raw weights that training goes on from, the average beside them.
    raw, average = _weights(tmp_path / "straight" / "latest.pdparams"), \
        _weights(tmp_path / "straight" / "latest.ema.pdparams")
    assert any(not np.allclose(raw[key], average[key]) for key in raw)
    if straight["best_epoch"] == 3:  # best_model is the average of that epoch
        best = _weights(tmp_path / "straight" / "best_model.pdparams")
        for key in best:
            np.testing.assert_array_equal(best[key], average[key], err_msg=key)
