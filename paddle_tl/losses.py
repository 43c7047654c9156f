"""The Loss section. Paddle's own `CrossEntropyLoss(label_smoothing=...)` has
no kernel for integer class labels on CPU, so smoothing is written out here."""

from paddle_tl.backend import import_paddle

paddle = import_paddle()
F = paddle.nn.functional


class SmoothedCrossEntropy(paddle.nn.Layer):
    """(1 - eps) * NLL of the true class + eps * mean NLL over all classes."""

    def __init__(self, smoothing):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, label):
        log_probs = F.log_softmax(logits, axis=-1)
        true_class = -paddle.take_along_axis(log_probs, label.reshape([-1, 1]), axis=-1).squeeze(-1)
        uniform = -log_probs.mean(axis=-1)
        return ((1 - self.smoothing) * true_class + self.smoothing * uniform).mean()


def build_loss(loss_cfg):
    if loss_cfg.label_smoothing:
        return SmoothedCrossEntropy(loss_cfg.label_smoothing)
    return paddle.nn.CrossEntropyLoss()
