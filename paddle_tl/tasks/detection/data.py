"""Detection datasets: PASCAL VOC folders and COCO json, read into one
`DetectionDataset` of samples with boxes.

Everything wrong with the data is found when the dataset is built, before
any training, as classification does (paddle_tl/data/datasets.py):

- refused with one line naming the file (DataError): XML or json that does
  not parse, an object without a usable box, a class that is not among the
  given class names, an annotation whose image is missing, a split id
  without an annotation, a COCO annotation with an unknown category or
  image id, and a class-folder (ImageFolder) dataset given where a
  detection dataset belongs;
- repaired and counted, each one logged naming file and box: boxes running
  outside the image are clipped to it (the convention of torchvision's and
  PaddleDetection's readers), boxes of zero or negative area (after
  clipping) are dropped;
- left out and reported, like classification's: images that cannot be
  decoded.

Coordinates. A sample's boxes are float32 [N, 4] x1, y1, x2, y2 in
continuous pixel coordinates of the upright (EXIF-applied) image, which
spans [0, W] x [0, H] (boxes.py). COCO's [x, y, w, h] is already continuous:
x2 = x + w. VOC's corners are 1-based pixel indices, both inclusive: pixel i
covers [i - 1, i], so a VOC box is [xmin - 1, ymin - 1, xmax, ymax] here,
exactly Detectron2's conversion (pascal_voc.py). torchvision's VOCDetection
leaves the numbers as written and PaddleDetection's VOC reader takes them
as they are too (clipping x2 to W - 1); both shift boxes by up to a pixel,
which matters for small objects at AP@0.75. A box covering every pixel of a
W x H image, (1, 1, W, H) in VOC, is [0, 0, W, H] here.

Labels are 0..K-1, indices into `class_names`: VOC's sorted object names
across the split's annotations, COCO's categories in id order, or the names
given (evaluation reads its split with the training set's names).
"""

import json
import logging
import os
import xml.etree.ElementTree as ElementTree
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paddle_tl.data.datasets import IMAGE_EXTENSIONS, PROGRESS_MIN_FILES, find_images, load_rgb
from paddle_tl.errors import DataError
from paddle_tl.runtime import import_paddle, progress
from paddle_tl.tasks.detection.masks import check_instance_png, check_segmentation, sample_masks

paddle = import_paddle()
log = logging.getLogger("paddle_tl")

# The contract's splits: a detection config's Train reads `train`, Eval `val`.
DEFAULT_SPLITS = {"train": "train", "eval": "val"}
VOC_LAYOUT = "JPEGImages/, Annotations/*.xml and ImageSets/Main/<split>.txt"


@dataclass
class DetectionSample:
    """One image and its objects. Arrays have one row per object, so an
    image without objects has boxes of shape [0, 4]."""
    image: str  # path of the image file
    boxes: np.ndarray  # float32 [N, 4]: x1, y1, x2, y2 in pixels (see the module's docstring)
    labels: np.ndarray  # int64 [N]: indices into the dataset's class_names
    difficult: np.ndarray  # bool [N]: VOC's flag (AP leaves them out); False for COCO
    iscrowd: np.ndarray  # bool [N]: COCO's crowd regions (ignored in training and AP); False for VOC
    size: tuple  # (width, height) of the decoded, upright image
    annotation: str  # the file the objects come from (XML, or the COCO json)
    # Per object, for the mask head (masks.sample_masks): COCO's segmentation
    # (polygons or RLE exactly as in the json), or, with mask_file, VOC's
    # instance index in that PNG (the object's 1-based place in the XML).
    # None where the reader kept none (VOC read without masks).
    segmentations: list = field(default=None)
    mask_file: str = None  # VOC: SegmentationObject/<id>.png, read with masks

    def __len__(self):
        return len(self.labels)


@dataclass
class ReadIssues:
    """What was repaired or left out while reading, for the data check."""
    unreadable: list = field(default_factory=list)  # {"file", "reason"}
    clipped: list = field(default_factory=list)  # {"file", "box": as written, "clipped_to"}
    dropped: list = field(default_factory=list)  # {"file", "box": as written, "reason"}
    size_mismatches: list = field(default_factory=list)  # {"file", "annotated", "decoded"}


