"""Datasets for image classification: class folders, PaddleClas list files and
the elpv solar-cell demo set, plus the DataLoader that feeds them.

Everything that can be wrong with the data is found when the dataset is built,
before any training: missing or empty classes, bad labels, and image files
that cannot be decoded (those are left out and reported, not fatal).
"""

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from paddle_tl.errors import DataError
from paddle_tl.runtime import import_paddle, progress

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

# A truncated file must fail the scan rather than load with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ELPV_FOUR_CLASS = ["functional", "possibly_defective", "likely_defective", "defective"]
ELPV_BINARY = ["functional", "defective"]
# Folder names that suggest ImageFolder.root points one level too high.
_SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "eval"}
# Above this many files the scan shows a progress bar.
PROGRESS_MIN_FILES = 200


def _image_extensions():
    # Stub formats (HDF5, GRIB, WMF, ...) are recognised by Pillow but need an
    # external handler to decode, so their files are not images to us.
    Image.init()
    return frozenset(
        ext for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and not (isinstance(Image.OPEN[fmt][0], type)
                                      and issubclass(Image.OPEN[fmt][0], ImageFile.StubImageFile)))


IMAGE_EXTENSIONS = _image_extensions()


# ---------------------------------------------------------------- decoding

def load_rgb(path, draft_size=None):
    """Decode any image Pillow can open into 8-bit RGB, upright per its EXIF
    orientation. Raises DataError naming the file when it cannot.

    draft_size(width, height) -> (w, h), when given, lets a JPEG decode at
    1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, `Image.draft`), no
    smaller than (w, h): several times faster on large photos. The pixels
    differ from a full decode followed by a resize, so only training
    augmentation asks for it; evaluation, export and inference decode in full."""
    try:
        with Image.open(path) as image:
            if draft_size is not None:
                image.draft(None, draft_size(*image.size))  # other formats ignore it
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def header_sizes(path, draft_size=None):
    """((width, height) stored, (width, height) load_rgb(path, draft_size)
    would decode) from the header alone, no pixel decoded. Raises DataError
    as load_rgb does when Pillow cannot even open it."""
    try:
        with Image.open(path) as image:
            stored = image.size
            if draft_size is not None:
                image.draft(None, draft_size(*stored))
            return stored, image.size
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def _to_rgb(image):
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF: Pillow's own convert() clips to 255, so scale instead.
        # Mode "I" is how Pillow also delivers 16-bit data; assume that range.
        return _grey_rows(np.asarray(image), _scaled_16_bit)
    if mode == "F":
        # Float images have no fixed range: [0, 1] data is taken as such,
        # anything else is scaled by its maximum.
        data = np.nan_to_num(np.asarray(image, dtype=np.float32))
        full_scale = 1.0 if data.max(initial=0) <= 1 else float(data.max())
        return _grey_rows(data, lambda rows: np.clip(np.round(rows.astype(np.float64) * (255.0 / full_scale)), 0, 255))
    if image.has_transparency_data:
        # Transparent pixels keep arbitrary colours (often a palette's filler);
        # put them on white, as a viewer shows them, so they cannot leak in.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


# Rows converted at a time to 8 bits: the intermediate arrays of a whole large
# image (a 9400 x 9400 16-bit PNG took 2.5 GB through float64) stay this small.
_GREY_ROWS_PIXELS = 1 << 20


