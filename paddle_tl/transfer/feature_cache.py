"""Cached features: when the whole body is frozen, run every image through it
once and train the head on the stored features.

A linear probe otherwise spends nearly all its time pushing the same images
through the same frozen body every epoch. The features are the input of the
head layer, captured with a forward pre-hook, so this works for any
architecture whose head is a single Linear layer. Training on a fixed set of
features gives up per-epoch random augmentation; instead `cache_views`
views of each training image are cached: the first is the plain evaluation
view, the others are random training augmentations, and epoch e trains on
view e mod V.
"""

import contextlib
import copy

import numpy as np
from tqdm import tqdm

from paddle_tl.data.loaders import make_loader
from paddle_tl.models.features import _head_as_identity, head_linear
from paddle_tl.models.static import temporary_static_model
from paddle_tl.runtime import import_paddle, seed_everything

paddle = import_paddle()


def why_not_cached(plan, network, spec):
    """None when features can be cached, else the reason they cannot."""
    if plan.always_frozen < plan.num_stages:
        return "part of the body trains"
    if plan.bn != "freeze":
        return "Transfer.bn=train keeps updating BatchNorm statistics"
    if head_linear(network, spec) is None:
        return f"the head of {spec.name} is not a single Linear layer"
    return None


def extract_features(network, head, dataset, transform, batch_size, num_workers, desc):
    """Inputs of `head` for every sample of `dataset` under `transform`, from
    the dynamic graph (used on GPU, and as the reference in tests)."""
    captured = []
    hook = head.register_forward_pre_hook(lambda _layer, inputs: captured.append(inputs[0].numpy()))
    network.eval()
    try:
        with paddle.no_grad():
            for images in _image_batches(dataset, transform, batch_size, num_workers, desc):
                network(images)
    finally:
        hook.remove()
    return np.concatenate(captured).astype("float32")


def _image_batches(dataset, transform, batch_size, num_workers, desc):
    view = copy.copy(dataset)
    view.transform = transform
    loader = make_loader(view, batch_size, shuffle=False, num_workers=num_workers)
    for images, _labels in tqdm(loader, desc=desc, unit="batch", leave=False):
        yield images


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
        self.dataset.epoch = self.state.start_epoch + epoch


@contextlib.contextmanager
def feature_extractor(network, spec, input_size, batch_size, device):
    """Yields extract(dataset, transform, num_workers, desc) -> head inputs.
    On CPU the body is exported once (the head swapped out while saving) and
    run by Paddle Inference with oneDNN: several times faster than the
    dynamic graph for the same numbers. On GPU, the dynamic graph."""
    if device != "cpu":
        head = head_linear(network, spec)
        yield lambda dataset, transform, workers, desc: extract_features(
            network, head, dataset, transform, batch_size, workers, desc)
        return
    network.eval()
    with contextlib.ExitStack() as stack:
        with _head_as_identity(network, spec):
            body = stack.enter_context(temporary_static_model(network, input_size, batch_size))

        def extract(dataset, transform, workers, desc):
            batches = _image_batches(dataset, transform, batch_size, workers, desc)
            return np.concatenate([body.run(images.numpy()) for images in batches]).astype("float32")

        yield extract


def cached_datasets(network, spec, input_size, train_set, eval_set, eval_tf, train_tf, views, loader_cfg, seed,
                    device):
    """Feature datasets for training (`views` views) and evaluation."""
    workers = loader_cfg.num_workers
    with feature_extractor(network, spec, input_size, loader_cfg.batch_size, device) as extract:
        train_views = []
        for v in range(views):
            seed_everything(seed + 100_003 * (v + 1))  # each augmented view its own draws, reproducibly
            transform = eval_tf if v == 0 else train_tf
            train_views.append(extract(train_set, transform, workers, f"features: train view {v + 1}/{views}"))
        eval_features = extract(eval_set, eval_tf, workers, "features: eval")

    def labels(dataset):
        return np.array([label for _, label in dataset.samples], dtype="int64")

    head = head_linear(network, spec)
    return (FeatureViews(train_views, labels(train_set)),
            FeatureViews([eval_features], labels(eval_set)),
            HeadOnly(head), head.weight.shape[0])
