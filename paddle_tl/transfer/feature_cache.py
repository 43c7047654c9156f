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
from dataclasses import dataclass
from typing import Callable

import numpy as np

from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.models.features import feature_head, feature_size, headless
from paddle_tl.models.split import forward_steps, split, why_not_split
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


class ProbeFirst(paddle.io.Dataset):
    """Cached activations that also serve the features computed from them:
    while `probing()` (every stage frozen: LP-FT's linear probe, gradual's
    first epochs) an item's input is the features, which the head alone
    needs, so those epochs cost what a cached linear probe costs instead of
    running the frozen top stages every step."""

    def __init__(self, activations, features, probing):
        super().__init__()
        self.activations, self.features, self.probing = activations, features, probing

    @property
    def epoch(self):
        return self.activations.epoch

    @epoch.setter
    def epoch(self, value):  # ViewSwitcher's: both read the same view
        self.activations.epoch = self.features.epoch = value

    def __getitem__(self, index):
        return (self.features if self.probing() else self.activations)[index]

    def __len__(self):
        return len(self.activations)


class TopOrHead(paddle.nn.Layer):
    """The network's part above a cut, fed with its activations, or its head
    alone (shared parameters), fed with features (ProbeFirst's two inputs:
    features are one vector an image)."""

    def __init__(self, top, head):
        super().__init__()
        self.top, self.head = top, head

    def forward(self, inputs):
        return self.head(inputs) if inputs.ndim == 2 else self.top(inputs)


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
    stages = len(spec.stages)
    cut = _Cut("features", stages, _body_digest(network, spec), "float32", device,
               lambda: feature_extractor(network, spec, input_size, loader_cfg.batch_size, device),
               lambda lower: _between(network, spec, lower, stages))
    train_data, plain = _cache(cut, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed, teacher)
    head = feature_head(network, spec)
    return train_data, plain, HeadOnly(head), feature_size(head)


# Activations are stored in half precision: they feed layers that train,
# whose float32 weights absorb the rounding (~1e-3 relative).
ACTIVATION_DTYPE = "float16"


def cached_activations(network, spec, boundary, input_size, train_set, plain_sets, eval_tf, train_tf, views,
                       loader_cfg, seed, device, dtype=ACTIVATION_DTYPE, teacher=None):
    """(training activations of the network's frozen bottom `boundary`
    stages (models/split.py) in `views` views, [activations of each of
    `plain_sets` in the evaluation view]), stored as `dtype`; with
    `teacher`, as cached_datasets."""
    bottom = split(network, spec, boundary)[0]
    cut = _Cut("activations", boundary, _body_digest(network, spec), dtype, device,
               lambda: _extractor(bottom, input_size, loader_cfg.batch_size, device, dtype),
               lambda lower: _between(network, spec, lower, boundary))
    return _cache(cut, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed, teacher)


@dataclass
class _Cut:
    """Where the network is cut for a cache, and how its outputs are made."""
    what: str  # features or activations (what the progress lines say)
    boundary: int  # the stages below the cut (all of them for features)
    body: str  # fingerprint of the body's weights, while shared caches are on (else None)
    dtype: str
    device: str
    from_images: Callable  # () -> a context yielding extract(dataset, transform, workers, desc[, teacher])
    from_lower: Callable  # (lower boundary) -> the layers from that boundary to this cut, or None


# While shared_caches() is active: every array computed, by the body's
# weights, the cut, the dataset, the transform and the view.
_shared = None