def _grey_rows(data, to_8_bit):
    """RGB of the 2-D array `data`, to_8_bit(rows) mapping a block of rows
    to values in [0, 255], a block at a time."""
    grey = np.empty(data.shape, np.uint8)
    step = max(1, _GREY_ROWS_PIXELS // max(1, data.shape[1]))
    for top in range(0, data.shape[0], step):
        grey[top:top + step] = to_8_bit(data[top:top + step])
    return Image.fromarray(grey).convert("RGB")


def _scaled_16_bit(rows):
    """round(v * 255 / 65535) of 16-bit values (clipped to [0, 65535]) in
    integers: 255 / 65535 = 1 / 257, and v / 257 is never a tie at .5 (257
    is odd), so (v + 128) // 257 rounds it as float arithmetic did."""
    return (np.clip(rows, 0, 65535).astype(np.int32) + 128) // 257


def _reason(exc):
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------- dataset

class ClassificationDataset(paddle.io.Dataset):
    """(path, label) samples decoded on access; yields (float32 CHW image,
    int64 label of shape [1]) as paddle.Model expects."""

    def __init__(self, samples, class_names, transform, skipped=()):
        super().__init__()
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.skipped = list(skipped)  # (path, reason) of files left out

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        # A transform that needs less than the full image says how much (TrainTransform).
        image = load_rgb(path, getattr(self.transform, "draft_size", None))
        if self.transform is not None:
            image = self.transform(image)
        return image, np.array([label], dtype=np.int64)

    def class_counts(self):
        counts = Counter(label for _, label in self.samples)
        return [counts[i] for i in range(len(self.class_names))]


def build_dataset(cfg, side, transform, class_names=None, refuse_label_conflicts=True):
    """Build the dataset a DatasetConfig describes.

    side: "train", "eval" or "target", the loader this dataset feeds (elpv
    picks its split from it; the target domain's images come from its train
    split). class_names: the training set's classes, when building eval, so
    that label indices agree; eval may lack some of them but add none.
    refuse_label_conflicts: False keeps a file found under two classes (see
    label_conflicts) in both, for `check-data` to report rather than stop.
    """
    if side not in ("train", "eval", "target"):
        raise ValueError(f"side must be 'train', 'eval' or 'target', got {side!r}")
    key = f"DataLoader.{side.capitalize()}.dataset"
    required = {"ImageFolder": "root", "ListFile": "list_file"}.get(cfg.name)
    if required and getattr(cfg, required) is None:
        raise DataError(f"{key}.{required}: required for the {cfg.name} dataset")
    if cfg.name == "ImageFolder":
        samples, names = _image_folder(cfg.root)
    elif cfg.name == "ListFile":
        samples, names = _list_file(cfg, class_names)
    elif cfg.name == "elpv":
        samples, names = _elpv(cfg, cfg.split or ("eval" if side == "eval" else "train"))
    elif cfg.name == "Images":
        raise DataError(f"{key}.name: Images has no labels; it can only be DataLoader.Target.dataset")
    else:
        raise DataError(f"unknown dataset {cfg.name!r}")

    where = _describe(cfg)
    if side != "target" and refuse_label_conflicts:
        # Refused, not skipped as a link looping back is: which class the
        # file belongs to is the user's call (the link may be the mistake, or
        # the folder it points into), and either way, trained in both, every
        # copy but one teaches a wrong label. The target's labels go unused.
        conflicts = label_conflicts(samples, names)
        if conflicts:
            raise DataError(f"{where}: {describe_label_conflicts(conflicts)}; an image needs one class: "
                            "remove the link or the copy under the wrong class")
    if side == "train" and len(names) < 2:
        # Refused before the images are decoded: nothing else could be learned.
        raise DataError(f"{where}: only one class found ({names[0]!r}); a classifier needs at least two")
    if class_names is not None:
        samples = _align_to(samples, names, list(class_names), where)
        names = list(class_names)
    samples, skipped = _drop_unreadable(samples)
    dataset = ClassificationDataset(samples, names, transform, skipped)
    _check_classes(dataset, defines_classes=class_names is None, where=where)
    return dataset


def split_validation(dataset, fraction, seed, transform):
    """(train, val): a stratified, seeded split of a training dataset. Of
    every class, round(n x fraction) images (at least one left to train on)
    go to the validation split, which gets `transform` (the evaluation one)
    and chooses the best epoch, so that the Eval split is only reported. The
    same seed gives the same split; each keeps the dataset's order."""
    rng = np.random.RandomState(seed)
    labels = np.array([label for _, label in dataset.samples])
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(len(dataset.class_names)):
        members = np.flatnonzero(labels == c)
        count = min(int(len(members) * fraction + 0.5), len(members) - 1)
        if count > 0:
            is_val[rng.permutation(members)[:count]] = True
    train = ClassificationDataset([s for s, v in zip(dataset.samples, is_val) if not v], dataset.class_names,
                                  dataset.transform, dataset.skipped)
    val = ClassificationDataset([s for s, v in zip(dataset.samples, is_val) if v], dataset.class_names, transform)
    return train, val


def subsample(dataset, per_class, seed):
    """At most `per_class` images of every class (seeded, in the dataset's
    order), as a dataset that knows which rows of `dataset` it holds
    (`parent`, `indices`): caches of the parent serve it too."""
    rng = np.random.RandomState(seed)
    labels = np.array([label for _, label in dataset.samples])
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep[rng.permutation(members)[:per_class]] = True
    if keep.all():
        return dataset
    subset = ClassificationDataset([s for s, k in zip(dataset.samples, keep) if k], dataset.class_names,
                                   dataset.transform)
    subset.parent, subset.indices = dataset, np.flatnonzero(keep)
    return subset


UNLABELED = -1  # the label of a target-domain image


def build_target_dataset(cfg, transform):
    """The unlabeled images of DataLoader.Target: an `Images` folder, or any
    labeled dataset with its labels dropped (they must not reach training)."""
    if cfg.name != "Images":
        labeled = build_dataset(cfg, "target", transform)
        return ClassificationDataset([(path, UNLABELED) for path, _ in labeled.samples], [], transform,
                                     labeled.skipped)
    if cfg.root is None:
        raise DataError("DataLoader.Target.dataset.root: required for the Images dataset")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"DataLoader.Target.dataset.root: {root} is {'not a folder' if root.exists() else 'missing'}")
    samples, skipped = _drop_unreadable([(path, UNLABELED) for path in find_images(root)])
    if not samples:
        raise DataError(f"DataLoader.Target.dataset.root: no readable images below {root}")
    return ClassificationDataset(samples, [], transform, skipped)


