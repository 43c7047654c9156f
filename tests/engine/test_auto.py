"""`auto` that measures: the candidates the four-quadrant rule orders, the
measured best chosen (also where the rule would have chosen otherwise),
the budget, and a real run that records and resumes its choice."""

import dataclasses
import json

import pytest

from paddle_tl.config import load_config
from paddle_tl.engine import auto
from paddle_tl.engine import train as train_module
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.transfer.plan import plan_transfer
from tests.engine.test_train import make_cfg


# The validation split of the tests that measure: 4,000 images, one standard
# error of a top-1 near 0.9 is under half a point.
VAL = [2000, 2000]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _trial(scores, clock, seconds=10.0, refuse=(), epoch_seconds=1.0, head_epoch_seconds=None, complete=()):
    """A trial that `takes` `seconds`, scores what `scores` says for the
    candidate the config describes, and finds the run's epochs would take
    `epoch_seconds` (`head_epoch_seconds` those that train the head alone);
    the candidates in `complete` trained their whole schedule."""
    def trial(cfg, epochs):
        name = {("linear_probe", "linear"): "linear_probe", ("linear_probe", "mlp"): "mlp_head"}.get(
            (cfg.Transfer.strategy, cfg.Arch.head.type),
            f"lp_ft_{'top' if cfg.Transfer.freeze_stages == 4 else 'two'}")
        if name in refuse:
            raise ConfigError(f"Arch.head: {name} cannot run here")
        clock.now += seconds
        return auto.Trial(scores[name], 1 - scores[name], head_epoch_seconds or epoch_seconds, epoch_seconds,
                          complete=name in complete)
    return trial


def test_auto_trains_the_measured_best_where_the_rule_would_keep_the_features(monkeypatch):
    """Small, ImageNet-like data: the rule keeps the features (a linear
    probe); measured, the top stage fine-tuned after a probe is better, and
    that is what trains."""
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto", "Global.epochs=10"])
    rule = plan_transfer(cfg.Transfer, 5, [40, 40], True, similarity={"separability": 0.9})
    assert rule.strategy == "linear_probe"
    scores = {"linear_probe": 0.80, "mlp_head": 0.82, "lp_ft_top": 0.91, "lp_ft_two": 0.89}
    winner, record, _ = auto.measure(cfg, _trial(scores, clock), auto.candidates(cfg, 5, [40, 40]), VAL)
    assert [row["name"] for row in record["candidates"]] == ["linear_probe", "mlp_head", "lp_ft_top", "lp_ft_two"]
    assert [row["val_top1"] for row in record["candidates"]] == [0.80, 0.82, 0.91, 0.89]
    assert record["chosen"] == "lp_ft_top"
    # a head on features trains the run's epochs; LP-FT its probe (half of them), then 2 of fine-tuning
    assert [row["epochs"] for row in record["candidates"]] == [10, 10, 7, 7]
    assert (winner.Transfer.strategy, winner.Transfer.freeze_stages, winner.Global.epochs) == ("lp_ft", 4, 10)
    assert "lp_ft_top (a linear probe, then the top stage fine-tuned) won, validation top-1 0.9100" in \
        record["reason"]


