"""The report of a detection run (`paddle-tl report RUN`, and written at the
end of training): RUN/report/ with the training curves, per-class
precision-recall curves and the AP table from COCOeval, and the Eval split's
most confident false positives and the objects the model missed, drawn.

False positives and misses are counted as VOC does at IoU 0.5: per image
and class, detections in order of score each take the best-overlapping
object not yet taken (IoU >= 0.5); a detection left without one is a false
positive, an object no detection of score >= MISS_SCORE took is missed.
Difficult and crowd objects count neither way.
"""

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from paddle_tl.data.datasets import load_rgb
from paddle_tl.engine.report import _number, _pyplot, _table
from paddle_tl.errors import ConfigError
from paddle_tl.runs import CONFIG_FILE, METRICS_FILE
from paddle_tl.runs.run_folder import run_config

REPORT_DIR = "report"
MATCH_IOU = 0.5
MISS_SCORE = 0.5  # an object is missed when no detection at least this confident finds it
MAX_SHOWN = 12
TILE = 256


def write_detection_report(run_dir, predictions=None, dataset=None):
    """RUN/report/ (curves.png, pr_curves.png, per_class.csv,
    false_positives.png, misses.png, index.html); returns index.html's path.
    predictions/dataset: the best model's on the Eval split, where the
    caller has them (training's end); otherwise computed here."""
    from paddle_tl.tasks.detection.evaluate import coco_evaluation, predict_eval
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(f"{run_dir} has no metrics.json: not the folder of a finished training run")
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    if predictions is None:
        predictions, dataset = predict_eval(run_config(run_dir))
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plot_history(metrics.get("history", []), out_dir / "curves.png")
    evaluation = coco_evaluation(dataset, predictions)
    rows = ap_rows(evaluation, dataset.class_names) if evaluation is not None else \
        [(name, 0.0, 0.0, 0.0, count) for name, count in dataset.objects_per_class().items()]
    (out_dir / "per_class.csv").write_text("class,AP,AP50,AP75,objects\n" + "".join(
        f"{name},{_csv(ap)},{_csv(ap50)},{_csv(ap75)},{objects}\n" for name, ap, ap50, ap75, objects in rows))
    if evaluation is not None:  # nothing detected: no curves to draw
        plot_pr_curves(evaluation, dataset.class_names, out_dir / "pr_curves.png")
    false_positives, misses = match_errors(dataset, predictions)
    draw_tiles(dataset, false_positives[:MAX_SHOWN], out_dir / "false_positives.png", "false positive")
    draw_tiles(dataset, misses[:MAX_SHOWN], out_dir / "misses.png", "missed")
    config_text = (run_dir / CONFIG_FILE).read_text() if (run_dir / CONFIG_FILE).is_file() else ""
    index = out_dir / "index.html"
    index.write_text(render_html(run_dir, metrics, rows, len(false_positives), len(misses), config_text),
                     encoding="utf-8")
    return index


def _csv(value):
    return "" if value is None else f"{value:.4f}"


def ap_rows(evaluation, class_names):
    """(class, AP, AP50, AP75, objects) per class from COCOeval's precision
    array [T, R, K, A, M] (-1 where a class has no objects), all areas, 100
    detections, as Detectron2's per-class table."""
    precision = evaluation.eval["precision"]
    area, thresholds = evaluation.params.areaRngLbl.index("all"), list(np.round(evaluation.params.iouThrs, 2))
    counts = {}
    for ann in evaluation.cocoGt.dataset["annotations"]:
        if not ann["iscrowd"]:
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    return [(name, mean(precision[:, :, k, area, -1]), mean(precision[thresholds.index(0.5), :, k, area, -1]),
             mean(precision[thresholds.index(0.75), :, k, area, -1]), counts.get(k + 1, 0))
            for k, name in enumerate(class_names)]


