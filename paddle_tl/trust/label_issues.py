"""`paddle-tl check-labels`: which training images are likely mislabelled.

Every training image's frozen-body features are computed once (the
pretrained network of Arch, as a linear probe sees them). A stratified,
seeded k-fold split (trust/cv.py) then gives each image an out-of-fold
predicted probability: a softmax classifier (multinomial logistic
regression, numpy) is fitted on the other folds' features and predicts the
held-out fold. Confident learning (the `cleanlab` package) compares those
probabilities with the given labels and flags the likely label errors.

Writes `Global.output_dir/label_issues/`: `suspects.csv` (every training
image, most suspect first), `index.html` (a gallery of the top suspects) and
`summary.json`. The user's images and folders are only read.
"""

import base64
import csv
import html
import io
import time
from pathlib import Path

import numpy as np

from paddle_tl.errors import ConfigError, UserError
from paddle_tl.trust.cv import stratified_folds

LABEL_ISSUES_DIR = "label_issues"
GALLERY_MAX = 48  # suspects shown in index.html
GALLERY_MIN = 12  # shown even when confident learning flags fewer
THUMBNAIL_PIXELS = 160
# The softmax classifier on the features: L2 penalty (on standardised
# features) and gradient steps.
HEAD_L2 = 0.1
HEAD_STEPS = 300


class CleanlabMissingError(UserError, ImportError):
    """cleanlab is not installed; the message says how to install it."""


def import_cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise CleanlabMissingError("check-labels needs the cleanlab package: pip install cleanlab "
                                   "(or this project's `labels` extra: pip install -e \".[labels]\")") from None
    return cleanlab


def check_labels(cfg, folds=5):
    """Rank the training images by how likely their label is wrong; write
    label_issues/ and return its summary."""
    cleanlab = import_cleanlab()  # before any work
    from paddle_tl.data.datasets import build_dataset

    started = time.time()
    dataset = build_dataset(cfg.DataLoader.Train.dataset, "train", None)
    labels = np.array([label for _, label in dataset.samples], dtype=np.int64)
    num_classes = len(dataset.class_names)
    fold_of = stratified_folds(labels, folds, cfg.Global.seed)
    features = training_features(cfg, dataset)
    probabilities = out_of_fold_probabilities(features, labels, fold_of, num_classes)
    flagged = cleanlab.filter.find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = cleanlab.rank.get_label_quality_scores(labels, probabilities, method="self_confidence")
    # Most suspect first: what confident learning flags, then the rest; each by
    # how little probability the given label gets.
    order = np.lexsort((quality, ~flagged))
    suggested = probabilities.argmax(axis=1)
    rows = [{"rank": rank + 1, "path": dataset.samples[i][0], "given": dataset.class_names[labels[i]],
             "suggested": dataset.class_names[suggested[i]], "score": round(float(1 - quality[i]), 6),
             "given_probability": round(float(probabilities[i, labels[i]]), 6),
             "suggested_probability": round(float(probabilities[i, suggested[i]]), 6),
             "flagged": bool(flagged[i]), "fold": int(fold_of[i]) + 1} for rank, i in enumerate(order)]
    out = Path(cfg.Global.output_dir) / LABEL_ISSUES_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Global.output_dir: cannot write to {out}: {exc.strerror}") from exc
    write_suspects_csv(rows, out / "suspects.csv")
    accuracy = float((suggested == labels).mean())
    summary = {"images": len(labels), "flagged": int(flagged.sum()), "folds": folds, "seed": cfg.Global.seed,
               "out_of_fold_top1": round(accuracy, 6), "class_names": dataset.class_names,
               "suspects_csv": str(out / "suspects.csv"), "gallery": str(out / "index.html"),
               "seconds": round(time.time() - started, 1)}
    shown = rows[:min(len(rows), max(GALLERY_MIN, min(GALLERY_MAX, summary["flagged"])))]
    (out / "index.html").write_text(render_gallery(shown, summary), encoding="utf-8")
    from paddle_tl.files import write_json
    write_json(out / "summary.json", summary)
    print(f"check-labels: {summary['flagged']} of {len(labels)} training images flagged as likely mislabelled "
          f"(out-of-fold top-1 of the linear head {accuracy:.4f}); {out / 'suspects.csv'}, {out / 'index.html'}")
    return summary


def training_features(cfg, dataset):
    """The head inputs of every training image (evaluation view) through the
    pretrained body of Arch."""
    import dataclasses

    from paddle_tl.combinations import Facts, check_combinations
    from paddle_tl.data.transforms import Preprocess, eval_transform
    from paddle_tl.models.features import feature_head
    from paddle_tl.models.heads import build_head
    from paddle_tl.models.weights import load_pretrained
    from paddle_tl.models.zoo import build_model, get_spec
    from paddle_tl.runtime import seed_everything, select_device
    from paddle_tl.transfer.feature_cache import feature_extractor

    device = select_device(cfg.Global.device)
    seed_everything(cfg.Global.seed)
    spec = get_spec(cfg.Arch.name)
    network = build_model(spec.name, len(dataset.class_names), **cfg.Arch.kwargs)
    # An architecture whose head is not one Linear layer, refused (as an MLP head on it) before any features.
    check_combinations(Facts.of_config(cfg, command="check-labels",
                                       feature_head=feature_head(network, spec) is not None))
    network = build_head(network, spec, dataclasses.asdict(cfg.Arch.head))
    if cfg.Arch.pretrained is False:
        print("warning: Arch.pretrained=false: the features come from a randomly initialised body, "
              "so the suspects mean little")
    else:
        print(load_pretrained(network, cfg.Arch.pretrained, spec.head, imagenet_url=spec.imagenet_url,
                              imagenet_md5=spec.imagenet_md5, sha256=cfg.Arch.pretrained_sha256,
                              arch=spec.name, imagenet_package=spec.imagenet_package,
                              imagenet_sha256=spec.imagenet_sha256).summary())
    network.eval()
    pre = Preprocess.from_spec(spec, cfg.Arch.input_size)
    loader = cfg.DataLoader.Train
    with feature_extractor(network, spec, pre.input_size, loader.batch_size, device) as extract:
        return extract(dataset, eval_transform(pre), loader.num_workers, "features: training images")


