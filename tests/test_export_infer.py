"""Export to a static model and Paddle Inference prediction: parity with the
dynamic graph, inference.yml driving preprocessing, unreadable images, and the
command line. The run folder is made from random weights, without training."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from paddle_tl import cli
from paddle_tl.backend import import_paddle
from paddle_tl.checkpoint import save_checkpoint
from paddle_tl.config import load_config
from paddle_tl.data import build_dataset, load_rgb
from paddle_tl.export import ExportError, export
from paddle_tl.inference import Predictor, list_inputs
from paddle_tl.inference import main as infer_main
from paddle_tl.run_folder import trained_model
from paddle_tl.transforms import Preprocess, eval_transform

paddle = import_paddle()

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
TOLERANCE = 1e-4


def _batch_norms(network):
    return [layer for layer in network.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]


@pytest.fixture
def run(tmp_path, tiny_image_folder):
    """A finished run's best_model (random mobilenet_v1 x0.25 weights), its
    Eval image folder, and the overrides that export it at input size 64."""
    paddle.seed(0)
    network = paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=len(CLASSES))
    # Running statistics away from (0, 1), so that a BatchNorm traced in
    # training mode (batch statistics) would show in the logits.
    rng = np.random.RandomState(0)
    for bn in _batch_norms(network):
        bn._mean.set_value(rng.uniform(-0.5, 0.5, bn._mean.shape).astype("float32"))
        bn._variance.set_value(rng.uniform(0.5, 2.0, bn._variance.shape).astype("float32"))
    prefix = tmp_path / "run" / "best_model"
    prefix.parent.mkdir()
    save_checkpoint(prefix, network, state={"class_names": CLASSES})
    data = tiny_image_folder(classes=CLASSES, per_class=4, size=(80, 60))
    overrides = ["Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}", "Arch.input_size=64",
                 f"Global.pretrained_model={prefix}", f"Global.save_inference_dir={tmp_path / 'inference'}",
                 f"DataLoader.Eval.dataset.root={data}"]
    return SimpleNamespace(prefix=prefix, data=data, overrides=overrides, tmp=tmp_path,
                           inference=tmp_path / "inference")


def _config(run, *extra):
    return load_config(None, [*run.overrides, *extra])


@pytest.fixture
def exported(run):
    export(_config(run))
    return run.inference


def _evaluation(run):
    """What `paddle-tl eval` works with: the trained network and the Eval
    dataset's paths and preprocessed images."""
    cfg = _config(run)
    network, _, pre, class_names = trained_model(cfg)
    dataset = build_dataset(cfg.DataLoader.Eval.dataset, "eval", eval_transform(pre), class_names=class_names)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    return network, [path for path, _ in dataset.samples], images


def _logits(network, images):
    with paddle.no_grad():
        return network(paddle.to_tensor(images)).numpy()


# ---------------------------------------------------------------- export

def test_export_writes_inference_folder(run, capsys):
    out = export(_config(run))
    assert out == run.inference
    assert (out / "inference.pdiparams").is_file()
    assert (out / "inference.json").is_file() or (out / "inference.pdmodel").is_file()
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["arch"] == "mobilenet_v1"
    assert meta["num_classes"] == 3 and meta["class_names"] == CLASSES
    assert meta["preprocess"] == {"input_size": 64, "resize_short": 73, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225], "channel_order": "RGB",
                                  "interpolation": "bilinear", "scale": 1 / 255}
    assert (out / meta["model_file"]).is_file() and meta["params_file"] == "inference.pdiparams"
    assert meta["paddle_version"] == paddle.__version__
    assert meta["exported_from"] == str(run.prefix)
    printed = capsys.readouterr().out
    assert "parity on 8 Eval images" in printed and "top-1 agreement 8/8" in printed