class DetectionDataset(paddle.io.Dataset):
    """Detection samples decoded on access. `transform(image, target)` gets
    the PIL image and a target dict (boxes, labels, difficult, iscrowd as
    numpy arrays) and returns the pair to yield (transforms.py); without one
    the pair is yielded as is.
    Batching images of different sizes and object counts is the training
    step's (next: the network)."""

    def __init__(self, samples, class_names, transform=None, issues=None, source=""):
        super().__init__()
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.issues = issues if issues is not None else ReadIssues()
        self.source = source  # "VOC <root> split <name>" or "COCO <json>", for messages

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.item(index, self.transform)

    def item(self, index, transform, masks=False):
        """The pair of image `index` through `transform` (None: as decoded),
        whatever the dataset's own transform is: the batch loader
        (loader.py) gives the transform per use, so one dataset serves
        training and evaluation. masks: the target gets "masks" uint8
        [N, H, W], rasterised here, on access, as the image is decoded (all
        of a dataset's at once would not fit in memory), then moved by the
        transform with the boxes."""
        sample = self.samples[index]
        image = load_rgb(sample.image)
        target = {"boxes": sample.boxes.copy(), "labels": sample.labels.copy(),
                  "difficult": sample.difficult.copy(), "iscrowd": sample.iscrowd.copy()}
        if masks:
            target["masks"] = sample_masks(sample)
        return transform(image, target) if transform is not None else (image, target)

    def objects_per_class(self):
        counts = Counter(int(label) for sample in self.samples for label in sample.labels)
        return {name: counts[i] for i, name in enumerate(self.class_names)}

    def summary(self):
        """Counts for the data check: images, objects per class, images
        without objects, and what was clipped, dropped or left out."""
        return {"source": self.source, "images": len(self.samples),
                "objects": sum(len(sample) for sample in self.samples),
                "objects_per_class": self.objects_per_class(),
                "difficult": int(sum(sample.difficult.sum() for sample in self.samples)),
                "crowd": int(sum(sample.iscrowd.sum() for sample in self.samples)),
                "images_without_objects": sum(1 for sample in self.samples if len(sample) == 0),
                "unreadable": self.issues.unreadable, "clipped": self.issues.clipped,
                "dropped": self.issues.dropped, "size_mismatches": self.issues.size_mismatches}


# ---------------------------------------------------------------- shared reading

@dataclass
class _Object:
    name: str
    box: tuple  # x1, y1, x2, y2 in this module's convention, before clipping
    written: list  # the box as the annotation wrote it, for messages
    difficult: bool = False
    iscrowd: bool = False
    segmentation: object = None


@dataclass
class _Record:
    image: Path
    annotation: str
    size: tuple  # (width, height) the annotation declares, or None
    objects: list
    mask_file: Path = None  # VOC's SegmentationObject PNG, when read with masks


def _build(records, class_names, transform, source, keep_segmentations):
    """The dataset of parsed records: images decoded (the unreadable left
    out), boxes clipped to the decoded size and degenerate ones dropped."""
    index = {name: i for i, name in enumerate(class_names)}
    issues = ReadIssues()
    sizes = _decode_all([record.image for record in records], issues)
    samples = []
    for record, size in zip(records, sizes):
        if size is None:
            continue
        if record.size is not None and tuple(record.size) != size:
            _size_mismatch(record, size, issues)
        kept = []
        for obj in record.objects:
            box = _clip(obj, size, record.annotation, issues)
            if box is not None:
                kept.append((obj, box))
        samples.append(DetectionSample(
            image=str(record.image),
            boxes=np.array([box for _, box in kept], dtype=np.float32).reshape(-1, 4),
            labels=np.array([index[obj.name] for obj, _ in kept], dtype=np.int64),
            difficult=np.array([obj.difficult for obj, _ in kept], dtype=bool),
            iscrowd=np.array([obj.iscrowd for obj, _ in kept], dtype=bool),
            size=size, annotation=record.annotation,
            segmentations=[obj.segmentation for obj, _ in kept] if keep_segmentations else None,
            mask_file=None if record.mask_file is None else str(record.mask_file)))
    for kind in ("clipped", "dropped", "unreadable"):
        found = getattr(issues, kind)
        if found:
            log.warning("%s: %d %s %s", source, len(found), "images" if kind == "unreadable" else "boxes", kind)
    if not samples:
        raise DataError(f"{source}: no readable images")
    return DetectionDataset(samples, class_names, transform, issues, source)