def test_large_data_measures_fine_tuning_first_and_ties_go_to_the_lower_loss(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto"])
    scores = {"linear_probe": 0.9, "mlp_head": 0.9, "lp_ft_top": 0.9, "lp_ft_two": 0.9}
    trial = _trial(scores, clock)

    def lower_loss_for_mlp(variant, epochs):
        measured = trial(variant, epochs)
        return dataclasses.replace(measured, val_loss=measured.val_loss - (0.1 if variant.Arch.head.type == "mlp"
                                                                           else 0))

    _, record, _ = auto.measure(cfg, lower_loss_for_mlp, auto.candidates(cfg, 5, [600, 700]), VAL)
    assert [row["name"] for row in record["candidates"]] == ["lp_ft_top", "lp_ft_two", "linear_probe", "mlp_head"]
    assert record["chosen"] == "mlp_head"


def test_the_budget_stops_measuring_before_half_of_it_is_spent(monkeypatch):
    """A 10-minute budget, 140 s a trial: two candidates measured; a third,
    at the same pace, would end past half the budget (420 s > 300 s). The
    winner then trains for Global.epochs, which fit in the rest."""
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto", "Global.epochs=30", "Transfer.auto_budget_minutes=10"])
    scores = {"linear_probe": 0.7, "mlp_head": 0.75, "lp_ft_top": 0.9, "lp_ft_two": 0.9}
    winner, record, _ = auto.measure(cfg, _trial(scores, clock, seconds=140), auto.candidates(cfg, 5, [40, 40]), VAL)
    assert [row.get("skipped") for row in record["candidates"]] == [None, None, "budget", "budget"]
    assert record["chosen"] == "mlp_head" and winner.Global.epochs == 30 and winner.Arch.head.type == "mlp"
    clock.now = 1000.0
    _, record, _ = auto.measure(cfg, _trial(scores, clock, seconds=400), auto.candidates(cfg, 5, [40, 40]), VAL,
                             started=clock.now - 100)  # 100 s went to caching before the first trial
    assert [row.get("skipped") for row in record["candidates"]] == [None, "budget", "budget", "budget"]


def test_the_winner_trains_the_epochs_that_fit_in_the_rest_of_the_budget(monkeypatch):
    """Two 140 s trials leave 320 s of a 10-minute budget; the winner's
    trial says an epoch of the run takes 40 s: it trains 8 of the 30 epochs
    (its learning-rate schedule spans those 8), and a resumed run reads the
    same from the record."""
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto", "Global.epochs=30", "Transfer.auto_budget_minutes=10"])
    scores = {"linear_probe": 0.7, "mlp_head": 0.75, "lp_ft_top": 0.9, "lp_ft_two": 0.9}
    winner, record, _ = auto.measure(cfg, _trial(scores, clock, seconds=140, epoch_seconds=40),
                                  auto.candidates(cfg, 5, [40, 40]), VAL)
    assert winner.Global.epochs == 8 and record["epochs"] == 8 and winner.Arch.head.type == "mlp"
    assert "it trains 8 of Global.epochs=30, all that fit (about 40 s an epoch, 320 s of the budget left)" in \
        record["reason"]
    resumed = auto.restore(json.loads(json.dumps(record)), cfg)
    assert (resumed.Global.epochs, resumed.Arch.head.type) == (8, "mlp")
    older = {key: value for key, value in record.items() if key not in ("overrides", "epochs")}
    assert (auto.restore(older, cfg).Global.epochs, auto.restore(older, cfg).Arch.head.type) == (30, "mlp")


def test_a_lead_inside_the_noise_goes_to_the_complete_candidate_not_an_undertrained_one(monkeypatch):
    """Issue 22's Caltech-101 case: the linear probe (0.9228) and the MLP
    head (0.9160) completed their schedules in their trials; lp_ft_top led
    by 0.17 points (0.9245) on 578 validation images, one standard error
    1.1 points, and its schedule (5 probe epochs at 3.6 s, 5 fine-tuning at
    110 s) does not fit in the 330 s left. The choice before the rule
    trained lp_ft_top for the 4 epochs that fit; now the linear probe wins,
    as measured, with nothing left to train."""
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto", "Global.epochs=10", "Transfer.auto_budget_minutes=10"])
    scores = {"linear_probe": 0.9228, "mlp_head": 0.9160, "lp_ft_top": 0.9245, "lp_ft_two": 0.92}
    trial = _trial(scores, clock, seconds=90, head_epoch_seconds=3.6, epoch_seconds=110,
                   complete={"linear_probe", "mlp_head"})
    winner, record, trials = auto.measure(cfg, trial, auto.candidates(cfg, 5, [57] * 101), [578])
    assert [row.get("skipped") for row in record["candidates"]] == [None, None, None, "budget"]
    assert record["chosen"] == "linear_probe" and record["complete"] and record["epochs"] == 10
    assert (winner.Transfer.strategy, winner.Global.epochs) == ("linear_probe", 10)
    rule = record["rule"]
    assert rule["standard_error"] == pytest.approx(auto.standard_error(0.9228, [578], "top1"), abs=1e-6)
    assert rule["standard_error"] == pytest.approx((0.9228 * 0.0772 / 578) ** 0.5, abs=1e-4)
    assert rule["tied"] == ["linear_probe", "mlp_head"] and rule["val_images"] == 578
    rows = {row["name"]: row for row in record["candidates"] if "val_top1" in row}
    assert rows["lp_ft_top"]["seconds_to_train"] == pytest.approx(5 * 3.6 + 5 * 110) and not rows["lp_ft_top"]["fits"]
    assert rows["linear_probe"]["seconds_to_train"] == 0 and set(trials) == set(rows)
    assert "could not train their schedule in the 330 s left" in record["reason"]
    # The best it measured stays lp_ft_top: the run ships it where it ends below (train.keep_best_measured).
    assert train_module._best_measured(record, "top1")["name"] == "lp_ft_top"


def test_a_clear_lead_that_fits_still_wins_and_trains():
    """Outside the noise the better candidate wins even though it costs more."""
    cfg = load_config(None, ["Global.epochs=10"])
    rows = [{"name": "linear_probe", "overrides": ["Transfer.strategy=linear_probe"], "val_top1": 0.80,
             "val_loss": 0.5, "complete": True, "head_epoch_seconds": 1, "epoch_seconds": 1},
            {"name": "lp_ft_top", "overrides": ["Transfer.strategy=lp_ft"], "val_top1": 0.86, "val_loss": 0.4,
             "complete": False, "head_epoch_seconds": 1, "epoch_seconds": 20}]
    best, rule = auto.choose(cfg, rows, 1000, [300, 300], "top1")
    assert best["name"] == "lp_ft_top" and rule["tied"] == ["lp_ft_top"]
    assert best["seconds_to_train"] == 5 * 1 + 5 * 20
    best, _ = auto.choose(cfg, rows, 50, [300, 300], "top1")  # its schedule does not fit: the complete one wins
    assert best["name"] == "linear_probe"


def test_standard_errors():
    def adjusted(p, n):  # Agresti-Coull for one standard error: half a success added, n + 1 trials
        q = (p * n + 0.5) / (n + 1)
        return q * (1 - q) / (n + 1)

    assert auto.standard_error(0.9, [50, 50], "top1") == pytest.approx(adjusted(0.9, 100) ** 0.5)
    assert auto.standard_error(0.9, [50, 50], "top1") == pytest.approx((0.09 / 100) ** 0.5, rel=0.05)
    # A perfect score on few images is no certainty: 24 images at 1.0 keep a standard error near 3 points.
    assert auto.standard_error(1.0, [12, 12], "top1") == pytest.approx(adjusted(1.0, 24) ** 0.5)
    assert auto.standard_error(1.0, [12, 12], "top1") > 0.025
    # balanced accuracy: the mean of K recalls, each on its class's images
    assert auto.standard_error(0.8, [10, 90], "balanced_accuracy") == pytest.approx(
        (adjusted(0.8, 10) + adjusted(0.8, 90)) ** 0.5 / 2)
    assert auto.standard_error(0.8, [], "top1") == 0.0


def test_the_run_ships_the_best_measured_candidate_where_it_ends_below_it():
    from paddle_tl.engine.callbacks import RunState
    measured = train_module.Measured("lp_ft_top", None, None, {}, 0.9245, auto.Trial(0.9245, 0.3, 1, 1), ())
    kept = train_module.Kept(auto.Trial(0.9228, 0.3, 1, 1), True, measured, {})
    run = train_module.Run("cpu", 1, False, None, None)  # not rank 0: nothing written
    state = RunState(seed=1, class_names=["a"], epochs=10, best_top1=0.9228)
    assert train_module.keep_best_measured(None, run, state, kept) is measured
    state.best_top1 = 0.9245  # as good: the run's own best epoch ships
    assert train_module.keep_best_measured(None, run, state, kept) is None
    assert train_module.keep_best_measured(None, run, state, None) is None  # not auto


def test_an_lp_ft_winner_counts_its_cheap_probe_epochs_apart():
    """LP-FT probes for half its epochs at 2 s each and fine-tunes the rest
    at 40 s: 14 epochs fit in 320 s (7 x 2 + 7 x 40 = 294; 15 would take 334)."""
    winner = auto.configured(load_config(None, ["Global.epochs=30"]), ("Transfer.strategy=lp_ft",))
    assert auto.epochs_left(winner, 320, 2, 40) == (14, "14 of Global.epochs=30, all that fit (about 2.0 s a probe "
                                                        "epoch, 40 s a fine-tuning one, 320 s of the budget left)")
    assert auto.epochs_left(winner, 2000, 2, 40)[0] == 30


def test_epochs_left():
    probe = load_config(None, ["Global.epochs=10", "Transfer.strategy=linear_probe"])
    assert auto.epochs_left(probe, 500, 40, 40)[0] == 10  # all fit
    assert auto.epochs_left(probe, 399, 40, 40)[0] == 9
    assert auto.epochs_left(probe, -5, 40, 40) == (1, "1 of Global.epochs=10, all that fit (about 40 s an epoch, "
                                                      "0 s of the budget left)")  # one epoch, even past the budget


def test_a_candidate_the_architecture_cannot_run_is_skipped_with_its_reason(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(auto.time, "time", clock)
    cfg = load_config(None, ["Transfer.strategy=auto"])
    scores = {"linear_probe": 0.7, "mlp_head": 0.99, "lp_ft_top": 0.8, "lp_ft_two": 0.75}
    _, record, _ = auto.measure(cfg, _trial(scores, clock, refuse={"mlp_head"}), auto.candidates(cfg, 5, [40, 40]), VAL)
    assert record["candidates"][1]["skipped"] == "Arch.head: mlp_head cannot run here"
    assert record["chosen"] == "lp_ft_top"
    with pytest.raises(ConfigError, match="no candidate could be measured: linear_probe: Arch.head"):
        auto.measure(cfg, _trial(scores, clock, refuse=set(scores)), auto.candidates(cfg, 5, [40, 40]), VAL)


def test_trials_train_heads_as_the_run_would_and_cut_fine_tuning_short():
    probe, mlp, lp_ft_top, _ = auto.candidates(load_config(None, ["Global.epochs=10"]), 5, [40, 40])
    cfg = load_config(None, ["Global.epochs=10"])
    assert probe.trial_epochs(cfg) == mlp.trial_epochs(cfg) == 10
    assert lp_ft_top.trial_epochs(cfg) == 7  # 5 probing, 2 fine-tuning
    assert lp_ft_top.trial_epochs(load_config(None, ["Global.epochs=10", "Transfer.lp_epochs=3"])) == 5
    assert lp_ft_top.trial_epochs(load_config(None, ["Global.epochs=1"])) == 1  # the run only probes, so does its trial


def test_a_head_the_user_chose_is_kept():
    cfg = load_config(None, ["Transfer.strategy=auto", "Arch.head.type=linear"])
    assert "mlp_head" not in [c.name for c in auto.candidates(cfg, 5, [40, 40])]


@pytest.mark.slow
def test_auto_measures_records_and_resumes_its_choice(workspace, tmp_path, shared_dir, monkeypatch):
    """A real run: every candidate trained on the training images minus
    the validation split and scored on it; the best by (top-1, loss) trains
    the run, metrics.json and auto.json record why; a resumed run trains the
    same choice without measuring again."""
    weights = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
    common = ("Transfer.strategy=auto", f"Arch.pretrained={weights}", "Global.epochs=3")
    metrics = train(make_cfg(workspace, tmp_path / "run", *common, "Global.epochs=2"))
    strategy = metrics["strategy"]
    rows = strategy["candidates"]
    assert [row["name"] for row in rows] == ["linear_probe", "mlp_head", "lp_ft_top", "lp_ft_two"]
    best = min(rows, key=lambda row: (-row["val_top1"], row["val_loss"], rows.index(row)))
    record = json.loads((tmp_path / "run" / "auto.json").read_text())
    assert record["chosen"] == best["name"] and record["candidates"] == rows
    assert strategy["requested"] == "auto" and strategy["reason"].startswith("measured 4 candidates")
    assert strategy["strategy"] == {"linear_probe": "linear_probe", "mlp_head": "linear_probe"}.get(best["name"],
                                                                                                   "lp_ft")
    assert metrics["epochs_run"] == 2
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<th>validation top-1</th>" in page and all(f"<td>{row['name']}</td>" in page for row in rows)

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(auto, "measure", measure_again)
    resumed = train(make_cfg(workspace, tmp_path / "run", *common, f"Global.resume={tmp_path / 'run'}"))
    assert resumed["epochs_run"] == 3 and resumed["strategy"]["strategy"] == strategy["strategy"]
    assert resumed["strategy"]["candidates"] == rows


@pytest.mark.slow
def test_trials_train_on_capped_classes_with_weights_for_those_counts(workspace, tmp_path, shared_dir, monkeypatch,
                                                                     colour_folder):
    """Imbalanced data (10, 10 and 2 images: a class-weighted loss for the
    run); capped at 2 images a class the trials are balanced, so their loss
    is unweighted."""
    from paddle_tl.engine import train as train_module
    root = colour_folder(tmp_path / "imbalanced", 10, 3)
    for extra in sorted((root / "blue").iterdir())[2:]:
        extra.unlink()
    monkeypatch.setattr(auto, "TRIAL_IMAGES_PER_CLASS", 2)
    losses = []
    build_loss = train_module.build_loss
    monkeypatch.setattr(train_module, "build_loss", lambda cfg, weights: losses.append(weights) or build_loss(
        cfg, weights))
    weights = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
    metrics = train(make_cfg(workspace, tmp_path / "run", "Transfer.strategy=auto", f"Arch.pretrained={weights}",
                             "Global.epochs=1", f"DataLoader.Train.dataset.root={root}",
                             "DataLoader.Train.val_fraction=0.2", "Loss.class_weights=auto"))
    assert metrics["class_weights"] is not None  # the run's loss is weighted
    # four trials, the best measured scored for shipping (its loss unused), then the run
    assert losses[:4] == [None] * 4 and losses[-1] == metrics["class_weights"]
    assert metrics["selection_metric"] == "balanced_accuracy" and metrics["strategy"]["rule"]["metric"] == \
        "balanced_accuracy"


@pytest.mark.slow
def test_a_winner_with_an_mlp_head_is_what_config_yaml_eval_and_export_see(workspace, tmp_path, shared_dir,
                                                                          monkeypatch):
    import yaml

    from paddle_tl.cli import main
    only_mlp = [candidate for candidate in auto.candidates(load_config(None, []), 5, [40, 40])
                if candidate.name == "mlp_head"]
    monkeypatch.setattr(auto, "candidates", lambda *args: only_mlp)
    weights = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Transfer.strategy=auto", f"Arch.pretrained={weights}",
                             "Global.epochs=1"))
    assert metrics["strategy"]["requested"] == "auto" and metrics["strategy"]["strategy"] == "linear_probe"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["Arch"]["head"]["type"] == "mlp" and written["Transfer"]["strategy"] == "linear_probe"
    assert (run / "report" / "index.html").is_file()
    assert main(["eval", str(run)]) == 0 and main(["export", str(run), "--output", str(tmp_path / "inf")]) == 0


