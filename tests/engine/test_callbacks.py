"""The small callbacks auto's trials use: a fit stopped after some epochs
of a longer schedule, and each epoch's wall time, its evaluation included."""

import numpy as np

from paddle_tl.engine.callbacks import EpochClock, StopAfter
from paddle_tl.runtime import import_paddle

paddle = import_paddle()


class _Counter(paddle.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.evaluations = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs += 1

    def on_eval_end(self, logs=None):
        self.evaluations += 1


def test_a_fit_stops_after_its_epochs_with_the_last_one_evaluated():
    paddle.seed(0)
    images = paddle.io.TensorDataset([paddle.to_tensor(np.random.rand(8, 4).astype("float32")),
                                      paddle.to_tensor(np.arange(8).reshape(8, 1) % 2)])
    model = paddle.Model(paddle.nn.Linear(4, 2), inputs=[paddle.static.InputSpec([None, 4], "float32", "x")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "y")])
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=10)
    model.prepare(paddle.optimizer.SGD(schedule, parameters=model.network.parameters()),
                  paddle.nn.CrossEntropyLoss())
    counter, clock = _Counter(), EpochClock()
    model.fit(images, images, batch_size=4, epochs=10, verbose=0, callbacks=[counter, clock, StopAfter(3)])
    assert (counter.epochs, counter.evaluations) == (3, 3)
    assert len(clock.seconds) == 3 and all(seconds > 0 for seconds in clock.seconds)
