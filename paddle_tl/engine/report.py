"""`paddle-tl report RUN`: what a finished run learnt, as pictures and one
HTML page in RUN/report/ — training curves, the confusion matrix, per-class
precision/recall/F1, the Eval images the best model gets most confidently
wrong (each with the Grad-CAM heat map of the class it predicted), and how
well its probabilities are calibrated (reliability diagram, ECE before and
after temperature scaling, a suggested --reject_below)."""

import argparse
import csv
import html
import json
import time
from pathlib import Path

import numpy as np

from paddle_tl.calibration import ECE_BINS, expected_calibration_error, reliability_bins, softmax, threshold_effect
from paddle_tl.data.datasets import load_rgb
from paddle_tl.data.loaders import map_batches
from paddle_tl.engine.evaluate import eval_split
from paddle_tl.errors import ConfigError
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import fastest_runner
from paddle_tl.models.zoo import get_spec
from paddle_tl.runs import CONFIG_FILE, METRICS_FILE
from paddle_tl.runs.run_folder import run_config, trained_temperature
from paddle_tl.trust.gradcam import grad_cam, overlay

REPORT_DIR = "report"
MAX_ERRORS = 16
ERROR_TILE_PIXELS = 320
# Beyond this many classes, numbers in the confusion matrix's cells are unreadable.
ANNOTATE_MAX_CLASSES = 15


def write_report(run_dir):
    """Write RUN/report/ (curves.png, confusion_matrix.png, per_class.csv,
    errors.png, reliability.png, index.html) for a finished run; returns
    index.html's path."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(f"{run_dir} has no metrics.json: not the folder of a finished training run")
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    config_file = run_dir / CONFIG_FILE
    cfg = run_config(run_dir)  # best_model, rebuilt as it trained (its checkpoint's record)
    started = time.perf_counter()
    split = eval_split(cfg)
    paths, labels, logits, class_names = predict_eval(cfg, split)
    predict_seconds = time.perf_counter() - started
    scores = classification_metrics(logits, labels, class_names, cfg.Metric.topk)
    # Calibrated, as a deployment scores them: softmax(logits / T), T from best_model's record.
    temperature = trained_temperature(cfg)
    probabilities = softmax(logits, temperature)
    # Outputs beyond the named classes (Arch.num_classes above the data's) keep their index as name.
    output_names = list(class_names) + [str(i) for i in range(len(class_names), logits.shape[1])]

    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plot_curves(metrics["history"], out_dir / "curves.png")
    plot_confusion(np.array(scores["confusion_matrix"]), class_names, out_dir / "confusion_matrix.png")
    rows = per_class_rows(scores, class_names)
    write_per_class_csv(rows, out_dir / "per_class.csv")
    errors = most_confident_errors(probabilities, labels, MAX_ERRORS)
    heat_maps = error_heat_maps(split, get_spec(cfg.Arch.name), errors, probabilities.argmax(axis=1)[errors])
    plot_errors([(paths[i], output_names[labels[i]], output_names[probabilities[i].argmax()],
                  probabilities[i].max()) for i in errors], out_dir / "errors.png", heat_maps,
                split.dataset.transform.pre)  # the Eval transform: where its center crop lies
    wrong = int((probabilities.argmax(axis=1) != labels).sum())
    calibration = calibration_figures(metrics.get("calibration"), logits, labels, temperature)
    plot_reliability(calibration["panels"], out_dir / "reliability.png")
    page = render_html(run_dir, metrics, scores, rows, config_file.read_text(), wrong, predict_seconds, calibration)
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def predict_eval(cfg, split=None):
    """(paths, labels, logits, class_names) of the Eval split under
    Global.pretrained_model (or of an eval_split of it already made), in the
    dataset's order. On CPU through a static export run by Paddle Inference
    with oneDNN (several times faster than the dynamic graph), on GPU with
    the dynamic graph."""
    split = split or eval_split(cfg)
    with fastest_runner(split.network, split.input_size, cfg.DataLoader.Eval.batch_size, split.device) as run:
        logits, labels = map_batches(run, split.loader)
    paths = [path for path, _ in split.dataset.samples]
    return paths, labels, logits, split.class_names


def error_heat_maps(split, spec, indices, predicted):
    """Grad-CAM maps ([len(indices), S, S], trust/gradcam.py) of the
    predicted class over the Eval images at `indices`, as the network saw them;
    none for a concatenation of bodies (models/concat.py): no one feature map
    holds its evidence."""
    if not len(indices) or spec.source == "concat":
        return []
    images = np.stack([split.dataset[int(i)][0] for i in indices])
    return list(grad_cam(split.network, spec, images, predicted)[0])


def calibration_figures(record, logits, labels, temperature):
    """What the report shows of calibration: metrics.json's `calibration`
    (fitted on the validation split; absent in runs from before it), and
    the same figures recomputed on the Eval split from best_model's logits
    (ECE before and after, and what the suggested --reject_below does there)."""
    record = dict(record or {"temperature": temperature, "fitted": False,
                             "reason": "this run predates calibration (no `calibration` in metrics.json)"})
    bins = record.get("ece_bins", ECE_BINS)
    before, after = softmax(logits), softmax(logits, temperature)
    panels, rows = [], []
    validation = (record.get("reliability") or {}).get("validation")
    if validation:
        panels.append((f"validation, {record['val_images']} images (T fitted here)", validation["before"],
                       validation["after"]))
        rows.append(("validation (T fitted here)", record["val_images"], record["val_ece_before"],
                     record["val_ece_after"]))
    eval_ece = expected_calibration_error(before, labels, bins), expected_calibration_error(after, labels, bins)
    panels.append((f"Eval, {len(labels)} images (reported only)", reliability_bins(before, labels, bins),
                   reliability_bins(after, labels, bins)))
    rows.append(("Eval (reported only)", len(labels), *eval_ece))
    suggested = record.get("suggested_reject_below")
    on_eval = threshold_effect(after, labels, suggested["reject_below"]) if suggested else None
    return {"temperature": temperature, "fitted": record.get("fitted"), "reason": record.get("reason"),
            "rows": rows, "panels": panels, "suggested": suggested, "suggested_on_eval": on_eval}


def most_confident_errors(probabilities, labels, k=MAX_ERRORS):
    """Indices of at most k wrong top-1 predictions, the most confident
    (highest predicted probability) first; ties keep the dataset's order."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:k]


