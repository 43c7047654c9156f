"""Unsupervised domain adaptation (Transfer.domain_adaptation): learn from
labeled source images while pulling the body's features of unlabeled target
images (DataLoader.Target) toward the source's.

It runs inside hapi's own loop. Every training batch holds B source images
followed by B target images (SourceTargetPairs + pair_collate), the target
ones labeled UNLABELED. DomainAdaptationNet returns the logits and what the
domain term needs; DomainAdaptationLoss takes the cross-entropy of the
labeled rows only and adds the domain term. Evaluation batches have no target
rows, so there the domain term is zero and the numbers are the plain ones.

- mmd (DAN, Long et al. 2015): multi-kernel Maximum Mean Discrepancy between
  source and target features (the head's input), weighted by
  domain_weight x ramp.
- dann (Ganin et al. 2016): a domain classifier on the same features behind a
  gradient-reversal layer whose coefficient is the ramp; the classifier itself
  always learns at domain_weight.

ramp(p) = 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1]
(Ganin's schedule): the domain term starts at zero while the head is still
random, and reaches ~1 by a third of the run.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from paddle_tl.data.datasets import UNLABELED
from paddle_tl.models.features import feature_head, feature_size, features_and_logits
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
F = paddle.nn.functional

# Kernel bandwidths as multiples of the batch's mean squared distance: one
# bandwidth fits one scale of shift, several cover the scales a shift takes.
BANDWIDTH_MULTS = (0.125, 0.25, 0.5, 1.0, 2.0)
DOMAIN_CLASSIFIER_WIDTH = 1024


def ramp(progress):
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class GradientReversal(paddle.autograd.PyLayer):
    """Identity forward; backward multiplies the gradient by -coeff."""

    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * -ctx.coeff


def reverse_gradient(x, coeff):
    return GradientReversal.apply(x, coeff)


def mmd(source, target, bandwidth_mults=BANDWIDTH_MULTS):
    """Biased estimate of the squared multi-kernel MMD between two feature
    batches: the mean of Gaussian kernels whose bandwidths are multiples of
    the pooled batch's mean squared distance (held constant for the gradient)."""
    joint = paddle.concat([source, target]).astype("float32")
    norms = (joint * joint).sum(axis=1, keepdim=True)
    distances = paddle.clip(norms + norms.T - 2.0 * joint.matmul(joint, transpose_y=True), min=0.0)
    n = joint.shape[0]
    bandwidth = distances.detach().sum() / max(n * n - n, 1) + 1e-8
    kernel = sum(paddle.exp(-distances / (bandwidth * m)) for m in bandwidth_mults) / len(bandwidth_mults)
    ns = source.shape[0]
    return kernel[:ns, :ns].mean() + kernel[ns:, ns:].mean() - 2.0 * kernel[:ns, ns:].mean()


class SourceTargetPairs(paddle.io.Dataset):
    """Item i: source image i, its label, and a target image. Target images
    come in a fresh order every epoch (seed + epoch), cycling when there are
    fewer of them than source images."""

    def __init__(self, source, target, seed):
        super().__init__()
        self.source, self.target, self.seed, self.epoch = source, target, seed, 0
        self._order_epoch, self._order = None, None

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source[index]
        if self._order_epoch != self.epoch:
            self._order = np.random.RandomState(self.seed + self.epoch).permutation(len(self.target))
            self._order_epoch = self.epoch
        target_image, _ = self.target[int(self._order[index % len(self._order)])]
        return image, label, target_image


def pair_collate(batch):
    """[images, labels]: the batch's source images, then its target images
    labeled UNLABELED."""
    images = np.stack([item[0] for item in batch] + [item[2] for item in batch])
    labels = np.concatenate([np.stack([item[1] for item in batch]),
                             np.full((len(batch), 1), UNLABELED, dtype="int64")])
    return [images, labels]


class DomainClassifier(paddle.nn.Sequential):
    def __init__(self, feature_size, width=DOMAIN_CLASSIFIER_WIDTH):
        super().__init__(
            paddle.nn.Linear(feature_size, width), paddle.nn.BatchNorm1D(width), paddle.nn.ReLU(),
            paddle.nn.Linear(width, width), paddle.nn.BatchNorm1D(width), paddle.nn.ReLU(),
            paddle.nn.Linear(width, 1))


