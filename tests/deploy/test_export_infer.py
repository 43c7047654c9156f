"""Export to a static model (and ONNX) and prediction with Paddle Inference
(and onnxruntime): parity with the dynamic graph, inference.yml driving
preprocessing, unreadable images, evaluation on a labelled folder, the
benchmark and the command line. The run folder is made from random weights,
without training."""

import csv
import errno
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
from paddle_tl.calibration import softmax
from paddle_tl.config import load_config
from paddle_tl.data.datasets import build_dataset, load_rgb
from paddle_tl.data.transforms import Preprocess, eval_transform
from paddle_tl.deploy.export import export
from paddle_tl.engine.evaluate import evaluate
from paddle_tl.errors import ConfigError, ExportError
from paddle_tl.files import file_digest
from paddle_tl.predict.predictor import OnnxModel, Predictor, evaluate_folder, folder_logits, list_inputs
from paddle_tl.predict.predictor import main as infer_main
from paddle_tl.predict.predictor import time_batches
from paddle_tl.runs.checkpoint import save_checkpoint
from paddle_tl.runs.run_folder import trained_model
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

REPO = Path(__file__).resolve().parents[2]
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
    return _random_run(tmp_path, tiny_image_folder, network, ["Arch.name=mobilenet_v1", "Arch.kwargs={scale: 0.25}"])


