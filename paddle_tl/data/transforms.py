"""Image preprocessing: one `Preprocess` description, and the train/eval
transforms built from it.

Plain PIL + numpy, so that the exact arithmetic is visible here and can be
written into the inference folder unchanged. Randomness comes from Python's
`random` module: the trainer seeds it, and paddle's DataLoader re-seeds it in
each worker from numpy's global RNG.
"""

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing: resize the short side to `resize_short`,
    center-crop `input_size`, scale to [0, 1], subtract `mean`, divide by `std`
    (per channel, in `channel_order`)."""
    input_size: int
    resize_short: int
    mean: tuple
    std: tuple
    channel_order: str = "RGB"

    def __post_init__(self):
        # tuples keep the dataclass hashable and immutable whatever the caller passed
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.resize_short < self.input_size:
            raise ValueError(f"resize_short {self.resize_short} is smaller than input_size {self.input_size}: "
                             "the center crop would run off the image")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}")
        if self.channel_order != "RGB":
            raise ValueError(f"channel_order {self.channel_order!r} is not supported; images are fed as RGB")

    @classmethod
    def from_spec(cls, spec, input_size=None):
        """From an architecture's table entry (anything with input_size,
        resize_short, mean, std). Overriding input_size keeps the spec's
        resize/crop ratio, e.g. 256/224 for ImageNet models."""
        if input_size is None or input_size == spec.input_size:
            return cls(spec.input_size, spec.resize_short, spec.mean, spec.std)
        resize_short = round(input_size * spec.resize_short / spec.input_size)
        return cls(input_size, resize_short, spec.mean, spec.std)

    def to_dict(self):
        # lists, not tuples: yaml.safe_dump cannot write tuples
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class Normalize:
    """uint8 HWC RGB -> float32 CHW, (x / 255 - mean) / std."""

    def __init__(self, pre):
        self.mean = np.array(pre.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(pre.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image):
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (array - self.mean) / self.std


def resize_short(image, size):
    """Resize so that the shorter side is `size`, keeping the aspect ratio
    (rounded like PaddleClas's ResizeImage)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    return image.resize(_short_side_size(width, height, size), Image.BILINEAR)


def _short_side_size(width, height, size):
    if width <= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def center_crop(image, size):
    # floor division places the crop as PaddleClas's CropImage does
    width, height = image.size
    left = (width - size) // 2
    top = (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def eval_crop_box(width, height, pre):
    """(left, top, right, bottom), in a width x height image's own pixels
    (floats), of the square EvalTransform crops from it: what the network sees."""
    resized = (width, height) if min(width, height) == pre.resize_short else \
        _short_side_size(width, height, pre.resize_short)
    left, top = (resized[0] - pre.input_size) // 2, (resized[1] - pre.input_size) // 2
    sx, sy = resized[0] / width, resized[1] / height
    return left / sx, top / sy, (left + pre.input_size) / sx, (top + pre.input_size) / sy


def reduced_size(width, height, smallest, needed):
    """width x height divided by the largest power of two up to 8 (the
    reductions JPEG's DCT scaling offers, `Image.draft`) that keeps
    `smallest`, the smallest side a transform takes from the image, at least
    `needed` pixels."""
    factor = 1
    while factor < 8 and smallest / (factor * 2) >= needed:
        factor *= 2
    return max(1, width // factor), max(1, height // factor)


class EvalTransform:
    """Deterministic: resize short side, center crop, normalise."""

    def __init__(self, pre):
        self.pre = pre
        self.normalize = Normalize(pre)

    def __call__(self, image):
        image = center_crop(resize_short(image, self.pre.resize_short), self.pre.input_size)
        return self.normalize(image)


class TrainTransform:
    """RandomResizedCrop, optional flips, TrivialAugment and colour jitter,
    normalise."""

    # aspect ratio range of the random crop, as in torchvision and PaddleClas
    RATIO = (3 / 4, 4 / 3)

    def __init__(self, pre, augment):
        self.size = pre.input_size
        self.scale = tuple(augment.crop_scale)
        self.hflip = augment.hflip
        self.vflip = augment.vflip
        self.jitter = augment.color_jitter
        self.trivial = augment.policy == "trivial"
        self.normalize = Normalize(pre)

    def __call__(self, image):
        left, top, width, height = self._crop_box(*image.size)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + width, top + height))
        if self.hflip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.vflip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_TOP_BOTTOM)
        if self.trivial:
            image = trivial_augment(image)
        if self.jitter > 0:
            image = self._color_jitter(image)
        return self.normalize(image)

    def draft_size(self, width, height):
        """The smallest decode of a width x height image that this transform
        can use without losing detail: the image may shrink by a power of two
        (what JPEG's DCT scaling offers, up to 8) as long as every random crop
        keeps at least `size` pixels a side, so that no crop is upsampled.
        The bound does not depend on which way EXIF turns the image."""
        # A random crop's sides are at least sqrt(area * min scale * min ratio);
        # the fallback crop's at least the short side.
        smallest_crop = min(math.sqrt(width * height * self.scale[0] * self.RATIO[0]), width, height)
        return reduced_size(width, height, smallest_crop, self.size)

    def _crop_box(self, width, height):
        """A box of random area fraction in `scale` and aspect ratio in RATIO
        (torchvision's algorithm: 10 tries, then the largest centred box whose
        ratio is within range)."""
        area = width * height
        log_ratio = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            ratio = math.exp(random.uniform(*log_ratio))
            w = round(math.sqrt(target_area * ratio))
            h = round(math.sqrt(target_area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, width - w), random.randint(0, height - h), w, h
        in_ratio = width / height
        if in_ratio < self.RATIO[0]:
            w, h = width, round(width / self.RATIO[0])
        elif in_ratio > self.RATIO[1]:
            w, h = round(height * self.RATIO[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def _color_jitter(self, image):
        low, high = max(0.0, 1 - self.jitter), 1 + self.jitter
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(random.uniform(low, high))
        return image


# TrivialAugment Wide (torchvision's table, 31 strengths): (operation, strength
# at the top bin, whether it takes a random sign). One operation, one
# strength, per image; no search, no tuning.
_BINS = 31
_TRIVIAL = (
    ("identity", 0.0, False), ("shear_x", 0.99, True), ("shear_y", 0.99, True), ("translate_x", 32.0, True),
    ("translate_y", 32.0, True), ("rotate", 135.0, True), ("brightness", 0.99, True), ("color", 0.99, True),
    ("contrast", 0.99, True), ("sharpness", 0.99, True), ("posterize", 6.0, False), ("solarize", 255.0, False),
    ("autocontrast", 0.0, False), ("equalize", 0.0, False),
)
_ENHANCE = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
            "sharpness": ImageEnhance.Sharpness}


def trivial_augment(image):
    """One TrivialAugment Wide operation on a PIL RGB image."""
    name, top, signed = random.choice(_TRIVIAL)
    strength = top * random.randrange(_BINS) / (_BINS - 1)
    if signed and random.random() < 0.5:
        strength = -strength
    if name in _ENHANCE:
        return _ENHANCE[name](image).enhance(1.0 + strength)
    if name in ("shear_x", "shear_y", "translate_x", "translate_y"):
        a, b, c, d, e, f = 1, 0, 0, 0, 1, 0
        if name == "shear_x":
            b = strength
        elif name == "shear_y":
            d = strength
        elif name == "translate_x":
            c = strength
        else:
            f = strength
        return image.transform(image.size, Image.AFFINE, (a, b, c, d, e, f), Image.NEAREST)
    if name == "rotate":
        return image.rotate(strength, Image.NEAREST)
    if name == "posterize":
        return ImageOps.posterize(image, 8 - round(strength))  # 8 bits (unchanged) down to 2
    if name == "solarize":
        return ImageOps.solarize(image, 255 - round(strength))  # from no pixel inverted to all
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    return image


def eval_transform(pre):
    return EvalTransform(pre)


def augmentation_off(augment):
    return (list(augment.crop_scale) == [1.0, 1.0] and not augment.hflip and not augment.vflip
            and not augment.color_jitter and augment.policy == "none")


def train_transform(pre, augment):
    """Random augmentation, or, with every augmentation off, exactly what
    evaluation sees (a full-area random crop would still change the aspect)."""
    return EvalTransform(pre) if augmentation_off(augment) else TrainTransform(pre, augment)