def _decode_all(paths, issues):
    """(width, height) of every image as load_rgb decodes it (upright, per
    EXIF), None for the unreadable, which are recorded in `issues`."""
    def decode(path):
        try:
            return load_rgb(path).size, None
        except DataError as exc:
            return None, str(exc.__cause__ or exc)

    # Decoding releases the GIL, so threads use all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(progress(pool.map(decode, paths), "checking images", total=len(paths), unit="file",
                                min_total=PROGRESS_MIN_FILES))
    sizes = []
    for path, (size, reason) in zip(paths, results):
        if size is None:
            log.warning("skipping unreadable image %s: %s", path, reason)
            issues.unreadable.append({"file": str(path), "reason": reason})
        sizes.append(size)
    return sizes


def _size_mismatch(record, size, issues):
    # A swapped size is most likely a photo whose EXIF rotation the
    # annotation tool ignored: its boxes describe the image lying on its side.
    hint = " (swapped: the boxes may have been drawn before the EXIF rotation)" \
        if tuple(record.size) == size[::-1] else ""
    log.warning("%s: the annotation says the image is %dx%d, it decodes to %dx%d%s; boxes are clipped to the "
                "decoded size", record.annotation, *record.size, *size, hint)
    issues.size_mismatches.append({"file": record.annotation, "annotated": list(record.size), "decoded": list(size)})


def _clip(obj, size, annotation, issues):
    """The object's box clipped to the image, or None (dropped) when
    nothing of positive area is left."""
    width, height = size
    x1, y1, x2, y2 = obj.box
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        reason = "zero or negative area" if (x2 <= x1 or y2 <= y1) else f"outside the {width}x{height} image"
        log.warning("%s: dropping the %r box %s: %s", annotation, obj.name, obj.written, reason)
        issues.dropped.append({"file": annotation, "class": obj.name, "box": obj.written, "reason": reason})
        return None
    if clipped != (x1, y1, x2, y2):
        log.info("%s: clipped the %r box %s to the %dx%d image", annotation, obj.name, obj.written, width, height)
        issues.clipped.append({"file": annotation, "class": obj.name, "box": obj.written,
                               "clipped_to": [round(v, 3) for v in clipped]})
    return clipped


def _check_known(name, class_names, where):
    if class_names is not None and name not in class_names:
        raise DataError(f"{where}: class {name!r} is not among the classes {list(class_names)}")


# ---------------------------------------------------------------- PASCAL VOC

def check_voc_root(root, where="VOC root"):
    """Refuse, in one line, a root that is not a VOC folder; a folder of
    class sub-folders (ImageFolder) is named as such. `where` names the
    setting, e.g. DataLoader.Train.dataset.root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{where}: {root} is {'not a folder' if root.exists() else 'missing'}")
    for needed in ("Annotations", "JPEGImages"):
        if not (root / needed).is_dir():
            if looks_like_class_folders(root):
                raise DataError(f"{where}: {root} has no {needed}/ folder; it looks like a class-folder dataset "
                                "(ImageFolder) - use a classification config, or a VOC folder "
                                f"({VOC_LAYOUT}) for detection")
            raise DataError(f"{where}: {root} has no {needed}/ folder; a detection dataset is a PASCAL VOC "
                            f"folder ({VOC_LAYOUT})")


def looks_like_class_folders(root):
    """Whether root holds sub-folders with images of their own (ImageFolder's
    layout) and no VOC Annotations/ folder."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return False
    folders = [entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    return any(any(True for _ in find_images(folder)) for folder in folders)


def voc_split_ids(root, split, where="VOC root"):
    """The image ids of ImageSets/Main/<split>.txt, in file order."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DataError(f"{where}: {path} is missing (splits found: {', '.join(found) or 'none'})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    # Per-class split files ("<id> 1") share the folder; the id is the first field.
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"{path} lists no images")
    repeated = [name for name, count in Counter(ids).items() if count > 1]
    if repeated:
        raise DataError(f"{path}: {repeated[0]!r} is listed {Counter(ids)[repeated[0]]} times")
    return path, ids


def read_voc(root, split, class_names=None, transform=None, where="VOC root", masks=False):
    """The DetectionDataset of a VOC folder's split. class_names: the
    training set's, when reading evaluation data; otherwise the sorted
    object names of the split's annotations. masks (Mask R-CNN): every
    image with objects needs SegmentationObject/<id>.png, whose instance
    index k is the XML's k-th object (VOC's own convention), refused in
    one line where it is missing or not of the image's size."""
    check_voc_root(root, where)
    root = Path(root)
    list_path, ids = voc_split_ids(root, split, where)
    records = [_voc_record(root, image_id, f"{list_path}:{number}")
               for number, image_id in enumerate(ids, 1)]
    if masks:
        for image_id, record in zip(ids, records):
            _voc_instances(root, image_id, record)
    names = sorted({obj.name for record in records for obj in record.objects})
    if class_names is None:
        if not names:
            raise DataError(f"{list_path}: no objects in any of its {len(ids)} annotations")
        class_names = names
    for record in records:
        for obj in record.objects:
            _check_known(obj.name, class_names, record.annotation)
    dataset = _build(records, list(class_names), transform, f"VOC {root} split {split}", keep_segmentations=masks)
    for sample in dataset.samples if masks else ():
        if sample.mask_file is not None:
            check_instance_png(sample.mask_file, sample.size)
    return dataset


