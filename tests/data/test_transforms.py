import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from paddle_tl.config import AugmentConfig
from paddle_tl.data.transforms import Preprocess, eval_transform, train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_pre(input_size=32, resize_short=36):
    return Preprocess(input_size, resize_short, IMAGENET_MEAN, IMAGENET_STD)


def random_image(width=60, height=45, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_from_spec_uses_the_spec_table():
    spec = SimpleNamespace(input_size=224, resize_short=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    pre = Preprocess.from_spec(spec)
    assert (pre.input_size, pre.resize_short, pre.mean, pre.std) == (224, 256, IMAGENET_MEAN, IMAGENET_STD)
    assert pre.channel_order == "RGB"


def test_from_spec_input_size_override_keeps_the_resize_ratio():
    spec = SimpleNamespace(input_size=224, resize_short=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert Preprocess.from_spec(spec, input_size=299).resize_short == round(299 * 256 / 224)
    assert Preprocess.from_spec(spec, input_size=224).resize_short == 256


def test_dict_round_trip_is_yaml_safe():
    pre = make_pre()
    text = yaml.safe_dump(pre.to_dict())
    assert Preprocess.from_dict(yaml.safe_load(text)) == pre


def test_impossible_preprocess_refused():
    with pytest.raises(ValueError, match="resize_short"):
        Preprocess(224, 200, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="std"):
        Preprocess(224, 256, IMAGENET_MEAN, (0.2, 0.0, 0.2))


def test_eval_transform_normalises_a_constant_image():
    pre = Preprocess(64, 73, IMAGENET_MEAN, IMAGENET_STD)
    out = eval_transform(pre)(Image.new("RGB", (100, 200), (128, 128, 128)))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected.reshape(3, 1, 1), out.shape), atol=1e-5)


def test_eval_transform_crops_the_centre():
    # 200x100: left half black, right half white; short side 64 -> 128x64, the
    # centred 64x64 crop is half black, half white.
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))
    pre = Preprocess(64, 64, (0, 0, 0), (1, 1, 1))
    out = eval_transform(pre)(image)
    assert out[:, :, :31].max() < 0.01 and out[:, :, 33:].min() > 0.99


def test_eval_transform_is_deterministic_and_picklable():
    transform = eval_transform(make_pre())
    image = random_image()
    clone = pickle.loads(pickle.dumps(transform))
    np.testing.assert_array_equal(transform(image), clone(image))


def test_train_transform_shape_and_seeded_randomness():
    transform = train_transform(make_pre(), AugmentConfig(color_jitter=0.4, vflip=True))
    image = random_image()
    random.seed(7)
    first = transform(image)
    random.seed(7)
    again = pickle.loads(pickle.dumps(transform))(image)
    assert first.shape == (3, 32, 32) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, transform(image))


def test_train_transform_hflip_only():
    # A square image with crop scale 1 is always taken whole (no ratio fits),
    # so the output is the resized image or its mirror, never upside down.
    pre = Preprocess(32, 32, (0, 0, 0), (1, 1, 1))
    image = random_image(32, 32)
    plain = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255
    mirrored = plain[:, :, ::-1]
    transform = train_transform(pre, AugmentConfig(crop_scale=[1.0, 1.0], hflip=True, vflip=False))
    random.seed(0)
    outputs = [transform(image) for _ in range(20)]
    assert any(np.allclose(out, plain, atol=1e-6) for out in outputs)
    assert any(np.allclose(out, mirrored, atol=1e-6) for out in outputs)
    assert all(np.allclose(out, plain, atol=1e-6) or np.allclose(out, mirrored, atol=1e-6) for out in outputs)


def test_train_transform_handles_extreme_aspect_ratios():
    transform = train_transform(make_pre(), AugmentConfig())
    for size in [(1, 1), (500, 3), (3, 500)]:
        assert transform(random_image(*size)).shape == (3, 32, 32)


def test_training_without_augmentation_sees_the_evaluation_view():
    from paddle_tl.config import AugmentConfig
    from paddle_tl.data.transforms import augmentation_off, train_transform

    pre = Preprocess(input_size=32, resize_short=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    off = AugmentConfig(crop_scale=[1.0, 1.0], hflip=False, vflip=False, color_jitter=0.0)
    assert augmentation_off(off) and not augmentation_off(AugmentConfig())
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (50, 70, 3)).astype(np.uint8))
    np.testing.assert_array_equal(train_transform(pre, off)(image), eval_transform(pre)(image))


@pytest.mark.parametrize("width, height, factor", [
    (4000, 3000, 8), (3000, 4000, 8), (500, 375, 2), (1000, 250, 2), (40, 30, 1)])
def test_reduced_jpeg_decode_leaves_every_crop_at_least_input_size(width, height, factor):
    """draft_size may shrink the decode, but no random crop of the shrunken
    image may have fewer than input_size pixels a side (extreme aspect ratios
    included: there the short side limits the crop)."""
    augment = train_transform(make_pre(64, 73), AugmentConfig(crop_scale=[0.35, 1.0]))
    w, h = augment.draft_size(width, height)
    assert min(width // w, height // h) == factor  # the scale Pillow's JPEG draft picks for this request
    decoded = (-(-width // factor), -(-height // factor))  # libjpeg rounds scaled sizes up
    random.seed(0)
    crops = [augment._crop_box(*decoded) for _ in range(3000)]
    if factor > 1:
        assert min(min(c[2:]) for c in crops) >= 64