def _random_run(tmp_path, tiny_image_folder, network, arch_overrides):
    """The run folder of `network` (random weights) for the architecture
    `arch_overrides` name, exported at input size 64."""
    # BatchNorm statistics of one batch of random inputs. With paddle's own
    # initialisation (mean 0, variance 1) the signal dies out on the way and
    # the logits are the same for every image to 1e-8, so that no test could
    # tell one image, or one preprocessing, from another. The statistics are
    # also far from those of any Eval batch, so that a BatchNorm traced in
    # training mode (batch statistics) would show in the logits.
    for bn in _batch_norms(network):
        bn._momentum = 0.0  # running statistics := this batch's
    network.train()
    with paddle.no_grad():
        network(paddle.to_tensor(np.random.RandomState(0).uniform(-2, 2, (16, 3, 64, 64)).astype("float32")))
    network.eval()
    prefix = tmp_path / "run" / "best_model"
    prefix.parent.mkdir()
    save_checkpoint(prefix, network, state={"class_names": CLASSES})
    data = tiny_image_folder(classes=CLASSES, per_class=4, size=(80, 60))
    overrides = [*arch_overrides, "Arch.input_size=64",
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


def _require_onnx():
    for name in ("paddle2onnx", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (the onnx extra)")


@pytest.fixture
def onnx_exported(run):
    """The inference folder exported with --onnx (skips without the onnx extra)."""
    _require_onnx()
    export(_config(run), onnx=True)
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
    assert "onnx_file" not in meta and not (out / "inference.onnx").exists()
    printed = capsys.readouterr().out
    assert "Paddle Inference parity on 8 Eval images" in printed and "top-1 agreement 8/8" in printed
    assert "onnxruntime" not in printed


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
    with pytest.raises(ExportError, match=r"does not reproduce.*1\.00e-02 > \d\.\de-0\d"):
        export(_config(run))


def test_parity_falls_back_to_random_inputs(run, capsys):
    export(_config(run, f"DataLoader.Eval.dataset.root={run.tmp / 'missing'}"), parity_images=3)
    printed = capsys.readouterr().out
    assert "parity on 3 random inputs (Eval dataset unavailable:" in printed
    assert "top-1 agreement 3/3" in printed


def test_bn_frozen_network_exports_in_inference_form(run, monkeypatch, capsys):
    """BatchNorm frozen the way transfer.apply_plan does (use_global_stats)
    exports with its running statistics and passes the parity check."""
    import paddle_tl.deploy.export as export_module

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


@pytest.mark.parametrize("onnx", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["paddle", "onnx"])
def test_efficientnet_lite0_exports_with_parity(tmp_path, tiny_image_folder, capsys, onnx):
    """Lite's TensorFlow "SAME" padding (asymmetric at stride 2) survives
    export: Paddle Inference, and onnxruntime, reproduce the dynamic graph."""
    if onnx:
        _require_onnx()
    from paddle_tl.models.zoo import build_model

    paddle.seed(0)
    network = build_model("efficientnet_lite0", len(CLASSES))
    lite = _random_run(tmp_path, tiny_image_folder, network, ["Arch.name=efficientnet_lite0"])
    out = export(_config(lite), onnx=onnx)
    printed = capsys.readouterr().out
    backends = ("Paddle Inference", "onnxruntime") if onnx else ("Paddle Inference",)
    for backend in backends:
        assert f"{backend} parity on 8 Eval images" in printed
    assert printed.count("top-1 agreement 8/8") == len(backends)
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["arch"] == "efficientnet_lite0"
    assert meta["preprocess"]["mean"] == [127 / 255] * 3 and meta["preprocess"]["std"] == [128 / 255] * 3

    network, _, eval_images = _evaluation(lite)
    images = np.concatenate([eval_images, np.random.RandomState(1).standard_normal((5, 3, 64, 64)).astype("float32")])
    expected = _logits(network, images)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the images give different logits
    predictor = Predictor(out, backend="onnx" if onnx else "paddle", batch_size=4)
    np.testing.assert_allclose(predictor.predict_arrays(images), expected, atol=TOLERANCE)


# ---------------------------------------------------------------- ONNX

@pytest.mark.slow
def test_onnx_export_matches_dynamic_graph(run, capsys):
    _require_onnx()
    out = export(_config(run), onnx=True)
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["onnx_file"] == "inference.onnx" and (out / "inference.onnx").is_file()
    printed = capsys.readouterr().out
    for backend in ("Paddle Inference", "onnxruntime"):
        assert f"{backend} parity on 8 Eval images" in printed
    assert printed.count("top-1 agreement 8/8") == 2

    network, paths, eval_images = _evaluation(run)
    images = np.concatenate([eval_images, np.random.RandomState(1).standard_normal((7, 3, 64, 64)).astype("float32")])
    expected = _logits(network, images)
    onnx = Predictor(out, backend="onnx", batch_size=5)
    logits = onnx.predict_arrays(images)
    max_diff = float(np.abs(logits - expected).max())
    print(f"onnxruntime: max |logit diff| {max_diff:.2e} over {len(images)} inputs")
    assert logits.shape == (len(images), 3) and max_diff < TOLERANCE
    assert (logits.argmax(1) == expected.argmax(1)).all()
    # Same files in, same ranking out, whichever backend runs the model.
    paddle_records = list(Predictor(out).predict_paths(paths, top_k=3))
    for record, reference in zip(onnx.predict_paths(paths, top_k=3), paddle_records):
        assert record["class_ids"] == reference["class_ids"]
        np.testing.assert_allclose(record["scores"], reference["scores"], atol=1e-5)

    # Exporting again without --onnx leaves no stale ONNX model behind.
    export(_config(run), parity_images=0)
    assert not (out / "inference.onnx").exists()
    with pytest.raises(ExportError, match="has no ONNX model; export it with --onnx"):
        Predictor(out, backend="onnx")


def test_onnx_parity_check_fails_on_a_wrong_onnx_model(run, monkeypatch):
    _require_onnx()
    real_run = OnnxModel._run
    monkeypatch.setattr(OnnxModel, "_run", lambda self, chunk: real_run(self, chunk) + 0.01)
    with pytest.raises(ExportError, match=r"inference\.onnx does not reproduce.*1\.00e-02 > \d\.\de-0\d"):
        export(_config(run), onnx=True)


@pytest.mark.slow
def test_missing_onnx_extra_is_one_line_error(run, exported, tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"Arch": {"name": "mobilenet_v1", "kwargs": {"scale": 0.25}, "input_size": 64}}))
    fresh = tmp_path / "fresh"
    for name in ("paddle2onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    assert cli.main(["export", "-c", str(config), "-o", f"Global.pretrained_model={run.prefix}",
                     "-o", f"Global.save_inference_dir={fresh}", "--onnx"]) == 2
    assert not fresh.exists()  # refused before any work
    # a folder that names an ONNX model (which is never read)
    meta = yaml.safe_load((exported / "inference.yml").read_text())
    (exported / "inference.yml").write_text(yaml.safe_dump({**meta, "onnx_file": "inference.onnx"}))
    (exported / "inference.onnx").write_bytes(b"")
    assert cli.main(["infer", "--model_dir", str(exported), "--input", str(run.data), "--backend", "onnx"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2
    for error, name in zip(errors, ("paddle2onnx", "onnxruntime")):
        assert error.startswith(f"error: {name} is not installed") and 'pip install -e ".[onnx]"' in error


# ---------------------------------------------------------------- inference.yml

@pytest.mark.slow
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


def _export_with_the_tool(run, tmp_path, **env_extra):
    """`python tools/export_model.py` in a subprocess, as a user runs it; asserts it passed its parity check."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"Arch": {"name": "mobilenet_v1", "kwargs": {"scale": 0.25}, "input_size": 64},
                                      "DataLoader": {"Eval": {"dataset": {"root": str(run.data)}}}}))
    env = dict(os.environ, HOME=str(tmp_path / "home"), **env_extra)
    exported = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_model.py"), "-c", str(config),
         "-o", f"Global.pretrained_model={run.prefix}", "-o", f"Global.save_inference_dir={run.inference}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert "top-1 agreement 8/8" in exported.stdout
    return env


@pytest.mark.slow
def test_command_line_tools(run, tmp_path):
    """export_model.py and infer.py the way a user runs them."""
    env = _export_with_the_tool(run, tmp_path)

    output = tmp_path / "predictions.jsonl"
    inferred = subprocess.run(
        [sys.executable, str(REPO / "tools" / "infer.py"), "--model_dir", str(run.inference),
         "--input", str(run.data), "--top_k", "1", "--output", str(output), "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert inferred.returncode == 0, inferred.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 12 and all(r["label_names"][0] in CLASSES for r in records)
    assert inferred.stdout.splitlines() == output.read_text().splitlines()


@pytest.mark.slow
def test_legacy_program_export_on_request(run, tmp_path):
    """FLAGS_enable_pir_api=0 (read when paddle is imported) writes the legacy
    inference.pdmodel, for Paddle Inference 2.x; the predictor loads it."""
    _export_with_the_tool(run, tmp_path, FLAGS_enable_pir_api="0")
    assert (run.inference / "inference.pdmodel").is_file() and not (run.inference / "inference.json").exists()
    assert yaml.safe_load((run.inference / "inference.yml").read_text())["model_file"] == "inference.pdmodel"


# ---------------------------------------------------------------- infer --eval, --benchmark, --csv

@pytest.mark.parametrize("backend", ["paddle", "onnx"])
@pytest.mark.slow
def test_infer_eval_matches_evaluate(run, backend, capsys):
    """infer --eval on the Eval folder prints what `paddle-tl eval` prints,
    from the same predicted class for every image."""
    if backend == "onnx":
        _require_onnx()
    export(_config(run), parity_images=0, onnx=backend == "onnx")
    capsys.readouterr()
    infer_main(["--model_dir", str(run.inference), "--input", str(run.data), "--eval", "--backend", backend,
                "--batch_size", "5"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    expected = evaluate(_config(run))
    assert result["num_images"] == expected["num_images"] == 12
    for key in ("top1", "per_class", "confusion_matrix"):
        assert result[key] == expected[key], key
    assert "top5" not in result  # k above the 3 classes is left out, as in evaluation
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-5)

    network, _, images = _evaluation(run)
    predicted = _logits(network, images).argmax(1)
    assert len(set(predicted)) > 1  # a model that predicts one class everywhere would prove nothing
    logits, labels = folder_logits(Predictor(run.inference, backend=backend), run.data)
    assert (logits.argmax(1) == predicted).all()
    assert list(labels) == [CLASSES.index(Path(path).parent.name) for path in sorted(map(str, run.data.rglob("*.*")))]


def test_infer_eval_refuses_unknown_class(run, exported, capsys):
    wolf = run.data / "wolf"
    wolf.mkdir()
    (wolf / "w.png").write_bytes(next(run.data.rglob("*.png")).read_bytes())
    assert cli.main(["infer", "--model_dir", str(exported), "--input", str(run.data), "--eval"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "['wolf'] are not among the training classes" in errors[0]


def test_infer_benchmark_prints_latency_json(run, exported, capsys):
    image = list_inputs(run.data)[0]  # one input: repeated to fill the batches
    infer_main(["--model_dir", str(exported), "--input", image, "--benchmark", "--batch_size", "4",
                "--benchmark_runs", "3"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["backend"] == "paddle" and result["images"] == 1 and result["preprocess_ms_per_image"] > 0
    assert set(result) >= {"batch_1", "batch_4"}
    for key in ("batch_1", "batch_4"):
        timing = result[key]
        assert timing["runs"] == 3 and 0 < timing["p50_ms"] <= timing["p95_ms"] and timing["images_per_s"] > 0


def test_time_batches_warms_up_then_times_each_batch():
    calls = []
    seconds = time_batches(calls.append, ["a", "b", "c"], warmup=2)
    assert calls == ["a", "a", "a", "b", "c"] and seconds.shape == (3,) and (seconds >= 0).all()


@pytest.mark.parametrize("flags, message", [
    (["--gpu_mem", "512"], "--gpu_mem and --trt apply only with --device gpu"),
    (["--trt", "fp16"], "--gpu_mem and --trt apply only with --device gpu"),
    (["--backend", "onnx", "--device", "gpu"], "--backend onnx runs on CPU"),
])
def test_gpu_options_refused_on_cpu(run, exported, capsys, flags, message):
    assert cli.main(["infer", "--model_dir", str(exported), "--input", str(run.data), *flags]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0]


def test_infer_writes_csv(run, exported, capsys):
    folder = run.tmp / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(sorted(run.data.rglob("*.png"))[0].read_bytes())
    (folder / "b_corrupt.jpg").write_bytes(b"not a jpeg")
    table = run.tmp / "out" / "predictions.csv"
    infer_main(["--model_dir", str(exported), "--input", str(folder), "--csv", str(table)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [record["file"] for record in records]
    assert rows[0]["label_name"] == records[0]["label_names"][0] and not rows[0]["error"]
    assert float(rows[0]["score"]) == records[0]["scores"][0]
    assert rows[1]["label_name"] == rows[1]["score"] == "" and "b_corrupt.jpg" in rows[1]["error"]

    with pytest.raises(ConfigError, match="do not apply to --eval"):  # per-image files mean nothing for --eval
        infer_main(["--model_dir", str(exported), "--input", str(run.data), "--eval", "--csv", str(table)])


# ---------------------------------------------------------------- temperature and --reject_below

def _set_temperature(folder, temperature):
    """Edit inference.yml's temperature (None: remove it, as in a folder exported before calibration)."""
    meta_file = folder / "inference.yml"
    meta = yaml.safe_load(meta_file.read_text())
    meta.pop("temperature", None)
    if temperature is not None:
        meta["temperature"] = temperature
    meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))


