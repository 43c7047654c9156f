"""Evaluation of a fine-tuned model on the Eval split: top-k, loss and
per-class accuracy."""

from dataclasses import dataclass

from paddle_tl.data.datasets import build_dataset
from paddle_tl.data.loaders import make_loader, map_batches
from paddle_tl.data.transforms import eval_transform
from paddle_tl.metrics import classification_metrics
from paddle_tl.models.static import dynamic_runner
from paddle_tl.runs.run_folder import trained_model, trained_temperature
from paddle_tl.runtime import import_paddle, select_device
from paddle_tl.tta import tta_input, with_tta

paddle = import_paddle()


@dataclass
class EvalSplit:
    device: str
    network: object  # the fine-tuned network, in eval mode
    input_size: int
    dataset: object
    loader: object  # in the dataset's order
    class_names: list


def eval_split(cfg, tta="none"):
    """Global.pretrained_model and an ordered loader over the Eval split,
    with the preprocessing of its architecture (the larger square the
    flip_crops views come from, with that tta)."""
    device = select_device(cfg.Global.device)
    network, _spec, pre, class_names = trained_model(cfg)
    loader_cfg = cfg.DataLoader.Eval
    dataset = build_dataset(loader_cfg.dataset, "eval", eval_transform(tta_input(pre, tta)), class_names=class_names)
    loader = make_loader(dataset, loader_cfg.batch_size, shuffle=False, num_workers=loader_cfg.num_workers)
    return EvalSplit(device, network, pre.input_size, dataset, loader, class_names)


def evaluate(cfg):
    """The Eval split's metrics; with DataLoader.Eval.tta averaged over its
    views as an exported model's Predictor averages them (same temperature)."""
    tta = cfg.DataLoader.Eval.tta
    split = eval_split(cfg, tta)
    # The dynamic graph, as training evaluates: without TTA the same top-1 as the run's.
    network = dynamic_runner(split.network)
    # The views are numpy arrays (tta.py), the loader's batches tensors.
    run = network if tta == "none" else \
        with_tta(lambda images: network(paddle.to_tensor(images)), tta, split.input_size, trained_temperature(cfg))
    logits, labels = map_batches(run, split.loader)
    return dict(classification_metrics(logits, labels, split.class_names, cfg.Metric.topk), tta=tta)