@pytest.mark.parametrize("use_mkldnn", [True, False], ids=["onednn", "no-onednn"])
def test_predictor_matches_dynamic_graph(run, exported, use_mkldnn):
    predictor = Predictor(exported, use_mkldnn=use_mkldnn, batch_size=5)
    network, _, eval_images = _evaluation(run)
    images = np.concatenate([eval_images, np.random.RandomState(1).standard_normal((7, 3, 64, 64)).astype("float32")])
    expected = _logits(network, images)
    logits = predictor.predict_arrays(images)
    max_diff = float(np.abs(logits - expected).max())
    print(f"oneDNN {'on' if use_mkldnn else 'off'}: max |logit diff| {max_diff:.2e} over {len(images)} inputs")
    assert logits.shape == (len(images), 3)
    assert max_diff < TOLERANCE
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_predictions_match_evaluation(run, exported):
    """predict_paths on image files gives the softmax of the dynamic network on
    the very arrays evaluation feeds it."""
    network, paths, images = _evaluation(run)
    records = list(Predictor(exported).predict_paths(paths, top_k=3))
    logits = _logits(network, images)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for path, record, expected in zip(paths, records, probabilities):
        assert record["file"] == path
        assert record["class_ids"] == list(np.argsort(-expected))
        assert record["label_names"] == [CLASSES[i] for i in record["class_ids"]]
        np.testing.assert_allclose(record["scores"], np.sort(expected)[::-1], atol=1e-5)


def test_parity_check_fails_on_tampered_params(run, monkeypatch):
    real_save = paddle.jit.save

    def save_tampered(network, path, **kwargs):
        # What reaches the disk differs from the network the check compares with.
        bias = network.fc.bias
        original = bias.numpy()
        bias.set_value(original + 0.01)
        real_save(network, path, **kwargs)
        bias.set_value(original)

    monkeypatch.setattr(paddle.jit, "save", save_tampered)
    with pytest.raises(ExportError, match=r"does not reproduce.*1\.00e-02 > 0\.0001"):
        export(_config(run))


def test_parity_falls_back_to_random_inputs(run, capsys):
    export(_config(run, f"DataLoader.Eval.dataset.root={run.tmp / 'missing'}"), parity_images=3)
    printed = capsys.readouterr().out
    assert "parity on 3 random inputs (Eval dataset unavailable:" in printed
    assert "top-1 agreement 3/3" in printed


def test_bn_frozen_network_exports_in_inference_form(run, monkeypatch, capsys):
    """BatchNorm frozen the way transfer.apply_plan does (use_global_stats)
    exports with its running statistics and passes the parity check."""
    import paddle_tl.export as export_module

    def frozen_model(cfg):
        network, spec, pre, class_names = trained_model(cfg)
        for bn in _batch_norms(network):
            bn._use_global_stats = True
        return network, spec, pre, class_names

    monkeypatch.setattr(export_module, "trained_model", frozen_model)
    export(_config(run))
    assert "top-1 agreement 8/8" in capsys.readouterr().out
    network, _, images = _evaluation(run)
    np.testing.assert_allclose(Predictor(run.inference).predict_arrays(images), _logits(network, images),
                               atol=TOLERANCE)


# ---------------------------------------------------------------- inference.yml