def test_scores_are_softmax_of_logits_over_the_temperature(run, exported):
    """inference.yml's temperature T: scores are softmax(logits / T), the
    ranking and --eval are those of the logits; a folder without one (older
    exports) and a checkpoint without one (1.0) score with T = 1."""
    assert yaml.safe_load((exported / "inference.yml").read_text())["temperature"] == 1.0
    network, paths, images = _evaluation(run)
    logits = _logits(network, images)
    plain = list(Predictor(exported).predict_paths(paths, top_k=3))
    _set_temperature(exported, 2.5)
    predictor = Predictor(exported)
    assert predictor.temperature == 2.5
    expected = softmax(logits, 2.5)
    for record, before, probabilities in zip(predictor.predict_paths(paths, top_k=3), plain, expected):
        assert record["class_ids"] == before["class_ids"] == list(np.argsort(-probabilities, kind="stable"))
        np.testing.assert_allclose(record["scores"], np.sort(probabilities)[::-1], atol=1e-5)
    assert evaluate_folder(predictor, run.data) == evaluate_folder(Predictor(exported, batch_size=4), run.data)
    _set_temperature(exported, None)
    assert Predictor(exported).temperature == 1.0
    _set_temperature(exported, -1)
    with pytest.raises(ExportError, match="temperature -1 is not a positive number"):
        Predictor(exported)