@contextlib.contextmanager
def shared_caches():
    """Within the context, an output computed once is reused wherever the
    same weights meet the same images in the same view, and an output at a
    higher cut is computed from one at a lower cut rather than from the
    images: `auto`'s candidates and the run after them share one pass over
    the images."""
    global _shared
    outer = _shared
    _shared = {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


@contextlib.contextmanager
def unkept():
    """Within the context, outputs are read from the shared caches as ever,
    but what it computes is not kept there: afterwards they hold what they
    held before. For a look that must leave the run's own path as it was
    (auto's backbones measure Arch.name's features, which the run derives
    later from whichever cut is nearest then; float16 activations make
    another path's features differ in the last bits)."""
    if _shared is None:
        yield
        return
    before = set(_shared)
    try:
        yield
    finally:
        for key in set(_shared) - before:
            del _shared[key]


def _cache(cut, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed, teacher=None):
    """(train views, [plain views]). Each view comes from the shared caches
    (at this cut, or computed from a lower cut's), else from the images; the
    extractor is opened only for the latter. With a teacher, the training
    views are computed from the images beside its logits (and not shared)."""
    jobs = [(f"train view {v + 1}/{views}", train_set, eval_tf if v == 0 else train_tf, v) for v in range(views)]
    jobs += [(name, dataset, eval_tf, None) for name, dataset in plain_sets.items()]
    arrays, logits, from_images = [], {}, []
    for index, (name, dataset, transform, view) in enumerate(jobs):
        shared = teacher is None or view is None
        key = _key(cut.body, dataset, transform, view, seed)
        # A subsample (datasets.subsample) is served by its parent's rows too.
        sources = [(key, None)] + ([(_key(cut.body, dataset.parent, transform, view, seed), dataset.indices)]
                                   if hasattr(dataset, "parent") else [])
        arrays.append(_from_shared(cut, key, sources, loader_cfg.batch_size, f"{cut.what}: {name}")
                      if shared else None)
        if arrays[-1] is None:
            from_images.append((index, key, shared))
    if from_images:
        with cut.from_images() as extract:
            for index, key, shared in from_images:
                name, dataset, transform, view = jobs[index]
                with rng_kept():  # training then shuffles as it would without the cache
                    if view is not None:
                        seed_everything(seed + 100_003 * (view + 1))  # each view its own draws, reproducibly
                    result = extract(dataset, transform, loader_cfg.num_workers, f"{cut.what}: {name}",
                                     *(() if shared else (teacher,)))
                if shared:
                    arrays[index] = result
                    if _shared is not None:
                        _shared[(cut.boundary, *key)] = result
                else:
                    arrays[index], logits[index] = result
    teacher_views = [logits[index] for index in range(views)] if teacher is not None else None
    train = FeatureViews(arrays[:views], _labels(train_set), teacher_views)
    plain = [FeatureViews([array], _labels(dataset)) for array, dataset in zip(arrays[views:], plain_sets.values())]
    return train, plain


def _key(body, dataset, transform, view, seed):
    return body, id(dataset), len(dataset), id(transform), view, seed if view else None


def share_features(network, spec, computed):
    """While shared caches are on, features of `network` computed elsewhere
    serve it as its own: `computed` is [(dataset, transform, view, array)],
    view 0 for a training set's plain view, None for a plain set (what
    cached_datasets reads). A concatenation's features are its bodies'
    side by side (engine/backbones.py measured them body by body)."""
    if _shared is None:
        return
    body = _body_digest(network, spec)
    for dataset, transform, view, array in computed:
        _shared[(len(spec.stages), *_key(body, dataset, transform, view, None))] = array


def _from_shared(cut, key, sources, batch_size, desc):
    """The cut's outputs for `key` from the shared caches, stored under `key`
    too: from the first of `sources` [(key, rows or None for all)] stored at
    this cut, else computed from the nearest lower cut stored; None when
    neither."""
    if _shared is None:
        return None
    for source, rows in sources:
        if (cut.boundary, *source) in _shared:
            stored = _shared[(cut.boundary, *source)]
            _shared[(cut.boundary, *key)] = (stored if rows is None else stored[rows]).astype(cut.dtype, copy=False)
            return _shared[(cut.boundary, *key)]
    for lower in range(cut.boundary - 1, 0, -1):
        for source, rows in sources:
            if (lower, *source) in _shared and (between := cut.from_lower(lower)) is not None:
                inputs = _shared[(lower, *source)]
                _shared[(cut.boundary, *key)] = _run_layers(
                    between, inputs if rows is None else inputs[rows], batch_size, f"{desc} (from stage {lower})",
                    cut.device).astype(cut.dtype)
                return _shared[(cut.boundary, *key)]
    return None


def _between(network, spec, lower, upper):
    """The network's layers from the output of its bottom `lower` stages to
    the input of stage `upper` (the head's input when `upper` is every
    stage), or None where the network cannot be cut there."""
    if why_not_split(network, spec, lower) is not None:
        return None
    return paddle.nn.Sequential(*[layer for stage, layer in forward_steps(network, spec) if lower <= stage < upper])


def _run_layers(layers, inputs, batch_size, desc, device):
    """`layers` over stored outputs, in batches, as models.static.fastest_runner
    runs them (on CPU a static export run by Paddle Inference)."""
    stored = FeatureViews([inputs], np.zeros(len(inputs), dtype="int64"))  # read as float32; labels unused
    with fastest_runner(layers, tuple(inputs.shape[1:]), batch_size, device) as run:
        return map_batches(run, make_loader(stored, batch_size, shuffle=False, num_workers=0), desc)[0]


def _body_digest(network, spec):
    """A fingerprint of the body's weights (not the head's), while shared
    caches are on: outputs below the head depend on nothing else."""
    if _shared is None:
        return None
    digest = hashlib.sha1()
    for name, value in network.state_dict().items():
        if not match_prefix(name, spec.head):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


def _labels(dataset):
    return np.array([label for _, label in dataset.samples], dtype="int64")