def per_class_rows(scores, class_names):
    """(class, precision, recall, f1, support) per class, as
    classification_metrics computed them (recall and f1 are None for a class
    absent from the split)."""
    return [(name, c["precision"], c["accuracy"], c["f1"], c["support"])
            for name, c in ((name, scores["per_class"][name]) for name in class_names)]


def write_per_class_csv(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as file:
        table = csv.writer(file)
        table.writerow(["class", "precision", "recall", "f1", "support"])
        for name, *numbers, support in rows:
            table.writerow([name, *("" if value is None else f"{value:.6f}" for value in numbers), support])


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history, path):
    """Loss and top-1 (train, validation and eval) and the learning rate per epoch, with a
    dashed line wherever gradual unfreezing changed the frozen stages."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, (("loss", ("train_loss", "val_loss", "eval_loss")),
                                        ("top-1", ("train_top1", "val_top1", "eval_top1")),
                                        ("learning rate", ("lr",)))):
        for key in keys:
            # Eval keys are missing on epochs between evaluations (Global.eval_interval), val keys
            # without a validation split.
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        for epoch, frozen in _unfreezing_points(history):
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
            if ax is axes[0]:
                ax.annotate(f"{frozen} frozen", (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if epochs:
            ax.set_xlim(min(epochs) - 0.7, max(epochs) + 0.7)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _unfreezing_points(history):
    """(epoch, frozen stages from then on) wherever frozen_stages changed."""
    return [(row["epoch"], row["frozen_stages"]) for previous, row in zip(history, history[1:])
            if row.get("frozen_stages") != previous.get("frozen_stages")]


def plot_confusion(confusion, class_names, path):
    """Row-normalised confusion matrix (each row: where that class's images
    went); the raw counts are written in the cells when there are few classes."""
    plt = _pyplot()
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = confusion / np.maximum(totals, 1)
    size = max(4.5, 0.45 * len(class_names) + 2.5)
    figure, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    positions = range(len(class_names))
    # parse_math=False: class names are user data, and "$" would start mathtext.
    ax.set_xticks(list(positions), class_names, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(list(positions), class_names, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= ANNOTATE_MAX_CLASSES:
        for (row, column), count in np.ndenumerate(confusion):
            ax.text(column, row, str(count), ha="center", va="center", fontsize=9,
                    color="white" if normalised[row, column] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reliability(panels, path):
    """Reliability diagrams, one per (title, bins before, bins after) panel:
    accuracy against mean confidence per non-empty confidence bin, before
    (T = 1) and after temperature scaling; the diagonal is perfect
    calibration, and each point's size grows with its bin's images."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, before, after) in zip(axes[0], panels):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for name, rows, colour in (("before (T = 1)", before, "tab:orange"), ("after", after, "tab:blue")):
            filled = [row for row in rows if row["count"]]
            total = sum(row["count"] for row in filled) or 1
            ece = sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in filled) / total
            ax.plot([row["confidence"] for row in filled], [row["accuracy"] for row in filled], color=colour,
                    linewidth=1, label=f"{name}: ECE {ece:.3f}")
            ax.scatter([row["confidence"] for row in filled], [row["accuracy"] for row in filled], color=colour,
                       s=[12 + 150 * row["count"] / total for row in filled], zorder=3)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_errors(errors, path, heat_maps=None, pre=None):
    """A grid of (path, true name, predicted name, probability), as decoded
    from disk (before resizing and cropping), each with its heat map blended
    over the center crop the network saw (`pre`) when `heat_maps` are given;
    a short note when there are none."""
    plt = _pyplot()
    if not errors:
        figure, ax = plt.subplots(figsize=(5, 1.2))
        ax.text(0.5, 0.5, "no wrong predictions on the Eval split", ha="center", va="center")
        ax.axis("off")
    else:
        columns = min(4, len(errors))
        rows = -(-len(errors) // columns)
        figure, grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
        for ax in grid.flat:
            ax.axis("off")
        for index, (ax, (image_path, true, predicted, probability)) in enumerate(zip(grid.flat, errors)):
            image = load_rgb(image_path)
            if heat_maps:
                image = overlay(image, heat_maps[index], pre)
            image.thumbnail((ERROR_TILE_PIXELS, ERROR_TILE_PIXELS))  # a tile is ~300 px; full size only bloats the PNG
            ax.imshow(image)
            ax.set_title(f"true: {true} / pred: {predicted} (p={probability:.2f})", fontsize=9, parse_math=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.4em; }
.muted { color: #666; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.row { display: flex; flex-wrap: wrap; gap: 0 3em; align-items: flex-start; }
.row > div { flex: 1 1 22em; min-width: 0; }
.reason { max-width: 40em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _number(value, digits=4):
    return "–" if value is None else f"{value:.{digits}f}"


def _table(rows, header=None, numeric=()):
    """An HTML table of already-formatted cells; every cell is escaped here."""
    head = "<tr>" + "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{html.escape(str(cell))}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _candidates_table(rows):
    """What `auto` measured: each candidate's validation top-1 and seconds."""
    if not rows:
        return ""
    cells = [(row["name"], row["what"], _number(row["val_top1"]) if "val_top1" in row else "–",
              f"{row['seconds']:.0f} s" if "seconds" in row else row.get("skipped", "")) for row in rows]
    return _table(cells, header=("candidate", "recipe", "validation top-1", "seconds"), numeric={2})


def render_html(run_dir, metrics, scores, rows, config_text, wrong, predict_seconds, calibration=None):
    """The report page: self-contained (inline CSS, no scripts, images by
    relative link), every value from the run escaped, since class names,
    paths and config values are user data."""
    escape = html.escape
    chosen_on = (metrics.get("selection") or {}).get("split", "eval")
    cards = [("best top-1", f"{_number(metrics.get('best_top1'))} (epoch {metrics.get('best_epoch', '?')}, "
                            f"chosen on {'validation' if chosen_on == 'validation' else 'Eval'})"),
             ("final top-1", _number(metrics.get("final_top1"))),
             ("best model top-1", _number(scores.get("top1")) + (  # with its 95% Wilson interval
                 " [{:.3f}, {:.3f}]".format(*scores["top1_ci95"]) if scores.get("top1_ci95") else "")),
             ("balanced accuracy", _number(scores["balanced_accuracy"])),
             ("macro F1", _number(scores["macro_f1"]))]
    topk = [(key, _number(value)) for key, value in scores.items()
            if key.startswith("top") and key[3:].isdigit() and key != "top1"]
    strategy = metrics.get("strategy") or {}
    epochs = metrics.get("epochs_run") or 0
    seconds = metrics.get("train_seconds")
    timings = [("training", f"{seconds:.1f} s" if seconds is not None else "–"),
               ("epochs", epochs),
               ("per epoch", f"{seconds / epochs:.1f} s" if seconds is not None and epochs else "–"),
               ("device", metrics.get("device", "–")),
               ("report's Eval prediction", f"{predict_seconds:.1f} s for {scores['num_images']} images")]
    per_class = [(name, _number(precision), _number(recall), _number(f1), support)
                 for name, precision, recall, f1, support in rows]
    sections = [
        f"<h1>Run report: {escape(str(run_dir))}</h1>",
        f"<p class=muted>{escape(str(len(metrics.get('class_names', []))))} classes, "
        f"{escape(str(metrics.get('train_images', '?')))} training and {scores['num_images']} Eval images. "
        "“best model top-1” and the per-class figures are recomputed here from best_model on the Eval split.</p>",
        '<div class=cards>' + "".join(f"<div class=card>{escape(name)}<b>{escape(value)}</b></div>"
                                      for name, value in cards) + "</div>",
        _table(topk + [("Eval loss", _number(scores["loss"]))], numeric={1}) if topk else "",
        # Side by side where the window allows: these sections are narrow and would leave half the page empty.
        '<div class=row><div>',
        "<h2>Transfer strategy</h2>",
        f"<p><b>{escape(str(strategy.get('strategy', '–')))}</b> "
        f"<span class=muted>(requested: {escape(str(strategy.get('requested', '–')))})</span></p>",
        f"<p class=reason>{escape(str(strategy.get('reason', '')))}</p>",
        _table(sorted((strategy.get("figures") or {}).items()), header=("figure", "value"), numeric={1}),
        _candidates_table(strategy.get("candidates")),
        "</div><div>",
        "<h2>Timings</h2>",
        _table(timings),
        "</div></div>",
        "<h2>Training curves</h2>",
        '<a href="curves.png"><img src="curves.png" alt="loss, top-1 and learning rate per epoch"></a>',
        "<h2>Per class</h2>",
        '<div class=row><div>',
        _table(per_class, header=("class", "precision", "recall", "F1", "support"), numeric={1, 2, 3, 4}),
        '<a href="per_class.csv">per_class.csv</a>',
        '</div><div><a href="confusion_matrix.png"><img src="confusion_matrix.png" alt="confusion matrix">'
        "</a></div></div>",
        *(_calibration_section(calibration) if calibration else ()),
        f"<h2>Most confident errors ({min(wrong, MAX_ERRORS)} of {wrong} wrong)</h2>",
        "<p class=muted>Each with the Grad-CAM heat map of the class it predicted (red: the evidence for that "
        "class), over the center crop the network sees; the rest of the image is dimmed.</p>",
        '<a href="errors.png"><img src="errors.png" alt="most confidently wrong Eval images"></a>',
        "<h2>Config</h2>",
        f"<pre>{escape(config_text)}</pre>",
    ]
    body = "\n".join(section for section in sections if section)
    return (f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<title>{escape(Path(run_dir).name)} report</title>\n<style>{PAGE_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _calibration_section(calibration):
    """HTML lines: the temperature (or why there is none), ECE before and
    after per split, the suggested --reject_below and the reliability diagram."""
    escape = html.escape
    temperature = calibration["temperature"]
    if calibration["fitted"]:
        said = f"Temperature <b>T = {temperature:.3f}</b>: {escape(str(calibration['reason']))}."
    else:
        said = f"T = {temperature:g}: {escape(str(calibration['reason']))}."
    lines = ["<h2>Calibration</h2>",
             f"<p class=reason>{said} Scores here and in deployment are softmax(logits / T); no T changes which "
             "class ranks first.</p>",
             _table([(split, images, _number(before), _number(after)) for split, images, before, after
                     in calibration["rows"]], header=("split", "images", "ECE before (T = 1)", "ECE after"),
                    numeric={1, 2, 3})]
    suggested, on_eval = calibration["suggested"], calibration["suggested_on_eval"]
    if suggested:
        lines.append(
            f"<p class=reason>Suggested <code>--reject_below {suggested['reject_below']:g}</code>: on the validation "
            f"split it keeps {suggested['kept']:.0%} of the images (target {suggested['coverage_target']:.0%}), "
            f"top-1 {_number(suggested['accuracy_kept'], 3)} among those kept (all: "
            f"{_number(suggested['accuracy_all'], 3)}); on Eval it keeps {on_eval['kept']:.0%}, top-1 "
            f"{_number(on_eval['accuracy_kept'], 3)} among those kept (all: {_number(on_eval['accuracy_all'], 3)}). "
            "Images below it are answered \"unknown\".</p>")
    lines.append('<a href="reliability.png"><img src="reliability.png" alt="reliability diagram: accuracy against '
                 'confidence, before and after temperature scaling"></a>')
    return lines


def report_command(argv=None):
    parser = argparse.ArgumentParser(prog="paddle-tl report",
                                     description="Write RUN/report/: curves, confusion matrix, per-class table, "
                                                 "most confident errors and index.html.")
    parser.add_argument("run", metavar="RUN", help="a finished run folder (Global.output_dir)")
    args = parser.parse_args(argv)
    metrics_file = Path(args.run) / METRICS_FILE
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("task") == "detection":
        from paddle_tl.tasks.detection.report import write_detection_report
        print(write_detection_report(args.run))
        return
    print(write_report(args.run))
