"""An exponential moving average of the weights (Global.ema_decay), as a
hapi callback: after the t-th training step (t from 0)
    ema = d * ema + (1 - d) * weights,  d = min(decay, (1 + t) / (10 + t))
over the network's whole state dict, float32: the parameters, and the
BatchNorm statistics too, so that the averaged weights are evaluated with
statistics that match them (timm's ModelEmaV2 does the same). The ramp of d
(TensorFlow's ExponentialMovingAverage with num_updates) is for small data:
a run of a few hundred steps would otherwise keep most of the starting
weights, a freshly initialised head included, in its average.

For an evaluated epoch the network holds the average from on_epoch_end
(placed first, before the validation score and hapi's evaluation) until the
next epoch begins: the epoch's scores, the best epoch and best_model (hence
calibration and export) are the average's. Training goes on from the raw
weights, which `latest` saves for resuming, beside the average
(`latest.ema.pdparams`).
"""

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from paddle_tl.errors import CheckpointError
from paddle_tl.runtime import import_paddle

paddle = import_paddle()
Callback = paddle.callbacks.Callback

# Checkpoints keep the average as <prefix>.<EMA_NAME>.pdparams, with the
# number of steps averaged (which sets the ramp) under UPDATES.
EMA_NAME = "ema"
UPDATES = "@updates"


class WeightAverage(Callback):
    """The moving average of `network`'s weights, shown to evaluation on the
    epochs `evaluates` (EvalSchedule.evaluates) names."""

    def __init__(self, network, decay, evaluates, resume=None):
        super().__init__()
        self.network, self.decay, self.evaluates = network, decay, evaluates
        self.average = _float32_copy(network.state_dict())  # the weights it starts from
        self._raw = None  # the raw weights while the network holds the average
        self.updates = 0
        if resume is not None:
            self._restore(resume)

    def _restore(self, prefix):
        path = Path(f"{prefix}.{EMA_NAME}.pdparams")
        if not path.is_file():
            print(f"Global.ema_decay: {prefix} holds no weight average (it trained without one); "
                  "the average starts from its weights")
            return
        saved = paddle.load(str(path))
        missing = sorted(set(self.average) - set(saved))
        if missing:
            raise CheckpointError(f"{path} does not fit this model ({len(missing)} tensors missing, "
                                  f"e.g. {missing[0]})")
        self.average = _float32_copy({key: saved[key] for key in self.average})
        self.updates = int(np.asarray(saved[UPDATES]).reshape(-1)[0])

    def on_epoch_begin(self, epoch, logs=None):
        self._show_raw()

    def on_train_batch_end(self, step, logs=None):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with paddle.no_grad():
            for key, value in self.network.state_dict().items():
                if not paddle.is_floating_point(value):
                    continue  # a counter, not a weight
                self.average[key] = decay * self.average[key] + (1 - decay) * value.astype("float32")

    def on_epoch_end(self, epoch, logs=None):
        if self.evaluates(epoch):
            self._raw = _float32_copy(self.network.state_dict())
            _assign(self.network, self.average)

    def on_train_end(self, logs=None):
        self._show_raw()

    def _show_raw(self):
        if self._raw is not None:
            _assign(self.network, self._raw)
            self._raw = None

    @contextmanager
    def raw_weights(self):
        """The network holds the raw weights within (for `latest`)."""
        if self._raw is None:
            yield
            return
        _assign(self.network, self._raw)
        try:
            yield
        finally:
            _assign(self.network, self.average)

    def state(self):
        """{EMA_NAME: the average}: what a checkpoint saves beside the network."""
        return {EMA_NAME: {**self.average, UPDATES: paddle.to_tensor([self.updates], dtype="int64")}}


def _float32_copy(state):
    """A copy (never the network's own tensors), floats as float32."""
    return {key: value.clone().astype("float32") if paddle.is_floating_point(value) else value.clone()
            for key, value in state.items()}


def _assign(network, values):
    """Write `values` into the network's own tensors, in their dtype (float16
    under Global.amp=O2)."""
    with paddle.no_grad():
        for key, tensor in network.state_dict().items():
            tensor.set_value(values[key].astype(tensor.dtype))