def _describe(cfg):
    if cfg.name == "ImageFolder":
        return f"ImageFolder {cfg.root}"
    if cfg.name == "ListFile":
        return f"list file {cfg.list_file}"
    return f"elpv ({cfg.label_mode}, cell_type={cfg.cell_type})"


def _align_to(samples, names, train_names, where):
    """Re-index labels into the training set's class list."""
    unknown = [name for name in names if name not in train_names]
    if unknown:
        raise DataError(f"{where}: classes {unknown} are not among the training classes; "
                        f"eval classes: {names}; training classes: {train_names}")
    index = [train_names.index(name) for name in names]
    return [(path, index[label]) for path, label in samples]


def label_conflicts(samples, names):
    """Files filed under more than one class, found by their real path (one
    class folder holding a symbolic link into another, two classes linking
    the same file, a list file naming a file under two labels), in sample
    order: [{"file": real path, "classes": {class name: [its paths]}}].
    Byte-identical copies are not looked for."""
    by_real, cache = defaultdict(lambda: defaultdict(list)), {}
    for path, label in samples:
        by_real[_real_path(path, cache)][names[label]].append(str(path))
    return [{"file": real, "classes": dict(classes)} for real, classes in by_real.items() if len(classes) > 1]


def describe_label_conflicts(conflicts):
    """How many files, the classes most of them are under, an example: one line."""
    groups = Counter(tuple(conflict["classes"]) for conflict in conflicts)
    classes, count = groups.most_common(1)[0]
    example = next(conflict for conflict in conflicts if tuple(conflict["classes"]) == classes)
    paths = list(dict.fromkeys(found[0] for found in example["classes"].values()))
    if len(paths) == 1:  # one path under two labels (a list file)
        same = paths[0]
    elif example["file"] in paths:  # a link into the folder of the file itself
        same = f"{next(path for path in paths if path != example['file'])} is {example['file']}"
    else:
        same = f"{paths[0]} and {paths[1]} are both {example['file']}"
    others = f"; {len(conflicts) - count} more under other classes" if count < len(conflicts) else ""
    return (f"{len(conflicts)} images are filed under more than one class (by their real path): {count} under "
            f"{' and '.join(map(repr, classes))}, e.g. {same}{others}")