class DomainAdaptationNet(paddle.nn.Layer):
    """The classification network, returning (logits, features) for mmd or
    (logits, domain logits) for dann. Features are the head's input
    (models.features)."""

    def __init__(self, network, spec, method):
        super().__init__()
        self.network, self.spec, self.method = network, spec, method
        width = feature_size(feature_head(network, spec))
        self.domain_classifier = DomainClassifier(width) if method == "dann" else None
        self.reversal = 0.0  # gradient-reversal coefficient, set by DomainSchedule

    def forward(self, images):
        features, logits = features_and_logits(self.network, self.spec, images)
        if self.method == "dann":
            return logits, self.domain_classifier(reverse_gradient(features, self.reversal))
        return logits, features


class DomainAdaptationLoss(paddle.nn.Layer):
    """[classification loss of the labeled rows, weighted domain term]; hapi
    adds the two and logs both."""

    def __init__(self, classification_loss, method, weight):
        super().__init__()
        self.classification_loss, self.method, self.weight = classification_loss, method, weight
        self.ramp = 0.0  # set by DomainSchedule
        self.last_domain_loss = None  # unweighted, for the logs

    def forward(self, logits, aux, label):
        label = label.reshape([-1])
        labeled = paddle.nonzero(label != UNLABELED).reshape([-1])
        unlabeled = paddle.nonzero(label == UNLABELED).reshape([-1])
        loss = self.classification_loss(paddle.gather(logits, labeled), paddle.gather(label, labeled))
        if unlabeled.shape[0] == 0:  # an evaluation batch
            return [loss, paddle.zeros_like(loss)]
        if self.method == "mmd":
            domain_loss = mmd(paddle.gather(aux, labeled), paddle.gather(aux, unlabeled))
            weighted = domain_loss * (self.weight * self.ramp)
        else:
            is_target = (label == UNLABELED).astype("float32").unsqueeze(-1)
            domain_loss = F.binary_cross_entropy_with_logits(aux.astype("float32"), is_target)
            weighted = domain_loss * self.weight
        self.last_domain_loss = float(domain_loss)
        return [loss, weighted]


class LabeledAccuracy(paddle.metric.Accuracy):
    """hapi's Accuracy over the labeled rows, fed (logits, aux, label)."""

    def compute(self, pred, _aux, label, *args):
        labeled = paddle.nonzero(label.reshape([-1]) != UNLABELED).reshape([-1])
        return super().compute(paddle.gather(pred, labeled), paddle.gather(label, labeled))


class DomainSchedule(paddle.callbacks.Callback):
    """Sets the ramp every step, the target order every epoch, and averages
    the unweighted domain loss over each epoch for the history."""

    def __init__(self, setup, state):
        super().__init__()
        self.setup, self.state = setup, state

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = self.state.run_epoch(epoch)
        self.setup.train_data.epoch = self.epoch
        self._sum, self._count = 0.0, 0

    def on_train_batch_begin(self, step, logs=None):
        steps_per_epoch = self.params["steps"]  # hapi's: the training loader's length
        progress = (self.epoch * steps_per_epoch + step) / (self.state.epochs * steps_per_epoch)
        self.ramp = ramp(progress)
        self.setup.loss.ramp = self.setup.network.reversal = self.ramp

    def on_train_batch_end(self, step, logs=None):
        if self.setup.loss.last_domain_loss is not None:
            self._sum += self.setup.loss.last_domain_loss
            self._count += 1
        # The epoch's figures so far, as columns of its history row (VisualDL
        # train/domain_loss, train/domain_ramp).
        self.state.row.update(train_domain_loss=self._sum / max(self._count, 1), train_domain_ramp=self.ramp)


@dataclass
class DomainSetup:
    """What the domain_pairs fit mode (engine/fit.py) trains with."""
    method: str
    train_data: SourceTargetPairs
    network: DomainAdaptationNet
    loss: DomainAdaptationLoss
    extra_layers: dict = field(default_factory=dict)  # trained layers outside the classifier, by name


def setup_domain_adaptation(transfer_cfg, network, spec, train_set, target_set, classification_loss, seed):
    """What the domain_pairs fit mode trains with. The network's head takes
    feature vectors (combinations.py refuses domain adaptation otherwise)."""
    method = transfer_cfg.domain_adaptation
    net = DomainAdaptationNet(network, spec, method)
    extra = {"domain_classifier": net.domain_classifier} if method == "dann" else {}
    return DomainSetup(method=method, train_data=SourceTargetPairs(train_set, target_set, seed), network=net,
                       loss=DomainAdaptationLoss(classification_loss, method, transfer_cfg.domain_weight),
                       extra_layers=extra)
