"""Cached features and activations: what a frozen part of the network
computes is computed once, and only the part after it trains, on the stored
outputs.

Training otherwise spends most of its time decoding the same images and
pushing them through the same frozen layers every epoch. Two cuts:
- features: the whole body is frozen; the head's input is cached
  (models.features.headless) and the head alone trains. Any architecture
  whose head is a single Linear layer (or Arch.head mlp).
- activations: the bottom k stages are frozen; their output is cached
  (float16, to halve the memory) and the top stages train on it with the
  head (models/split.py cuts the network).
Training on stored outputs gives up per-epoch random augmentation; instead
`cache_views` views of each training image are cached: the first is the
plain evaluation view, the others are random training augmentations, and
epoch e trains on view e mod V.

With a teacher (Distill, transfer/distill.py) the same batches also go
through the teacher, so its logits belong to exactly the augmented images
the features came from, and are computed once per view, not every epoch.
"""

import contextlib
import copy
import hashlib

import numpy as np

from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.models.features import feature_head, feature_size, headless
from paddle_tl.models.static import fastest_runner
from paddle_tl.models.zoo import match_prefix
from paddle_tl.runtime import import_paddle, rng_kept, seed_everything

paddle = import_paddle()


class FeatureViews(paddle.io.Dataset):
    """Cached outputs and labels; epoch e reads view e mod V (as float32,
    whatever they are stored in). With the teacher's logits of each view,
    an item is (outputs, teacher logits, label): the logits are a label too
    (distill.DistillationLoss)."""

    def __init__(self, views, labels, teacher_views=None):
        super().__init__()
        self.views, self.labels, self.teacher_views, self.epoch = views, labels, teacher_views, 0

    def __getitem__(self, index):
        view = self.epoch % len(self.views)
        outputs, label = self.views[view][index].astype("float32"), self.labels[index:index + 1]
        if self.teacher_views is None:
            return outputs, label
        return outputs, self.teacher_views[view][index], label

    def __len__(self):
        return len(self.labels)