def _real_path(path, cache):
    """os.path.realpath(path), resolving each folder once (`cache`): the
    only link a file adds is itself."""
    folder, name = os.path.split(os.fspath(path))
    real_folder = cache.get(folder)
    if real_folder is None:
        real_folder = cache[folder] = os.path.realpath(folder)
    real = os.path.join(real_folder, name)
    return os.path.realpath(real) if os.path.islink(real) else real


def _check_classes(dataset, defines_classes, where):
    empty = [name for name, count in zip(dataset.class_names, dataset.class_counts()) if count == 0]
    if not empty:
        return
    if defines_classes:
        raise DataError(f"{where}: classes {empty} have no readable images; "
                        "every class needs at least one to train on")
    log.warning("%s: no images of the training classes %s; they are not evaluated", where, empty)


# ---------------------------------------------------------------- unreadable files

def _drop_unreadable(samples):
    """Decode every image once; leave out (and report) those that fail."""
    paths = [path for path, _ in samples]
    # Decoding runs in C with the GIL released, so threads use all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reasons = list(progress(pool.map(_unreadable_reason, paths), "checking images", total=len(paths),
                                unit="img", min_total=PROGRESS_MIN_FILES))
    kept, skipped = [], []
    for sample, reason in zip(samples, reasons):
        if reason is None:
            kept.append(sample)
        else:
            skipped.append((sample[0], reason))
            log.warning("skipping unreadable image %s: %s", sample[0], reason)
    if skipped:
        log.warning("skipped %d unreadable of %d images", len(skipped), len(samples))
    return kept, skipped


def _unreadable_reason(path):
    try:
        load_rgb(path)
    except DataError as exc:
        return _reason(exc.__cause__)
    return None


# ---------------------------------------------------------------- ImageFolder

def _image_folder(root):
    """root/<class>/**/<image>; classes sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder root {root} is {'not a folder' if root.exists() else 'missing'}")
    class_dirs = sorted((entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
                        key=lambda entry: entry.name)
    if not class_dirs:
        raise DataError(f"ImageFolder root {root} has no class folders (expected {root}/<class>/<images>)")
    names = [entry.name for entry in class_dirs]
    if {"Annotations", "JPEGImages"} <= set(names):
        # A PASCAL VOC folder would train a classifier of "JPEGImages" against the rest.
        raise DataError(f"ImageFolder root {root} holds Annotations/ and JPEGImages/: a PASCAL VOC detection "
                        "folder, not class folders; train it with a detection config (Global.task=detection, "
                        "e.g. configs/faster_rcnn_mobilenet_v2_voc.yaml)")
    if set(names) <= _SPLIT_NAMES:
        log.warning("ImageFolder root %s has class folders %s, which look like splits; "
                    "should root be one of them?", root, names)
    samples = []
    for label, class_dir in enumerate(class_dirs):
        images = list(find_images(class_dir))
        if not images:
            raise DataError(f"class folder {class_dir} has no images "
                            f"(extensions looked for: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples += [(path, label) for path in _once_each(images, class_dir)]
    return samples, names


def _once_each(paths, class_dir):
    """The paths without those whose real file came earlier in the class:
    counted once, as a folder is entered once (find_images), rather than
    weighted by how many links reach it; the label is the same either way."""
    first, kept, twice, cache = {}, [], [], {}
    for path in paths:
        real = _real_path(path, cache)
        if real in first:
            twice.append((first[real], path, real))
        else:
            first[real] = path
            kept.append(path)
    if twice:
        log.warning("class folder %s: %d images reached a second time through symbolic links are counted once "
                    "(e.g. %s and %s, both %s)", class_dir, len(twice), *twice[0])
    return kept


def find_images(folder):
    """Image files below folder, sorted, skipping hidden entries; symbolic links
    are followed, but a folder is never entered twice, and a link back to
    `folder` or above it is skipped: it would loop, and through the dataset
    root it would file other classes' images under this one."""
    top = os.path.realpath(folder)
    seen = set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(current)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _loops_back(os.path.join(current, d), top))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(current, name)


