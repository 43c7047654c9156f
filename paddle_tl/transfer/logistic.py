"""A linear probe as transfer studies fit one: the logistic regression on
the cached features solved to convergence (full-batch L-BFGS), its L2
strength chosen on the validation split, then refitted at that strength on
training + validation images (Kornblith et al., CVPR 2019, "Do Better
ImageNet Models Transfer Better?"; LP-FT's probe is one too, Kumar et al.,
ICLR 2022). A few epochs of SGD at a fine-tuning learning rate stop short
of it. A linear probe's head starts there, and its epochs replace it only
where the validation split scores one higher (engine/fit.py SolvedStart).
Measured against scikit-learn's textbook probe by bench/probe_vs_sklearn.py
(docs/strategies.md#the-linear-probe-against-the-textbook-one).
"""

import time

import numpy as np

from paddle_tl.runtime import import_paddle

paddle = import_paddle()

# Inverse L2 strengths tried, from strong to weak (each warm-starts the
# next), as scikit-learn's C: the penalty |W|^2 / 2 beside C x the summed
# cross-entropy, on standardised features; here strength / 2 x |W|^2 beside
# the mean, strength = 1 / (samples x C). A penalty per sample, not per
# mean: the same strength on the mean loss over-regularises a large set and
# under-regularises a small one (on ants/bees' 221 images the best strength
# lay above the 1.0 a fixed range started at). The textbook probe's grid
# (0.001 to 0.1) widened by half a decade each side.
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
ITERATIONS = 100  # L-BFGS iterations per strength, at most (each warm-started from the stronger)
REFIT_ITERATIONS = 500  # for the refit at the chosen strength, started from zero


def strengths_for(samples, grid=C_GRID):
    """The L2 strengths (on the mean loss) of the inverse strengths `grid` for `samples` images."""
    return tuple(1 / (samples * c) for c in grid)


def solve_head(train_x, train_y, val_x, val_y, num_classes, class_weights=None, strengths=None,
               iterations=ITERATIONS):
    """(weight [features, classes], bias [classes], record): the multinomial
    logistic regression of `train_y` on `train_x` whose L2 strength (of
    `strengths`, by default strengths_for the samples) scores best on
    (`val_x`, `val_y`) (top-1; ties to the stronger), returned in the Linear layer's terms for the raw features.
    `class_weights` weight the cross-entropy as the training loss does. The
    record holds the chosen strength and its validation top-1 and loss,
    which the validation split scores fairly: it was not fitted on."""
    started = time.time()
    strengths = strengths_for(len(train_x)) if strengths is None else strengths
    mean, scale = _standardiser(train_x)
    x, y = _tensors(train_x, train_y, mean, scale)
    vx = paddle.to_tensor(((val_x - mean) / scale).astype("float32"))
    vy = np.asarray(val_y).reshape(-1)
    weight = _weight(class_weights)
    w, b = _parameters(train_x.shape[1], num_classes)
    tried, best = [], None
    for strength in strengths:
        _minimise(x, y, w, b, strength, weight, iterations)
        with paddle.no_grad():
            logits = paddle.matmul(vx, w) + b
            val_top1 = float((logits.argmax(axis=1).numpy() == vy).mean())
            val_loss = float(paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(vy.astype("int64")),
                                                                weight=weight))
        tried.append({"strength": strength, "val_top1": round(val_top1, 4), "val_loss": round(val_loss, 4)})
        # The best validation top-1; a tie (frequent on a small split) goes to the stronger penalty, tried
        # first: the lower validation loss would favour the most confident (least penalised) fit whenever
        # the split is separated perfectly.
        if best is None or val_top1 > best[1]:
            best = (strength, val_top1, val_loss, w.numpy().copy(), b.numpy().copy())
    strength, val_top1, val_loss, w, b = best
    weight_raw, bias_raw = _folded(w, b, mean, scale)
    record = {"solver": "L-BFGS", "strength": strength, "C": 1 / (len(train_x) * strength),
              "val_top1": round(val_top1, 4), "val_loss": round(val_loss, 4), "tried": tried,
              "samples": int(train_x.shape[0]),
              "seconds": round(time.time() - started, 2)}
    return weight_raw, bias_raw, record


def refit_head(x, y, c, num_classes, class_weights=None, iterations=REFIT_ITERATIONS):
    """(weight, bias): the logistic regression of `y` on `x` at one inverse
    L2 strength `c` (scikit-learn's C, on `x` standardised), in the Linear layer's
    terms for the raw features: the refit on training + validation images
    once the validation split has chosen the strength, as transfer studies
    fit their final probe (Kornblith et al., CVPR 2019)."""
    mean, scale = _standardiser(x)
    tx, ty = _tensors(x, y, mean, scale)
    w, b = _parameters(x.shape[1], num_classes)
    _minimise(tx, ty, w, b, 1 / (len(x) * c), _weight(class_weights), iterations)
    return _folded(w.numpy(), b.numpy(), mean, scale)


def _standardiser(x):
    x = x.astype("float64")
    mean, spread = x.mean(axis=0), x.std(axis=0)
    # A feature that barely varies is not blown up: folded back, its weight
    # would multiply the float differences between runtimes (the cache's
    # Paddle Inference and the network's own forward in eval and export),
    # which are relative to the feature's size (~1e-5 of it): so its spread
    # is floored against the others' and against its own magnitude (a body
    # whose every feature is near-constant, as an untrained one's can be,
    # shipped a solved head that eval scored differently, 1/12 against 4/12).
    return mean, np.maximum.reduce([spread, np.full_like(spread, 0.01 * spread.mean() + 1e-12), 1e-3 * np.abs(mean)])


def _tensors(x, y, mean, scale):
    return (paddle.to_tensor(((x - mean) / scale).astype("float32")),
            paddle.to_tensor(np.asarray(y, dtype="int64").reshape(-1)))


def _weight(class_weights):
    return None if class_weights is None else paddle.to_tensor(np.asarray(class_weights, dtype="float32"))


def _parameters(features, classes):
    zero = paddle.nn.initializer.Constant(0.0)
    return (paddle.create_parameter([features, classes], "float32", default_initializer=zero),
            paddle.create_parameter([classes], "float32", default_initializer=zero))


def _minimise(x, y, w, b, strength, weight, iterations):
    """Mean (weighted) cross-entropy + strength / 2 x |w|^2 by full-batch
    L-BFGS from where (w, b) are (the bias is not penalised, as in
    scikit-learn)."""
    optimizer = paddle.optimizer.LBFGS(learning_rate=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                                       parameters=[w, b])

    def closure():
        optimizer.clear_grad()
        loss = paddle.nn.functional.cross_entropy(paddle.matmul(x, w) + b, y, weight=weight) \
            + strength / 2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def _folded(w, b, mean, scale):
    """Standardising folded into the layer: (x - mean) / scale @ w + b == x @ w' + b'
    (in float64: the bias is a difference of large terms)."""
    w, b = np.asarray(w, "float64"), np.asarray(b, "float64")
    return (w / scale[:, None]).astype("float32"), (b - (mean / scale) @ w).astype("float32")
