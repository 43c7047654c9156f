"""Temperature scaling, ECE and the "unknown" threshold (paddle_tl/calibration.py),
and, in one slow test, calibration end to end: train, export, infer."""

import json

import numpy as np
import pytest
import yaml

from paddle_tl.calibration import (calibrate, expected_calibration_error, fit_temperature, negative_log_likelihood,
                                   reject_threshold, reliability_bins, softmax)


def _calibrated_simulation(n=4000, classes=5, seed=0):
    """(logits, labels) of a perfectly calibrated model: each label is drawn
    from softmax(logits) itself."""
    rng = np.random.RandomState(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    probabilities = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


@pytest.mark.parametrize("k", [2.0, 3.0])
def test_over_confident_model_gets_temperature_above_one_and_lower_ece(k):
    logits, labels = _calibrated_simulation()
    over = k * logits  # the same ranking, over-confident probabilities
    temperature, identified = fit_temperature(over, labels)
    assert identified and temperature > 1
    assert temperature == pytest.approx(k, rel=0.1)  # undoes the factor
    before = expected_calibration_error(softmax(over), labels)
    after = expected_calibration_error(softmax(over, temperature), labels)
    assert after < before and after < 0.03 < before
    assert negative_log_likelihood(over, labels, temperature) < negative_log_likelihood(over, labels)


def test_calibrated_model_keeps_temperature_near_one():
    logits, labels = _calibrated_simulation(seed=1)
    temperature, identified = fit_temperature(logits, labels)
    assert identified and temperature == pytest.approx(1.0, abs=0.1)


def test_under_confident_model_gets_temperature_below_one():
    logits, labels = _calibrated_simulation(seed=2)
    temperature, identified = fit_temperature(logits / 2, labels)
    assert identified and temperature == pytest.approx(0.5, rel=0.1)


def test_temperature_one_changes_nothing_and_any_temperature_keeps_the_ranking():
    logits, _ = _calibrated_simulation(n=200)
    plain = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax(logits, 1.0), plain / plain.sum(1, keepdims=True), rtol=1e-12)
    ranking = np.argsort(-logits, axis=1, kind="stable")
    for temperature in (0.05, 0.5, 1.7, 40.0):
        probabilities = softmax(logits, temperature)
        assert (probabilities.argmax(1) == logits.argmax(1)).all()
        assert (np.argsort(-probabilities, axis=1, kind="stable") == ranking).all()


def test_perfectly_separated_split_cannot_set_a_temperature():
    """Every image right: the NLL falls all the way to T -> 0, so T is not
    identified and calibrate keeps T = 1 and says why."""
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [2.0, 1.5]])
    labels = np.array([0, 1, 0])
    temperature, identified = fit_temperature(logits, labels)
    assert not identified and temperature < 0.02
    record = calibrate(logits, labels, logits, labels)
    assert record["temperature"] == 1.0 and not record["fitted"]
    assert "cannot set a temperature" in record["reason"] and "top-1 1.000 on 3 images" in record["reason"]
    assert record["val_ece_before"] == record["val_ece_after"]