def _loops_back(path, top):
    real = os.path.realpath(path)
    if top == real or top.startswith(real.rstrip(os.sep) + os.sep):
        log.warning("skipping %s: it links back to %s, which contains it", path, real)
        return True
    return False


# ---------------------------------------------------------------- ListFile

def _list_file(cfg, known_names):
    """PaddleClas list: "path label" per line. Without a label names file the
    labels index the training classes (when known) or are named "0".."K-1"."""
    list_path = Path(cfg.list_file)
    base = Path(cfg.root) if cfg.root is not None else list_path.parent
    if cfg.label_names_file is not None:
        names = _read_label_names(Path(cfg.label_names_file))
    else:
        names = list(known_names) if known_names is not None else None

    samples = []
    for number, line in read_lines(list_path):
        where = f"{list_path}:{number}"
        parts = line.rsplit(maxsplit=1)  # the last field is the label; paths may hold spaces
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'path label', got {line!r}")
        path_text, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{where}: label {label_text!r} is not an integer") from None
        if label < 0 or (names is not None and label >= len(names)):
            limit = f"0..{len(names) - 1} ({len(names)} classes)" if names is not None else ">= 0"
            raise DataError(f"{where}: label {label} is out of range; labels must be {limit}")
        path = base / path_text
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist")
        samples.append((str(path), label))
    if not samples:
        raise DataError(f"list file {list_path} lists no images")
    if names is None:
        names = [str(i) for i in range(max(label for _, label in samples) + 1)]
    return samples, names


def _read_label_names(path):
    """One class name per line in label order, or PaddleClas label_list lines
    "<index> <name>" (detected when every line has that form)."""
    lines = [line for _, line in read_lines(path)]
    if not lines:
        raise DataError(f"label names file {path} is empty")
    pairs = [line.split(maxsplit=1) for line in lines]
    if all(len(pair) == 2 and pair[0].isdigit() for pair in pairs):
        by_index = {int(index): name.strip() for index, name in pairs}
        if sorted(by_index) != list(range(len(lines))):
            raise DataError(f"label names file {path}: indices must be 0..{len(lines) - 1}, each once")
        names = [by_index[i] for i in range(len(lines))]
    else:
        names = lines
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DataError(f"label names file {path}: class names {duplicates} appear more than once")
    return names


def read_lines(path):
    """(line number, stripped text) of the non-empty lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


# ---------------------------------------------------------------- elpv

def _elpv(cfg, split):
    """The elpv solar-cell set (2,624 300x300 greyscale cells), split
    deterministically and stratified by (defect class, cell type)."""
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("the elpv dataset needs the elpv-dataset package: "
                        "pip install elpv-dataset (or this project's `demo` extra)") from None
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    groups = defaultdict(list)
    # labels.csv: "images/cellNNNN.png  <probability>  <mono|poly>"; a probability
    # of 0, 1/3, 2/3 or 1 that the cell is defective is its four-class label.
    for _, line in read_lines(data_dir / "labels.csv"):
        path_text, probability, cell_type = line.split()
        if cfg.cell_type in ("all", cell_type):
            groups[(round(float(probability) * 3), cell_type)].append(str(data_dir / path_text))

    samples = []
    for (four_class, cell_type), paths in sorted(groups.items()):
        # A fresh RNG per group keeps each group's split the same whatever the
        # cell_type filter includes.
        order = np.random.RandomState(cfg.split_seed).permutation(len(paths))
        n_eval = round(len(paths) * cfg.eval_fraction)
        chosen = order[:n_eval] if split == "eval" else order[n_eval:]
        label = four_class if cfg.label_mode == "four_class" else int(four_class >= 2)  # probability >= 0.5
        samples += [(paths[i], label) for i in sorted(chosen)]
    return samples, ELPV_FOUR_CLASS if cfg.label_mode == "four_class" else ELPV_BINARY


# ---------------------------------------------------------------- loader

# A largest/smallest class ratio above this counts as class imbalance.
IMBALANCE_RATIO = 3.0


def imbalance_ratio(class_counts):
    present = [c for c in class_counts if c]
    return max(present) / min(present) if present else 0.0


