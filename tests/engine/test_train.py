"""Real short fine-tunes on tiny generated data: the run folder, freezing that
really freezes (parameters and BatchNorm statistics), cached features,
resume, early stopping, the NaN policy, duplicate and disk-space checks, and
per-stage learning rates."""

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_tl.config import load_config
from paddle_tl.data.datasets import ClassificationDataset
from paddle_tl.deploy.export import export
from paddle_tl.engine import callbacks
from paddle_tl.engine.evaluate import evaluate
from paddle_tl.engine.model import GuardedModel
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError, DiskFullError, UserError
from paddle_tl.models.zoo import get_spec, stage_index
from paddle_tl.runs.checkpoint import load_state, save_checkpoint
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.freezing import set_frozen_stages, trainable_parameters
from paddle_tl.transfer.plan import plan_transfer

paddle = import_paddle()
REPO = Path(__file__).resolve().parents[2]
CLASSES = ("red", "green", "blue")


def make_cfg(workspace, run, *overrides):
    return load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=2", "Global.seed=7", "Global.log_interval=1",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64",
        f"Arch.pretrained={workspace['pretrained']}",
        "DataLoader.Train.dataset.root=" + str(workspace["train"]),
        "DataLoader.Eval.dataset.root=" + str(workspace["val"]),
        "DataLoader.Train.batch_size=8", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.batch_size=8", "DataLoader.Eval.num_workers=0",
        "Optimizer.lr.learning_rate=0.05", *overrides])


