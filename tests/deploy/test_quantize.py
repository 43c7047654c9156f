"""INT8 export (`export --int8`): the accuracy gate refuses a model that loses
more than --max_drop and leaves nothing behind, accepts one within it and
writes quantization.json, and infer.py runs the INT8 folder with no extra
flags at the accuracy quantization.json records.

The model is the session's tiny trained run (random-init mobilenet_v1 x0.25
at 64 px, one epoch on red/green/blue images). A model that small quantizes
unpredictably, so the cases set --max_drop instead of relying on its
accuracy: -1 (INT8 would have to beat fp32 by the whole scale) refuses any
model, 1 accepts any."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from paddle_tl import cli
from paddle_tl.errors import ConfigError
from paddle_tl.models.static import StaticModel, declared_input_shape
from paddle_tl.predict.predictor import Predictor
from paddle_tl.predict.predictor import main as infer_main

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {"fp32_top1", "int8_top1", "drop", "fp32_size_bytes", "int8_size_bytes",
                 "fp32_images_per_second", "int8_images_per_second", "backend", "calibration_images", "method"}


@pytest.fixture(scope="module")
def int8_folder(trained_run, tmp_path_factory):
    """The trained run exported with --int8 --max_drop 1 over an existing
    inference folder holding a stale file: (folder, printed output)."""
    out = tmp_path_factory.mktemp("int8") / "inference"
    out.mkdir()
    (out / "inference.yml").write_text("arch: an older export\n")  # export replaces inference folders only
    (out / "stale.txt").write_text("from an older export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        done = subprocess.run([sys.executable, str(REPO / "tools" / "export_model.py"), str(trained_run.dir),
                               "--output", str(out), "--int8", "--max_drop", "1"],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_gate_refuses_a_drop_above_max_drop_and_keeps_the_existing_folder(trained_run, tmp_path, capsys):
    out = tmp_path / "inference"
    out.mkdir()
    (out / "inference.yml").write_text("arch: an earlier export\n")
    (out / "keep.txt").write_text("an earlier export")
    code = cli.main(["export", str(trained_run.dir), "--output", str(out), "--int8", "--max_drop", "-1",
                     "--calib_images", "9"])
    assert code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: INT8 top-1 ") and "against fp32 top-1 " in message
    assert "exceeds --max_drop -1.0" in message and f"nothing was written to {out}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference"]  # no staging folder left beside it
    assert sorted(p.name for p in out.iterdir()) == ["inference.yml", "keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier export"


@pytest.mark.slow
def test_gate_refusal_exits_non_zero_and_creates_no_folder(trained_run, tmp_path):
    """The PaddleClas form, as a user runs it: a refused model leaves no folder."""
    out = tmp_path / "inference"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "export_model.py"), "-c", str(trained_run.config),
                           "-o", f"Global.pretrained_model={trained_run.best}",
                           "-o", f"Global.save_inference_dir={out}", "--int8", "--max_drop=-1",
                           "--calib_images", "6"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "against fp32 top-1" in done.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gate_accepts_and_writes_quantization_json(int8_folder, trained_run):
    out, printed = int8_folder
    assert "exported mobilenet_v1 INT8 (3 classes)" in printed
    report = json.loads((out / "quantization.json").read_text())
    assert REQUIRED_KEYS <= set(report)
    assert report["drop"] == pytest.approx(report["fp32_top1"] - report["int8_top1"])
    assert report["drop"] <= report["max_drop"] == 1.0
    assert report["backend"] == "paddle"
    assert report["calibration_images"] == 18  # the whole Train split: fewer than the default 200
    assert 0 < report["int8_size_bytes"] < report["fp32_size_bytes"]
    assert report["int8_images_per_second"] > 0 and report["fp32_images_per_second"] > 0
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["precision"] == "int8" and meta["backend"] == "paddle"
    assert meta["quantization_file"] == "quantization.json"
    assert set(meta["files"]) == {meta["model_file"], meta["params_file"]}  # what the predictor checks on load
    assert report["int8_size_bytes"] == sum((out / meta[key]).stat().st_size for key in ("model_file", "params_file"))
    # The folder was replaced as a whole: nothing stale in it, nothing left beside it.
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["inference"]


@pytest.mark.slow
def test_infer_on_the_int8_folder_matches_its_quantization_json(int8_folder, trained_run, capsys):
    out, _ = int8_folder
    infer_main(["--model_dir", str(out), "--input", str(trained_run.val), "--eval"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(json.loads((out / "quantization.json").read_text())["int8_top1"])
    infer_main(["--model_dir", str(out), "--input", str(trained_run.val), "--top_k", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 12 and all(len(row["label_names"]) == 1 for row in rows)


@pytest.mark.slow
def test_an_int8_folder_refuses_another_backend(int8_folder):
    out, _ = int8_folder
    assert Predictor(out).backend == "paddle"
    # The quantized program still declares its input, so an edited input size is refused there too.
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert declared_input_shape(out / meta["model_file"]) == [-1, 3, 64, 64]
    with pytest.raises(ConfigError, match="INT8 model for the paddle backend"):
        Predictor(out, backend="onnx")
    with pytest.raises(ConfigError, match="runs on CPU with oneDNN"):
        Predictor(out, use_mkldnn=False)


def test_int8_runs_only_on_cpu_with_onednn(tmp_path):
    for kwargs in ({"device": "gpu"}, {"use_mkldnn": False}):
        with pytest.raises(ConfigError, match="runs on CPU with oneDNN"):
            StaticModel(tmp_path / "inference.pdmodel", tmp_path / "inference.pdiparams", int8=True, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--max_drop", "0.02"], "--calib_images and --max_drop apply only with --int8"),
    (["--calib_images", "50"], "--calib_images and --max_drop apply only with --int8"),
    (["--int8", "--onnx"], "export --onnx into another folder"),
])
def test_export_refuses_int8_options_that_do_not_go_together(tmp_path, capsys, argv, message):
    # Pairs of flags (paddle_tl/flags.py, every one in tests/test_flags.py): one line, exit code 2.
    assert cli.main(["export", str(tmp_path), "--output", str(tmp_path / "out"), *argv]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_export_refuses_fewer_than_one_calibration_image(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli.main(["export", str(tmp_path), "--output", str(tmp_path / "out"), "--int8", "--calib_images", "0"])
    assert exited.value.code == 2
    assert "--calib_images must be >= 1" in capsys.readouterr().err


@pytest.mark.slow  # about 10 s on 2 cores: calibration and two oneDNN predictors
def test_efficientnet_lite0_quantizes_every_convolution_and_predicts(tmp_path, colour_folder):
    """A second family through the same path: EfficientNet-Lite's ReLU6 and
    its TensorFlow-"SAME"-padded (depthwise) convolutions, which MobileNet
    does not have. Random weights at 64 px: the gate is opened (--max_drop 1),
    what is checked is that every convolution and the classifier got INT8
    weights and that the published folder predicts what quantization.json
    says it scored."""
    import numpy as np
    from paddle.base.proto import framework_pb2

    from paddle_tl.deploy.quantize import export_int8
    from paddle_tl.models.zoo import build_model
    from paddle_tl.runs.checkpoint import save_checkpoint
    from paddle_tl.runs.run_folder import run_config
    from paddle_tl.runtime import import_paddle

    paddle = import_paddle()
    classes = ["red", "green", "blue"]
    run = tmp_path / "run"
    run.mkdir()
    paddle.seed(0)
    save_checkpoint(run / "best_model", build_model("efficientnet_lite0", len(classes)),
                    state={"class_names": classes})
    val = colour_folder(tmp_path / "val", 2, 1)
    out = tmp_path / "int8"
    export_int8(run_config(run, [f"Global.save_inference_dir={out}", "Arch.name=efficientnet_lite0",
                                 "Arch.input_size=64", f"DataLoader.Train.dataset.root="
                                 f"{colour_folder(tmp_path / 'train', 2, 0)}",
                                 f"DataLoader.Eval.dataset.root={val}"]), calib_images=6, max_drop=1.0)

    report = json.loads((out / "quantization.json").read_text())
    assert REQUIRED_KEYS <= set(report) and report["eval_images"] == 6
    assert 0 < report["int8_size_bytes"] < report["fp32_size_bytes"] / 3  # INT8 weights: about a quarter
    meta = yaml.safe_load((out / "inference.yml").read_text())
    assert meta["precision"] == "int8" and meta["arch"] == "efficientnet_lite0"

    program = framework_pb2.ProgramDesc()
    program.ParseFromString((out / meta["model_file"]).read_bytes())
    ops = program.blocks[0].ops
    made_by = {name: op.type for op in ops for var in op.outputs for name in var.arguments}
    weighted = {"conv2d": "Filter", "depthwise_conv2d": "Filter", "matmul_v2": "Y"}
    weights = [(op.type, made_by.get(var.arguments[0])) for op in ops if op.type in weighted
               for var in op.inputs if var.parameter == weighted[op.type]]
    # Lite0: stem, 16 blocks (15 expand), head; 16 depthwise; one classifier.
    assert sorted({kind for kind, _ in weights}) == ["conv2d", "depthwise_conv2d", "matmul_v2"]
    assert len(weights) == 1 + 16 + 15 + 16 + 1 + 1
    assert {source for _, source in weights} == {"dequantize_linear"}

    predictor = Predictor(out)
    images = np.stack([predictor.preprocess(path) for path in sorted(val.rglob("*.png"))])
    logits = predictor.predict_arrays(images)
    assert logits.shape == (6, 3) and np.isfinite(logits).all()
    labels = [classes.index(path.parent.name) for path in sorted(val.rglob("*.png"))]
    assert float(np.mean(logits.argmax(1) == labels)) == pytest.approx(report["int8_top1"])
