"""Transfer.head_init=logistic: the Linear head starts as the logistic
regression on the cached features, solved to convergence, its L2 strength
chosen on the validation split."""

import json

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.transfer.logistic import STRENGTHS, solve_head


def _blobs(seed, per_class, classes=3, features=12):
    """Gaussian classes on features of very different scales (and one that
    never varies), as pooled CNN features are."""
    rng = np.random.RandomState(seed)
    centres = np.random.RandomState(0).randn(classes, features)
    scales = np.logspace(-1, 1, features)
    x = np.concatenate([centres[c] + 1.5 * rng.randn(per_class, features) for c in range(classes)]) * scales
    x[:, 0] = 3.0
    return x.astype("float32"), np.repeat(np.arange(classes), per_class)


def test_the_solved_head_is_the_regularised_logistic_regression_on_the_raw_features():
    """The same optimum as scikit-learn's multinomial logistic regression
    (C = 1 / (samples x strength) puts its penalty on our scale), fitted on
    standardised features, with the standardising folded into the layer."""
    sklearn = pytest.importorskip("sklearn.linear_model", reason="the reference solver is scikit-learn's")
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(1, 60)
    val_x, val_y = _blobs(2, 20)
    weight, bias, record = solve_head(x, y, val_x, val_y, 3)
    assert record["strength"] in STRENGTHS and [row["strength"] for row in record["tried"]] == list(STRENGTHS)
    assert record["val_top1"] == max(row["val_top1"] for row in record["tried"]) > 0.8
    assert record["samples"] == len(x) and weight.shape == (12, 3) and bias.shape == (3,)

    scaler = StandardScaler().fit(x)
    reference = sklearn.LogisticRegression(C=1 / (len(x) * record["strength"]), tol=1e-10, max_iter=10000)
    reference.fit(scaler.transform(x), y)
    ours = _softmax(val_x @ weight + bias)
    np.testing.assert_allclose(ours, reference.predict_proba(scaler.transform(val_x)), atol=2e-3)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_equal_validation_scores_choose_the_strongest_penalty():
    x, y = _blobs(3, 30, classes=2)
    x[:, 1] += np.where(y == 1, 1e3, -1e3)  # separable by far: every strength scores 1.0
    _, _, record = solve_head(x, y, x, y, 2)
    assert all(row["val_top1"] == 1.0 for row in record["tried"]) and record["strength"] == STRENGTHS[0]
    # ... though the weakest penalty fits the validation split with the lowest loss
    assert min(record["tried"], key=lambda row: row["val_loss"])["strength"] != STRENGTHS[0]


def test_a_feature_that_barely_varies_is_not_blown_up():
    """Standardising it would divide by ~0: folded into the layer, its
    weight would turn the 1e-5 differences between the cache's runtime and
    the network's own forward into different predictions."""
    x, y = _blobs(6, 30)
    x[:, 2] = 5.0 + 1e-7 * np.random.RandomState(0).randn(len(x))
    weight, bias, _ = solve_head(x, y, x, y, 3)
    assert np.abs(weight[2]).max() < 1e3 * np.abs(weight[3:]).max()
    jitter = x + 1e-5 * np.random.RandomState(1).randn(*x.shape).astype("float32")
    np.testing.assert_allclose(jitter @ weight + bias, x @ weight + bias, atol=1e-2)


def test_class_weights_move_the_solution_toward_the_rare_class():
    x, y = _blobs(4, 40, classes=2)
    x, y = x[20:], y[20:]  # 20 of class 0 against 40 of class 1
    plain = solve_head(x, y, x, y, 2)
    weighted = solve_head(x, y, x, y, 2, class_weights=[2.0, 0.5])
    rare = lambda solved: (_softmax(x @ solved[0] + solved[1]).argmax(axis=1) == 0).sum()  # noqa: E731
    assert rare(weighted) > rare(plain)


@pytest.mark.slow
def test_a_linear_probe_starts_from_the_solved_head_and_says_so(colour_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
    train_root, val_root = colour_folder(tmp_path / "train", 10, 0), colour_folder(tmp_path / "val", 3, 1)
    common = ["Global.epochs=1", "Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=32",
              "Arch.pretrained=false", "Transfer.strategy=linear_probe", "DataLoader.Train.val_fraction=0.3",
              f"DataLoader.Train.dataset.root={train_root}", f"DataLoader.Eval.dataset.root={val_root}",
              "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0"]
    solved = train(load_config(None, [f"Global.output_dir={tmp_path / 'solved'}", *common]))
    init = solved["strategy"]["head_init"]
    assert init["strength"] in STRENGTHS and init["samples"] == 2 * solved["train_images"]  # both cached views
    assert json.loads((tmp_path / "solved" / "metrics.json").read_text())["strategy"]["head_init"] == init

    plain = train(load_config(None, [f"Global.output_dir={tmp_path / 'plain'}", "Transfer.head_init=random",
                                     *common]))
    assert plain["strategy"]["head_init"] is None
    # Without a validation split there is nothing to choose the strength on: the head starts as built.
    unsplit = train(load_config(None, [f"Global.output_dir={tmp_path / 'unsplit'}", *common,
                                       "DataLoader.Train.val_fraction=0"]))
    assert unsplit["strategy"]["head_init"] is None

