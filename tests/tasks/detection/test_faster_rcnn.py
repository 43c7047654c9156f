"""The Faster R-CNN network (paddle_tl/tasks/detection: backbone, fpn, rpn,
roi_heads, faster_rcnn): shapes, the pieces against hand-made cases, the
frozen body, and the loss falling on the synthetic shapes."""

import math

import numpy as np
import pytest

from paddle_tl.models.zoo import IMAGENET_MEAN, IMAGENET_STD
from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.backbone import DetectionBody
from paddle_tl.tasks.detection.boxes import AnchorGenerator
from paddle_tl.tasks.detection.faster_rcnn import FasterRCNN, batch_images
from paddle_tl.tasks.detection.fpn import FPN
from paddle_tl.tasks.detection.roi_heads import (FastRCNNPredictor, MultiScaleRoIAlign, RoIHeads, TwoMLPHead,
                                                 assign_levels)
from paddle_tl.tasks.detection.rpn import RegionProposalNetwork, RPNHead
from paddle_tl.transfer.freezing import batch_norm_layers
from synthetic_detection import make_images

paddle = import_paddle()

# Small settings for CPU: 160 x 128 images with 12-80 px objects, anchors
# 2x the stride (16 px on stride 8), few proposals.
SMALL = dict(fpn_channels=64, representation_size=256, anchor_sizes=((16,), (32,), (64,), (128,)),
             rpn_kwargs=dict(pre_nms_top_n={"train": 300, "test": 300}, post_nms_top_n={"train": 200, "test": 100}),
             roi_kwargs=dict(batch_size_per_image=128))


def _ceil_halvings(size, times):
    for _ in range(times):  # a stride-2 conv with "same" padding rounds up
        size = math.ceil(size / 2)
    return size


@pytest.mark.parametrize("height, width", [(128, 160), (100, 150)])
def test_body_and_fpn_shapes_for_mobilenet_v2(height, width):
    body = DetectionBody("mobilenet_v2")
    assert body.strides == [8, 16, 32] and body.out_channels == [32, 96, 1280]
    fpn = FPN(body.out_channels, out_channels=64)
    body.eval()
    with paddle.no_grad():
        levels = fpn(body(paddle.rand([2, 3, height, width])))
    expected = [(_ceil_halvings(height, n), _ceil_halvings(width, n)) for n in (3, 4, 5, 6)]  # P3..P6
    assert [tuple(p.shape) for p in levels] == [(2, 64, h, w) for h, w in expected]


def test_body_taps_the_resnet_and_efficientnet_stage_ends():
    for arch, channels in (("resnet18", [128, 256, 512]), ("efficientnet_lite0", [40, 112, 1280])):
        body = DetectionBody(arch)
        assert (body.out_channels, body.strides) == (channels, [8, 16, 32]), arch


