"""Mask R-CNN (Arch.mask: FasterRCNN(mask=True), mask_head.py): the
branch's shapes, its loss falling on a few synthetic images, and a run
through train.py on a tiny synthetic COCO set writing mask AP."""

import json
from pathlib import Path

import numpy as np
import pytest

from paddle_tl.config import load_config
from paddle_tl.errors import ConfigError
from paddle_tl.runs.run_folder import run_config
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.evaluate import evaluate_checkpoint
from paddle_tl.tasks.detection.faster_rcnn import FasterRCNN
from paddle_tl.tasks.detection.train import train
from synthetic_detection import make_images, write_coco

paddle = import_paddle()
pytest.importorskip("pycocotools", reason="masks need pycocotools (the `detect` extra)")

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "mask_rcnn_mobilenet_v2_coco.yaml"
TINY = dict(fpn_channels=32, representation_size=64, anchor_sizes=((16,), (32,), (64,), (128,)),
            rpn_kwargs=dict(pre_nms_top_n={"train": 200, "test": 100}, post_nms_top_n={"train": 100, "test": 20}),
            roi_kwargs=dict(batch_size_per_image=64), mask=True, mask_channels=16)


def _inputs(images):
    return [paddle.to_tensor((np.asarray(i["image"], np.float32).transpose(2, 0, 1) / 255 - 0.45) / 0.25)
            for i in images]


def test_mask_rcnn_trains_a_mask_loss_and_gives_each_detection_a_mask():
    paddle.seed(3)
    model = FasterRCNN(3, **TINY)
    images = make_images(2, seed=7)
    targets = [{"boxes": i["boxes"], "labels": i["labels"], "masks": i["masks"]} for i in images]
    model.train()
    losses = model(_inputs(images), targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert 0.3 < float(losses["loss_mask"]) < 2.0
    with pytest.raises(ValueError, match="masks"):
        model(_inputs(images), [{"boxes": i["boxes"], "labels": i["labels"]} for i in images])
    model.eval()
    with paddle.no_grad():
        found = model(_inputs(images))
    for detections in found:
        count = detections["boxes"].shape[0]
        assert tuple(detections["mask_probs"].shape) == (count, 28, 28)
        probabilities = detections["mask_probs"].numpy()
        assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_images_without_objects_train_and_predict_without_masks():
    paddle.seed(0)
    model = FasterRCNN(3, **TINY)
    images = make_images(4, seed=3, empty_every=2)  # objects in images 0 and 2 only
    model.train()
    for batch in (images[:2], images[1::2]):  # one image with objects, then none at all
        losses = model(_inputs(batch), [{"boxes": i["boxes"], "labels": i["labels"], "masks": i["masks"]}
                                        for i in batch])
        assert all(np.isfinite(float(v)) for v in losses.values())
        sum(losses.values()).backward()
    assert float(losses["loss_mask"]) == 0.0  # no positive proposal, no mask to learn
    model.eval()
    model.roi_heads.score_thresh = 0.999  # no detection passes
    with paddle.no_grad():
        found = model(_inputs(images[:2]))
    assert [tuple(d["mask_probs"].shape) for d in found] == [(0, 28, 28), (0, 28, 28)]


def test_the_mask_loss_falls_on_a_few_synthetic_images(shared_dir):
    """The mask branch alone trains (Adam), through the whole model's
    training pass: proposals, their matching, the projected targets. Below
    0.8 x log 2 is below what a constant mask can reach on these targets
    (the binary entropy of their mean, ~0.64), so the masks follow the
    shapes. With SGD on the whole model the loss falls too, but too slowly
    for a fast test (0.69 -> 0.63 in 16 steps)."""
    paddle.seed(0)
    # ImageNet features: from a random body the FPN's maps are ~1e-3 and the mask head barely moves.
    model = FasterRCNN(3, pretrained=str(shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"), **TINY)
    images = make_images(2, seed=11)
    inputs = _inputs(images)
    targets = [{"boxes": i["boxes"], "labels": i["labels"], "masks": i["masks"]} for i in images]
    optimizer = paddle.optimizer.Adam(0.003, parameters=model.roi_heads.mask_branch.parameters())
    model.train()
    mask_losses = []
    for _ in range(16):
        loss = model(inputs, targets)["loss_mask"]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        mask_losses.append(float(loss))
    assert mask_losses[0] == pytest.approx(np.log(2), abs=0.01)  # the predictor starts near zero (mask_head.py)
    assert np.mean(mask_losses[-4:]) < 0.8 * np.log(2), mask_losses


SMALL = ["Global.seed=5", "Arch.pretrained=false", "Transfer.freeze_stages=2", "Arch.detector.short_side=72",
         "Arch.detector.max_size=96", "Arch.detector.train_short_sides=[72]", "Arch.detector.fpn_channels=32",
         "Arch.detector.representation_size=64", "Arch.detector.anchor_sizes=[16, 32, 64, 128]",
         "Arch.detector.rpn_pre_nms_top_n=[200, 100]", "Arch.detector.rpn_post_nms_top_n=[100, 50]",
         "Arch.detector.rois_per_image=64", "Arch.detector.mask_channels=16", "Optimizer.lr.learning_rate=0.005",
         "Optimizer.lr.warmup_epochs=0", "DataLoader.Train.batch_size=2", "DataLoader.Train.val_fraction=0.25"]


def test_a_mask_rcnn_run_writes_mask_ap_and_eval_agrees(tmp_path):
    images_dir, annotations, _ = write_coco(tmp_path / "coco", 10, seed=3)
    data = [f"DataLoader.{side}.dataset.{key}={value}" for side in ("Train", "Eval")
            for key, value in (("root", images_dir), ("annotation_file", annotations))]
    cfg = load_config(str(CONFIG), [*SMALL, *data, "Global.epochs=2", f"Global.output_dir={tmp_path / 'run'}"])
    assert cfg.Arch.mask is True and cfg.Global.task == "detection"
    metrics = train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("bbox_ap", "bbox_ap50", "mask_ap", "mask_ap50"):
        assert 0 <= written[key] <= 1, key
    assert written["mask_ap"] == metrics["mask_ap"]
    assert all("val_mask_ap50" in row and row["train_loss_mask"] > 0 for row in written["history"])
    state = json.loads((tmp_path / "run" / "best_model.state.json").read_text())
    assert state["model"]["mask"] is True and state["model"]["detector"]["mask_channels"] == 16
    result = evaluate_checkpoint(run_config(tmp_path / "run"))
    assert result["mask_ap"] == pytest.approx(metrics["mask_ap"], abs=1e-9)
    assert result["bbox_ap50"] == pytest.approx(metrics["bbox_ap50"], abs=1e-9)
    # Its export is refused in one line (the graph would drop the masks), the target left untouched.
    from paddle_tl.cli import main as cli
    assert cli(["export", str(tmp_path / "run"), "--output", str(tmp_path / "exported")]) == 2
    assert not (tmp_path / "exported").exists()


def test_the_mask_head_is_refused_for_classification():
    with pytest.raises(ConfigError, match="Arch.mask=true cannot be combined with Global.task=classification"):
        load_config(None, ["Arch.mask=true"])
