"""Freezing that really freezes: the bottom stages of the body (BatchNorm
statistics included), BitFit's body that trains only its biases and
normalisation parameters, the parameters the optimizer gets with their
per-stage learning rates, L2-SP, and gradual unfreezing."""

from paddle_tl.models.zoo import match_prefix, stage_index
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


def running_statistics(model):
    """BatchNorm running means and variances, which paddle lists among a
    model's parameters (with stop_gradient set) although no gradient moves them."""
    return [p for layer in batch_norm_layers(model) for p in (layer._mean, layer._variance)]


def batch_norm_layers(model):
    """Every BatchNorm layer of `model` (each holds `_mean`, `_variance` and
    `_use_global_stats`)."""
    return [layer for layer in model.sublayers() if is_batch_norm(layer)]


def is_batch_norm(layer):
    """Whether `layer` is a BatchNorm of either API: paddle.nn.BatchNorm
    (the older one, PaddleClas's models) or BatchNorm1D/2D/3D."""
    return isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))


def _below(spec, name, frozen_stages):
    index = stage_index(spec, name)
    return index is not None and index < frozen_stages


_NORMS = (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm, paddle.nn.LayerNorm, paddle.nn.GroupNorm)


def body_weights_kept(model, spec):
    """BitFit (Ben Zaken et al., 2022): the names of the body's parameters
    that stay frozen, every one but the biases and the normalisation layers'
    scale and shift."""
    norms = {name for name, layer in model.named_sublayers() if isinstance(layer, _NORMS)}
    return {name for name, _ in model.named_parameters()
            if stage_index(spec, name) is not None and not name.endswith(".bias")
            and name.rpartition(".")[0] not in norms}


def _frozen(spec, name, frozen_stages, kept):
    return _below(spec, name, frozen_stages) or name in kept


def set_frozen_stages(model, spec, frozen_stages, bn, bitfit=False):
    """Freeze the bottom `frozen_stages` stages and unfreeze the rest (with
    `bitfit`, of the rest only the biases and normalisation parameters).

    `paddle.Model.fit` calls `network.train()` every batch, which would put a
    frozen stage's BatchNorm back to updating its running statistics;
    `use_global_stats=True` makes it normalise with (and keep) its stored
    statistics in train mode too. Unfrozen layers get paddle's default back
    (None: batch statistics in training, stored ones in evaluation; False
    would mean batch statistics even in evaluation)."""
    frozen_params = trainable_params = 0
    statistics_ids = {id(p) for p in running_statistics(model)}
    kept = body_weights_kept(model, spec) if bitfit else set()
    for name, param in model.named_parameters():
        if id(param) in statistics_ids:
            continue  # never trained by the optimizer; frozen through use_global_stats below
        frozen = _frozen(spec, name, frozen_stages, kept)
        param.stop_gradient = frozen
        if frozen:
            frozen_params += int(param.size)
        else:
            trainable_params += int(param.size)
    for name, layer in model.named_sublayers():
        if is_batch_norm(layer):
            layer._use_global_stats = True if bn == "freeze" and _below(spec, name, frozen_stages) else None
    return {"trainable_params": trainable_params, "frozen_params": frozen_params}


def trainable_parameters(model, spec, plan):
    """Every parameter the optimizer may update during the run (gradual
    unfreezing included: paddle skips a parameter while its stop_gradient is
    set and creates its optimizer state when it first trains), each carrying
    its learning-rate multiplier in `optimize_attr` (what
    `ParamAttr(learning_rate=...)` sets; parameter-group dicts would break
    `paddle.Model`, whose `minimize` expects a flat list)."""
    statistics_ids = {id(p) for p in running_statistics(model)}
    kept = body_weights_kept(model, spec) if plan.strategy == "bitfit" else set()
    params = []
    for name, param in model.named_parameters():
        if id(param) in statistics_ids or _frozen(spec, name, plan.always_frozen, kept):
            continue
        index = stage_index(spec, name)
        param.optimize_attr["learning_rate"] = 1.0 if index is None else plan.stage_lr_mults[index]
        params.append(param)
    return params


class L2SP:
    """The anchors add_l2sp set: `anchored` body parameters. `loss_scale` (a
    callable returning the AMP loss scale, or None) may be given later, once
    the paddle.Model that owns the scaler exists."""

    def __init__(self, alpha, loss_scale=None):
        self.alpha, self.loss_scale, self.anchored = alpha, loss_scale, 0

    def pull(self, grad, param, start):
        term = self.alpha * (param.detach().astype(start.dtype) - start)
        scale = self.loss_scale() if self.loss_scale is not None else None
        if scale is not None:
            term = term * scale
        return grad + term.astype(grad.dtype)


def add_l2sp(model, spec, alpha, loss_scale=None):
    """L2-SP: pull every body weight toward its current (pretrained) value with
    the penalty alpha/2 * ||w - w0||^2, in place of weight decay toward zero.
    The penalty's gradient alpha * (w - w0) is added by a gradient hook, so the
    training loop needs no change; the head keeps ordinary weight decay.
    Returns the L2SP.

    Under AMP the hook sees gradients of the loss times the loss scale, which
    the optimizer step divides out again: `loss_scale()` (None without AMP)
    scales the pull too, or it would shrink by that factor (65536 at first).
    Under O2 the weights and gradients are float16; the pull is computed
    against the float32 start and cast (an overflow there is skipped and
    lowers the scale, like any other)."""
    statistics_ids = {id(p) for p in running_statistics(model)}
    no_decay = paddle.regularizer.L2Decay(0.0)
    l2sp = L2SP(alpha, loss_scale)
    for name, param in model.named_parameters():
        if id(param) in statistics_ids or match_prefix(name, spec.head):
            continue
        start = param.detach().clone()
        param.register_hook(lambda grad, p=param, w0=start: l2sp.pull(grad, p, w0))
        param.regularizer = no_decay
        l2sp.anchored += int(param.size)
    return l2sp


class GradualUnfreezer(paddle.callbacks.Callback):
    """Applies the plan's frozen stages at the start of every epoch; `counts`
    (set_frozen_stages') keeps the most parameters that trained at once."""

    def __init__(self, network, spec, plan, state, counts):
        super().__init__()
        self.network, self.spec, self.plan, self.state, self.counts = network, spec, plan, state, counts

    def on_epoch_begin(self, epoch, logs=None):
        run_epoch = self.state.run_epoch(epoch)
        frozen = self.plan.frozen_stages_at(run_epoch)
        if frozen != self.state.frozen_stages:
            counts = set_frozen_stages(self.network, self.spec, frozen, self.plan.bn)  # gradual: never bitfit
            print(f"epoch {run_epoch + 1}: {frozen}/{self.plan.num_stages} stages frozen, "
                  f"{counts['trainable_params']:,} trainable parameters")
            self.state.frozen_stages = frozen
            if counts["trainable_params"] > self.counts["trainable_params"]:
                self.counts.update(counts)
