"""Cross-validation (paddle_tl/trust/cv.py) and the Wilson interval of top-1 (metrics.py)."""

import json

import numpy as np
import pytest

from paddle_tl.metrics import classification_metrics, wilson_interval
from paddle_tl.trust.cv import mean_interval, stratified_folds, t_quantile_975


def test_folds_are_stratified_disjoint_covering_and_seeded():
    labels = np.array([0] * 23 + [1] * 11 + [2] * 7)
    fold = stratified_folds(labels, 5, seed=3)
    # Every image in exactly one fold: one fold index each, all folds used.
    assert fold.shape == labels.shape and set(fold) == set(range(5))
    sizes = np.bincount(fold, minlength=5)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 1
    for c in range(3):  # every class spread over the folds as evenly as it can be
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(fold, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(fold, stratified_folds(labels, 5, seed=4))


def test_folds_refuse_what_cannot_be_split():
    from paddle_tl.errors import ConfigError
    with pytest.raises(ConfigError, match="at least 2"):
        stratified_folds([0, 1, 0, 1], 1, 0)
    with pytest.raises(ConfigError, match="more than the 4"):
        stratified_folds([0, 1, 0, 1], 5, 0)


def test_t_interval_contains_the_mean():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(4) == pytest.approx(2.776)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=2e-3)  # beyond the table
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    mean, std, (low, high) = mean_interval([0.9, 0.95, 0.92, 0.88, 0.97])
    assert low < mean < high and mean == pytest.approx(0.924)
    assert std == pytest.approx(np.std([0.9, 0.95, 0.92, 0.88, 0.97], ddof=1))
    assert high - mean == pytest.approx(2.776 * std / np.sqrt(5))


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    low, high = wilson_interval(145, 153)
    assert low < 145 / 153 < high


def test_eval_metrics_carry_the_top1_interval():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    result = classification_metrics(logits, np.array([0, 1, 0, 1]), ["a", "b"], topk=(1,))
    assert result["top1"] == 0.75
    assert result["top1_ci95"] == list(wilson_interval(3, 4))
    json.dumps(result)  # the JSON eval prints


@pytest.mark.slow
def test_cv_command_prints_its_json_last(tmp_path, colour_folder, capsys):
    from paddle_tl.cli import main
    root = colour_folder(tmp_path / "train", 6, 0)
    out = tmp_path / "run"
    code = main(["cv", "-c", "mobilenet_v2_imagefolder.yaml", "--folds", "2",
                 "-o", f"Global.output_dir={out}", "-o", "Global.epochs=1", "-o", "Global.device=cpu",
                 "-o", "Arch.name=mobilenet_v1", "-o", "Arch.kwargs={scale: 0.25}", "-o", "Arch.input_size=32",
                 "-o", "Arch.pretrained=false", "-o", "Transfer.strategy=full",
                 "-o", f"DataLoader.Train.dataset.root={root}", "-o", "DataLoader.Train.batch_size=4",
                 "-o", "DataLoader.Train.num_workers=0", "-o", "DataLoader.Eval.num_workers=0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"folds", "mean", "std", "ci95", "k"} <= set(result) and result["k"] == 2
    assert len(result["folds"]) == 2 and all(0 <= score <= 1 for score in result["folds"])
    low, high = result["ci95"]
    assert low <= result["mean"] <= high
    cv = out / "cv"
    assert (cv / "cv.png").is_file() and json.loads((cv / "cv.json").read_text())["folds"] == result["folds"]
    held_out = [line.rsplit(maxsplit=1)[0] for k in (1, 2)
                for line in (cv / "lists" / f"fold_{k}" / "eval.txt").read_text().splitlines()]
    assert sorted(held_out) == sorted(str(p) for p in root.rglob("*.png"))  # every image held out once
    for k in (1, 2):
        assert (cv / f"fold_{k}" / "metrics.json").is_file()


def test_cv_refuses_a_teacher_that_saw_the_held_out_images(tmp_path, capsys):
    """A distillation teacher trained on the training images has seen what
    every fold holds out: refused in one line, before any fold trains."""
    from paddle_tl.cli import main
    teacher = tmp_path / "teacher"
    code = main(["cv", "-c", "mobilenet_v2_imagefolder.yaml", "-o", f"Distill.teacher={teacher}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: Distill.teacher={teacher} cannot be combined with paddle-tl command=cv: the teacher was trained on "
        "the images every fold holds out, so its soft targets would leak them into the folds' scores; "
        "cross-validate without it")


def test_cv_refuses_to_resume(tmp_path, capsys):
    """Every fold trains afresh: Global.resume is refused in one line, before any fold trains."""
    from paddle_tl.cli import main
    out = tmp_path / "out"
    code = main(["cv", "-c", "mobilenet_v2_imagefolder.yaml", "-o", f"Global.resume={tmp_path / 'run'}",
                 "-o", f"Global.output_dir={out}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: Global.resume={tmp_path / 'run'} cannot be combined with paddle-tl command=cv: cross-validation "
        "trains every fold afresh; leave it unset")
    assert not out.exists()
