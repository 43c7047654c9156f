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
from paddle_tl.files import file_digest, publish_folder
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
# files: the size and sha256 of each model file as exported; infer and serve refuse a
# folder whose files differ (torn, or from another export).
"""


def export(cfg, parity_images=8, tolerance=1e-4, onnx=False):
    """Write Global.save_inference_dir from Global.pretrained_model and return
    the folder; with onnx, also inference.onnx. Unless parity_images is 0, up
    to that many Eval images go through both the trained network and each
    exported model; a logit difference beyond `tolerance` or any different
    top-1 raises ExportError. All or nothing: the folder is written and
    checked beside the target, then replaces it whole (files.publish_folder),
    so a failure or a kill leaves the previous folder as it was."""
    if onnx:  # refused before any work when the onnx extra is missing
        import_onnx_package("paddle2onnx")
        import_onnx_package("onnxruntime")
    # On CPU both sides compute in plain fp32, so the tolerance means the same on every machine.
    paddle.set_device("cpu")
    network, spec, pre, class_names = trained_model(cfg)
    out_dir = check_target(cfg.Global.save_inference_dir)
    parity = _parity_inputs(cfg, pre, class_names, parity_images) if parity_images > 0 else None

    def write(folder):
        model_file = save_static(network, pre.input_size, folder)
        meta = inference_meta(cfg, spec, pre, class_names, model_file)
        if onnx:
            meta["onnx_file"] = save_onnx(folder, model_file)
        meta["files"] = file_records(folder, [model_file, PARAMS_FILE] + ([meta["onnx_file"]] if onnx else []))
        (folder / META_FILE).write_text(META_HEADER + yaml.safe_dump(meta, sort_keys=False))
        if parity is not None:  # checked where it was written: only a folder that passes is published
            for backend in ("paddle", "onnx") if onnx else ("paddle",):
                images, source = parity
                check_parity(network, Predictor(folder, backend=backend), images, tolerance, source, out_dir)

    publish_folder(out_dir, write, what="Global.save_inference_dir")
    print(f"exported {spec.name} ({len(class_names)} classes) to {out_dir}")
    return out_dir


def check_target(out_dir):
    """Global.save_inference_dir as a Path, refused when it is a file, or a
    folder with files but no inference.yml: export replaces the folder whole,
    and must not take anything else with it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"Global.save_inference_dir: {out_dir} is a file, not a folder")
    if out_dir.is_dir() and not (out_dir / META_FILE).is_file() and any(out_dir.iterdir()):
        raise ExportError(f"Global.save_inference_dir: {out_dir} holds files but no {META_FILE}, so it is not an "
                          "inference folder, and export replaces the folder whole; choose a new or empty folder")
    return out_dir


def file_records(folder, names):
    """{name: {bytes, sha256}} of the model files as written, for inference.yml:
    the predictor refuses files that are not these (predictor.check_file)."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
            for name in names}


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


def check_parity(network, predictor, images, tolerance, source="inputs", out_dir=None):
    """Compare the dynamic network with the exported model on `images`; print
    one line, raise ExportError on a mismatch (naming out_dir, the folder
    that was then left as it was). Returns (max abs logit difference, number
    of top-1 disagreements)."""
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
        where = f"; nothing was written to {out_dir}" if out_dir is not None else ""
        raise ExportError(f"the exported model {Path(predictor.model_file).name} does not reproduce the trained "
                          f"network ({'; '.join(problems)}); do not deploy it{where}")
    return max_diff, disagreements