def _voc_instances(root, image_id, record):
    """Point the record's objects at their instance indices in the image's
    SegmentationObject PNG (1-based, in XML order: set before any box is
    dropped, so the indices stay those of the file)."""
    png = root / "SegmentationObject" / f"{image_id}.png"
    if record.objects and not png.is_file():
        raise DataError(f"{record.annotation}: its objects have no masks: {png} is missing (Arch.mask needs "
                        "VOC's SegmentationObject PNG for every image with objects)")
    record.mask_file = png if png.is_file() else None
    for number, obj in enumerate(record.objects, 1):
        obj.segmentation = number


def _voc_record(root, image_id, listed_at):
    xml_path = root / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        raise DataError(f"{listed_at}: {image_id!r} has no annotation {xml_path}")
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise DataError(f"{xml_path}: not readable as XML ({exc})") from None
    size = None
    if tree.find("size") is not None:
        try:
            size = (int(float(tree.findtext("size/width"))), int(float(tree.findtext("size/height"))))
        except (TypeError, ValueError):
            size = None  # optional; the decoded image's size is what counts
        if size is not None and min(size) <= 0:
            size = None  # some tools write 0 x 0
    objects = [_voc_object(element, number, xml_path) for number, element in enumerate(tree.findall("object"), 1)]
    return _Record(_voc_image(root, image_id, tree.findtext("filename"), xml_path), str(xml_path), size, objects)