def test_body_holds_the_imagenet_weights_and_statistics(shared_dir):
    state = paddle.load(str(shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"))
    body = DetectionBody("mobilenet_v2", pretrained=str(shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"))
    # steps: features.0 .. features.18, in order; the classifier is cut off
    assert len(body.steps) == 19 and not any("classifier" in n for n, _ in body.named_parameters())
    assert np.array_equal(body.steps[0][0].weight.numpy(), state["features.0.0.weight"])
    assert np.array_equal(body.steps[18][1]._mean.numpy(), state["features.18.1._mean"])


def test_batch_images_pads_to_a_multiple_of_32_and_records_sizes():
    batch, sizes = batch_images([paddle.ones([3, 100, 150]), paddle.ones([3, 128, 120])])
    assert tuple(batch.shape) == (2, 3, 128, 160) and sizes == [(100, 150), (128, 120)]
    assert float(batch[0, :, 100:].abs().sum()) == 0 and float(batch[0, :, :, 150:].abs().sum()) == 0


def test_level_assignment_follows_the_fpn_formula():
    # sqrt(wh): 112 -> floor(4 - 1) = 3, 224 -> 4, 447 -> 4, 448 -> 5, and
    # 10 and 2000 clamped to the levels there are (3..5), as indices 0..2.
    sides = [112, 224, 447, 448, 10, 2000]
    boxes = paddle.to_tensor([[0, 0, s, s] for s in sides], dtype="float32")
    assert assign_levels(boxes, 3, 5).numpy().tolist() == [0, 1, 1, 2, 0, 2]
    wide = paddle.to_tensor([[0, 0, 448, 112]], dtype="float32")  # sqrt(448 * 112) = 224
    assert assign_levels(wide, 3, 5).numpy().tolist() == [1]


def test_multiscale_roi_align_keeps_the_boxes_order_across_levels_and_images():
    # Each level's map is constant at its level number, so a pooled box shows
    # which level it came from; images differ by a factor 10.
    strides = [8, 16, 32]
    features = [paddle.to_tensor(np.stack([np.full((1, 256 // s, 256 // s), level + 1.0),
                                           np.full((1, 256 // s, 256 // s), 10.0 * (level + 1))]), dtype="float32")
                for level, s in enumerate(strides)]
    boxes = [paddle.to_tensor([[0, 0, 250, 250], [0, 0, 20, 20]], dtype="float32"),
             paddle.to_tensor([[0, 0, 20, 20], [0, 0, 224, 224], [0, 0, 100, 100]], dtype="float32")]
    pooled = MultiScaleRoIAlign(strides)(features, boxes)
    assert tuple(pooled.shape) == (5, 1, 7, 7)
    np.testing.assert_allclose(pooled.numpy()[:, 0, 3, 3], [2, 1, 10, 20, 10], rtol=1e-6)


def _rpn(**kwargs):
    generator = AnchorGenerator(((16,),), ((1.0,),), (8,))
    return RegionProposalNetwork(generator, RPNHead(8, 1), **kwargs)


def test_rpn_targets_on_a_hand_made_case():
    anchors = paddle.to_tensor([[0, 0, 10, 10],     # IoU 1 -> object
                                [0, 0, 20, 20],     # 100 / 400 = 0.25 -> background
                                [100, 100, 110, 110],  # 0 -> background
                                [5, 0, 15, 10]], dtype="float32")  # 50 / 150 = 0.33 -> ignored
    labels, matched = _rpn().assign_targets(anchors, paddle.to_tensor([[0, 0, 10, 10]], dtype="float32"))
    assert labels.numpy().tolist() == [1, 0, 0, -1]
    assert matched.numpy()[0].tolist() == [0, 0, 10, 10]
    # No anchor reaches 0.7 on a 12 x 12 box (best 100 / 144 = 0.69): the
    # low-quality match makes its best anchor a positive anyway; the 20 x 20
    # anchor (144 / 400 = 0.36) and the shifted one (70 / 174 = 0.40) are ignored.
    labels, matched = _rpn().assign_targets(anchors, paddle.to_tensor([[0, 0, 12, 12]], dtype="float32"))
    assert labels.numpy().tolist() == [1, -1, 0, -1]
    assert matched.numpy()[0].tolist() == [0, 0, 12, 12]
    # An image without objects: every anchor is background.
    labels, _ = _rpn().assign_targets(anchors, paddle.zeros([0, 4], "float32"))
    assert labels.numpy().tolist() == [0, 0, 0, 0]


def test_rpn_loss_trains_only_sampled_anchors_and_positive_deltas():
    rpn = _rpn(batch_size_per_image=4, positive_fraction=0.5)
    anchors = paddle.to_tensor([[0, 0, 10, 10], [0, 0, 20, 20], [100, 100, 110, 110], [5, 0, 15, 10]],
                               dtype="float32")
    labels, matched = rpn.assign_targets(anchors, paddle.to_tensor([[0, 0, 10, 10]], dtype="float32"))
    logits = paddle.to_tensor([[20.0, -20.0, -20.0, 99.0]])  # the ignored anchor's wild logit must not count
    losses = rpn.loss(logits, paddle.zeros([1, 4, 4]), anchors, [labels], [matched])
    assert float(losses["loss_objectness"]) < 1e-6
    assert float(losses["loss_rpn_box_reg"]) == 0  # the positive's box is its anchor: zero deltas are right
    shifted = paddle.to_tensor([[[1.0, 0, 0, 0], [5.0, 5, 5, 5], [5.0, 5, 5, 5], [5.0, 5, 5, 5]]])
    losses = rpn.loss(logits, shifted, anchors, [labels], [matched])
    # Only the positive's dx = 1 counts: (1 - 0.5 / 9) summed, over the 3 sampled anchors.
    assert float(losses["loss_rpn_box_reg"]) == pytest.approx((1 - 0.5 / 9) / 3, rel=1e-6)


def test_rpn_head_flattens_as_the_anchors_are_laid_out():
    # Anchor a of cell (row, col) is row * (W * A) + col * A + a: with zero
    # weights and a bias per anchor, the flattened outputs must cycle with
    # period A, and the per-cell map must land on its cell.
    head = RPNHead(2, 3)
    for conv in (head.conv, head.objectness, head.deltas):
        conv.weight.set_value(np.zeros(conv.weight.shape, "float32"))
    head.objectness.bias.set_value(np.array([0, 5, 0], "float32"))
    head.deltas.bias.set_value(np.arange(12, dtype="float32"))  # anchor a's (dx, dy, dw, dh) = 4a .. 4a + 3
    objectness, deltas = head([paddle.rand([1, 2, 4, 5])])
    assert objectness[0].numpy()[0].tolist() == [0, 5, 0] * 20
    np.testing.assert_array_equal(deltas[0].numpy()[0], np.tile(np.arange(12, dtype="float32").reshape(3, 4), (20, 1)))
    # the cells: a 1x1 objectness conv reading channel 0, fed a map that is its row * 10 + col
    head.conv.weight.set_value(np.pad(np.ones((1, 1, 1, 1), "float32"), [(0, 1), (0, 1), (1, 1), (1, 1)]))
    head.conv.bias.set_value(np.zeros(2, "float32"))
    head.objectness.weight.set_value(np.pad(np.ones((3, 1, 1, 1), "float32"), [(0, 0), (0, 1), (0, 0), (0, 0)]))
    head.objectness.bias.set_value(np.zeros(3, "float32"))
    grid = np.add.outer(np.arange(4) * 10.0, np.arange(5)).astype("float32")
    objectness, _ = head([paddle.to_tensor(np.stack([grid, grid])[None])])
    expected = np.repeat(grid.ravel(), 3)  # cell-major, each cell's 3 anchors together
    np.testing.assert_array_equal(objectness[0].numpy()[0], expected)


def test_proposals_are_clipped_to_each_image_and_capped():
    paddle.seed(1)
    rpn = _rpn(post_nms_top_n={"train": 50, "test": 20}, min_size=1.0)
    rpn.eval()
    anchors = rpn.anchor_generator([(8, 10)])  # an 64 x 80 padded batch
    count = anchors[0].shape[0]
    objectness = [paddle.randn([2, count])]
    deltas = [paddle.randn([2, count, 4]) * 3]  # large shifts and scales: many boxes run outside
    sizes = [(64, 80), (40, 50)]
    proposals = rpn.filter_proposals(anchors, objectness, deltas, sizes)
    for boxes, (height, width) in zip(proposals, sizes):
        boxes = boxes.numpy()
        assert 0 < len(boxes) <= 20
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
    # the large deltas did reach outside: clipping had something to do
    assert any((p.numpy()[:, 2] == w).any() or (p.numpy()[:, 3] == h).any() for p, (h, w) in zip(proposals, sizes))


def _roi_heads(**kwargs):
    pool = MultiScaleRoIAlign([8])
    return RoIHeads(pool, TwoMLPHead(4 * 49, 8), FastRCNNPredictor(8, 4), **kwargs)


def test_postprocess_on_hand_made_logits():
    heads = _roi_heads(score_thresh=0.05, nms_thresh=0.5)
    proposals = [paddle.to_tensor([[10, 10, 50, 50],    # class 1 (data label 0), sure
                                   [12, 12, 50, 50],    # the same object, less sure: NMS drops it
                                   [12, 12, 50, 50],    # ... but as class 3 it survives
                                   [60, 60, 120, 90],   # background
                                   [-10, 70, 40, 130]], dtype="float32")]  # class 2, runs outside
    logits = paddle.to_tensor([[0, 9, 0, 0], [0, 8, 0, 5], [0, 0, 0, 7], [9, 0, 0, 0], [0, 0, 6, 0]],
                              dtype="float32")
    deltas = paddle.zeros([5, 16])  # no correction: detections are the proposals
    detections = heads.postprocess(logits, deltas, proposals, [(100, 80)])[0]
    probabilities = paddle.nn.functional.softmax(logits, axis=-1).numpy()
    got = sorted(zip(detections["labels"].numpy().tolist(), detections["scores"].numpy().tolist(),
                     detections["boxes"].numpy().tolist()), key=lambda d: -d[1])
    assert [d[0] for d in got] == [0, 2, 1]
    np.testing.assert_allclose([d[1] for d in got], [probabilities[0, 1], probabilities[2, 3], probabilities[4, 2]],
                               rtol=1e-5)
    assert got[0][2] == [10, 10, 50, 50] and got[1][2] == [12, 12, 50, 50]
    assert got[2][2] == [0, 70, 40, 100]  # clipped to the 80 x 100 image
    # the background proposal and every score under 0.05 are gone
    assert (detections["scores"].numpy() > 0.05).all() and len(got) == 3


def test_box_head_targets_add_ground_truth_and_shift_labels():
    heads = _roi_heads(batch_size_per_image=64, positive_fraction=0.25)
    proposals = [paddle.to_tensor([[0, 0, 10, 10], [50, 50, 60, 60]], dtype="float32")]
    targets = [{"boxes": paddle.to_tensor([[1, 1, 10, 10]], dtype="float32"),
                "labels": paddle.to_tensor([2], dtype="int64")}]
    sampled, labels, regression, _ = heads.select_training_samples(proposals, targets)
    rows = sorted(zip(sampled[0].numpy().tolist(), labels.numpy().tolist()))
    # IoU 81/100 -> data class 2 = head class 3; the far one is background;
    # the ground truth itself is added as a positive.
    assert rows == [([0, 0, 10, 10], 3), ([1, 1, 10, 10], 3), ([50, 50, 60, 60], 0)]
    gt_row = [r for r, (box, _) in enumerate(zip(sampled[0].numpy().tolist(), labels)) if box == [1, 1, 10, 10]][0]
    np.testing.assert_allclose(regression.numpy()[gt_row], 0, atol=1e-6)


def _normalised(image):
    array = np.asarray(image, dtype="float32").transpose(2, 0, 1) / 255
    mean = np.asarray(IMAGENET_MEAN, "float32")[:, None, None]
    return (array - mean) / np.asarray(IMAGENET_STD, "float32")[:, None, None]


def _train(model, images, steps, lr=0.0025, batch=2):
    """SGD with momentum at torchvision's 0.02 per 16 images, scaled to
    `batch` (0.01 diverged within 10 steps); returns each step's losses."""
    params = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.Momentum(learning_rate=lr, momentum=0.9, parameters=params, weight_decay=1e-4)
    inputs = [_normalised(i["image"]) for i in images]
    model.train()
    history = []
    for step in range(steps):
        chosen = [(batch * step + k) % len(images) for k in range(batch)]
        losses = model(paddle.to_tensor(np.stack([inputs[i] for i in chosen])), [images[i] for i in chosen])
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        optimizer.clear_grad()
        history.append({name: float(value) for name, value in losses.items()})
    return history


def test_frozen_stages_and_every_batch_norm_stay_bit_identical_in_training():
    paddle.seed(0)
    model = FasterRCNN(3, frozen_stages=2, **SMALL)
    body = model.body
    before = {name: p.numpy().copy() for name, p in body.named_parameters()}  # BN statistics included
    frozen = {name for name, p in body.named_parameters()
              if body.step_stages[int(name.split(".")[1])] < 2}
    _train(model, make_images(4, seed=3, size=(160, 128)), steps=3)
    after = {name: p.numpy() for name, p in body.named_parameters()}
    for name in frozen:
        assert np.array_equal(before[name], after[name]), name
    for layer in batch_norm_layers(body):
        for param in (layer._mean, layer._variance, layer.weight, layer.bias):
            assert np.array_equal(before[_name(body, param)], param.numpy()), _name(body, param)
    # the stages above trained: the test could see a change
    trained = [n for n in before if n not in frozen and not np.array_equal(before[n], after[n])]
    assert trained and all(body.step_stages[int(n.split(".")[1])] >= 2 for n in trained)


def _name(layer, param):
    return next(name for name, p in layer.named_parameters() if p is param)


@pytest.mark.slow
def test_loss_falls_on_synthetic_shapes(shared_dir):
    """30 steps of batch 2 on 16 synthetic images at 160 x 128, mobilenet_v2
    from ImageNet, FPN 64 channels: the RPN learns objectness and the total
    falls. Measured by /tmp runs of the same loop for seeds 0, 1, 2: mean
    total of the first 5 steps 1.50, 1.43, 1.37, of the last 5 0.35, 0.84,
    0.29; objectness 0.69 -> 0.05-0.10."""
    paddle.seed(0)
    model = FasterRCNN(3, pretrained=str(shared_dir / "weights" / "mobilenet_v2_imagenet.pdparams"), **SMALL)
    history = _train(model, make_images(16, seed=0, size=(160, 128)), steps=30)
    totals = [sum(step.values()) for step in history]
    assert all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-5:]) < 0.7 * np.mean(totals[:5])
    objectness = [step["loss_objectness"] for step in history]
    assert np.mean(objectness[-5:]) < 0.5 * np.mean(objectness[:5])


def test_a_batch_without_objects_trains_on_background_only():
    paddle.seed(0)
    model = FasterRCNN(3, **SMALL)
    model.train()
    empty = {"boxes": np.zeros((0, 4), "float32"), "labels": np.zeros((0,), "int64")}
    losses = model(paddle.rand([2, 3, 64, 96]), [empty, empty])
    # nothing to regress; every sampled anchor and proposal is background
    assert float(losses["loss_rpn_box_reg"]) == 0 and float(losses["loss_box_reg"]) == 0
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in losses.values())
    sum(losses.values()).backward()  # and the graph has a gradient path
    assert model.rpn.head.objectness.weight.grad is not None


def test_eval_gives_detections_within_each_image_and_may_give_none():
    paddle.seed(0)
    model = FasterRCNN(3, **{**SMALL, "roi_kwargs": dict(score_thresh=0.0)})
    model.eval()
    sizes = [(100, 150), (128, 120)]
    with paddle.no_grad():
        found = model([paddle.rand([3, h, w]) for h, w in sizes])
    for detections, (height, width) in zip(found, sizes):
        boxes = detections["boxes"].numpy()
        assert 0 < len(boxes) <= 100 and len(detections["scores"]) == len(detections["labels"]) == len(boxes)
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert set(detections["labels"].numpy().tolist()) <= {0, 1, 2}
    model.roi_heads.score_thresh = 1.0  # no softmax score exceeds 1: no detections, and no error
    with paddle.no_grad():
        found = model(paddle.rand([1, 3, 64, 64]))
    assert [tuple(found[0][k].shape) for k in ("boxes", "scores", "labels")] == [(0, 4), (0,), (0,)]
