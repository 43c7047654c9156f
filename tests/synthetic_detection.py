"""Synthetic detection data (tests/tasks/detection): rectangles, ellipses and
triangles, a few per image, filled with a flat colour on smooth random
colour textures, with their boxes and per-object masks, written as a PASCAL
VOC folder or as COCO json. Seeded: the same arguments give the same files.

A box is the tight box of its object's mask in continuous pixels (the mask's
first column x1 to its last column + 1 = x2), the convention of
paddle_tl/tasks/detection: VOC files get it as 1-based inclusive pixel
corners (xmin = x1 + 1, xmax = x2), COCO json as [x1, y1, x2 - x1, y2 - y1].
"""

import json
import math
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ellipse", "rectangle", "triangle")


def _texture(rng, width, height):
    """Smooth random colours: a 4x4 grid of colours scaled up."""
    grid = Image.fromarray((rng.rand(4, 4, 3) * 255).astype(np.uint8))
    return grid.resize((width, height), Image.BILINEAR)


def _outline(kind, x, y, w, h):
    """The shape's polygon (an ellipse as 24 points), for drawing and as
    COCO's segmentation."""
    if kind == "rectangle":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if kind == "triangle":
        return [(x, y + h), (x + w, y + h), (x + w / 2, y)]
    return [(x + w / 2 + w / 2 * math.cos(t), y + h / 2 + h / 2 * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def make_images(count, seed, size=(96, 72), max_objects=3, empty_every=0):
    """`count` images as dicts: id, image (PIL), boxes float32 [N, 4],
    labels int64 [N] (indices into CLASSES), masks uint8 [N, H, W] (1 on the
    object, later objects drawn over earlier ones), polygons. Every
    `empty_every`-th image (when > 0) has no objects."""
    rng = np.random.RandomState(seed)
    width, height = size
    images = []
    for index in range(count):
        image = _texture(rng, width, height)
        draw = ImageDraw.Draw(image)
        number = 0 if empty_every and index % empty_every == empty_every - 1 else rng.randint(1, max_objects + 1)
        labels, masks, polygons = [], [], []
        for _ in range(number):
            kind = rng.randint(len(CLASSES))
            w, h = rng.randint(12, width // 2), rng.randint(12, height // 2)
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            outline = _outline(CLASSES[kind], x, y, w, h)
            mask = Image.new("L", size, 0)
            ImageDraw.Draw(mask).polygon(outline, fill=1)
            colour = tuple(int(v) for v in rng.randint(0, 256, 3))
            draw.polygon(outline, fill=colour)
            # An object drawn later covers the earlier ones.
            masks = [m * (1 - np.asarray(mask)) for m in masks] + [np.asarray(mask, dtype=np.uint8)]
            labels.append(kind)
            polygons.append([round(v, 2) for point in outline for v in point])
        keep = [i for i, m in enumerate(masks) if m.any()]  # wholly covered objects are not in the image
        masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), np.uint8)
        boxes = np.array([_tight_box(m) for m in masks], dtype=np.float32).reshape(-1, 4)
        images.append({"id": f"img_{index:03d}", "image": image, "boxes": boxes,
                       "labels": np.array([labels[i] for i in keep], dtype=np.int64), "masks": masks,
                       "polygons": [polygons[i] for i in keep]})
    return images


def _tight_box(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


def voc_xml(filename, size, objects):
    """A VOC annotation: objects are (name, (xmin, ymin, xmax, ymax) as
    written, difficult)."""
    parts = [f"<annotation><filename>{escape(filename)}</filename>"
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        corners = "".join(f"<{tag}>{value}</{tag}>" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{escape(name)}</name><difficult>{int(difficult)}</difficult>"
                     f"<bndbox>{corners}</bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root, splits, seed=0, size=(96, 72), empty_every=0, difficult_every=0, masks=False):
    """A VOC folder with the given {split: image count}; returns {split:
    make_images' dicts}. Every `difficult_every`-th object is difficult.
    masks: SegmentationObject/<id>.png for images with objects, as VOC
    writes them: a palette PNG of instance indices 1..N in the XML's order,
    0 background, 255 (void) on each object's outermost pixels."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main", *(("SegmentationObject",) if masks else ())):
        (root / folder).mkdir(parents=True, exist_ok=True)
    written, offset = {}, 0
    for split, count in splits.items():
        images = make_images(count, seed + offset, size, empty_every=empty_every)
        for image in images:
            image["id"] = f"{split}_{image['id']}"
            image["image"].save(root / "JPEGImages" / f"{image['id']}.jpg", quality=95)
            image["difficult"] = np.array([bool(difficult_every) and (n % difficult_every == difficult_every - 1)
                                           for n in range(len(image["labels"]))], dtype=bool)
            objects = [(CLASSES[label], (int(b[0]) + 1, int(b[1]) + 1, int(b[2]), int(b[3])), d)
                       for label, b, d in zip(image["labels"], image["boxes"], image["difficult"])]
            (root / "Annotations" / f"{image['id']}.xml").write_text(
                voc_xml(f"{image['id']}.jpg", size, objects))
            if masks and len(image["masks"]):
                instance_png(image["masks"]).save(root / "SegmentationObject" / f"{image['id']}.png")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i['id']}\n" for i in images))
        written[split] = images
        offset += 1
    return written


def instance_png(masks):
    """VOC's SegmentationObject PNG of masks uint8 [N, H, W]: instance
    k + 1 on mask k, void (255) on its border pixels (those with a
    4-neighbour outside it), as VOC outlines its objects."""
    indices = np.zeros(masks.shape[1:], np.uint8)
    for number, mask in enumerate(masks, 1):
        indices[mask > 0] = number
    for mask in masks:
        inside = np.pad(mask > 0, 1)
        interior = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        indices[(mask > 0) & ~interior] = 255
    png = Image.frombytes("P", indices.shape[::-1], indices.tobytes())
    png.putpalette([value for index in range(256) for value in ((index * 37) % 256, (index * 91) % 256, index)])
    return png


def coco_json(images, size, category_ids=None):
    """COCO annotation data for make_images' dicts (file names <id>.png);
    categories' ids default to 1..K, deliberately not 0-based."""
    category_ids = category_ids or list(range(1, len(CLASSES) + 1))
    data = {"images": [], "annotations": [],
            "categories": [{"id": cid, "name": name} for cid, name in zip(category_ids, CLASSES)]}
    for number, image in enumerate(images, 1):
        data["images"].append({"id": number, "file_name": f"{image['id']}.png", "width": size[0], "height": size[1]})
        for box, label, polygon in zip(image["boxes"], image["labels"], image["polygons"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": number,
                                        "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0,
                                        "segmentation": [polygon]})
    return data


def write_coco(folder, count, seed=0, size=(96, 72), empty_every=0):
    """folder/images/<id>.png and folder/annotations.json; returns
    (images folder, json path, make_images' dicts)."""
    images = make_images(count, seed, size, empty_every=empty_every)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        image["image"].save(folder / "images" / f"{image['id']}.png")
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco_json(images, size)))
    return folder / "images", path, images
