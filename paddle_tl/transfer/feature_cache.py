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
    whatever they are stored in)."""

    def __init__(self, views, labels):
        super().__init__()
        self.views, self.labels, self.epoch = views, labels, 0

    def __getitem__(self, index):
        return self.views[self.epoch % len(self.views)][index].astype("float32"), self.labels[index:index + 1]

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
    """Yields extract(dataset, transform, num_workers, desc) -> head inputs
    (float32), computed by models.static.fastest_runner on the headless
    network: on CPU a static export of the body run by Paddle Inference."""
    with headless(network, spec), _extractor(network, input_size, batch_size, device, "float32") as extract:
        yield extract


@contextlib.contextmanager
def _extractor(layer, input_size, batch_size, device, dtype):
    with fastest_runner(layer, input_size, batch_size, device) as run:
        def extract(dataset, transform, workers, desc):
            view = copy.copy(dataset)
            view.transform = transform
            loader = make_loader(view, batch_size, shuffle=False, num_workers=workers)
            return map_batches(run, loader, desc)[0].astype(dtype)

        yield extract


def cached_datasets(network, spec, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                    device):
    """(training features in `views` views, [features of each of
    `plain_sets` {name: dataset} in the evaluation view], the head alone,
    the feature size)."""
    body = {name: value for name, value in network.state_dict().items() if not match_prefix(name, spec.head)}
    train_data, plain = _cache(
        lambda: feature_extractor(network, spec, input_size, loader_cfg.batch_size, device), ("features", body),
        train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed)
    head = feature_head(network, spec)
    return train_data, plain, HeadOnly(head), feature_size(head)


# Activations are stored in half precision: they feed layers that train,
# whose float32 weights absorb the rounding (~1e-3 relative).
ACTIVATION_DTYPE = "float16"


def cached_activations(bottom, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                       device, dtype=ACTIVATION_DTYPE):
    """(training activations of the frozen `bottom` (models/split.py) in
    `views` views, [activations of each of `plain_sets` in the evaluation
    view]), stored as `dtype`."""
    return _cache(lambda: _extractor(bottom, input_size, loader_cfg.batch_size, device, dtype),
                  ("activations", bottom.state_dict(), dtype),
                  train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed)


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


def _cache(make_extractor, computed_by, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed):
    """(train views, [plain views]); `make_extractor()` opens the extractor,
    only when something is not in the shared caches. `computed_by`: (what,
    its state dict[, dtype])."""
    what, state, *rest = computed_by
    fingerprint = (what, _digest(state), *rest) if _shared is not None else None
    jobs = [(f"train view {v + 1}/{views}", train_set, eval_tf if v == 0 else train_tf, v) for v in range(views)]
    jobs += [(name, dataset, eval_tf, None) for name, dataset in plain_sets.items()]
    keys = [(fingerprint, id(dataset), len(dataset), id(transform), view, seed if view else None)
            for _, dataset, transform, view in jobs]
    arrays = {key: _shared[key] for key in keys if _shared is not None and key in _shared}
    if len(arrays) < len(keys):
        with make_extractor() as extract:
            for key, (name, dataset, transform, view) in zip(keys, jobs):
                if key in arrays:
                    continue
                with rng_kept():  # training then shuffles as it would without the cache
                    if view is not None:
                        seed_everything(seed + 100_003 * (view + 1))  # each view its own draws, reproducibly
                    arrays[key] = extract(dataset, transform, loader_cfg.num_workers, f"{what}: {name}")
                if _shared is not None:
                    _shared[key] = arrays[key]
    train = FeatureViews([arrays[key] for key in keys[:views]], _labels(train_set))
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