@pytest.mark.slow
def test_a_run_that_ends_below_a_measured_candidate_ships_that_candidate(workspace, tmp_path, shared_dir, monkeypatch):
    """The linear probe wins (on a 2-image-a-class cap no trial is complete,
    so it trains); the MLP head is made the best measured (its score raised
    past any the run can reach): its trial's weights ship, and best_model,
    config.yaml, eval and export all see its MLP head."""
    import yaml

    from paddle_tl.cli import main
    from paddle_tl.runs.checkpoint import load_state
    two = [c for c in auto.candidates(load_config(None, []), 5, [40, 40]) if c.name in ("linear_probe", "mlp_head")]
    monkeypatch.setattr(auto, "candidates", lambda *args: two)
    monkeypatch.setattr(auto, "TRIAL_IMAGES_PER_CLASS", 2)
    monkeypatch.setattr(train_module, "_best_measured", lambda record, metric: dict(
        next(row for row in record["candidates"] if row["name"] == "mlp_head"), val_top1=1.01))
    weights = shared_dir / "weights" / "mobilenet_v1_x0.25_imagenet.pdparams"
    run = tmp_path / "run"
    metrics = train(make_cfg(workspace, run, "Transfer.strategy=auto", f"Arch.pretrained={weights}",
                             "Global.epochs=1"))
    record = json.loads((run / "auto.json").read_text())
    assert not record["complete"] and record["shipped"]["name"] == "mlp_head"
    assert metrics["strategy"]["shipped"]["name"] == "mlp_head" and metrics["strategy"]["shipped"]["source"] == "trial"
    assert yaml.safe_load((run / "config.yaml").read_text())["Arch"]["head"]["type"] == "mlp"
    assert load_state(run / "best_model")["model"]["head_config"]["type"] == "mlp"
    assert metrics["selection_metric"] == "top1"
    assert main(["eval", str(run)]) == 0 and main(["export", str(run), "--output", str(tmp_path / "inf")]) == 0