def test_ece_and_reliability_bins_by_hand():
    probabilities = np.array([[0.85, 0.15], [0.88, 0.12], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    bins = reliability_bins(probabilities, labels, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 1, 0, 2, 0]
    assert bins[8]["confidence"] == pytest.approx(0.865) and bins[8]["accuracy"] == 0.5
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    # |1 - 0.55| + |1 - 0.7| + 2 |0.5 - 0.865|, over 4 images
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx((0.45 + 0.3 + 0.73) / 4)
    assert reliability_bins(np.array([[1.0, 0.0]]), [0], bins=15)[-1]["count"] == 1  # 1.0 is in the last bin
    assert reliability_bins(np.array([[0.9, 0.1]]), [0], bins=10)[8]["count"] == 1  # (0.8, 0.9]


def test_reject_threshold_keeps_the_target_coverage():
    confidence = np.linspace(0.5, 0.99, 20)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.r_[np.ones(2, int), np.zeros(18, int)]  # the two least confident are wrong
    suggested = reject_threshold(probabilities, labels, coverage=0.9)
    assert suggested["kept"] == 0.9 and suggested["accuracy_kept"] == 1.0 and suggested["accuracy_all"] == 0.9
    assert suggested["reject_below"] == np.floor(confidence[2] * 1000) / 1000


def test_calibrate_without_validation_split_keeps_temperature_one():
    logits, labels = _calibrated_simulation(n=300)
    record = calibrate(eval_logits=3 * logits, eval_labels=labels, no_val_reason="no validation split")
    assert record["temperature"] == 1.0 and not record["fitted"] and record["reason"] == "no validation split"
    assert record["val_images"] == 0 and "val_ece_before" not in record
    assert record["eval_ece_before"] == record["eval_ece_after"] > 0


def test_calibrate_fits_on_validation_only():
    logits, labels = _calibrated_simulation(n=2000, seed=3)
    eval_logits, eval_labels = _calibrated_simulation(n=500, seed=4)
    record = calibrate(2.5 * logits, labels, 2.5 * eval_logits, eval_labels)
    assert record["fitted"] and record["temperature"] == fit_temperature(2.5 * logits, labels)[0]
    assert record["val_images"] == 2000 and record["eval_images"] == 500
    assert record["val_ece_after"] < record["val_ece_before"]
    assert record["eval_ece_after"] < record["eval_ece_before"]  # held out: it generalises
    assert len(record["reliability"]["validation"]["after"]) == record["ece_bins"] == 15
    assert record["suggested_reject_below"]["kept"] >= 0.9
    json.dumps(record)  # it goes to metrics.json as it is


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory, colour_folder, shared_dir):
    """A linear probe (ImageNet mobilenet_v1 x0.25 at 64 px, cached
    features) on red/green/blue images, a quarter of each training class
    moved to the next class (label noise), half held out for validation: the
    validation split has errors, so a temperature can be fitted."""
    from paddle_tl.config import load_config
    from paddle_tl.engine.train import train

    base = tmp_path_factory.mktemp("calibrated_run")
    train_root = colour_folder(base / "train", 8, 0)
    classes = sorted(path.name for path in train_root.iterdir())
    for index, name in enumerate(classes):
        for image in sorted((train_root / name).iterdir())[:2]:
            image.rename(train_root / classes[(index + 1) % len(classes)] / f"moved_{name}_{image.name}")
    eval_root = colour_folder(base / "eval", 4, 1)
    run = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        metrics = train(load_config(None, [
            f"Global.output_dir={run}", "Global.epochs=6", "Global.seed=1", "Global.device=cpu",
            "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64",
            f"Arch.pretrained={shared_dir / 'weights' / 'mobilenet_v1_x0.25_imagenet.pdparams'}",
            "Transfer.strategy=linear_probe", f"DataLoader.Train.dataset.root={train_root}",
            "DataLoader.Train.val_fraction=0.5", f"DataLoader.Eval.dataset.root={eval_root}",
            "DataLoader.Train.batch_size=6", "DataLoader.Train.num_workers=0", "DataLoader.Eval.batch_size=6",
            "DataLoader.Eval.num_workers=0", "Optimizer.lr.learning_rate=0.5"]))
    return run, eval_root, metrics


@pytest.mark.slow
def test_temperature_travels_from_training_to_inference(noisy_run, tmp_path, capsys):
    """metrics.json's temperature is best_model's and inference.yml's; infer
    scores are softmax(logits / T); infer --eval still equals eval; the
    report shows it."""
    from paddle_tl import cli
    from paddle_tl.predict.predictor import Predictor, folder_logits, list_inputs
    from paddle_tl.predict.predictor import main as infer_main

    run, eval_root, metrics = noisy_run
    calibration = metrics["calibration"]
    print(json.dumps({key: value for key, value in calibration.items() if key != "reliability"}))
    assert calibration["fitted"] and calibration["temperature"] != 1.0
    assert calibration["val_images"] == 12 == metrics["selection"]["val_images"]
    assert calibration["eval_images"] == 12
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    assert json.loads((run / "metrics.json").read_text())["calibration"] == calibration
    temperature = calibration["temperature"]
    state = json.loads((run / "best_model.state.json").read_text())
    assert state["model"]["temperature"] == temperature
    assert "temperature" not in json.loads((run / "latest.state.json").read_text())["model"]

    out = tmp_path / "inference"
    assert cli.main(["export", str(run), "--output", str(out)]) == 0
    assert yaml.safe_load((out / "inference.yml").read_text())["temperature"] == temperature

    predictions = tmp_path / "predictions.jsonl"
    capsys.readouterr()
    infer_main(["--model_dir", str(out), "--input", str(eval_root), "--top_k", "3", "--output", str(predictions)])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    logits, _labels = folder_logits(Predictor(out), eval_root)
    assert [record["file"] for record in records] == list_inputs(eval_root)  # the folder's sorted order, as logits
    expected = softmax(logits, temperature)
    for record, probabilities in zip(records, expected):
        np.testing.assert_allclose(record["scores"], np.sort(probabilities)[::-1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(expected, softmax(logits), atol=1e-3)  # T made a difference

    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1])
    infer_main(["--model_dir", str(out), "--input", str(eval_root), "--eval"])
    inferred = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("top1", "per_class", "confusion_matrix"):
        assert inferred[key] == evaluated[key], key
    assert inferred["loss"] == pytest.approx(evaluated["loss"], rel=1e-5, abs=1e-5)  # of the logits, T or not

    page = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert f"T = {temperature:.3f}" in page and 'src="reliability.png"' in page and "--reject_below" in page
    assert (run / "report" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_run_whose_split_cannot_set_a_temperature_records_why(trained_run):
    """The session's tiny 1-epoch run (3 validation images, at chance): T = 1
    with its reason, in metrics.json and in best_model's record alike."""
    calibration = trained_run.metrics["calibration"]
    assert calibration["val_images"] == 3 and "eval_ece_before" in calibration
    if not calibration["fitted"]:
        assert calibration["temperature"] == 1.0 and "cannot set a temperature" in calibration["reason"]
    state = json.loads((trained_run.dir / "best_model.state.json").read_text())
    assert state["model"]["temperature"] == calibration["temperature"]
