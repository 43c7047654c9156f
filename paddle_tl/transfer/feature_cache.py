"""Cached features: when the whole body is frozen, run every image through it
once and train the head on the stored features.

A linear probe otherwise spends nearly all its time pushing the same images
through the same frozen body every epoch. The features are the input of the
head layer (models.features.headless), so this works for any architecture
whose head is a single Linear layer. Training on a fixed set of
features gives up per-epoch random augmentation; instead `cache_views`
views of each training image are cached: the first is the plain evaluation
view, the others are random training augmentations, and epoch e trains on
view e mod V.
"""

import contextlib
import copy

import numpy as np

from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.models.features import feature_head, feature_size, headless
from paddle_tl.models.static import fastest_runner
from paddle_tl.runtime import import_paddle, seed_everything

paddle = import_paddle()


class FeatureViews(paddle.io.Dataset):
    """Cached features and labels; epoch e reads view e mod V."""

    def __init__(self, views, labels):
        super().__init__()
        self.views, self.labels, self.epoch = views, labels, 0

    def __getitem__(self, index):
        return self.views[self.epoch % len(self.views)][index], self.labels[index:index + 1]

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
    with headless(network, spec), fastest_runner(network, input_size, batch_size, device) as run:
        def extract(dataset, transform, workers, desc):
            view = copy.copy(dataset)
            view.transform = transform
            loader = make_loader(view, batch_size, shuffle=False, num_workers=workers)
            return map_batches(run, loader, desc)[0].astype("float32")

        yield extract


def cached_datasets(network, spec, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                    device):
    """(training features in `views` views, [features of each of
    `plain_sets` {name: dataset} in the evaluation view], the head alone,
    the feature size)."""
    workers = loader_cfg.num_workers
    with feature_extractor(network, spec, input_size, loader_cfg.batch_size, device) as extract:
        train_views = []
        for v in range(views):
            seed_everything(seed + 100_003 * (v + 1))  # each augmented view its own draws, reproducibly
            transform = eval_tf if v == 0 else train_tf
            train_views.append(extract(train_set, transform, workers, f"features: train view {v + 1}/{views}"))
        plain = [FeatureViews([extract(dataset, eval_tf, workers, f"features: {name}")], _labels(dataset))
                 for name, dataset in plain_sets.items()]
    head = feature_head(network, spec)
    return FeatureViews(train_views, _labels(train_set)), plain, HeadOnly(head), feature_size(head)


def _labels(dataset):
    return np.array([label for _, label in dataset.samples], dtype="int64")