def out_of_fold_probabilities(features, labels, fold_of, num_classes):
    """Each image's class probabilities from a softmax classifier fitted on
    the other folds."""
    probabilities = np.zeros((len(labels), num_classes))
    for k in np.unique(fold_of):
        held = fold_of == k
        probabilities[held] = fit_softmax(features[~held], labels[~held], num_classes)(features[held])
    return probabilities


def fit_softmax(features, labels, num_classes, l2=HEAD_L2, steps=HEAD_STEPS):
    """Multinomial logistic regression on standardised features, by
    accelerated gradient descent on the L2-penalised mean cross-entropy
    from zero weights (a convex problem: the same data gives the same
    classifier, no random draws). Returns predict(features) -> probabilities."""
    x = np.asarray(features, dtype=np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    x = (x - mean) / scale
    n, d = x.shape
    onehot = np.eye(num_classes)[labels]
    xb = np.hstack([x, np.ones((n, 1))])  # the bias as a last, unpenalised column
    penalty = np.ones((d + 1, 1))
    penalty[-1] = 0
    # Step 1/L: the cross-entropy's Hessian is at most 1/2 x^T x / n (per class), plus the penalty.
    lipschitz = 0.5 * np.linalg.norm(xb, 2) ** 2 / n + l2
    w = ahead = np.zeros((d + 1, num_classes))
    for step in range(1, steps + 1):  # Nesterov's accelerated gradient
        gradient = xb.T @ (_softmax(xb @ ahead) - onehot) / n + l2 * penalty * ahead
        w_next = ahead - gradient / lipschitz
        ahead = w_next + (step - 1) / (step + 2) * (w_next - w)
        w = w_next

    def predict(new_features):
        z = (np.asarray(new_features, dtype=np.float64) - mean) / scale
        return _softmax(np.hstack([z, np.ones((len(z), 1))]) @ w)

    return predict


def _softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


CSV_COLUMNS = ("rank", "path", "given", "suggested", "score", "given_probability", "suggested_probability",
               "flagged", "fold")


def write_suspects_csv(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _thumbnail(path):
    """A small JPEG of the image as a data URI, or None when it cannot be read."""
    from paddle_tl.data.datasets import load_rgb
    try:
        image = load_rgb(path)
    except UserError:
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_gallery(rows, summary):
    """One self-contained page (inline CSS and thumbnails, no scripts);
    every value from the data (paths, class names) is escaped."""
    escape = html.escape
    cards = []
    for row in rows:
        uri = _thumbnail(row["path"])
        picture = (f'<img src="{uri}" alt="{escape(row["path"])}">' if uri else
                   '<div class=missing>cannot read</div>')
        cards.append(
            f'<figure class="{"flagged" if row["flagged"] else "ranked"}">{picture}<figcaption>'
            f'<b>#{row["rank"]}</b> score {row["score"]:.3f}{" · flagged" if row["flagged"] else ""}<br>'
            f'given <span class=given>{escape(row["given"])}</span> ({row["given_probability"]:.2f})<br>'
            f'suggested <span class=suggested>{escape(row["suggested"])}</span> '
            f'({row["suggested_probability"]:.2f})<br>'
            f'<span class=path title="{escape(row["path"])}">{escape(Path(row["path"]).name)}</span>'
            "</figcaption></figure>")
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>Likely label errors</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.muted {{ color: #666; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
figure {{ margin: 0; width: {THUMBNAIL_PIXELS + 16}px; border: 2px solid #ddd; border-radius: 6px; padding: 6px;
  font-size: 0.8em; }}
figure.flagged {{ border-color: #d06030; }}
figure img {{ display: block; max-width: {THUMBNAIL_PIXELS}px; max-height: {THUMBNAIL_PIXELS}px; margin: auto; }}
.missing {{ height: {THUMBNAIL_PIXELS // 2}px; background: #eee; text-align: center; }}
.given {{ color: #a03020; font-weight: bold; }}
.suggested {{ color: #207030; font-weight: bold; }}
.path {{ color: #666; word-break: break-all; }}
</style></head><body>
<h1>Likely label errors</h1>
<p>{summary['flagged']} of {summary['images']} training images flagged by confident learning (cleanlab) on
out-of-fold probabilities of a linear head on the pretrained features ({summary['folds']} folds, seed
{escape(str(summary['seed']))}; out-of-fold top-1 {summary['out_of_fold_top1']:.3f}). The top {len(rows)}
suspects, most suspect first; score = 1 − the probability the given label gets. Flagged ones have an
orange frame. Nothing was changed or moved: check each image and fix its label yourself.</p>
<p class=muted>Every image, ranked: <a href="suspects.csv">suspects.csv</a></p>
<div class=grid>{"".join(cards)}</div>
</body></html>
"""
