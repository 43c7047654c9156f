"""Detection through the command line (tasks/detection/train.py): the run
folder, eval agreeing with metrics.json, resuming, the frozen stages, and
the refusals of data of the other task."""

import json

import numpy as np
import pytest

from paddle_tl.cli import main
from paddle_tl.config import load_config
from paddle_tl.errors import ConfigError, DataError
from paddle_tl.runs.run_folder import run_config
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection import train as train_module
from paddle_tl.tasks.detection.evaluate import evaluate_checkpoint
from paddle_tl.tasks.detection.train import train
from synthetic_detection import write_voc

paddle = import_paddle()

# Tiny: 96 x 72 images kept at their size, a narrow FPN and box head, few proposals.
SMALL = ["Global.task=detection", "Global.seed=5", "Arch.name=mobilenet_v2", "Transfer.strategy=partial",
         "Transfer.freeze_stages=2", "Arch.detector.short_side=72", "Arch.detector.max_size=96",
         "Arch.detector.train_short_sides=[72]", "Arch.detector.fpn_channels=32",
         "Arch.detector.representation_size=64", "Arch.detector.anchor_sizes=[16, 32, 64, 128]",
         "Arch.detector.rpn_pre_nms_top_n=[200, 100]", "Arch.detector.rpn_post_nms_top_n=[100, 50]",
         "Arch.detector.rois_per_image=64", "Optimizer.lr.learning_rate=0.005",
         "DataLoader.Train.dataset.name=VOC", "DataLoader.Eval.dataset.name=VOC",
         "DataLoader.Train.batch_size=2", "DataLoader.Train.val_fraction=0.25"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    base = tmp_path_factory.mktemp("detection_train")
    write_voc(base / "voc", {"train": 8, "val": 4}, seed=3)
    paddle.seed(11)
    pretrained = base / "body.pdparams"  # stands in for ImageNet weights: what the frozen stages must keep
    paddle.save(paddle.vision.models.mobilenet_v2(num_classes=1000).state_dict(), str(pretrained))
    return {"root": base / "voc", "pretrained": pretrained}


def _cfg(voc, run, *overrides):
    return load_config(None, [*SMALL, f"Arch.pretrained={voc['pretrained']}", f"Global.output_dir={run}",
                              f"DataLoader.Train.dataset.root={voc['root']}",
                              f"DataLoader.Eval.dataset.root={voc['root']}", *overrides])


@pytest.fixture(scope="module")
def finished(voc, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    metrics = train(_cfg(voc, run, "Global.epochs=2"))
    return run, metrics


def test_a_detection_run_writes_the_run_folder(finished):
    run, metrics = finished
    for name in ("best_model.pdparams", "best_model.state.json", "latest.pdparams", "latest.pdopt",
                 "latest.state.json", "config.yaml", "metrics.json", "vdl"):
        assert (run / name).exists(), name
    written = json.loads((run / "metrics.json").read_text())
    assert written["task"] == "detection" and written["epochs_run"] == 2
    assert written["class_names"] == ["ellipse", "rectangle", "triangle"] and written["num_classes"] == 3
    assert written["selection_metric"] == "val bbox_ap50" and 0 <= written["bbox_ap50"] <= 1
    assert [row["epoch"] for row in written["history"]] == [0, 1]
    assert all("val_bbox_ap50" in row and row["train_loss"] > 0 for row in written["history"])
    state = json.loads((run / "best_model.state.json").read_text())
    assert state["model"]["task"] == "detection" and state["model"]["detector"]["short_side"] == 72
    assert metrics["bbox_ap"] == written["bbox_ap"]


def test_eval_of_the_run_folder_equals_metrics_json(finished):
    run, metrics = finished
    result = evaluate_checkpoint(run_config(run))
    assert result["bbox_ap"] == pytest.approx(metrics["bbox_ap"], abs=1e-9)
    assert result["bbox_ap50"] == pytest.approx(metrics["bbox_ap50"], abs=1e-9)


def test_frozen_stages_and_batch_norm_statistics_stay_as_pretrained(voc, finished):
    run, _ = finished
    pretrained = paddle.load(str(voc["pretrained"]))
    trained = paddle.load(str(run / "latest.pdparams"))
    # body.steps.<i> is features.<i>; stages 0-1 of mobilenet_v2 are features.0-3. Every BatchNorm of the
    # body keeps its statistics, scale and shift (a layer with a _mean is a BatchNorm).
    checked = 0
    for key, value in trained.items():
        if not key.startswith("body.steps."):
            continue
        layer = key.rsplit(".", 1)[0]
        if int(key.split(".")[2]) < 4 or f"{layer}._mean" in trained:
            assert np.array_equal(value.numpy(), pretrained["features." + key[len("body.steps."):]].numpy()), key
            checked += 1
    assert checked > 50
    # while the convolutions above them trained
    assert not np.array_equal(trained["body.steps.10.conv.0.0.weight"].numpy(),
                              pretrained["features.10.conv.0.0.weight"].numpy())


def test_a_killed_run_resumes_to_the_same_weights(voc, finished, tmp_path, monkeypatch):
    run = tmp_path / "killed"
    real = train_module.train_epoch

    def killed_in_second_epoch(cfg, model, optimizer, state, data, transform, arch, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(cfg, model, optimizer, state, data, transform, arch, epoch, *rest)

    monkeypatch.setattr(train_module, "train_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(voc, run, "Global.epochs=2"))
    monkeypatch.setattr(train_module, "train_epoch", real)
    train(_cfg(voc, run, "Global.epochs=2", f"Global.resume={run}"))
    resumed, straight = paddle.load(str(run / "latest.pdparams")), paddle.load(str(finished[0] / "latest.pdparams"))
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        assert np.array_equal(resumed[key].numpy(), straight[key].numpy()), key


def test_a_class_folder_given_to_the_detection_config_is_refused_in_one_line(voc, colour_folder, tmp_path, capsys):
    folder = colour_folder(tmp_path / "classes", 2, 0)
    run = tmp_path / "run"
    code = main(["train", "-c", "configs/faster_rcnn_mobilenet_v2_voc.yaml", "-o", f"Global.output_dir={run}",
                 "-o", f"DataLoader.Train.dataset.root={folder}", "-o", f"DataLoader.Eval.dataset.root={voc['root']}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "looks like a class-folder dataset" in err and not run.exists()


def test_an_imagefolder_dataset_with_detection_and_voc_with_classification_are_refused(voc):
    with pytest.raises(ConfigError, match=r"^Global.task=detection cannot be combined with "
                                          r"DataLoader.Train.dataset.name=ImageFolder: detection reads boxes"):
        load_config("configs/faster_rcnn_mobilenet_v2_voc.yaml", ["DataLoader.Train.dataset.name=ImageFolder"])
    with pytest.raises(ConfigError, match=r"^Global.task=classification cannot be combined with "
                                          r"DataLoader.Eval.dataset.name=VOC"):
        load_config("configs/mobilenet_v2_imagefolder.yaml", ["DataLoader.Eval.dataset.name=VOC"])


def test_checkpoints_of_one_task_are_refused_by_the_other(finished, tmp_path, colour_folder):
    run, _ = finished
    folder = colour_folder(tmp_path / "classes", 2, 0)
    cfg = load_config(None, [f"Global.pretrained_model={run}/best_model", f"DataLoader.Eval.dataset.root={folder}"])
    from paddle_tl.engine.evaluate import evaluate
    with pytest.raises(ConfigError, match="is a detection run's checkpoint"):
        evaluate(cfg)


def test_too_few_training_images_for_a_batch_are_refused_before_the_run_folder(voc, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DataError, match="fewer than one batch"):
        train(_cfg(voc, run, "DataLoader.Train.batch_size=7"))
    assert not run.exists()


def test_a_budget_shortens_the_schedule_to_the_epochs_that_fit(voc, tmp_path, capsys):
    metrics = train(_cfg(voc, tmp_path / "run", "Global.epochs=5", "Global.budget_minutes=0.001"))
    assert metrics["epochs_run"] == 1
    assert "Global.budget_minutes=0.001: at " in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "latest.state.json").read_text())
    assert state["epochs"] == 1 and len(state["history"]) == 1


def test_the_report_draws_curves_errors_and_the_ap_table(finished):
    run, metrics = finished
    for name in ("index.html", "curves.png", "pr_curves.png", "per_class.csv", "false_positives.png", "misses.png"):
        assert (run / "report" / name).is_file(), name
    rows = (run / "report" / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,AP,AP50,AP75,objects" and [r.split(",")[0] for r in rows[1:]] == metrics["class_names"]
    page = (run / "report" / "index.html").read_text()
    assert "Missed objects" in page and "false positives" in page


def test_false_positives_and_misses_are_matched_as_voc_does():
    from paddle_tl.tasks.detection.data import DetectionDataset, DetectionSample
    from paddle_tl.tasks.detection.report import match_errors
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    sample = DetectionSample("a.jpg", boxes, np.array([0, 0]), np.zeros(2, bool), np.zeros(2, bool), (50, 50), "a.xml")
    dataset = DetectionDataset([sample], ["cat"])
    found = {"boxes": np.array([[0, 0, 10, 10], [0, 0, 11, 10], [30, 30, 50, 50]], np.float32),
             "scores": np.array([0.9, 0.8, 0.7], np.float32), "labels": np.array([0, 0, 0])}
    false_positives, misses = match_errors(dataset, [found])
    # the second detection repeats the taken first object, the third overlaps the other at IoU 100/700
    assert [round(e["score"], 2) for e in false_positives] == [0.8, 0.7]
    assert len(misses) == 1 and list(misses[0]["box"]) == [20, 20, 40, 40]


def test_a_voc_folder_given_to_a_classification_config_is_refused_in_one_line(voc, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "-c", "configs/mobilenet_v2_imagefolder.yaml", "-o", f"Global.output_dir={run}",
                 "-o", f"DataLoader.Train.dataset.root={voc['root']}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "a PASCAL VOC detection folder" in err and "Global.task=detection" in err and not run.exists()


def test_a_classification_checkpoint_is_refused_by_detection_eval(voc, tmp_path):
    from paddle_tl.runs.checkpoint import save_checkpoint
    prefix = tmp_path / "best_model"
    save_checkpoint(prefix, paddle.nn.Linear(2, 2), state={"model": {"arch": "mobilenet_v2", "num_classes": 2}})
    cfg = _cfg(voc, tmp_path / "run", f"Global.pretrained_model={prefix}")
    with pytest.raises(ConfigError, match="is a classification checkpoint, and Global.task is detection"):
        evaluate_checkpoint(cfg)