def test_reject_below_answers_unknown(run, exported, capsys):
    def infer(*flags):
        infer_main(["--model_dir", str(exported), "--input", str(run.data), "--top_k", "2", *flags])
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    plain = infer()
    assert infer("--reject_below", "0") == plain
    for record, rejected in zip(plain, infer("--reject_below", "1.01")):
        # The row keeps its shape and every ranked class; only the first label name says "unknown".
        assert set(rejected) == {"file", "class_ids", "scores", "label_names"}
        assert rejected["label_names"] == ["unknown", *record["label_names"][1:]]
        assert (rejected["file"], rejected["class_ids"], rejected["scores"]) == (
            record["file"], record["class_ids"], record["scores"])
    threshold = float(np.median([record["scores"][0] for record in plain]))
    records = Predictor(exported).predict_paths(list_inputs(run.data), top_k=2, reject_below=threshold)
    unknown = [record["label_names"][0] == "unknown" for record in records]
    assert unknown == [record["scores"][0] < threshold for record in plain] and 0 < sum(unknown) < len(plain)
    with pytest.raises(SystemExit):  # argparse's own check of the value
        infer_main(["--model_dir", str(exported), "--input", str(run.data), "--reject_below", "-0.1"])
    with pytest.raises(ConfigError, match="does not apply to --eval"):  # a pair of flags (flags.py)
        infer_main(["--model_dir", str(exported), "--input", str(run.data), "--reject_below", "0.5", "--eval"])


