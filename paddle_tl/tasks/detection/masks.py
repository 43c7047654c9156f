"""Instance masks outside the network (Mask R-CNN, `Arch.mask: true`): the
annotations rasterised into per-object masks, the network's 28 x 28 mask
probabilities pasted back into an image, and masks as COCO RLE.

Masks are uint8 [N, H, W] (1 on the object) in the pixels of the image
they belong to. Polygon coordinates are continuous, as boxes (boxes.py):
pycocotools fills the pixels whose centres fall inside, so the rectangle
polygon (2, 1)-(6, 4) covers columns 2..5 and rows 1..3.

Pure numpy and pycocotools, no paddle: the loader, evaluation and the
predictor call these outside the model.
"""

import numpy as np
from PIL import Image

from paddle_tl.errors import DataError


def _mask_api():
    from paddle_tl.tasks.detection.evaluate import import_cocoeval
    import_cocoeval()  # one line saying how to install pycocotools, where it is missing
    from pycocotools import mask
    return mask


def _polygons(segmentation):
    """The polygons of a COCO polygon segmentation that have an area: lists
    of at least 3 x, y pairs. COCO 2017 itself holds a few 2-point
    "polygons"; as Detectron2, they are left out of their object's outline,
    and only an object with none left is refused (check_segmentation)."""
    return [polygon for polygon in segmentation
            if isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)]


def check_segmentation(segmentation, size, where):
    """Refuse, in one line, a COCO segmentation that cannot be rasterised:
    neither polygons (at least one of 3 x, y pairs or more) nor an RLE dict
    whose size is the image's [height, width]. size: the image's (width,
    height), or None where not known yet."""
    if isinstance(segmentation, dict):
        if not isinstance(segmentation.get("counts"), (str, list)) or "size" not in segmentation:
            raise DataError(f"{where}: its RLE segmentation needs 'size' and 'counts'")
        if size is not None and list(segmentation["size"]) != [size[1], size[0]]:
            raise DataError(f"{where}: its RLE segmentation is of size {list(segmentation['size'])} (height, width); "
                            f"the image is {size[0]}x{size[1]}")
        return
    if not (isinstance(segmentation, list) and _polygons(segmentation)):
        raise DataError(f"{where}: no usable segmentation (Arch.mask needs polygons of at least 3 points, or RLE, "
                        f"for every object); got {str(segmentation)[:60]}")


