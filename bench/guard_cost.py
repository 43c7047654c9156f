"""What the NaN guard (engine/model.py:GuardedModel) adds to a training step,
timed alone on the process's CPU clock, beside hapi's whole training step on
the same model.

The guard's work per step: copy the running statistics a forward in train
mode can move and the metrics' state, and check every gradient (one fused
op). It is timed here without the forward and backward around it, so that
the figure does not drown in their spread; the ratio to hapi's step (forward,
backward, update, metrics) is what it costs a run.

    python bench/guard_cost.py [--arch mobilenet_v2 resnet50] [--mode full linear_probe]
        [--input-size 112] [--batch-size 8]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.engine.model import GuardedModel  # noqa: E402
from paddle_tl.models.zoo import build_model, get_spec  # noqa: E402
from paddle_tl.runtime import import_paddle  # noqa: E402
from paddle_tl.transfer.freezing import running_statistics, set_frozen_stages, trainable_parameters  # noqa: E402
from paddle_tl.transfer.plan import plan_transfer  # noqa: E402

paddle = import_paddle()


def guard_work(model):
    """What GuardedModel.train_batch does besides hapi's forward and backward
    and the update (the copies are put back only after a non-finite batch)."""
    saved = [(tensor, tensor.clone()) for tensor in model._moved_by_forward()]
    states = [copy.deepcopy(vars(metric)) for metric in model.metrics()]
    return model._gradients_finite(), saved, states


def cpu_ms(function, calls, repeats=5):
    """Median over `repeats` of the CPU milliseconds per call."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            function()
        times.append((time.process_time() - started) / calls * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--mode", nargs="+", choices=["full", "linear_probe"], default=["full", "linear_probe"])
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    size, batch = args.input_size, args.batch_size
    rng = np.random.RandomState(0)
    images = rng.rand(batch, 3, size, size).astype("float32")
    labels = rng.randint(0, 2, (batch, 1)).astype("int64")
    print("| network | training | hapi step, CPU ms | guard, CPU ms | guard / step | statistics copied "
          "| gradients checked |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.arch:
        for mode in args.mode:
            spec = get_spec(arch)
            network = build_model(spec.name, 2)
            transfer = load_config(None, [f"Transfer.strategy={mode}", "Arch.pretrained=false"]).Transfer
            plan = plan_transfer(transfer, len(spec.stages), [100, 100], True)
            set_frozen_stages(network, spec, plan.frozen_stages, plan.bn)
            optimizer = paddle.optimizer.Momentum(0.01, momentum=0.9,
                                                  parameters=trainable_parameters(network, spec, plan))
            model = GuardedModel(network, [paddle.static.InputSpec([None, 3, size, size], "float32", "image")],
                                 [paddle.static.InputSpec([None, 1], "int64", "label")])
            model.prepare(optimizer, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
            step = cpu_ms(lambda: paddle.Model.train_batch(model, [images], [labels]), 1)  # hapi's own step
            network.train()
            loss = paddle.nn.functional.cross_entropy(network(paddle.to_tensor(images)), paddle.to_tensor(labels))
            loss.backward()  # gradients to check, as after hapi's backward
            checked = sum(p.grad is not None for p in network.parameters())
            guard = cpu_ms(lambda: guard_work(model), 20)
            print(f"| {arch} | {mode} | {step:.0f} | {guard:.2f} | {guard / step:.2%} "
                  f"| {len(model._moved_by_forward())} of {len(running_statistics(network))} | {checked} |",
                  flush=True)
            network.clear_gradients()


if __name__ == "__main__":
    main()
