"""Box arithmetic (paddle_tl/tasks/detection/boxes.py) against hand-computed
values and a plain numpy NMS."""

import math

import numpy as np
import pytest

from paddle_tl.runtime import import_paddle
from paddle_tl.tasks.detection.boxes import (BBOX_XFORM_CLIP, AnchorGenerator, BalancedSampler, BoxCoder, Matcher,
                                             batched_nms, box_iou, clip_boxes, nms, remove_small_boxes)

paddle = import_paddle()


def numpy_nms(boxes, scores, threshold):
    """Greedy NMS: best score first (the lower index on ties); a box goes
    when a kept box overlaps it with IoU > threshold."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep, gone = [], np.zeros(len(boxes), dtype=bool)
    for i in order:
        if gone[i]:
            continue
        keep.append(i)
        inter = np.prod(np.clip(np.minimum(boxes[i, 2:], boxes[:, 2:]) - np.maximum(boxes[i, :2], boxes[:, :2]),
                                0, None), axis=1)
        gone |= inter / (areas[i] + areas - inter) > threshold
    return np.array(keep, dtype=np.int64)


def random_boxes(rng, count, size=200.0, quantum=None):
    xy = rng.uniform(0, size * 0.8, (count, 2))
    wh = rng.uniform(2, size * 0.3, (count, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if quantum:  # whole-pixel boxes: many exactly equal IoUs and duplicates
        boxes = np.round(boxes / quantum) * quantum
    return boxes.astype(np.float32)


# ---------------------------------------------------------------- IoU

def test_iou_matches_hand_computed_values():
    a = [[0, 0, 10, 10], [3, 3, 3, 3]]
    b = [[5, 5, 15, 15], [0, 0, 10, 10], [10, 0, 20, 10], [2, 2, 4, 4], [3, 3, 3, 3]]
    expected = [[25 / 175, 1.0, 0.0, 4 / 100, 0.0],  # partial, same, touching edges, inside, empty
                [0.0, 0.0, 0.0, 0.0, 0.0]]  # an empty box overlaps nothing, itself included (not NaN)
    np.testing.assert_allclose(box_iou(a, b).numpy(), expected, rtol=1e-6)
    assert box_iou(np.zeros((0, 4)), b).shape == [0, 5]


def test_clip_and_remove_small_boxes():
    clipped = clip_boxes([[-5, -2, 30, 12], [10, 12, 50, 40]], height=20, width=32).numpy()
    np.testing.assert_array_equal(clipped, [[0, 0, 30, 12], [10, 12, 32, 20]])
    assert remove_small_boxes([[0, 0, 4, 10], [0, 0, 10, 4], [0, 0, 3.9, 9]], 4).numpy().tolist() == [0, 1]


# ---------------------------------------------------------------- box coder

def test_encode_matches_hand_computed_deltas():
    # reference centre (5, 5), 10 x 10; target centre (10, 10), 10 x 20
    deltas = BoxCoder().encode([[5, 0, 15, 20]], [[0, 0, 10, 10]]).numpy()
    np.testing.assert_allclose(deltas, [[0.5, 0.5, 0.0, math.log(2)]], rtol=1e-6)
    weighted = BoxCoder((10, 10, 5, 5)).encode([[5, 0, 15, 20]], [[0, 0, 10, 10]]).numpy()
    np.testing.assert_allclose(weighted, [[5.0, 5.0, 0.0, 5 * math.log(2)]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (10, 10, 5, 5)])
def test_decode_inverts_encode(weights):
    rng = np.random.RandomState(0)
    targets, references = random_boxes(rng, 50), random_boxes(rng, 50)
    coder = BoxCoder(weights)
    decoded = coder.decode(coder.encode(targets, references), references).numpy()
    np.testing.assert_allclose(decoded, targets, atol=1e-3)


def test_decode_clamps_the_size_deltas():
    # dw = dh = 10 would make a box e^10 = 22026 times its reference; the clamp caps it at 1000/16.
    decoded = BoxCoder().decode([[0, 0, 10, 10]], [[0, 0, 2, 4]]).numpy()[0]
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(62.5))
    np.testing.assert_allclose([decoded[2] - decoded[0], decoded[3] - decoded[1]], [2 * 62.5, 4 * 62.5], rtol=1e-5)
    np.testing.assert_allclose([(decoded[0] + decoded[2]) / 2, (decoded[1] + decoded[3]) / 2], [1, 2], atol=1e-4)
    # Below the clamp nothing changes: dw = log 3 triples the width.
    small = BoxCoder().decode([[0, 0, math.log(3), 0]], [[0, 0, 2, 4]]).numpy()[0]
    np.testing.assert_allclose(small, [-2, 0, 4, 4], atol=1e-5)


def test_decode_keeps_one_box_per_class_layout():
    references = np.array([[0, 0, 10, 10], [20, 20, 40, 30]], dtype=np.float32)
    deltas = np.zeros((2, 8), dtype=np.float32)
    deltas[:, 4] = 1.0  # the second class's box moves one width to the right
    decoded = BoxCoder().decode(deltas, references).numpy()
    assert decoded.shape == (2, 8)
    np.testing.assert_allclose(decoded[:, :4], references)
    np.testing.assert_allclose(decoded[:, 4:], references + [[10, 0, 10, 0], [20, 0, 20, 0]])


# ---------------------------------------------------------------- anchors

def test_base_anchors_are_torchvisions():
    generator = AnchorGenerator()
    # torchvision's fasterrcnn_resnet50_fpn cell anchors for size 32, ratios 0.5, 1, 2 (h / w)
    np.testing.assert_array_equal(generator.cell_anchors[0], [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                                              [-11, -23, 11, 23]])
    # Rounded half to even as torch.round: 45 / 2 = 22.5 -> 22.
    odd = AnchorGenerator(sizes=((45,),), aspect_ratios=((1.0,),), strides=(8,))
    np.testing.assert_array_equal(odd.cell_anchors[0], [[-22, -22, 22, 22]])


def test_anchors_per_level_count_centres_sizes_and_ratios():
    sizes, ratios, strides = ((16, 32), (64, 128)), ((0.5, 1.0, 2.0), (1.0,)), (4, 16)
    generator = AnchorGenerator(sizes, ratios, strides)
    assert generator.num_anchors_per_location() == [6, 2]
    levels = generator([(5, 7), (2, 3)])
    assert [level.shape for level in levels] == [[5 * 7 * 6, 4], [2 * 3 * 2, 4]]
    for level, (height, width) in enumerate([(5, 7), (2, 3)]):
        anchors = levels[level].numpy()
        per_cell = generator.num_anchors_per_location()[level]
        grid = anchors.reshape(height, width, per_cell, 4)
        centres = (grid[..., :2] + grid[..., 2:]) / 2
        rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        for a in range(per_cell):  # every anchor of cell (row, col) centres on its top-left pixel
            np.testing.assert_array_equal(centres[:, :, a, 0], cols * strides[level])
            np.testing.assert_array_equal(centres[:, :, a, 1], rows * strides[level])
        cell = grid[0, 0]
        w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
        expected_ratio = np.repeat(ratios[level], len(sizes[level]))  # ratio-major, then size
        expected_size = np.tile(sizes[level], len(ratios[level]))
        np.testing.assert_allclose(h / w, expected_ratio, rtol=0.1)  # rounding to whole pixels
        np.testing.assert_allclose(np.sqrt(w * h), expected_size, rtol=0.05)


def test_anchor_levels_must_agree():
    with pytest.raises(ValueError, match="one entry per level"):
        AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),) * 2, strides=(4,))
    with pytest.raises(ValueError, match="2 feature maps for 5 anchor levels"):
        AnchorGenerator()([(4, 4), (2, 2)])


# ---------------------------------------------------------------- matcher, sampler

QUALITY = np.array([[0.90, 0.50, 0.20, 0.10, 0.0],
                    [0.10, 0.60, 0.35, 0.00, 0.0],
                    [0.00, 0.00, 0.00, 0.00, 0.0]], dtype=np.float32)  # box 2 overlaps nothing


def test_matcher_thresholds():
    matches = Matcher(0.7, 0.3)(QUALITY).numpy()
    # 0.9 >= high: box 0; 0.6 and 0.35 in [low, high): ignored; 0.1 and 0 < low: background
    assert matches.tolist() == [0, -2, -2, -1, -1]


def test_matcher_keeps_low_quality_matches():
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(QUALITY).numpy()
    # Prediction 1 is box 1's best (0.6) and is kept; box 2 overlaps nothing
    # and claims no prediction (torchvision would make all IoU-0 ones positive).
    assert matches.tolist() == [0, 1, -2, -1, -1]


def test_low_quality_match_goes_to_the_predictions_own_best_box_and_ties_all_count():
    quality = np.array([[0.40, 0.10, 0.00],
                        [0.30, 0.05, 0.05],
                        [0.00, 0.25, 0.25]], dtype=np.float32)
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality).numpy()
    # Prediction 0 is the best of boxes 0 and 1 and goes to box 0, its own
    # best (torchvision): box 1 is left without one. Box 2's best, tied
    # predictions 1 and 2, are both kept.
    assert matches.tolist() == [0, 2, 2]
    assert Matcher(0.7, 0.3)(quality).numpy().tolist() == [-2, -1, -1]


def test_matcher_without_boxes_is_all_background():
    assert Matcher(0.7, 0.3, True)(np.zeros((0, 4), dtype=np.float32)).numpy().tolist() == [-1] * 4


def test_sampler_balances_and_never_picks_ignored():
    paddle.seed(3)
    labels = np.array([1] * 10 + [0] * 100 + [-1] * 20, dtype=np.int64)
    positive, negative = (m.numpy() for m in BalancedSampler(16, 0.25)(labels))
    assert positive.sum() == 4 and negative.sum() == 12
    assert labels[positive].min() >= 1 and (labels[negative] == 0).all()
    # Too few positives: the rest of the batch is negatives.
    few = np.array([2, 1] + [0] * 100 + [-1] * 5, dtype=np.int64)
    positive, negative = (m.numpy() for m in BalancedSampler(16, 0.25)(few))
    assert positive.tolist()[:2] == [True, True] and positive.sum() == 2 and negative.sum() == 14
    assert not negative[-5:].any()


def test_sampler_is_random_but_seeded():
    labels = np.array([1] * 50 + [0] * 50, dtype=np.int64)
    draws = []
    for seed in (1, 1, 2):
        paddle.seed(seed)
        draws.append(BalancedSampler(10, 0.5)(labels)[0].numpy())
    assert (draws[0] == draws[1]).all() and not (draws[0] == draws[2]).all()


# ---------------------------------------------------------------- NMS

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy(seed, threshold):
    rng = np.random.RandomState(seed)
    boxes = random_boxes(rng, 150, quantum=4 if seed % 2 else None)
    scores = rng.rand(150).astype(np.float32)
    if seed % 3 == 0:  # many equal scores: the lower index must win
        scores = np.round(scores * 5) / 5
    assert nms(boxes, scores, threshold).numpy().tolist() == numpy_nms(boxes, scores, threshold).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_per_class_numpy(seed):
    rng = np.random.RandomState(seed)
    boxes, scores = random_boxes(rng, 200, quantum=2), rng.rand(200).astype(np.float32)
    classes = rng.randint(0, 4, 200)
    expected = []
    for cls in range(4):
        members = np.flatnonzero(classes == cls)
        expected += members[numpy_nms(boxes[members], scores[members], 0.5)].tolist()
    expected.sort(key=lambda i: (-scores[i], i))
    got = batched_nms(boxes, scores, classes, 0.5).numpy().tolist()
    assert got == expected
    # Across classes nothing is suppressed: more survive than in class-blind NMS.
    assert len(got) > len(nms(boxes, scores, 0.5).numpy())


def test_nms_of_nothing_is_empty():
    empty = np.zeros((0, 4), dtype=np.float32)
    assert nms(empty, np.zeros(0, np.float32), 0.5).shape == [0]
    assert batched_nms(empty, np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5).shape == [0]
