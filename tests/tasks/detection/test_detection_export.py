"""Export of a detection run (tasks/detection/export.py) and prediction
from its inference folder (tasks/detection/predictor.py): parity with the
dynamic network, `infer --eval` equal to `eval`, the JSON lines and drawn
images, and the refusals of a folder of the other task. The run folder is
made in-process from random weights on a synthetic VOC set, without training."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from synthetic_detection import CLASSES, write_voc

from paddle_tl import cli
from paddle_tl.config import load_config
from paddle_tl.errors import ExportError
from paddle_tl.predict.predictor import META_FILE, Predictor
from paddle_tl.runs import BEST_MODEL, CONFIG_FILE
from paddle_tl.runs.checkpoint import save_checkpoint
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.model import build_detector, describe_detector

pytest.importorskip("pycocotools", reason="detection AP needs pycocotools (the `detect` extra)")

from paddle_tl.tasks.detection.evaluate import evaluate_checkpoint  # noqa: E402
from paddle_tl.tasks.detection.export import check_parity  # noqa: E402
from paddle_tl.tasks.detection.predictor import DetectionPredictor  # noqa: E402

paddle = import_paddle()

SIZE = (96, 72)
# Small settings for CPU (test_faster_rcnn.py's): 64 px short side, anchors from 16 px, few proposals.
SMALL = ["Arch.detector.short_side=64", "Arch.detector.max_size=128", "Arch.detector.fpn_channels=32",
         "Arch.detector.representation_size=64", "Arch.detector.anchor_sizes=[16, 32, 64, 128]",
         "Arch.detector.rpn_pre_nms_top_n=[300, 200]", "Arch.detector.rpn_post_nms_top_n=[200, 100]",
         "Arch.pretrained=false"]


def _decisive(model):
    """Spread the heads' scores as training does: random heads (N(0, 0.01))
    give scores that all but tie, and near ties may swap under oneDNN's
    float rounding, which a trained network's scores do not. And call most
    boxes class 0, so that some hit and the AP compared is not 0."""
    rng = np.random.RandomState(0)
    for layer, std in ((model.rpn.head.objectness, 0.3), (model.roi_heads.box_predictor.cls_score, 0.3)):
        layer.weight.set_value((rng.standard_normal(layer.weight.shape) * std).astype("float32"))
    bias = model.roi_heads.box_predictor.cls_score.bias
    bias.set_value(np.array([0, 3] + [0] * (bias.shape[0] - 2), np.float32))  # the head's class 1 is the data's 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("detection_export")
    voc = base / "voc"
    write_voc(voc, {"train": 2, "val": 5}, seed=11, size=SIZE, difficult_every=4)
    run = base / "run"
    cfg = load_config(cli_config(), [*SMALL, f"DataLoader.Train.dataset.root={voc}",
                                     f"DataLoader.Eval.dataset.root={voc}", f"Global.output_dir={run}"])
    record = describe_detector(cfg, list(CLASSES))
    paddle.seed(0)
    model = build_detector(record)
    _decisive(model)
    run.mkdir()
    cfg.save(run / CONFIG_FILE)
    save_checkpoint(run / BEST_MODEL, model, state={"model": record, "class_names": list(CLASSES)})
    return run


def cli_config():
    return Path(__file__).resolve().parents[3] / "configs" / "faster_rcnn_mobilenet_v2_voc.yaml"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("detection_inference") / "inference"
    assert cli.main(["export", str(run_dir), "--output", str(out)]) == 0
    return out


def test_export_writes_a_detection_folder_that_matches_the_network(exported, run_dir, capsys):
    meta = yaml.safe_load((exported / META_FILE).read_text())
    assert meta["task"] == "detection" and meta["class_names"] == list(CLASSES) and meta["num_classes"] == 3
    assert meta["inputs"] == ["image", "im_shape", "scale_factor"]
    assert meta["outputs"] == ["boxes", "scores", "label_ids"]
    assert meta["preprocess"]["short_side"] == 64 and meta["preprocess"]["size_divisor"] == 32
    assert set(meta["files"]) == {meta["model_file"], meta["params_file"]}
    from paddle_tl.runs.run_folder import run_config
    from paddle_tl.tasks.detection.export import parity_dataset
    from paddle_tl.tasks.detection.model import trained_detector
    cfg = run_config(run_dir)
    model, record = trained_detector(cfg)
    dataset, source = parity_dataset(cfg, record, 5)
    box_diff, score_diff, compared = check_parity(model, record, DetectionPredictor(exported), dataset, 1e-2,
                                                  source)
    assert compared > 0 and box_diff <= 1e-2 and score_diff <= 1e-4


def test_infer_eval_gives_evals_ap(exported, run_dir, capsys):
    from paddle_tl.runs.run_folder import run_config
    expected = evaluate_checkpoint(run_config(run_dir))
    voc = run_config(run_dir).DataLoader.Eval.dataset.root
    capsys.readouterr()
    assert cli.main(["infer", "--model_dir", str(exported), "--input", str(voc), "--eval"]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["images"] == expected["images"] == 5 and expected["bbox_ap50"] > 0
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75"):
        assert found[key] == pytest.approx(expected[key], abs=1e-6), key


def test_infer_writes_rows_in_original_pixels_and_draws(exported, run_dir, tmp_path, capsys):
    from paddle_tl.runs.run_folder import run_config
    voc = run_config(run_dir).DataLoader.Eval.dataset.root
    images = Path(voc) / "JPEGImages"
    (images / "broken.jpg").write_bytes(b"not an image")
    try:
        out, drawn = tmp_path / "rows.jsonl", tmp_path / "drawn"
        assert cli.main(["infer", "--model_dir", str(exported), "--input", str(images), "--output", str(out),
                         "--draw", str(drawn), "--draw_threshold", "0"]) == 0
    finally:
        (images / "broken.jpg").unlink()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and "error" in [r for r in rows if r["file"].endswith("broken.jpg")][0]
    good = [r for r in rows if "error" not in r]
    for row in good:
        assert set(row) == {"file", "boxes", "scores", "label_ids", "label_names"}
        boxes = np.array(row["boxes"]).reshape(-1, 4)
        assert len(boxes) == len(row["scores"]) == len(row["label_ids"]) == len(row["label_names"])
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= SIZE[0]).all() and (boxes[:, [1, 3]] <= SIZE[1]).all()
        assert row["label_names"] == [CLASSES[i] for i in row["label_ids"]]
    assert any(len(r["boxes"]) for r in good)
    pictures = sorted(p.name for p in drawn.iterdir())
    assert len(pictures) == 7 and Image.open(drawn / pictures[0]).size == SIZE


def test_a_folder_of_the_other_task_is_refused_in_one_line(exported, tmp_path, tiny_image_folder, capsys):
    with pytest.raises(ExportError, match="holds a detection model"):
        Predictor(exported)
    classification = tmp_path / "classification"
    classification.mkdir()
    meta = yaml.safe_load((exported / META_FILE).read_text())
    meta["task"] = "classification"
    for name in (meta["model_file"], meta["params_file"]):
        (classification / name).write_bytes((exported / name).read_bytes())
    (classification / META_FILE).write_text(yaml.safe_dump(meta))
    with pytest.raises(ExportError, match="holds a classification model"):
        DetectionPredictor(classification)
    assert cli.main(["infer", "--model_dir", str(classification), "--input", str(tmp_path),
                     "--draw", str(tmp_path / "d")]) == 2
    assert "holds a classification model" in capsys.readouterr().err
    assert cli.main(["infer", "--model_dir", str(exported), "--input", str(tmp_path), "--top_k", "3"]) == 2
    assert "--top_k does not apply" in capsys.readouterr().err


def test_serve_answers_detection_rows_and_its_page_draws_them(exported, run_dir):
    pytest.importorskip("httpx", reason="httpx is not installed (the dev extra): FastAPI's TestClient needs it")
    from fastapi.testclient import TestClient

    from paddle_tl.predict.serve import create_app
    from paddle_tl.runs.run_folder import run_config
    image = Path(run_config(run_dir).DataLoader.Eval.dataset.root) / "JPEGImages" / "val_img_000.jpg"
    expected = DetectionPredictor(exported).row(DetectionPredictor(exported).detect(Image.open(image).convert("RGB")))
    with TestClient(create_app(exported)) as client:
        meta = client.get("/metadata").json()
        assert meta["task"] == "detection" and meta["class_names"] == list(CLASSES)
        answer = client.post("/predict", files={"file": ("val_img_000.jpg", image.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200
        row = answer.json()["predictions"][0]
        assert row == {"file": "val_img_000.jpg", **expected}
        refused = client.post("/predict?reject_below=0.5",
                              files={"file": ("val_img_000.jpg", image.read_bytes(), "image/jpeg")})
        assert refused.status_code == 400 and "detects objects" in refused.json()["error"]
        page = client.get("/").text
        assert "showBoxes" in page and "strokeRect" in page


def test_export_without_eval_data_checks_parity_on_random_images(run_dir, tmp_path, capsys):
    out = tmp_path / "inference"
    assert cli.main(["export", str(run_dir), "--output", str(out), "-o",
                     f"DataLoader.Eval.dataset.root={tmp_path / 'gone'}"]) == 0
    printed = capsys.readouterr().out
    assert "parity on 4 random images" in printed and " 0 images differ" in printed
    assert (out / META_FILE).is_file()


@pytest.mark.parametrize("flag", ["--onnx", "--int8"])
def test_onnx_or_int8_export_of_a_detection_run_is_refused(run_dir, tmp_path, flag, capsys):
    assert cli.main(["export", str(run_dir), "--output", str(tmp_path / "out"), flag]) == 2
    assert f"{flag}: not for a detection model yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_without_detections_is_an_empty_row(run_dir, tmp_path, capsys):
    """No box above the score threshold: empty tensors all through the
    graph's postprocessing, which oneDNN's kernels refuse unless the
    predictor keeps them off those ops."""
    import shutil
    strict = tmp_path / "strict_run"
    shutil.copytree(run_dir, strict)
    state_file = strict / f"{BEST_MODEL}.state.json"
    state = json.loads(state_file.read_text())
    state["model"]["detector"]["score_threshold"] = 0.999
    state_file.write_text(json.dumps(state))
    out = tmp_path / "inference"
    assert cli.main(["export", str(strict), "--output", str(out)]) == 0
    assert "0 detections" in capsys.readouterr().out
    image = Path(load_config(strict / CONFIG_FILE).DataLoader.Eval.dataset.root) / "JPEGImages" / "val_img_000.jpg"
    assert list(DetectionPredictor(out).predict_paths([image])) == [
        {"file": str(image), "boxes": [], "scores": [], "label_ids": [], "label_names": []}]


@pytest.mark.slow
def test_detection_page_in_headless_chromium(exported, run_dir, tmp_path, chromium):
    """A person's path: pick an image on the page and see its boxes drawn on
    the canvas over it, listed as the service answers them; the screenshot
    is kept as /tmp/serve_detection_page.png."""
    pytest.importorskip("websocket", reason="websocket-client is not installed (the dev extra)")
    pytest.importorskip("httpx", reason="httpx is not installed (the dev extra)")
    import base64
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from browser import DevTools, open_browser

    from paddle_tl.runs.run_folder import run_config
    image = tmp_path / "big.png"  # enlarged, so the boxes are not drawn at 96 x 72
    source = Path(run_config(run_dir).DataLoader.Eval.dataset.root) / "JPEGImages" / "val_img_000.jpg"
    Image.open(source).resize((384, 288), Image.BILINEAR).save(image)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "paddle_tl.cli", "serve", "--model_dir", str(exported),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        expected = httpx.post(f"{url}/predict", files=[("file", ("big.png", image.read_bytes()))],
                              timeout=60).json()["predictions"][0]
        browser, page_url = open_browser(chromium, tmp_path / "profile")
        try:
            page = DevTools(page_url)
            page.navigate(f"{url}/", 1000, 900, "document.getElementById('title').textContent === 'Object detector'")
            page.pick_file(image)
            page.wait_for("!document.getElementById('canvas').hidden")
            listed = page.evaluate("document.querySelectorAll('#results .detection').length")
            size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
            screenshot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.kill()
            browser.wait()
    finally:
        server.terminate()
        server.wait()
    Path("/tmp/serve_detection_page.png").write_bytes(screenshot)
    assert size == [384, 288]
    assert listed == sum(score >= 0.5 for score in expected["scores"]) > 0


# ---------------------------------------------------------------- the traceable forms, equal to what they replace

@pytest.mark.parametrize("small, large", [((3, 4), (5, 8)), ((4, 4), (8, 8)), ((7, 13), (13, 25)), ((1, 1), (2, 1))])
def test_fpn_upsampling_is_interpolate_nearest_to_the_bit(small, large):
    from paddle_tl.tasks.detection.fpn import upsample_nearest
    x = paddle.rand([2, 3, *small])
    expected = paddle.nn.functional.interpolate(x, size=list(large), mode="nearest").numpy()
    assert np.array_equal(upsample_nearest(x, paddle.zeros([2, 3, *large])).numpy(), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_over_every_class_equals_over_the_classes_present(seed):
    from paddle_tl.tasks.detection.boxes import batched_nms
    rng = np.random.RandomState(seed)
    corners = rng.uniform(0, 50, (60, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(5, 30, (60, 2)).astype(np.float32)], axis=1)
    scores = rng.choice(np.linspace(0.1, 0.9, 12), 60).astype(np.float32)  # ties: the lower index must win
    classes = rng.choice([0, 2, 5], 60)  # classes 1, 3, 4 empty
    present = batched_nms(boxes, scores, classes, 0.5).numpy()
    assert np.array_equal(batched_nms(boxes, scores, classes, 0.5, num_classes=6).numpy(), present)
