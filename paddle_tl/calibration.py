"""Calibration of a classifier's probabilities (numpy only): temperature
scaling, the expected calibration error (ECE) and its reliability bins, and
the confidence threshold below which a prediction is answered "unknown".

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T
before the softmax: T > 1 softens over-confident probabilities, T < 1
sharpens under-confident ones, and no T > 0 changes the ranking of the
classes of an image, so top-1 and top-k stay as they are. T is fitted by
minimising the negative log-likelihood (NLL) of held-out labels: training
fits it on the validation split, never on Eval (engine/train.py).
"""

import math

import numpy as np

# T is searched in this range (log-spaced); an optimum at either end means
# the split cannot pin T down (see fit_temperature).
TEMPERATURE_RANGE = (1e-4, 1e4)
ECE_BINS = 15
# The share of validation images the suggested --reject_below keeps.
TARGET_COVERAGE = 0.9
UNKNOWN_LABEL = "unknown"


def softmax(logits, temperature=1.0):
    """Probabilities [N, C] of logits [N, C] divided by `temperature`, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean NLL of `labels` under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, bounds=TEMPERATURE_RANGE, tolerance=1e-6):
    """(T, identified): the T in `bounds` that minimises the NLL of
    softmax(logits / T), found by golden-section search over log T.

    The NLL is convex in 1/T (a log-sum-exp of logits scaled by 1/T, minus a
    linear term), so it has one minimum and the search finds it. When that
    minimum lies at an end of `bounds`, `identified` is False: the split does
    not determine T. That is what happens when every image is classified
    correctly (the NLL keeps falling as T -> 0: any sharpening looks better)
    or every image wrongly (T -> infinity)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no images")
    low, high = math.log(bounds[0]), math.log(bounds[1])

    def nll(log_t):
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tolerance:
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    log_t = (a + b) / 2
    # At an end of the range, the NLL still falls towards (or beyond) it.
    identified = low + 1e-3 < log_t < high - 1e-3
    return math.exp(log_t), identified


def reliability_bins(probabilities, labels, bins=ECE_BINS):
    """Equal-width bins of top-1 confidence over (0, 1]: per bin its
    `lower` and `upper` edge, `count` of images, their mean `confidence`
    and `accuracy` (None for an empty bin)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels).reshape(-1)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin i holds (i/bins, (i+1)/bins]
    rows = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        rows.append({"lower": i / bins, "upper": (i + 1) / bins, "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return rows


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE: the mean over images of |accuracy - confidence| of their
    confidence bin (reliability_bins), i.e. the bins' gaps weighted by their
    share of the images. 0 is perfectly calibrated."""
    rows = reliability_bins(probabilities, labels, bins)
    total = sum(row["count"] for row in rows)
    if not total:
        return None
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / total)


def reject_threshold(probabilities, labels, coverage=TARGET_COVERAGE, decimals=3):
    """The --reject_below P suggested by a labelled split: the highest P
    (rounded down to `decimals`) that still keeps at least `coverage` of its
    images (top-1 probability >= P; the others are answered "unknown"), with
    what it does there: `kept` (share of images), `accuracy_kept` (top-1
    among them) and `accuracy_all` (top-1 of every image)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels).reshape(-1)
    if not len(labels):
        return None
    confidence = probabilities.max(axis=1)
    needed = max(1, math.ceil(coverage * len(labels) - 1e-9))
    scale = 10 ** decimals
    threshold = math.floor(float(np.sort(confidence)[::-1][needed - 1]) * scale) / scale
    return dict(threshold_effect(probabilities, labels, threshold), coverage_target=coverage)


def threshold_effect(probabilities, labels, threshold):
    """What --reject_below `threshold` does on a labelled split: `reject_below`,
    `kept` (share of images at or above it), `accuracy_kept`, `accuracy_all`."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels).reshape(-1)
    kept = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return {"reject_below": threshold, "kept": float(kept.mean()),
            "accuracy_kept": float(correct[kept].mean()) if kept.any() else None,
            "accuracy_all": float(correct.mean())}


def calibrate(val_logits=None, val_labels=None, eval_logits=None, eval_labels=None, no_val_reason=None,
              bins=ECE_BINS, coverage=TARGET_COVERAGE):
    """metrics.json's `calibration`: T fitted on the validation split's
    logits (T = 1, with the reason, where there is none or it cannot
    determine T), the NLL and ECE there before and after, ECE on Eval before
    and after (reported, never fitted on), the validation reliability bins
    and the suggested --reject_below."""
    record = {"temperature": 1.0, "fitted": False, "reason": no_val_reason, "val_images": 0, "ece_bins": bins}
    if val_logits is not None and len(val_labels):
        temperature, identified = fit_temperature(val_logits, val_labels)
        record["val_images"] = int(len(val_labels))
        if identified:
            record.update(temperature=temperature, fitted=True,
                          reason="fitted on the validation split: the T that minimises the negative "
                                 "log-likelihood of softmax(logits / T)")
        else:
            correct = float((np.asarray(val_logits).argmax(axis=1) == val_labels).mean())
            record["reason"] = (
                f"not fitted: the likelihood of the validation split keeps improving as T goes to "
                f"{'0' if temperature < 1 else 'infinity'} (validation top-1 {correct:.3f} on "
                f"{len(val_labels)} images), so the split cannot set a temperature; T = 1")
        before, after = softmax(val_logits), softmax(val_logits, record["temperature"])
        record.update(
            val_nll_before=negative_log_likelihood(val_logits, val_labels),
            val_nll_after=negative_log_likelihood(val_logits, val_labels, record["temperature"]),
            val_ece_before=expected_calibration_error(before, val_labels, bins),
            val_ece_after=expected_calibration_error(after, val_labels, bins),
            reliability={"validation": {"before": reliability_bins(before, val_labels, bins),
                                        "after": reliability_bins(after, val_labels, bins)}},
            suggested_reject_below=reject_threshold(after, val_labels, coverage))
    if eval_logits is not None and len(eval_labels):
        record.update(eval_images=int(len(eval_labels)),
                      eval_ece_before=expected_calibration_error(softmax(eval_logits), eval_labels, bins),
                      eval_ece_after=expected_calibration_error(softmax(eval_logits, record["temperature"]),
                                                                eval_labels, bins))
    return record
