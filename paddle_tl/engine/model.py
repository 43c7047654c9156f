"""A `paddle.Model` whose training step never applies a non-finite update.

hapi's training step runs forward, backward and `optimizer.minimize` in one
call, before any callback sees the loss, so a NaN/Inf batch would already be
in the weights (and momentum, and BatchNorm statistics) when a callback
noticed. GuardedModel runs hapi's step without its update, checks the loss
and the gradients, and only then updates; a non-finite batch leaves the
parameters, the optimizer state, BatchNorm running statistics and the
running training metrics exactly as they were. What to do about such a batch
(stop or skip: Global.nan_policy) is EpochRecorder's decision, told through
`skipped_update`.

What the guard costs per step: one copy of the running statistics a
forward in train mode can move (BatchNorm layers that normalise with batch
statistics; frozen ones, `_use_global_stats` True, never move and are not
copied) and of the metrics' state (a few numbers), one host sync for the
loss (hapi's own), and one fused finiteness check over every gradient
(`check_finite_and_unscale_` with scale 1: one op, one host sync).

It also carries what paddle_tl needs from hapi's AMP: evaluation under O2,
and the loss scale (for L2-SP's gradient hook).

This is the one module that reads paddle.Model's private attributes
(`_optimizer`, `_metrics`, `_scaler`, listed in
paddle_internals.PADDLE_MODEL_PRIVATES with Paddle's other internals);
everything else in paddle_tl uses GuardedModel's public methods, and
tests/engine/test_model.py fails naming the attribute if a Paddle upgrade
moves one.
"""

import copy

import numpy as np

from paddle_tl.runtime import import_paddle
from paddle_tl.transfer.freezing import batch_norm_layers

paddle = import_paddle()


class GuardedModel(paddle.Model):
    # Why the last training batch made no update (None when it made one).
    skipped_update = None
    amp_level = None  # Global.amp as prepared: None, "O1" or "O2"

    def prepare(self, optimizer=None, loss=None, metrics=None, amp_configs=None):
        self.amp_level = amp_configs
        super().prepare(optimizer, loss, metrics, amp_configs=amp_configs)
        # What a training step may move (see _moved_by_forward and
        # _gradients_finite), listed once: walking the layers costs more than the copies.
        self._parameters = self.network.parameters()
        self._batch_norms = batch_norm_layers(self.network)
        statistics_ids = {id(t) for layer in self._batch_norms for t in (layer._mean, layer._variance)}
        self._buffers = [b for b in self.network.buffers() if id(b) not in statistics_ids]
        self._one = paddle.ones([1], dtype="float32")  # the unit scale of the finiteness check

    def eval_batch(self, inputs, labels=None):
        # O2 casts the weights to float16 (BatchNorm's stay float32), but
        # hapi's evaluation runs the network outside auto_cast, where float32
        # images meet float16 weights and the kernels refuse the mix; evaluate
        # as training computes. O1 keeps float32 weights: it evaluates in
        # float32, as PaddleClas does by default.
        with paddle.amp.auto_cast(enable=self.amp_level == "O2", level="O2"):
            return super().eval_batch(inputs, labels)

    def loss_scale(self):
        """The factor AMP multiplied the loss by before backward (a tensor),
        or None without AMP. hapi creates its GradScaler at the first
        training step; gradient hooks run after that."""
        scaler = self._amp_scaler()
        return scaler._scale if scaler is not None and scaler.is_enable() else None

    def learning_rate(self):
        """The optimizer's current learning rate (a float)."""
        return float(self._optimizer.get_lr())

    def optimizer(self):
        """The optimizer given to prepare."""
        return self._optimizer

    def metrics(self):
        """The metrics given to prepare (a list)."""
        return list(self._metrics)

    def train_batch(self, inputs, labels=None, update=True):
        if not update:  # gradient accumulation (not used here): no update to guard
            self.skipped_update = None
            return super().train_batch(inputs, labels, update=False)
        # Forward in train mode moves BatchNorm statistics (and any buffers),
        # and the metrics count the batch, before the loss is known: keep
        # copies to put back.
        saved_tensors = [(tensor, tensor.clone()) for tensor in self._moved_by_forward()]
        metric_states = [copy.deepcopy(vars(metric)) for metric in self._metrics]  # Accuracy: 2 short lists
        result = super().train_batch(inputs, labels, update=False)  # forward + backward only
        losses = result[0] if self._metrics else result
        self.skipped_update = self._why_not_finite([float(np.sum(loss)) for loss in losses])
        if self.skipped_update is None:
            self._update()
        else:
            for tensor, saved in saved_tensors:
                tensor.set_value(saved)
            for metric, state in zip(self._metrics, metric_states):
                vars(metric).clear()
                vars(metric).update(state)
        self.network.clear_gradients()
        return result

    def _moved_by_forward(self):
        """The tensors a forward in train mode may change: the running
        statistics of BatchNorm layers that normalise with batch statistics
        (`_use_global_stats` None or False; True, a frozen stage, keeps its
        statistics), and the network's other buffers. Which layers are frozen
        is read every step: gradual unfreezing changes it between epochs."""
        moved = [t for layer in self._batch_norms if layer._use_global_stats is not True
                 for t in (layer._mean, layer._variance)]
        return moved + self._buffers

    def _update(self):
        """What hapi's step does after backward (`minimize` in dygraph is
        `step` on the gradients already there)."""
        scaler = self._amp_scaler()
        if scaler is not None:  # AMP: the scaler unscales, skips on overflow, adapts its scale
            scaler.step(self._optimizer)
            scaler.update()
        else:
            self._optimizer.step()

    def _why_not_finite(self, losses):
        reason = None
        bad_loss = next((loss for loss in losses if not np.isfinite(loss)), None)
        if bad_loss is not None:
            reason = f"training loss became {bad_loss}"
        # Under AMP, overflowing (scaled) gradients are routine: the scaler
        # skips those steps itself and lowers its scale.
        elif self._amp_scaler() is None and not self._gradients_finite():
            reason = "training gradients became NaN/Inf"
        if paddle.distributed.get_world_size() > 1:
            # Every process must make the same choice or their weights part.
            flag = paddle.to_tensor(0 if reason is None else 1, dtype="int32")
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
            if reason is None and int(flag) == 1:
                reason = "another process's batch was not finite"
        return reason

    def _amp_scaler(self):
        return getattr(self, "_scaler", None)  # hapi sets it only under AMP

    def _gradients_finite(self):
        """One fused check over every gradient (per dtype; without AMP all
        float32): hapi's GradScaler's own op, with scale 1, so the gradients
        are left as they are (x * 1) when finite; when not, the op zeroes
        them, and this step is skipped anyway. One host sync, not one per tensor."""
        by_dtype = {}
        for param in self._parameters:
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        found = None
        for grads in by_dtype.values():
            _, found_here = paddle._C_ops.check_finite_and_unscale_(grads, self._one)
            found = found_here if found is None else found | found_here
        return found is None or not bool(found)
