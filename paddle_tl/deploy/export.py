"""Export a fine-tuned run as a static Paddle Inference model, and with
`--onnx` also as ONNX (`paddle-tl export`, `tools/export_model.py`), and check
before anyone deploys it that each exported model computes what the trained
network does."""

from pathlib import Path

import numpy as np
import yaml

from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.transforms import eval_transform
from paddle_tl.errors import DataError, ExportError
from paddle_tl.models.static import PARAMS_FILE, PREFIX, save_static
from paddle_tl.predict.predictor import BACKENDS, FIXED_PREPROCESS, META_FILE, Predictor, import_onnx_package
from paddle_tl.runs.run_folder import trained_model, trained_temperature
from paddle_tl.runtime import import_paddle

paddle = import_paddle()

__all__ = ["ExportError", "export"]

ONNX_FILE = f"{PREFIX}.onnx"
# Opset 13 runs on every current onnxruntime, TensorRT (8+) and OpenVINO;
# paddle2onnx raises it by itself where an operator needs a newer one.
ONNX_OPSET = 13

META_HEADER = """\
# Written by paddle_tl export. Preprocessing, in order: decode to 8-bit RGB
# (upright per EXIF), resize the short side to resize_short (bilinear), center-crop
# input_size x input_size, multiply by scale, subtract mean and divide by std per
# channel (channel_order), HWC -> CHW float32. Input "image": [N, 3, input_size,
# input_size]; output: logits [N, num_classes]. Probabilities: softmax(logits / temperature),
# temperature fitted on the run's validation split (1.0: uncalibrated). tta: none runs the
# model once; flip on the input and on its horizontal mirror (reversed along the width
# axis); flip_crops center-crops resize_short x resize_short instead and runs the model on
# five input_size crops of that square (its center, then the top-left, top-right,
# bottom-left and bottom-right corners) and on their mirrors. The prediction is the mean
# of the runs' probabilities, each softmax(logits / temperature).
# onnx_file, when present, is the same model in ONNX, with the same input and output.
"""


def export(cfg, parity_images=8, tolerance=1e-4, onnx=False):
    """Write Global.save_inference_dir from Global.pretrained_model and return
    the folder; with onnx, also inference.onnx. Unless parity_images is 0, up
    to that many Eval images go through both the trained network and each
    exported model; a logit difference beyond `tolerance` or any different
    top-1 raises ExportError."""
    if onnx:  # refused before any work when the onnx extra is missing
        import_onnx_package("paddle2onnx")
        import_onnx_package("onnxruntime")
    # On CPU both sides compute in plain fp32, so the tolerance means the same on every machine.
    paddle.set_device("cpu")
    network, spec, pre, class_names = trained_model(cfg)
    out_dir = Path(cfg.Global.save_inference_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"Global.save_inference_dir: {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    model_file = save_static(network, pre.input_size, out_dir)
    # A stale ONNX model from an older export would not match the new one.
    (out_dir / ONNX_FILE).unlink(missing_ok=True)
    meta = inference_meta(cfg, spec, pre, class_names, model_file)
    if onnx:
        meta["onnx_file"] = save_onnx(out_dir, model_file)
    (out_dir / META_FILE).write_text(META_HEADER + yaml.safe_dump(meta, sort_keys=False))

    if parity_images > 0:
        images, source = _parity_inputs(cfg, pre, class_names, parity_images)
        for backend in ("paddle", "onnx") if onnx else ("paddle",):
            check_parity(network, Predictor(out_dir, backend=backend), images, tolerance, source)
    print(f"exported {spec.name} ({len(class_names)} classes) to {out_dir}")
    return out_dir


def inference_meta(cfg, spec, pre, class_names, model_file):
    """What inference.yml records of every exported model."""
    return {
        "arch": spec.name,
        "num_classes": cfg.Arch.num_classes or len(class_names),
        "class_names": list(class_names),
        "preprocess": {**pre.to_dict(), **FIXED_PREPROCESS},
        "temperature": trained_temperature(cfg),
        "tta": cfg.DataLoader.Eval.tta,
        "model_file": model_file,
        "params_file": PARAMS_FILE,
        "paddle_version": paddle.__version__,
        "exported_from": str(cfg.Global.pretrained_model),
    }


def save_onnx(out_dir, model_file):
    """Convert the saved static model to ONNX with paddle2onnx; returns the ONNX
    file's name."""
    paddle2onnx = import_onnx_package("paddle2onnx")
    target = out_dir / ONNX_FILE
    try:
        # optimize_tool "None": the default Polygraphy pass may pip-install its
        # own dependencies, which fails offline; the converter's own optimizer still runs.
        paddle2onnx.export(str(out_dir / model_file), str(out_dir / PARAMS_FILE), str(target),
                           opset_version=ONNX_OPSET, enable_onnx_checker=True, optimize_tool="None")
    except Exception as exc:  # paddle2onnx logs the cause, then fails on its own missing result
        raise ExportError(f"paddle2onnx {paddle2onnx.__version__} could not convert {out_dir / model_file} "
                          f"to ONNX (its log above says why): {type(exc).__name__}: {exc}") from exc
    if not target.is_file():
        raise ExportError(f"paddle2onnx wrote no {target}")
    return ONNX_FILE


def _parity_inputs(cfg, pre, class_names, count):
    """(images [N, 3, S, S], what they are): Eval images spread over the whole
    split (so over its classes), else deterministic random inputs."""
    try:
        dataset = build_dataset(cfg.DataLoader.Eval.dataset, "eval", eval_transform(pre), class_names=class_names)
    except DataError as exc:
        reason = f"Eval dataset unavailable: {exc}"
    else:
        if len(dataset):
            picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
            return np.stack([dataset[int(i)][0] for i in picks]), f"{len(picks)} Eval images"
        reason = "the Eval dataset has no readable images"
    size = pre.input_size
    images = np.random.RandomState(0).standard_normal((count, 3, size, size)).astype(np.float32)
    return images, f"{count} random inputs ({reason})"


def check_parity(network, predictor, images, tolerance, source="inputs"):
    """Compare the dynamic network with the exported model on `images`; print
    one line, raise ExportError on a mismatch. Returns (max abs logit
    difference, number of top-1 disagreements)."""
    with paddle.no_grad():
        expected = network(paddle.to_tensor(images)).numpy()
    exported = predictor.predict_arrays(images)
    max_diff = float(np.abs(expected - exported).max())
    # Float reordering in oneDNN/onnxruntime grows with the logits' size, so
    # the tolerance is relative to their scale (absolute below magnitude 1).
    allowed = tolerance * max(1.0, float(np.abs(expected).max()))
    disagreements = int((expected.argmax(axis=1) != exported.argmax(axis=1)).sum())
    print(f"{BACKENDS[predictor.backend]} parity on {source}: max |logit difference| {max_diff:.2e} "
          f"(allowed {allowed:.1e}), "
          f"top-1 agreement {len(images) - disagreements}/{len(images)}")
    problems = []
    if not max_diff <= allowed:  # `not <=` so that NaN logits fail too
        problems.append(f"max |logit difference| {max_diff:.2e} > {allowed:.1e}")
    if disagreements:
        problems.append(f"{disagreements} of {len(images)} top-1 predictions differ")
    if problems:
        raise ExportError(f"the exported model {predictor.model_file} does not reproduce the trained network "
                          f"({'; '.join(problems)}); do not deploy it")
    return max_diff, disagreements