def test_inference_yml_drives_preprocessing(run):
    export(_config(run, "Arch.input_size=96"))
    predictor = Predictor(run.inference)
    image = list_inputs(run.data)[0]
    assert predictor.pre == Preprocess(96, 110, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert predictor.preprocess(image).shape == (3, 96, 96)
    with pytest.raises(ValueError, match=r"\[N, 3, 96, 96\]"):
        predictor.predict_arrays(np.zeros((1, 3, 64, 64), np.float32))

    meta_file = run.inference / "inference.yml"
    meta = yaml.safe_load(meta_file.read_text())
    meta["preprocess"].update(resize_short=128, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    meta_file.write_text(yaml.safe_dump(meta))
    edited = Predictor(run.inference)
    expected = eval_transform(Preprocess(96, 128, (0.5,) * 3, (0.5,) * 3))(load_rgb(image))
    np.testing.assert_array_equal(edited.preprocess(image), expected)

    meta["preprocess"]["interpolation"] = "nearest"
    meta_file.write_text(yaml.safe_dump(meta))
    with pytest.raises(ExportError, match="interpolation 'nearest' is not supported"):
        Predictor(run.inference)


def test_missing_inference_folder_is_one_line_error(tmp_path, capsys):
    image = tmp_path / "x.png"
    assert cli.main(["infer", "--model_dir", str(tmp_path / "nowhere"), "--input", str(image)]) == 2
    assert cli.main(["infer", "--model_dir", str(tmp_path), "--input", str(image)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: inference folder {tmp_path / 'nowhere'} does not exist; "
                      "write one with tools/export_model.py",
                      f"error: {tmp_path} has no inference.yml: not an inference folder written by "
                      "tools/export_model.py"]


# ---------------------------------------------------------------- infer

def test_unreadable_image_is_reported_and_skipped(run, exported, caplog):
    folder = run.tmp / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = sorted(run.data.rglob("*.png"))[:2]
    (folder / "a.png").write_bytes(good[0].read_bytes())
    (folder / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "sub" / "c.png").write_bytes(good[1].read_bytes())
    (folder / "notes.txt").write_text("not an image extension: never listed")

    records = list(Predictor(exported, batch_size=2).predict_paths(list_inputs(folder), top_k=1))
    assert [Path(r["file"]).name for r in records] == ["a.png", "b_corrupt.jpg", "c.png"]
    assert "error" in records[1] and "b_corrupt.jpg" in records[1]["error"] and "class_ids" not in records[1]
    assert all(len(records[i]["class_ids"]) == 1 for i in (0, 2))
    assert "b_corrupt.jpg" in caplog.text


def test_infer_main_writes_jsonl(run, exported, capsys):
    output = run.tmp / "out" / "predictions.jsonl"
    listing = run.tmp / "list.txt"
    images = list_inputs(run.data)
    # a list file: relative paths with an optional label, one missing file
    listing.write_text(f"{os.path.relpath(images[0], run.tmp)} 0\n\n{os.path.relpath(images[5], run.tmp)}\n"
                       "data/gone.png 2\n")
    infer_main(["--model_dir", str(exported), "--input", str(listing), "--top_k", "2",
                "--output", str(output), "--no_mkldnn", "--cpu_threads", "1"])
    lines = output.read_text().splitlines()
    assert capsys.readouterr().out.splitlines() == lines
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [images[0], images[5], str(run.tmp / "data" / "gone.png")]
    for record in records[:2]:
        assert set(record) == {"file", "class_ids", "scores", "label_names"}
        assert len(record["class_ids"]) == 2 and record["scores"] == sorted(record["scores"], reverse=True)
        assert all(isinstance(i, int) for i in record["class_ids"])
        assert record["label_names"] == [CLASSES[i] for i in record["class_ids"]]
    assert set(records[2]) == {"file", "error"}


def test_command_line_tools(run, tmp_path):
    """export_model.py and infer.py the way a user runs them."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"Arch": {"name": "mobilenet_v1", "kwargs": {"scale": 0.25}, "input_size": 64},
                                      "DataLoader": {"Eval": {"dataset": {"root": str(run.data)}}}}))
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    exported = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_model.py"), "-c", str(config),
         "-o", f"Global.pretrained_model={run.prefix}", "-o", f"Global.save_inference_dir={run.inference}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert "top-1 agreement 8/8" in exported.stdout

    output = tmp_path / "predictions.jsonl"
    inferred = subprocess.run(
        [sys.executable, str(REPO / "tools" / "infer.py"), "--model_dir", str(run.inference),
         "--input", str(run.data), "--top_k", "1", "--output", str(output), "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert inferred.returncode == 0, inferred.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 12 and all(r["label_names"][0] in CLASSES for r in records)
    assert inferred.stdout.splitlines() == output.read_text().splitlines()