class HeadOnly(paddle.nn.Layer):
    """The network's own head layer (shared parameters), fed with features."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        return self.head(features)


class ViewSwitcher(paddle.callbacks.Callback):
    def __init__(self, dataset, state):
        super().__init__()
        self.dataset, self.state = dataset, state

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.epoch = self.state.run_epoch(epoch)


@contextlib.contextmanager
def feature_extractor(network, spec, input_size, batch_size, device):
    """Yields extract(dataset, transform, num_workers, desc, teacher=None)
    -> head inputs (float32), computed by models.static.fastest_runner on the
    headless network: on CPU a static export of the body run by Paddle
    Inference. With `teacher` (run(images) -> logits), extract returns
    (features, teacher logits) of the same batches."""
    with headless(network, spec), _extractor(network, input_size, batch_size, device, "float32") as extract:
        yield extract


@contextlib.contextmanager
def _extractor(layer, input_size, batch_size, device, dtype):
    with fastest_runner(layer, input_size, batch_size, device) as body:
        def extract(dataset, transform, workers, desc, teacher=None):
            view = copy.copy(dataset)
            view.transform = transform
            loader = make_loader(view, batch_size, shuffle=False, num_workers=workers)
            if teacher is None:
                return map_batches(body, loader, desc)[0].astype(dtype)
            shape = []  # of one image's outputs, known after the first batch

            def both(images):  # one array per batch for map_batches: outputs, flattened, then logits
                outputs = body(images)
                shape[:] = outputs.shape[1:]
                return np.concatenate([outputs.reshape(len(outputs), -1), teacher(images)], axis=1)

            joined = map_batches(both, loader, desc)[0]
            width = int(np.prod(shape))
            return joined[:, :width].reshape(-1, *shape).astype(dtype), joined[:, width:].astype("float32")

        yield extract


def cached_datasets(network, spec, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                    device, teacher=None):
    """(training features in `views` views, [features of each of
    `plain_sets` {name: dataset} in the evaluation view], the head alone,
    the feature size). With `teacher` (run(images) -> logits), the training
    views carry the teacher's logits of the same images; the plain sets
    (evaluation) do not need them."""
    body = {name: value for name, value in network.state_dict().items() if not match_prefix(name, spec.head)}
    train_data, plain = _cache(
        lambda: feature_extractor(network, spec, input_size, loader_cfg.batch_size, device), ("features", body),
        train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed, teacher)
    head = feature_head(network, spec)
    return train_data, plain, HeadOnly(head), feature_size(head)


# Activations are stored in half precision: they feed layers that train,
# whose float32 weights absorb the rounding (~1e-3 relative).
ACTIVATION_DTYPE = "float16"


def cached_activations(bottom, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                       device, dtype=ACTIVATION_DTYPE, teacher=None):
    """(training activations of the frozen `bottom` (models/split.py) in
    `views` views, [activations of each of `plain_sets` in the evaluation
    view]), stored as `dtype`; with `teacher`, as cached_datasets."""
    return _cache(lambda: _extractor(bottom, input_size, loader_cfg.batch_size, device, dtype),
                  ("activations", bottom.state_dict(), dtype),
                  train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed, teacher)


# While shared_caches() is active: every array computed, by what computed
# it (the weights' fingerprint), the dataset, the transform and the view.
_shared = None


@contextlib.contextmanager
def shared_caches():
    """Within the context, an output computed once is reused wherever the
    same weights meet the same images in the same view: `auto`'s candidates
    and the run after them share one pass over the images."""
    global _shared
    outer = _shared
    _shared = {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


def _cache(make_extractor, computed_by, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
           teacher=None):
    """(train views, [plain views]); `make_extractor()` opens the extractor,
    only when something is not in the shared caches. `computed_by`: (what,
    its state dict[, dtype]). With a teacher, the training views are
    computed beside its logits (and not shared)."""
    what, state, *rest = computed_by
    fingerprint = (what, _digest(state), *rest) if _shared is not None else None
    jobs = [(f"train view {v + 1}/{views}", train_set, eval_tf if v == 0 else train_tf, v) for v in range(views)]
    jobs += [(name, dataset, eval_tf, None) for name, dataset in plain_sets.items()]
    keys = [(fingerprint, id(dataset), len(dataset), id(transform), view, seed if view else None)
            for _, dataset, transform, view in jobs]
    shareable = [teacher is None or view is None for _, _, _, view in jobs]
    arrays = {key: _shared[key] for key, ok in zip(keys, shareable) if ok and _shared is not None and key in _shared}
    logits = {}
    if len(arrays) < len(keys):
        with make_extractor() as extract:
            for key, ok, (name, dataset, transform, view) in zip(keys, shareable, jobs):
                if key in arrays:
                    continue
                with rng_kept():  # training then shuffles as it would without the cache
                    if view is not None:
                        seed_everything(seed + 100_003 * (view + 1))  # each view its own draws, reproducibly
                    arrays[key] = extract(dataset, transform, loader_cfg.num_workers, f"{what}: {name}",
                                          *(() if ok else (teacher,)))
                if not ok:
                    arrays[key], logits[key] = arrays[key]
                elif _shared is not None:
                    _shared[key] = arrays[key]
    teacher_views = [logits[key] for key in keys[:views]] if teacher is not None else None
    train = FeatureViews([arrays[key] for key in keys[:views]], _labels(train_set), teacher_views)
    plain = [FeatureViews([arrays[key]], _labels(dataset)) for key, dataset in zip(keys[views:], plain_sets.values())]
    return train, plain


def _digest(state):
    """A fingerprint of weights (a state dict)."""
    digest = hashlib.sha1()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


def _labels(dataset):
    return np.array([label for _, label in dataset.samples], dtype="int64")