def _weights(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.mark.slow
def test_partial_finetune_freezes_bottom_stages_exactly(workspace, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Transfer.strategy=partial", "Transfer.freeze_stages=3"))
    spec = get_spec("mobilenet_v1")
    before, after = _weights(workspace["pretrained"]), _weights(run / "latest.pdparams")
    frozen = [k for k in after if (i := stage_index(spec, k)) is not None and i < 3]
    trainable_bn = [k for k in after if k.endswith("._mean") and stage_index(spec, k) >= 3]
    assert frozen and trainable_bn
    for key in frozen:  # weights, BN affine parameters and BN running statistics alike
        assert np.array_equal(before[key], after[key]), f"frozen {key} changed"
    for key in trainable_bn:
        assert not np.array_equal(before[key], after[key]), f"trainable stage's BN statistic {key} did not move"
    for name in [k for k in after if not k.endswith(("_mean", "_variance"))]:
        if name not in frozen and name in before and before[name].shape == after[name].shape:
            assert not np.array_equal(before[name], after[name]), f"trainable {name} did not change"

    assert metrics["strategy"]["strategy"] == "partial" and metrics["strategy"]["frozen_stages"] == 3
    assert not metrics["strategy"]["cached_features"]
    on_disk = json.loads((run / "metrics.json").read_text())
    for key in ("best_top1", "final_top1", "epochs_run", "train_seconds", "num_classes", "class_names", "strategy"):
        assert key in on_disk
    assert on_disk["class_names"] == sorted(CLASSES) and on_disk["epochs_run"] == 2
    for name in ("best_model.pdparams", "latest.pdparams", "latest.pdopt", "latest.state.json", "config.yaml"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml").Arch.num_classes == 3

    from visualdl import LogReader
    reader = LogReader(file_path=str(next((run / "vdl").glob("vdlrecords.*.log"))))
    tags = set(reader.get_tags()["scalar"])
    assert {"train/loss", "train/top1", "train/lr", "eval/loss", "eval/top1", "train_step/loss"} <= tags
    assert len(reader.get_data("scalar", "eval/top1")) == 2


@pytest.mark.slow
def test_epoch_throughput_counts_training_steps_only(workspace, tmp_path, monkeypatch):
    """A fake clock: every training step takes 1 s, every evaluation step
    1000 s. train_seconds must see the training steps and nothing else."""
    now = [0.0]
    adapter = paddle.hapi.model.DynamicGraphAdapter
    train_batch, eval_batch = adapter.train_batch, adapter.eval_batch

    def timed(method, seconds):
        def run(*args, **kwargs):
            now[0] += seconds
            return method(*args, **kwargs)
        return run

    monkeypatch.setattr(callbacks, "perf_counter", lambda: now[0])
    monkeypatch.setattr(adapter, "train_batch", timed(train_batch, 1.0))
    monkeypatch.setattr(adapter, "eval_batch", timed(eval_batch, 1000.0))
    run = tmp_path / "run"
    train(make_cfg(workspace, run, "Transfer.strategy=partial"))

    history = json.loads((run / "metrics.json").read_text())["history"]
    steps = -(-27 // 8)  # 27 training images (3 of 30 held out for validation) in batches of 8
    assert [(row["train_seconds"], row["train_images_per_second"]) for row in history] == [(steps, 27 / steps)] * 2
    from visualdl import LogReader
    reader = LogReader(file_path=str(next((run / "vdl").glob("vdlrecords.*.log"))))
    assert [r.value for r in reader.get_data("scalar", "train/images_per_second")] == [27 / steps] * 2


class Prepared(Exception):
    pass


@pytest.mark.parametrize("amp, level", [("true", "O1"), ("O1", "O1"), ("O2", "O2"), ("false", None)])
def test_amp_setting_reaches_model_prepare_on_a_gpu(workspace, tmp_path, monkeypatch, amp, level):
    """The GPU path without a GPU: select_device pretends to find one, and
    training stops where paddle.Model is prepared."""
    import paddle_tl.engine.train as train_module
    seen = {}

    def prepare(self, *args, **kwargs):
        seen.update(kwargs)
        raise Prepared

    monkeypatch.setattr(train_module, "select_device", lambda requested: "gpu")
    monkeypatch.setattr(paddle.Model, "prepare", prepare)
    with pytest.raises(Prepared):
        train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=partial", f"Global.amp={amp}"))
    assert seen["amp_configs"] == level


@pytest.mark.parametrize("level", ["O2", None])
def test_o2_evaluates_under_auto_cast(monkeypatch, level):
    """hapi evaluates outside auto_cast, where O2's float16 weights would meet
    float32 inputs; GuardedModel evaluates under O2's auto_cast (the float16
    kernels themselves need a GPU)."""
    entered = []
    auto_cast = paddle.amp.auto_cast

    def recording(enable=True, level="O1", **kwargs):
        entered.append((enable, level))
        return auto_cast(enable=False)

    model = GuardedModel(paddle.nn.Linear(4, 3), inputs=[paddle.static.InputSpec([None, 4], "float32", "x")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(paddle.optimizer.SGD(parameters=model.network.parameters()), paddle.nn.CrossEntropyLoss(),
                  amp_configs=level)
    monkeypatch.setattr(paddle.amp, "auto_cast", recording)
    model.eval_batch([np.ones((2, 4), "float32")], [np.zeros((2, 1), "int64")])
    assert entered == [(level == "O2", "O2")]


def test_o2_checkpoints_hold_float32_that_eval_and_export_load(workspace, tmp_path):
    """O2 casts the weights to float16 (paddle's own cast, as hapi's prepare
    calls it; BatchNorm stays float32); the checkpoint is float32, loads into
    the float32 network that eval and export build, and exports."""
    from paddle.amp.auto_cast import amp_initialize
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=3)
    network.set_state_dict({k: v for k, v in paddle.load(str(workspace["pretrained"])).items()
                            if not k.startswith("fc.")})
    amp_initialize([network], "float16", None)
    half = {k: v.numpy() for k, v in network.state_dict().items()}
    assert half["conv1.0.weight"].dtype == np.float16 and half["conv1.1._mean"].dtype == np.float32
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "best_model", network, state={"class_names": sorted(CLASSES)})

    saved = _weights(run / "best_model.pdparams")
    assert {v.dtype for v in saved.values()} == {np.dtype("float32")}
    for key, value in half.items():
        assert np.array_equal(saved[key], value.astype(np.float32)), key
    cfg = make_cfg(workspace, run, f"Global.pretrained_model={run / 'best_model'}",
                   f"Global.save_inference_dir={tmp_path / 'inference'}")
    export(cfg)  # loads best_model into a float32 network, exports, and checks parity
    assert evaluate(cfg)["top1"] >= 0


def test_amp_without_a_gpu_is_refused_before_training(workspace, tmp_path):
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"Global.amp=true cannot be combined with Global.device=auto \(found "
                                          r"cpu only\): mixed precision needs a GPU"):
        train(make_cfg(workspace, tmp_path / "run", "Global.amp=true"))  # Global.device=auto found only the CPU
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_to_static_trains_like_the_dynamic_graph_and_exports(workspace, tmp_path):
    """Global.to_static on CPU: the static graph trains what the dynamic one
    does (frozen stages and their BatchNorm statistics untouched), and its
    checkpoint exports."""
    common = ("Transfer.strategy=partial", "Transfer.freeze_stages=3", "Global.epochs=1")
    assert not train(make_cfg(workspace, tmp_path / "dynamic", *common))["to_static"]
    static, converted = tmp_path / "static", []
    to_static = paddle.jit.to_static

    def converting(layer, **kwargs):
        converted.append(to_static(layer, **kwargs))
        return converted[-1]

    with pytest.MonkeyPatch.context() as patch:  # its own: the test's monkeypatch holds the private HOME
        patch.setattr(paddle.jit, "to_static", converting)
        assert train(make_cfg(workspace, static, *common, "Global.to_static=true"))["to_static"]
    assert len(converted) == 1
    assert len(converted[0].forward.program_cache) == 2  # traced for training and for evaluation, and used

    spec = get_spec("mobilenet_v1")
    before, dynamic, traced = (_weights(workspace["pretrained"]), _weights(tmp_path / "dynamic" / "latest.pdparams"),
                               _weights(static / "latest.pdparams"))
    moved = 0
    for key, value in traced.items():
        index = stage_index(spec, key)
        if index is not None and index < 3:
            assert np.array_equal(value, before[key]), f"frozen {key} changed"
        elif key in before and value.shape == before[key].shape:
            moved += not np.array_equal(value, before[key])
        # measured here: bit-identical (the same CPU kernels)
        np.testing.assert_allclose(value, dynamic[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert moved > 20

    cfg = make_cfg(workspace, static, f"Global.pretrained_model={static / 'best_model'}",
                   f"Global.save_inference_dir={tmp_path / 'inference'}")
    export(cfg)  # with its parity check


@pytest.mark.slow
def test_linear_probe_on_cached_features_learns_and_matches_eval(workspace, tmp_path, shared_dir):
    run = tmp_path / "run"
    imagenet = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
    cfg = make_cfg(workspace, run, "Transfer.strategy=linear_probe", "Global.epochs=6",
                   "Optimizer.lr.learning_rate=0.5", f"Arch.pretrained={imagenet}")
    metrics = train(cfg)
    assert metrics["strategy"]["cached_features"] and metrics["trainable_params"] == 256 * 3 + 3
    assert metrics["best_top1"] >= 0.75  # colour classes; chance is 1/3
    before, after = _weights(imagenet), _weights(run / "best_model.pdparams")
    for key in after:
        if not key.startswith("fc."):
            assert np.array_equal(before[key], after[key]), f"frozen {key} changed"

    # The full network from best_model scores what the head scored on cached features.
    cfg.Global.pretrained_model = str(run / "best_model")
    assert evaluate(cfg)["top1"] == pytest.approx(metrics["best_top1"])


@pytest.mark.slow
def test_bn_train_keeps_weights_but_updates_statistics(workspace, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(workspace, run, "Transfer.strategy=linear_probe", "Transfer.bn=train", "Global.epochs=1"))
    before, after = _weights(workspace["pretrained"]), _weights(run / "latest.pdparams")
    assert np.array_equal(before["conv1.0.weight"], after["conv1.0.weight"])
    assert not np.array_equal(before["conv1.1._mean"], after["conv1.1._mean"])


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(workspace, tmp_path, train_killed_after):
    common = ("Global.epochs=3", "Transfer.strategy=partial", "Transfer.freeze_stages=4",
              "Optimizer.lr.warmup_epochs=1")
    straight = train(make_cfg(workspace, tmp_path / "straight", *common))
    train_killed_after(make_cfg(workspace, tmp_path / "killed", *common), epoch=2)
    resumed = train(make_cfg(workspace, tmp_path / "killed", *common, f"Global.resume={tmp_path / 'killed'}"))

    assert resumed["epochs_run"] == 3 and len(resumed["history"]) == 3
    assert [row["lr"] for row in resumed["history"]] == pytest.approx([row["lr"] for row in straight["history"]])
    a, b = _weights(tmp_path / "straight" / "latest.pdparams"), _weights(tmp_path / "killed" / "latest.pdparams")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_resume_with_more_epochs_restarts_the_schedule(workspace, tmp_path):
    run = tmp_path / "run"
    first = train(make_cfg(workspace, run, "Global.epochs=2", "Transfer.strategy=linear_probe"))
    more = train(make_cfg(workspace, run, "Global.epochs=4", "Transfer.strategy=linear_probe", f"Global.resume={run}"))
    assert first["history"][-1]["lr"] < 0.05
    # cosine over 2 epochs again (epoch 0 is the solved head, fit.SolvedStart)
    assert [row["lr"] for row in more["history"] if row["epoch"] > 2] == pytest.approx([0.05, 0.025])


@pytest.mark.slow
def test_resume_of_a_finished_run_is_refused(workspace, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(workspace, run, "Global.epochs=1", "Transfer.strategy=linear_probe"))
    with pytest.raises(ConfigError, match="already finished 1 of 1 epochs"):
        train(make_cfg(workspace, run, "Global.epochs=1", f"Global.resume={run}"))


@pytest.mark.slow
def test_early_stopping_stops_when_eval_stalls(workspace, tmp_path):
    metrics = train(make_cfg(workspace, tmp_path / "run", "Global.epochs=6", "Global.early_stopping_patience=1",
                             "Transfer.strategy=linear_probe", "Optimizer.lr.learning_rate=1e-12",
                             "Transfer.head_init=random"))  # epochs alone (no solved epoch 0 to beat)
    assert metrics["epochs_run"] == 2


def test_eval_interval_counts_run_epochs_and_always_scores_the_last():
    fresh = callbacks.EvalSchedule(2, callbacks.RunState(0, [], 5), epochs=5)
    assert [local for local in range(5) if local % fresh == 0] == [1, 3, 4]  # epochs 2, 4 and the last, 5
    resumed = callbacks.EvalSchedule(2, callbacks.RunState(0, [], 5, start_epoch=3), epochs=5)  # hapi's local epoch 0 is the run's epoch 4
    assert [local for local in range(2) if local % resumed == 0] == [0, 1]


@pytest.mark.slow
def test_eval_interval_run_evaluates_the_final_model(workspace, tmp_path):
    metrics = train(make_cfg(workspace, tmp_path / "run", "Global.epochs=3", "Global.eval_interval=2",
                             "Transfer.strategy=linear_probe", "Transfer.head_init=random"))  # epochs alone
    assert [("eval_top1" in row) for row in metrics["history"]] == [False, True, True]
    assert metrics["best_epoch"] in (2, 3)


def test_nan_loss_stops_with_a_clear_message(workspace, tmp_path):
    # The first step (lr 1e30) makes the weights huge; the next batch's
    # gradients, or its loss, are no longer finite.
    with pytest.raises(FloatingPointError, match=r"training (loss|gradients) became \S+ at epoch 1, step \d") as info:
        train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=full", "Optimizer.lr.learning_rate=1e30",
                       "Global.epochs=1"))
    assert isinstance(info.value, UserError) and "Global.nan_policy=skip" in str(info.value)  # one line on the CLI


def _poison(monkeypatch, path):
    """Every time the dataset loads `path`, its pixels are NaN."""
    getitem = ClassificationDataset.__getitem__

    def nan_for_the_poisoned_image(self, index):
        image, label = getitem(self, index)
        return (np.full_like(image, np.nan) if self.samples[index][0] == path else image), label

    monkeypatch.setattr(ClassificationDataset, "__getitem__", nan_for_the_poisoned_image)


@pytest.mark.slow
def test_nan_policy_skip_skips_the_poisoned_batch_and_finishes(workspace, tmp_path, monkeypatch, capsys):
    """One training image is NaN: each epoch, the one batch holding it makes no
    update; the rest train, and BatchNorm statistics stay finite. (The first
    BatchNorm, training, spreads the NaN over the batch; its ReLU turns it
    into 0 going forward, but the gradients are NaN.)"""
    _poison(monkeypatch, str(workspace["train"] / "red" / "0.png"))
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Global.nan_policy=skip", "Transfer.strategy=full", "Arch.input_size=32"))
    assert [row["skipped_batches"] for row in metrics["history"]] == [1, 1]
    assert metrics["skipped_batches"] == 2 and metrics["epochs_run"] == 2 and metrics["nan_policy"] == "skip"
    assert json.loads((run / "metrics.json").read_text())["skipped_batches"] == 2
    assert all(np.isfinite(row["train_loss"]) for row in metrics["history"])
    after = _weights(run / "latest.pdparams")
    assert all(np.isfinite(value).all() for value in after.values())  # running statistics included
    assert not np.array_equal(after["conv1.1._mean"], _weights(workspace["pretrained"])["conv1.1._mean"])  # trained
    assert "epoch 2: skipped 1 of 4 batches" in capsys.readouterr().out


def test_nan_policy_skip_stops_after_an_epoch_of_skipped_batches(workspace, tmp_path):
    """lr 1e30: after the first step every batch is non-finite and the weights
    no longer change; an epoch's worth (4 batches) in a row stops the run."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step 1: 4 batches in a row \(an epoch's worth\)"):
        train(make_cfg(workspace, run, "Global.nan_policy=skip", "Transfer.strategy=full",
                       "Optimizer.lr.learning_rate=1e30", "Global.epochs=3"))
    record = load_state(run / "latest")  # epoch 1 (3 of its 4 batches skipped) was saved whole
    assert record["epochs_done"] == 1 and record["history"][0]["skipped_batches"] == 3


def _step_state(model):
    """Copies of what a training step may change: parameters and BatchNorm
    statistics, optimizer state, the running training accuracy."""
    optimizer_state, accuracy = model.optimizer().state_dict(), model.metrics()[0]
    return ({key: value.numpy().copy() for key, value in model.network.state_dict().items()},
            {key: value.numpy().copy() for key, value in optimizer_state.items() if key != "LR_Scheduler"},
            (list(accuracy.total), list(accuracy.count)))


def _assert_same_state(a, b):
    for part_a, part_b in zip(a[:2], b[:2]):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert np.array_equal(part_a[key], part_b[key]), key  # bit for bit (NaN would fail)
    assert a[2] == b[2]


def test_a_non_finite_batch_leaves_the_model_bit_identical():
    """GuardedModel, one step at a time: a batch with a NaN loss, and one with a
    finite loss but NaN gradients, change no parameter, BatchNorm statistic,
    momentum or metric, and leave no gradient behind; a finite batch trains."""
    paddle.seed(0)
    # No ReLU: it would turn NaN into 0 and leave only the gradients NaN.
    network = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Flatten(),
                                   paddle.nn.Linear(4 * 6 * 6, 3))
    optimizer = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=network.parameters(), weight_decay=1e-4)
    model = GuardedModel(network, inputs=[paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    nan_gradients = []  # when set, the loss gains a term that is 0 with a NaN gradient

    def loss(logits, labels):
        value = paddle.nn.functional.cross_entropy(logits, labels)
        return value + paddle.sqrt(logits.sum() * 0.0) if nan_gradients else value  # d sqrt(0) = inf, x 0 = NaN

    model.prepare(optimizer, loss, paddle.metric.Accuracy())
    rng = np.random.RandomState(0)
    images, labels = rng.rand(4, 3, 8, 8).astype("float32"), np.array([[0], [1], [2], [0]], dtype="int64")
    model.train_batch([images], [labels])  # momentum exists from here on
    assert model.skipped_update is None
    before = _step_state(model)

    poisoned = images.copy()
    poisoned[0, :, 0, 0] = np.nan
    model.train_batch([poisoned], [labels])
    assert model.skipped_update == "training loss became nan"
    _assert_same_state(before, _step_state(model))

    nan_gradients.append(True)
    loss_value = model.train_batch([images], [labels])[0][0]
    assert np.isfinite(loss_value) and model.skipped_update == "training gradients became NaN/Inf"
    _assert_same_state(before, _step_state(model))
    assert all(p.grad is None or not p.grad.numpy().any() for p in network.parameters())

    nan_gradients.clear()
    model.train_batch([images], [labels])
    assert model.skipped_update is None
    after = _step_state(model)
    assert not np.array_equal(before[0]["3.weight"], after[0]["3.weight"])
    assert not np.array_equal(before[0]["1._mean"], after[0]["1._mean"])


@pytest.mark.slow
def test_eval_images_copied_from_training_are_reported(workspace, tmp_path, capsys):
    evaluation = tmp_path / "eval"
    shutil.copytree(workspace["val"], evaluation)
    copied = workspace["train"] / "green" / "3.png"
    shutil.copy(copied, evaluation / "green" / "copy.png")
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Global.epochs=1", "Transfer.strategy=linear_probe",
                             "Arch.input_size=32", f"DataLoader.Eval.dataset.root={evaluation}"))
    expected = {"count": 1, "pairs": [{"train": str(copied), "eval": str(evaluation / "green" / "copy.png")}]}
    assert metrics["data_warnings"]["duplicates_across_splits"] == expected
    assert json.loads((run / "metrics.json").read_text())["data_warnings"]["duplicates_across_splits"] == expected
    out = capsys.readouterr().out
    assert "warning: 1 evaluation images are byte-identical to training images" in out and str(copied) in out


def test_too_little_free_space_is_refused_before_training(workspace, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_disk_usage = shutil.disk_usage

    def nearly_full(path):
        usage = real_disk_usage(path)
        return usage._replace(free=5_000_000) if str(path) == str(run) else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    pattern = (rf"Global.output_dir: {re.escape(str(run))} has 5.0 MB free \(5,000,000 bytes\); this run's "
               r"checkpoints need about [\d.]+ MB \([\d,]+ bytes")
    with pytest.raises(DiskFullError, match=pattern):
        train(make_cfg(workspace, run, "Transfer.strategy=linear_probe"))
    assert not list(run.glob("*.pdparams")) and not (run / "vdl").exists()  # refused before any training


def test_o2_room_counts_the_optimizers_master_weights(tmp_path):
    from paddle_tl.runs.run_folder import require_free_space
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=3)
    state_bytes = sum(int(np.prod(t.shape)) * 4 for t in network.state_dict().values())  # all float32
    extra = require_free_space(tmp_path, network, master_weights=True) - require_free_space(tmp_path, network)
    assert extra == 2 * state_bytes  # in the old and the new latest.pdopt


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(workspace, tmp_path, monkeypatch):
    """ENOSPC while writing epoch 2's latest.pdopt (after its latest.pdparams
    was written): nothing is replaced, no temporary file is left, and the
    epoch-1 checkpoint loads and resumes."""
    run = tmp_path / "run"
    common = ("Global.epochs=2", "Transfer.strategy=linear_probe", "Arch.input_size=32")
    save, optimizer_saves = paddle.save, []

    def disk_fills_on_the_second_pdopt(obj, path, *args, **kwargs):
        if ".pdopt" in str(path):
            optimizer_saves.append(path)
            if len(optimizer_saves) == 2:
                Path(path).write_bytes(b"\0" * 1000)  # partly written when the disk filled
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", disk_fills_on_the_second_pdopt)
    pattern = (rf"while writing {re.escape(str(run / 'latest.pdopt'))}; nothing was replaced, so the previous "
               rf"checkpoint {re.escape(str(run / 'latest'))} is intact")
    with pytest.raises(DiskFullError, match=pattern):
        train(make_cfg(workspace, run, *common))
    monkeypatch.undo()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert load_state(run / "latest")["epochs_done"] == 1  # its files match its record
    resumed = train(make_cfg(workspace, run, *common, f"Global.resume={run}"))
    # epoch 0: the linear probe's solved head (fit.SolvedStart)
    assert resumed["epochs_run"] == 2 and [row["epoch"] for row in resumed["history"]] == [0, 1, 2]


@pytest.mark.slow
def test_existing_run_is_moved_aside_and_file_output_refused(workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    train(make_cfg(workspace, run, "Global.epochs=1", "Transfer.strategy=linear_probe"))
    assert [p for p in tmp_path.iterdir() if p.name.startswith("run.")][0].joinpath("metrics.json").read_text() == "{}"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(make_cfg(workspace, blocker, "Global.epochs=1"))


@pytest.mark.slow
def test_eval_command_prints_json_with_top1(workspace, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Global.epochs=1", "Transfer.strategy=linear_probe"))
    cfg_path = run / "config.yaml"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), "-c", str(cfg_path),
                             "-o", f"Global.pretrained_model={run / 'best_model'}"],
                            capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["top1"] == pytest.approx(metrics["best_top1"])
    assert set(report["per_class"]) == set(CLASSES) and sum(c["support"] for c in report["per_class"].values()) == 12


@pytest.mark.slow
def test_the_best_epoch_is_chosen_on_held_out_training_images(workspace, tmp_path):
    """DataLoader.Train.val_fraction (default 0.1): the best epoch is the best
    on validation images carved from the training folder; best_top1 is the
    Eval top-1 of that epoch's model, which is what best_model holds."""
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Global.epochs=3", "Transfer.strategy=partial"))
    assert metrics["selection"] == {"split": "validation", "val_images": 3, "val_fraction": 0.1}
    assert metrics["train_images"] == 27  # 30 training images, one of every class held out
    rows = {row["epoch"]: row for row in metrics["history"]}
    best = rows[metrics["best_epoch"]]
    assert metrics["val_top1"] == best["val_top1"] == max(row["val_top1"] for row in rows.values())
    assert metrics["best_top1"] == best["eval_top1"]
    cfg = make_cfg(workspace, run, f"Global.pretrained_model={run / 'best_model'}")
    assert evaluate(cfg)["top1"] == pytest.approx(metrics["best_top1"])
    # Without a validation split, the Eval split itself chooses (and flatters) the best epoch.
    metrics = train(make_cfg(workspace, tmp_path / "eval_chosen", "Global.epochs=3", "Transfer.strategy=partial",
                             "DataLoader.Train.val_fraction=0"))
    assert metrics["selection"]["split"] == "eval" and metrics["val_top1"] is None
    assert metrics["best_top1"] == max(row["eval_top1"] for row in metrics["history"])
    # ... and no temperature is fitted (never on Eval): T = 1, and metrics.json says why.
    calibration = metrics["calibration"]
    assert (calibration["temperature"], calibration["fitted"], calibration["val_images"]) == (1.0, False, 0)
    assert calibration["reason"].startswith("no validation split (DataLoader.Train.val_fraction=0)")
    assert calibration["eval_ece_before"] == calibration["eval_ece_after"]


# ------------------------------------------------------------ unit-level

def _plan(strategy="auto", per_class=100, pretrained=True, similarity=None, **transfer):
    cfg = load_config(None, [*(f"Transfer.{k}={v}" for k, v in transfer.items()), f"Transfer.strategy={strategy}"])
    return plan_transfer(cfg.Transfer, 5, [per_class] * 4, pretrained, similarity)


@pytest.mark.parametrize("per_class, separability, pretrained, strategy, frozen", [
    (40, 0.9, True, "linear_probe", 5),    # small, similar
    (40, 0.2, True, "partial", 1),         # small, different: fine-tune most layers
    (2000, 0.9, True, "partial", 2),       # large, similar: fine-tune the top stages
    (2000, 0.2, True, "full", 0),          # large, different
    (40, 0.9, False, "full", 0),           # nothing pretrained to keep
])
def test_auto_follows_the_four_quadrants(per_class, separability, pretrained, strategy, frozen):
    plan = _plan(per_class=per_class, pretrained=pretrained, similarity={"separability": separability})
    assert (plan.strategy, plan.frozen_stages, plan.requested) == (strategy, frozen, "auto")
    assert plan.figures["images_per_class_median"] == per_class and plan.reason


def test_freeze_stages_beyond_the_architecture_is_refused():
    with pytest.raises(ConfigError, match="Transfer.freeze_stages: 9 is more than the 5 stages"):
        _plan("partial", freeze_stages=9)


def test_gradual_schedule_unfreezes_from_the_top():
    plan = _plan("gradual", unfreeze_every=2, freeze_stages=1)
    assert [plan.frozen_stages_at(e) for e in range(12)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("transfer, expected", [
    ({"body_lr_mult": 0.25}, [0.25] * 5),
    ({"body_lr_mult": 0.5, "layer_decay": 0.5}, [0.5 * 0.5 ** 4, 0.5 * 0.5 ** 3, 0.125, 0.25, 0.5]),
    ({"stage_lr_mults": "[0.1, 0.2, 0.3, 0.4, 0.5]"}, [0.1, 0.2, 0.3, 0.4, 0.5]),
])
def test_per_stage_learning_rates_set_each_stage_step_size(transfer, expected):
    spec = get_spec("mobilenet_v1")
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=3)
    plan = _plan("full", **transfer)
    assert plan.stage_lr_mults == pytest.approx(expected)
    set_frozen_stages(network, spec, plan.frozen_stages, plan.bn)
    params = trainable_parameters(network, spec, plan)
    before = {id(p): p.numpy().copy() for p in params}
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=params)
    network.eval()  # fixed BatchNorm, so gradients are the only change
    network(paddle.randn([2, 3, 64, 64])).sum().backward()
    optimizer.step()
    names = {id(p): n for n, p in network.named_parameters()}
    seen = set()
    for p in params:
        index = stage_index(spec, names[id(p)])
        expected_lr = 0.1 * (1.0 if index is None else expected[index])
        moved = before[id(p)] - p.numpy()
        np.testing.assert_allclose(moved, expected_lr * p.grad.numpy(), rtol=1e-4, atol=1e-8, err_msg=names[id(p)])
        seen.add(index)
    assert seen == {None, 0, 1, 2, 3, 4}


def test_stage_lr_mults_must_match_the_stage_count():
    with pytest.raises(ConfigError, match="3 values given, this architecture has 5 stages"):
        _plan("full", stage_lr_mults="[1, 1, 1]")


@pytest.mark.slow
def test_gradual_unfreezing_trains_each_stage_from_its_epoch(workspace, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Transfer.strategy=gradual", "Transfer.freeze_stages=2",
                             "Global.epochs=4", "Optimizer.lr.warmup_epochs=0"))
    assert [row["frozen_stages"] for row in metrics["history"]] == [5, 4, 3, 2]
    assert not metrics["strategy"]["cached_features"]
    spec = get_spec("mobilenet_v1")
    before, after = _weights(workspace["pretrained"]), _weights(run / "latest.pdparams")
    for key in after:
        index = stage_index(spec, key)
        if index is not None and index < 2:
            assert np.array_equal(before[key], after[key]), f"never-unfrozen {key} changed"
        elif index is not None and index >= 2 and not key.endswith(("_mean", "_variance")):
            assert not np.array_equal(before[key], after[key]), f"unfrozen {key} did not train"
    # optimizer state exists for the unfrozen stages (created when they first trained), not the frozen ones
    state = paddle.load(str(run / "latest.pdopt"))
    assert any(k.startswith("conv6.") for k in state) and not any(k.startswith("conv2_1.") for k in state)


