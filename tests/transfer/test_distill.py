"""Knowledge distillation (Distill, transfer/distill.py): the loss against
numpy, alpha=0 training exactly as plain training does, the teacher's logits
computed once per cached view and of the very images the student sees,
refusals of a bad teacher before any work, and a distilled student that
trains, exports and infers without its teacher."""

import contextlib
import copy
import json
import shutil

import numpy as np
import pytest

from paddle_tl import cli
from paddle_tl.config import load_config
from paddle_tl.data.transforms import Preprocess
from paddle_tl.engine import fit as fit_module
from paddle_tl.engine import train as train_module
from paddle_tl.engine.losses import CrossEntropy
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.models.zoo import get_spec
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer import distill
from paddle_tl.transfer.distill import DistillationLoss, LabelAccuracy, input_adapter

paddle = import_paddle()


def _numpy_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_is_hintons_against_a_hand_computed_value():
    rng = np.random.RandomState(0)
    student, teacher = rng.randn(5, 4) * 3, rng.randn(5, 4) * 3
    labels = rng.randint(0, 4, size=(5, 1))
    temperature, alpha = 3.0, 0.3
    log_p_teacher, log_p_student = (_numpy_log_softmax(x / temperature) for x in (teacher, student))
    kl = (np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(axis=1).mean()
    ce = -_numpy_log_softmax(student)[np.arange(5), labels[:, 0]].mean()
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce

    loss = DistillationLoss(CrossEntropy(), temperature, alpha)
    as_tensors = [paddle.to_tensor(x.astype(dtype)) for x, dtype in
                  ((student, "float32"), (teacher, "float32"), (labels, "int64"))]
    np.testing.assert_allclose(float(loss(*as_tensors)), expected, rtol=1e-5)
    # Evaluation batches carry no teacher logits: the labels' loss alone.
    np.testing.assert_allclose(float(loss(as_tensors[0], as_tensors[2])), ce, rtol=1e-5)
    # The student equal to the teacher: no soft term.
    same = loss(as_tensors[1], as_tensors[1], as_tensors[2])
    np.testing.assert_allclose(float(same), (1 - alpha) * float(CrossEntropy()(as_tensors[1], as_tensors[2])),
                               rtol=1e-5)


def test_accuracy_reads_the_labels_after_the_teacher_logits():
    metric = LabelAccuracy(topk=(1,))
    pred = paddle.to_tensor(np.array([[0.1, 0.9], [0.8, 0.2]], dtype="float32"))
    labels = paddle.to_tensor(np.array([[1], [1]], dtype="int64"))
    metric.update(metric.compute(pred, paddle.zeros([2, 2]), labels))
    assert metric.accumulate() == 0.5


def test_the_teacher_sees_the_students_crop_in_its_own_preprocessing():
    student = Preprocess(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    teacher = Preprocess(64, 72, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raw = np.random.RandomState(0).rand(2, 3, 32, 32).astype("float32")
    images = (raw - 0.5) / 0.25
    adapted = input_adapter(student, teacher)(paddle.to_tensor(images)).numpy()
    assert adapted.shape == (2, 3, 64, 64)
    expected = (raw - np.array(teacher.mean).reshape(1, 3, 1, 1)) / np.array(teacher.std).reshape(1, 3, 1, 1)
    # Bilinear upsampling by 2 keeps the mean of every channel.
    np.testing.assert_allclose(adapted.mean(axis=(2, 3)), expected.mean(axis=(2, 3)), atol=2e-2)
    same = paddle.to_tensor(images)
    assert input_adapter(student, student)(same) is same


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, colour_folder):
    """Colour images, random 'pretrained' mobilenet_v1 x0.25 weights, and a
    finished teacher run at 64 px (the students train at 32 px, so the
    teacher's inputs are resized too)."""
    base = tmp_path_factory.mktemp("distill")
    paddle.seed(3)
    pretrained = base / "pretrained.pdparams"
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=1000)
    # BatchNorm statistics of one batch of inputs: with paddle's initial ones
    # the signal dies out on the way and every image gets the same logits
    # (tests/deploy/test_export_infer.py), which would hide whose images a
    # teacher scored.
    for layer in network.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._momentum = 0.0
    with paddle.no_grad():
        network(paddle.to_tensor(np.random.RandomState(0).uniform(-2, 2, (16, 3, 32, 32)).astype("float32")))
    paddle.save(network.state_dict(), str(pretrained))
    folders = {"train": colour_folder(base / "train", 6, 0), "val": colour_folder(base / "val", 3, 1),
               "other": colour_folder(base / "other", 6, 0, classes=("cyan", "magenta", "yellow")),
               "pretrained": pretrained, "base": base}
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: a HOME of its own
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.setattr(train_module, "write_report", lambda run_dir: run_dir)
        train(_cfg(folders, base / "teacher", "Arch.input_size=64", "Transfer.strategy=full", "Global.epochs=2"))
    folders["teacher"] = base / "teacher"
    return folders


def _cfg(folders, run, *overrides):
    return load_config(None, [
        f"Global.output_dir={run}", "Global.epochs=2", "Global.seed=3", "Global.device=cpu",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=32",
        f"Arch.pretrained={folders['pretrained']}",
        f"DataLoader.Train.dataset.root={folders['train']}", f"DataLoader.Eval.dataset.root={folders['val']}",
        "DataLoader.Train.batch_size=6", "DataLoader.Train.num_workers=0", "DataLoader.Eval.batch_size=6",
        "DataLoader.Eval.num_workers=0", "Optimizer.lr.learning_rate=0.05", *overrides])


@pytest.fixture
def no_report(monkeypatch):
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test


def _weights(run):
    return paddle.load(str(run / "best_model.pdparams"))


@pytest.mark.parametrize("strategy", ["full", "linear_probe", "partial"],
                         ids=["images", "cached_features", "cached_activations"])
@pytest.mark.slow
def test_alpha_zero_trains_bit_for_bit_as_plain_training(workspace, tmp_path, no_report, strategy):
    """alpha=0 leaves only the labels' cross-entropy (times exactly 1), and
    the teacher, built and run beside the student, draws nothing from the
    random generators: the same weights and figures, to the bit."""
    plain = train(_cfg(workspace, tmp_path / "plain", f"Transfer.strategy={strategy}"))
    distilled = train(_cfg(workspace, tmp_path / "distilled", f"Transfer.strategy={strategy}",
                           f"Distill.teacher={workspace['teacher']}", "Distill.alpha=0"))
    assert distilled["strategy"]["cached_features"] == (strategy == "linear_probe")
    assert (distilled["strategy"]["cached_activations"] is not None) == (strategy == "partial")
    assert distilled["distill"]["alpha"] == 0
    assert ("every training step" if strategy == "full" else "once per cached view") in \
        distilled["distill"]["teacher_logits"]
    plain_weights, distilled_weights = _weights(tmp_path / "plain"), _weights(tmp_path / "distilled")
    assert plain_weights.keys() == distilled_weights.keys()
    for name in plain_weights:
        np.testing.assert_array_equal(plain_weights[name].numpy(), distilled_weights[name].numpy(), err_msg=name)
    drop = ("train_seconds", "distill", "history", "num_workers")
    for metrics in (plain, distilled):  # the head's solver is timed too
        (metrics["strategy"]["head_init"] or {}).pop("seconds", None)
    assert {k: v for k, v in plain.items() if k not in drop} == {k: v for k, v in distilled.items() if k not in drop}

    def timeless(history):
        return [{k: v for k, v in row.items() if "second" not in k} for row in history]

    assert timeless(plain["history"]) == timeless(distilled["history"])


def test_metrics_record_the_teacher_and_the_run_folder_is_the_students(workspace, tmp_path, no_report):
    metrics = train(_cfg(workspace, tmp_path / "run", "Transfer.strategy=full", f"Distill.teacher={workspace['teacher']}",
                         "Distill.alpha=1", "Distill.temperature=2"))
    teacher_metrics = json.loads((workspace["teacher"] / "metrics.json").read_text())
    record = metrics["distill"]
    assert record["teacher"] == str(workspace["teacher"]) and record["teacher_arch"] == "mobilenet_v1"
    assert record["teacher_top1"] == teacher_metrics["best_top1"]
    assert record["teacher_params"] == teacher_metrics["trainable_params"] + teacher_metrics["frozen_params"]
    assert (record["temperature"], record["alpha"]) == (2.0, 1.0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["distill"] == record
    assert not any("teacher" in path.name for path in (tmp_path / "run").iterdir())  # the student's folder alone


class _Counting:
    """Wraps distill.fastest_runner: counts the images the teacher scores."""

    def __init__(self, runner):
        self.runner, self.images = runner, 0

    @contextlib.contextmanager
    def __call__(self, network, *args, **kwargs):
        with self.runner(network, *args, **kwargs) as run:
            def counted(images):
                self.images += images.shape[0]
                return run(images)

            yield counted


def test_teacher_logits_are_computed_once_per_cached_view_of_the_same_images(workspace, tmp_path, no_report,
                                                                            monkeypatch):
    counting = _Counting(distill.fastest_runner)
    monkeypatch.setattr(distill, "fastest_runner", counting)
    calls = []

    def kept(*args, **kwargs):
        calls.append((args, kwargs, original(*args, **kwargs)))
        return calls[-1][2]

    original = fit_module.cached_datasets
    monkeypatch.setattr(fit_module, "cached_datasets", kept)
    metrics = train(_cfg(workspace, tmp_path / "run", "Transfer.strategy=linear_probe", "Global.epochs=4",
                         "Transfer.cache_views=2", f"Distill.teacher={workspace['teacher']}"))
    assert metrics["strategy"]["cached_features"] and metrics["epochs_run"] == 4
    assert counting.images == 2 * metrics["train_images"]  # two views, once each; not once per epoch

    # The plain view's logits are the teacher's own (its best_model at its
    # 64 px, fed the student's 32-px evaluation crops), computed apart.
    (_, _, _, train_set, _, eval_tf, *_), _, (train_data, *_) = calls[0]
    plain = copy.copy(train_set)
    plain.transform = eval_tf
    images = paddle.to_tensor(np.stack([plain[i][0] for i in range(len(plain))]))
    teacher = distill.build_teacher(distill.find_teacher(load_config(None, [
        f"Distill.teacher={workspace['teacher']}"]).Distill), Preprocess.from_spec(get_spec("mobilenet_v1"), 32))
    with paddle.no_grad():
        expected = teacher.network(teacher.adapt(images)).numpy()
    np.testing.assert_allclose(train_data.teacher_views[0], expected, rtol=1e-3, atol=1e-4)
    assert not np.allclose(train_data.teacher_views[1], expected, rtol=1e-3, atol=1e-4)  # augmented: other images


# ---------------------------------------------------------------- refusals

def _refused(capsys, tmp_path, *overrides):
    """The command line's answer: exit 2, one line on stderr, and no run folder."""
    run = tmp_path / "student"
    argv = ["train", "-c", str(_config_file(tmp_path)), "-o", f"Global.output_dir={run}",
            *(arg for o in overrides for arg in ("-o", o))]
    assert cli.main(argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: Distill.teacher: "), errors
    assert not run.exists()
    return errors[0]


def _config_file(tmp_path):
    """The config the command line is given: the defaults (-o sets the rest)."""
    path = tmp_path / "config.yaml"
    path.write_text("Global: {}\n")
    return path


def _student_args(workspace, *overrides):
    return ["Global.epochs=1", "Global.device=cpu", "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}",
            "Arch.input_size=32", f"Arch.pretrained={workspace['pretrained']}",
            f"DataLoader.Train.dataset.root={workspace['train']}", f"DataLoader.Eval.dataset.root={workspace['val']}",
            "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0", *overrides]


def test_a_missing_or_unfinished_teacher_is_refused_in_one_line_before_any_work(workspace, tmp_path, capsys):
    message = _refused(capsys, tmp_path, *_student_args(workspace, f"Distill.teacher={tmp_path / 'nowhere'}"))
    assert message.endswith("does not exist; give the folder of a finished paddle-tl train run")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(workspace["teacher"], unfinished)
    (unfinished / "metrics.json").unlink()  # a run that stopped before its end
    message = _refused(capsys, tmp_path, *_student_args(workspace, f"Distill.teacher={unfinished}"))
    assert "is not a finished run folder (no metrics.json)" in message


def test_a_teacher_of_other_classes_is_refused_naming_both(workspace, tmp_path, capsys):
    message = _refused(capsys, tmp_path, *_student_args(workspace, f"Distill.teacher={workspace['teacher']}",
                                                        f"DataLoader.Train.dataset.root={workspace['other']}",
                                                        f"DataLoader.Eval.dataset.root={workspace['other']}"))
    assert "['blue', 'green', 'red']" in message and "['cyan', 'magenta', 'yellow']" in message


def test_distill_settings_are_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"^Distill.alpha: must be in \[0, 1\]"):
        load_config(None, ["Distill.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"^Distill.temperature: must be > 0"):
        load_config(None, ["Distill.temperature=0"])
    with pytest.raises(ConfigError, match=r"^Distill.teacher=run cannot be combined with "
                                          r"Transfer.domain_adaptation=mmd"):
        load_config(None, ["Distill.teacher=run", "Transfer.domain_adaptation=mmd"])


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_distilled_student_trains_exports_and_infers_without_its_teacher(workspace, tmp_path, capsys):
    run, inference = tmp_path / "student", tmp_path / "inference"
    assert cli.main(["train", "-c", str(_config_file(tmp_path)), "-o", f"Global.output_dir={run}",
                     "-o", "Transfer.strategy=full",
                     *(arg for o in _student_args(workspace, f"Distill.teacher={workspace['teacher']}")
                       for arg in ("-o", o))]) == 0
    moved = tmp_path / "teacher_gone"
    shutil.move(str(workspace["teacher"]), moved)  # export and inference need nothing of the teacher
    try:
        assert cli.main(["export", str(run), "--output", str(inference)]) == 0
        rows = tmp_path / "rows.jsonl"
        assert cli.main(["infer", "--model_dir", str(inference), "--input", str(workspace["val"]),
                         "--output", str(rows)]) == 0
    finally:
        shutil.move(str(moved), workspace["teacher"])
    predictions = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(predictions) == 9 and all(row["label_names"][0] in ("red", "green", "blue") for row in predictions)
    assert json.loads((run / "metrics.json").read_text())["distill"]["teacher"] == str(workspace["teacher"])