def _voc_object(element, number, xml_path):
    name = (element.findtext("name") or "").strip()
    if not name:
        raise DataError(f"{xml_path}: object {number} has no <name>")
    written = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = element.findtext(f"bndbox/{tag}")
        try:
            written.append(float(text))
        except (TypeError, ValueError):
            raise DataError(f"{xml_path}: object {number} ({name!r}) has "
                            f"{'no' if text is None else 'a non-numeric'} bndbox/{tag}"
                            f"{'' if text is None else f' ({text.strip()!r})'}") from None
    if not all(np.isfinite(written)):
        raise DataError(f"{xml_path}: object {number} ({name!r}) has a non-finite box {written}")
    xmin, ymin, xmax, ymax = written
    difficult = (element.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
    # 1-based inclusive pixel corners -> continuous coordinates (module docstring)
    return _Object(name, (xmin - 1, ymin - 1, xmax, ymax), [_number(v) for v in written], difficult=difficult)


def _number(value):
    return int(value) if float(value).is_integer() else value


def _voc_image(root, image_id, filename, xml_path):
    """JPEGImages/<id>.jpg as VOC names it, else <id> with another image
    extension, else the XML's <filename>."""
    folder = root / "JPEGImages"
    candidates = [folder / f"{image_id}.jpg"]
    candidates += [folder / f"{image_id}{ext}" for ext in sorted(IMAGE_EXTENSIONS) if ext != ".jpg"]
    if filename and filename.strip():
        candidates.append(folder / Path(filename.strip()).name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{xml_path}: its image is missing (looked for {candidates[0]}"
                    f"{f' and {candidates[-1]}' if filename and filename.strip() else ''})")


# ---------------------------------------------------------------- COCO

def read_coco(image_root, annotation_file, class_names=None, transform=None, masks=False):
    """The DetectionDataset of a COCO annotation file whose images'
    file_name are relative to image_root. Every listed image is a sample,
    those without annotations too. class_names: the training set's, when
    reading evaluation data; otherwise the categories in id order. masks
    (Mask R-CNN): every object, crowd regions too, needs a segmentation
    (polygons, or RLE of the image's size), refused in one line naming the
    annotation where it has none."""
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    where = str(annotation_file)
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{annotation_file}: not readable as COCO json ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(f"{annotation_file}: not a COCO annotation file (needs 'images' and 'categories' lists)")
    categories = {}
    for category in sorted(data["categories"], key=lambda c: c.get("id", -1) if isinstance(c, dict) else -1):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DataError(f"{annotation_file}: category {category!r} needs an 'id' and a 'name'")
        if category["id"] in categories:
            raise DataError(f"{annotation_file}: category id {category['id']} appears twice")
        categories[category["id"]] = str(category["name"])
    if class_names is None:
        if not categories:
            raise DataError(f"{annotation_file}: no categories")
        class_names = list(categories.values())

    images = {}
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{annotation_file}: image {image!r} needs an 'id' and a 'file_name'")
        if image["id"] in images:
            raise DataError(f"{annotation_file}: image id {image['id']} appears twice")
        path = image_root / image["file_name"]
        if not path.is_file():
            raise DataError(f"{annotation_file}: image {image['file_name']!r} (id {image['id']}) is missing: "
                            f"no file {path}")
        size = (image["width"], image["height"]) if "width" in image and "height" in image else None
        images[image["id"]] = _Record(path, f"{where} (image {image['file_name']})", size, [])

    for ann in data.get("annotations") or []:
        ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            raise DataError(f"{annotation_file}: annotation {ann_id} has image_id "
                            f"{ann.get('image_id') if isinstance(ann, dict) else None!r}, which no image has")
        record = images[ann["image_id"]]
        at = f"{annotation_file}: annotation {ann_id} (image {record.image.relative_to(image_root)})"
        if ann.get("category_id") not in categories:
            raise DataError(f"{at} has category_id {ann.get('category_id')!r}, which is not among the "
                            f"categories (ids {sorted(categories)})")
        name = categories[ann["category_id"]]
        _check_known(name, class_names, at)
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and all(np.isfinite(bbox))):
            raise DataError(f"{at}: bbox {bbox!r} is not [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        segmentation = ann.get("segmentation")
        if masks:
            check_segmentation(segmentation, None, at)  # its size: once the image is decoded, below
        record.objects.append(_Object(name, (x, y, x + w, y + h), bbox, iscrowd=bool(ann.get("iscrowd", 0)),
                                      segmentation=segmentation))
    dataset = _build(list(images.values()), list(class_names), transform, f"COCO {annotation_file}",
                     keep_segmentations=True)
    for sample in dataset.samples if masks else ():
        for segmentation in sample.segmentations:
            # Against the decoded size, which may differ from the one the json declares.
            check_segmentation(segmentation, sample.size, sample.annotation)
    return dataset


def read_dataset(dataset_cfg, side, class_names=None, masks=False):
    """The dataset a config's DataLoader.<side>.dataset names (VOC: split
    `image_set`, by default train for Train and val for Eval; COCO: the
    image folder `root` and `annotation_file`). masks (Mask R-CNN): every
    object's mask is needed, refused in one line where one has none."""
    where = f"DataLoader.{side}.dataset"
    if dataset_cfg.root is None:
        raise DataError(f"{where}.root: required (a VOC folder, or COCO's image folder)")
    if dataset_cfg.name == "COCO":
        if dataset_cfg.annotation_file is None:
            raise DataError(f"{where}.annotation_file: required for COCO (the instances json)")
        return read_coco(dataset_cfg.root, dataset_cfg.annotation_file, class_names, masks=masks)
    split = dataset_cfg.image_set or ("train" if side == "Train" else "val")
    return read_voc(dataset_cfg.root, split, class_names, where=f"{where}.root", masks=masks)
