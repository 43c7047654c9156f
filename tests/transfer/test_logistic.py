"""Transfer.head_init=logistic: the Linear head starts as the logistic
regression on the cached features, solved to convergence, its L2 strength
chosen on the validation split."""

import json

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.engine import fit as fit_module
from paddle_tl.runs import BEST_MODEL
from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.logistic import C_GRID, refit_head, solve_head, strengths_for

paddle = import_paddle()


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
    strengths = strengths_for(len(x))  # C_GRID's, for the samples
    assert record["strength"] in strengths and [row["strength"] for row in record["tried"]] == list(strengths)
    assert record["val_top1"] == max(row["val_top1"] for row in record["tried"]) > 0.8
    assert record["samples"] == len(x) and weight.shape == (12, 3) and bias.shape == (3,)

    scaler = StandardScaler().fit(x)
    assert record["C"] == pytest.approx(1 / (len(x) * record["strength"])) and record["C"] == pytest.approx(min(C_GRID, key=lambda c: abs(c - record["C"])))
    reference = sklearn.LogisticRegression(C=record["C"], tol=1e-10, max_iter=10000)
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
    strongest = strengths_for(len(x))[0]
    assert all(row["val_top1"] == 1.0 for row in record["tried"]) and record["strength"] == strongest
    # ... though the weakest penalty fits the validation split with the lowest loss
    assert min(record["tried"], key=lambda row: row["val_loss"])["strength"] != strongest


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


def test_a_body_whose_every_feature_barely_varies_gets_a_head_the_runtimes_agree_on():
    """Every feature near-constant (an untrained body's can be): the floor
    against the other features' spread does not bind, the one against each
    feature's own magnitude does, so runtime differences (~1e-5 of a
    feature) cannot flip predictions."""
    rng = np.random.RandomState(0)
    x = (5.0 + 1e-7 * rng.randn(60, 8)).astype("float32")
    y = rng.randint(0, 3, 60)
    weight, bias, _ = solve_head(x, y, x, y, 3)
    jitter = x * (1 + 1e-5 * rng.randn(*x.shape)).astype("float32")
    np.testing.assert_allclose(_softmax(jitter @ weight + bias), _softmax(x @ weight + bias), atol=1e-3)


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
    # The plain cached view alone; refitted with the validation images.
    assert init["C"] == pytest.approx(min(C_GRID, key=lambda c: abs(c - init["C"]))) and init["samples"] == solved["train_images"]
    assert init["refit_samples"] > init["samples"] and solved["history"][0]["epoch"] == 0
    assert json.loads((tmp_path / "solved" / "metrics.json").read_text())["strategy"]["head_init"] == init

    plain = train(load_config(None, [f"Global.output_dir={tmp_path / 'plain'}", "Transfer.head_init=random",
                                     *common]))
    assert plain["strategy"]["head_init"] is None
    # Without a validation split there is nothing to choose the strength on: the head starts as built.
    unsplit = train(load_config(None, [f"Global.output_dir={tmp_path / 'unsplit'}", *common,
                                       "DataLoader.Train.val_fraction=0"]))
    assert unsplit["strategy"]["head_init"] is None



def test_the_refit_is_scikit_learns_optimum_at_that_strength():
    sklearn = pytest.importorskip("sklearn.linear_model", reason="the reference solver is scikit-learn's")
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(7, 50)
    weight, bias = refit_head(x, y, 0.01, 3)
    scaler = StandardScaler().fit(x)
    reference = sklearn.LogisticRegression(C=0.01, tol=1e-10, max_iter=10000)
    reference.fit(scaler.transform(x), y)
    np.testing.assert_allclose(_softmax(x @ weight + bias), reference.predict_proba(scaler.transform(x)), atol=2e-3)


@pytest.mark.slow
def test_the_probe_ships_scikit_learns_optimum_where_training_epochs_would_move_it(colour_folder, tmp_path,
                                                                                   monkeypatch):
    """At a learning rate that throws the head off its optimum, no epoch
    scores higher on the validation split than the solved head, so
    best_model is the textbook probe: the logistic regression at the chosen
    strength refitted on training + validation features, scikit-learn's
    optimum (C = 1 / (samples x strength), on standardised features)."""
    sklearn = pytest.importorskip("sklearn.linear_model", reason="the reference solver is scikit-learn's")
    monkeypatch.setattr(train_module, "write_report", lambda run_dir: run_dir)  # the report is not under test
    captured, cached_datasets = {}, fit_module.cached_datasets

    def capturing(*args, **kwargs):
        train_data, plain, *rest = cached_datasets(*args, **kwargs)
        captured.update(train=train_data, eval=plain[0], val=plain[1])
        return (train_data, plain, *rest)

    monkeypatch.setattr(fit_module, "cached_datasets", capturing)
    train_root, val_root = colour_folder(tmp_path / "train", 12, 0), colour_folder(tmp_path / "val", 4, 1)
    metrics = train(load_config(None, [
        f"Global.output_dir={tmp_path / 'run'}", "Global.epochs=3", "Arch.name=mobilenet_v1",
        "Arch.kwargs={scale: 0.25}", "Arch.input_size=32", "Arch.pretrained=false", "Transfer.strategy=linear_probe",
        "Optimizer.lr.learning_rate=50.0", "DataLoader.Train.val_fraction=0.3",
        f"DataLoader.Train.dataset.root={train_root}", f"DataLoader.Eval.dataset.root={val_root}",
        "DataLoader.Train.num_workers=0", "DataLoader.Eval.num_workers=0"]))
    assert metrics["best_epoch"] == 0
    history = {row["epoch"]: row for row in metrics["history"]}
    assert all(history[e]["val_loss"] > history[0]["val_loss"] for e in (1, 2, 3))  # the epochs moved it

    def head(prefix):
        weights = paddle.load(str(tmp_path / "run" / prefix) + ".pdparams")
        return np.asarray(weights["fc.weight"]), np.asarray(weights["fc.bias"])

    x = np.concatenate([captured["train"].views[0], captured["val"].views[0]]).astype("float32")
    y = np.concatenate([captured["train"].labels, captured["val"].labels]).reshape(-1)
    eval_x = captured["eval"].views[0].astype("float32")
    # Standardised as the solve does: a feature of this untrained body that barely varies is divided by a
    # floor, not by its ~0 spread (test_a_feature_that_barely_varies_is_not_blown_up).
    spread = x.std(axis=0)
    mean, scale = x.mean(axis=0), np.maximum(spread, 0.01 * spread.mean() + 1e-12)
    reference = sklearn.LogisticRegression(C=metrics["strategy"]["head_init"]["C"], tol=1e-10,
                                           max_iter=10000).fit((x - mean) / scale, y)
    expected = reference.predict_proba((eval_x - mean) / scale)
    weight, bias = head(BEST_MODEL)
    np.testing.assert_allclose(_softmax(eval_x @ weight + bias), expected, atol=5e-3)
