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