def plot_history(history, path):
    """Training loss (and its parts) and the choosing split's AP50 and AP per epoch."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("loss", [key for key in (history[0] if history else {}) if key.startswith("train_loss")]),
              ("box AP", [key for key in (history[-1] if history else {}) if key.endswith(("bbox_ap", "bbox_ap50"))]),
              ("learning rate", ["lr"]))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_pr_curves(evaluation, class_names, path):
    """Precision against recall per class at IoU 0.5 and 0.75 (COCOeval's
    interpolated precision at its 101 recall points)."""
    plt = _pyplot()
    precision = evaluation.eval["precision"]
    recall = evaluation.params.recThrs
    area, thresholds = evaluation.params.areaRngLbl.index("all"), list(np.round(evaluation.params.iouThrs, 2))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, iou in zip(axes, (0.5, 0.75)):
        for k, name in enumerate(class_names):
            values = precision[thresholds.index(iou), :, k, area, -1]
            if (values > -1).any():
                ax.plot(recall, np.where(values > -1, values, 0), label=name)
        ax.set_title(f"precision-recall at IoU {iou}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if len(class_names) <= 20:
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _iou(box, boxes):
    if not len(boxes):
        return np.zeros(0)
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-9)


def match_errors(dataset, predictions):
    """(false positives, misses), each a list of dicts {"index", "box",
    "label", "score"} (a miss: the best score of a detection of its class
    overlapping it at IoU >= 0.5, 0 where none), false positives most
    confident first, misses largest first."""
    false_positives, misses = [], []
    for index, (sample, found) in enumerate(zip(dataset.samples, predictions)):
        ignored = sample.difficult | sample.iscrowd
        for label in range(len(dataset.class_names)):
            truth = sample.boxes[(sample.labels == label) & ~ignored]
            skip = sample.boxes[(sample.labels == label) & ignored]
            mine = np.flatnonzero(found["labels"] == label)
            mine = mine[np.argsort(-found["scores"][mine], kind="stable")]
            taken, best = np.zeros(len(truth), bool), np.zeros(len(truth))
            for d in mine:
                box, score = found["boxes"][d], float(found["scores"][d])
                overlaps = _iou(box, truth)
                if len(truth):
                    best = np.maximum(best, np.where(overlaps >= MATCH_IOU, score, 0))
                free = np.where(taken, -1, overlaps)
                if len(truth) and free.max() >= MATCH_IOU:
                    taken[int(free.argmax())] = True
                elif not (len(skip) and _iou(box, skip).max() >= MATCH_IOU):
                    false_positives.append({"index": index, "box": box, "label": label, "score": score})
            for box, score in zip(truth, best):
                if score < MISS_SCORE:
                    misses.append({"index": index, "box": box, "label": label, "score": float(score)})
    false_positives.sort(key=lambda e: -e["score"])
    misses.sort(key=lambda e: -float((e["box"][2] - e["box"][0]) * (e["box"][3] - e["box"][1])))
    return false_positives, misses


def draw_tiles(dataset, errors, path, what):
    """A grid of TILE-pixel tiles, each an error's image (scaled down) with
    the box drawn in red and the image's other objects in green, captioned."""
    columns = 4
    rows = max(1, -(-len(errors) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + 18)), "white")
    canvas = ImageDraw.Draw(sheet)
    if not errors:
        canvas.text((8, 8), f"no {what} objects", fill="black")
    for n, error in enumerate(errors):
        sample = dataset.samples[error["index"]]
        image = load_rgb(sample.image)
        scale = TILE / max(image.size)
        tile = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))))
        draw = ImageDraw.Draw(tile)
        for box in sample.boxes:
            draw.rectangle([float(v) * scale for v in box], outline=(40, 200, 40), width=1)
        draw.rectangle([float(v) * scale for v in error["box"]], outline=(230, 30, 30), width=3)
        x, y = (n % columns) * TILE, (n // columns) * (TILE + 18)
        sheet.paste(tile, (x, y))
        caption = f"{dataset.class_names[error['label']]} {what} {error['score']:.2f} {Path(sample.image).name}"
        canvas.text((x + 2, y + TILE + 3), caption[:44], fill="black")
    sheet.save(path)


def render_html(run_dir, metrics, rows, false_positive_count, miss_count, config_text):
    """Self-contained page; every value from the run escaped (class names and paths are user data)."""
    escape = html.escape
    chooser = metrics.get("selection_metric", "")
    cards = [("box AP (Eval)", _number(metrics.get("bbox_ap"))), ("box AP50 (Eval)", _number(metrics.get("bbox_ap50"))),
             ("box AP75 (Eval)", _number(metrics.get("bbox_ap75"))),
             ("best epoch", f"{metrics.get('best_epoch', '?')} (chosen on {chooser})"),
             ("epochs run", str(metrics.get("epochs_run"))), ("training seconds", str(metrics.get("train_seconds")))]
    table = _table([(name, _number(ap), _number(ap50), _number(ap75), objects) for name, ap, ap50, ap75, objects
                    in rows], header=("class", "AP", "AP50", "AP75", "Eval objects"), numeric={1, 2, 3, 4})
    parts = [
        "<!doctype html><meta charset=utf-8><title>detection report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:2px 8px;text-align:left}"
        "td.num{text-align:right}img{max-width:100%}</style>",
        f"<h1>{escape(str(run_dir))}</h1><p>Faster R-CNN, images resized to a shorter side of "
        f"{escape(str(metrics.get('detector', {}).get('short_side', '')))} px; classes: "
        f"{escape(', '.join(metrics.get('class_names', [])))}</p>",
        _table(cards),
        "<h2>Training</h2><img src=curves.png alt='training curves'>",
        "<h2>Average precision per class (Eval)</h2>", table,
        "<img src=pr_curves.png alt='precision-recall curves per class'>",
        f"<h2>Most confident false positives ({false_positive_count} in all, IoU &lt; {MATCH_IOU})</h2>",
        "<img src=false_positives.png alt='false positives'>",
        f"<h2>Missed objects ({miss_count} in all: no detection of score &ge; {MISS_SCORE} at IoU &ge; "
        f"{MATCH_IOU})</h2><img src=misses.png alt='missed objects'>",
        f"<h2>Config</h2><pre>{escape(config_text)}</pre>"]
    return "\n".join(parts)
