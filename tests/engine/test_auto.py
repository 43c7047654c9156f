"""`auto` that measures: the candidates the four-quadrant rule orders, the
measured best chosen (also where the rule would have chosen otherwise),
the budget, and a real run that records and resumes its choice."""

import dataclasses
import json

import pytest

from paddle_tl.config import load_config
from paddle_tl.engine import auto
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError
from paddle_tl.transfer.plan import plan_transfer
from tests.engine.test_train import make_cfg


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _trial(scores, clock, seconds=10.0, refuse=(), epoch_seconds=1.0, head_epoch_seconds=None):
    """A trial that `takes` `seconds`, scores what `scores` says for the
    candidate the config describes, and finds the run's epochs would take
    `epoch_seconds` (`head_epoch_seconds` those that train the head alone)."""
    def trial(cfg, epochs):
        name = {("linear_probe", "linear"): "linear_probe", ("linear_probe", "mlp"): "mlp_head"}.get(
            (cfg.Transfer.strategy, cfg.Arch.head.type),
            f"lp_ft_{'top' if cfg.Transfer.freeze_stages == 4 else 'two'}")
        if name in refuse:
            raise ConfigError(f"Arch.head: {name} cannot run here")
        clock.now += seconds
        return auto.Trial(scores[name], 1 - scores[name], head_epoch_seconds or epoch_seconds, epoch_seconds)
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
    winner, record = auto.measure(cfg, _trial(scores, clock), auto.candidates(cfg, 5, [40, 40]))
    assert [row["name"] for row in record["candidates"]] == ["linear_probe", "mlp_head", "lp_ft_top", "lp_ft_two"]
    assert [row["val_top1"] for row in record["candidates"]] == [0.80, 0.82, 0.91, 0.89]
    assert record["chosen"] == "lp_ft_top"
    # a head on features trains the run's epochs; LP-FT its probe (half of them), then 2 of fine-tuning
    assert [row["epochs"] for row in record["candidates"]] == [10, 10, 7, 7]
    assert (winner.Transfer.strategy, winner.Transfer.freeze_stages, winner.Global.epochs) == ("lp_ft", 4, 10)
    assert "lp_ft_top (a linear probe, then the top stage fine-tuned) scored best, validation top-1 0.9100" in \
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

    _, record = auto.measure(cfg, lower_loss_for_mlp, auto.candidates(cfg, 5, [600, 700]))
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
    winner, record = auto.measure(cfg, _trial(scores, clock, seconds=140), auto.candidates(cfg, 5, [40, 40]))
    assert [row.get("skipped") for row in record["candidates"]] == [None, None, "budget", "budget"]
    assert record["chosen"] == "mlp_head" and winner.Global.epochs == 30 and winner.Arch.head.type == "mlp"
    clock.now = 1000.0
    _, record = auto.measure(cfg, _trial(scores, clock, seconds=400), auto.candidates(cfg, 5, [40, 40]),
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
    winner, record = auto.measure(cfg, _trial(scores, clock, seconds=140, epoch_seconds=40),
                                  auto.candidates(cfg, 5, [40, 40]))
    assert winner.Global.epochs == 8 and record["epochs"] == 8 and winner.Arch.head.type == "mlp"
    assert "it trains 8 of Global.epochs=30, all that fit (about 40 s an epoch, 320 s of the budget left)" in \
        record["reason"]
    resumed = auto.restore(json.loads(json.dumps(record)), cfg)
    assert (resumed.Global.epochs, resumed.Arch.head.type) == (8, "mlp")
    older = {key: value for key, value in record.items() if key not in ("overrides", "epochs")}
    assert (auto.restore(older, cfg).Global.epochs, auto.restore(older, cfg).Arch.head.type) == (30, "mlp")


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
    _, record = auto.measure(cfg, _trial(scores, clock, refuse={"mlp_head"}), auto.candidates(cfg, 5, [40, 40]))
    assert record["candidates"][1]["skipped"] == "Arch.head: mlp_head cannot run here"
    assert record["chosen"] == "lp_ft_top"
    with pytest.raises(ConfigError, match="no candidate could be measured: linear_probe: Arch.head"):
        auto.measure(cfg, _trial(scores, clock, refuse=set(scores)), auto.candidates(cfg, 5, [40, 40]))


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
                             "DataLoader.Train.val_fraction=0.2"))
    assert metrics["class_weights"] is not None  # the run's loss is weighted
    assert losses[:-1] == [None] * 4 and losses[-1] == metrics["class_weights"]  # four trials, then the run


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