@pytest.mark.slow
def test_l2sp_holds_the_body_near_its_pretrained_weights(workspace, tmp_path):
    def distance(run):
        before, after = _weights(workspace["pretrained"]), _weights(run / "latest.pdparams")
        return sum(float(((after[k] - before[k]) ** 2).sum()) for k in after if not k.startswith("fc."))

    common = ("Transfer.strategy=full", "Global.epochs=2", "Optimizer.lr.learning_rate=0.1",
              "Optimizer.weight_decay=0.0")
    train(make_cfg(workspace, tmp_path / "plain", *common))
    train(make_cfg(workspace, tmp_path / "zero", *common, "Transfer.l2sp_alpha=0"))
    train(make_cfg(workspace, tmp_path / "strong", *common, "Transfer.l2sp_alpha=20"))
    plain, strong = distance(tmp_path / "plain"), distance(tmp_path / "strong")
    assert distance(tmp_path / "zero") == plain  # alpha 0 is plain fine-tuning
    assert strong < 0.5 * plain, (strong, plain)  # measured: 0.35 of the plain drift


def test_l2sp_pull_is_scaled_like_the_loss_under_amp():
    """Under AMP the hook sees gradients of the scaled loss, which the
    optimizer step divides by the scale again: the pull must be scaled too."""
    from paddle_tl.transfer.freezing import add_l2sp
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=3)
    scale = paddle.to_tensor([1024.0])
    add_l2sp(network, get_spec("mobilenet_v1"), alpha=0.5, loss_scale=lambda: scale)
    body = network.conv1[0].weight
    body.set_value(body.numpy() + 1.0)  # displaced by 1 from the anchor
    network.eval()
    (network(paddle.randn([2, 3, 32, 32])).sum() * 0.0 * scale).backward()  # no loss gradient: only the pull
    np.testing.assert_allclose(body.grad.numpy() / 1024.0, 0.5 * 1.0, rtol=1e-6)