def rasterize(segmentation, height, width):
    """A COCO segmentation (polygons, or RLE compressed or not) -> uint8
    [height, width]."""
    mask_api = _mask_api()
    if isinstance(segmentation, list):
        rle = mask_api.merge(mask_api.frPyObjects(_polygons(segmentation), height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_api.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_api.decode(rle).astype(np.uint8)


def check_instance_png(path, size, decode=False):
    """Refuse, in one line, a VOC SegmentationObject PNG that does not open,
    is not of the image's (width, height), or holds colours rather than
    indices; with decode, its instance indices [H, W] (0 background, 1..N
    the XML's objects in order, 255 the void border). Without, only the
    header is read."""
    try:
        with Image.open(path) as png:
            # Palette PNGs hold the indices; an RGB rendering of them would not.
            if png.mode not in ("P", "L"):
                raise DataError(f"{path}: a SegmentationObject PNG holds one instance index per pixel (palette or "
                                f"grey), not {png.mode}")
            if png.size != tuple(size):
                raise DataError(f"{path}: {png.size[0]}x{png.size[1]}, and its image is {size[0]}x{size[1]}")
            return np.asarray(png) if decode else None
    except OSError as exc:
        raise DataError(f"{path}: not readable as a PNG ({exc})") from None


def sample_masks(sample):
    """The uint8 [N, H, W] masks of a DetectionSample's objects at its
    decoded size: from its VOC instance PNG (`mask_file`; the objects'
    `segmentations` are their instance indices) or its COCO segmentations.
    The void border (255) belongs to no object."""
    width, height = sample.size
    if sample.segmentations is None:
        raise DataError(f"{sample.annotation}: no masks for its objects")
    if sample.mask_file is not None:
        indices = check_instance_png(sample.mask_file, sample.size, decode=True)
        return np.stack([indices == index for index in sample.segmentations]).astype(np.uint8) \
            if len(sample.segmentations) else np.zeros((0, height, width), np.uint8)
    return np.stack([rasterize(s, height, width) for s in sample.segmentations]) \
        if len(sample.segmentations) else np.zeros((0, height, width), np.uint8)


def sample_segmentations(sample):
    """A DetectionSample's per-object segmentations as COCO ground truth
    takes them: COCO's as written, VOC's instance PNG as RLE."""
    if sample.segmentations is None:
        raise DataError(f"{sample.annotation}: no masks for its objects (read the dataset with masks)")
    if sample.mask_file is None:
        # Polygons as rasterize() reads them: without the ones that have no area.
        return [_polygons(s) if isinstance(s, list) else s for s in sample.segmentations]
    return encode_rle(sample_masks(sample))


def paste_masks(probabilities, boxes, height, width, threshold=0.5):
    """Mask probabilities [D, M, M] over their boxes [D, 4] (x1y1x2y2,
    continuous pixels) -> uint8 [D, height, width], 1 where the bilinearly
    sampled probability is >= threshold. Detectron2's paste (grid_sample
    with align_corners=False and zeros outside): the mask's M cells span the
    box exactly, pixel x's centre x + 0.5 falls at cell
    (x + 0.5 - x1) / (x2 - x1) * M - 0.5, so a mask pasted over the box it
    was pooled from comes back where it was (tests: the round trip)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pasted = np.zeros((len(boxes), height, width), np.uint8)
    if not len(boxes):
        return pasted
    size = probabilities.shape[-1]
    padded = np.pad(probabilities.reshape(-1, size, size), ((0, 0), (1, 1), (1, 1)))  # zeros outside the box
    for out, grid, (x1, y1, x2, y2) in zip(pasted, padded, boxes):
        # Only pixels within a cell of the box can reach a probability above zero.
        col0, col1 = max(int(np.floor(x1)) - 1, 0), min(int(np.ceil(x2)) + 1, width)
        row0, row1 = max(int(np.floor(y1)) - 1, 0), min(int(np.ceil(y2)) + 1, height)
        if col1 <= col0 or row1 <= row0:
            continue
        u = (np.arange(col0, col1) + 0.5 - x1) / max(x2 - x1, 1e-6) * size - 0.5 + 1  # +1: the padding
        v = (np.arange(row0, row1) + 0.5 - y1) / max(y2 - y1, 1e-6) * size - 0.5 + 1
        out[row0:row1, col0:col1] = _bilinear(grid, v, u) >= threshold
    return pasted


def _bilinear(grid, rows, cols):
    """grid sampled at every (row, col) pair of the given coordinates, zero
    beyond its edge cells."""
    rows, cols = np.clip(rows, 0, grid.shape[0] - 1), np.clip(cols, 0, grid.shape[1] - 1)
    r0 = np.minimum(np.floor(rows).astype(int), grid.shape[0] - 2)
    c0 = np.minimum(np.floor(cols).astype(int), grid.shape[1] - 2)
    dr, dc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = grid[r0][:, c0] * (1 - dc) + grid[r0][:, c0 + 1] * dc
    bottom = grid[r0 + 1][:, c0] * (1 - dc) + grid[r0 + 1][:, c0 + 1] * dc
    return top * (1 - dr) + bottom * dr


def encode_rle(masks):
    """uint8 [N, H, W] -> COCO compressed RLE dicts, `counts` as str (so
    they go into json as they are; pycocotools reads both)."""
    mask_api = _mask_api()
    masks = np.asarray(masks, dtype=np.uint8)
    if not len(masks):
        return []
    encoded = mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]
