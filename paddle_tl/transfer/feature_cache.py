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

With a teacher (Distill, transfer/distill.py) the same batches also go
through the teacher, so its logits belong to exactly the augmented images
the features came from, and are computed once per view, not every epoch.
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
    """Cached features and labels; epoch e reads view e mod V. With the
    teacher's logits of each view, an item is (features, teacher logits,
    label): the logits are a label too (distill.DistillationLoss)."""

    def __init__(self, views, labels, teacher_views=None):
        super().__init__()
        self.views, self.labels, self.teacher_views, self.epoch = views, labels, teacher_views, 0

    def __getitem__(self, index):
        view = self.epoch % len(self.views)
        label = self.labels[index:index + 1]
        if self.teacher_views is None:
            return self.views[view][index], label
        return self.views[view][index], self.teacher_views[view][index], label

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
    with headless(network, spec) as head, fastest_runner(network, input_size, batch_size, device) as body:
        def extract(dataset, transform, workers, desc, teacher=None):
            view = copy.copy(dataset)
            view.transform = transform
            loader = make_loader(view, batch_size, shuffle=False, num_workers=workers)
            run = body if teacher is None else lambda images: np.concatenate([body(images), teacher(images)], axis=1)
            outputs = map_batches(run, loader, desc)[0].astype("float32")
            if teacher is None:
                return outputs
            width = feature_size(head)
            return outputs[:, :width], outputs[:, width:]

        yield extract


def cached_datasets(network, spec, input_size, train_set, plain_sets, eval_tf, train_tf, views, loader_cfg, seed,
                    device, teacher=None):
    """(training features in `views` views, [features of each of
    `plain_sets` {name: dataset} in the evaluation view], the head alone,
    the feature size). With `teacher` (run(images) -> logits), the training
    views carry the teacher's logits of the same images; the plain sets
    (evaluation) do not need them."""
    workers = loader_cfg.num_workers
    train_views, teacher_views = [], []
    with feature_extractor(network, spec, input_size, loader_cfg.batch_size, device) as extract:
        for v in range(views):
            seed_everything(seed + 100_003 * (v + 1))  # each augmented view its own draws, reproducibly
            transform = eval_tf if v == 0 else train_tf
            extracted = extract(train_set, transform, workers, f"features: train view {v + 1}/{views}", teacher)
            if teacher is not None:
                extracted, logits = extracted
                teacher_views.append(logits)
            train_views.append(extracted)
        plain = [FeatureViews([extract(dataset, eval_tf, workers, f"features: {name}")], _labels(dataset))
                 for name, dataset in plain_sets.items()]
    head = feature_head(network, spec)
    train_data = FeatureViews(train_views, _labels(train_set), teacher_views if teacher is not None else None)
    return train_data, plain, HeadOnly(head), feature_size(head)


def _labels(dataset):
    return np.array([label for _, label in dataset.samples], dtype="int64")