# ---------------------------------------------------------------- a trained run folder

def test_export_refuses_an_input_size_the_run_did_not_train_at(trained_run, tmp_path, capsys):
    out = tmp_path / "inference"
    assert cli.main(["export", "-c", str(trained_run.config), "-o", f"Global.pretrained_model={trained_run.best}",
                     "-o", f"Global.save_inference_dir={out}", "-o", "Arch.input_size=96"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: Arch.input_size: 96 contradicts the run, which trained with Arch.input_size=64 "
        f"({trained_run.best}); leave it out"]
    assert not out.exists()
    with pytest.raises(ConfigError, match="^Arch.name: resnet18 contradicts the run"):
        export(load_config(trained_run.config, [f"Global.pretrained_model={trained_run.best}",
                                                f"Global.save_inference_dir={out}", "Arch.name=resnet18"]))


def test_export_of_a_run_writes_the_preprocessing_it_trained_with(trained_run, tmp_path):
    """A config that states no Arch at all (mobilenet_v2 and 224 px by
    default, unwritten): the checkpoint's record decides."""
    out = tmp_path / "inference"
    export(load_config(None, [f"Global.pretrained_model={trained_run.best}", f"Global.save_inference_dir={out}"]))
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert (meta["arch"], meta["num_classes"], meta["class_names"]) == ("mobilenet_v1", 3, ["blue", "green", "red"])
    assert meta["preprocess"]["input_size"] == trained_run.input_size == 64
    assert meta["preprocess"]["resize_short"] == 73
    assert Predictor(out).pre == Preprocess(64, 73, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_export_and_eval_of_a_run_folder(trained_run, tmp_path, capsys):
    """`paddle-tl export RUN_DIR --output DIR`, with no config: parity on the
    run's Eval images, and infer --eval on the export prints what `paddle-tl
    eval RUN_DIR` prints."""
    out = tmp_path / "inference"
    assert cli.main(["export", str(trained_run.dir), "--output", str(out)]) == 0
    assert "Paddle Inference parity on 8 Eval images" in capsys.readouterr().out
    assert yaml.safe_load((out / "inference.yml").read_text())["exported_from"] == str(trained_run.best)
    assert cli.main(["eval", str(trained_run.dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1])
    infer_main(["--model_dir", str(out), "--input", str(trained_run.val), "--eval"])
    inferred = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert inferred["num_images"] == evaluated["num_images"] == 12
    for key in ("top1", "per_class", "confusion_matrix"):
        assert inferred[key] == evaluated[key], key
    assert inferred["loss"] == pytest.approx(evaluated["loss"], abs=1e-5)


def test_export_tool_takes_a_run_folder(trained_run, tmp_path):
    out = tmp_path / "inference"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "export_model.py"), str(trained_run.dir),
                           "--output", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HOME=str(tmp_path / "home")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "top-1 agreement 8/8" in done.stdout
    assert yaml.safe_load((out / "inference.yml").read_text())["preprocess"]["input_size"] == 64




def _hand_views(images, mode, size):
    """The views of tta.py written out: the image and its mirror; for
    flip_crops the center and the four corners of the square, each mirrored."""
    if mode == "flip":
        crops = [images]
    else:
        far = images.shape[-1] - size
        crops = [images[..., top:top + size, left:left + size]
                 for top, left in [(far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far)]]
    return [np.ascontiguousarray(view) for crop in crops for view in (crop, crop[..., ::-1])]


@pytest.mark.parametrize("mode", ["flip", "flip_crops"])
def test_tta_is_the_same_in_eval_export_and_infer(run, colour_folder, capsys, monkeypatch, mode):
    """DataLoader.Eval.tta: inference.yml records it, infer applies it with
    no flag (scores: the mean of the views' calibrated probabilities,
    temperature included), and infer --eval predicts what `paddle-tl eval`
    predicts, image for image."""
    import paddle_tl.engine.evaluate as evaluation

    data = colour_folder(run.tmp / "noisy", 3, 0, classes=CLASSES)  # not mirror-symmetric, unlike run.data
    overrides = (f"DataLoader.Eval.tta={mode}", f"DataLoader.Eval.dataset.root={data}")
    export(_config(run, *overrides))
    assert yaml.safe_load((run.inference / "inference.yml").read_text())["tta"] == mode
    network, _, pre, _ = trained_model(_config(run))
    square = Preprocess(pre.resize_short, pre.resize_short, pre.mean, pre.std) if mode == "flip_crops" else pre
    dataset = build_dataset(_config(run, *overrides).DataLoader.Eval.dataset, "eval", eval_transform(square),
                            class_names=CLASSES)
    paths = [path for path, _ in dataset.samples]
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    view_logits = [_logits(network, view) for view in _hand_views(images, mode, pre.input_size)]
    assert len(view_logits) == {"flip": 2, "flip_crops": 10}[mode]
    assert not np.allclose(softmax(view_logits[0]), softmax(view_logits[1]), atol=1e-3)  # the views differ

    evaluated_logits = []
    metrics = evaluation.classification_metrics
    monkeypatch.setattr(evaluation, "classification_metrics",
                        lambda logits, *rest: evaluated_logits.append(logits) or metrics(logits, *rest))
    evaluated = evaluate(_config(run, *overrides))
    capsys.readouterr()
    infer_main(["--model_dir", str(run.inference), "--input", str(data), "--eval", "--batch_size", "4"])
    inferred = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("top1", "per_class", "confusion_matrix", "num_images", "tta"):
        assert inferred[key] == evaluated[key], key
    assert inferred["tta"] == mode and inferred["num_images"] == 9
    assert inferred["loss"] == pytest.approx(evaluated["loss"], abs=1e-5)
    inferred_logits, _ = folder_logits(Predictor(run.inference, batch_size=4), data)
    np.testing.assert_allclose(inferred_logits, evaluated_logits[0], atol=1e-4)
    assert (inferred_logits.argmax(1) == evaluated_logits[0].argmax(1)).all()

    _set_temperature(run.inference, 2.5)  # the views are calibrated before they are averaged
    expected = np.mean([softmax(logits, 2.5) for logits in view_logits], axis=0)
    for record, probabilities in zip(Predictor(run.inference).predict_paths(paths, top_k=3), expected):
        assert record["class_ids"] == list(np.argsort(-probabilities, kind="stable"))
        np.testing.assert_allclose(record["scores"], np.sort(probabilities)[::-1], atol=1e-5)
    meta_file = run.inference / "inference.yml"
    meta_file.write_text(meta_file.read_text().replace(f"tta: {mode}", "tta: crops"))
    with pytest.raises(ExportError, match="tta 'crops' is not one of none, flip, flip_crops; re-export the model"):
        Predictor(run.inference)


# ---------------------------------------------------------------- all or nothing, and folders that do not add up

class Killed(BaseException):
    """Stands for the export process dying (kill -9 runs no cleanup; see the slow test for a real one)."""


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _edit_meta(folder, **changes):
    meta_file = folder / "inference.yml"
    meta = yaml.safe_load(meta_file.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))


def _infer_error(folder, image, capsys):
    """(exit code, stderr lines) of `paddle-tl infer` on the folder."""
    capsys.readouterr()
    code = cli.main(["infer", "--model_dir", str(folder), "--input", str(image)])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("moment", ["after_model_written", "in_parity_check", "before_swap"])
def test_an_interrupted_re_export_leaves_the_previous_folder_whole(run, exported, monkeypatch, moment):
    """Re-exporting at 96 px over the 64 px folder, interrupted at any moment
    before the swap: the folder is byte for byte the previous export, and
    loads with its own preprocessing (the export used to write the new
    model beside the old inference.yml)."""
    import paddle_tl.deploy.export as export_module
    import paddle_tl.files as files

    before = _snapshot(exported)
    beside = sorted(path.name for path in run.tmp.iterdir())
    if moment == "after_model_written":
        real_save = paddle.jit.save
        monkeypatch.setattr(paddle.jit, "save", lambda *args, **kwargs: (real_save(*args, **kwargs), _raise(Killed)))
    elif moment == "in_parity_check":
        monkeypatch.setattr(export_module, "check_parity", lambda *args: _raise(Killed))
    else:
        monkeypatch.setattr(files, "_swap_in", lambda staging, target: _raise(Killed))
    with pytest.raises(Killed):
        export(_config(run, "Arch.input_size=96"))
    assert _snapshot(exported) == before
    assert sorted(path.name for path in run.tmp.iterdir()) == beside  # no staging folder left
    assert Predictor(exported).pre.input_size == 64


def _raise(exc):
    raise exc


def test_re_export_replaces_the_folder_and_records_its_files(run, exported):
    (exported / "inference.onnx").write_bytes(b"a stale ONNX model of an older export")
    export(_config(run, "Arch.input_size=96"), parity_images=0)
    meta = yaml.safe_load((exported / "inference.yml").read_text())
    assert sorted(path.name for path in exported.iterdir()) == sorted([meta["model_file"], "inference.pdiparams",
                                                                       "inference.yml"])
    assert set(meta["files"]) == {meta["model_file"], "inference.pdiparams"}
    for name, record in meta["files"].items():
        assert record == {"bytes": (exported / name).stat().st_size, "sha256": file_digest(exported / name)}
    assert Predictor(exported).pre.input_size == 96


def test_export_refuses_to_replace_a_folder_that_is_not_an_inference_folder(run, capsys):
    config = run.tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"Arch": {"name": "mobilenet_v1", "kwargs": {"scale": 0.25}, "input_size": 64}}))
    (run.tmp / "notes").mkdir()
    (run.tmp / "notes" / "todo.txt").write_text("mine")
    assert cli.main(["export", "-c", str(config), "-o", f"Global.pretrained_model={run.prefix}",
                     "-o", f"Global.save_inference_dir={run.tmp / 'notes'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: Global.save_inference_dir: {run.tmp / 'notes'} holds files but no inference.yml, so it is not an "
        "inference folder, and export replaces the folder whole; choose a new or empty folder"]
    assert _snapshot(run.tmp / "notes") == {"todo.txt": b"mine"}


def test_export_into_a_read_only_folder_is_one_line(run, exported, monkeypatch, capsys):
    """What a read-only mount answers (EROFS) where export creates its
    staging folder (it was a RuntimeError traceback from paddle.jit.save),
    and a write refused half way through: one line naming the folder, the
    previous export untouched."""
    import paddle_tl.files as files

    config = run.tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"Arch": {"name": "mobilenet_v1", "kwargs": {"scale": 0.25}, "input_size": 64}}))
    argv = ["export", "-c", str(config), "-o", f"Global.pretrained_model={run.prefix}",
            "-o", f"Global.save_inference_dir={exported}"]
    before = _snapshot(exported)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(files.tempfile, "mkdtemp", lambda **kwargs: _raise(
            OSError(errno.EROFS, "Read-only file system", os.path.join(kwargs["dir"], "x"))))
        assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: Global.save_inference_dir {exported}: cannot write in {run.tmp} (Read-only file system); "
        f"nothing was written, {exported} is as it was"]
    with monkeypatch.context() as patch:
        patch.setattr(paddle.jit, "save", lambda network, path, **kwargs: _raise(
            PermissionError(errno.EACCES, "Permission denied", f"{path}.pdiparams")))
        assert cli.main(argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "(Permission denied); nothing was written" in errors[0]
    assert _snapshot(exported) == before
    assert sorted(path.name for path in run.tmp.iterdir()) == ["config.yaml", "data", "inference", "run"]


@pytest.mark.parametrize("damage", ["truncated", "truncated_by_one_byte", "from_another_export"])
def test_a_params_file_that_is_not_the_exported_one_is_one_line(run, exported, capsys, damage):
    params = exported / "inference.pdiparams"
    data = params.read_bytes()
    if damage == "truncated":
        params.write_bytes(data[:len(data) // 2])
    elif damage == "truncated_by_one_byte":  # Paddle Inference loads this one without a word
        params.write_bytes(data[:-1])
    else:  # same size, other weights
        params.write_bytes(data[:-4] + bytes(4 * [data[-1] ^ 0xFF]))
    image = list_inputs(run.data)[0]
    code, errors = _infer_error(exported, image, capsys)
    assert code == 2 and len(errors) == 1
    if damage == "from_another_export":
        assert errors[0].startswith(f"error: {params} has sha256 ") and "from another export" in errors[0]
    else:
        assert errors[0].startswith(f"error: {params} is {params.stat().st_size} bytes, but inference.yml "
                                    f"records {len(data)} (cut short")


def test_a_truncated_params_file_of_an_older_export_is_one_line(run, exported, capsys):
    """A folder exported before the files record: Paddle Inference's own
    failure, in one line."""
    _edit_meta(exported, files=None)
    assert Predictor(exported).pre.input_size == 64  # no record: loads, unchecked
    params = exported / "inference.pdiparams"
    params.write_bytes(params.read_bytes()[:1000])
    code, errors = _infer_error(exported, list_inputs(run.data)[0], capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: Paddle Inference cannot load {exported / 'inference.json'} with "
                                "inference.pdiparams (") and errors[0].endswith("); re-export the model")


def test_a_model_file_of_another_export_is_refused(run, exported, capsys):
    """The tester's torn folder: a 96 px model beside the 64 px inference.yml."""
    other = run.tmp / "other"
    export(_config(run, "Arch.input_size=96", f"Global.save_inference_dir={other}"), parity_images=0)
    model_file = yaml.safe_load((exported / "inference.yml").read_text())["model_file"]
    (exported / model_file).write_bytes((other / model_file).read_bytes())
    code, errors = _infer_error(exported, list_inputs(run.data)[0], capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {exported / model_file} ") and "from another export" in errors[0]
    _edit_meta(exported, files=None)  # an older export: the model's own input shape still tells
    with pytest.raises(ExportError, match=r"preprocess\.input_size 64 does not match the input 96x96 of "):
        Predictor(exported)


@pytest.mark.parametrize("size, refused", [(32, True), (64, False), (96, True)])
def test_an_edited_input_size_is_refused(run, exported, capsys, size, refused):
    meta = yaml.safe_load((exported / "inference.yml").read_text())
    _edit_meta(exported, preprocess={**meta["preprocess"], "input_size": size, "resize_short": max(73, size)})
    if not refused:
        assert Predictor(exported).pre.input_size == 64
        return
    code, errors = _infer_error(exported, list_inputs(run.data)[0], capsys)
    assert code == 2 and errors == [
        f"error: {exported / 'inference.yml'}: preprocess.input_size {size} does not match the input 64x64 of "
        f"{meta['model_file']}; set it back to 64 or re-export the model"]


@pytest.mark.parametrize("names", [CLASSES[:2], CLASSES + ["owl"]])
def test_num_classes_must_match_the_models_outputs(run, exported, capsys, names):
    _edit_meta(exported, class_names=names, num_classes=len(names))
    code, errors = _infer_error(exported, list_inputs(run.data)[0], capsys)
    assert code == 2 and errors == [
        f"error: {exported / 'inference.yml'}: num_classes {len(names)} does not match the 3 outputs of "
        f"{yaml.safe_load((exported / 'inference.yml').read_text())['model_file']} (edited, or the files come "
        "from another export); re-export the model"]
    _edit_meta(exported, class_names=CLASSES, num_classes=2)
    with pytest.raises(ExportError, match="num_classes 2 is not a whole number of at least the 3 class_names"):
        Predictor(exported)


_KILLED_EXPORT = """
import sys, time
import paddle_tl.files as files
from paddle_tl.config import load_config
from paddle_tl.deploy.export import export

def wait_to_be_killed(staging, target):
    print("staged", staging, flush=True)
    time.sleep(600)

files._swap_in = wait_to_be_killed
export(load_config(None, sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_export_keeps_the_old_folder_and_the_next_export_cleans_up(run, exported, tmp_path):
    """A real kill -9 of a re-export at 96 px once its folder is written and
    checked, the moment before it takes the old one's place: the folder
    is the old export, serving its own preprocessing; the next export
    removes what the killed one left and publishes."""
    before = _snapshot(exported)
    process = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, *run.overrides, "Arch.input_size=96"],
                               stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path / "home")))
    try:
        for line in process.stdout:
            if line.startswith("staged "):
                break
        else:
            pytest.fail(f"the export ended ({process.wait()}) before staging its folder")
        process.kill()  # SIGKILL: no cleanup runs
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    leftovers = [path.name for path in run.tmp.iterdir() if path.name.startswith(".inference.new-")]
    assert leftovers == [path.name for path in run.tmp.iterdir() if path.name.startswith(".")] and len(leftovers) == 1
    assert _snapshot(run.tmp / leftovers[0])  # the new export, whole, under its staging name
    assert _snapshot(exported) == before and Predictor(exported).pre.input_size == 64
    export(_config(run, "Arch.input_size=96"), parity_images=0)
    assert not [path for path in run.tmp.iterdir() if path.name.startswith(".")]
    assert Predictor(exported).pre.input_size == 96
