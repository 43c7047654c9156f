"""Evaluation of a fine-tuned model on the Eval split: top-k, loss and
per-class accuracy."""

from dataclasses import dataclass

from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.data.transforms import eval_transform
from paddle_tl.engine.run_folder import trained_model
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import dynamic_runner
from paddle_tl.runtime import import_paddle, select_device

paddle = import_paddle()


@dataclass
class EvalSplit:
    device: str
    network: object  # the fine-tuned network, in eval mode
    input_size: int
    dataset: object
    loader: object  # in the dataset's order
    class_names: list


def eval_split(cfg):
    """Global.pretrained_model and an ordered loader over the Eval split,
    with the preprocessing of its architecture."""
    device = select_device(cfg.Global.device)
    network, _spec, pre, class_names = trained_model(cfg)
    loader_cfg = cfg.DataLoader.Eval
    dataset = build_dataset(loader_cfg.dataset, "eval", eval_transform(pre), class_names=class_names)
    loader = make_loader(dataset, loader_cfg.batch_size, shuffle=False, num_workers=loader_cfg.num_workers)
    return EvalSplit(device, network, pre.input_size, dataset, loader, class_names)


def evaluate(cfg):
    split = eval_split(cfg)
    # The dynamic graph, as training evaluates: the same top-1 as the run's.
    logits, labels = map_batches(dynamic_runner(split.network), split.loader)
    return classification_metrics(logits, labels, split.class_names, cfg.Metric.topk)
