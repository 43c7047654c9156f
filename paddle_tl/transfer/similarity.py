"""How similar a dataset is to ImageNet, measured before training for
`Transfer.strategy=auto`: how well the frozen pretrained features separate
its classes.

A nearest-class-mean classifier on L2-normalised features, fitted on half of
a class-balanced sample of the training set and scored on the other half
(balanced accuracy, averaged over a few random halvings), is rescaled so
that chance is 0 and perfect is 1. Features an ImageNet network learned
separate ants from bees well (0.85, bench/similarity.py) but hardly the
defects of solar-cell electroluminescence images (0.18): the first calls for
keeping the features, the second for fine-tuning them.
"""

import copy

import numpy as np

from paddle_tl.transfer.feature_cache import feature_extractor

SAMPLE_PER_CLASS = 50
REPEATS = 5


def measure_similarity(network, spec, dataset, transform, input_size, device, seed, batch_size=32,
                       num_workers=0):
    labels = np.array([label for _, label in dataset.samples])
    classes = np.unique(labels)
    rng = np.random.RandomState(seed)
    chosen = np.concatenate([rng.choice(np.where(labels == c)[0], min(SAMPLE_PER_CLASS, int((labels == c).sum())),
                                        replace=False) for c in classes])
    sample = copy.copy(dataset)
    sample.samples = [dataset.samples[i] for i in chosen]
    with feature_extractor(network, spec, input_size, batch_size, device) as extract:
        features = extract(sample, transform, num_workers, "similarity probe")
    accuracy = nearest_class_mean_accuracy(features, labels[chosen], rng)
    chance = 1 / len(classes)
    return {"ncm_balanced_accuracy": round(accuracy, 4), "separability": round((accuracy - chance) / (1 - chance), 4),
            "similarity_sample": int(len(chosen))}


def nearest_class_mean_accuracy(features, labels, rng, repeats=REPEATS):
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    scores = []
    for _ in range(repeats):
        fit = np.zeros(len(labels), dtype=bool)
        for c in classes:  # half of every class to fit, half to score
            members = rng.permutation(np.where(labels == c)[0])
            fit[members[: max(1, len(members) // 2)]] = True
        means = np.stack([features[fit & (labels == c)].mean(axis=0) for c in classes])
        predicted = classes[np.argmax(features[~fit] @ means.T, axis=1)]
        truth = labels[~fit]
        scores.append(np.mean([np.mean(predicted[truth == c] == c) for c in classes if np.any(truth == c)]))
    return float(np.mean(scores))
