"""Classification metrics from logits and labels (numpy only): shared by
evaluation of the dynamic network and of an exported model."""

import numpy as np


def classification_metrics(logits, labels, class_names, topk=(1, 5)):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ranked = np.argsort(-logits, axis=1, kind="stable")
    predicted = ranked[:, 0]
    result = {f"top{k}": float(np.mean((ranked[:, :k] == labels[:, None]).any(axis=1)))
              for k in sorted(set(topk) | {1}) if k <= logits.shape[1]}
    correct = int((ranked[:, 0] == labels).sum())
    result["top1_ci95"] = list(wilson_interval(correct, len(labels)))
    result["loss"] = float(-log_probs[np.arange(len(labels)), labels].mean())
    result["num_images"] = int(len(labels))
    confusion = np.zeros((len(class_names), logits.shape[1]), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    square = confusion[:, : len(class_names)]  # predictions beyond the named classes only count as wrong
    present = confusion.sum(axis=1) > 0
    recall = np.diag(square) / np.maximum(confusion.sum(axis=1), 1)
    precision = np.diag(square) / np.maximum(square.sum(axis=0), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # accuracy (= recall) and f1 are None for a class absent from this split
    result["per_class"] = {
        name: {"accuracy": float(recall[i]) if present[i] else None, "precision": float(precision[i]),
               "f1": float(f1[i]) if present[i] else None, "support": int(confusion[i].sum())}
        for i, name in enumerate(class_names)}
    result["confusion_matrix"] = square.tolist()
    # Beside top-1, which a majority class can dominate: the mean recall and
    # the mean F1 over the classes present in this split.
    result["balanced_accuracy"] = float(recall[present].mean()) if present.any() else None
    result["macro_f1"] = float(f1[present].mean()) if present.any() else None
    return result


def wilson_interval(successes, trials, z=1.959964):
    """The Wilson score interval (95% for the default z) of a proportion
    such as top-1: unlike the normal approximation it stays inside [0, 1]
    and is sound for small samples and for proportions near 0 or 1.
    (low, high), rounded to 6 decimals; (0, 1) for no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return round(float(max(0.0, centre - half)), 6), round(float(min(1.0, centre + half)), 6)