def test_l2sp_gradient_pulls_toward_the_start_exactly():
    spec = get_spec("mobilenet_v1")
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=3)
    from paddle_tl.transfer.freezing import add_l2sp
    add_l2sp(network, spec, alpha=0.5)
    body, head = network.conv1[0].weight, network.fc.weight
    start = body.numpy().copy()
    body.set_value(start + 1.0)  # displaced by 1 from the anchor
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=[body, head], weight_decay=0.0)
    network.eval()
    (network(paddle.randn([2, 3, 64, 64])).sum() * 0.0).backward()  # no loss gradient: only the pull
    optimizer.step()
    np.testing.assert_allclose(body.numpy(), start + 1.0 - 0.1 * 0.5 * 1.0, rtol=1e-6)
    assert body.regularizer is not None and head.regularizer is None  # no decay toward zero on the body


@pytest.mark.slow
def test_auto_rule_measures_similarity_and_is_reproducible(workspace, tmp_path, shared_dir):
    """Ants vs bees look like ImageNet to its features: a tiny set of them gets
    a linear probe. Classes that the features cannot tell apart (the same kind
    of noise images under two labels) get fine-tuning."""
    weights = shared_dir / "weights"
    hymenoptera = shared_dir / "datasets" / "hymenoptera" / "val"

    def auto(train_root, run, *overrides):
        return train(make_cfg(workspace, run, "Global.epochs=1", "Transfer.cache_views=1",
                              "Transfer.auto_budget_minutes=0",  # the four-quadrant rule alone
                              f"DataLoader.Train.dataset.root={train_root}",
                              f"DataLoader.Eval.dataset.root={train_root}", *overrides))["strategy"]

    similar = auto(hymenoptera, tmp_path / "a", "Arch.name=mobilenet_v2", "Arch.kwargs={}", "Arch.input_size=224",
                   f"Arch.pretrained={weights / 'mobilenet_v2_imagenet.pdparams'}")
    assert similar["strategy"] == "linear_probe" and similar["figures"]["separability"] >= 0.6

    rng = np.random.RandomState(0)
    for name in ("left", "right"):
        (tmp_path / "noise" / name).mkdir(parents=True)
    for i in range(40):
        noise = rng.randint(0, 256, (72, 72, 3)).astype(np.uint8)
        Image.fromarray(noise).save(tmp_path / "noise" / ("left", "right")[i % 2] / f"{i}.png")
    tiny = f"Arch.pretrained={weights / 'mobilenet_v1_x0.25_imagenet.pdparams'}"
    different = auto(tmp_path / "noise", tmp_path / "b", tiny)
    assert different["figures"]["separability"] < 0.6
    assert different["strategy"] == "partial" and different["frozen_stages"] == 1
    assert auto(tmp_path / "noise", tmp_path / "c", tiny)["figures"] == different["figures"]  # same seed, same call


