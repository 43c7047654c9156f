"""The run report (RUN/report/) of a real two-epoch run on generated images:
every file valid, the per-class table equal to classification_metrics, the
error selection, and escaping of class names that look like HTML."""

import csv
import html
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_tl.config import load_config
from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.data.transforms import eval_transform
from paddle_tl.engine.report import (_unfreezing_points, most_confident_errors, predict_eval, report_command,
                                     write_report)
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import dynamic_runner
from paddle_tl.runs.run_folder import trained_model

# "<b>&green" is a legal folder name and so a class name: the page must show it, not interpret it.
CLASSES = ("red", "<b>&green", "blue")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, colour_folder):
    base = tmp_path_factory.mktemp("report")
    run_dir = base / "run"
    train(load_config(None, [
        f"Global.output_dir={run_dir}", "Global.epochs=2", "Global.seed=3", "Global.device=cpu",
        "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64", "Arch.pretrained=false",
        "Transfer.strategy=full",
        "DataLoader.Train.dataset.root=" + str(colour_folder(base / "train", 8, 0, classes=CLASSES)),
        "DataLoader.Eval.dataset.root=" + str(colour_folder(base / "val", 4, 1, classes=CLASSES)),
        "DataLoader.Train.batch_size=8", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.batch_size=8", "DataLoader.Eval.num_workers=0",
        "Optimizer.lr.learning_rate=0.05"]))
    return run_dir


@pytest.fixture(scope="module")
def report(run):
    return write_report(run)


def _cfg(run):
    return load_config(run / "config.yaml", ["Global.pretrained_model=" + str(run / "best_model")])


@pytest.mark.slow
def test_every_file_is_written_and_valid(run, report):
    folder = run / "report"
    assert report == folder / "index.html"
    for name in ("curves.png", "confusion_matrix.png", "errors.png", "reliability.png"):
        assert (folder / name).read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(folder / name) as image:
            image.verify()
    with open(folder / "per_class.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["class", "precision", "recall", "f1", "support"] and len(rows) == 1 + len(CLASSES)
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


@pytest.mark.slow
def test_per_class_csv_equals_classification_metrics(run, report):
    paths, labels, logits, class_names = predict_eval(_cfg(run))
    scores = classification_metrics(logits, labels, class_names)
    with open(run / "report" / "per_class.csv", newline="", encoding="utf-8") as file:
        rows = {row["class"]: row for row in csv.DictReader(file)}
    assert list(rows) == class_names == sorted(CLASSES)
    confusion = np.array(scores["confusion_matrix"])
    for i, name in enumerate(class_names):
        row = rows[name]
        assert int(row["support"]) == scores["per_class"][name]["support"]
        assert float(row["recall"]) == pytest.approx(scores["per_class"][name]["accuracy"], abs=1e-6)
        precision = confusion[i, i] / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        assert float(row["precision"]) == pytest.approx(precision, abs=1e-6)
    # Every class is present in this Eval split, so macro F1 is the column's mean.
    assert np.mean([float(row["f1"]) for row in rows.values()]) == pytest.approx(scores["macro_f1"], abs=1e-5)
    assert [Path(path).parent.name for path in paths] == [class_names[label] for label in labels]


@pytest.mark.slow
def test_static_prediction_matches_the_dynamic_network(run):
    cfg = _cfg(run)
    _paths, labels, logits, _names = predict_eval(cfg)
    network, _spec, pre, class_names = trained_model(cfg)
    dataset = build_dataset(cfg.DataLoader.Eval.dataset, "eval", eval_transform(pre), class_names=class_names)
    loader = make_loader(dataset, 8, shuffle=False, num_workers=0)
    expected, expected_labels = map_batches(dynamic_runner(network), loader)
    assert np.array_equal(labels, expected_labels)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.slow
def test_index_html_is_escaped_self_contained_and_complete(run, report):
    page = report.read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['best_top1']:.4f}" in page
    for name in CLASSES:
        assert f">{html.escape(name)}<" in page  # a per-class table cell
    assert "<b>&green" not in page and "&lt;b&gt;&amp;green" in page
    assert "<script" not in page.lower()
    for name in ("curves.png", "confusion_matrix.png", "errors.png", "per_class.csv", "reliability.png"):
        assert f'href="{name}"' in page
    assert "<h2>Calibration</h2>" in page and html.escape(metrics["calibration"]["reason"]) in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert html.escape(metrics["strategy"]["reason"]) in page
    assert "Transfer:" in page and "strategy: full" in page  # the config block


def test_most_confident_errors_orders_wrong_predictions_by_confidence():
    probabilities = np.array([[0.9, 0.1],    # right
                              [0.2, 0.8],    # wrong, 0.8
                              [0.6, 0.4],    # wrong, 0.6
                              [0.05, 0.95],  # wrong, 0.95
                              [0.3, 0.7],    # right
                              [0.4, 0.6]])   # wrong, 0.6: a tie keeps the dataset's order
    labels = np.array([0, 0, 1, 0, 1, 0])
    assert most_confident_errors(probabilities, labels, 16).tolist() == [3, 1, 2, 5]
    assert most_confident_errors(probabilities, labels, 2).tolist() == [3, 1]
    assert most_confident_errors(probabilities, np.array([0, 1, 0, 1, 1, 1]), 16).tolist() == []


def test_unfreezing_markers_sit_where_frozen_stages_change():
    history = [{"epoch": e, "frozen_stages": f} for e, f in ((1, 5), (2, 5), (3, 4), (4, 3), (5, 3))]
    assert _unfreezing_points(history) == [(3, 4), (4, 3)]


@pytest.mark.slow
def test_report_command_prints_the_page_and_refuses_a_folder_without_a_run(run, report, tmp_path, capsys):
    report_command([str(run)])
    assert capsys.readouterr().out.strip() == str(report)
    with pytest.raises(ConfigError, match="no metrics.json"):
        report_command([str(tmp_path)])