@pytest.mark.parametrize("strategy", ["linear_probe", "partial"])  # cached features and images
@pytest.mark.slow
def test_imbalanced_data_gets_weighted_loss_and_balanced_sampling(workspace, tmp_path, strategy, colour_folder):
    root = colour_folder(tmp_path / "imbalanced", 10, 3)
    for extra in sorted((root / "blue").iterdir())[2:]:
        extra.unlink()
    metrics = train(make_cfg(workspace, tmp_path / "run", f"Transfer.strategy={strategy}", "Global.epochs=2",
                             f"DataLoader.Train.dataset.root={root}", "DataLoader.Train.sampler=balanced",
                             "Loss.class_weights=auto",
                             "DataLoader.Train.val_fraction=0"))  # every image counts in the weights
    assert metrics["imbalance_ratio"] == 5.0 and metrics["sampler"] == "balanced"
    assert metrics["class_weights"] == pytest.approx([22 / (3 * 2), 22 / (3 * 10), 22 / (3 * 10)])  # blue, green, red
    assert metrics["epochs_run"] == 2


def test_out_of_memory_becomes_advice(workspace, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("(ResourceExhausted) Out of memory error on GPU 0. Cannot allocate 1.2GB")

    monkeypatch.setattr(paddle.Model, "fit", exhausted)
    from paddle_tl.errors import OutOfMemoryError
    with pytest.raises(OutOfMemoryError, match=r"lower DataLoader\.Train\.batch_size \(now 8\).*Global\.resume="):
        train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=partial"))


@pytest.mark.slow
def test_kill_9_mid_training_then_resume(workspace, tmp_path):
    """A real SIGKILL during training: the last checkpoint stays loadable and
    the resumed run ends where an uninterrupted one does."""
    import os
    import signal
    import time

    common = ["Global.epochs=6", "Transfer.strategy=partial", "Transfer.freeze_stages=3",
              "Optimizer.lr.warmup_epochs=1"]
    straight = train(make_cfg(workspace, tmp_path / "straight", *common))

    run = tmp_path / "killed"
    config = tmp_path / "config.yaml"
    make_cfg(workspace, run, *common).save(config)
    command = [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(config)]
    env = dict(os.environ, HOME=str(tmp_path))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        state = run / "latest.state.json"
        if state.is_file() and json.loads(state.read_text()).get("epochs_done", 0) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = json.loads((run / "latest.state.json").read_text())["epochs_done"]
    assert 2 <= done_before < 6

    resumed = subprocess.run(command + ["-o", f"Global.resume={run}"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 6 and len(metrics["history"]) == 6
    a, b = _weights(tmp_path / "straight" / "latest.pdparams"), _weights(run / "latest.pdparams")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert metrics["best_top1"] == pytest.approx(straight["best_top1"])


@pytest.mark.slow
def test_cached_features_train_the_same_head_as_the_full_network(workspace, tmp_path, shared_dir):
    """With augmentation off, training the head on cached features (Paddle
    Inference) and through the whole network (dynamic graph) give the same
    head, up to float differences between the two runtimes (both starting
    as built: the solved start, Transfer.head_init, needs cached features)."""
    common = ("Transfer.strategy=linear_probe", "Global.epochs=3", "Transfer.cache_views=1",
              "Transfer.head_init=random",
              f"Arch.pretrained={shared_dir / 'weights' / 'mobilenet_v1_x0.25_imagenet.pdparams'}",
              "Optimizer.lr.learning_rate=0.002", "DataLoader.Train.augment.crop_scale=[1.0, 1.0]",
              "DataLoader.Train.augment.hflip=false")
    cached = train(make_cfg(workspace, tmp_path / "cached", *common))
    plain = train(make_cfg(workspace, tmp_path / "plain", *common, "Transfer.cache_features=false"))
    assert cached["strategy"]["cached_features"] and not plain["strategy"]["cached_features"]
    a, b = _weights(tmp_path / "cached" / "latest.pdparams"), _weights(tmp_path / "plain" / "latest.pdparams")
    assert plain["history"][-1]["train_loss"] < 0.9 * plain["history"][0]["train_loss"]  # the head did learn
    for key in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-5, err_msg=key)
    assert [r["eval_top1"] for r in cached["history"]] == [r["eval_top1"] for r in plain["history"]]
